"""`make bench-scale`: a version of ABO's shape, a real build of a large catalogue from cached features, both
served beside the demo sample under the compiled load generator."""

from __future__ import annotations

import argparse
import gc
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from lookalike import artifacts, tables

log = logging.getLogger("bench.scale")
HERE = Path(__file__).parent
RESULTS = HERE / "results"
WORK = HERE / "work" / "scale"
BIN = Path(sys.executable).parent
# The whole small set of Amazon Berkeley Objects as the seed indexed it (images kept by the aspect filter).
ABO_PRODUCTS, ABO_IMAGES, ABO_TYPES = 147_702, 395_039, 576
# ABO listings name a main image and up to about 20 others.
MAX_IMAGES_PER_PRODUCT = 21
# The lda head's share of similarity that is product type (builder.model.DEFAULT_TYPE_WEIGHT), and its
# number of type axes: min(types - 1, 64), the rest of the 128 being look axes.
TYPE_WEIGHT, MAX_TYPE_AXES, DIMENSION = 0.7, 64, 128
COUNTRIES = {"US": 0.55, "IN": 0.12, "GB": 0.07, "DE": 0.05, "JP": 0.04, "FR": 0.03, "IT": 0.03, "ES": 0.03,
             "CA": 0.03, "MX": 0.02, "AE": 0.02, "NL": 0.01}
DOMAINS = {"US": "amazon.com", "IN": "amazon.in", "GB": "amazon.co.uk", "DE": "amazon.de", "JP": "amazon.co.jp",
           "FR": "amazon.fr", "IT": "amazon.it", "ES": "amazon.es", "CA": "amazon.ca", "MX": "amazon.com.mx",
           "AE": "amazon.ae", "NL": "amazon.nl"}
COLOURS = ("Black", "White", "Blue", "Grey", "Red", "Silver", "Brown", "Green", "Pink", "Multicolor", "Beige",
           "Gold", "Navy", "Purple", "Yellow", "Orange", "Clear", "Ivory", "Tan", "Charcoal", "Natural", "Teal",
           "Khaki", "Burgundy", "Turquoise", "Cream", "Olive", "Walnut", "Bronze", "Rose Gold")
_ID_ALPHABET = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_IMAGE_ALPHABET = np.array(list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))

PROFILES = {
    # A few thousand images, seconds: run by make bench-quick so that this code stays tested.
    "quick": {"products": 1000, "images": 2700, "types": 40, "build_products": 0, "duration_s": 0.5,
              "recall_queries": 100, "swaps": 0, "demo_products": 150, "full_serving": False,
              "reindex_budget_s": 600, "build_budget_s": 0},
    "full": {"products": ABO_PRODUCTS, "images": ABO_IMAGES, "types": ABO_TYPES, "build_products": 6_000,
             "duration_s": 6.0, "recall_queries": 300, "swaps": 3, "demo_products": 1000, "full_serving": True,
             # Time budgets: a step past its budget is stopped and reported, so that the run stays bounded.
             "reindex_budget_s": 1500, "build_budget_s": 600},
}


# -- the shape of the catalogue ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Products, the images each owns and their attributes; rows are (product, image) pairs, grouped by product,
    main image first, as a version's index rows are."""

    product_ids: np.ndarray  # str [P]
    image_counts: np.ndarray  # int64 [P]
    product_types: np.ndarray  # int64 [P]: type rank, 0 the most frequent
    attributes: pd.DataFrame  # product_id, product_type, brand, color, country, marketplace, domain_name, item_name
    image_ids: np.ndarray  # str [R]

    @property
    def row_product(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.product_ids)), self.image_counts)


def _zipf(rng: np.random.Generator, size: int, values: int, exponent: float) -> np.ndarray:
    """Ranks 0..values-1 drawn with frequency proportional to 1 / (rank + 1) ** exponent."""
    weights = 1.0 / np.arange(1, values + 1) ** exponent
    return rng.choice(values, size=size, p=weights / weights.sum())


def _random_ids(rng: np.random.Generator, count: int, alphabet: np.ndarray, length: int,
                prefix: str = "") -> np.ndarray:
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        draw = rng.choice(alphabet, size=(count - len(ids), length))
        for text in (prefix + "".join(row) for row in draw):
            if text not in seen:
                seen.add(text)
                ids.append(text)
    return np.array(ids, dtype=object)


def image_counts(rng: np.random.Generator, products: int, images: int) -> np.ndarray:
    """Images per product: a shifted geometric distribution (P(k) proportional to (1 - p) ** (k - 1), k = 1..21)
    with ABO's mean, then single images added or taken at random until the total is exactly `images`."""
    if not products <= images <= products * MAX_IMAGES_PER_PRODUCT:
        raise ValueError(f"{images} images cannot be shared by {products} products (1 to {MAX_IMAGES_PER_PRODUCT})")
    counts = np.minimum(rng.geometric(products / images, size=products), MAX_IMAGES_PER_PRODUCT).astype(np.int64)
    while (gap := images - int(counts.sum())) != 0:
        room = np.flatnonzero(counts < MAX_IMAGES_PER_PRODUCT) if gap > 0 else np.flatnonzero(counts > 1)
        picked = rng.choice(room, size=min(abs(gap), len(room)), replace=False)
        counts[picked] += 1 if gap > 0 else -1
    return counts


