"""`make soak`: longer reliability runs than the tests, with figures for BENCHMARKS.md (not in CI)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench import chaos, reliability
from bench.serving import server
from client import ImageSimilarityClient, LookalikeError
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc

log = logging.getLogger("soak")
HERE = Path(__file__).parent


def bad_input(address: str, pid: int) -> dict:
    from tests.corpus import corpus

    stub = pb_grpc.ImageSimilarityStub(grpc.insecure_channel(address))
    rss_before = reliability.rss_mib(pid)
    codes, slowest = Counter(), 0.0
    for _name, data, _expected in corpus():
        begin = time.perf_counter()
        try:
            stub.Embed(pb.EmbedRequest(images=[data]), timeout=30)
            codes["OK"] += 1
        except grpc.RpcError as error:
            codes[error.code().name] += 1
        slowest = max(slowest, time.perf_counter() - begin)
    return {"inputs": sum(codes.values()), "codes": dict(codes), "slowest_ms": round(slowest * 1000, 1),
            "rss_growth_mib": round(reliability.rss_mib(pid) - rss_before, 1)}


def sigterm_under_load(artifacts: Path, catalogue: Path, cycles: int) -> dict:
    """Start, load with concurrent Embed callers, SIGTERM mid-way; count failed admitted requests."""
    from client.loadgen import load_queries

    images, _ = load_queries(catalogue, limit=16)
    tried = failed = 0
    exit_codes = []
    for _ in range(cycles):
        with server(artifacts, "--grace-s", "30") as (address, _metrics, process):
            errors, results = [], []

            def call(results=results, errors=errors):
                try:
                    with ImageSimilarityClient(address, timeout_s=60) as client:
                        results.append(client.embed(images[:4]))
                except LookalikeError as error:
                    errors.append(error.code.name)

            threads = [threading.Thread(target=call) for _ in range(8)]
            for thread in threads:
                thread.start()
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            for thread in threads:
                thread.join(120)
            exit_codes.append(process.wait(60))
            tried += len(threads)
            # Refused after draining began is UNAVAILABLE (clients retry elsewhere); anything else is a loss.
            failed += sum(code != "UNAVAILABLE" for code in errors)
    return {"cycles": cycles, "requests": tried, "failed": failed, "exit_codes": exit_codes}


def sigkill_restart(artifacts: Path, cycles: int) -> dict:
    """SIGKILL a serving process, then time a new one from start to SERVING."""
    times = []
    for _ in range(cycles):
        with server(artifacts) as (_address, _metrics, process):
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
        begin = time.monotonic()
        with server(artifacts):
            times.append(round(time.monotonic() - begin, 2))
    return {"cycles": cycles, "restart_to_serving_s": times}


def chaos_run(artifacts: Path, catalogue: Path, duration_s: float) -> dict:
    """The chaos test's run (bench/chaos.py) for longer, on a fresh private copy of ARTIFACTS."""
    work = artifacts.parent / "chaos"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    copy = chaos.private_copy(artifacts, work / "ARTIFACTS")
    figures = chaos.run(copy, catalogue, chaos.ChaosConfig(duration_s=duration_s))
    if tail := figures.pop("server_log_tail", None):
        log.error("chaos: %s; the server's log ends:\n%s", "; ".join(figures["problems"]), tail)
    return figures


def run(artifacts: Path, catalogue: Path, overload_s: float, cycles: int, command: str, chaos_s: float = 0.0) -> dict:
    figures = {"command": command, "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with server(artifacts, "--max-queue", "32", "--max-images-per-request", "16") as (address, _metrics, process):
        figures["bad_input"] = bad_input(address, process.pid)
        figures["overload"] = reliability.overload(address, catalogue, process.pid, measure_s=overload_s / 2,
                                                   overload_s=overload_s)
    figures["sigterm_under_load"] = sigterm_under_load(artifacts, catalogue, cycles)
    figures["restart_after_sigkill"] = sigkill_restart(artifacts, cycles)
    if chaos_s > 0:
        figures["chaos"] = chaos_run(artifacts, catalogue, chaos_s)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "reliability.json").write_text(json.dumps(figures, indent=2))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--chaos-s", type=float, default=1800.0,
                        help="seconds of chaos (tests/server/test_chaos.py runs 60); 0: none")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO")
    from bench.run import WORK, _build

    catalogue, artifacts, _manifest, _seconds = _build(300, WORK)
    command = f"python -m bench.soak --overload-s {args.overload_s:g} --cycles {args.cycles} --chaos-s {args.chaos_s:g}"
    figures = run(artifacts, catalogue, args.overload_s, args.cycles, command, args.chaos_s)
    print(json.dumps(figures, indent=2))
    from bench.report import write_reliability_section

    write_reliability_section(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
