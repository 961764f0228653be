"""Database-side augmentation: each catalogue vector becomes the similarity-weighted mean of itself and its nearest."""

from __future__ import annotations

import numpy as np

from builder.model import l2_normalise

# At most this many neighbours a vector is averaged with: past a few, the mean drifts to the type's centre.
MAX_AUGMENT_NEIGHBOURS = 50
# Scores held at once (float32): 64 M, 256 MB, whatever the catalogue's size.
_SCORES_PER_BLOCK = 1 << 26


def check_augment_neighbours(n: int) -> None:
    if not 0 <= n <= MAX_AUGMENT_NEIGHBOURS:
        raise ValueError(f"augment_neighbours must be between 0 and {MAX_AUGMENT_NEIGHBOURS}, not {n}")


def augment(vectors: np.ndarray, n: int) -> np.ndarray:
    """Unit vectors -> unit vectors: each row replaced by the mean of itself (weight 1, its similarity to
    itself) and its n most similar other rows, each weighted by its cosine (negative cosines by 0), then
    renormalised (Radenovic, Tolias and Chum's database-side augmentation with alpha = 1). Exact: every
    row is scored against every row, a block of rows at a time. n = 0 returns the vectors as they are."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    check_augment_neighbours(n)
    n = min(n, len(vectors) - 1)
    if n < 1:
        return vectors
    block_rows = max(1, _SCORES_PER_BLOCK // len(vectors))
    out = np.empty_like(vectors)
    for start in range(0, len(vectors), block_rows):
        block = vectors[start:start + block_rows]
        scores = block @ vectors.T
        own = np.arange(len(block))
        scores[own, start + own] = -np.inf
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        weights = np.maximum(np.take_along_axis(scores, top, axis=1), 0.0)
        out[start:start + len(block)] = block + np.einsum("qn,qnd->qd", weights, vectors[top])
    return l2_normalise(out)
