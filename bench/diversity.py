"""Diversity (MMR) on the bench catalogue: what a row of 10 holds at diversity 0, 0.3 and 0.6, and what it costs.

`python -m bench.diversity` builds the bench sample (bench/run.py's build) or takes `--artifacts`, then asks
FindSimilar by product id through the query engine, in-process, as the server does (neighbour lists first).
Not part of `make test` or `make bench`: its figures are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from bench.report import write_ranking_section
from bench.run import RESULTS, measured_artifacts
from lookalike import artifacts
from lookalike.availability import Availability
from server.engine import HiddenProducts, Query, QueryEngine, SearchOptions
from server.version import load_version

K = 10
DIVERSITIES = (0.0, 0.3, 0.6)
CANDIDATES_PER_RESULT = 4  # the server's default (CoreConfig.candidates_per_result)


def evaluate(artifacts_dir: Path, queries: int, seed: int = 0) -> dict:
    version = load_version(artifacts_dir, artifacts.read_current(artifacts_dir), max_pixels=40_000_000)
    catalogue, vectors = version.catalogue, np.asarray(version.index.vectors)
    product_type = catalogue.attribute_values("product_type")
    engine, hidden = QueryEngine(), HiddenProducts(Availability())
    picked = np.random.default_rng(seed).choice(catalogue.product_count, size=min(queries, catalogue.product_count),
                                                replace=False)
    rows = []
    for diversity in DIVERSITIES:
        options = SearchOptions(k=K, diversity=diversity, candidates=CANDIDATES_PER_RESULT * K if diversity else 0)
        precision, similarity, seconds, types = [], [], [], []
        for product in picked:
            query = Query(product_id=catalogue.product_ids[int(product)])
            begin = time.perf_counter()
            results = engine.find(version, hidden, query, options, K)
            seconds.append(time.perf_counter() - begin)
            rows_of = [catalogue.rows_of_image(r.image.image_id)[0] for r in results]
            found = [int(catalogue.row_product[row]) for row in rows_of]
            precision.append(sum(product_type[p] == product_type[int(product)] for p in found) / K)
            best = vectors[rows_of]
            similarity.append(float(np.mean([best[a] @ best[b] for a, b in combinations(range(len(best)), 2)])))
            types.append(len({product_type[p] for p in found}))
        ms = np.asarray(seconds) * 1000
        rows.append({"diversity": diversity, "candidates": options.candidates or K,
                     "precision_at_10": round(float(np.mean(precision)), 4),
                     "mean_pairwise_similarity": round(float(np.mean(similarity)), 4),
                     "distinct_product_types": round(float(np.mean(types)), 2),
                     "p50_ms": round(float(np.percentile(ms, 50)), 3),
                     "p99_ms": round(float(np.percentile(ms, 99)), 3)})
    version.close()
    return {"queries": len(picked), "products": catalogue.product_count, "images": len(vectors),
            "neighbour_lists": version.neighbours is not None, "rows": rows}


def table(result: dict) -> str:
    lines = ["| diversity | candidates | precision@10 (product type) | mean pairwise similarity of the 10 | "
             "distinct product types in the 10 | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['diversity']} | {row['candidates']} | {row['precision_at_10']} | "
                     f"{row['mean_pairwise_similarity']} | {row['distinct_product_types']} | {row['p50_ms']} | "
                     f"{row['p99_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = measured_artifacts(__doc__, products=5000, queries=500, argv=argv)
    result = evaluate(args.artifacts, args.queries)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "diversity.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"BENCHMARKS.md: {write_ranking_section()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
