"""`make bench` / `make bench-quick`: measure quality, index, serving and builder side by side in one run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench import filters, index_bench, living, products, quality, serving
from lookalike import artifacts

log = logging.getLogger("bench")
HERE = Path(__file__).parent
RESULTS = HERE / "results"
WORK = HERE / "work"

PROFILES = {
    # A smoke run for `make test`: every measurement's code on the least data that exercises it (its figures
    # mean little); the full profile is what BENCHMARKS.md reports.
    "quick": {"catalogue": 100, "queries": 40, "backbones": ["efficientnet_lite0"], "mirror_backbones": [],
              "colour_set": False,
              "build_products": 40, "concurrencies": [1, 8], "duration_s": 0.5,
              "in_process_batch_sizes": [1, 8], "in_process_images": 32, "product_queries": 30,
              "filter_queries": 20, "living_images": 80, "hide_rounds": 1, "workers_duration_s": 0.5,
              "living_change": [8, 4], "living_window_s": 1.0, "worker_counts": [2]},
    "full": {"catalogue": 10000, "queries": 2000, "backbones": ["efficientnet_lite0", "efficientnet_lite2"],
             "mirror_backbones": ["efficientnet_lite0"], "colour_set": True, "build_products": 5000,
             "concurrencies": [1, 8, 32],
             "duration_s": 8.0, "in_process_batch_sizes": [1, 8, 16, 32, 64], "in_process_images": 256,
             "product_queries": 500, "filter_queries": 300, "living_images": 10000, "hide_rounds": 5,
             "workers_duration_s": 8.0,
             "living_change": [living.ADDED, living.REMOVED]},
}


# The default build (avg pooling, --head auto) must serve exactly what it indexed: the session build of the
# tests is GeM + lda, so this is where the defaults' export is checked end to end.
SERVED_AS_BUILT_COSINE = 0.999


def _build(products: int, work: Path) -> tuple[Path, Path, dict, float]:
    """The real builder CLI end to end on the sample; returns (catalogue, artifacts, manifest, seconds)."""
    catalogue, out = work / f"catalogue-{products}-products", work / f"artifacts-{products}-products"
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
    binary = Path(sys.executable).parent / "lookalike-build"
    if not (catalogue / "images.csv.gz").exists():
        subprocess.run([binary, "sample", "fashion-mnist", "--out", catalogue, "--limit", str(products)],
                       check=True, env=env, capture_output=True)
    # A fresh work folder each run: the builder figure must not be a resumed build.
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".features", ignore_errors=True)
    version = f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    begin = time.perf_counter()
    subprocess.run([binary, "--log-level", "WARNING", "build", "--images", catalogue, "--out", out, "--version",
                    version, ], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - begin
    manifest = artifacts.load_manifest(out / version, verify=False)
    return catalogue, out, manifest, seconds


def measured_artifacts(doc: str | None, products: int, queries: int, argv: list[str] | None) -> argparse.Namespace:
    """A stand-alone measurement's command line: --artifacts to measure (else the sample of --products, built in
    bench/work) and --queries; args.artifacts is the folder either way."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--artifacts", type=Path, help="an ARTIFACTS folder to measure (default: build the sample)")
    parser.add_argument("--products", type=int, default=products, help="products of the sample to build")
    parser.add_argument("--queries", type=int, default=queries)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    if args.artifacts is None:
        WORK.mkdir(parents=True, exist_ok=True)
        args.artifacts = _build(args.products, WORK)[1]
    return args


