"""The Annoy index: build over unit vectors, measure recall@10 against exact search, pick search_k."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

METRIC = "euclidean"


@dataclass(frozen=True)
class IndexReport:
    n_trees: int
    search_k: int
    recall_at_10: float
    recall_by_search_k: dict[int, float]
    queries: int


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by euclidean distance (unit vectors: the largest dot products)."""
    scores = queries @ vectors.T
    top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def build_annoy(vectors: np.ndarray, n_trees: int, path: str, seed: int = 42):
    from annoy import AnnoyIndex

    index = AnnoyIndex(vectors.shape[1], METRIC)
    index.set_seed(seed)
    for item, vector in enumerate(vectors):
        index.add_item(item, vector)
    index.build(n_trees, n_jobs=-1)
    index.save(path)
    return index


def recall_at_10(index, vectors: np.ndarray, query_ids: np.ndarray, search_k: int) -> float:
    k = min(10, len(vectors))
    truth = exact_neighbours(vectors, vectors[query_ids], k)
    hits = 0
    for query, expected in zip(query_ids, truth, strict=True):
        found = index.get_nns_by_vector(vectors[query], k, search_k=search_k)
        hits += len(set(found) & set(expected.tolist()))
    return hits / (k * len(query_ids))


def build_with_recall(vectors: np.ndarray, path: str, n_trees: int, target_recall: float,
                      sample_queries: int = 500, seed: int = 42) -> IndexReport:
    """Builds the index, then finds the smallest search_k whose measured recall@10 meets the target.

    When no search_k up to a full scan's worth meets it, the tree count doubles and it tries again.
    """
    rng = np.random.default_rng(seed)
    query_ids = rng.choice(len(vectors), size=min(sample_queries, len(vectors)), replace=False)
    while True:
        index = build_annoy(vectors, n_trees, path, seed)
        k = min(10, len(vectors))
        measured: dict[int, float] = {}
        search_k = n_trees * k
        while search_k <= max(len(vectors) * 4, n_trees * k):
            measured[search_k] = recall_at_10(index, vectors, query_ids, search_k)
            log.info("n_trees=%d search_k=%d recall@10=%.4f", n_trees, search_k, measured[search_k])
            if measured[search_k] >= target_recall:
                return IndexReport(n_trees, search_k, measured[search_k], measured, len(query_ids))
            search_k *= 2
        index.unload()
        n_trees *= 2
