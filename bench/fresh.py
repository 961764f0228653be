"""`python -m bench.fresh`: new and changed products served in seconds (issue 19), measured on a built version.

A copy of a built version (the demo's: `--artifacts demo-out/ARTIFACTS --catalogue demo-out/catalogue`) under
bench/work/fresh, so nothing shared is written. Four parts, every load the compiled Go load generator:
1. `lookalike-build add` of 1 (three times), 100 and 1,000 new products under closed-loop FindSimilar-by-product
   load on two replicas of the copy: the command's wall time, and seconds from its return to each replica's first
   answer holding the new product. The new products are copies of catalogue products whose images differ by one
   pixel (new bytes, so `add` embeds them and writes their features to the cache), so the source product's
   FindSimilar names its copy among its 10 once the delta is served.
2. FindSimilar by product id with 0, 1,000, 2,000 and --max-delta-rows (10,000) delta rows, one server each, the
   result cache off, rounds alternating between them. Those deltas are written directly (lookalike/deltas.py), the
   version's own vectors with a little noise under new ids: nothing embedded.
3. The next build of the catalogue with part 1's files, from the same feature cache: how many images it embeds.
Writes bench/results/fresh.json and BENCHMARKS.md's fresh-products section.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lookalike import artifacts, deltas, tables

log = logging.getLogger("bench.fresh")
ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "fresh"
RESULTS = ROOT / "bench" / "results"
K = 10
POLL_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 900.0
LATENCY_ROWS = (0, 1000, 2000, deltas.DEFAULT_MAX_DELTA_ROWS)
# Relative noise on the version's vectors when deltas are written directly: near their originals, not equal to them.
DIRECT_NOISE = 0.1


def _env() -> dict:
    """This checkout's code for every child (the console scripts' editable install may point at another)."""
    return dict(os.environ, PYTHONPATH=str(ROOT), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
                TF_CPP_MIN_LOG_LEVEL="2")


def _builder(*args, timeout_s: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder.cli", "--log-level", "WARNING", *map(str, args)],
                          check=True, env=_env(), capture_output=True, text=True, timeout=timeout_s)


def _json_out(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


# -- pure helpers (tests/test_bench_fresh.py) -----------------------------------------------------------------------


def take_products(image_counts: list[int], rows: int) -> list[tuple[int, int]]:
    """(product row, images taken) going round the products in order until exactly `rows` image rows are taken; the
    last product may give only its first images (its main image first)."""
    if rows < 0 or (rows and not any(count > 0 for count in image_counts)):
        raise ValueError(f"cannot take {rows} rows from products of {image_counts[:5]}... images")
    taken, left, product = [], rows, 0
    while left:
        count = min(image_counts[product % len(image_counts)], left)
        if count:
            taken.append((product % len(image_counts), count))
            left -= count
        product += 1
    return taken


def merge_reports(reports: list[dict]) -> dict:
    """Load generator reports of back-to-back runs as one: requests, answers by code, failed (not OK)."""
    codes: dict[str, int] = {}
    for report in reports:
        for code, count in report.get("codes", {}).items():
            codes[code] = codes.get(code, 0) + count
    requests = sum(codes.values())
    return {"runs": len(reports), "requests": requests, "codes": dict(sorted(codes.items())),
            "failed": requests - codes.get("OK", 0)}


def median_of_rounds(runs: list[dict]) -> dict:
    """The median of each figure over a configuration's rounds."""
    keys = ("qps", "p50_ms", "p99_ms")
    return {key: round(statistics.median(run[key] for run in runs), 2) for key in keys}


# -- the copy, the products to add ----------------------------------------------------------------------------------


def copy_version(source: Path, out: Path, with_cache: bool) -> str:
    """CURRENT's version of `source` (and its feature cache) copied to `out`, without deltas, leases or other
    versions: this bench's adds, deltas and build write only there."""
    version = artifacts.read_current(source)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(source / version, out / version)
    if with_cache and (source / ".features").is_dir():
        shutil.copytree(source / ".features", out / ".features")
    artifacts.write_current(out, version)
    return version