def make_shape(products: int, images: int, types: int, seed: int = 17) -> Shape:
    rng = np.random.default_rng(seed)
    counts = image_counts(rng, products, images)
    product_ids = _random_ids(rng, products, _ID_ALPHABET, 8, prefix="B0")
    image_ids = _random_ids(rng, images, _IMAGE_ALPHABET, 11)
    type_of = _zipf(rng, products, types, 1.0)
    type_names = np.array([f"TYPE_{rank:03d}" for rank in range(types)], dtype=object)
    brands = _zipf(rng, products, max(8, products // 20), 1.1)
    colours = np.array(COLOURS, dtype=object)[_zipf(rng, products, len(COLOURS), 1.2)]
    colours[rng.random(products) < 0.1] = None  # ABO leaves colour out of many listings
    shares = np.array(list(COUNTRIES.values()))
    countries = rng.choice(list(COUNTRIES), size=products, p=shares / shares.sum())
    attributes = pd.DataFrame({
        "product_id": product_ids, "product_type": type_names[type_of],
        "brand": [f"Brand{b:05d}" for b in brands], "color": colours, "country": countries,
        "marketplace": "Amazon", "domain_name": [DOMAINS[c] for c in countries],
        "item_name": [f"Brand{b:05d} {type_names[t].lower()} model {n}"
                      for n, (b, t) in enumerate(zip(brands, type_of, strict=True))],
    })
    return Shape(product_ids, counts, type_of, attributes, image_ids)


# -- vectors like an lda head's --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorModel:
    """How the synthetic vectors are made: the lda head's layout (type axes, then look axes, each part
    unit-normalised and weighted so that cosine = 0.7 x type cosine + 0.3 x look cosine), with

    - type part: the type's centroid (its spread falling along the axes, strongest first, as LDA's axes are)
      plus a product offset and a smaller view offset (isotropic);
    - look part: a product look drawn from a power-law spectrum (variance of axis i proportional to
      i ** -look_decay, as the PCA axes of real features decay), partly shared by the type (type_look), plus a
      view offset from the same spectrum (views of one product stay near each other).
    """

    # LDA's type axes come strongest first: the centroids' spread along type axis i falls as i ** -type_decay.
    type_decay: float = 1.0
    product_spread: float = 0.35
    view_spread: float = 0.2
    look_decay: float = 1.2
    type_look: float = 0.75
    look_view_spread: float = 0.45


def make_vectors(shape: Shape, model: VectorModel = VectorModel(), dimension: int = DIMENSION,
                 seed: int = 23) -> np.ndarray:
    """Unit vectors [R, dimension], float32, in index row order."""
    rng = np.random.default_rng(seed)
    types = int(shape.product_types.max()) + 1
    type_axes = min(max(types - 1, 1), MAX_TYPE_AXES, dimension // 2)
    look_axes = dimension - type_axes
    row_product = shape.row_product
    row_type = shape.product_types[row_product]
    rows = len(row_product)
    centroids = rng.standard_normal((types, type_axes)) * np.arange(1, type_axes + 1) ** (-model.type_decay / 2)
    # Centred on the catalogue's mean, as LDA's axes are: a product is, on average, unlike the other types.
    share = np.bincount(shape.product_types, minlength=types) / len(shape.product_types)
    centroids = _unit(centroids - share @ centroids)
    type_part = (centroids[row_type]
                 + model.product_spread * rng.standard_normal((len(shape.product_ids), type_axes))[row_product]
                 / np.sqrt(type_axes)
                 + model.view_spread * rng.standard_normal((rows, type_axes)) / np.sqrt(type_axes))
    scale = np.arange(1, look_axes + 1) ** (-model.look_decay / 2)
    type_look = rng.standard_normal((types, look_axes)) * scale
    own_look = rng.standard_normal((len(shape.product_ids), look_axes)) * scale
    product_look = model.type_look * type_look[shape.product_types] + np.sqrt(1 - model.type_look ** 2) * own_look
    look_part = (product_look[row_product]
                 + model.look_view_spread * rng.standard_normal((rows, look_axes)) * scale)
    vectors = np.hstack([np.sqrt(TYPE_WEIGHT) * _unit(type_part), np.sqrt(1 - TYPE_WEIGHT) * _unit(look_part)])
    return _unit(vectors).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def vector_statistics(vectors: np.ndarray, row_product: np.ndarray, row_type: np.ndarray, seed: int = 5,
                      pairs: int = 20_000, nn_queries: int = 300) -> dict:
    """What makes vectors easy or hard to index: mean cosine of two views of one product, of two products of one
    type and of two types; the median cosine of each query's nearest other product; the effective dimension
    (participation ratio of the covariance's eigenvalues: (sum l)^2 / sum l^2)."""
    rng = np.random.default_rng(seed)
    vectors = np.asarray(vectors, np.float32)
    left, right = rng.integers(0, len(vectors), (2, pairs * 4))
    same_type = (row_type[left] == row_type[right]) & ~(row_product[left] == row_product[right])
    other_type = row_type[left] != row_type[right]
    # Views of one product: neighbouring rows of products owning several.
    first = np.flatnonzero(np.r_[row_product[1:] == row_product[:-1], False])
    first = rng.choice(first, size=min(pairs, len(first)), replace=False) if len(first) else first
    cosine = np.einsum("ij,ij->i", vectors[left], vectors[right])
    views = np.einsum("ij,ij->i", vectors[first], vectors[first + 1]) if len(first) else np.zeros(0)
    sample = vectors[rng.choice(len(vectors), size=min(20_000, len(vectors)), replace=False)].astype(np.float64)
    eigen = np.linalg.eigvalsh(np.cov(sample, rowvar=False))
    queries = rng.choice(len(vectors), size=min(nn_queries, len(vectors)), replace=False)
    nearest = []
    for query in queries:
        scores = vectors @ vectors[query]
        scores[row_product == row_product[query]] = -np.inf
        nearest.append(float(scores.max()))
    return {"views_of_one_product": _mean(views), "products_of_one_type": _mean(cosine[same_type]),
            "different_types": _mean(cosine[other_type]),
            "nearest_other_product_median": round(float(np.median(nearest)), 4),
            "effective_dimension": round(float(eigen.sum() ** 2 / (eigen ** 2).sum()), 1)}


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def search_k_for_recall(vectors: np.ndarray, work: Path, n_trees: int = 10, target: float = 0.95,
                        queries: int = 500) -> dict:
    """The builder's own rule (builder.index.build_with_recall): the smallest search_k reaching the target."""
    from builder.index import build_with_recall

    work.mkdir(parents=True, exist_ok=True)
    path = work / f"recall-{os.getpid()}.ann"
    begin = time.perf_counter()
    report = build_with_recall(np.asarray(vectors, np.float32), str(path), n_trees, target, sample_queries=queries)
    seconds = time.perf_counter() - begin
    path.unlink(missing_ok=True)
    return {"rows": len(vectors), "n_trees": report.n_trees, "search_k": report.search_k,
            "recall_at_10": round(report.recall_at_10, 4), "seconds": round(seconds, 1)}


# -- a version of that shape, written with the builder's own code ---------------------------------------------


def _paths(image_ids: np.ndarray, suffix: str = ".jpg") -> list[str]:
    """ABO's layout: small/<first 2 hex of a hash>/<hash><suffix>, relative to small/."""
    out = []
    for image_id in image_ids:
        digest = hashlib.sha1(image_id.encode()).hexdigest()[:8]
        out.append(f"{digest[:2]}/{digest}{image_id[-3:]}{suffix}")
    return out


def assemble_catalogue(shape: Shape, paths: list[str], sha256: list[str], sizes: list[int]):
    """The builder's own Catalogue (builder.catalogue.assemble) from listings-like membership and a scan table in
    which every image was kept."""
    from builder.catalogue import Membership, assemble

    row_product = shape.row_product
    position = np.arange(len(row_product)) - np.repeat(np.cumsum(shape.image_counts) - shape.image_counts,
                                                       shape.image_counts)
    pairs = pd.DataFrame({"product_id": shape.product_ids[row_product], "image_id": shape.image_ids,
                          "role": np.where(position == 0, "main", "other"), "position": position})
    membership = Membership(pairs, shape.attributes, "listings",
                            {"listing_files": 1, "language": "en_US", "listings": len(shape.product_ids),
                             "malformed_listings": 0, "duplicate_listings": 0})
    scanned = pd.DataFrame({"image_id": shape.image_ids, "path": paths, "width": 256, "height": 256,
                            "size_from": "metadata", "bytes": sizes, "sha256": sha256, "kept": True,
                            "drop_reason": None, "label": None, "label_name": None})
    return assemble(membership, scanned)


def write_version(out: Path, version: str, shape: Shape, vectors: np.ndarray, base_version: Path,
                  n_trees: int = 10, target_recall: float = 0.95) -> dict:
    """A version of `shape` without embedding anything: the tables by builder.build.write_tables from the builder's
    Catalogue, the Annoy index by builder.index.build_with_recall, the SavedModel and the model's part of the
    manifest copied from a real build (`base_version`), the manifest's checksums by lookalike.artifacts. Returns
    the manifest; CURRENT names the version."""
    from builder.build import write_tables
    from builder.index import build_with_recall

    clock: dict[str, float] = {}
    begin = time.perf_counter()
    staging = out / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # Not files: a hash of the id stands in for the content hash the scan would have found.
    sha256 = [hashlib.sha256(image_id.encode()).hexdigest() for image_id in shape.image_ids]
    catalogue = assemble_catalogue(shape, _paths(shape.image_ids), sha256, [20_000] * len(shape.image_ids))
    position = pd.Series(np.arange(len(shape.image_ids)), index=shape.image_ids)
    ordered = np.asarray(vectors)[position[catalogue.rows["image_id"]].to_numpy()]
    clock["catalogue"] = time.perf_counter() - begin
    begin = time.perf_counter()
    report = build_with_recall(ordered, str(staging / artifacts.INDEX_FILE), n_trees, target_recall)
    clock["index"] = time.perf_counter() - begin
    begin = time.perf_counter()
    write_tables(staging, catalogue, ordered)
    shutil.copytree(base_version / artifacts.MODEL_DIR, staging / artifacts.MODEL_DIR)
    base = artifacts.load_manifest(base_version, verify=False)
    manifest = {key: value for key, value in base.items() if key not in ("files", "neighbours")}
    manifest.update({
        "version": version, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "catalogue_root": str(out / "abo-shape"),
        "synthetic": {"written_by": "bench/scale.py", "model_from": base["version"],
                      "note": "vectors made, not embedded: the model answers photo queries in another space"},
        "counts": {"scanned": len(shape.image_ids), "kept": len(shape.image_ids), "dropped": 0, "embedding_failed": 0,
                   "indexed": len(catalogue.rows), "images_indexed": len(catalogue.rows),
                   "products": len(catalogue.products), "dropped_by_reason": {}},
        "catalogue": catalogue.report, "attribute_keys": sorted(catalogue.attribute_keys),
        "number_keys": sorted(catalogue.number_keys),
        "embedding": {"embedded": 0, "from_cache": 0}, "scan": {"files": 0, "decoded": 0, "from_cache": 0},
        "embedding_failures": {},
        "index": {"n_trees": report.n_trees, "search_k": report.search_k, "recall_at_10": round(report.recall_at_10, 4),
                  "recall_queries": report.queries,
                  "recall_by_search_k": {str(k): round(v, 4) for k, v in report.recall_by_search_k.items()}},
    })
    clock["tables"] = time.perf_counter() - begin
    manifest["timings_seconds"] = {key: round(value, 3) for key, value in clock.items()}
    artifacts.settle_folder(staging)
    manifest["files"] = artifacts.checksums(staging)
    artifacts.write_json_atomic(staging / artifacts.MANIFEST, manifest)
    shutil.rmtree(out / version, ignore_errors=True)
    os.rename(staging, out / version)
    artifacts.write_current(out, version)
    return manifest


# -- neighbour lists ------------------------------------------------------------------------------------------


def _env() -> dict:
    return dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")


class Overrun(RuntimeError):
    """A step of the bench ran past its time budget and was stopped."""


def run_bounded(command: list, log_path: Path, timeout_s: float) -> float:
    """Runs a command to completion within timeout_s (else stops it and its children: Spark's JVM and workers, all
    in its own session) and returns its wall seconds; its output goes to log_path."""
    import signal

    begin = time.perf_counter()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([str(part) for part in command], env=_env(), stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            raise Overrun(f"{command[1:4]} stopped after {timeout_s:.0f} s; see {log_path}") from None
    if code != 0:
        raise subprocess.CalledProcessError(code, command, f"see {log_path}")
    return time.perf_counter() - begin


def reindex(out: Path, source: str, neighbours: int = 100, timeout_s: float = 3600) -> tuple[str, dict, float]:
    """`lookalike-build reindex`, the operator's path to lists for a version that has none: (the new version,
    its manifest, wall seconds). CURRENT names the new version."""
    # --nice 0: the figure is the work's, measured with no server beside it (a build's default is 10).
    seconds = run_bounded([BIN / "lookalike-build", "--log-level", "INFO", "reindex", "--out", out, "--version", source,
                           "--neighbours", neighbours, "--nice", 0], out.parent / f"reindex-{source}.log", timeout_s)
    version = artifacts.read_current(out)
    return version, artifacts.load_manifest(out / version, verify=False), seconds


def lists_for_queries(out: Path, source: str, version: str, queries: Path, n: int = 100) -> dict:
    """A version beside `source` (its files hard-linked) whose neighbour lists are exact, by the library's own kernel
    (lookalike.neighbours.exact_top_products, what reindex runs in its executors), for exactly the products and images
    the load generator draws from `queries`, every other row padded as a list with no entry (the server would search
    for those). The files have their full size, so loading and checking the version costs what full lists cost, and
    every query the load makes is answered from a list exactly as with full lists: the serving figures of a version
    with lists, while reindex is far too slow on this shared host. Returns what was computed."""
    from lookalike.neighbours import (
        ARRAY_FIELDS,
        MANIFEST_KEY,
        NEIGHBOURS_DIR,
        NO_PRODUCT,
        NO_SCORE,
        exact_top_products,
        expected_dtype,
        file_path,
        product_query_vectors,
    )

    begin = time.perf_counter()
    source_dir, staging = out / source, out / f".staging-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(out / version, ignore_errors=True)
    manifest = artifacts.load_manifest(source_dir, verify=False)
    for rel in manifest["files"]:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(source_dir / rel, staging / rel)
    vectors = np.load(source_dir / artifacts.VECTORS_FILE)
    products = tables.read_products(source_dir / artifacts.PRODUCTS_FILE,
                                    columns=["product_id", "first_row", "image_count"]).to_pandas()
    image_ids = tables.read_images(source_dir / artifacts.IMAGES_FILE, columns=["image_id"]).column("image_id")
    row_of_image = pd.Series(np.arange(len(image_ids)), index=image_ids.to_pandas())
    wanted_images = row_of_image[pd.read_csv(queries / "images.csv.gz")["image_id"]].to_numpy()
    with gzip.open(queries / "listings" / "metadata" / "listings_0.json.gz", "rt") as handle:
        wanted_ids = [json.loads(line)["item_id"] for line in handle]
    wanted_products = pd.Series(np.arange(len(products)), index=products["product_id"])[wanted_ids].to_numpy()
    first_row = products["first_row"].to_numpy().astype(np.int64)
    image_count = products["image_count"].to_numpy().astype(np.int64)
    (staging / NEIGHBOURS_DIR).mkdir()
    arrays = {}
    for name in ARRAY_FIELDS:
        shape = (len(products) if name.startswith("product_") else len(vectors), n)
        arrays[name] = np.lib.format.open_memmap(staging / file_path(name), mode="w+", dtype=expected_dtype(name),
                                                 shape=shape)
        arrays[name][:] = NO_SCORE if name.endswith("_scores") else NO_PRODUCT
    for kind, rows, query_vectors in (
            ("product", wanted_products, product_query_vectors(vectors, first_row[wanted_products],
                                                               image_count[wanted_products])),
            ("image", wanted_images, vectors[wanted_images])):
        found = exact_top_products(query_vectors, vectors, first_row, image_count, n)
        for part, values in zip(("neighbours", "neighbour_rows", "neighbour_scores"), found, strict=True):
            arrays[f"{kind}_{part}"][rows] = values
    for array in arrays.values():
        array.flush()
    del arrays
    manifest = {key: value for key, value in manifest.items() if key != "files"}
    manifest.update({"version": version, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                     MANIFEST_KEY: {"n": n, "products": len(products), "rows": len(vectors), "method": "exact",
                                    "only_rows": "the load generator's queries (bench/scale.py); others empty"}})
    artifacts.settle_folder(staging)
    manifest["files"] = artifacts.checksums(staging)
    artifacts.write_json_atomic(staging / artifacts.MANIFEST, manifest)
    os.rename(staging, out / version)
    return {"version": version, "products_listed": len(wanted_products), "images_listed": len(wanted_images),
            "seconds": round(time.perf_counter() - begin, 1)}


def reindex_progress(log_path: Path) -> dict | None:
    """How far a reindex still running (or stopped) has come, from its log: the neighbour tasks done out of all,
    the seconds since its neighbours stage began, and the whole stage's time at that rate."""
    import re

    if not log_path.is_file():
        return None
    text = log_path.read_text(errors="replace")
    started = re.search(r"^(\S+ \S+),\d+ INFO builder.build: stage neighbours \.\.\.", text, re.M)
    tasks = re.findall(r"\((\d+) \+ \d+\) / (\d+)\]", text)
    if not started or not tasks:
        return None
    done, total = (int(value) for value in tasks[-1])
    began = datetime.strptime(started.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    elapsed = (datetime.now(UTC) - began).total_seconds()
    stages = dict(re.findall(r"stage (\w+) done in ([\d.]+) s", text))
    return {"tasks_done": done, "tasks": total, "neighbours_stage_s_so_far": round(elapsed),
            "neighbours_stage_s_at_this_rate": round(elapsed * total / done) if done else None,
            "stages_done_s": {key: float(value) for key, value in stages.items()}}


def list_recall(version_dir: Path, manifest: dict, queries: int, k: int = 10, seed: int = 3) -> dict:
    """recall@k of the stored lists against a dense brute-force scan (each product scored by its best row), for
    product and image queries drawn at random; the query's own product is left out on both sides, as the server
    leaves it out. Ties at the k-th score count as found."""
    from lookalike.neighbours import load_neighbours, product_query_vectors

    lists = load_neighbours(version_dir, manifest)
    if lists is None:
        return {}
    vectors = np.load(version_dir / artifacts.VECTORS_FILE).astype(np.float32, copy=False)
    products = tables.read_products(version_dir / artifacts.PRODUCTS_FILE, columns=["first_row", "image_count"])
    first_row = products.column("first_row").to_numpy().astype(np.int64)
    image_count = products.column("image_count").to_numpy().astype(np.int64)
    row_product = np.repeat(np.arange(len(first_row)), image_count)
    rng = np.random.default_rng(seed)
    out = {}
    for kind, listed, count in (("product", lists.product_neighbours, len(first_row)),
                                ("image", lists.image_neighbours, len(vectors))):
        picked = rng.choice(count, size=min(queries, count), replace=False)
        if kind == "product":
            query_vectors = product_query_vectors(vectors, first_row[picked], image_count[picked])
            own = picked
        else:
            query_vectors = np.asarray(vectors[picked], np.float32)
            own = row_product[picked]
        found = 0
        for query, own_product, stored in zip(query_vectors, own, listed[picked], strict=True):
            best = np.maximum.reduceat(vectors @ query, first_row)
            best[own_product] = -np.inf
            kth = np.partition(best, len(best) - k)[len(best) - k]
            stored = [p for p in stored.tolist() if p >= 0 and p != own_product][:k]
            found += sum(1 for p in stored if best[p] >= kth - 1e-6)
        out[f"{kind}_recall_at_{k}"] = round(found / (k * len(picked)), 5)
        out[f"{kind}_queries"] = len(picked)
    return out


# -- a real build of a large catalogue whose features are cached -----------------------------------------------


def _png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _listing(product_id: str, images: list[str], attributes: dict) -> str:
    """One line of ABO's listings_*.json.gz: language-tagged text fields, product_type as a list of values."""
    def tagged(value):
        return [{"language_tag": "en_US", "value": value}] if isinstance(value, str) else None

    record = {"item_id": product_id, "main_image_id": images[0], "other_image_id": images[1:],
              "product_type": [{"value": attributes["product_type"]}], "brand": tagged(attributes["brand"]),
              "color": tagged(attributes["color"]), "item_name": tagged(attributes["item_name"]),
              "country": attributes["country"], "marketplace": attributes["marketplace"],
              "domain_name": attributes["domain_name"]}
    return json.dumps({key: value for key, value in record.items() if value is not None})


def write_catalogue(root: Path, shape: Shape, products: np.ndarray, part: int, seed: int) -> pd.DataFrame:
    """Files (8x8 PNGs, each different), images.csv.gz (ABO's image_id,height,width,path, appended to) and one
    listings part for the given product rows of `shape`; returns the images written with their content hashes."""
    rng = np.random.default_rng(seed)
    starts = np.cumsum(shape.image_counts) - shape.image_counts
    rows = np.concatenate([np.arange(starts[p], starts[p] + shape.image_counts[p]) for p in products])
    image_ids = shape.image_ids[rows]
    paths = _paths(image_ids, ".png")
    digests, sizes = [], []
    small = root / "small"
    for path in paths:
        data = _png(rng)
        target = small / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        digests.append(hashlib.sha256(data).hexdigest())
        sizes.append(len(data))
    metadata = root / "images.csv.gz"
    frame = pd.DataFrame({"image_id": image_ids, "height": 8, "width": 8, "path": paths})
    if metadata.exists():
        frame = pd.concat([pd.read_csv(metadata), frame], ignore_index=True)
    frame.to_csv(metadata, index=False, compression="gzip")
    listings = root / "listings" / "metadata"
    listings.mkdir(parents=True, exist_ok=True)
    attributes = shape.attributes.set_index("product_id")
    with gzip.open(listings / f"listings_{part}.json.gz", "wt") as handle:
        for product in products:
            start, count = starts[product], shape.image_counts[product]
            product_id = shape.product_ids[product]
            handle.write(_listing(product_id, list(shape.image_ids[start:start + count]),
                                  attributes.loc[product_id].to_dict()) + "\n")
    return pd.DataFrame({"row": rows, "path": paths, "sha256": digests, "bytes": sizes})


def fill_cache(cache_root: Path, catalogue: Path, written: pd.DataFrame, vectors: np.ndarray, seed: int = 29,
               shard_rows: int = 20_000) -> dict:
    """Puts what a first build would have left in the feature cache, through the cache's own API: each file's scan
    (by uri, size and mtime, as Spark lists it) and its raw backbone features (by content sha256 under the default
    build's model key). The features are the synthetic vectors mapped into the backbone's 1,280 dimensions by a
    fixed random linear map, plus noise, so that the build's head (lda, fitted on them) finds the same structure."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from builder.backbones import SPECS
    from builder.build import BuildConfig
    from builder.cache import FeatureCache, model_identity, model_key, new_tmp, publish, shard_name

    config = BuildConfig(images=catalogue, out=cache_root.parent)
    identity = model_identity(config.backbone, SPECS[config.backbone].source, config.weights_file,
                              config.preprocessing, "lda", config.pooling, config.mirror)
    key = model_key(identity)
    cache = FeatureCache(cache_root)
    cache.register_model(key, identity)
    small = (catalogue / "small").resolve()
    stats = [os.stat(small / path) for path in written["path"]]
    cache.add_scans(pd.DataFrame({
        "uri": [f"file:{small / path}" for path in written["path"]], "bytes": written["bytes"].to_numpy(),
        "mtime": [s.st_mtime_ns // 1_000_000 for s in stats], "sha256": written["sha256"],
        "file_width": pd.array([8] * len(written), dtype="Int32"),
        "file_height": pd.array([8] * len(written), dtype="Int32"), "error": None}))
    rng = np.random.default_rng(seed)
    features_dimension = 1280
    projection = np.linalg.qr(rng.standard_normal((features_dimension, vectors.shape[1])))[0].T
    tmp = new_tmp(cache.shards_dir(key))
    tmp.mkdir()
    for part, first in enumerate(range(0, len(written), shard_rows)):
        chunk = written.iloc[first:first + shard_rows]
        raw = (vectors[chunk["row"].to_numpy()] @ projection
               + 0.01 * rng.standard_normal((len(chunk), features_dimension))).astype(np.float32)
        pq.write_table(pa.table({
            "sha256": pa.array(chunk["sha256"], pa.string()),
            "features": pa.array(list(raw), pa.list_(pa.float32())),
            "error": pa.array([None] * len(chunk), pa.string())}), tmp / f"part-{part:05d}.parquet")
    (tmp / "_SUCCESS").touch()
    publish(tmp, cache.shards_dir(key) / shard_name())
    return {"model_key": key, "images": len(written)}


def real_build(out: Path, catalogue: Path, version: str, neighbours: int, timeout_s: float) -> tuple[dict, float]:
    """`lookalike-build build` end to end; (manifest, wall seconds)."""
    seconds = run_bounded([BIN / "lookalike-build", "--log-level", "INFO", "build", "--images", catalogue, "--out", out,
                           "--version", version, "--neighbours", neighbours, "--nice", 0],
                          out.parent / f"build-{version}.log", timeout_s)
    return artifacts.load_manifest(out / version, verify=False), seconds


def build_runs(work: Path, shape: Shape, vectors: np.ndarray, products: int, neighbours: int,
               timeout_s: float) -> dict:
    """A catalogue of the first `products` products of the shape with every feature cached: the first build (the
    trunk exported once, nothing embedded), then +1% products whose images the model has never seen."""
    root, out = work / "build-catalogue", work / "build-artifacts"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    begin = time.perf_counter()
    written = write_catalogue(root, shape, np.arange(products), 0, seed=41)
    cache = fill_cache(out / ".features", root, written, vectors)
    prepared = time.perf_counter() - begin
    first, first_s = real_build(out, root, "first", neighbours, timeout_s)
    added = np.arange(products, products + max(1, products // 100))
    extra = write_catalogue(root, shape, added, 1, seed=43)
    again, again_s = real_build(out, root, "plus-1pct", neighbours, timeout_s)
    row = {"prepared_s": round(prepared, 1), "cache": cache}
    for name, manifest, seconds in (("first", first, first_s), ("plus_1pct", again, again_s)):
        row[name] = {"seconds": round(seconds, 1), "stage_seconds": manifest["timings_seconds"],
                     "images": manifest["counts"]["images_indexed"], "products": manifest["counts"]["products"],
                     "embedded": manifest["embedding"]["embedded"], "from_cache": manifest["embedding"]["from_cache"],
                     "decoded": manifest["scan"]["decoded"], "index": manifest["index"],
                     "neighbours": manifest.get("neighbours")}
    row["plus_1pct"]["added_products"], row["plus_1pct"]["added_images"] = len(added), len(extra)
    return row


# -- serving ---------------------------------------------------------------------------------------------------


def query_catalogue(folder: Path, version_dir: Path, photos: Path, count: int = 256, seed: int = 7) -> Path:
    """What the load generator draws queries from, for a version with no files of its own: images.csv.gz naming
    `count` of its image ids (each with a photo from `photos`, the demo catalogue, for photo queries) and a
    listings part naming `count` of its product ids."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(folder, ignore_errors=True)
    image_ids = tables.read_images(version_dir / artifacts.IMAGES_FILE, columns=["image_id"]).column("image_id")
    product_ids = tables.read_products(version_dir / artifacts.PRODUCTS_FILE,
                                       columns=["product_id"]).column("product_id")
    picked_images = [image_ids[int(i)].as_py() for i in rng.choice(len(image_ids), min(count, len(image_ids)), False)]
    picked_products = [product_ids[int(i)].as_py()
                       for i in rng.choice(len(product_ids), min(count, len(product_ids)), False)]
    sources = sorted((photos / "small").rglob("*.*"))[:count]
    paths = []
    for n, _image_id in enumerate(picked_images):
        source = sources[n % len(sources)]
        target = folder / "small" / f"q{n:03d}{source.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        paths.append(target.name)
    pd.DataFrame({"image_id": picked_images, "height": 28, "width": 28, "path": paths}).to_csv(
        folder / "images.csv.gz", index=False, compression="gzip")
    (folder / "listings" / "metadata").mkdir(parents=True)
    with gzip.open(folder / "listings" / "metadata" / "listings_0.json.gz", "wt") as handle:
        handle.writelines(json.dumps({"item_id": product_id}) + "\n" for product_id in picked_products)
    return folder


def memory_of(pid: int) -> dict:
    """RSS and PSS (a shared page counted once over the processes sharing it) of a server and its workers, MB."""
    pids = [pid]
    for parent in pids:
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    rss = pss = 0
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return {"processes": len(pids), "rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}


def _samples(metrics_port: int) -> list:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def plans(metrics_port: int) -> dict:
    return {sample.labels["plan"]: int(sample.value) for sample in _samples(metrics_port)
            if sample.name == "lookalike_query_plans_total"}


def retire_collections(metrics_port: int) -> dict:
    """The server's own account of the full collections that freed retired versions (count, mean ms)."""
    found = {sample.name: sample.value for sample in _samples(metrics_port)
             if sample.name.startswith("lookalike_retire_collection_seconds_")}
    count = found.get("lookalike_retire_collection_seconds_count", 0)
    mean = found.get("lookalike_retire_collection_seconds_sum", 0) / count * 1000 if count else None
    return {"count": int(count), "mean_ms": None if mean is None else round(mean, 1)}


def _point(report: dict, operation: str) -> dict:
    stats = report["latency"].get(operation, {})
    return {"qps": report["qps"], "p50_ms": stats.get("p50_ms"), "p99_ms": stats.get("p99_ms"),
            "max_ms": stats.get("max_ms"), "codes": report["codes"]}


def serving_runs(artifacts_dir: Path, catalogue: Path, duration_s: float, full: bool = True) -> dict:
    """One server, result cache off: GetInfo (the ceiling), FindSimilar by product id and by image id (closed loop
    with 8 callers on 4 connections, then open loop at 50% and 80% of that maximum), photo FindSimilar; and GetInfo
    in open loop at half its maximum and at by product's half rate (the RPC stack's own tail)."""
    from bench.serving import compiled_load, server

    begin = time.perf_counter()
    with server(artifacts_dir, "--result-cache-size", "0", "--max-queue", "1024") as (address, metrics_port, process):
        ready_s = time.perf_counter() - begin
        memory = memory_of(process.pid)
        compiled_load(address, catalogue, "info=1,product=1,id=1", 1.0)  # warm the connections and the pages
        row: dict = {"ready_s": round(ready_s, 1), "memory": memory}
        for name in ("info", "product", "id", "image")[:None if full else 3]:
            row[name] = _point(compiled_load(address, catalogue, f"{name}=1", duration_s, 8), name)
        for name in ("product", "id") if full else ():
            for share in (0.5, 0.8):
                rate = round(row[name]["qps"] * share, 1)
                report = compiled_load(address, catalogue, f"{name}=1", duration_s, mode="open", rate=rate)
                row[f"{name}_open_{int(share * 100)}"] = {"rate": rate, **_point(report, name)}
        if full:
            # The stack's own tail: GetInfo (a 14 us handler) at half its own maximum, and at by product's half rate.
            for key, rate in (("info_open_50", round(row["info"]["qps"] * 0.5, 1)),
                              ("info_at_product_50", row["product_open_50"]["rate"])):
                row[key] = {"rate": rate, **_point(compiled_load(address, catalogue, "info=1", duration_s,
                                                                 mode="open", rate=rate), "info")}
        row["memory_after_load"] = memory_of(process.pid)
        row["plans"] = plans(metrics_port)
    return row


def workers_memory(artifacts_dir: Path, catalogue: Path) -> dict:
    """Ready time and memory with 1 and 2 workers, after a short by-product load has touched the pages."""
    from bench.serving import compiled_load, server

    out = {}
    for count in (1, 2):
        begin = time.perf_counter()
        with server(artifacts_dir, "--workers", str(count), "--result-cache-size", "0") as (address, _, process):
            ready_s = time.perf_counter() - begin
            compiled_load(address, catalogue, "product=1,id=1", 2.0, 8)
            out[str(count)] = {"ready_s": round(ready_s, 1), **memory_of(process.pid)}
    return out


class BackgroundLoad:
    """The compiled load generator in the background, bounded by duration_s; its report (`codes`: every call's
    outcome) once the block ends: SIGTERM stops it taking new calls and it reports as a finished run does."""

    def __init__(self, address: str, catalogue: Path, mix: str, concurrency: int, duration_s: float = 600) -> None:
        from bench.serving import loadgen_command

        self.command = loadgen_command(address, catalogue, mix, duration_s, concurrency)
        self.report: dict = {}

    def __enter__(self) -> BackgroundLoad:
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, exc_type, *_) -> None:
        self._process.terminate()
        try:
            out, err = self._process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            out, err = self._process.communicate()
        try:
            self.report = json.loads(out)
        except ValueError:
            self.report = {}
        # A load that never ran (it could not connect, say) is a failed measurement, not a run without errors.
        if exc_type is None and (self._process.returncode != 0 or "codes" not in self.report):
            raise RuntimeError(f"the background load generator did not report (exit {self._process.returncode}): "
                               f"{err.strip()[-300:] or 'no output'}")

    @property
    def errors(self) -> int | None:
        """Calls that did not end OK; None without a report (the load generator did not report)."""
        codes = self.report.get("codes")
        return None if codes is None else sum(n for code, n in codes.items() if code != "OK")


class InfoProbe:
    """GetInfo every interval_ms on a channel of its own, each call's send time, latency and the version that
    answered: the event loop's stalls show as latency, the swap as the first answer naming the new version."""

    def __init__(self, address: str, interval_ms: float = 2.0) -> None:
        self.address, self.interval_s = address, interval_ms / 1000
        self.samples: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import grpc

        from lookalike.v1 import lookalike_pb2 as pb
        from lookalike.v1 import lookalike_pb2_grpc as rpc

        with grpc.insecure_channel(self.address) as channel:
            stub = rpc.ImageSimilarityStub(channel)
            while not self._stop.is_set():
                sent = time.perf_counter()
                try:
                    version = stub.GetInfo(pb.GetInfoRequest(), timeout=5).version
                except grpc.RpcError as error:
                    version = f"error {error.code().name}"
                self.samples.append((sent, time.perf_counter() - sent, version))
                time.sleep(max(0.0, self.interval_s - (time.perf_counter() - sent)))

    def __enter__(self) -> InfoProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _latency(samples: list[tuple[float, float, str]]) -> dict:
    if not samples:
        return {"calls": 0}
    ms = np.array([latency for _, latency, _ in samples]) * 1000
    return {"calls": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def swap_pause(artifacts_dir: Path, catalogue: Path, versions: tuple[str, str], swaps: int,
               settle_s: float = 4.0, flags: tuple[str, ...] = ()) -> dict:
    """GetInfo latency (a probe every 2 ms) under by-product load: without swaps, while the next version loads, and
    around each swap (within 100 ms of the first answer naming the new version); CURRENT alternates between two
    versions of the same size. The server is not changed: the swap shows in its answers. `flags`: the server's
    own (such as --workers 2)."""
    from bench.serving import server

    artifacts.write_current(artifacts_dir, versions[0])
    with server(artifacts_dir, "--result-cache-size", "0", "--watch-interval-s", "0.2", *flags) as (
            address, metrics, _), \
            BackgroundLoad(address, catalogue, "product=1", 2) as load, InfoProbe(address) as probe:
        time.sleep(settle_s)
        quiet_until = time.perf_counter()
        events = []
        for n in range(swaps):
            target = versions[(n + 1) % 2]
            requested = time.perf_counter()
            artifacts.write_current(artifacts_dir, target)
            deadline = requested + 120
            while time.perf_counter() < deadline and not any(
                    v == target and t > requested for t, _, v in probe.samples[-50:]):
                time.sleep(0.05)
            # The swap happened between the last answer from the old version and the first from the new.
            swapped = next((t for t, _, v in reversed(probe.samples) if v != target), requested)
            events.append((requested, swapped))
            time.sleep(settle_s)
        collections = retire_collections(metrics)
    samples = probe.samples
    quiet = [s for s in samples if s[0] < quiet_until]
    loading = [s for s in samples if any(start <= s[0] < end - 0.1 for start, end in events)]
    at_swap = [s for s in samples if any(abs(s[0] - end) <= 0.1 for _, end in events)]
    return {"swaps": len(events), "load_to_swap_s": [round(end - start, 1) for start, end in events],
            "without_swaps": _latency(quiet), "while_loading": _latency(loading), "at_swap": _latency(at_swap),
            "errors": sum(1 for s in samples if s[2].startswith("error")), "load_calls": load.report.get("requests"),
            "load_errors": load.errors, "load_codes": load.report.get("codes"), "retire_collections": collections}


class _Ticker:
    """A thread that sleeps 0.2 ms at a time and records how late each wake-up was: while another thread holds the
    interpreter, it cannot run, so its longest gap is the longest the event loop would have waited then."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.0002)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now

    def __enter__(self) -> _Ticker:
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join(10)


def _held_ms(function, *args) -> tuple[float, object]:
    """The longest the interpreter was held (ms) while function(*args) ran on a thread of its own, and its result
    (what it raised there is raised here)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - raised again on the caller's thread
            outcome["error"] = error

    with _Ticker() as ticker:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(300)
    if worker.is_alive():
        raise TimeoutError(f"{getattr(function, '__name__', function)} still running after 300 s")
    if "error" in outcome:
        raise outcome["error"]
    return round(max(ticker.gaps) * 1000, 1), outcome["result"]


def interpreter_holds(artifacts_dir: Path, versions: tuple[str, str], rounds: int = 3) -> dict:
    """The swap's pauses as the server's own code causes them, apart from the host and the load generator: in this
    process, the three steps of a swap that run off the event loop and cost the most (loading the next version beside
    the served one, sharing its model: server/version.py load_version; then the retired version's unload and the drop
    of its last reference: server/versions.py _unload), each on a thread while a ticker stands in for the event loop,
    the heap frozen as the server freezes it. Reports the longest hold of each step over `rounds` swaps each way,
    in ms."""
    from server.search import SearchConfig
    from server.version import load_version

    served = load_version(artifacts_dir, versions[0], 10_000_000)
    gc.collect()
    gc.freeze()  # as server/app.py does before SERVING: no collection walks the model while a step is timed
    holds: dict[str, list[float]] = {"load": [], "unload": [], "free": []}
    try:
        for n in range(2 * rounds):
            held, loaded = _held_ms(load_version, artifacts_dir, versions[(n + 1) % 2], 10_000_000, SearchConfig(),
                                    0, served)
            if loaded.embedder is not served.embedder:
                raise RuntimeError(f"{versions[(n + 1) % 2]} did not share the served model: not the swap measured")
            holds["load"].append(held)
            retired, served = [served], loaded
            holds["unload"].append(_held_ms(retired[0].close)[0])
            gone = weakref.ref(retired[0].catalogue)
            # The last reference dropped on the thread, as the server's retirement does.
            holds["free"].append(_held_ms(retired.clear)[0])
            if gone() is not None:
                raise RuntimeError("the retired version was not freed by its last reference: the free step timed "
                                   "nothing")
    finally:
        gc.unfreeze()
    return {step: {"max_ms": max(values), "each_ms": values} for step, values in holds.items()}


# -- the run ---------------------------------------------------------------------------------------------------


def demo_build(work: Path, products: int) -> tuple[Path, Path]:
    """The demo sample (the committed Fashion-MNIST sample) built once by the real CLI, as bench/run.py does, with
    lists; reused by later runs. Returns (catalogue, artifacts)."""
    catalogue, out = work / "demo-catalogue", work / "demo-artifacts"
    if not (catalogue / "images.csv.gz").exists():
        subprocess.run([BIN / "lookalike-build", "sample", "fashion-mnist", "--out", catalogue, "--limit",
                        str(products)], check=True, env=_env(), capture_output=True)
    if not (out / artifacts.CURRENT).exists():
        with open(work / "demo-build.log", "w") as log_file:
            subprocess.run([BIN / "lookalike-build", "--log-level", "WARNING", "build", "--images", catalogue,
                            "--out", out, "--version", "demo"], check=True, env=_env(), stdout=log_file,
                           stderr=subprocess.STDOUT)
    return catalogue, out


def ensure_lists(out: Path) -> str:
    """The served version of `out`, given lists by reindex when it has none (a version built before lists)."""
    current = artifacts.read_current(out)
    if artifacts.load_manifest(out / current, verify=False).get("neighbours"):
        return current
    return reindex(out, current)[0]


def version_vectors(version_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(vectors, product row of each index row, product type code of each index row, counts) of a built version."""
    manifest = artifacts.load_manifest(version_dir, verify=False)
    vectors = np.load(version_dir / artifacts.VECTORS_FILE)
    products = tables.read_products(version_dir / artifacts.PRODUCTS_FILE, manifest["attribute_keys"]).to_pandas()
    row_product = np.repeat(np.arange(len(products)), products["image_count"].to_numpy())
    codes = pd.factorize(products["product_type"])[0] if "product_type" in products else np.zeros(len(products), int)
    return vectors, row_product, codes[row_product], {"products": len(products), "images": len(vectors),
                                                      "types": int(codes.max()) + 1}


def realism(demo_version: Path, abo_vectors: np.ndarray, abo_shape: Shape, abo_search_k: dict, work: Path,
            queries: int) -> dict:
    """The synthetic vectors against the real build's: the same generator at the demo's shape (its product and type
    counts) beside the demo's real vectors, then at ABO's shape; statistics and the builder's search_k for
    recall@10 0.95 with 10 trees."""
    vectors, row_product, row_type, counts = version_vectors(demo_version)
    twin = make_shape(counts["products"], counts["images"], counts["types"], seed=19)
    twin_vectors = make_vectors(twin, dimension=vectors.shape[1])
    rows = {"demo (real lda vectors)": {**counts, **vector_statistics(vectors, row_product, row_type),
                                        **search_k_for_recall(vectors, work, queries=queries)},
            "synthetic at the demo's shape": {**counts, **vector_statistics(twin_vectors, twin.row_product,
                                                                           twin.product_types[twin.row_product]),
                                              **search_k_for_recall(twin_vectors, work, queries=queries)}}
    abo_rows = abo_shape.row_product
    rows["synthetic at ABO's shape"] = {
        "products": len(abo_shape.product_ids), "images": len(abo_vectors),
        "types": int(abo_shape.product_types.max()) + 1,
        **vector_statistics(abo_vectors, abo_rows, abo_shape.product_types[abo_rows]), **abo_search_k}
    return rows


def shape_summary(shape: Shape) -> dict:
    counts = np.bincount(shape.image_counts)
    types = np.bincount(shape.product_types)
    return {"products": len(shape.product_ids), "images": len(shape.image_ids),
            "images_per_product": {"mean": round(float(shape.image_counts.mean()), 3),
                                   "distribution": "shifted geometric on 1..21, exact total",
                                   "share_by_count": {int(k): round(float(v) / len(shape.product_ids), 4)
                                                      for k, v in enumerate(counts) if v and k <= 8},
                                   "max": int(shape.image_counts.max())},
            "product_types": {"count": int(len(types)), "distribution": "Zipf, exponent 1",
                              "largest_share": round(float(types.max()) / len(shape.product_ids), 4),
                              "smallest": int(types.min())},
            "attribute_keys": [c for c in shape.attributes.columns if c != "product_id"]}


def targets(results: dict) -> list[dict]:
    rows = []

    def add(name, value, goal, passed):
        rows.append({"target": name, "measured": value, "goal": goal, "met": bool(passed)})

    serving = results.get("serving", {})
    abo, demo = serving.get("abo"), serving.get("demo")
    if abo:
        ratio = abo["product"]["qps"] / max(abo["info"]["qps"], 1e-9)
        add("ABO shape: by-product QPS / GetInfo ceiling", round(ratio, 3), ">= 0.8", ratio >= 0.8)
    for name, label in (("product", "by-product"), ("id", "by-image-id")) if abo else ():
        if demo:
            ratio = abo[name]["qps"] / max(demo[name]["qps"], 1e-9)
            add(f"{label} QPS, ABO shape / demo sample", round(ratio, 3), ">= 0.9", ratio >= 0.9)
        p99 = abo.get(f"{name}_open_50", {}).get("p99_ms")
        if p99 is not None:
            add(f"ABO shape: {label} p99 ms, open loop at 50% of the closed-loop maximum", p99, "<= 3", p99 <= 3)
    recall = results.get("lists", {}).get("recall", {})
    for kind in ("product", "image"):
        value = recall.get(f"{kind}_recall_at_10")
        if value is not None:
            add(f"neighbour lists: {kind} recall@10 against brute force ({recall[f'{kind}_queries']} queries)",
                value, ">= 0.999", value >= 0.999)
    lists = results.get("lists", {})
    if "seconds" in lists:
        embedding = results["abo"]["images"] / results["embedding_images_per_s"]
        add(f"ABO shape: list build (reindex) s / embedding s at {results['embedding_images_per_s']} images/s",
            f"{lists['seconds']} / {round(embedding)}", "<= 1", lists["seconds"] <= embedding)
    progress = results.get("reindex_progress")
    if "seconds" not in lists and progress and progress.get("neighbours_stage_s_at_this_rate"):
        embedding = results["abo"]["images"] / results["embedding_images_per_s"]
        estimate = progress["neighbours_stage_s_at_this_rate"] + sum(progress["stages_done_s"].values())
        add(f"ABO shape: list build (reindex, extrapolated from {progress['tasks_done']} of {progress['tasks']} "
            f"tasks) s / embedding s at {results['embedding_images_per_s']} images/s",
            f"~{estimate} / {round(embedding)}", "<= 1", estimate <= embedding)
    memory = serving.get("workers")
    if memory:
        added = {name: memory[name]["2"]["pss_mb"] - memory[name]["1"]["pss_mb"] for name in ("abo", "demo")}
        beyond = round(added["abo"] - added["demo"], 1)
        add("ABO shape: PSS a second worker adds beyond the demo's (the model's share)", beyond, "<= 150 MB",
            beyond <= 150)
    swap = serving.get("swap")
    if swap and swap.get("at_swap", {}).get("calls"):
        add("swap: GetInfo max ms within 100 ms of the swap", swap["at_swap"]["max_ms"], "<= 10",
            swap["at_swap"]["max_ms"] <= 10)
        if swap.get("load_errors") is not None:
            failed = swap["errors"] + swap["load_errors"]
            add("swap: calls failed while versions swapped (GetInfo probe and by-product load)", failed, "0",
                failed == 0)
    holds = serving.get("swap_holds")
    if holds and "load" in holds:
        longest = max(holds[step]["max_ms"] for step in ("load", "unload", "free"))
        add("swap: longest interpreter hold by the server's load, unload and free of a version (in process)",
            longest, "<= 10", longest <= 10)
    return rows


PARTS = ("lists", "serving", "workers", "swap", "realism", "build")
# Not run by default: exact lists for the load's queries only, when reindex cannot finish in the time there is.
EXTRA_PARTS = ("query_lists",)


def listed_version(out: Path, source: str) -> tuple[str, dict] | None:
    """A version of `out` that reindex derived from `source` with lists, if one is there."""
    for folder in sorted(out.iterdir()):
        manifest_path = folder / artifacts.MANIFEST
        if folder.name != source and manifest_path.is_file():
            manifest = artifacts.load_manifest(folder, verify=False)
            section = manifest.get("neighbours") or {}
            if section and "only_rows" not in section:
                return folder.name, manifest
    return None


def run(profile: str, demo: tuple[Path, Path] | None = None, embedding_images_per_s: float = 30.0,
        parts: tuple[str, ...] = PARTS, resume: bool = False, command: str = "make bench-scale") -> dict:
    """The scale bench; writes bench/results/scale.json (the quick run: bench/work/scale/scale-quick.json). With
    `resume`, the version of ABO's shape and its lists already in the work folder are used again, and the results
    of the parts not run are kept from the last run."""
    config = PROFILES[profile]
    work = WORK / profile
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # The quick run's figures mean little and change every make test: they stay in the work folder.
    path = RESULTS / "scale.json" if profile == "full" else WORK / f"scale-{profile}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.json")
    previous = next((json.loads(p.read_text()) for p in (partial, path) if resume and p.exists()), {})
    results: dict = {**previous, "profile": profile, "config": config,
                     "started_at": previous.get("started_at", datetime.now(UTC).isoformat(timespec="seconds")),
                     "machine": {"cores": os.cpu_count()}, "embedding_images_per_s": embedding_images_per_s,
                     "seconds_by_part": previous.get("seconds_by_part", {}),
                     "commands": [*previous.get("commands", []), command],
                     "errors": {k: v for k, v in previous.get("errors", {}).items() if k not in parts}}

    def guarded(name: str, step, *args):
        """A part whose failure is recorded in the results rather than ending the run."""
        try:
            return step(*args)
        except Exception as error:  # noqa: BLE001 - the run goes on; the error is in the results
            log.exception("%s failed", name)
            results["errors"][name] = f"{type(error).__name__}: {error}"
            return None

    def part(name: str, begin: float) -> None:
        results["seconds_by_part"][name] = round(time.perf_counter() - begin, 1)
        log.info("%s done in %.0f s", name, time.perf_counter() - begin)
        # What is done so far is kept, should a later part fail or be stopped.
        partial.write_text(json.dumps(results, indent=2, default=_plain))

    begin = time.perf_counter()
    demo_catalogue, demo_out = demo or demo_build(WORK, config["demo_products"])
    demo_version = ensure_lists(demo_out)
    part("demo", begin)

    begin = time.perf_counter()
    shape = make_shape(config["products"], config["images"], config["types"])
    # The copied model's dimension: a tiny sample build's head has fewer than 128 axes.
    vectors = make_vectors(shape, dimension=int(artifacts.load_manifest(demo_out / demo_version,
                                                                        verify=False)["dimension"]))
    results["abo"] = {**results.get("abo", {}), **shape_summary(shape)}
    part("shape_and_vectors", begin)

    abo_out = work / "abo-artifacts"
    if resume and (abo_out / "abo-shape" / artifacts.MANIFEST).is_file():
        manifest = artifacts.load_manifest(abo_out / "abo-shape", verify=False)
    else:
        begin = time.perf_counter()
        shutil.rmtree(abo_out, ignore_errors=True)
        abo_out.mkdir(parents=True)
        manifest = write_version(abo_out, "abo-shape", shape, vectors, demo_out / demo_version)
        results["abo"]["write_seconds"] = manifest["timings_seconds"]
        results["abo"]["index"] = manifest["index"]
        part("write_version", begin)

    served = "abo-shape"
    found = listed_version(abo_out, "abo-shape") if resume else None
    if found is not None:
        served, listed = found
        if results.get("lists", {}).get("version") != served:
            # The reindex ran beyond a run that was stopped: its own stage times are the figure.
            results["lists"] = {"version": served, "section": listed.get("neighbours"),
                                "stage_seconds": listed.get("timings_seconds"),
                                "seconds": round(sum(listed.get("timings_seconds", {}).values()), 1),
                                "seconds_from": "the manifest's stage times (the run that started it was stopped)"}
        if "recall" not in results["lists"]:
            results["lists"]["recall"] = list_recall(abo_out / served, listed, config["recall_queries"])
    elif "query_lists" in parts:
        begin = time.perf_counter()
        results["reindex_progress"] = reindex_progress(work / "reindex-abo-shape.log")
        queries = query_catalogue(work / "abo-queries", abo_out / "abo-shape", demo_catalogue)
        results["query_lists"] = lists_for_queries(abo_out, "abo-shape", "abo-query-lists", queries)
        served = "abo-query-lists"
        part("query_lists", begin)
    elif "lists" in parts:
        begin = time.perf_counter()
        try:
            served, listed, seconds = reindex(abo_out, "abo-shape", timeout_s=config["reindex_budget_s"])
            results["lists"] = {"version": served, "seconds": round(seconds, 1), "section": listed.get("neighbours"),
                                "stage_seconds": listed.get("timings_seconds")}
            results["lists"]["recall"] = list_recall(abo_out / served, listed, config["recall_queries"])
        except Overrun as overrun:
            # Served without lists then: every by-id query searches, and the figures say so (plans).
            results["lists"] = {"overrun": str(overrun), "budget_s": config["reindex_budget_s"]}
        part("lists", begin)

    full = config["full_serving"]
    results.setdefault("serving", {})
    if {"serving", "workers", "swap"} & set(parts):
        queries = query_catalogue(work / "abo-queries", abo_out / served, demo_catalogue)
        artifacts.write_current(abo_out, served)
    if "serving" in parts:
        begin = time.perf_counter()
        # The quick run's sample build was just served by the rest of make bench-quick.
        results["serving"].update({
            "served_version": served,
            "demo": serving_runs(demo_out, demo_catalogue, config["duration_s"]) if full else None,
            "abo": serving_runs(abo_out, queries, config["duration_s"], full)})
        part("serving", begin)
    if full and "workers" in parts:
        begin = time.perf_counter()
        results["serving"]["workers"] = guarded("workers", lambda: {"demo": workers_memory(demo_out, demo_catalogue),
                                                                    "abo": workers_memory(abo_out, queries)})
        part("workers", begin)
    if served != "abo-shape" and "swap" in parts:
        begin = time.perf_counter()
        if config["swaps"]:
            results["serving"]["swap"] = guarded("swap", swap_pause, abo_out, queries, (served, "abo-shape"),
                                                 config["swaps"])
            artifacts.write_current(abo_out, served)
        results["serving"]["swap_holds"] = guarded("swap_holds", interpreter_holds, abo_out, (served, "abo-shape"),
                                                   max(1, config["swaps"]))
        part("swap", begin)
    if "realism" in parts:
        begin = time.perf_counter()
        abo_search_k = {"rows": len(vectors), "n_trees": manifest["index"]["n_trees"],
                        "search_k": manifest["index"]["search_k"], "recall_at_10": manifest["index"]["recall_at_10"],
                        "seconds": manifest["timings_seconds"]["index"]}
        results["realism"] = guarded("realism", realism, demo_out / demo_version, vectors, shape, abo_search_k, work,
                                     config["recall_queries"])
        part("realism", begin)
    if config["build_products"] and "build" in parts:
        begin = time.perf_counter()
        results["build"] = guarded("build", build_runs, work, shape, vectors, config["build_products"], 100,
                                   config["build_budget_s"])
        part("build", begin)
    results["targets"] = targets(results)
    results["seconds"] = round(previous.get("seconds", 0) + time.perf_counter() - started, 1)
    path.write_text(json.dumps(results, indent=2, default=_plain))
    partial.unlink(missing_ok=True)
    for row in results["targets"]:
        log.info("%s %s: %s (goal %s)", "MET " if row["met"] else "MISS", row["target"], row["measured"], row["goal"])
    log.info("bench scale %s done in %.0f s -> %s", profile, results["seconds"], path)
    return results


def _plain(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few thousand images, for make bench-quick")
    parser.add_argument("--build-products", type=int, default=None,
                        help="products of the real build's catalogue (full: 10,000; ABO's own size needs the time "
                             "and memory a shared 2-core host does not have)")
    parser.add_argument("--no-report", action="store_true", help="leave BENCHMARKS.md as it is")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"the parts to run, of {','.join(PARTS)} (the version of ABO's shape is always there)")
    parser.add_argument("--resume", action="store_true",
                        help="use the version of ABO's shape and its lists from the last run again, keep its results")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    profile = "quick" if args.quick else "full"
    if args.build_products is not None:
        PROFILES[profile]["build_products"] = args.build_products
    parts = tuple(part for part in args.only.split(",") if part)
    unknown = set(parts) - set(PARTS) - set(EXTRA_PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    command = " ".join(["python -m bench.scale", *(sys.argv[1:] if argv is None else argv)])
    results = run(profile, parts=parts, resume=args.resume, command=command)
    if profile == "full" and not args.no_report:
        from bench.report import write_scale_section

        write_scale_section(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
