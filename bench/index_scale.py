"""Annoy against hnswlib at ABO's size: recall@10, query latency, build time, bytes on disk and in memory.

    python -m bench.index_scale                 # 398,212 rows (ABO's small set)
    python -m bench.index_scale --rows 20000    # a smoke size (under a minute)

At full size the builds dominate: 150 Annoy trees and two HNSW graphs; the whole run took 6.5 minutes on this
2-core host at load average 3 to 6, and 25 minutes at 15 to 30 (other engineers' builds and tests beside it).
--trees and --m choose what is built (`--trees 10 20 --m 16` for a shorter run).

The vectors are synthetic (bench/scale.py's generator had not landed when this was written, so a small one
is here): 576 product types drawn with Zipf frequencies, each type a centre, each product a point near its
type's centre, each of its 1 to 4 images a point near its product, on an uneven spectrum (the first axes
carry most of the variance, as a learned head's do). Queries are catalogue rows, as in the builder's own
recall measurement; the truth is exact numpy search over every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from builder.index import build_hnsw_with_recall, build_with_recall, exact_neighbours

log = logging.getLogger("bench.index_scale")
RESULTS = Path(__file__).parent / "results" / "index-scale.json"

ABO_IMAGES, ABO_PRODUCTS, ABO_TYPES = 398_212, 147_702, 576
# Shares of a unit vector's energy: its product type, its product within the type, the image within the
# product. Two products of one type then score about 0.55, two images of one product about 0.9, in the range
# the lda head gives (0.7 type similarity + 0.3 look similarity, BENCHMARKS.md).
TYPE_SHARE, PRODUCT_SHARE, IMAGE_SHARE = 0.55, 0.35, 0.10


def abo_like_vectors(rows: int = ABO_IMAGES, dimension: int = 128, types: int = ABO_TYPES,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors [rows, dimension] (float32) grouped by product, and each row's product."""
    rng = np.random.default_rng(seed)
    products = max(1, round(rows * ABO_PRODUCTS / ABO_IMAGES))
    counts = rng.choice([1, 2, 3, 4], size=products, p=[0.2, 0.2, 0.3, 0.3])
    while (excess := int(counts.sum()) - rows) != 0:  # exactly `rows` images, each product 1 to 4
        movable = np.flatnonzero(counts > 1 if excess > 0 else counts < 4)
        pick = rng.choice(movable, size=min(abs(excess), len(movable)), replace=False)
        counts[pick] -= int(np.sign(excess))
    type_of_product = np.minimum(rng.zipf(1.3, size=products) - 1, types - 1)
    # An uneven spectrum: axis j carries variance proportional to 1 / (j + 1) (effective dimension ~18 of 128).
    scale = (1.0 / np.sqrt(np.arange(1, dimension + 1))).astype(np.float32)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x * scale
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = unit(rng.standard_normal((types, dimension), np.float32))
    looks = unit(rng.standard_normal((products, dimension), np.float32))
    product_vectors = np.sqrt(TYPE_SHARE) * centres[type_of_product] + np.sqrt(PRODUCT_SHARE) * looks
    row_product = np.repeat(np.arange(products), counts)
    vectors = product_vectors[row_product] + np.sqrt(IMAGE_SHARE) * unit(rng.standard_normal((rows, dimension),
                                                                                             np.float32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors, np.float32), row_product


def scale_vectors(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """bench/scale.py's vectors (an lda head's layout, landed after this bench was written), for comparison."""
    from bench.scale import make_shape, make_vectors

    shape = make_shape(max(1, round(rows * ABO_PRODUCTS / ABO_IMAGES)), rows, ABO_TYPES)
    vectors = np.ascontiguousarray(make_vectors(shape), np.float32)
    return vectors, np.repeat(np.arange(len(shape.image_counts)), shape.image_counts)


GENERATORS = {"own": abo_like_vectors, "scale": scale_vectors}


def _recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def _timed(query, queries: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Each query alone, on this thread: results and per-query milliseconds."""
    found, ms = [], np.empty(len(queries))
    for i, vector in enumerate(queries):
        begin = time.perf_counter()
        found.append(np.asarray(query(vector)))
        ms[i] = (time.perf_counter() - begin) * 1000
    return found, ms


def _row(setting: dict, found: list[np.ndarray], ms: np.ndarray, truth: np.ndarray) -> dict:
    return {**setting, "recall_at_10": round(_recall(found, truth), 4), "p50_ms": round(float(np.median(ms)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "mean_ms": round(float(ms.mean()), 4)}


def _resident_after_load(path: Path, dimension: int, rows: int) -> int:
    """What loading the saved index adds to a fresh process's resident memory: a server worker's cost."""
    script = ("import hnswlib, os\n"
              "def rss():\n"
              "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
              "before = rss()\n"
              f"index = hnswlib.Index(space='l2', dim={dimension})\n"
              f"index.load_index({str(path)!r}, max_elements={rows})\n"
              "print(rss() - before)\n")
    return int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)


def measure_annoy(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, work: Path,
                  trees: tuple[int, ...], max_search_k: int, stop_recall: float) -> list[dict]:
    """Per tree count: build seconds (every core), file bytes, then search_k rising by sqrt(2) from 1,000 until
    recall reaches stop_recall or max_search_k; one row per (n_trees, search_k)."""
    from annoy import AnnoyIndex

    rows = []
    for n_trees in trees:
        index = AnnoyIndex(vectors.shape[1], "euclidean")
        index.set_seed(42)
        begin = time.perf_counter()
        for item, vector in enumerate(vectors):
            index.add_item(item, vector)
        index.build(n_trees, n_jobs=-1)
        build_s = time.perf_counter() - begin
        path = work / f"annoy-{n_trees}.ann"
        index.save(str(path))  # saving maps the file: queries below run on the mapped index, as served
        built = {"index": "annoy", "n_trees": n_trees, "build_s": round(build_s, 1), "bytes": path.stat().st_size}
        log.info("annoy n_trees=%d built in %.1f s, %d MB", n_trees, build_s, built["bytes"] >> 20)
        for step in range(64):
            search_k = round(1000 * 2 ** (step / 2))
            if search_k > max_search_k:
                break
            found, ms = _timed(lambda v, s=search_k, i=index: i.get_nns_by_vector(v, 10, search_k=s), queries)
            rows.append(_row({**built, "search_k": search_k}, found, ms, truth))
            log.info("  %s", rows[-1])
            if rows[-1]["recall_at_10"] >= stop_recall:
                break
        index.unload()
        path.unlink()
    return rows


def measure_hnsw(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, work: Path, ms_: tuple[int, ...],
                 ef_construction: int, efs: tuple[int, ...], stop_recall: float) -> list[dict]:
    """Per M: build seconds (every core), file bytes and the resident memory one loaded copy costs (hnswlib
    reads the file into its own memory: every worker holds one), then ef rising until stop_recall."""
    import hnswlib

    rows = []
    for m in ms_:
        index = hnswlib.Index(space="l2", dim=vectors.shape[1])
        index.init_index(max_elements=len(vectors), ef_construction=ef_construction, M=m, random_seed=1)
        begin = time.perf_counter()
        index.add_items(vectors, np.arange(len(vectors)), num_threads=os.cpu_count() or 1)
        build_s = time.perf_counter() - begin
        path = work / f"hnsw-{m}.bin"
        index.save_index(str(path))
        resident = _resident_after_load(path, vectors.shape[1], len(vectors))
        index.set_num_threads(1)
        built = {"index": "hnswlib", "M": m, "ef_construction": ef_construction, "build_s": round(build_s, 1),
                 "bytes": path.stat().st_size, "resident_bytes_per_worker": resident}
        log.info("hnswlib M=%d built in %.1f s, %d MB, %d MB resident", m, build_s, built["bytes"] >> 20,
                 resident >> 20)
        for ef in efs:
            index.set_ef(ef)
            found, ms = _timed(lambda v, i=index: i.knn_query(v, k=10)[0][0], queries)
            rows.append(_row({**built, "ef_search": ef}, found, ms, truth))
            log.info("  %s", rows[-1])
            if rows[-1]["recall_at_10"] >= stop_recall:
                break
        path.unlink()
    return rows


def cheapest(rows: list[dict], target: float) -> list[dict]:
    """Per index setting (n_trees or M), the first query setting that reaches the target recall."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["index"], row.get("n_trees"), row.get("M"))
        if row["recall_at_10"] >= target and key not in best:
            best[key] = row
    return sorted(best.values(), key=lambda row: row["p50_ms"])


def builder_choice(vectors: np.ndarray, work: Path, target_recall: float = 0.95) -> dict:
    """What `lookalike-build build` chooses on these vectors (its manifest's index section), for each index kind."""
    chosen = {}
    for kind, build in (("annoy", lambda: build_with_recall(vectors, str(work / "builder.ann"), 10, target_recall)),
                        ("hnsw", lambda: build_hnsw_with_recall(vectors, str(work / "builder.hnsw"), target_recall))):
        begin = time.perf_counter()
        report = build()
        chosen[kind] = {**report.manifest(f"builder.{kind}"), "seconds": round(time.perf_counter() - begin, 1)}
        log.info("builder's %s: %s", kind, report.reason)
    return chosen


def run(rows: int, query_count: int, trees: tuple[int, ...], ms_: tuple[int, ...], ef_construction: int,
        max_search_k: int, work: Path, generator: str = "own") -> dict:
    begin = time.perf_counter()
    vectors, row_product = GENERATORS[generator](rows)
    log.info("%d vectors of %d products in %.1f s", len(vectors), row_product.max() + 1, time.perf_counter() - begin)
    rng = np.random.default_rng(7)
    queries = vectors[rng.choice(len(vectors), size=min(query_count, len(vectors)), replace=False)]
    begin = time.perf_counter()
    truth = exact_neighbours(vectors, queries, 10)
    exact_batch_ms = (time.perf_counter() - begin) / len(queries) * 1000
    _, exact_ms = _timed(lambda v: exact_neighbours(vectors, v[None, :], 10)[0], queries[:50])
    stop = 0.99
    annoy = measure_annoy(vectors, queries, truth, work, trees, max_search_k, stop)
    hnsw = measure_hnsw(vectors, queries, truth, work, ms_, ef_construction,
                        (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512), stop)
    return {
        "rows": len(vectors), "products": int(row_product.max() + 1), "generator": generator,
        "dimension": int(vectors.shape[1]),
        "queries": len(queries), "vectors_bytes": int(vectors.nbytes),
        "exact": {"p50_ms": round(float(np.median(exact_ms)), 3),
                  "p99_ms": round(float(np.percentile(exact_ms, 99)), 3),
                  "batched_ms_per_query": round(exact_batch_ms, 3)},
        "annoy": annoy, "hnswlib": hnsw,
        "cheapest_at_0.95": cheapest(annoy + hnsw, 0.95), "cheapest_at_0.99": cheapest(annoy + hnsw, 0.99),
        "cpu": os.cpu_count(), "load_average": os.getloadavg(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def markdown(result: dict) -> str:
    """The table of the report: each setting's cheapest query setting reaching 0.95, then 0.99."""
    lines = [f"{result['rows']:,} rows, {result['products']:,} products, {result['dimension']}-d, "
             f"{result['queries']} queries, one thread; exact numpy p50 {result['exact']['p50_ms']} ms",
             "", "| target | index | setting | recall@10 | p50 ms | p99 ms | build s | MB on disk | MB per worker |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for target in ("0.95", "0.99"):
        for row in sorted(result[f"cheapest_at_{target}"], key=lambda r: (r["index"], r.get("n_trees") or r["M"])):
            setting = (f"n_trees={row['n_trees']} search_k={row['search_k']}" if row["index"] == "annoy"
                       else f"M={row['M']} ef={row['ef_search']}")
            per_worker = round(row["resident_bytes_per_worker"] / 2**20) if "resident_bytes_per_worker" in row else \
                "0 (mapped, shared)"
            lines.append(f"| {target} | {row['index']} | {setting} | {row['recall_at_10']} | {row['p50_ms']} | "
                         f"{row['p99_ms']} | {row['build_s']} | {round(row['bytes'] / 2**20)} | {per_worker} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ABO_IMAGES, help="catalogue rows (default: ABO's small set)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--trees", type=int, nargs="*", default=[10, 20, 40, 80])
    parser.add_argument("--m", type=int, nargs="*", default=[16, 32], help="hnswlib M values")
    parser.add_argument("--generator", choices=sorted(GENERATORS), default="own",
                        help="own: this module's vectors; scale: bench/scale.py's")
    parser.add_argument("--builder-choice", action="store_true",
                        help="also run the builder's own choice (Annoy's trees and search_k, HNSW's ef) and record "
                             "its manifest section")
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--max-search-k", type=int, default=128_000,
                        help="the largest Annoy search_k tried (bounds the run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="index-scale-") as work:
        result = run(args.rows, args.queries, tuple(args.trees), tuple(args.m), args.ef_construction,
                     args.max_search_k, Path(work), args.generator)
        if args.builder_choice:
            result["builder_choice"] = builder_choice(GENERATORS[args.generator](args.rows)[0], Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
