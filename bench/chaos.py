"""Chaos: closed-loop load with short deadlines and cancels while versions swap, SIGHUPs land and products hide.

One real `lookalike-serve` on 127.0.0.1 serves a private ARTIFACTS holding two versions: the one given and one
derived from it here (a subset of its products plus synthetic ones, so that its Annoy queries take tens of
milliseconds and a swap can land while one runs). For a bounded time, all at once: several callers mix
FindSimilar (by product id, image id, photo and vector) and Recommend with short deadlines and cancels; slow
callers send k = 1000 queries and cancel half of them mid-flight; CURRENT moves between the two versions every
second; SIGHUP arrives every few seconds; products are hidden and shown again; hostile and oversized requests
are mixed in. Every OK answer is checked against the files of the version it names and the hidden products of
the availability version it names. `run` returns the figures and a list of problems (empty when all was well):
tests/server/test_chaos.py asserts it for 30 s, `make soak` records it for 30 minutes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format

from bench import rss
from lookalike import artifacts, neighbours
from lookalike.availability import change_availability, read_availability
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
# Scores and distances an answer reports against those recomputed from the version's vectors.
TOLERANCE = 1e-4
# Codes a well-formed request may get under chaos; anything else (INTERNAL above all) is a problem.
ACCEPTABLE = frozenset({"DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"})
INVALID, LIMIT, MISSING, TOO_BIG = ({"INVALID_ARGUMENT"}, {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
                                    {"NOT_FOUND"}, {"RESOURCE_EXHAUSTED"})
MAX_EXAMPLES = 5  # of each kind of problem, described in full; the rest are counted


@dataclass(frozen=True)
class ChaosConfig:
    """How hard and how long; every loop is bounded by `duration_s` and by `max_calls_per_caller`."""

    duration_s: float = 60.0
    # Closed-loop callers of the ordinary mix, each one request at a time.
    callers: int = 4
    # Callers of k = 1000 queries, most cancelled mid-flight: what makes a swap land under a running query.
    slow_callers: int = 3
    max_calls_per_caller: int = 200_000
    swap_every_s: float = 1.0
    sighup_every_s: float = 1.0
    # Often: two availability files read at once by the watch loop and a SIGHUP must not apply out of order.
    hide_every_s: float = 0.1
    # Share of ordinary calls with a deadline of a few milliseconds, and of calls cancelled by the caller.
    short_deadline_share: float = 0.25
    cancel_share: float = 0.15
    slow_cancel_share: float = 0.9
    # The derived version: this share of the given version's products plus this many synthetic ones.
    keep_share: float = 2 / 3
    synthetic_products: int = 12_000
    seed: int = 0
    watch_interval_s: float = 0.2
    # One caller of hostile and oversized requests beside the others (False: none, to measure without them).
    hostile: bool = True
    # Small, so that an oversized message is cheap to send.
    max_message_mb: int = 4
    # Annoy for any query allowed more rows than this: both versions' queries go through the mapped file.
    exact_max_rows: int = 256
    # Memory is sampled this often; its growth is measured from the end of the warm-up to the end of the run. By
    # 300 s the result cache holds its byte bound (2 minutes at 55 requests a second), both versions have been
    # swapped in hundreds of times and every kind of query has run: what grows after that is not filling up.
    memory_every_s: float = 5.0
    memory_warmup_s: float = 300.0
    # The server command; None: this interpreter's lookalike-serve.
    server_command: tuple[str, ...] | None = None


# ----------------------------------------------------------------------------- artifacts


def private_copy(source: Path, target: Path) -> Path:
    """A copy of ARTIFACTS that the run may change (CURRENT, availability, a new version); `source` stays as is."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*", ".*.lock"))
    return target


def _append_product(products: dict, images: dict, product: dict, image_rows: list[dict]) -> None:
    """Adds one product and its images at the end of column dicts, numbering rows as the builder does."""
    product_row, first_row = len(products["product_id"]), len(images["image_id"])
    product = dict(product, product_row=product_row, first_row=first_row, image_count=len(image_rows),
                   main_image_id=image_rows[0]["image_id"])
    for column in products:
        products[column].append(product[column])
    for offset, image in enumerate(image_rows):
        image = dict(image, row=first_row + offset, product_row=product_row, product_id=product["product_id"])
        for column in images:
            images[column].append(image[column])


