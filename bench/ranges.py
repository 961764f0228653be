"""Range filters over a number attribute at about 50%, 5% and 0.5% selectivity: returned of k and recall@10 against
exact filtered search, for the served plans, Annoy forced and Annoy then filter.

In-process on a built version (its real vectors, index and products): the sample's item_weight_pounds, read from
its listings as the builder reads ABO's, with bounds taken from the sorted weights so that each range keeps about
that share of all products. `python -m bench.ranges` builds the sample first (bench/work), or measures
--artifacts; it writes bench/results/ranges.json and BENCHMARKS.md's range section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.filters import measure, open_searches, searches
from bench.report import ROOT, put_section
from bench.run import RESULTS, measured_artifacts
from server.filters import Clause, Filter, Range

KEY = "item_weight_pounds"
BEGIN = "<!-- range section: written by python -m bench.ranges -->"
END = "<!-- end of the range section -->"


def ranges(sorted_values: np.ndarray, products: int) -> list[tuple[str, Range]]:
    """About 50% (the lighter half, lt), 5% (the heaviest, gte) and 0.5% (a band at the median, gte and lt) of all
    products, bounds read off the sorted values (ties may keep a little more or less)."""
    def at(share: float) -> float:
        return float(sorted_values[min(len(sorted_values) - 1, round(share * products))])

    heaviest = float(sorted_values[max(0, len(sorted_values) - round(0.05 * products))])
    middle = len(sorted_values) // 2
    band = (float(sorted_values[middle]), float(sorted_values[min(len(sorted_values) - 1,
                                                                   middle + round(0.005 * products))]))
    return [("~50%", Range(lt=at(0.5))), ("~5%", Range(gte=heaviest)), ("~0.5%", Range(gte=band[0], lt=band[1]))]


def _describe(range_: Range) -> str:
    bounds = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
    return " and ".join(f"{KEY}{bounds[name]}{value:g}" for name, value in range_.bounds().items())


def evaluate(artifacts_dir: Path, queries: int = 300, seed: int = 0) -> dict:
    catalogue, vectors, manifest, version_dir = open_searches(artifacts_dir)
    if KEY not in catalogue.filters.number_keys:
        raise SystemExit(f"{version_dir} has no number attribute {KEY} (a version built before number attributes)")
    served, forced = searches(catalogue, vectors, manifest, version_dir)
    numbers = catalogue.filters.numbers(KEY)
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(catalogue.product_count, size=min(queries, catalogue.product_count), replace=False)
    rows = []
    for label, range_ in ranges(numbers.sorted, catalogue.product_count):
        filter_ = Filter((Clause(KEY, range=range_),))
        share = numbers.count(range_) / catalogue.product_count
        rows += [{"selectivity": f"{label} ({share * 100:.2g}%)", "clause": _describe(range_), **row}
                 for row in measure(filter_, served, forced, vectors, picked)]
    served.unload()
    forced.unload()
    return {"products": catalogue.product_count, "images": catalogue.image_count_total, "queries": len(picked),
            "held": numbers.held, "search_k": served.search_k, "exact_max_rows": served.config.exact_max_rows,
            "rows": rows}


def section(result: dict) -> list[str]:
    lines = [BEGIN, "### Range filters", "",
             f"`python -m bench.ranges`: the bench sample's {result['products']} products ({result['images']} images; "
             f"{result['held']} of them with a weight), {result['queries']} queries per range, each a product's main "
             f"image with its own product excluded, k = 10. The filter is one range clause over {KEY}, read from the "
             "sample's ABO-format listings (normalized_value in pounds); its bounds come from the sorted weights so "
             "that it keeps about 50%, 5% or 0.5% of all products. Methods as in the table above: the served plans "
             f"(exact search up to exact_max_rows = {result['exact_max_rows']} rows, which this sample never exceeds), "
             "Annoy forced (what a larger catalogue gets), and naive Annoy then filter. recall@10 is against exact "
             "filtered search.", "",
             "| selectivity | clause | matching products | method | returned of 10 | possible | recall@10 | p50 ms | "
             "p99 ms | plans |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        plans = ", ".join(f"{k} {v}" for k, v in r["plans"].items()) or "-"
        lines.append(f"| {r['selectivity']} | `{r['clause']}` | {r['matching_products']} | {r['method']} | "
                     f"{r['returned_of_10']} | {r['possible_of_10']} | {r['recall_at_10']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {plans} |")
    return [*lines, "", END]


def write_section(path: Path = ROOT / "BENCHMARKS.md") -> Path | None:
    """Puts the range section into BENCHMARKS.md from bench/results/ranges.json (before "Where exact search stops
    being cheaper", in the filters section), leaving every other figure as it is."""
    found = RESULTS / "ranges.json"
    if not found.exists():
        return None
    return put_section(path, BEGIN, END, section(json.loads(found.read_text())),
                       "\nWhere exact search stops being cheaper")


def main(argv: list[str] | None = None) -> int:
    args = measured_artifacts(__doc__, products=2000, queries=300, argv=argv)
    result = evaluate(args.artifacts, args.queries)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ranges.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(section(result)))
    print(f"BENCHMARKS.md: {write_section()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
