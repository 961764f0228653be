"""`python -m bench.swap`: the event loop's pause at a swap, with the served model shared against a model of its own.

One demo build (the committed Fashion-MNIST sample, with lists), then two more versions of it: a `reindex` (the
same SavedModel, so the server shares the loaded model: server/version.py load_version) and a `build --head pca`
of the same catalogue (features from the cache, a head of its own: a new model to load and an old one to free by
a full collection), the latter also with `--workers 2` (fresh workers serve it: nothing to collect). CURRENT
alternates between the first version and each of the others under by-product load, while a probe calls GetInfo
every 2 ms (bench/scale.py swap_pause). Writes bench/results/swap.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from bench.scale import BIN, RESULTS, WORK, _env, demo_build, ensure_lists, reindex, swap_pause
from lookalike import artifacts

log = logging.getLogger("bench.swap")


def own_model_version(out: Path, catalogue: Path, name: str = "demo-pca") -> str:
    """The catalogue built again with another head: the same images and features (cached), another model."""
    if not (out / name).is_dir():
        current = artifacts.read_current(out)
        with open(out.parent / f"build-{name}.log", "w") as log_file:
            subprocess.run([BIN / "lookalike-build", "--log-level", "WARNING", "build", "--images", catalogue,
                            "--out", out, "--version", name, "--head", "pca"], check=True, env=_env(),
                           stdout=log_file, stderr=subprocess.STDOUT)
        artifacts.write_current(out, current)
    return name


def run(products: int, swaps: int) -> dict:
    work = WORK / "swap"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    catalogue, out = demo_build(work, products)
    base = ensure_lists(out)
    shared = next((folder.name for folder in sorted(out.iterdir()) if (folder / artifacts.MANIFEST).is_file()
                   and artifacts.load_manifest(folder, verify=False).get("reindexed_from", {}).get("version") == base),
                  None) or reindex(out, base)[0]
    artifacts.write_current(out, base)
    own = own_model_version(out, catalogue)
    results = {"command": f"python -m bench.swap --products {products} --swaps {swaps}", "products": products,
               "versions": {"served": base, "same_model": shared, "own_model": own}}
    for label, other, flags in (("same_model", shared, ()), ("own_model", own, ()),
                                ("own_model_workers", own, ("--workers", "2"))):
        log.info("swaps between %s and %s (%s)", base, other, label)
        results[label] = swap_pause(out, catalogue, (base, other), swaps, flags=flags)
    results["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "swap.json").write_text(json.dumps(results, indent=2))
    return results


SWAP_BEGIN = "<!-- swap section: written by python -m bench.swap -->"
SWAP_END = "<!-- end of the swap section -->"


def section(results: dict) -> list[str]:
    """BENCHMARKS.md's lines for a run: one row per kind of swap."""
    from bench.report import _table

    rows = []
    for label, title in (("same_model", "same model (a reindex): shared"),
                         ("own_model", "a model of its own (build --head pca)"),
                         ("own_model_workers", "a model of its own, --workers 2: fresh workers")):
        if label not in results:
            continue
        run_ = results[label]
        rows.append([title, ", ".join(f"{s:g}" for s in run_["load_to_swap_s"]),
                     run_["retire_collections"]["mean_ms"], run_["without_swaps"].get("max_ms"),
                     run_["at_swap"].get("max_ms"), run_["at_swap"].get("p99_ms"), run_["errors"],
                     _load_errors(run_)])
    return [SWAP_BEGIN, "### A swap's pause", "",
            f"`{results['command']}`: the demo sample ({results['products']} products) served under by-product load "
            "(2 callers) while a probe calls GetInfo every 2 ms; CURRENT alternates between the served version and "
            "another. A version with the served model shares it (server/version.py); one with a model of its own "
            "loads it beside the old one, whose reference cycles then take one full collection to free; with "
            "`--workers 2` such a version is served by fresh workers started one at a time, the old ones draining "
            "(server/workers.py): nothing to collect. There the probe's connection moves to a fresh worker when its "
            "own is replaced (CURRENT to swap is until then), and the figures count every worker's collections.", "",
            _table(["swap to", "CURRENT to swap, s", "retire collection, mean ms", "GetInfo max ms, no swap",
                    "GetInfo max ms, within 100 ms of the swap", "its p99 ms", "probe errors",
                    "by-product load: errors / calls"], rows),
            "", SWAP_END]


def _load_errors(run_: dict) -> str:
    """The by-product load's failed calls out of its calls, with their codes; n/a from runs before it reported."""
    if run_.get("load_errors") is None:
        return "n/a"
    failed = {code: n for code, n in (run_.get("load_codes") or {}).items() if code != "OK"}
    return f"{run_['load_errors']} / {run_['load_calls']}" + (f" ({failed})" if failed else "")


def write_section(results: dict) -> None:
    from bench.http import HTTP_BEGIN
    from bench.report import ROOT, put_section

    # Where a full run puts it (bench/report.py): after the workers' figures, before HTTP's.
    put_section(ROOT / "BENCHMARKS.md", SWAP_BEGIN, SWAP_END, section(results), HTTP_BEGIN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=300, help="products of the demo sample")
    parser.add_argument("--swaps", type=int, default=4, help="swaps each way")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    results = run(args.products, args.swaps)
    print(json.dumps(results, indent=2))
    write_section(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
