"""Serving speed: the in-process pipeline (this machine's limit) and the server under closed-loop load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from client.loadgen import LoadConfig, load_queries, run_load
from lookalike import artifacts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_process(artifacts_dir: Path, catalogue: Path, batch_sizes=(1, 8, 16, 32, 64), images_per_size: int = 256,
               threads: int = os.cpu_count() or 2) -> dict:
    """Decode + preprocess on a thread pool overlapping the model, as the server does, with no RPC."""
    from server.version import SavedModelBackend

    version_dir = artifacts_dir / artifacts.read_current(artifacts_dir)
    manifest = artifacts.load_manifest(version_dir, verify=False)
    backend = SavedModelBackend(version_dir / artifacts.MODEL_DIR, manifest["preprocessing"], 40_000_000)
    backend.warmup()
    served_as_built = served_against_built(backend, version_dir, manifest)
    images, _ = load_queries(catalogue, limit=images_per_size)
    pool = ThreadPoolExecutor(threads)
    single = []
    for data in images[:40]:
        begin = time.perf_counter()
        backend.embed(backend.preprocess(data)[None])
        single.append(time.perf_counter() - begin)
    throughput = {}
    for size in batch_sizes:
        backend.embed(np.zeros((size, 256, 256, 3), np.uint8))  # trace this batch shape first
        chunks = [images[i:i + size] for i in range(0, len(images) - size + 1, size)] or [images[:size]]
        begin = time.perf_counter()
        pending = pool.map(backend.preprocess, chunks[0])
        done = 0
        for position in range(len(chunks)):
            batch = np.stack(list(pending))
            if position + 1 < len(chunks):
                pending = pool.map(backend.preprocess, chunks[position + 1])
            backend.embed(batch)
            done += len(batch)
        throughput[size] = round(done / (time.perf_counter() - begin), 2)
    pool.shutdown()
    best = max(throughput, key=throughput.get)
    return {"single_image_latency_ms": round(statistics.median(single) * 1000, 2),
            "images_per_s_by_batch_size": throughput, "best_batch_size": best, "limit_images_per_s": throughput[best],
            "served_as_built": served_as_built}


def served_against_built(backend, version_dir: Path, manifest: dict, rows: int = 32) -> dict:
    """The version's first index rows embedded again by the SavedModel the server loads (decode, preprocess,
    trunk and head as exported) against the vectors the build stored: the smallest cosine between the two. A
    build whose export differs from what it indexed (pooling, head) would serve queries unlike its index."""
    from server.catalogue import load_catalogue

    if manifest.get("augmentation") or manifest.get("mirror"):
        return {"rows": 0, "skipped": "the stored vectors are not the model's own (augmentation or mirror)"}
    served_catalogue, _ = load_catalogue(version_dir, manifest)
    images = Path(manifest["catalogue_root"]) / manifest["image_folder"]
    vectors = np.load(version_dir / artifacts.VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    picked = range(min(rows, len(vectors)))
    batch = np.stack([backend.preprocess((images / served_catalogue.paths[row]).read_bytes()) for row in picked])
    served = np.asarray(backend.embed(batch), np.float64)
    built = np.asarray(vectors[:len(picked)], np.float64)
    cosines = np.einsum("ij,ij->i", served, built) / (np.linalg.norm(served, axis=1) * np.linalg.norm(built, axis=1))
    return {"rows": len(picked), "min_cosine": round(float(cosines.min()), 6),
            "pooling": manifest.get("pooling"), "head": manifest.get("head")}


@contextlib.contextmanager
def server(artifacts_dir: Path, *flags: str):
    port, metrics_port = _free_port(), _free_port()
    # This checkout's server (python -m server.cli), whatever checkout the installed lookalike-serve imports.
    checkout = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])))
    log = open(artifacts_dir.parent / f"bench-server-{port}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "--artifacts", artifacts_dir,
                                "--port", str(port), "--metrics-port", str(metrics_port), "--log-format", "text",
                                "--watch-interval-s", "0", *flags], env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    from client import ImageSimilarityClient, LookalikeError

    try:
        with ImageSimilarityClient(address, timeout_s=2) as client:
            deadline = time.monotonic() + 180
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bench server did not start; see {log.name}")
                try:
                    if client.health() == "SERVING":
                        break
                except LookalikeError:
                    time.sleep(0.3)
        yield address, metrics_port, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def mean_batch_size(metrics_port: int) -> float | None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name in ("lookalike_batch_size_sum", "lookalike_batch_size_count")}
    count = values.get("lookalike_batch_size_count", 0)
    return round(values["lookalike_batch_size_sum"] / count, 2) if count else None


def load(address: str, catalogue: Path, **kwargs) -> dict:
    return asyncio.run(run_load(LoadConfig(address=address, catalogue=catalogue, progress=False, **kwargs)))


LOADGEN = Path(__file__).resolve().parent.parent / "build" / "clients" / "bin" / "lookalike-loadgen"


def loadgen_command(address: str, catalogue: Path, mix: str, duration_s: float, concurrency: int = 8,
                    mode: str = "closed", rate: float | None = None, connections: int = 4) -> list[str]:
    """The compiled Go load generator's command line, its JSON report on stdout (built first when missing)."""
    if not LOADGEN.exists():
        subprocess.run(["bash", str(LOADGEN.parents[3] / "client" / "build-clients.sh")], check=True,
                       stdout=subprocess.DEVNULL)
    flags = ["--address", address, "--catalogue", str(catalogue), "--mix", mix, "--duration", f"{duration_s}s",
             "--concurrency", str(concurrency), "--connections", str(connections), "--mode", mode, "--json"]
    return [str(LOADGEN), *flags, *(["--rate", str(rate)] if rate is not None else [])]