def derive_version(artifacts_dir: Path, source: str, name: str, keep_share: float = 2 / 3,
                   synthetic_products: int = 12_000, seed: int = 1) -> str:
    """A second version without Spark or TensorFlow: `keep_share` of the source's products (same vectors), then
    `synthetic_products` near copies of random ones (ids starting with `name`); its own tables, vectors, Annoy
    index and checksums; the model folder and the rest copied as they are."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from annoy import AnnoyIndex

    src, dst = artifacts_dir / source, artifacts_dir / name
    manifest = json.loads((src / artifacts.MANIFEST).read_text())
    if manifest["index"].get("kind", "annoy") != "annoy":
        raise ValueError(f"{source} has a {manifest['index']['kind']} index; the chaos run derives Annoy versions")
    index_file = manifest["index"].get("file", artifacts.INDEX_FILE)
    rng = np.random.default_rng(seed)
    image_table = pq.read_table(src / artifacts.IMAGES_FILE)
    product_table = pq.read_table(src / artifacts.PRODUCTS_FILE)
    old_images, old_products = image_table.to_pydict(), product_table.to_pydict()
    old_vectors = np.load(src / artifacts.VECTORS_FILE)
    images = {column: [] for column in old_images}
    products = {column: [] for column in old_products}
    vectors = []

    def rows_of(p: int) -> range:
        first = old_products["first_row"][p]
        return range(first, first + old_products["image_count"][p])

    def row_dict(columns: dict, row: int) -> dict:
        return {column: values[row] for column, values in columns.items()}

    count = len(old_products["product_id"])
    for p in np.flatnonzero(rng.random(count) < keep_share):
        _append_product(products, images, row_dict(old_products, p), [row_dict(old_images, r) for r in rows_of(p)])
        vectors.append(old_vectors[list(rows_of(p))])
    for j in range(synthetic_products):
        p = int(rng.integers(count))
        product = dict(row_dict(old_products, p), product_id=f"{name}-p{j:05d}")
        rows = list(rows_of(p))
        noisy = old_vectors[rows] + rng.normal(0, 0.03, (len(rows), old_vectors.shape[1])).astype(np.float32)
        vectors.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        _append_product(products, images, product, [dict(row_dict(old_images, r), image_id=f"{name}-i{j:05d}-{m}")
                                                     for m, r in enumerate(rows)])
    vectors = np.ascontiguousarray(np.concatenate(vectors), np.float32)
    # The neighbour lists are left out (the server searches instead): exact lists of 40,000 rows cost minutes.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        artifacts.IMAGES_FILE, artifacts.PRODUCTS_FILE, artifacts.VECTORS_FILE, index_file, artifacts.MANIFEST,
        neighbours.NEIGHBOURS_DIR))
    pq.write_table(pa.table(images, schema=image_table.schema), dst / artifacts.IMAGES_FILE)
    pq.write_table(pa.table(products, schema=product_table.schema), dst / artifacts.PRODUCTS_FILE)
    np.save(dst / artifacts.VECTORS_FILE, vectors, allow_pickle=False)
    index = AnnoyIndex(vectors.shape[1], manifest.get("metric", "euclidean"))
    index.set_seed(seed)
    for row, vector in enumerate(vectors):
        index.add_item(row, vector)
    index.build(int(manifest["index"]["n_trees"]))
    index.save(str(dst / index_file))
    index.unload()
    manifest.update(version=name, created_at=datetime.now(UTC).isoformat(timespec="seconds"), derived_from=source)
    manifest.pop(neighbours.MANIFEST_KEY, None)
    manifest.setdefault("counts", {}).update(indexed=len(vectors), images_indexed=len(vectors),
                                             products=len(products["product_id"]))
    manifest["files"] = artifacts.checksums(dst)
    artifacts.write_json_atomic(dst / artifacts.MANIFEST, manifest)
    return name


# ----------------------------------------------------------------------------- the truth an answer is checked against


class VersionView:
    """What a version holds, read from its own files."""

    def __init__(self, version_dir: Path) -> None:
        import pyarrow.parquet as pq

        images = pq.read_table(version_dir / artifacts.IMAGES_FILE).to_pydict()
        products = pq.read_table(version_dir / artifacts.PRODUCTS_FILE).to_pydict()
        manifest = json.loads((version_dir / artifacts.MANIFEST).read_text())
        self.name = version_dir.name
        self.search_k = int(manifest["index"]["search_k"])
        self.vectors = np.load(version_dir / artifacts.VECTORS_FILE).astype(np.float64)
        self.image_ids = images["image_id"]
        self.row_product = np.asarray(images["product_row"], np.int64)
        self.product_ids = products["product_id"]
        self.product_array = np.asarray(self.product_ids, dtype=object)
        self.product_row_of = {product_id: row for row, product_id in enumerate(self.product_ids)}
        self.first_row = np.asarray(products["first_row"], np.int64)
        self.image_count = np.asarray(products["image_count"], np.int64)
        self.paths = images["path"]
        self.rows_of_image: dict[str, list[int]] = defaultdict(list)
        for row, image_id in enumerate(self.image_ids):
            self.rows_of_image[image_id].append(row)
        self.attributes = {key: np.asarray(products[key], dtype=object)
                           for key in manifest.get("attribute_keys", []) if key in products}
        # Number attributes come back in their shortest decimal form, as the proto says ("2.5", "2019").
        self.attributes.update({key: np.asarray([None if v is None else str(int(v)) if float(v).is_integer()
                                                 else repr(float(v)) for v in products[key]], dtype=object)
                                for key in manifest.get("number_keys", []) if key in products})
        self._hidden: dict[int, np.ndarray] = {}

    def rows_of(self, product_row: int) -> np.ndarray:
        return np.arange(self.first_row[product_row], self.first_row[product_row] + self.image_count[product_row])

    def resolve(self, spec: tuple) -> tuple[np.ndarray, set[str]] | None:
        """A query's unit vector and its own products, as the server resolves them; None when not held."""
        kind, value = spec
        if kind == "product":
            if value not in self.product_row_of:
                return None
            mean = self.vectors[self.rows_of(self.product_row_of[value])].mean(axis=0)
            return mean / np.linalg.norm(mean), {value}
        if kind == "image":
            if value not in self.rows_of_image:
                return None
            rows = self.rows_of_image[value]
            return self.vectors[rows[0]], {self.product_ids[self.row_product[r]] for r in rows}
        vector = np.asarray(value, np.float64)
        return vector / np.linalg.norm(vector), set()

    def hidden_mask(self, availability_version: int, hidden: frozenset[str]) -> np.ndarray:
        if availability_version not in self._hidden:
            if len(self._hidden) >= 64:  # a soak writes thousands of versions; answers name recent ones
                del self._hidden[next(iter(self._hidden))]
            self._hidden[availability_version] = np.isin(self.product_array, list(hidden))
        return self._hidden[availability_version]

    def allowed_mask(self, filter_: pb.Filter) -> np.ndarray:
        mask = ~np.isin(self.product_array, list(filter_.exclude_product_ids))
        for clause in filter_.clauses:
            values = self.attributes[clause.key]
            mask &= np.isin(values, list(clause.any_of)) if clause.any_of else ~np.isin(values, list(clause.none_of))
        return mask

    def attributes_of(self, product_row: int) -> dict[str, str]:
        return {key: values[product_row] for key, values in self.attributes.items() if values[product_row] is not None}