def read_catalogue(catalogue: Path) -> pd.DataFrame:
    """The catalogue's products: product_id, product_type, image ids (main first) and their paths under small/."""
    with gzip.open(catalogue / "images.csv.gz", "rt") as handle:
        paths = {row["image_id"]: row["path"] for row in csv.DictReader(handle)}
    rows = []
    for part in sorted((catalogue / "listings" / "metadata").glob("listings_*.json.gz")):
        with gzip.open(part, "rt") as handle:
            for line in handle:
                listing = json.loads(line)
                images = [listing["main_image_id"], *(listing.get("other_image_id") or [])]
                kinds = listing.get("product_type") or [{}]
                rows.append({"product_id": listing["item_id"], "product_type": kinds[0].get("value"),
                             "image_ids": images, "paths": [paths[i] for i in images]})
    return pd.DataFrame(rows)


def one_pixel_changed(data: bytes, variant: int) -> bytes:
    """The image with one pixel (chosen by variant) changed by one grey level: new bytes, the same look."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("L") if image.mode not in ("L", "RGB") else image.copy()
    x, y = variant % image.width, (variant // image.width) % image.height
    value = image.getpixel((x, y))
    image.putpixel((x, y), tuple(v ^ 1 for v in value) if isinstance(value, tuple) else value ^ 1)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make_products(catalogue: Path, products: pd.DataFrame, folder: Path, count: int, variant: int) -> list[dict]:
    """`count` new products in `folder` (small/<files>, products.csv, labels.csv), each a copy of a catalogue
    product (all its images, one pixel changed); returns them with their source products."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "small").mkdir(parents=True)
    labels = pd.read_csv(catalogue / "labels.csv", dtype=str).set_index("image_id")
    picked = products.sample(n=count, random_state=variant, replace=False)
    made, csv_rows, label_rows = [], [], []
    for source in picked.itertuples():
        product_id = f"fresh{variant}-{source.product_id}"
        images = []
        for position, (image_id, path) in enumerate(zip(source.image_ids, source.paths, strict=True)):
            new_id = f"fresh{variant}-{image_id}"
            data = one_pixel_changed((catalogue / "small" / path).read_bytes(), variant)
            (folder / "small" / f"{new_id}.png").write_bytes(data)
            images.append({"image_id": new_id, "file": f"{new_id}.png"})
            csv_rows.append({"product_id": product_id, "image_id": new_id, "role": "main" if position == 0 else
                             "other", "product_type": source.product_type})
            if image_id in labels.index:
                label_rows.append({"image_id": new_id, **labels.loc[image_id].to_dict()})
        made.append({"product_id": product_id, "source_product_id": source.product_id,
                     "product_type": source.product_type, "images": images})
    pd.DataFrame(csv_rows).to_csv(folder / "products.csv", index=False)
    pd.DataFrame(label_rows).to_csv(folder / "labels.csv", index=False)
    return made


# -- part 1: adds under load on two replicas ------------------------------------------------------------------------


def loadgen_run(loadgen: Path, address: str, catalogue: Path, mix: str, duration_s: float, concurrency: int,
                connections: int = 4) -> dict:
    result = subprocess.run([str(loadgen), "--address", address, "--catalogue", str(catalogue), "--mix", mix,
                             "--duration", f"{duration_s}s", "--concurrency", str(concurrency), "--connections",
                             str(connections), "--json"], capture_output=True, text=True, timeout=duration_s + 120)
    if result.returncode != 0:
        raise RuntimeError(f"lookalike-loadgen failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


class ChunkedLoad:
    """Closed-loop FindSimilar by product on each address, in back-to-back load generator runs of chunk_s, until the
    block ends (and never past max_s): the Go load generator reports only when a run ends."""

    def __init__(self, loadgen: Path, addresses: list[str], catalogue: Path, concurrency: int, chunk_s: float = 2.0,
                 max_s: float = STEP_TIMEOUT_S) -> None:
        self.reports: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(loadgen, address, catalogue, concurrency, chunk_s,
                                                                  max_s), daemon=True) for address in addresses]

    def _run(self, loadgen: Path, address: str, catalogue: Path, concurrency: int, chunk_s: float,
             max_s: float) -> None:
        stop_at = time.monotonic() + max_s
        while not self._stop.is_set() and time.monotonic() < stop_at:
            try:
                self.reports.append(loadgen_run(loadgen, address, catalogue, "product=1", chunk_s, concurrency))
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as error:
                self.errors.append(str(error))
                return

    def __enter__(self) -> ChunkedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def _first_answer_with(address: str, query_product: str, wanted: str, stop: threading.Event, into: dict) -> None:
    """The perf_counter time of the first FindSimilar(query_product) answer naming `wanted` (a call every 20 ms, each
    answer's time taken when it arrived), with the answer's delta_sequence and plan."""
    import grpc

    from lookalike.v1 import lookalike_pb2 as pb
    from lookalike.v1 import lookalike_pb2_grpc as rpc

    with grpc.insecure_channel(address) as channel:
        stub = rpc.ImageSimilarityStub(channel)
        into.update(polls=0, poll_errors=0)
        while not stop.is_set():
            into["polls"] += 1
            try:
                answer = stub.FindSimilar(pb.FindSimilarRequest(product_id=query_product, k=K), timeout=10)
            except grpc.RpcError:
                into["poll_errors"] += 1
            else:
                if wanted in {match.product_id for match in answer.matches}:
                    into.update(at=time.perf_counter(), delta_sequence=answer.delta_sequence, plan=answer.plan)
                    return
            time.sleep(0.02)


