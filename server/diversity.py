"""Maximal marginal relevance: k results chosen among relevant candidates, each unlike those chosen before."""

from __future__ import annotations

import numpy as np


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Positions of k candidates in the order MMR chooses them (Carbonell and Goldstein 1998, as Qdrant defines
    it): each maximises (1 - diversity) * relevance - diversity * its greatest cosine similarity to a candidate
    already chosen; the first is the most relevant. `vectors` are unit rows; ties go to the earlier candidate.
    Diversity 0 is the plain ranking by relevance."""
    relevance = np.asarray(relevance, np.float64)
    count = min(k, len(relevance))
    if diversity == 0 or count <= 1:
        return np.argsort(-relevance, kind="stable")[:count]
    vectors = np.asarray(vectors, np.float32)
    nearest_chosen = np.full(len(relevance), -np.inf)
    available = np.ones(len(relevance), bool)
    chosen = np.empty(count, np.int64)
    for step in range(count):
        value = relevance if step == 0 else (1 - diversity) * relevance - diversity * nearest_chosen
        pick = int(np.argmax(np.where(available, value, -np.inf)))
        chosen[step] = pick
        available[pick] = False
        # One row of similarities per choice: k x candidates dot products in all, never candidates squared.
        nearest_chosen = np.maximum(nearest_chosen, vectors @ vectors[pick])
    return chosen