def targets(results: dict) -> list[dict]:
    limit = results["in_process"]["limit_images_per_s"]
    embed = results["server"]["embed"]
    top = max(results["config"]["concurrencies"])
    rows = []

    def add(name, value, goal, passed):
        rows.append({"target": name, "measured": value, "goal": goal, "met": bool(passed)})

    ratio = embed[f"batching@{top}"]["qps"] / limit
    add(f"server Embed throughput at concurrency {top} / in-process limit", round(ratio, 3), ">= 0.85", ratio >= 0.85)
    ratio = embed[f"batching@{top}"]["qps"] / max(embed[f"no_batching@{top}"]["qps"], 1e-9)
    add(f"batching / no batching throughput at concurrency {top}", round(ratio, 3), ">= 1.8", ratio >= 1.8)
    ratio = embed["batching@1"]["p50_ms"] / results["in_process"]["single_image_latency_ms"]
    add("Embed p50 at concurrency 1 / in-process single-image latency", round(ratio, 3), "<= 1.25", ratio <= 1.25)
    for query, key in (("image id", "find_by_id"), ("product id", "find_by_product")):
        for concurrency, by_id in results["server"][key].items():
            both = by_id["p99_ms"] <= 3 and by_id["qps"] >= 1500
            add(f"FindSimilar by {query} at concurrency {concurrency}: p99 ms / QPS",
                f"{by_id['p99_ms']} / {by_id['qps']}", "<= 3 and >= 1500", both)
    for row in results["filters"]["rows"]:
        if row["method"] == "served plans":
            complete = row["returned_of_10"] == row["possible_of_10"] and row["recall_at_10"] >= 0.95
            add(f"filtered FindSimilar at {row['selectivity']} selectivity: results / possible, recall@10",
                f"{row['returned_of_10']} / {row['possible_of_10']}, {row['recall_at_10']}", "all, >= 0.95", complete)
    as_built = results["in_process"].get("served_as_built") or {}
    if as_built.get("rows"):
        add(f"the default build ({as_built['pooling']} / {as_built['head']}): its SavedModel on {as_built['rows']} "
            "indexed images / their stored vectors, smallest cosine", as_built["min_cosine"],
            f">= {SERVED_AS_BUILT_COSINE}", as_built["min_cosine"] >= SERVED_AS_BUILT_COSINE)
    add("index recall@10 at the served search_k", results["build"]["recall_at_10"], ">= 0.95",
        results["build"]["recall_at_10"] >= 0.95)
    rebuild = results["living"]
    added, removed = rebuild["rebuild"]["added"], rebuild["rebuild"]["removed"]
    add(f"rebuild after +{added}/-{removed} of {rebuild['images']} images / full build",
        rebuild["rebuild_over_full"], "<= 0.25", rebuild["rebuild_over_full"] <= 0.25)
    add("images embedded by that rebuild", rebuild["rebuild"]["embedded"], f"== {added}",
        rebuild["rebuild"]["embedded"] == added)
    add("hide to effect under load: failed requests", rebuild["hide"]["failed_requests"], "== 0",
        rebuild["hide"]["failed_requests"] == 0)
    ratio = results["build"]["embed_images_per_s"] / limit
    add("builder embedding stage (Spark) / in-process limit", round(ratio, 3), ">= 0.7", ratio >= 0.7)
    by_workers = results["workers"]["by_workers"]
    for count, row in by_workers.items():
        ratio = row["product"]["qps"] / max(row["info"]["qps"], 1e-9)
        add(f"--workers {count}: FindSimilar by product QPS / GetInfo ceiling (compiled load generator)",
            round(ratio, 3), ">= 0.8", ratio >= 0.8)
        p99 = row["product_open_50"]["p99_ms"]
        add(f"--workers {count}: by-product p99 ms, open loop at 50% of the closed-loop maximum", p99, "<= 2",
            p99 is not None and p99 <= 2)
    if 1 in by_workers and 2 in by_workers:
        ratio = by_workers[2]["product"]["qps"] / max(by_workers[1]["product"]["qps"], 1e-9)
        add("by-product QPS, 2 workers / 1 worker", round(ratio, 3), ">= 1.3", ratio >= 1.3)
    fashion = results["quality"]["sets"]["fashion-mnist"]
    floor = fashion["raw_pixel_floor"]["precision_at_10"]
    size = f"{fashion['catalogue_size']} / {fashion['query_count']}"
    for kind, goal in (("unsupervised", 0.83), ("supervised", 0.88)):
        best = fashion[f"best_{kind}"]
        add(f"Fashion-MNIST precision@10 ({size}), best {kind} build: {quality.describe(best)}",
            best["precision_at_10"], f">= {goal}", best["precision_at_10"] >= goal)
    default = fashion.get("default")
    if default is not None:
        add(f"precision@10 of the default build ({quality.describe(default)}) - raw pixels",
            round(default["precision_at_10"] - floor, 4), "> 0", default["precision_at_10"] > floor)
        add("the default build's model, in-process images/s", default["images_per_s"], ">= 25",
            (default["images_per_s"] or 0) >= 25)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run for make test: little data")
    parser.add_argument("--full", action="store_true", help="the full run that regenerates BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    profile = "quick" if args.quick or not args.full else "full"
    config = PROFILES[profile]
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    results: dict = {"profile": profile, "config": config, "started_at": started_at,
                     "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                 "processor": platform.machine()}}
    log.info("builder: a real Spark build of %d sample products", config["build_products"])
    catalogue, out, manifest, build_seconds = _build(config["build_products"], WORK)
    embed_seconds = manifest["timings_seconds"]["embed"]
    results["build"] = {"images": manifest["counts"]["indexed"], "products": manifest["counts"]["products"],
                        "total_seconds": round(build_seconds, 1),
                        "stage_seconds": manifest["timings_seconds"],
                        "embed_images_per_s": round(manifest["counts"]["indexed"] / embed_seconds, 2),
                        "end_to_end_images_per_s": round(manifest["counts"]["indexed"] / build_seconds, 2),
                        "recall_at_10": manifest["index"]["recall_at_10"], "n_trees": manifest["index"]["n_trees"],
                        "search_k": manifest["index"]["search_k"]}
    log.info("in-process pipeline: this machine's limit")
    results["in_process"] = serving.in_process(out, catalogue, config["in_process_batch_sizes"],
                                               config["in_process_images"])
    as_built = results["in_process"]["served_as_built"]
    if as_built.get("rows") and as_built["min_cosine"] < SERVED_AS_BUILT_COSINE:
        # Not a speed figure: a build serving other vectors than it indexed is broken, and make test must fail.
        raise SystemExit(f"the {as_built['pooling']} / {as_built['head']} build's SavedModel embeds its own images "
                         f"unlike its stored vectors: cosine {as_built['min_cosine']} < {SERVED_AS_BUILT_COSINE}")
    log.info("server under closed-loop load, batching on and off")
    results["server"] = serving.server_runs(out, catalogue, config["concurrencies"], config["duration_s"])
    log.info("--workers 1 and 2 under the compiled load generator")
    results["workers"] = serving.workers_runs(out, catalogue, config["workers_duration_s"],
                                              results["in_process"]["limit_images_per_s"],
                                              tuple(config.get("worker_counts", (1, 2))))
    log.info("index against exact search and HNSW peers")
    vectors = np.load(out / artifacts.read_current(out) / artifacts.VECTORS_FILE)
    results["index"] = index_bench.compare(vectors, manifest["index"]["n_trees"], manifest["index"]["search_k"])
    log.info("products: what a row of 10 shows with image results and with product results")
    results["products"] = products.evaluate(out, queries=config["product_queries"])
    log.info("filters: k results at every selectivity, against Annoy then filter")
    results["filters"] = filters.evaluate(out, queries=config["filter_queries"])
    log.info("a living catalogue: full build, rebuild after +%d/-%d images, hide to effect", *config["living_change"])
    added, removed = config["living_change"]
    # The quick profile's builder run (83 images) is the living catalogue's full build: one Spark build fewer.
    results["living"] = living.evaluate(WORK, config["living_images"], config["hide_rounds"], added=added,
                                        removed=removed, window_s=config.get("living_window_s", 5.0),
                                        full=(catalogue, out, manifest, build_seconds) if profile == "quick" else None)
    log.info("retrieval quality")
    results["quality"] = quality.evaluate(config["catalogue"], config["queries"], config["backbones"],
                                          config["mirror_backbones"], config["colour_set"])
    if profile == "quick":
        from bench import scale

        # make bench-scale's code at a few thousand images, so that it stays tested (figures: bench/work/scale).
        log.info("scale: a small version of ABO's shape, its lists by reindex, served beside the sample build")
        results["scale_quick"] = {"seconds": scale.run("quick", demo=(catalogue, out))["seconds"]}
    results["targets"] = targets(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (RESULTS / f"{profile}.json").write_text(json.dumps(results, indent=2))
    for row in results["targets"]:
        log.info("%s %s: %s (goal %s)", "MET " if row["met"] else "MISS", row["target"], row["measured"], row["goal"])
    if profile == "full":
        from bench.report import write_report
        from bench.soak import run as soak

        log.info("reliability figures (short; make soak runs longer)")
        soak(out, catalogue, overload_s=6, cycles=2, command="make bench (short reliability runs)")

        write_report(results)
    log.info("bench %s done in %.0f s -> %s", profile, results["seconds"], RESULTS / f"{profile}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