def _published_at(folder: Path, sequence: int, stop: threading.Event, into: dict) -> None:
    """The perf_counter time the delta's folder appeared (its rename), seen by listing every 5 ms."""
    name = deltas.sequence_name(sequence)
    while not stop.is_set():
        if name in (os.listdir(folder) if folder.is_dir() else ()):
            into["at"] = time.perf_counter()
            return
        time.sleep(0.005)


def add_and_wait(out: Path, folder: Path, made: list[dict], addresses: list[str]) -> dict:
    """`lookalike-build add` of the folder while each replica is polled (from the start) for the first new product:
    seconds from the delta's rename and from the command's return to each replica's first answer naming it."""
    version = artifacts.read_current(out)
    sequence = len(deltas.list_deltas(out, version)) + 1
    stop = threading.Event()
    published: dict = {}
    seen: list[dict] = [{} for _ in addresses]
    watchers = [threading.Thread(target=_published_at, args=(deltas.deltas_dir(out, version), sequence, stop,
                                                              published))]
    watchers += [threading.Thread(target=_first_answer_with, args=(address, made[0]["source_product_id"],
                                                                   made[0]["product_id"], stop, into))
                 for address, into in zip(addresses, seen, strict=True)]
    for watcher in watchers:
        watcher.start()
    try:
        begin = time.perf_counter()
        result = _builder("add", "--out", out, "--images", folder, "--feature-cache", out / ".features", "--json")
        returned = time.perf_counter()
        manifest = _json_out(result.stdout)
        deadline = returned + POLL_TIMEOUT_S
        while any("at" not in into for into in (published, *seen)) and time.perf_counter() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for watcher in watchers:
            watcher.join(30)
    if manifest["sequence"] != sequence:
        raise RuntimeError(f"add published delta {manifest['sequence']}, not {sequence}")

    def since(start: float | None, replica: dict) -> float | None:
        return None if start is None or "at" not in replica else round(replica["at"] - start, 3)

    return {"products": len(made), "images": manifest["counts"]["images"], "sequence": sequence,
            "add_wall_s": round(returned - begin, 2), "add_own_seconds": manifest["seconds"],
            "published_after_start_s": since(begin, published), "returned_after_publish_s": since(
                published.get("at"), {"at": returned}),
            "embedded": manifest["embedding"]["embedded"], "features_cached": manifest["embedding"]["features_cached"],
            "visible_after_publish_s": [since(published.get("at"), replica) for replica in seen],
            "visible_after_return_s": [since(returned, replica) for replica in seen],
            "replicas": [{k: v for k, v in replica.items() if k != "at"} for replica in seen]}