def compiled_load(address: str, catalogue: Path, mix: str, duration_s: float, concurrency: int = 8,
                  mode: str = "closed", rate: float | None = None, connections: int = 4) -> dict:
    """The compiled Go load generator (make clients builds it): its report has `lookalike bench`'s shape."""
    import json

    command = loadgen_command(address, catalogue, mix, duration_s, concurrency, mode, rate, connections)
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 120)
    if result.returncode != 0:
        raise RuntimeError(f"lookalike-loadgen failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def server_runs(artifacts_dir: Path, catalogue: Path, concurrencies, duration_s: float) -> dict:
    """Embed at each concurrency with batching on (max_batch_size 8, the default) and off (1); FindSimilar by
    image id and by product id."""
    out = {"embed": {}, "find_by_id": None}
    for label, batch in (("batching", "8"), ("no_batching", "1")):
        # The result cache off: the by-id and by-product figures measure the search, not a lookup.
        with server(artifacts_dir, "--max-batch-size", batch, "--max-queue", "1024", "--result-cache-size", "0") as (
                address, metrics_port, _):
            load(address, catalogue, mode="closed", concurrency=4, duration_s=2, mix={"embed": 1})  # warm
            for concurrency in concurrencies:
                report = load(address, catalogue, mode="closed", concurrency=concurrency, duration_s=duration_s,
                              mix={"embed": 1})
                out["embed"][f"{label}@{concurrency}"] = {
                    "qps": report["qps"], "codes": report["codes"], **report["latency"]["embed"]}
            out["embed"][f"{label}_mean_batch_size"] = mean_batch_size(metrics_port)
            if label == "batching":
                # By id and by product under the compiled load generator: the Python one tops out first.
                compiled_load(address, catalogue, "id=1,product=1", 1.0)
                for operation, key in (("id", "find_by_id"), ("product", "find_by_product")):
                    out[key] = {}
                    for concurrency in (2, 4, 8):
                        report = compiled_load(address, catalogue, f"{operation}=1", duration_s, concurrency)
                        out[key][concurrency] = {"qps": report["qps"], "codes": report["codes"],
                                                 **report["latency"][operation]}
                out["recommend"] = {}
                for examples in (1, 3, 10):
                    report = load(address, catalogue, mode="closed", concurrency=2, duration_s=duration_s,
                                  mix={"recommend": 1}, examples=examples)
                    out["recommend"][examples] = {"qps": report["qps"], "codes": report["codes"],
                                                  **report["latency"]["recommend"]}
                # The same load on GetInfo: what the RPC stack alone allows on this machine.
                report = compiled_load(address, catalogue, "info=1", duration_s, 8)
                out["rpc_ceiling"] = {"qps": report["qps"], "concurrency": 8, **report["latency"]["info"],
                                      "load_generator": report["load_generator"]}
    return out


def workers_runs(artifacts_dir: Path, catalogue: Path, duration_s: float, embed_limit: float,
                 worker_counts=(1, 2)) -> dict:
    """`--workers N` under the compiled load generator: the GetInfo ceiling and FindSimilar by product,
    closed loop, then open loop at 50% and 80% of the closed-loop rate; Embed against the in-process limit."""
    out: dict = {"duration_s": duration_s, "embed_in_process_limit": embed_limit, "by_workers": {}}
    for count in worker_counts:
        with server(artifacts_dir, "--workers", str(count), "--max-queue", "1024") as (address, metrics_port, _):
            compiled_load(address, catalogue, "info=1,product=1", 1.0, 8)  # warm every worker's connection
            row: dict = {}
            for name, mix in (("info", "info=1"), ("product", "product=1")):
                report = compiled_load(address, catalogue, mix, duration_s, 16, connections=8)
                row[name] = {"qps": report["qps"], "codes": report["codes"], **report["latency"][name]}
            maximum = row["product"]["qps"]
            for share in (0.5, 0.8):
                report = compiled_load(address, catalogue, "product=1", duration_s, mode="open",
                                       rate=round(maximum * share, 1), connections=8)
                row[f"product_open_{int(share * 100)}"] = {
                    "rate": round(maximum * share, 1), "qps": report["qps"], "codes": report["codes"],
                    **report["latency"].get("product", {})}
            report = compiled_load(address, catalogue, "embed=1", duration_s, 16, connections=8)
            row["embed"] = {"qps": report["qps"], "codes": report["codes"], **report["latency"]["embed"],
                            "of_in_process_limit": round(report["qps"] / embed_limit, 3)}
            out["by_workers"][count] = row
    return out
