"""A server's memory over a run, as the kernel splits it: anonymous, file-backed (ARTIFACTS apart) and shared."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

# /proc/PID/status fields (kB) and the names the figures use, in MiB.
STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}


def parse_status(text: str) -> dict[str, float]:
    """The RSS fields of a /proc/PID/status text, in MiB (absent fields are left out)."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in STATUS_FIELDS:
            out[STATUS_FIELDS[name]] = int(value.split()[0]) / 1024
    return out


def parse_smaps(text: str, root: Path) -> dict[str, float]:
    """File-backed resident pages of a /proc/PID/smaps text, in MiB: those of files under `root` (the served
    versions' mapped files) and of every other file (libraries, the model's files), with each group's mapped
    files' total size (`*_mapped`: what its resident pages can never exceed). A private mapping's pages copied
    on write (a library's data) count as anonymous, as /proc/PID/status counts them."""
    prefix = str(root).rstrip("/") + "/"
    resident = {"artifacts": 0, "other": 0}
    paths: dict[str, set[str]] = {"artifacts": set(), "other": set()}
    group = None
    rss = 0
    for line in text.splitlines():
        head = line.split(None, 5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
            path = head[5].strip() if len(head) == 6 else ""
            # Shared memory shows as /memfd:, /SYSV or /dev/zero mappings: RssShmem, not RssFile.
            shared = path.startswith(("/memfd:", "/SYSV", "/dev/"))
            group = None if not path.startswith("/") or shared else "artifacts" if path.startswith(prefix) else "other"
            if group is not None:
                paths[group].add(path.removesuffix(" (deleted)"))
        elif group is not None and head[0] == "Rss:":
            rss = int(head[1])
        elif group is not None and head[0] == "Anonymous:":
            resident[group] += rss - int(head[1])
    out = {f"file_{name}": kib / 1024 for name, kib in resident.items()}
    for name, group_paths in paths.items():
        out[f"file_{name}_mapped"] = sum(_size(path) for path in group_paths) / (1 << 20)
    return out


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers), parents first; gone processes left out."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        out.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def sample(pid: int, root: Path | None = None) -> dict | None:
    """Totals over `pid` and its descendants (and with `root`, the smaps split: slower, so not every sample),
    plus `processes`: how many there were; None when `pid` is gone."""
    total: dict[str, float] = {}
    count = 0
    for current in process_tree(pid):
        try:
            fields = parse_status(Path(f"/proc/{current}/status").read_text())
            if root is not None:
                fields |= parse_smaps(Path(f"/proc/{current}/smaps").read_text(), root)
        except OSError:
            if current == pid:
                return None
            continue
        count += 1
        for name, value in fields.items():
            # Each process maps the same files: their sizes bound every process's pages, not the sum.
            total[name] = max(total.get(name, 0), value) if name.endswith("_mapped") else total.get(name, 0) + value
    return {name: round(value, 1) for name, value in total.items()} | {"processes": count}


def growth_pct(before: float, after: float) -> float:
    return round(100 * (after - before) / before, 1) if before else 0.0


def summary(samples: list[dict], warmup_s: float, window_s: float = 300.0) -> dict:
    """Samples ({"t": seconds since the start, "rss", "anon", "file", "shmem", ...}) summed up, per field: the first
    sample, the median of the `window_s` after the warm-up (its first `warmup_s`) and of the last `window_s` (one
    sample swings with the requests in flight; a median of many does not), the maximum, the growth from the one
    median to the other, and the least-squares trend after the warm-up in MiB per 10 minutes (a leak is a steady
    slope). Without a sample past the warm-up, those are None. Plus a series of every field once a minute."""
    if not samples:
        return {}
    last_t = samples[-1]["t"]
    out: dict = {"warmup_s": warmup_s, "window_s": window_s, "last_t": last_t, "samples": len(samples)}
    for name in (name for name in samples[0] if name not in ("t", "processes")):
        points = [(s["t"], s[name]) for s in samples if name in s]
        after = [(t, v) for t, v in points if t >= warmup_s]
        warm = [v for t, v in after if t < warmup_s + window_s]
        end = [v for t, v in after if t > last_t - window_s]
        out[name] = {"first": points[0][1], "warm": _median(warm), "last": _median(end),
                     "max": max(v for _, v in points),
                     "growth_after_warmup_pct": growth_pct(_median(warm), _median(end)) if warm and end else None,
                     "trend_mib_per_10min": round(_slope(after) * 600, 1) if len(after) >= 2 else None}
    minute, series = -1, []
    for s in samples:
        if int(s["t"] // 60) > minute:
            minute = int(s["t"] // 60)
            series.append(s)
    out["series"] = series
    return out


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of value over time, per second."""
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0