def adds_under_load(out: Path, catalogue: Path, loadgen: Path, sizes: list[int], watch_interval_s: float,
                    concurrency: int) -> tuple[list[dict], dict, list[dict]]:
    """Part 1. Returns (one row per add, the load's merged report, every product made, for the next build)."""
    from bench.serving import server

    products = read_catalogue(catalogue)
    folders = [(WORK / f"add-{n}-{size}", size, n) for n, size in enumerate(sizes)]
    made = [make_products(catalogue, products, folder, size, n) for folder, size, n in folders]
    flags = ("--watch-interval-s", str(watch_interval_s))
    rows = []
    with server(out, *flags) as (first, _, _), server(out, *flags) as (second, _, _):
        addresses = [first, second]
        for address in addresses:
            loadgen_run(loadgen, address, catalogue, "product=1", 1.0, 2)  # warm connections and the result cache
        with ChunkedLoad(loadgen, addresses, catalogue, concurrency) as load:
            time.sleep(1.0)
            for (folder, size, n), products_made in zip(folders, made, strict=True):
                log.info("add %d: %d products", n, size)
                rows.append(add_and_wait(out, folder, products_made, addresses))
                log.info("add %d: %s", n, {k: v for k, v in rows[-1].items() if k != "replicas"})
            time.sleep(1.0)
        info = [_info(address) for address in addresses]
    if load.errors:
        raise RuntimeError(f"the load generator failed: {load.errors[0]}")
    return rows, {**merge_reports(load.reports), "concurrency_per_replica": concurrency, "replicas_info": info}, made


def _info(address: str) -> dict:
    import grpc

    from lookalike.v1 import lookalike_pb2 as pb
    from lookalike.v1 import lookalike_pb2_grpc as rpc

    with grpc.insecure_channel(address) as channel:
        found = rpc.ImageSimilarityStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    return {"version": found.version, "delta_sequence": found.delta_sequence,
            "delta_product_count": found.delta_product_count, "delta_image_count": found.delta_image_count}


# -- part 2: serving cost of the delta rows -------------------------------------------------------------------------


def write_direct_delta(out: Path, rows: int, seed: int = 0) -> int:
    """A delta of exactly `rows` image rows written without embedding: the version's products over and over under new
    ids, their vectors with DIRECT_NOISE relative noise (renormalised). Returns its sequence."""
    version = artifacts.read_current(out)
    version_dir = out / version
    manifest = artifacts.load_manifest(version_dir, verify=False)
    keys = list(manifest.get("attribute_keys", []))
    images = tables.read_images(version_dir / artifacts.IMAGES_FILE).to_pandas()
    products = tables.read_products(version_dir / artifacts.PRODUCTS_FILE, keys).to_pandas()
    vectors = np.load(version_dir / artifacts.VECTORS_FILE)
    picked = take_products(products["image_count"].tolist(), rows)
    image_rows, product_rows = [], []
    copies: dict[int, int] = {}
    for product_row, (source, count) in enumerate(picked):
        product = products.iloc[source]
        copy = copies[source] = copies.get(source, -1) + 1
        first = int(product["first_row"])
        taken = images.iloc[first:first + count]
        product_rows.append({**product.to_dict(), "product_row": product_row, "product_id":
                             f"direct{copy}-{product['product_id']}", "main_image_id":
                             f"direct{copy}-{product['main_image_id']}", "first_row": len(image_rows),
                             "image_count": count})
        for image in taken.to_dict("records"):
            image_rows.append({**image, "row": len(image_rows), "product_row": product_row,
                               "image_id": f"direct{copy}-{image['image_id']}",
                               "product_id": f"direct{copy}-{product['product_id']}"})
    sources = np.concatenate([np.arange(int(products.iloc[s]["first_row"]), int(products.iloc[s]["first_row"]) + c)
                              for s, c in picked])
    rng = np.random.default_rng(seed)
    noisy = vectors[sources] + rng.normal(0, DIRECT_NOISE / np.sqrt(vectors.shape[1]), (rows, vectors.shape[1]))
    noisy = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    staging = deltas.staging_folder(out, version)
    image_table = pd.DataFrame(image_rows)
    tables.write_table(staging / artifacts.IMAGES_FILE, {c: image_table[c].tolist() for c in tables.IMAGE_COLUMNS},
                       tables.IMAGES_SCHEMA)
    product_table = pd.DataFrame(product_rows)
    tables.write_table(staging / artifacts.PRODUCTS_FILE,
                       {c: product_table[c].tolist() for c in (*tables.PRODUCT_COLUMNS, *keys)},
                       tables.products_schema(keys))
    np.save(staging / artifacts.VECTORS_FILE, noisy, allow_pickle=False)
    delta_manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "catalogue_root": manifest["catalogue_root"], "image_folder": manifest.get("image_folder", "small"),
        "model_of_version": version, "preprocessing": manifest["preprocessing"], "dimension": int(noisy.shape[1]),
        "counts": {"products": len(product_rows), "images": rows, "replaced_products": 0, "dropped": 0},
        "attribute_keys": keys, "attribute_keys_not_served": [],
        "written_directly": "bench/fresh.py: the version's vectors with noise under new ids, nothing embedded"}
    return deltas.publish_delta(out, version, staging, delta_manifest, deltas.DEFAULT_MAX_DELTA_ROWS)[0]


