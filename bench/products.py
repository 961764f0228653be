"""Products, not images: what a recommendation row shows with image results (0.1) and product results."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lookalike import artifacts
from server.catalogue import load_catalogue
from server.search import NearestScorer, ProductSearch, SearchConfig

K = 10


def _rows(catalogue, product_type: list[str | None], query_product: int, found_products: list[int]) -> dict:
    """What a row of K slots shows: distinct products, and the share of slots holding another product of
    the query's product type (a slot repeating a product, or showing the query's own, is wasted)."""
    seen, useful = set(), 0
    for product in found_products[:K]:
        if product not in seen and product != query_product and product_type[product] == product_type[query_product]:
            useful += 1
        seen.add(product)
    return {"distinct": len(seen), "precision": useful / K}


def evaluate(artifacts_dir, queries: int = 300, seed: int = 0) -> dict:
    """Exact search on the built version, so the figures measure grouping and aggregation, not Annoy."""
    version_dir = artifacts_dir / artifacts.read_current(artifacts_dir)
    manifest = artifacts.load_manifest(version_dir, verify=False)
    catalogue, vectors = load_catalogue(version_dir, manifest)
    vectors = np.asarray(vectors)
    search = ProductSearch(catalogue, vectors, version_dir / artifacts.INDEX_FILE, search_k=1, n_trees=1,
                           config=SearchConfig(exact_max_rows=len(vectors)))
    product_type = catalogue.attribute_values("product_type")
    several = np.flatnonzero(catalogue.image_count > 1)
    picked = np.random.default_rng(seed).choice(several, size=min(queries, len(several)), replace=False)
    results: dict[str, list[dict]] = {name: [] for name in ("image results (0.1)", "product results, image query",
                                                            "product results, product query (mean)",
                                                            "product results, product query (max)")}
    for product in picked:
        main_row = int(catalogue.first_row[product])
        query = vectors[main_row]
        # 0.1: the nearest images, leaving out only the query image itself.
        order = np.argsort(-(vectors @ query), kind="stable")
        images = [int(catalogue.row_product[r]) for r in order[:K + 1] if r != main_row][:K]
        results["image results (0.1)"].append(_rows(catalogue, product_type, product, images))
        hits = search.search(NearestScorer(query), K, excluded=np.array([product])).hits
        results["product results, image query"].append(
            _rows(catalogue, product_type, product, [h.product_row for h in hits]))
        own = vectors[catalogue.rows_of_product(product)]
        mean = own.mean(axis=0)
        for name, probes in (("mean", mean / np.linalg.norm(mean)), ("max", own)):
            hits = search.search(NearestScorer(probes), K, excluded=np.array([product])).hits
            results[f"product results, product query ({name})"].append(
                _rows(catalogue, product_type, product, [h.product_row for h in hits]))
    search.unload()
    rows = [{"results": name, "distinct_products_in_top_10": round(float(pd.DataFrame(r)["distinct"].mean()), 2),
             "product_precision_at_10": round(float(pd.DataFrame(r)["precision"].mean()), 4)}
            for name, r in results.items()]
    return {"queries": len(picked), "products": catalogue.product_count, "images": catalogue.image_count_total,
            "rows": rows}
