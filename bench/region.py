"""A region query on a composed photo: two catalogue images side by side, asked whole and by each half.

`python -m bench.region --artifacts A --catalogue C` (what `python -m bench.diversity` built: bench/work/
artifacts-5000-products and catalogue-5000-products). In-process through the served model and the query engine:
for each pair of images of different product types, is each image's product among the 10 results, and do the
results hold its product type? Not part of `make test` or `make bench`: its figures are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from bench.report import write_ranking_section
from bench.run import RESULTS, WORK
from lookalike import artifacts
from lookalike.availability import Availability
from server.engine import HiddenProducts, Query, QueryEngine, SearchOptions
from server.version import load_version

K = 10
HALVES = {"left half": (0.0, 0.0, 0.5, 1.0), "right half": (0.5, 0.0, 1.0, 1.0)}


def _composed(left: Path, right: Path) -> bytes:
    with Image.open(left) as a, Image.open(right) as b:
        a, b = a.convert("RGB"), b.convert("RGB").resize(a.size)
        canvas = Image.new("RGB", (a.width * 2, a.height), "white")
        canvas.paste(a, (0, 0))
        canvas.paste(b, (a.width, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def evaluate(artifacts_dir: Path, catalogue_dir: Path, pairs: int, seed: int = 0) -> dict:
    version = load_version(artifacts_dir, artifacts.read_current(artifacts_dir), max_pixels=40_000_000)
    catalogue, embedder = version.catalogue, version.embedder
    product_type = catalogue.attribute_values("product_type")
    engine, hidden = QueryEngine(), HiddenProducts(Availability())
    rng = np.random.default_rng(seed)
    main_rows = catalogue.first_row
    stats = {name: {"found": [], "precision": []} for name in ("whole photo", *HALVES)}
    done = 0
    while done < pairs:
        a, b = (int(p) for p in rng.choice(catalogue.product_count, 2, replace=False))
        if product_type[a] == product_type[b]:
            continue
        data = _composed(catalogue_dir / "small" / catalogue.paths[int(main_rows[a])],
                         catalogue_dir / "small" / catalogue.paths[int(main_rows[b])])
        for name, region, wanted in (("whole photo", None, (a, b)), ("left half", HALVES["left half"], (a,)),
                                     ("right half", HALVES["right half"], (b,))):
            vector = embedder.embed(np.stack([embedder.preprocess(data, region)]))[0]
            results = engine.find(version, hidden, Query(vector=vector), SearchOptions(k=K), K)
            found = [catalogue.product_row(r.product_id) for r in results]
            for product in wanted:
                stats[name]["found"].append(product in found)
                stats[name]["precision"].append(sum(product_type[p] == product_type[product] for p in found) / K)
        done += 1
    version.close()
    rows = [{"query": name, "own_product_in_10": round(float(np.mean(s["found"])), 4),
             "precision_at_10": round(float(np.mean(s["precision"])), 4)} for name, s in stats.items()]
    return {"pairs": pairs, "products": catalogue.product_count, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", type=Path, default=WORK / "artifacts-5000-products")
    parser.add_argument("--catalogue", type=Path, default=WORK / "catalogue-5000-products")
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args(argv)
    result = evaluate(args.artifacts, args.catalogue, args.pairs)
    (RESULTS / "region.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| query | image's own product in the 10 | precision@10 (its product type) |\n| --- | --- | --- |")
    for row in result["rows"]:
        print(f"| {row['query']} | {row['own_product_in_10']} | {row['precision_at_10']} |")
    print(f"BENCHMARKS.md: {write_ranking_section()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