def latency_by_delta_rows(source: Path, catalogue: Path, loadgen: Path, rows_list: tuple[int, ...], rounds: int,
                          duration_s: float, concurrency: int) -> dict:
    """Part 2: one copy and one server per delta size (result cache off), the load alternating between them."""
    from bench.scale import plans
    from bench.serving import server

    outs = {}
    for rows in rows_list:
        out = WORK / f"latency-{rows}" / "ARTIFACTS"
        copy_version(source, out, with_cache=False)
        if rows:
            write_direct_delta(out, rows)
        outs[rows] = out
    runs: dict[int, list[dict]] = {rows: [] for rows in rows_list}
    found: dict = {}
    with contextlib.ExitStack() as stack:
        servers = {rows: stack.enter_context(server(out, "--result-cache-size", "0")) for rows, out in outs.items()}
        for rows, (address, _, _) in servers.items():
            loadgen_run(loadgen, address, catalogue, "product=1", 1.0, concurrency)  # warm
            found[rows] = {"info": _info(address)}
        for round_ in range(rounds):
            order = list(rows_list[round_ % len(rows_list):] + rows_list[:round_ % len(rows_list)])
            for rows in order:
                report = loadgen_run(loadgen, servers[rows][0], catalogue, "product=1", duration_s, concurrency)
                stats = report["latency"]["product"]
                runs[rows].append({"qps": report["qps"], "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
                                   "codes": report["codes"]})
                log.info("latency round %d, %d delta rows: %s", round_, rows, runs[rows][-1])
        for rows, (_, metrics_port, _) in servers.items():
            found[rows]["plans"] = plans(metrics_port)
    return {"rounds": rounds, "duration_s": duration_s, "concurrency": concurrency,
            "by_delta_rows": {str(rows): {**found[rows], "runs": runs[rows], "median": median_of_rounds(runs[rows]),
                                          "failed": merge_reports(runs[rows])["failed"]} for rows in rows_list}}


# -- part 3: the next build -----------------------------------------------------------------------------------------


def catalogue_with(catalogue: Path, made: list[list[dict]], folders: list[Path], into: Path) -> int:
    """A copy of the catalogue holding the added products' files (small/fresh/), images.csv.gz rows, listings and
    labels, as the next build would see them; returns how many images were added."""
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(catalogue, into)
    (into / "small" / "fresh").mkdir()
    image_rows, listings, label_frames = [], [], []
    for products, folder in zip(made, folders, strict=True):
        for product in products:
            for image in product["images"]:
                shutil.copy2(folder / "small" / image["file"], into / "small" / "fresh" / image["file"])
                with Image.open(folder / "small" / image["file"]) as opened:
                    image_rows.append(f"{image['image_id']},{opened.height},{opened.width},fresh/{image['file']}")
            ids = [image["image_id"] for image in product["images"]]
            listings.append({"item_id": product["product_id"], "main_image_id": ids[0], "other_image_id": ids[1:],
                             "product_type": [{"value": product["product_type"]}]})
        label_frames.append(pd.read_csv(folder / "labels.csv", dtype=str))
    with gzip.open(into / "images.csv.gz", "rt") as handle:
        text = handle.read().rstrip("\n")
    with gzip.open(into / "images.csv.gz", "wt") as handle:
        handle.write(text + "\n" + "\n".join(image_rows) + "\n")
    with gzip.open(into / "listings" / "metadata" / "listings_fresh.json.gz", "wt") as handle:
        handle.writelines(json.dumps(listing) + "\n" for listing in listings)
    labels = pd.concat([pd.read_csv(into / "labels.csv", dtype=str), *label_frames])
    labels.to_csv(into / "labels.csv", index=False)
    return len(image_rows)


