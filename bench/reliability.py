"""Reliability scenarios shared by the tests (small, asserted) and `make soak`/`make bench` (longer, recorded)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from client.loadgen import LoadConfig, run_load


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _load(address: str, catalogue: Path, **kwargs) -> dict:
    return asyncio.run(run_load(LoadConfig(address=address, catalogue=catalogue, progress=False, **kwargs)))


def overload(address: str, catalogue: Path, pid: int, measure_s: float = 4.0, overload_s: float = 5.0,
             factor: float = 5.0) -> dict:
    """Sustainable Embed rate (closed loop), then `factor` x that rate open loop, then recovery."""
    mix = {"embed": 1.0}
    rss_before = rss_mib(pid)
    sustainable = _load(address, catalogue, mode="closed", concurrency=8, duration_s=measure_s, mix=mix)
    rate = max(sustainable["qps"], 1.0) * factor
    flood = _load(address, catalogue, mode="open", rate=rate, duration_s=overload_s, mix=mix, timeout_s=30)
    rss_peak = rss_mib(pid)
    recovered = _load(address, catalogue, mode="closed", concurrency=8, duration_s=measure_s, mix=mix)
    return {
        "sustainable_qps": sustainable["qps"], "offered_rate": round(rate, 1),
        "flood_requests": flood["requests"], "flood_codes": flood["codes"], "flood_ok_qps": flood["qps"],
        "flood_latency_by_code": flood["latency_by_code"], "recovered_qps": recovered["qps"],
        "recovered_codes": recovered["codes"], "rss_mib_before": round(rss_before, 1),
        "rss_mib_after_flood": round(rss_peak, 1),
    }


def restart_after_sigkill(start_server, wait_serving, process: subprocess.Popen) -> dict:
    """SIGKILL the server, start it again, and time until health is SERVING and a query answers."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    begin = time.monotonic()
    new_process, address = start_server()
    wait_serving(address, new_process)
    return {"restart_to_serving_s": round(time.monotonic() - begin, 2), "process": new_process, "address": address}
