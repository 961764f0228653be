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


def _port_off(artifacts: Path, products: list[str], concurrency: int, duration_s: float, runs: dict) -> None:
    with server(artifacts) as (address, _metrics, _process):
        runs["grpc_http_off"].append(asyncio.run(grpc_load(address, products, concurrency, duration_s)))


def _port_on(artifacts: Path, products: list[str], concurrency: int, duration_s: float, runs: dict) -> None:
    http_port = _free_port()
    with server(artifacts, "--http-port", str(http_port)) as (address, _metrics, _process):
        runs["grpc_http_on"].append(asyncio.run(grpc_load(address, products, concurrency, duration_s)))
        runs["http"].append(asyncio.run(http_load(f"http://127.0.0.1:{http_port}", products, concurrency,
                                                  duration_s)))


def measure(artifacts: Path, catalogue: Path, concurrency: int, duration_s: float, rounds: int) -> dict:
    products = load_product_ids(catalogue, limit=1000)
    runs: dict[str, list[dict]] = {"grpc_http_off": [], "grpc_http_on": [], "http": []}
    load_before = os.getloadavg()
    for position in range(rounds):
        # Alternating which goes first, so a drift in the neighbours' load falls on both alike.
        order = (_port_off, _port_on) if position % 2 == 0 else (_port_on, _port_off)
        for configuration in order:
            configuration(artifacts, products, concurrency, duration_s, runs)
    return summarize({"concurrency": concurrency, "duration_s": duration_s, "rounds": rounds, "k": K,
                      "products": len(products), "load_average_before": load_before,
                      "load_average": os.getloadavg(), "runs": runs})


def summarize(result: dict) -> dict:
    """The median of each configuration's rounds, its best round (highest QPS: on a shared host the median also
    measures the neighbours, and the best round is the one they disturbed least) and the spread of its rounds' QPS;
    whether gRPC's change with the HTTP port on is within the spread of one configuration's own rounds."""
    runs = result["runs"]
    result["median"] = {name: {key: statistics.median(run[key] for run in found) for key in found[0]}
                        for name, found in runs.items()}
    result["best"] = {name: max(found, key=lambda run: run["qps"]) for name, found in runs.items()}
    result["spread_qps"] = {name: [min(run["qps"] for run in found), max(run["qps"] for run in found)]
                            for name, found in runs.items()}
    for statistic in ("median", "best"):
        off, on = result[statistic]["grpc_http_off"]["qps"], result[statistic]["grpc_http_on"]["qps"]
        result[f"grpc_qps_change_with_http_on_pct_{statistic}"] = round(100 * (on - off) / off, 1)
    # Round by round: each round's two servers ran one right after the other, so their ratio is the least disturbed
    # by the neighbours' load drifting between rounds.
    paired = sorted(round(100 * (on["qps"] - off["qps"]) / off["qps"], 1)
                    for off, on in zip(runs["grpc_http_off"], runs["grpc_http_on"], strict=True))
    result["paired_change_pct"] = {"median": statistics.median(paired), "min": paired[0], "max": paired[-1]}
    difference = abs(result["median"]["grpc_http_on"]["qps"] - result["median"]["grpc_http_off"]["qps"])
    result["difference_within_spread"] = any(high - low >= difference for low, high in (
        result["spread_qps"]["grpc_http_off"], result["spread_qps"]["grpc_http_on"]))
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
             f"{result['duration_s']:.0f} s a run, {result['rounds']} rounds, each a fresh server with the HTTP "
             "port off and one with it on, which goes first alternating from round to round, on the same 2 cores "
             f"as the server (`{result.get('command', 'make bench-http')}`, not under nice; raw figures: "
             "`bench/results/http.json`).", "",
             "| FindSimilar by product id | QPS (median) | QPS (rounds' spread) | p50 ms | p99 ms | "
             "QPS (best round) | p50 ms | p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    spreads = result.get("spread_qps") or {name: [min(r["qps"] for r in found), max(r["qps"] for r in found)]
                                           for name, found in result["runs"].items()}
    for name, label in names.items():
        median, best = result["median"][name], result["best"][name]
        low, high = spreads[name]
        lines.append(f"| {label} | {median['qps']:.0f} | {low:.0f} to {high:.0f} | {median['p50_ms']:.2f} | "
                     f"{median['p99_ms']:.2f} | {best['qps']:.0f} | {best['p50_ms']:.2f} | {best['p99_ms']:.2f} |")
    load = ", ".join(f"{value:.1f}" for value in result["load_average"])
    before = result.get("load_average_before")
    loads = (f"load average (1, 5, 15 min) {', '.join(f'{v:.1f}' for v in before)} when it began and {load} "
             "when it ended" if before else f"load average {load} when the run ended")
    off_low, off_high = spreads["grpc_http_off"]
    on_low, on_high = spreads["grpc_http_on"]
    verdict = ("the difference is within the spread of one configuration's own rounds, so this run cannot tell "
               "the two apart" if result.get("difference_within_spread") else
               "the difference is larger than either configuration's own rounds spread")
    lines += ["", f"gRPC with the HTTP port on against off: {result['grpc_qps_change_with_http_on_pct_median']:+.1f}% "
              f"QPS in the medians, {result['grpc_qps_change_with_http_on_pct_best']:+.1f}% in the best rounds "
              f"(target: no worse than -5%). The port-off rounds spread over {off_low:.0f} to {off_high:.0f} QPS, "
              f"the port-on rounds over {on_low:.0f} to {on_high:.0f}: {verdict}."
              + (" Round by round (each round's two servers ran one right after the other), gRPC's change with the "
                 f"port on has a median of {result['paired_change_pct']['median']:+.1f}% and ranges from "
                 f"{result['paired_change_pct']['min']:+.1f}% to {result['paired_change_pct']['max']:+.1f}%."
                 if "paired_change_pct" in result else "")
              + f" The host's {loads}, on 2 cores, other work included.", HTTP_END]
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
        result["command"] = (f"python -m bench.http --artifacts {args.artifacts} --catalogue {args.catalogue} "
                             f"--rounds {args.rounds} --duration-s {args.duration_s:g} "
                             f"--concurrency {args.concurrency}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    # Before the ABO-size section, whose first line is its marker.
    put_section(args.report, HTTP_BEGIN, HTTP_END, section(result), "\n<!-- scale section")
    print("\n".join(section(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
