"""Exact neighbour lists of a version: each product's and each image row's top-N products, and their files."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from lookalike.artifacts import VECTORS_FILE, ArtifactError

# Inside a version folder; the manifest's "neighbours" section says the lists are there.
NEIGHBOURS_DIR = "neighbours"
MANIFEST_KEY = "neighbours"
DEFAULT_N = 100
# A request asks for at most 1,000 products; a longer list would only cost disk.
MAX_N = 1000
METHOD = "exact"
# Padding of a list when the catalogue has fewer than N products.
NO_PRODUCT = -1
NO_SCORE = -np.inf
# Queries scored together against a tile of index rows: 128 x 8,192 float32 scores (4 MiB) stay in cache.
BLOCK_QUERIES = 128
BLOCK_ROWS = 8192
# Main images of this many products (per list entry asked for) bound each query's N-th best score from
# below, so only rows scoring above that bound are kept as candidates: about N x rows / sample of them.
SAMPLE_PER_NEIGHBOUR = 160
# The bound comes from a different matrix product than the final scores, and those are the server's, not the
# tiles': float32 rounding of a dot product of unit vectors is far below this, so lowering the bound by it (and
# scoring again the rows this close to a list's end) keeps the lists exact.
BOUND_MARGIN = 1e-3


@dataclass(frozen=True)
class NeighbourLists:
    """A version's lists, memory-mapped; rows are product rows (products.parquet order) or index rows."""

    n: int
    product_neighbours: np.ndarray  # int32 [P, n]: product rows, best first; -1 pads
    product_neighbour_rows: np.ndarray  # int32 [P, n]: each listed product's best index row; -1 pads
    product_neighbour_scores: np.ndarray  # float32 [P, n]: that row's cosine, non-increasing; -inf pads
    image_neighbours: np.ndarray  # int32 [R, n]: the same with each index row's own vector as the query
    image_neighbour_rows: np.ndarray
    image_neighbour_scores: np.ndarray


# Each array field is stored as neighbours/<field>.npy.
ARRAY_FIELDS = tuple(f.name for f in fields(NeighbourLists) if f.name != "n")
FILES = {name: f"{name}.npy" for name in ARRAY_FIELDS}


def file_path(name: str) -> str:
    """The path of a list file relative to its version folder, as the manifest's `files` names it."""
    return f"{NEIGHBOURS_DIR}/{FILES[name]}"


def expected_dtype(name: str) -> np.dtype:
    return np.dtype(np.float32) if name.endswith("_scores") else np.dtype(np.int32)