@dataclass
class Planned:
    """One request and what its answer must satisfy. Query specs: ("product", id), ("image", id), ("vector", v)."""

    operation: str
    method: str  # FindSimilar or Recommend
    request: object
    positive: list[tuple]
    negative: list[tuple] = field(default_factory=list)
    strategy: str = "nearest"  # nearest (FindSimilar), average_vector or best_score (Recommend)
    exclude_own: bool = False
    ignore_missing: bool = False
    cancel_after_s: float | None = None
    timeout_s: float = 10.0


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _expected_scores(vectors: np.ndarray, probes: np.ndarray, negatives: np.ndarray | None):
    """Per row: the score the server must report, the other branch of best_score where the two are too close to
    call in float32, and the distance to the nearest probe."""
    positive = (vectors @ probes.T).max(axis=1) if len(probes) else np.full(len(vectors), -np.inf)
    towards = probes if len(probes) else negatives
    distance = np.linalg.norm(vectors[:, None, :] - towards[None, :, :], axis=2).min(axis=1)
    if negatives is None:
        return positive, positive, distance
    negative = (vectors @ negatives.T).max(axis=1) if len(negatives) else np.full(len(vectors), -np.inf)
    score = np.where(positive > negative, positive, -np.square(negative))
    other = np.where(positive > negative, -np.square(negative), positive)
    return score, np.where(np.abs(positive - negative) < TOLERANCE, other, score), distance


def _scorer(view: VersionView, planned: Planned) -> tuple[np.ndarray, np.ndarray | None, set[str], list[str]] | str:
    """(probes, negatives or None, own products, missing ids) for the answering version, or why an OK is wrong."""
    sides, own, missing = [], set(), []
    for specs in (planned.positive, planned.negative):
        vectors = []
        for spec in specs:
            resolved = view.resolve(spec)
            if resolved is None:
                if planned.method == "FindSimilar" or not planned.ignore_missing:
                    return f"OK for {spec[0]} {spec[1]!r}, which {view.name} does not hold"
                missing.append(spec[1])
                continue
            vectors.append(resolved[0])
            own |= resolved[1]
        sides.append(np.asarray(vectors, np.float64).reshape(-1, view.vectors.shape[1]))
    positive, negative = sides
    if planned.strategy == "nearest":
        return positive, None, own if planned.exclude_own else set(), missing
    if planned.strategy == "average_vector":
        if not len(positive):
            return positive, None, own, missing
        query = positive.mean(axis=0)
        if len(negative):
            query = 2 * query - negative.mean(axis=0)
        return _unit(query)[None, :], None, own, missing
    return positive, negative, own, missing


def check_answer(view: VersionView, hidden: frozenset[str], availability_version: int, planned: Planned,
                 response) -> tuple[list[str], float]:
    """What is wrong with an OK answer for the version and availability it names, and the largest score error."""
    scorer = _scorer(view, planned)
    if isinstance(scorer, str):
        return [scorer], 0.0
    probes, negatives, own, missing = scorer
    request, matches = planned.request, list(response.matches)
    problems, worst = [], 0.0
    if planned.method == "Recommend":
        reported = [*response.missing_product_ids, *response.missing_image_ids]
        if sorted(reported) != sorted(missing):
            problems.append(f"missing examples reported {sorted(reported)}, expected {sorted(missing)}")
    eligible = ~view.hidden_mask(availability_version, hidden) & view.allowed_mask(request.filter)
    eligible &= ~np.isin(view.product_array, list(own))
    k = request.k or 10
    has_query = len(probes) or (negatives is not None and len(negatives))
    expected_count = min(k, int(eligible.sum())) if has_query else 0
    if len(matches) != expected_count:
        problems.append(f"{len(matches)} matches, expected {expected_count} (k {k}, {int(eligible.sum())} eligible)")
    ids = [m.product_id for m in matches]
    if len(set(ids)) != len(ids):
        problems.append("a product comes back twice")
    scores = [m.score for m in matches]
    if any(later > earlier + 1e-6 for earlier, later in zip(scores, scores[1:], strict=False)):
        problems.append(f"not sorted by score: {scores[:10]}")
    for match in matches:
        error = _check_match(view, match, request, eligible, hidden, own, probes, negatives, problems)
        worst = max(worst, error)
    return problems, worst


