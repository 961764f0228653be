"""FindSimilar by product id over HTTP/JSON beside gRPC under the same closed-loop load, and gRPC with the HTTP
port on against off. `python -m bench.http --artifacts A --catalogue C` (make bench-http); not part of make test.

Both protocols are driven from one Python process with the same loop (N callers back to back, product ids drawn
from the catalogue's listings), so the client's own cost is alike on both sides; on a 2-core machine the client
shares the cores with the server, so the figures are a comparison, not the server's limit."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

import aiohttp
import grpc

from bench.report import put_section
from bench.serving import _free_port, server
from client.loadgen import load_product_ids
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc

K = 10
ROOT = Path(__file__).resolve().parent.parent


def _summary(latencies: list[float], errors: int, seconds: float) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "errors": errors, "qps": round(len(ordered) / seconds, 1),
            "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2)}


async def _closed_loop(call, products: list[str], concurrency: int, duration_s: float) -> dict:
    latencies: list[float] = []
    errors = 0
    rng = random.Random(0)
    started = time.perf_counter()
    stop_at = started + duration_s

    async def caller() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            begin = time.perf_counter()
            try:
                await call(rng.choice(products))
                latencies.append(time.perf_counter() - begin)
            except (grpc.RpcError, aiohttp.ClientError, RuntimeError):
                errors += 1

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return _summary(latencies, errors, time.perf_counter() - started)


async def grpc_load(address: str, products: list[str], concurrency: int, duration_s: float) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ImageSimilarityStub(channel)

        async def call(product_id: str) -> None:
            await stub.FindSimilar(pb.FindSimilarRequest(product_id=product_id, k=K), timeout=10)

        await _closed_loop(call, products[:8], concurrency, 1.0)  # warm the connection and the result cache
        return await _closed_loop(call, products, concurrency, duration_s)


async def http_load(base_url: str, products: list[str], concurrency: int, duration_s: float) -> dict:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:

        async def call(product_id: str) -> None:
            async with session.post("/v1/similar", json={"productId": product_id, "k": K}) as response:
                body = await response.read()
                if response.status != 200:
                    raise RuntimeError(body.decode())
                json.loads(body)  # what a JSON client does with the answer, as the gRPC client parses its message

        await _closed_loop(call, products[:8], concurrency, 1.0)
        return await _closed_loop(call, products, concurrency, duration_s)


def measure(artifacts: Path, catalogue: Path, concurrency: int, duration_s: float, rounds: int) -> dict:
    products = load_product_ids(catalogue, limit=1000)
    runs: dict[str, list[dict]] = {"grpc_http_off": [], "grpc_http_on": [], "http": []}
    for _ in range(rounds):
        with server(artifacts) as (address, _metrics, _process):
            runs["grpc_http_off"].append(asyncio.run(grpc_load(address, products, concurrency, duration_s)))
        http_port = _free_port()
        with server(artifacts, "--http-port", str(http_port)) as (address, _metrics, _process):
            runs["grpc_http_on"].append(asyncio.run(grpc_load(address, products, concurrency, duration_s)))
            runs["http"].append(asyncio.run(http_load(f"http://127.0.0.1:{http_port}", products, concurrency,
                                                      duration_s)))
    return summarize({"concurrency": concurrency, "duration_s": duration_s, "rounds": rounds, "k": K,
                      "products": len(products), "load_average": os.getloadavg(), "runs": runs})


def summarize(result: dict) -> dict:
    """The median of each configuration's rounds, and its best round (highest QPS): on a shared host the median
    also measures the neighbours, and the best round is the one they disturbed least."""
    runs = result["runs"]
    result["median"] = {name: {key: statistics.median(run[key] for run in found) for key in found[0]}
                        for name, found in runs.items()}
    result["best"] = {name: max(found, key=lambda run: run["qps"]) for name, found in runs.items()}
    for statistic in ("median", "best"):
        off, on = result[statistic]["grpc_http_off"]["qps"], result[statistic]["grpc_http_on"]["qps"]
        result[f"grpc_qps_change_with_http_on_pct_{statistic}"] = round(100 * (on - off) / off, 1)
    return result


HTTP_BEGIN = "<!-- HTTP section: written by make bench-http (bench/http.py) -->"
HTTP_END = "<!-- end of the HTTP section -->"


def section(result: dict) -> list[str]:
    names = {"grpc_http_off": "gRPC, HTTP port off", "grpc_http_on": "gRPC, HTTP port on", "http": "HTTP/JSON"}
    lines = [HTTP_BEGIN, "## HTTP/JSON beside gRPC", "",
             f"FindSimilar by product id (k = {result['k']}, {result['products']} products drawn at random, default "
             "settings, so mostly neighbour lists and the result cache: the protocol's cost shows) under the "
             f"same closed loop for both protocols: {result['concurrency']} callers back to back in one Python "
             "process (grpc.aio against aiohttp with keep-alive, each parsing its answer), "
             f"{result['duration_s']:.0f} s a run, the median of {result['rounds']} rounds alternating the HTTP port "
             "off and on, on the same 2 cores as the server (`make bench-http`; raw figures: "
             "`bench/results/http.json`).", "",
             "| FindSimilar by product id | QPS (median) | p50 ms | p99 ms | QPS (best round) | p50 ms | p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, label in names.items():
        median, best = result["median"][name], result["best"][name]
        lines.append(f"| {label} | {median['qps']:.0f} | {median['p50_ms']:.2f} | {median['p99_ms']:.2f} | "
                     f"{best['qps']:.0f} | {best['p50_ms']:.2f} | {best['p99_ms']:.2f} |")
    load = ", ".join(f"{value:.1f}" for value in result["load_average"])
    lines += ["", f"gRPC with the HTTP port on against off: {result['grpc_qps_change_with_http_on_pct_best']:+.1f}% "
              f"QPS in the best rounds, {result['grpc_qps_change_with_http_on_pct_median']:+.1f}% in the medians "
              f"(target: no worse than -5%). Load average when the run ended: {load} on 2 cores, other work "
              "included: the rounds of one configuration spread by more than the difference between them.",
              HTTP_END]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path)
    parser.add_argument("--catalogue", type=Path, help="the catalogue its product ids come from")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http.json")
    parser.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md", help="where the section is written")
    parser.add_argument("--report-only", action="store_true", help="write the section from --out's runs again")
    args = parser.parse_args(argv)
    if not args.report_only and (args.artifacts is None or args.catalogue is None):
        parser.error("--artifacts and --catalogue are required (unless --report-only)")
    if args.report_only:
        result = summarize(json.loads(args.out.read_text()))
    else:
        result = measure(args.artifacts, args.catalogue, args.concurrency, args.duration_s, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    # Before the ABO-size section, whose first line is its marker.
    put_section(args.report, HTTP_BEGIN, HTTP_END, section(result), "\n<!-- scale section")
    print("\n".join(section(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
