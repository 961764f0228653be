"""Issue 17's memory target, measured alone: PSS with 1 and 2 workers, and what one process's catalogue holds."""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.report import _table
from bench.scale import workers_memory

HERE = Path(__file__).parent


def _rollup(pid: int | str = "self") -> dict:
    """RSS, PSS and private (dirty + clean) memory of one process, MB."""
    fields = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name = line.split(":")[0]
        if name in fields:
            fields[name] = int(line.split()[1])
    return {"rss_mb": round(fields["Rss"] / 1024, 1), "pss_mb": round(fields["Pss"] / 1024, 1),
            "private_mb": round((fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, 1)}


def catalogue_memory(version_dir: Path | str) -> dict:
    """In this process: memory before and after load_catalogue, after a gc, after glibc's malloc_trim and after the
    server's own release_freed_memory, and the bytes each of the catalogue's columns holds."""
    from lookalike import artifacts
    from server.catalogue import load_catalogue

    version_dir = Path(version_dir)
    manifest = artifacts.load_manifest(version_dir, verify=False)
    gc.collect()
    out = {"before": _rollup()}
    begin = time.perf_counter()
    catalogue, _ = load_catalogue(version_dir, manifest)
    out["load_s"] = round(time.perf_counter() - begin, 2)
    out["after_load"] = _rollup()
    gc.collect()
    out["after_gc"] = _rollup()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["after_malloc_trim"] = _rollup()
    # What the server does after a load (pyarrow's pool too), in the checkouts that do it.
    from server import version

    if hasattr(version, "release_freed_memory"):
        version.release_freed_memory()
        out["after_release_freed_memory"] = _rollup()
    parts = {name: getattr(catalogue, name).nbytes for name in
             ("image_ids", "paths", "labels", "roles", "product_ids", "row_product", "first_row", "image_count")}
    parts.update({f"filter {key}": catalogue.filters.lists(key).nbytes for key in catalogue.filters.string_keys})
    parts.update({f"filter {key}": catalogue.filters.numbers(key).nbytes for key in catalogue.filters.number_keys})
    out["nbytes_mb"] = round(catalogue.nbytes / 2 ** 20, 1)
    out["nbytes_by_part_mb"] = {name: round(value / 2 ** 20, 2) for name, value in parts.items()}
    out["images"], out["products"] = catalogue.image_count_total, catalogue.product_count
    return out


def section(results: dict) -> list[str]:
    """The paragraph and table BENCHMARKS.md's ABO section carries for these figures."""
    rows = []
    for label, row in results.items():
        if not isinstance(row, dict) or "abo_workers" not in row:
            continue
        catalogue = row["abo_catalogue"]
        held = catalogue.get("after_release_freed_memory", catalogue["after_load"])["private_mb"]
        rows.append([f"{label} ({row['commit']})", row["demo_workers"]["second_worker_pss_mb"],
                     f"{row['abo_workers']['1']['pss_mb']} → {row['abo_workers']['2']['pss_mb']}",
                     row["abo_workers"]["second_worker_pss_mb"], f"**{row['second_worker_abo_minus_demo_mb']}**",
                     catalogue["nbytes_mb"], round(held - catalogue["before"]["private_mb"], 1)])
    last = results[list(results)[-1]]
    by_code: dict[str, list[float]] = {}
    for label, row in results.items():
        if isinstance(row, dict) and "abo_workers" in row:
            by_code.setdefault(label.split(",")[0], []).append(row["second_worker_abo_minus_demo_mb"])
    means = "; ".join(f"{code}: mean **{sum(v) / len(v):.1f} MB** over {len(v)} runs ({', '.join(map(str, v))})"
                      for code, v in by_code.items())
    return ["**A second worker, measured alone** (issue 17's memory target, ≤ 150 MB beyond the demo's: "
            f"`{last['command']}`, figures in `bench/results/memory.json`): the same measurement as the table above, "
            "on a version of ABO's shape written once by `bench/scale.py` (without neighbour lists) and the demo "
            "build; the catalogue columns are `Catalogue.nbytes`, and what a load leaves is the private memory one "
            "process holds after `load_catalogue` (and the server's release of freed memory) beyond what it held "
            "before. Before, each worker built its columns from Python lists of 395,039 strings a column and kept "
            "what pyarrow's pool (mimalloc) and malloc had freed: 200 to 215 MB a load left for 57 MB of columns. "
            "The columns are now made from the tables' own buffers (offsets and bytes, pyarrow's dictionary "
            "encoding), positions and counts are int32, codes int8, and a load ends by giving freed memory back.", "",
            _table(["code", "demo: 2nd worker adds PSS MB", "ABO: PSS MB, 1 → 2 workers", "ABO: 2nd worker adds",
                    "beyond the demo's", "ABO columns MB", "ABO: private MB a load leaves"], rows), "",
            f"Beyond the demo's, {means}. Runs of the same code differ by tens of MB: the host's other work maps the "
            "same TensorFlow libraries, whose pages PSS shares among every process mapping them.", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--abo", type=Path, required=True, help="artifacts folder of the version of ABO's shape")
    parser.add_argument("--abo-queries", type=Path, required=True, help="its query catalogue (bench/scale.py)")
    parser.add_argument("--demo", type=Path, required=True, help="artifacts folder of the demo sample")
    parser.add_argument("--demo-queries", type=Path, required=True, help="the demo's catalogue")
    parser.add_argument("--label", required=True, help="the key these figures go under, e.g. before or after")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    args = parser.parse_args(argv)
    from lookalike import artifacts

    row: dict = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                 "command": shlex.join(["python", "-m", "bench.memory", *(sys.argv[1:] if argv is None else argv)]),
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=HERE.parent).stdout.strip()}
    # A fresh process each, so that nothing loaded before counts.
    for name, folder in (("abo", args.abo), ("demo", args.demo)):
        version_dir = folder / artifacts.read_current(folder)
        script = ("import json; from bench.memory import catalogue_memory; "
                  f"print(json.dumps(catalogue_memory({str(version_dir)!r})))")
        result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                                cwd=HERE.parent, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        row[f"{name}_catalogue"] = json.loads(result.stdout.strip().splitlines()[-1])
    # As bench/scale.py measures it (after a 2 s by-product and by-id load), and its target's figure.
    for name, folder, queries in (("demo", args.demo, args.demo_queries), ("abo", args.abo, args.abo_queries)):
        workers = row[f"{name}_workers"] = workers_memory(folder, queries)
        workers["second_worker_pss_mb"] = round(workers["2"]["pss_mb"] - workers["1"]["pss_mb"], 1)
    row["second_worker_abo_minus_demo_mb"] = round(row["abo_workers"]["second_worker_pss_mb"]
                                                   - row["demo_workers"]["second_worker_pss_mb"], 1)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = row
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