def _check_match(view: VersionView, match, request, eligible: np.ndarray, hidden: frozenset[str], own: set[str],
                 probes: np.ndarray, negatives: np.ndarray | None, problems: list[str]) -> float:
    product = view.product_row_of.get(match.product_id)
    if product is None:
        problems.append(f"product {match.product_id!r} is not in {view.name}")
        return 0.0
    if not eligible[product]:
        why = ("hidden" if match.product_id in hidden else "the query's own" if match.product_id in own
               else "filtered out")
        problems.append(f"product {match.product_id!r} is {why}")
    rows = view.rows_of(product)
    at = [i for i, row in enumerate(rows) if view.image_ids[row] == match.image_id]
    if not at:
        problems.append(f"image {match.image_id!r} is not an image of {match.product_id!r} in {view.name}")
        return 0.0
    score, other, distance = _expected_scores(view.vectors[rows], probes, negatives)
    i = at[0]
    error = min(abs(match.score - score[i]), abs(match.score - other[i]))
    if error > TOLERANCE or abs(match.distance - distance[i]) > TOLERANCE:
        problems.append(f"{match.product_id}/{match.image_id}: score {match.score:.6f} distance "
                        f"{match.distance:.6f}, the version's vectors say {score[i]:.6f} and {distance[i]:.6f}")
    # Where best_score's branches are too close to call, either may be the image's score: the best image must
    # beat every other image's lower one.
    if match.score < np.minimum(score, other).max() - TOLERANCE:
        problems.append(f"{match.image_id!r} is not the best image of {match.product_id!r}")
    if len(match.images) != min(request.group_size, len(rows)):
        problems.append(f"{len(match.images)} images listed for group_size {request.group_size}")
    if request.with_attributes and dict(match.attributes) != view.attributes_of(product):
        problems.append(f"attributes of {match.product_id!r} differ from the version's")
    return float(error)


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health(address: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def start_server(artifacts_dir: Path, log_path: Path, config: ChaosConfig) -> tuple[subprocess.Popen, str, int]:
    """`lookalike-serve` on 127.0.0.1 with a short watch interval; returns once health says SERVING."""
    port, metrics_port = free_port(), free_port()
    command = config.server_command or (str(Path(sys.executable).parent / "lookalike-serve"),)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [*command, "--artifacts", str(artifacts_dir), "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", str(metrics_port), "--watch-interval-s", str(config.watch_interval_s),
             "--max-message-mb", str(config.max_message_mb), "--exact-max-rows", str(config.exact_max_rows),
             "--log-format", "text"], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while health(address) != "SERVING":
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start (exit {process.poll()}): {tail(log_path)}")
        time.sleep(0.3)
    return process, address, metrics_port


def tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def scrape(metrics_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ----------------------------------------------------------------------------- what the callers send


class Mix:
    """The requests: ids mostly held by both versions (some by one only: NOT_FOUND from the other is right)."""

    def __init__(self, views: list[VersionView], photos: list[tuple[bytes, np.ndarray]]) -> None:
        first, second = views
        self.shared_products = sorted(set(first.product_ids) & set(second.product_ids))
        self.single_products = sorted(set(first.product_ids) ^ set(second.product_ids))
        self.shared_images = sorted(set(first.rows_of_image) & set(second.rows_of_image))
        self.single_images = sorted(set(first.rows_of_image) ^ set(second.rows_of_image))
        self.vectors = first.vectors
        self.search_k = first.search_k
        self.photos = photos
        self.attribute = next(((key, sorted({v for v in values if v is not None}))
                               for key, values in sorted(first.attributes.items())
                               if len({v for v in values if v is not None}) >= 3), None)

    def product(self, rng: random.Random) -> str:
        return rng.choice(self.single_products if rng.random() < 0.1 else self.shared_products)

    def image(self, rng: random.Random) -> str:
        return rng.choice(self.single_images if rng.random() < 0.1 else self.shared_images)

    def vector(self, rng: random.Random) -> np.ndarray:
        """Near a catalogue image, never on one (so no product is the query's own)."""
        base = self.vectors[rng.randrange(len(self.vectors))]
        noisy = base + np.random.default_rng(rng.randrange(2**32)).normal(0, 0.05, base.shape)
        return _unit(noisy).astype(np.float32)

    def filter(self, rng: random.Random) -> pb.Filter:
        draw = rng.random()
        if draw < 0.2:
            return pb.Filter(exclude_product_ids=[self.product(rng) for _ in range(3)])
        if draw < 0.35 and self.attribute:
            key, values = self.attribute
            return pb.Filter(clauses=[pb.Clause(key=key, any_of=rng.sample(values, min(3, len(values))))])
        if draw < 0.45 and self.attribute:
            key, values = self.attribute
            return pb.Filter(clauses=[pb.Clause(key=key, none_of=rng.sample(values, 1))])
        return pb.Filter()

    def ordinary(self, rng: random.Random, config: ChaosConfig) -> Planned:
        operation = rng.choices(("product", "image", "photo", "vector", "recommend"), (3, 2, 2, 2, 2))[0]
        options = dict(k=rng.choice((1, 5, 10, 10, 50)), group_size=rng.choice((0, 0, 1, 3)),
                       with_attributes=rng.random() < 0.3, filter=self.filter(rng))
        if operation == "recommend":
            planned = self.recommendation(rng, options)
        elif operation in ("product", "image"):
            value = self.product(rng) if operation == "product" else self.image(rng)
            exclude = rng.random() < 0.5
            request = pb.FindSimilarRequest(**{f"{operation}_id": value}, exclude_query=exclude, **options)
            planned = Planned(operation, "FindSimilar", request, [(operation, value)], exclude_own=exclude)
        elif operation == "photo":
            data, vector = rng.choice(self.photos)
            planned = Planned(operation, "FindSimilar", pb.FindSimilarRequest(image=data, **options),
                              [("vector", vector)])
        else:
            vector = self.vector(rng)
            planned = Planned(operation, "FindSimilar",
                              pb.FindSimilarRequest(vector=pb.Vector(values=vector), **options), [("vector", vector)])
        if rng.random() < config.short_deadline_share:
            planned.timeout_s = rng.uniform(0.001, 0.03)
        if rng.random() < config.cancel_share:
            planned.cancel_after_s = rng.uniform(0.0, 0.03)
        return planned

    def recommendation(self, rng: random.Random, options: dict, positives: int | None = None) -> Planned:
        ignore_missing = rng.random() < 0.3
        pick = self.product if ignore_missing else lambda r: r.choice(self.shared_products)
        positive = [("product", pick(rng)) for _ in range(positives or rng.randint(1, 3))]
        if rng.random() < 0.3:
            positive.append(("image", rng.choice(self.shared_images)))
        negative = [("product", pick(rng))] if rng.random() < 0.3 else []
        strategy = "best_score" if rng.random() < 0.3 else "average_vector"

        def example(spec: tuple) -> pb.Example:
            return pb.Example(**{f"{spec[0]}_id": spec[1]})

        request = pb.RecommendRequest(
            positive=[example(s) for s in positive], negative=[example(s) for s in negative],
            strategy=pb.RECOMMEND_STRATEGY_BEST_SCORE if strategy == "best_score"
            else pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR, ignore_missing=ignore_missing, **options)
        return Planned("recommend", "Recommend", request, positive, negative, strategy, ignore_missing=ignore_missing)

    def slow(self, rng: random.Random, config: ChaosConfig) -> Planned:
        """k = 1000 over the whole index: tens of milliseconds inside Annoy on the derived version, and up to a
        second for best_score over many examples (one Annoy query per example, all in one index thread)."""
        draw = rng.random()
        if draw < 0.2:
            vector = self.vector(rng)
            request = pb.FindSimilarRequest(vector=pb.Vector(values=vector), k=1000,
                                            search_k=rng.choice((0, 2 * self.search_k)))
            planned = Planned("slow-vector", "FindSimilar", request, [("vector", vector)])
        elif draw < 0.85:
            positive = [("product", p) for p in rng.sample(self.shared_products, rng.randint(16, 32))]
            request = pb.RecommendRequest(positive=[pb.Example(product_id=p) for _, p in positive],
                                          strategy=pb.RECOMMEND_STRATEGY_BEST_SCORE, k=1000)
            planned = Planned("slow-recommend", "Recommend", request, positive, strategy="best_score")
        else:
            product = rng.choice(self.shared_products)
            request = pb.FindSimilarRequest(product_id=product, k=1000, exclude_query=True)
            planned = Planned("slow-product", "FindSimilar", request, [("product", product)], exclude_own=True)
        if rng.random() < config.slow_cancel_share:
            # 20-400 ms: mostly while the query runs (best_score over many examples runs for a second or more).
            planned.cancel_after_s = rng.uniform(0.02, 0.4)
        return planned

    def hostile(self, max_message_mb: int) -> list[tuple[str, str, object, set[str]]]:
        """(name, method, request, the codes that answer it clearly)."""
        from tests.corpus import INVALID as REFUSED
        from tests.corpus import corpus

        product, image = self.shared_products[0], self.shared_images[0]
        many = [f"no-such-product-{i:06d}" for i in range(50_000)]
        key = self.attribute[0] if self.attribute else "product_type"
        find, recommend = pb.FindSimilarRequest, pb.RecommendRequest
        positive = [pb.Example(product_id=product)]
        out = [(f"image:{name}", "FindSimilar", find(image=data, k=5), INVALID)
               for name, data, expected in corpus() if expected == REFUSED]
        out += [
            ("recommend-corrupt-image", "Recommend", recommend(positive=[pb.Example(image=b"\xff\xd8garbage")]),
             INVALID),
            ("k-1001", "FindSimilar", find(product_id=product, k=1001), INVALID),
            ("k-uint32-max", "FindSimilar", find(image_id=image, k=2**32 - 1), INVALID),
            ("recommend-k-1001", "Recommend", recommend(positive=positive, k=1001), INVALID),
            ("group-size-101", "FindSimilar", find(product_id=product, group_size=101), INVALID),
            ("score-threshold-2", "FindSimilar", find(product_id=product, score_threshold=2.0), INVALID),
            ("no-query", "FindSimilar", find(k=5), INVALID),
            ("vector-3-components", "FindSimilar", find(vector=pb.Vector(values=[1, 0, 0])), INVALID),
            ("vector-nan", "FindSimilar", find(vector=pb.Vector(values=[float("nan")] * self.vectors.shape[1])),
             INVALID),
            ("vector-zero", "FindSimilar", find(vector=pb.Vector(values=[0.0] * self.vectors.shape[1])), INVALID),
            ("unknown-filter-key", "FindSimilar",
             find(product_id=product, filter=pb.Filter(clauses=[pb.Clause(key="no_such_key", any_of=["x"])])), INVALID),
            ("clause-any-and-none", "FindSimilar", find(product_id=product, filter=pb.Filter(
                clauses=[pb.Clause(key=key, any_of=["x"], none_of=["y"])])), INVALID),
            ("17-clauses", "FindSimilar", find(product_id=product, filter=pb.Filter(
                clauses=[pb.Clause(key=key, any_of=["x"])] * 17)), INVALID),
            ("unknown-image-id", "FindSimilar", find(image_id="no-such-image"), MISSING),
            ("unknown-product-id", "FindSimilar", find(product_id="no-such-product"), MISSING),
            ("recommend-unknown-example", "Recommend", recommend(positive=[pb.Example(product_id="no-such")]),
             MISSING),
            ("recommend-no-examples", "Recommend", recommend(k=5), INVALID),
            ("recommend-65-examples", "Recommend", recommend(positive=positive * 65), INVALID),
            ("recommend-unknown-strategy", "Recommend", recommend(positive=positive, strategy=7), INVALID),
            ("search-k-uint32-max", "FindSimilar", find(product_id=product, search_k=2**32 - 1), LIMIT),
            ("search-k-50-million", "FindSimilar", find(vector=pb.Vector(values=self.vector(random.Random(1))),
                                                        k=100, search_k=50_000_000), LIMIT),
            ("recommend-search-k-uint32-max", "Recommend", recommend(positive=positive, search_k=2**32 - 1), LIMIT),
            ("exclude-50000-ids", "FindSimilar", find(product_id=product, filter=pb.Filter(exclude_product_ids=many)),
             LIMIT),
            ("exclude-50000-ids-with-a-clause", "FindSimilar", find(product_id=product, filter=pb.Filter(
                clauses=[pb.Clause(key=key, none_of=["x"])], exclude_product_ids=many)), LIMIT),
            ("recommend-exclude-50000-ids", "Recommend",
             recommend(positive=positive, filter=pb.Filter(exclude_product_ids=many)), LIMIT),
            ("oversized-image", "FindSimilar", find(image=b"\xff\xd8" + bytes((max_message_mb + 1) << 20)), TOO_BIG),
            ("oversized-embed", "Embed", pb.EmbedRequest(images=[bytes((max_message_mb + 1) << 20)]), TOO_BIG),
            ("embed-65-images", "Embed", pb.EmbedRequest(images=[self.photos[0][0]] * 65), LIMIT),
        ]
        return out


# ----------------------------------------------------------------------------- the run


class Chaos:
    """All the actors of one run on one event loop, and what they counted."""

    def __init__(self, config: ChaosConfig, artifacts_dir: Path, views: dict[str, VersionView], mix: Mix,
                 process: subprocess.Popen) -> None:
        self.config, self.artifacts_dir, self.views, self.mix, self.process = (config, artifacts_dir, views, mix,
                                                                               process)
        self.codes: Counter = Counter()
        self.by_operation: dict[str, Counter] = defaultdict(Counter)
        self.hostile_codes: dict[str, Counter] = defaultdict(Counter)
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.worst_error = 0.0
        self.wrong_records: list[dict] = []  # request and response of the first wrong answers, for the log
        self.versions_answering: Counter = Counter()
        availability = read_availability(artifacts_dir)
        # Every availability version ever written, with the products it hides (only this run writes it).
        self.hidden_log = {0: frozenset(), availability.version: availability.hidden_ids}
        self.hidden_now = set(availability.hidden_ids)
        self.availability_floor = 0  # the newest availability version an answer has named so far
        self.exit_code: int | None = None
        self.crashed_after_s: float | None = None
        self.memory: list[dict] = []  # bench.rss samples, each with "t": seconds since the start
        self.metrics_port: int | None = None
        self.began = time.monotonic()
        self.stop = asyncio.Event()

    def _note(self, counter: str, text: str) -> None:
        self.counts[counter] += 1
        if len(self.examples[counter]) < MAX_EXAMPLES and text not in self.examples[counter]:
            self.examples[counter].append(text)

    def _running(self, calls: int) -> bool:
        return (not self.stop.is_set() and calls < self.config.max_calls_per_caller
                and time.monotonic() - self.began < self.config.duration_s)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass

    async def call(self, stub: pb_grpc.ImageSimilarityStub, planned: Planned) -> None:
        floor = self.availability_floor
        call = getattr(stub, planned.method)(planned.request, timeout=planned.timeout_s)
        timer = None
        if planned.cancel_after_s is not None:
            timer = asyncio.get_running_loop().call_later(planned.cancel_after_s, self._cancel, call)
        try:
            response = await call
        except asyncio.CancelledError:
            if timer is None or not call.cancelled():
                raise
            self.codes["CANCELLED"] += 1
            self.by_operation[planned.operation]["CANCELLED"] += 1
            return
        except grpc.aio.AioRpcError as error:
            self._failed(planned, error)
            return
        finally:
            if timer is not None:
                timer.cancel()
        self.codes["OK"] += 1
        self.by_operation[planned.operation]["OK"] += 1
        self._check(planned, response, floor)

    def _cancel(self, call) -> None:
        if call.cancel():
            self.counts["cancelled_mid_flight"] += 1

    def _failed(self, planned: Planned, error: grpc.aio.AioRpcError) -> None:
        code = error.code().name
        self.codes[code] += 1
        self.by_operation[planned.operation][code] += 1
        specs = [*planned.positive, *planned.negative]
        held_by_both = all(s[0] == "vector" or s[1] in self.mix.shared_products or s[1] in self.mix.shared_images
                           for s in specs)
        if code not in ACCEPTABLE or (code == "NOT_FOUND" and held_by_both):
            self._note("unexpected_errors", f"{planned.operation} {specs[:2]} -> {code}: {error.details()[:200]}")

    def _check(self, planned: Planned, response, floor: int) -> None:
        self.counts["answers_checked"] += 1
        version, availability = response.index_version, response.availability_version
        self.versions_answering[version] += 1
        if availability < floor:
            self._note("availability_went_back", f"an answer names availability {availability} after one named "
                                                 f"{floor} had come back")
        self.availability_floor = max(self.availability_floor, availability)
        if version not in self.views or availability not in self.hidden_log:
            self._note("wrong_answers", f"names version {version!r} and availability {availability}, never written")
            return
        problems, worst = check_answer(self.views[version], self.hidden_log[availability], availability, planned,
                                       response)
        self.worst_error = max(self.worst_error, worst)
        if problems:
            specs = [s if s[0] != "vector" else ("vector", "...") for s in planned.positive]
            self._note("wrong_answers", f"{planned.operation} {specs} on {version}@{availability}: "
                                        + "; ".join(problems[:3]))
            if len(self.wrong_records) < MAX_EXAMPLES:
                self.wrong_records.append({"problems": problems, "method": planned.method,
                                           "request": text_format.MessageToString(planned.request, as_one_line=True),
                                           "response": text_format.MessageToString(response, as_one_line=True)})

    async def caller(self, seed: int, slow: bool) -> None:
        rng = random.Random(seed)
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.ImageSimilarityStub(channel)
            calls = 0
            while self._running(calls):
                calls += 1
                await self.call(stub, self.mix.slow(rng, self.config) if slow else self.mix.ordinary(rng, self.config))

    async def hostile(self) -> None:
        limit = (self.config.max_message_mb + 8) << 20
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        requests = self.mix.hostile(self.config.max_message_mb)
        rng = random.Random(self.config.seed + 99)
        async with grpc.aio.insecure_channel(self.address, options=options) as channel:
            stub = pb_grpc.ImageSimilarityStub(channel)
            calls = 0
            while self._running(calls):
                name, method, request, clear = requests[calls % len(requests)]
                calls += 1
                try:
                    await getattr(stub, method)(request, timeout=20)
                    code, details = "OK", "answered"
                except grpc.aio.AioRpcError as error:
                    code, details = error.code().name, error.details() or ""
                self.hostile_codes[name][code] += 1
                if code not in clear and code != "DEADLINE_EXCEEDED":
                    self._note("hostile_unclear", f"{name} -> {code} ({details[:160]}), expected {sorted(clear)}")
                await self._pause(rng.uniform(0.02, 0.1))

    async def swapper(self) -> None:
        names = list(self.views)
        for swap in range(int(self.config.duration_s / self.config.swap_every_s) + 1):
            await self._pause(self.config.swap_every_s)
            if not self._running(swap):
                return
            await asyncio.to_thread(artifacts.write_current, self.artifacts_dir, names[(swap + 1) % 2])
            self.counts["swaps_written"] += 1

    async def sighupper(self) -> None:
        rng = random.Random(self.config.seed + 7)
        for sent in range(int(self.config.duration_s / self.config.sighup_every_s * 2) + 1):
            await self._pause(self.config.sighup_every_s * rng.uniform(0.5, 1.5))
            if not self._running(sent) or self.process.poll() is not None:
                return
            self.process.send_signal(signal.SIGHUP)
            self.counts["sighups"] += 1

    async def hider(self) -> None:
        """Hides and shows products, logging which are hidden at each availability version before writing it."""
        rng = random.Random(self.config.seed + 3)
        pool = self.mix.shared_products + self.mix.single_products[:50]
        for changes in range(int(self.config.duration_s / self.config.hide_every_s) + 1):
            await self._pause(self.config.hide_every_s)
            if not self._running(changes):
                return
            if self.hidden_now and (len(self.hidden_now) > 25 or rng.random() < 0.4):
                hide, show = [], rng.sample(sorted(self.hidden_now), min(len(self.hidden_now), rng.randint(1, 3)))
            else:
                hide = [rng.choice(pool) for _ in range(rng.randint(1, 3))]
                hide += [f"not-in-any-version-{changes}"] if rng.random() < 0.1 else []
                show = []
            expected = frozenset((self.hidden_now | set(hide)) - set(show))
            current = max(self.hidden_log)
            self.hidden_log[current + 1] = expected
            written, changed = await asyncio.to_thread(change_availability, self.artifacts_dir, hide, show)
            if not changed:  # every product asked for was hidden (or shown) already: no new version
                del self.hidden_log[current + 1]
            if written.hidden_ids != expected or written.version != max(self.hidden_log):
                raise RuntimeError(f"availability {written.version} is not what this run wrote: someone else "
                                   f"writes {self.artifacts_dir}")
            self.counts["products_hidden"] += len(set(hide) - self.hidden_now)
            self.counts["products_shown"] += len(show)
            self.counts["availability_changes"] += 1
            self.hidden_now = set(expected)
            if rng.random() < 0.3 and self.process.poll() is None:
                # As an operator applies a hide at once: the SIGHUP's read races the watch loop's and the last one's.
                self.process.send_signal(signal.SIGHUP)
                self.counts["sighups"] += 1

    async def watchdog(self) -> None:
        """Polls the server process throughout: an exit (-11 is a segfault) ends the run at once."""
        next_sample = 0.0
        while not self.stop.is_set() and time.monotonic() - self.began < self.config.duration_s:
            if self.process.poll() is not None:
                self.exit_code = self.process.returncode
                self.crashed_after_s = round(time.monotonic() - self.began, 1)
                self.stop.set()
                return
            if time.monotonic() >= next_sample:
                await self.sample_memory()
                next_sample = time.monotonic() + self.config.memory_every_s
            await asyncio.sleep(0.05)

    async def sample_memory(self) -> None:
        """/proc/PID/status of the server's processes; every sixth sample also their smaps (the file-backed pages
        of ARTIFACTS apart from the rest) and what the result cache holds."""
        detailed = len(self.memory) % 6 == 0
        root = self.artifacts_dir.resolve() if detailed else None
        taken = await asyncio.to_thread(rss.sample, self.process.pid, root)
        if taken is None:
            return
        if detailed and self.metrics_port is not None:
            held = (await asyncio.to_thread(scrape, self.metrics_port)).get("lookalike_result_cache_bytes{}")
            if held is not None:
                taken["result_cache"] = round(held / (1 << 20), 1)
        self.memory.append({"t": round(time.monotonic() - self.began, 1)} | taken)
        if detailed:
            log.info("memory at %.0f s (MiB): %s", self.memory[-1]["t"], taken)

    async def run(self, address: str, metrics_port: int | None = None) -> None:
        self.address, self.metrics_port = address, metrics_port
        self.began = time.monotonic()
        seeds = range(self.config.seed * 1000, self.config.seed * 1000 + self.config.callers + self.config.slow_callers)
        actors = [self.caller(seed, slow=i >= self.config.callers) for i, seed in enumerate(seeds)]
        actors += [self.swapper(), self.sighupper(), self.hider()] + ([self.hostile()] if self.config.hostile else [])
        tasks = [asyncio.ensure_future(actor) for actor in actors]
        await self.watchdog()
        self.stop.set()
        # Every call has a deadline of at most 20 s: the actors end by themselves.
        done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        if pending:
            raise RuntimeError(f"{len(pending)} actors did not end within 60 s of the stop")


def _photos(address: str, view: VersionView, catalogue: Path, count: int = 16) -> list[tuple[bytes, np.ndarray]]:
    """Catalogue photos and their vectors as the served model makes them (the same model in both versions)."""
    paths = [catalogue / "small" / p for p in dict.fromkeys(view.paths) if (catalogue / "small" / p).is_file()]
    images = [path.read_bytes() for path in paths[:count]]
    if not images:
        raise RuntimeError(f"no catalogue photos under {catalogue / 'small'}")
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.ImageSimilarityStub(channel).Embed(pb.EmbedRequest(images=images), timeout=120)
    return [(data, np.asarray(v.values, np.float32)) for data, v in zip(images, response.vectors, strict=True)]


def _stop(process: subprocess.Popen) -> int | None:
    """SIGTERM, then the exit code (None if it had to be killed)."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        return None


def _figures(chaos: Chaos, config: ChaosConfig, metrics: dict[str, float]) -> dict:
    counts, codes = chaos.counts, chaos.codes
    hostile = Counter()
    for by_code in chaos.hostile_codes.values():
        hostile.update(by_code)
    return {
        "duration_s": config.duration_s, "callers": config.callers, "slow_callers": config.slow_callers,
        "versions": {name: {"products": len(view.product_ids), "images": len(view.image_ids)}
                     for name, view in chaos.views.items()},
        "requests": sum(codes.values()), "ok": codes["OK"], "codes": dict(codes.most_common()),
        "by_operation": {op: dict(c.most_common()) for op, c in sorted(chaos.by_operation.items())},
        "cancelled_mid_flight": counts["cancelled_mid_flight"], "answers_checked": counts["answers_checked"],
        "wrong_answers": counts["wrong_answers"], "availability_went_back": counts["availability_went_back"],
        "unexpected_errors": counts["unexpected_errors"], "largest_score_error": float(f"{chaos.worst_error:.2e}"),
        "versions_answering": dict(chaos.versions_answering), "swaps_written": counts["swaps_written"],
        "swaps_applied": int(metrics.get("lookalike_reloads_total{result=swapped}", 0)),
        "reloads_refused": int(metrics.get("lookalike_reloads_total{result=refused}", 0)),
        "sighups": counts["sighups"], "availability_changes": counts["availability_changes"],
        "products_hidden": counts["products_hidden"], "products_shown": counts["products_shown"],
        "hostile": {"requests": sum(hostile.values()), "kinds": len(chaos.hostile_codes),
                    "codes": dict(hostile.most_common()), "unclear": counts["hostile_unclear"],
                    "unclear_by_request": {name: dict(by_code) for name, by_code in sorted(chaos.hostile_codes.items())
                                           if any(code == "OK" or code == "INTERNAL" for code in by_code)}},
        "crashes": int(chaos.exit_code is not None), "server_exit_code": chaos.exit_code,
        "crashed_after_s": chaos.crashed_after_s,
        "memory_mib": rss.summary(chaos.memory, config.memory_warmup_s),
    }


def _problems(figures: dict) -> list[str]:
    """What the run must never show, then what shows that the chaos really happened."""
    problems = []
    if figures["crashes"]:
        problems.append(f"the server exited with {figures['server_exit_code']} after {figures['crashed_after_s']} s")
    for key in ("wrong_answers", "availability_went_back", "unexpected_errors"):
        if figures[key]:
            problems.append(f"{figures[key]} {key.replace('_', ' ')}")
    if figures["hostile"]["unclear"]:
        problems.append(f"{figures['hostile']['unclear']} hostile requests without a clear refusal: "
                        f"{figures['hostile']['unclear_by_request']}")
    if figures["health_at_end"] != "SERVING":
        problems.append(f"health at the end: {figures['health_at_end']}")
    if figures["exit_code_after_sigterm"] != 0 and not figures["crashes"]:
        problems.append(f"exit code after SIGTERM: {figures['exit_code_after_sigterm']}")
    if figures["crashes"]:
        return problems
    activity = {"an OK answer": figures["ok"], "a call past its deadline": figures["codes"].get("DEADLINE_EXCEEDED"),
                "a call cancelled mid-flight": figures["cancelled_mid_flight"],
                "answers from both versions": len(figures["versions_answering"]) == 2,
                "a hide": figures["products_hidden"], "a SIGHUP": figures["sighups"],
                "a hostile request": figures["hostile"]["requests"]}
    problems += [f"the run never saw {what}" for what, seen in activity.items() if not seen]
    return problems


def run(artifacts_dir: Path, catalogue: Path, config: ChaosConfig = ChaosConfig()) -> dict:
    """Derives the second version in `artifacts_dir` (a private copy: this run writes CURRENT and availability),
    serves it, runs the chaos, stops the server. The figures, with `problems` (empty when all was well) and, when
    there are problems, the tail of the server's log."""
    first = artifacts.read_current(artifacts_dir)
    begin = time.monotonic()
    second = derive_version(artifacts_dir, first, f"{first[:100]}-chaos", config.keep_share,
                            config.synthetic_products, config.seed + 1)
    # Served first, so that the first swap (seconds away: a swap loads a model) retires the version with slow queries.
    artifacts.write_current(artifacts_dir, second)
    views = {name: VersionView(artifacts_dir / name) for name in (second, first)}
    log.info("derived %s (%d images) in %.1f s", second, len(views[second].image_ids), time.monotonic() - begin)
    log_path = artifacts_dir.parent / f"chaos-server-{os.getpid()}.log"
    process, address, metrics_port = start_server(artifacts_dir, log_path, config)
    try:
        mix = Mix([views[first], views[second]], _photos(address, views[first], catalogue))
        chaos = Chaos(config, artifacts_dir, views, mix, process)
        asyncio.run(chaos.run(address, metrics_port))
        alive = process.poll() is None
        figures = _figures(chaos, config, scrape(metrics_port) if alive else {})
        figures["health_at_end"] = health(address) if alive else "EXITED"
    finally:
        exit_code = _stop(process)
    figures["exit_code_after_sigterm"] = exit_code
    figures["problems"] = _problems(figures)
    figures["examples"] = dict(chaos.examples)
    if chaos.wrong_records:
        wrong = log_path.with_name(f"chaos-wrong-answers-{os.getpid()}.jsonl")
        wrong.write_text("".join(json.dumps(record) + "\n" for record in chaos.wrong_records))
        figures["wrong_answers_file"] = str(wrong)
    if figures["problems"]:
        figures["server_log"] = str(log_path)
        figures["server_log_tail"] = tail(log_path)
    return figures


def _config_value(item: str) -> tuple[str, bool | int | float]:
    """FIELD=VALUE for a numeric or yes/no field of ChaosConfig, converted to the field's type."""
    name, _, value = item.partition("=")
    default = getattr(ChaosConfig(), name, None)
    if isinstance(default, bool):
        return name, value.lower() in ("1", "true", "yes")
    if isinstance(default, int | float):
        return name, type(default)(float(value))
    raise ValueError(f"--set {item}: not a numeric or yes/no field of ChaosConfig")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="ARTIFACTS to copy (left as it is)")
    parser.add_argument("--catalogue", type=Path, required=True, help="the catalogue the version was built from")
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the copy and the server log")
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--server-command", nargs="+", help="instead of this interpreter's lookalike-serve")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="other ChaosConfig fields, to see what one actor does alone: e.g. callers=0 "
                             "swap_every_s=1e9 hostile=0 (the run's problems then say what it never saw)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO")
    try:
        overrides = dict(_config_value(item) for item in args.set)
    except ValueError as error:
        parser.error(str(error))
    copy = private_copy(args.artifacts, args.work / "ARTIFACTS")
    config = ChaosConfig(duration_s=args.duration_s,
                         server_command=tuple(args.server_command) if args.server_command else None, **overrides)
    figures = run(copy, args.catalogue, config)
    print(json.dumps(figures, indent=2))
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
