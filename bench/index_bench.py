"""The index against exact search, hnswlib and faiss HNSW at equal recall, on real embeddings."""

from __future__ import annotations

import time

import numpy as np

from builder.index import exact_neighbours


def _recall(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def _timed(query, queries) -> tuple[list[list[int]], float]:
    found, begin = [], time.perf_counter()
    for vector in queries:
        found.append(list(query(vector)))
    return found, (time.perf_counter() - begin) / len(queries) * 1000


def compare(vectors: np.ndarray, n_trees: int, search_k: int, query_count: int = 500) -> dict:
    rng = np.random.default_rng(0)
    queries = vectors[rng.choice(len(vectors), size=min(query_count, len(vectors)), replace=False)]
    truth = exact_neighbours(vectors, queries, 10)
    rows = []
    begin = time.perf_counter()
    exact_neighbours(vectors, queries, 10)
    rows.append({"index": "exact (numpy)", "setting": "-", "recall_at_10": 1.0,
                 "ms_per_query": round((time.perf_counter() - begin) / len(queries) * 1000, 4)})
    from annoy import AnnoyIndex

    annoy = AnnoyIndex(vectors.shape[1], "euclidean")
    for i, vector in enumerate(vectors):
        annoy.add_item(i, vector)
    annoy.set_seed(42)
    annoy.build(n_trees, n_jobs=-1)
    found, ms = _timed(lambda v: annoy.get_nns_by_vector(v, 10, search_k=search_k), queries)
    annoy_recall = _recall(found, truth)
    rows.append({"index": "annoy", "setting": f"n_trees={n_trees} search_k={search_k}",
                 "recall_at_10": round(annoy_recall, 4), "ms_per_query": round(ms, 4)})
    try:
        import hnswlib

        hnsw = hnswlib.Index(space="l2", dim=vectors.shape[1])
        hnsw.init_index(max_elements=len(vectors), ef_construction=200, M=16, random_seed=1)
        hnsw.add_items(vectors)
        hnsw.set_num_threads(1)
        for ef in (10, 16, 24, 32, 48, 64, 96, 128, 256):
            hnsw.set_ef(ef)
            found, ms = _timed(lambda v: hnsw.knn_query(v, k=10)[0][0], queries)
            if _recall(found, truth) >= annoy_recall:
                break
        rows.append({"index": "hnswlib", "setting": f"M=16 ef={ef}", "recall_at_10": round(_recall(found, truth), 4),
                     "ms_per_query": round(ms, 4)})
    except ImportError:
        rows.append({"index": "hnswlib", "setting": "not installed", "recall_at_10": None, "ms_per_query": None})
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        index = faiss.IndexHNSWFlat(vectors.shape[1], 16)
        index.hnsw.efConstruction = 200
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        for ef in (10, 16, 24, 32, 48, 64, 96, 128, 256):
            index.hnsw.efSearch = ef
            found, ms = _timed(lambda v: index.search(v[None].astype(np.float32), 10)[1][0], queries)
            if _recall(found, truth) >= annoy_recall:
                break
        rows.append({"index": "faiss HNSWFlat", "setting": f"M=16 efSearch={ef}",
                     "recall_at_10": round(_recall(found, truth), 4), "ms_per_query": round(ms, 4)})
    except ImportError:
        rows.append({"index": "faiss HNSWFlat", "setting": "not installed", "recall_at_10": None, "ms_per_query": None})
    return {"vectors": len(vectors), "dimension": int(vectors.shape[1]), "queries": len(queries), "rows": rows}
