"""Filtered search: k results at every selectivity, against the naive way (Annoy, then filter).

In-process on the built version (its real vectors, Annoy index and products), with one attribute per
selectivity added to the products table: exactly that share of products holds the value asked for.
"""

from __future__ import annotations

import time

import numpy as np

from lookalike import artifacts
from server.catalogue import load_catalogue
from server.filters import Clause, Filter
from server.search import NearestScorer, ProductSearch, SearchConfig, top_products

K = 10
SELECTIVITIES = (0.5, 0.05, 0.005, 0.0005)


def _key(selectivity: float) -> str:
    return f"bench_{selectivity * 100:g}pct"


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _with_bench_attributes(catalogue, seed: int):
    """The catalogue with one attribute per selectivity: value "yes" on that share of products (at least one)."""
    rng = np.random.default_rng(seed)
    attributes = {}
    for selectivity in SELECTIVITIES:
        chosen = rng.choice(catalogue.product_count, size=max(1, round(selectivity * catalogue.product_count)),
                            replace=False)
        values: list[str | None] = ["no"] * catalogue.product_count
        for product in chosen:
            values[product] = "yes"
        attributes[_key(selectivity)] = values
    return catalogue.with_attributes(attributes)


def _exact_truth(catalogue, vectors: np.ndarray, query: np.ndarray, allowed: np.ndarray, own: int) -> list[int]:
    allowed = allowed.copy()
    allowed[own] = False
    rows = np.flatnonzero(allowed[catalogue.row_product])
    if not len(rows):
        return []
    _, found = top_products(vectors[rows] @ query, catalogue.row_product[rows], K)
    return [int(p) for p in found]


def _naive(search: ProductSearch, query: np.ndarray, allowed: np.ndarray, own: int) -> list[int]:
    """What Annoy alone offers (spotify/annoy#263): the k nearest images at the served search_k, then filter."""
    rows = search.ann.nearest(query, K, search.search_k)[0]
    products = [int(search.catalogue.row_product[r]) for r in rows]
    return list(dict.fromkeys(p for p in products if allowed[p] and p != own))


METHODS = ("served plans", "Annoy forced (over-fetch, then exact fallback)", "naive")


def open_searches(artifacts_dir) -> tuple:
    """The served version's catalogue, vectors, manifest, and its index twice: with the served plans and with Annoy
    forced (exact_max_rows = 0)."""
    version_dir = artifacts_dir / artifacts.read_current(artifacts_dir)
    manifest = artifacts.load_manifest(version_dir, verify=False)
    catalogue, vectors = load_catalogue(version_dir, manifest)
    return catalogue, np.asarray(vectors), manifest, version_dir


def searches(catalogue, vectors: np.ndarray, manifest: dict, version_dir) -> tuple[ProductSearch, ProductSearch]:
    index_path = version_dir / artifacts.INDEX_FILE
    search_k, n_trees = int(manifest["index"]["search_k"]), int(manifest["index"]["n_trees"])
    return (ProductSearch(catalogue, vectors, index_path, search_k, n_trees),
            ProductSearch(catalogue, vectors, index_path, search_k, n_trees, config=SearchConfig(exact_max_rows=0)))


def measure(filter_: Filter, served: ProductSearch, forced: ProductSearch, vectors: np.ndarray,
            picked: np.ndarray) -> list[dict]:
    """One row per method for one filter: returned of 10, recall@10 against exact filtered search, latency, plans.
    Each query is a product's main image, its own product excluded."""
    catalogue = served.catalogue
    stats = {name: {"returned": [], "recall": [], "seconds": [], "plans": {}} for name in METHODS}
    possible = []
    for product in picked:
        query = vectors[int(catalogue.first_row[product])]
        allowed = catalogue.filters.allowed(filter_)
        truth = _exact_truth(catalogue, vectors, query, allowed, int(product))
        possible.append(len(truth))
        for name, search in zip(METHODS, (served, forced, None), strict=True):
            begin = time.perf_counter()
            if search is None:
                found = _naive(served, query, catalogue.filters.allowed(filter_), int(product))
            else:
                result = search.search(NearestScorer(query), K, allowed=catalogue.filters.allowed(filter_),
                                       excluded=np.array([product]))
                found = [hit.product_row for hit in result.hits]
                stats[name]["plans"][result.plan] = stats[name]["plans"].get(result.plan, 0) + 1
            stats[name]["seconds"].append(time.perf_counter() - begin)
            stats[name]["returned"].append(len(found))
            stats[name]["recall"].append(len(set(found) & set(truth)) / len(truth) if truth else 1.0)
    matching = int(catalogue.filters.allowed(filter_).sum())
    return [{"matching_products": matching, "method": name, "returned_of_10": round(float(np.mean(s["returned"])), 2),
             "possible_of_10": round(float(np.mean(possible)), 2),
             "recall_at_10": round(float(np.mean(s["recall"])), 4), **_percentiles(s["seconds"]), "plans": s["plans"]}
            for name, s in stats.items()]


def evaluate(artifacts_dir, queries: int = 200, seed: int = 0) -> dict:
    catalogue, vectors, manifest, version_dir = open_searches(artifacts_dir)
    catalogue = _with_bench_attributes(catalogue, seed)
    served, forced = searches(catalogue, vectors, manifest, version_dir)
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(catalogue.product_count, size=min(queries, catalogue.product_count), replace=False)
    rows = []
    for selectivity in SELECTIVITIES:
        filter_ = Filter((Clause(_key(selectivity), any_of=("yes",)),))
        rows += [{"selectivity": f"{selectivity * 100:g}%", **row}
                 for row in measure(filter_, served, forced, vectors, picked)]
    crossover = _crossover(served, vectors, picked[:50])
    served.unload()
    forced.unload()
    return {"products": catalogue.product_count, "images": catalogue.image_count_total, "queries": len(picked),
            "search_k": served.search_k, "exact_max_rows": SearchConfig().exact_max_rows, "rows": rows,
            "crossover": crossover}


def _crossover(search: ProductSearch, vectors: np.ndarray, products: np.ndarray) -> list[dict]:
    """Exact scoring of n rows against one Annoy query (k=10 products, over-fetched 3x) at the served search_k:
    where exact search stops being the cheaper plan."""
    catalogue = search.catalogue
    queries = [vectors[int(catalogue.first_row[p])] for p in products]
    wanted = K * int(search.config.fanout)
    begin = time.perf_counter()
    for query in queries:
        rows = search.ann.nearest(query, wanted, search.search_k)[0]
        top_products(vectors[rows] @ query, catalogue.row_product[rows], K)
    annoy_ms = (time.perf_counter() - begin) / len(queries) * 1000
    out = []
    n = 256
    while n <= len(vectors):
        rows = np.sort(np.random.default_rng(n).choice(len(vectors), size=n, replace=False))
        begin = time.perf_counter()
        for query in queries:
            top_products(vectors[rows] @ query, catalogue.row_product[rows], K)
        exact_ms = (time.perf_counter() - begin) / len(queries) * 1000
        out.append({"rows": n, "exact_ms": round(exact_ms, 4), "annoy_ms": round(annoy_ms, 4)})
        n *= 2
    return out