def next_build(out: Path, catalogue: Path, made: list[list[dict]], folders: list[Path]) -> dict:
    """Part 3: a real build of the catalogue plus the added files, with the model of the served version (its
    manifest's backbone, preprocessing, pooling, mirror) and the feature cache `add` wrote to."""
    version = artifacts.read_current(out)
    manifest = artifacts.load_manifest(out / version, verify=False)
    rebuilt_catalogue = WORK / "catalogue"
    added = catalogue_with(catalogue, made, folders, rebuilt_catalogue)
    name = f"fresh-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    begin = time.perf_counter()
    result = _builder("build", "--images", rebuilt_catalogue, "--out", out, "--feature-cache", out / ".features",
                      "--version", name, "--backbone", manifest["backbone"], "--preprocessing",
                      manifest["preprocessing"], "--pooling", manifest["pooling"],
                      "--mirror" if manifest["mirror"] else "--no-mirror", "--nice", "0", "--json")
    seconds = time.perf_counter() - begin
    built = _json_out(result.stdout)
    return {"version": name, "seconds": round(seconds, 1), "images_added": added,
            "images_indexed": built["counts"]["images_indexed"], "embedded": built["embedding"]["embedded"],
            "from_cache": built["embedding"]["from_cache"], "model_key": built["embedding"]["model_key"],
            "served_model_key": manifest["embedding"]["model_key"], "decoded": built["scan"]["decoded"],
            "stage_seconds": built["timings_seconds"]}