def load_neighbours(version_dir: Path, manifest: dict) -> NeighbourLists | None:
    """The version's lists, memory-mapped; None when its manifest has none (versions built before lists).

    Raises ArtifactError naming the file that is missing or has the wrong dtype or shape: [P, n] for
    product lists (P from the manifest's product count), [R, n] for image lists (R = len(vectors.npy)).
    """
    section = manifest.get(MANIFEST_KEY)
    if not section:
        return None
    try:
        n = int(section["n"])
        products = int(manifest["counts"]["products"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"the manifest of {version_dir} has a neighbours section without n or a product "
                            "count") from None
    rows = len(_load(version_dir / VECTORS_FILE, VECTORS_FILE))
    arrays = {}
    for name in ARRAY_FIELDS:
        rel = file_path(name)
        array = _load(version_dir / rel, rel)
        shape = (products if name.startswith("product_") else rows, n)
        if array.dtype != expected_dtype(name) or array.shape != shape:
            raise ArtifactError(f"{rel} is {array.dtype} {list(array.shape)}, expected {expected_dtype(name)} "
                                f"{list(shape)}")
        if not name.endswith("_scores"):
            _check_range(array, products if name.endswith("_neighbours") else rows, rel)
        arrays[name] = array
    return NeighbourLists(n=n, **arrays)


def _check_range(array: np.ndarray, count: int, rel: str, chunk_rows: int = 8192) -> None:
    """Every entry a product (or index row) of the version, or -1 past a list's end: a list naming anything else
    would fail the requests that walk it. In slices, so a load beside the served version never holds the
    interpreter for long."""
    for start in range(0, len(array), chunk_rows):
        part = array[start:start + chunk_rows]
        if part.size and (int(part.min()) < -1 or int(part.max()) >= count):
            raise ArtifactError(f"{rel} names entries outside -1..{count - 1} (rows {start}..{start + len(part) - 1})")


def _load(path: Path, rel: str) -> np.ndarray:
    if not path.is_file():
        raise ArtifactError(f"{rel} is missing from {path.parent}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ArtifactError(f"{rel} is not a readable .npy array: {error}") from None


def check_neighbours(n: int) -> int:
    """A list length a build may ask for: 0 (no lists) to MAX_N."""
    if not 0 <= n <= MAX_N:
        raise ValueError(f"neighbours must be between 0 (no lists) and {MAX_N}, not {n}")
    return n


def check_products(first_row: np.ndarray, image_count: np.ndarray, rows: int) -> None:
    """Products must own contiguous, non-empty runs of index rows that cover every row in order."""
    first_row = np.asarray(first_row, np.int64)
    image_count = np.asarray(image_count, np.int64)
    if first_row.shape != image_count.shape or first_row.ndim != 1:
        raise ValueError("first_row and image_count must be one-dimensional and of the same length")
    empty = np.flatnonzero(image_count < 1)
    if len(empty):
        raise ValueError(f"{len(empty)} product(s) own no index row (product row {int(empty[0])}): a version's "
                         "products each own at least one image")
    ends = np.cumsum(image_count)
    starts = ends - image_count
    if not np.array_equal(first_row, starts) or (len(ends) and ends[-1] != rows):
        raise ValueError("products' rows are not contiguous runs covering the index rows in product order")


def product_query_vectors(vectors: np.ndarray, first_row: np.ndarray, image_count: np.ndarray) -> np.ndarray:
    """Each product's query vector exactly as the server forms it: the float32 mean of its rows' vectors,
    divided by max(norm, 1e-12)."""
    out = np.empty((len(first_row), vectors.shape[1]), np.float32)
    for product, (start, count) in enumerate(zip(first_row.tolist(), image_count.tolist(), strict=True)):
        mean = np.asarray(vectors[start:start + count], np.float32).mean(axis=0)
        out[product] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return out


def exact_top_products(query_vectors: np.ndarray, vectors: np.ndarray, first_row: np.ndarray,
                       image_count: np.ndarray, n: int, block_queries: int = BLOCK_QUERIES,
                       block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact top-n products of each query: (product rows, best index rows, scores), each [Q, n].

    A product's score is the largest dot product of the query with one of its rows; its best row is the
    lowest row reaching it. Order: score descending, then product row ascending. Lists shorter than n
    (fewer products than n) are padded with -1, -1, -inf. Memory stays within a block of queries times a
    tile of rows plus the candidates above each query's bound, whatever the catalogue's size.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    first_row = np.asarray(first_row, np.int64)
    image_count = np.asarray(image_count, np.int64)
    check_products(first_row, image_count, len(vectors))
    row_product = np.repeat(np.arange(len(first_row), dtype=np.int64), image_count)
    sample_rows = _sample_rows(first_row, n)
    sample = np.asarray(vectors[sample_rows], np.float32) if sample_rows is not None else None
    largest_row_norm = _largest_norm(vectors, block_rows)
    shape = (len(query_vectors), n)
    products = np.full(shape, NO_PRODUCT, np.int32)
    rows = np.full(shape, NO_PRODUCT, np.int32)
    scores = np.full(shape, NO_SCORE, np.float32)
    expected = min(n, len(first_row))
    for start in range(0, len(query_vectors), block_queries):
        queries = np.asarray(query_vectors[start:start + block_queries], np.float32)
        margin = BOUND_MARGIN * max(1.0, largest_row_norm * _largest_norm(queries, block_rows))
        if sample is None:
            bound = np.full(len(queries), -np.inf, np.float32)
        else:
            sample_scores = queries @ sample.T
            bound = np.partition(sample_scores, len(sample) - n, axis=1)[:, len(sample) - n] - margin
        found = _top_above(queries, vectors, row_product, bound, n, block_rows, margin)
        short = np.flatnonzero(found[3] < expected)
        if len(short):
            # Unreachable when the bound is right; a full scan keeps the lists exact if it ever is not.
            again = _top_above(queries[short], vectors, row_product, np.full(len(short), -np.inf, np.float32), n,
                               block_rows, margin)
            for target, source in zip(found[:3], again[:3], strict=True):
                target[short] = source
        stop = start + len(queries)
        products[start:stop], rows[start:stop], scores[start:stop] = found[:3]
    return products, rows, scores


def _sample_rows(first_row: np.ndarray, n: int) -> np.ndarray | None:
    """Main rows of evenly spaced products: n of them score at least the n-th best of the sample, so that
    score bounds the n-th best product from below. None when the catalogue has n products or fewer."""
    if len(first_row) <= n:
        return None
    size = min(len(first_row), SAMPLE_PER_NEIGHBOUR * n)
    picked = np.unique(np.linspace(0, len(first_row) - 1, size).round().astype(np.int64))
    return first_row[picked]


def _largest_norm(vectors: np.ndarray, block_rows: int) -> float:
    largest = 0.0
    for first in range(0, len(vectors), block_rows):
        tile = np.asarray(vectors[first:first + block_rows], np.float32)
        largest = max(largest, float(np.einsum("ij,ij->i", tile, tile).max(initial=0.0)))
    return float(np.sqrt(largest))


def _top_above(queries: np.ndarray, vectors: np.ndarray, row_product: np.ndarray, bound: np.ndarray, n: int,
               block_rows: int, slack: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-n products of each query among the rows scoring at least its bound, and how many distinct
    products it found there.

    The tiles' matrix products only choose the candidates: their rounding depends on where a row and a query sit in
    their blocks, so rows that tie as served (a photo shared by two products, the two images of a product against
    its own mean) may not tie in them. The candidates within `slack` (far above that rounding) of each query's n-th
    product are scored again as the server scores them (served_scores) and ranked on those scores: the lists then
    rank, break ties and report scores as the server's exact plan does, to the last bit."""
    hit_queries, hit_rows, hit_scores = [], [], []
    for first in range(0, len(vectors), block_rows):
        tile = queries @ np.asarray(vectors[first:first + block_rows], np.float32).T
        hits = np.flatnonzero(tile >= bound[:, None])
        hit_queries.append((hits // tile.shape[1]).astype(np.int16 if len(queries) <= 1 << 15 else np.int64))
        hit_rows.append(hits % tile.shape[1] + first)
        hit_scores.append(tile.ravel()[hits])
    if not sum(len(hits) for hits in hit_rows):
        return *_ranked(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), row_product, n,
                        len(queries))[:3], np.zeros(len(queries), np.int64)
    # Tiles come in row order and each tile's hits in (query, row) order, so a stable sort by query (a
    # radix sort of small integers) puts them in (query, row) order: each (query, product) is a run.
    query = np.concatenate(hit_queries)
    order = np.argsort(query, kind="stable")
    query = query[order].astype(np.int64)
    row = np.concatenate(hit_rows)[order]
    score = np.concatenate(hit_scores)[order]
    _, _, tile_scores, found = _ranked(query, row, score, row_product, n, len(queries))
    # A product among the served top n has a row within twice the rounding of the tiles' n-th best (-inf when a query
    # found fewer than n): only those rows are scored again.
    keep = score >= tile_scores[:, n - 1][query] - slack
    query, row = query[keep], row[keep]
    products, rows, scores, _ = _ranked(query, row, _served_scores(queries, vectors, query, row), row_product, n,
                                        len(queries))
    return products, rows, scores, found


def _ranked(query: np.ndarray, row: np.ndarray, score: np.ndarray, row_product: np.ndarray, n: int,
            queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The top-n products of each query from its scored rows, given in (query, row) order: (products, best rows,
    scores, how many distinct products each query's rows hold)."""
    shape = (queries, n)
    products = np.full(shape, NO_PRODUCT, np.int32)
    rows = np.full(shape, NO_PRODUCT, np.int32)
    scores = np.full(shape, NO_SCORE, np.float32)
    if not len(row):
        return products, rows, scores, np.zeros(queries, np.int64)
    # + 0.0 turns -0.0 into 0.0: the two are equal scores, and the sort key below must see them so.
    score = score + np.float32(0.0)
    product = row_product[row]
    run_starts = np.flatnonzero(np.r_[True, (query[1:] != query[:-1]) | (product[1:] != product[:-1])])
    best = np.maximum.reduceat(score, run_starts)
    run_of = np.repeat(np.arange(len(run_starts)), np.diff(np.r_[run_starts, len(score)]))
    # A product's best row: the first (lowest) row of its run reaching the run's best score.
    reaching = np.flatnonzero(score == best[run_of])
    best_row = row[reaching[np.r_[True, run_of[reaching][1:] != run_of[reaching][:-1]]]]
    query, product = query[run_starts], product[run_starts]
    # Within a query, runs are in product order; a stable sort by score descending keeps that for ties.
    order = np.argsort((query << 32) | _descending_key(best), kind="stable")
    query, product, best_row, best = query[order], product[order], best_row[order], best[order]
    found = np.bincount(query, minlength=queries)
    rank = np.arange(len(query)) - (np.cumsum(found) - found)[query]
    keep = rank < n
    at = (query[keep], rank[keep])
    products[at], rows[at], scores[at] = product[keep], best_row[keep], best[keep]
    return products, rows, scores, found


def served_scores(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The rows' dot products with one query as the server computes them (server/search.py similarities, one probe):
    each row summed on its own by the same einsum, so each score is the served one, bit for bit."""
    return np.einsum("ij,kj->ik", np.asarray(rows, np.float32), query[None, :])[:, 0]


def _served_scores(queries: np.ndarray, vectors: np.ndarray, query: np.ndarray, row: np.ndarray) -> np.ndarray:
    """served_scores of each (query, row) candidate, candidates grouped by query."""
    scores = np.empty(len(row), np.float32)
    bounds = np.flatnonzero(np.r_[True, query[1:] != query[:-1], True]).tolist()
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        scores[start:stop] = served_scores(vectors[row[start:stop]], queries[query[start]])
    return scores


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """float32 scores as int64 in [0, 2**32) ordered opposite to the scores (NaN-free input)."""
    bits = scores.astype(np.float32).view(np.uint32).astype(np.int64)
    ascending = np.where(bits >= 1 << 31, (1 << 32) - 1 - bits, bits + (1 << 31))
    return (1 << 32) - 1 - ascending
