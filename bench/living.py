"""A living catalogue: a full build, a rebuild after +200/-100 images, serving during the rebuild, and
hide-to-effect on a running server under load."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bench.serving import load, server
from lookalike import artifacts

ADDED, REMOVED = 200, 100


def _cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([str(Path(sys.executable).parent / "lookalike-build"), "--log-level", "WARNING",
                           *map(str, args)], check=True, env=env, capture_output=True, text=True)


def _build(catalogue: Path, out: Path) -> tuple[dict, float]:
    begin = time.perf_counter()
    result = _cli("build", "--images", catalogue, "--out", out, "--json")
    return json.loads(result.stdout[result.stdout.index("{"):]), time.perf_counter() - begin


def _change(catalogue: Path, added_count: int = ADDED, removed_count: int = REMOVED, seed: int = 0) -> None:
    """+added_count images the model has never seen (mirrored and darkened copies, as new files and ids) and
    -removed_count images (files, rows and their products' listings)."""
    with gzip.open(catalogue / "images.csv.gz", "rt") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(rows), size=added_count + removed_count, replace=False)
    removed = {rows[i]["image_id"] for i in picked[:removed_count]}
    for i in picked[:removed_count]:
        (catalogue / "small" / rows[i]["path"]).unlink()
    added = []
    (catalogue / "small" / "new").mkdir(exist_ok=True)
    for n, i in enumerate(picked[removed_count:]):
        with Image.open(catalogue / "small" / rows[i]["path"]) as image:
            changed = ImageOps.mirror(image.convert("RGB")).point(lambda v: int(v * 0.8))
            path = f"new/new-{n:04d}.png"
            changed.save(catalogue / "small" / path)
        added.append({**rows[i], "image_id": f"new-{n:04d}", "path": path})
    with gzip.open(catalogue / "images.csv.gz", "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([r for r in rows if r["image_id"] not in removed] + added)
    for part in (catalogue / "listings" / "metadata").glob("listings_*.json.gz"):
        with gzip.open(part, "rt") as handle:
            listings = [json.loads(line) for line in handle]
        with gzip.open(part, "wt") as handle:
            handle.writelines(json.dumps(listing) + "\n" for listing in listings
                              if listing.get("main_image_id") not in removed)


def _latency_during(address: str, catalogue: Path, duration_s: float) -> dict:
    report = load(address, catalogue, mode="closed", concurrency=2, duration_s=duration_s, mix={"id": 1})
    return {"qps": report["qps"], "codes": report["codes"], **report["latency"]["id"]}


def _record_load(into: list[dict], address: str, catalogue: Path) -> None:
    into.append(load(address, catalogue, mode="closed", concurrency=2, duration_s=3.0, mix={"id": 1, "product": 1}))


def _hide_to_effect(address: str, out: Path, catalogue: Path, rounds: int) -> dict:
    """Under closed-loop load, hide the best match of a query and time until the query stops returning it."""
    from client import ImageSimilarityClient

    seconds, failed, requests, codes = [], 0, 0, Counter()
    with ImageSimilarityClient(address) as client:
        image_ids = [m.image_id for m in client.find_similar(vector=np.ones(client.info()["dimension"]), k=rounds)]
        for image_id in image_ids:
            reports: list[dict] = []
            loader = threading.Thread(target=_record_load, args=(reports, address, catalogue))
            loader.start()
            time.sleep(0.5)
            target = client.find_similar(image_id=image_id, k=1)[0].product_id
            begin = time.perf_counter()
            _cli("hide", "--out", out, target)
            while target in [m.product_id for m in client.find_similar(image_id=image_id, k=1)]:
                if time.perf_counter() - begin > 60:
                    raise RuntimeError(f"hiding {target} had no effect within 60 s")
                time.sleep(0.01)
            seconds.append(time.perf_counter() - begin)
            loader.join()
            requests += reports[0]["requests"]
            failed += reports[0]["requests"] - reports[0]["codes"].get("OK", 0)
            codes.update(reports[0]["codes"])
            _cli("unhide", "--out", out, target)
    return {"rounds": len(seconds), "mean_s": round(float(np.mean(seconds)), 3),
            "max_s": round(float(np.max(seconds)), 3), "requests_under_load": requests, "failed_requests": failed,
            "codes": dict(codes)}


def evaluate(work: Path, images: int, hide_rounds: int = 5, watch_interval_s: float = 0.5, added: int = ADDED,
             removed: int = REMOVED, window_s: float = 5.0,
             full: tuple[Path, Path, dict, float] | None = None) -> dict:
    """window_s: how long serving latency is measured idle and during the rebuild. full: (catalogue, ARTIFACTS,
    manifest, seconds) of a full build made already (bench-quick's builder run), copied with its feature cache
    instead of building the sample of `images` again."""
    catalogue, out = work / f"living-catalogue-{images}", work / f"living-artifacts-{images}"
    shutil.rmtree(catalogue, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    if full is None:
        sample = _cli("sample", "fashion-mnist", "--out", catalogue, "--limit", images, "--max-images-per-product",
                      1).stdout.strip()
        first, full_seconds = _build(catalogue, out)
    else:
        shutil.copytree(full[0], catalogue, symlinks=True)
        shutil.copytree(full[1], out, symlinks=True, ignore=shutil.ignore_patterns(".leases", ".staging-*"))
        first, full_seconds = full[2], full[3]
        sample = f"the builder run's catalogue ({full[0].name})"
    query_catalogue = work / f"living-queries-{images}"
    shutil.rmtree(query_catalogue, ignore_errors=True)
    shutil.copytree(catalogue, query_catalogue)  # the old version's queries, from files that stay put
    _change(catalogue, added, removed)
    with server(out, "--watch-interval-s", str(watch_interval_s)) as (address, _, _process):
        idle = _latency_during(address, query_catalogue, window_s)
        rebuild: dict = {}

        def rebuild_now() -> None:
            rebuild["manifest"], rebuild["seconds"] = _build(catalogue, out)

        builder = threading.Thread(target=rebuild_now)
        builder.start()
        time.sleep(3.0)  # Spark and the model are starting: the busiest part of a small rebuild
        during = _latency_during(address, query_catalogue, window_s)
        builder.join()
        from client import ImageSimilarityClient

        with ImageSimilarityClient(address) as client:
            begin = time.perf_counter()
            while client.info()["version"] != rebuild["manifest"]["version"]:
                if time.perf_counter() - begin > 60:
                    raise RuntimeError("the server did not swap to the rebuilt version")
                time.sleep(0.05)
            swap_s = time.perf_counter() - begin
        hiding = _hide_to_effect(address, out, catalogue, hide_rounds)  # queries of the rebuilt version
    second = rebuild["manifest"]
    return {
        "images": first["counts"]["images_indexed"], "sample": sample,
        "full": {"seconds": round(full_seconds, 1), "embedded": first["embedding"]["embedded"],
                 "stage_seconds": first["timings_seconds"]},
        "rebuild": {"seconds": round(rebuild["seconds"], 1), "added": added, "removed": removed,
                    "images": second["counts"]["images_indexed"], "embedded": second["embedding"]["embedded"],
                    "from_cache": second["embedding"]["from_cache"], "decoded": second["scan"]["decoded"],
                    "stage_seconds": second["timings_seconds"]},
        "rebuild_over_full": round(rebuild["seconds"] / full_seconds, 3),
        "serving": {"idle": idle, "during_rebuild": during, "swap_after_publish_s": round(swap_s, 2)},
        "hide": hiding, "watch_interval_s": watch_interval_s,
        "fell_back_to_committed_sample": first["counts"]["images_indexed"] < images * 0.9,
        "version": artifacts.read_current(out),
    }