# -- the run and its section ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "ARTIFACTS"
    version = copy_version(args.artifacts, out, with_cache=True)
    manifest = artifacts.load_manifest(out / version, verify=False)
    result: dict = {
        "command": "python -m bench.fresh " + " ".join(sys.argv[1:]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "version": version,
        "catalogue": {"products": manifest["counts"]["products"], "images": manifest["counts"]["images_indexed"]},
        "machine": {"cores": os.cpu_count(), "load_average_at_start": [round(v, 1) for v in load_before]},
        "watch_interval_s": args.watch_interval_s}
    rows, load, made = adds_under_load(out, args.catalogue, args.loadgen, args.sizes, args.watch_interval_s,
                                       args.concurrency)
    result.update(adds=rows, load_during_adds=load)
    result["latency"] = latency_by_delta_rows(args.artifacts, args.catalogue, args.loadgen, LATENCY_ROWS,
                                              args.rounds, args.duration_s, args.concurrency)
    folders = [WORK / f"add-{n}-{size}" for n, size in enumerate(args.sizes)]
    result["next_build"] = next_build(out, args.catalogue, made, folders)
    result["machine"]["load_average_at_end"] = [round(v, 1) for v in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


FRESH_BEGIN = "<!-- fresh products section: written by make bench-fresh (bench/fresh.py) -->"
FRESH_END = "<!-- end of the fresh products section -->"


def _pair(values: list[float | None]) -> str:
    return ", ".join("-" if value is None else f"{value:g}" for value in values)


def section(result: dict) -> list[str]:
    """BENCHMARKS.md's lines for a run."""
    from bench.report import _table

    catalogue, load = result["catalogue"], result["load_during_adds"]
    adds = [[row["products"], row["images"], row["add_wall_s"], row["published_after_start_s"], row["embedded"],
             row["features_cached"], _pair(row["visible_after_publish_s"]), _pair(row["visible_after_return_s"])]
            for row in result["adds"]]
    poll_errors = sum(replica.get("poll_errors", 0) for row in result["adds"] for replica in row["replicas"])
    latency = result["latency"]
    rows = []
    none = latency["by_delta_rows"]["0"]["median"]
    for count, found in latency["by_delta_rows"].items():
        median, plans_ = found["median"], found.get("plans", {})
        rows.append([f"{int(count):,}", median["qps"], median["p50_ms"], median["p99_ms"],
                     f"{median['p50_ms'] / none['p50_ms']:.2f}x, {median['p99_ms'] / none['p99_ms']:.2f}x",
                     ", ".join(f"{run['p99_ms']:g}" for run in found["runs"]),
                     ", ".join(f"{k} {v:,}" for k, v in sorted(plans_.items())) or "-", found["failed"]])
    build = result["next_build"]
    load_average = result["machine"]
    return [FRESH_BEGIN, "## New products in seconds", "",
            f"`{result['command']}` on a copy of the demo's build ({catalogue['products']:,} products, "
            f"{catalogue['images']:,} images; raw figures: `bench/results/fresh.json`), {result['seconds']:.0f} s in "
            f"all, on {load_average['cores']} cores shared with other work (load average "
            f"{load_average['load_average_at_start'][0]} at the start, {load_average['load_average_at_end'][0]} at "
            "the end), so every time is noisy.", "",
            "`lookalike-build add` of new products (copies of catalogue products, every image one pixel changed: new "
            "bytes, the same look) while two replicas of the same ARTIFACTS (default settings, `--watch-interval-s "
            f"{result['watch_interval_s']:g}`) each serve closed-loop FindSimilar by product id from the compiled "
            f"load generator ({load['concurrency_per_replica']} callers each, in back-to-back 2 s runs). Wall: the "
            "command, its Python and TensorFlow start-up and exit included; published: from its start to the "
            "delta's rename (seen by listing the folder every 5 ms); embedded: images run through the version's "
            "model (and its trunk, for the feature cache). Visible: seconds to each replica's first answer naming "
            "the new product, to the source product's FindSimilar called every 20 ms from the command's start, "
            "counted from the rename and from the command's return (negative: before it returned).", "",
            _table(["products", "images", "add wall s", "published s", "embedded", "features cached",
                    "visible after the rename, replica 1, 2 (s)", "after the return (s)"], adds), "",
            f"Failed requests under that load: **{load['failed']}** of {load['requests']:,} "
            f"({', '.join(f'{k} {v:,}' for k, v in load['codes'].items())}); failed polls: {poll_errors}.", "",
            f"FindSimilar by product id (k = {K}, result cache off, so every call searches) with the version's "
            "neighbour lists and 0, 1,000, 2,000 and --max-delta-rows delta rows: one server each, closed loop with "
            f"{latency['concurrency']} callers, {latency['duration_s']:g} s a run, the median of {latency['rounds']} "
            "rounds that alternate between them. These deltas were written directly (bench/fresh.py "
            "write_direct_delta: the version's own vectors with a little noise under new product ids), not embedded. "
            "Up to 1,024 delta rows (server/core.py MAX_LOOP_FRESH_ROWS) the answer stays on the event loop; past it, "
            "it goes to the index pool.", "",
            _table(["delta rows", "QPS", "p50 ms", "p99 ms", "p50, p99 against none", "p99 ms by round", "plans",
                    "failed"], rows), "",
            f"The next build (`lookalike-build build` of the catalogue plus the {build['images_added']:,} added "
            f"images, the served version's model and the feature cache `add` wrote to): **{build['embedded']} "
            f"embedded**, {build['from_cache']:,} from the cache, {build['decoded']:,} files decoded, "
            f"{build['images_indexed']:,} images indexed, {build['seconds']:.0f} s.",
            FRESH_END]


def write_section(result: dict, path: Path = ROOT / "BENCHMARKS.md") -> None:
    from bench.report import put_section

    # After "A living catalogue", where a full run puts it (bench/report.py).
    put_section(path, FRESH_BEGIN, FRESH_END, section(result), "\n## Serving\n")


def main(argv: list[str] | None = None) -> int:
    from bench.serving import LOADGEN

    parser = argparse.ArgumentParser(prog="bench.fresh", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, help="a built ARTIFACTS folder (read only: it is copied)")
    parser.add_argument("--catalogue", type=Path, help="the catalogue it was built from")
    parser.add_argument("--sizes", type=lambda text: [int(v) for v in text.split(",")], default=[1, 1, 1, 100, 1000],
                        help="products of each add, in order")
    parser.add_argument("--watch-interval-s", type=float, default=2.0, help="the replicas' (the server's default)")
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop callers per server")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds per delta size")
    parser.add_argument("--duration-s", type=float, default=8.0, help="seconds of each latency run")
    parser.add_argument("--loadgen", type=Path, default=LOADGEN, help="lookalike-loadgen (make clients builds it)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fresh.json")
    parser.add_argument("--report-only", action="store_true", help="write the section from --out again")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    if args.report_only:
        result = json.loads(args.out.read_text())
    else:
        if args.artifacts is None or args.catalogue is None:
            parser.error("--artifacts and --catalogue are required (unless --report-only)")
        if not args.loadgen.exists():
            parser.error(f"{args.loadgen} does not exist: make clients builds it")
        result = run(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    write_section(result)
    print("\n".join(section(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
