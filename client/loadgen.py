"""`lookalike bench`: closed- and open-loop load on one address, with latency percentiles by status code."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client.library import AsyncImageSimilarityClient, LookalikeError

OPERATIONS = ("embed", "image", "id", "product", "recommend", "info")
MAX_OUTSTANDING = 5000  # open loop: arrivals beyond this many unfinished calls are counted, not sent


@dataclass(frozen=True)
class LoadConfig:
    address: str
    catalogue: Path
    mode: str = "closed"  # closed: `concurrency` callers back to back; open: Poisson arrivals at `rate`
    concurrency: int = 8
    rate: float = 50.0
    duration_s: float | None = 10.0
    requests: int | None = None
    mix: dict[str, float] = field(default_factory=lambda: {"embed": 1.0, "image": 1.0, "id": 1.0})
    images_per_embed: int = 1
    # Positive product examples per Recommend call.
    examples: int = 3
    k: int = 10
    timeout_s: float = 10.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError("mode is closed or open")
        if self.duration_s is None and self.requests is None:
            raise ValueError("give a duration or a request count: a load run always ends by itself")
        if unknown := set(self.mix) - set(OPERATIONS):
            raise ValueError(f"unknown operations in mix: {sorted(unknown)}; use {OPERATIONS}")
        if sum(self.mix.values()) <= 0:
            raise ValueError("the mix needs a positive weight")
        if self.examples < 1:
            raise ValueError("examples must be at least 1")


def parse_mix(text: str) -> dict[str, float]:
    """'embed=1,image=2,id=7' -> weights."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        mix[name.strip()] = float(weight or 1)
    return mix


def load_queries(catalogue: Path, limit: int = 256, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """Image bytes and image ids from a catalogue in ABO layout."""
    with gzip.open(catalogue / "images.csv.gz", "rt") as handle:
        rows = list(csv.DictReader(handle))
    rng = random.Random(seed)
    rng.shuffle(rows)
    images, ids = [], []
    for row in rows:
        path = catalogue / "small" / row["path"]
        if path.is_file():
            images.append(path.read_bytes())
            ids.append(row["image_id"])
        if len(images) >= limit:
            break
    if not images:
        raise FileNotFoundError(f"no images found under {catalogue / 'small'}")
    return images, ids


def load_product_ids(catalogue: Path, limit: int = 256, seed: int = 0) -> list[str]:
    """Product ids from the catalogue's ABO listings or products.csv (empty when it has neither)."""
    ids: list[str] = []
    for part in sorted((catalogue / "listings" / "metadata").glob("listings_*.json.gz")):
        with gzip.open(part, "rt", encoding="utf-8") as handle:
            ids += [json.loads(line).get("item_id") for line in handle if line.strip()]
    if not ids and (catalogue / "products.csv").is_file():
        with open(catalogue / "products.csv", newline="") as handle:
            ids = list(dict.fromkeys(row["product_id"] for row in csv.DictReader(handle)))
    ids = [i for i in ids if i]
    random.Random(seed).shuffle(ids)
    return ids[:limit]


class Recorder:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.latencies_by_code: dict[str, list[float]] = defaultdict(list)
        self.codes: Counter = Counter()
        self.codes_by_op: dict[str, Counter] = defaultdict(Counter)
        self.skipped = 0

    def add(self, operation: str, seconds: float, code: str) -> None:
        self.codes[code] += 1
        self.codes_by_op[operation][code] += 1
        self.latencies_by_code[code].append(seconds)
        if code == "OK":
            self.latencies[operation].append(seconds)
            self.latencies["all"].append(seconds)

    @property
    def total(self) -> int:
        return sum(self.codes.values())


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    array = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(array, 50)), 3), "p90_ms": round(float(np.percentile(array, 90)), 3),
            "p99_ms": round(float(np.percentile(array, 99)), 3), "max_ms": round(float(array.max()), 3)}


async def run_load(config: LoadConfig) -> dict:
    images, ids = load_queries(config.catalogue, seed=config.seed)
    products = load_product_ids(config.catalogue, seed=config.seed)
    if (config.mix.get("product") or config.mix.get("recommend")) and not products:
        raise ValueError(f"{config.catalogue} has no listings or products.csv to draw product ids from")
    rng = random.Random(config.seed)
    operations = list(config.mix)
    weights = [config.mix[o] for o in operations]
    recorder = Recorder()
    client = AsyncImageSimilarityClient(config.address, timeout_s=config.timeout_s)
    started = time.perf_counter()
    stop_at = started + config.duration_s if config.duration_s else None
    budget = {"left": config.requests if config.requests is not None else float("inf")}

    def take() -> bool:
        if budget["left"] <= 0 or (stop_at is not None and time.perf_counter() >= stop_at):
            return False
        budget["left"] -= 1
        return True

    async def one(progress) -> None:
        operation = rng.choices(operations, weights)[0]
        begin = time.perf_counter()
        try:
            if operation == "embed":
                await client.embed([rng.choice(images) for _ in range(config.images_per_embed)])
            elif operation == "image":
                await client.find_similar(rng.choice(images), k=config.k)
            elif operation == "info":  # no model, no index: the RPC round trip alone
                await client.info()
            elif operation == "product":
                await client.find_similar(product_id=rng.choice(products), k=config.k)
            elif operation == "recommend":
                await client.recommend(rng.sample(products, min(config.examples, len(products))), k=config.k)
            else:
                await client.find_similar(image_id=rng.choice(ids), k=config.k)
            code = "OK"
        except LookalikeError as error:
            code = error.code.name
        recorder.add(operation, time.perf_counter() - begin, code)
        progress.update(1)

    total = config.requests if config.requests is not None else None
    with tqdm(total=total, desc=f"bench {config.mode}", unit="req", disable=not config.progress,
              file=sys.stderr, mininterval=1.0) as progress:
        if config.mode == "closed":
            async def caller() -> None:
                while take():
                    await one(progress)

            await asyncio.gather(*(caller() for _ in range(config.concurrency)))
        else:
            outstanding: set[asyncio.Task] = set()
            next_at = time.perf_counter()
            while take():
                next_at += rng.expovariate(config.rate)
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if len(outstanding) >= MAX_OUTSTANDING:
                    recorder.skipped += 1
                    continue
                task = asyncio.ensure_future(one(progress))
                outstanding.add(task)
                task.add_done_callback(outstanding.discard)
            if outstanding:
                await asyncio.gather(*outstanding)
    elapsed = time.perf_counter() - started
    await client.close()
    ok = recorder.codes.get("OK", 0)
    return {
        "address": config.address, "mode": config.mode, "concurrency": config.concurrency if config.mode == "closed"
        else None, "rate": config.rate if config.mode == "open" else None, "mix": config.mix,
        "images_per_embed": config.images_per_embed, "seconds": round(elapsed, 3), "requests": recorder.total,
        "ok": ok, "qps": round(ok / elapsed, 2) if elapsed else 0.0, "codes": dict(recorder.codes),
        "skipped_over_outstanding_cap": recorder.skipped,
        "latency": {op: _percentiles(values) for op, values in sorted(recorder.latencies.items())},
        "codes_by_operation": {op: dict(c) for op, c in recorder.codes_by_op.items()},
        "latency_by_code": {code: _percentiles(v) for code, v in sorted(recorder.latencies_by_code.items())},
    }


def format_report(report: dict) -> str:
    lines = [f"{report['mode']} loop on {report['address']}: {report['requests']} requests in "
             f"{report['seconds']:.1f} s, {report['qps']:.1f} OK/s",
             "codes: " + ", ".join(f"{code} {count}" for code, count in sorted(report["codes"].items())),
             f"{'operation':<10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}"]
    for operation, stats in report["latency"].items():
        values = [stats[key] for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
        lines.append(f"{operation:<10}" + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in values))
    return "\n".join(lines)
