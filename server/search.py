"""Product search: a plan per query (exact or the version's index), results grouped until k distinct products."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike import artifacts
from server.catalogue import Catalogue

# Plans, in the order a query may go through them; each choice is counted in a metric. "annoy" is the plan that
# searches the version's index, whichever it is (Annoy or HNSW): the metric's label values stay as they were.
EXACT, ANNOY, ANNOY_THEN_EXACT = "exact", "annoy", "annoy_then_exact"
PLANS = (EXACT, ANNOY, ANNOY_THEN_EXACT)
MAX_NODE_BUDGET = 2**31 - 1
# The rows an image query first looks at for its own products (identical images): four times more while all are,
# up to OWN_ROWS_MOST; beyond, an exact scan (tens of ms at ABO's size, for a photo that many rows share).
OWN_ROWS_FIRST = 16
OWN_ROWS_MOST = 1024


class NearestIndex(Protocol):
    """A version's approximate nearest-neighbour index over its rows, Annoy or HNSW: what the plans need of it."""

    def nearest(self, vector: np.ndarray, n: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to n rows nearest the unit vector, nearest first, and their euclidean distances. `budget` is the
        version's per-query budget for 10 neighbours in the index's own unit (Annoy's search_k, HNSW's ef),
        the manifest's or a request's; the index scales it for n."""
        ...

    def __len__(self) -> int: ...

    def unload(self) -> None: ...


class AnnoyNeighbours:
    """Annoy's file, memory-mapped: replicas on one host share its pages."""

    def __init__(self, path: Path, dimension: int, n_trees: int, metric: str = "euclidean") -> None:
        from annoy import AnnoyIndex

        self.n_trees = n_trees
        self._annoy = AnnoyIndex(dimension, metric)
        # Not prefaulted: Annoy maps the file holding the interpreter, and prefaulting 255 MB at ABO's size held it
        # (so the event loop serving the previous version) for 14 ms. The file's pages are in the page cache (the
        # manifest's check has just read them); the first searches map them as they fault, outside the interpreter
        # (measured: 1 ms more over each of the first ten 51,200-node searches).
        if not self._annoy.load(str(path), prefault=False):
            raise artifacts.ArtifactError(f"annoy could not load {path}")

    def __len__(self) -> int:
        return self._annoy.get_n_items()

    def nearest(self, vector: np.ndarray, n: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        # search_k reaches the target recall for 10 neighbours; Annoy counts nodes in a C int: a budget past it
        # would overflow (and cost seconds anyway).
        node_budget = min(max(budget * n // 10, n * self.n_trees), MAX_NODE_BUDGET)
        rows, distances = self._annoy.get_nns_by_vector(np.asarray(vector, np.float32).tolist(), n,
                                                        search_k=node_budget, include_distances=True)
        return np.asarray(rows, np.int64), np.asarray(distances, np.float32)

    def unload(self) -> None:
        self._annoy.unload()


class HnswNeighbours:
    """hnswlib's graph, read into this process's memory (hnswlib cannot map it: every worker holds a copy)."""

    def __init__(self, path: Path, dimension: int, rows: int) -> None:
        import hnswlib

        self._hnsw = hnswlib.Index(space="l2", dim=dimension)
        try:
            self._hnsw.load_index(str(path), max_elements=rows)
        except RuntimeError as error:
            raise artifacts.ArtifactError(f"hnswlib could not load {path}: {error}") from error
        # One query is one search on the calling thread: the index pool's threads are the parallelism.
        self._hnsw.set_num_threads(1)

    def __len__(self) -> int:
        return self._hnsw.get_current_count()

    def nearest(self, vector: np.ndarray, n: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
        # hnswlib searches max(ef, k) wide: asking for ef neighbours and keeping n is a search at ef with no
        # shared ef setting to change under another thread's query.
        width = min(len(self), max(n, budget * n // 10))
        try:
            labels, squared = self._hnsw.knn_query(np.asarray(vector, np.float32), k=width)
        except RuntimeError:
            # The graph could not return `width` rows (a very wide query on a small graph): a short answer,
            # which the plans treat as such and complete with an exact scan.
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return labels[0, :n].astype(np.int64), np.sqrt(np.maximum(squared[0, :n], 0)).astype(np.float32)

    def unload(self) -> None:
        # The graph is this process's memory: dropping the last reference frees it.
        self._hnsw = None


def open_index(kind: str, path: Path, dimension: int, rows: int, n_trees: int,
               metric: str = "euclidean") -> NearestIndex:
    """The index a version's manifest names: "annoy" (every version before HNSW) or "hnsw"."""
    if kind == "annoy":
        return AnnoyNeighbours(path, dimension, n_trees, metric)
    if kind == "hnsw":
        return HnswNeighbours(path, dimension, rows)
    raise artifacts.ArtifactError(f"unknown index kind {kind!r} (annoy or hnsw)")


@dataclass(frozen=True)
class SearchConfig:
    """How a query is planned."""

    # Exact search when the rows a query may return are this many or fewer: it is then as fast as
    # Annoy and never misses (the crossover is measured in BENCHMARKS.md). Above it, Annoy.
    exact_max_rows: int = 4096
    # Annoy candidates per wanted product, divided by the share of rows the query may return: room
    # for a product's other images and for rows a filter rejects.
    fanout: float = 3.0
    # Annoy rounds, each fetching 4x more candidates, before the plan falls back to exact search.
    annoy_rounds: int = 3

    def __post_init__(self) -> None:
        if self.exact_max_rows < 0 or self.fanout < 1 or self.annoy_rounds < 1:
            raise ValueError("exact_max_rows >= 0, fanout >= 1 and annoy_rounds >= 1")


class Scorer(Protocol):
    """What a query is, to the search: probes to fetch Annoy candidates with, and an exact score.

    A scorer without probes (a recommendation from negative examples only) is answered exactly."""

    probes: np.ndarray  # [Q, D] unit vectors

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """One score per row, larger is better: what results are ranked by."""
        ...

    def distances(self, vectors: np.ndarray) -> np.ndarray:
        """Euclidean distance of each row to the nearest probe, computed directly (exact near 0)."""
        ...


def similarities(vectors: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """[rows, probes] dot products, each summed on its own: a row's score does not depend on which other rows
    are scored with it (a matrix product's rounding does), so every plan reports the same score for a row."""
    return np.einsum("ij,kj->ik", np.asarray(vectors, np.float32), probes)


class NearestScorer:
    """Cosine similarity to the nearest of the probes (one probe: a plain nearest-neighbour query)."""

    def __init__(self, probes: np.ndarray) -> None:
        # A by-id query's vectors come as [m, D] float32 already: no conversions to call.
        ready = isinstance(probes, np.ndarray) and probes.ndim == 2 and probes.dtype == np.float32
        self.probes = probes if ready else np.atleast_2d(np.asarray(probes, np.float32))

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        found = similarities(vectors, self.probes)
        return found[:, 0] if len(self.probes) == 1 else found.max(axis=1)  # one probe: no reduction to make

    def distances(self, vectors: np.ndarray) -> np.ndarray:
        return nearest_distances(vectors, self.probes)


class BestScoreScorer:
    """Qdrant's best_score recommendation: a row's score is its best similarity to a positive example when
    that beats its best similarity to a negative one, else minus the square of the latter. Positives are the
    probes; the distance reported is to the nearest positive (to the nearest negative when there are none)."""

    def __init__(self, positives: np.ndarray, negatives: np.ndarray) -> None:
        self.probes = np.asarray(positives, np.float32).reshape(-1, negatives.shape[-1])
        self.negatives = np.asarray(negatives, np.float32).reshape(-1, negatives.shape[-1])
        if not len(self.probes) and not len(self.negatives):
            raise ValueError("best_score needs at least one example")

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, np.float32)
        worst = np.full(len(vectors), -np.inf, np.float32)
        positive = similarities(vectors, self.probes).max(axis=1) if len(self.probes) else worst
        negative = similarities(vectors, self.negatives).max(axis=1) if len(self.negatives) else worst
        return np.where(positive > negative, positive, -np.square(negative)).astype(np.float32)

    def distances(self, vectors: np.ndarray) -> np.ndarray:
        return nearest_distances(vectors, self.probes if len(self.probes) else self.negatives)


class SumScoresScorer:
    """Qdrant's sum_scores recommendation: a row's score is the sum of its similarities to the positive examples
    minus the sum of its similarities to the negative ones, an example's similarity being that of its nearest
    vector (a product example under product_query "max" has several). Positives are the probes; the distance
    reported is to the nearest positive (to the nearest negative when there are none)."""

    def __init__(self, positives: list[np.ndarray], negatives: list[np.ndarray], dimension: int) -> None:
        if not positives and not negatives:
            raise ValueError("sum_scores needs at least one example")
        self._positives = [np.asarray(v, np.float32).reshape(-1, dimension) for v in positives]
        self._negatives = [np.asarray(v, np.float32).reshape(-1, dimension) for v in negatives]
        self.probes = (np.concatenate(self._positives) if positives else np.zeros((0, dimension), np.float32))
        self._nearest = self.probes if positives else np.concatenate(self._negatives)

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, np.float32)
        total = np.zeros(len(vectors), np.float32)
        for sign, side in ((1, self._positives), (-1, self._negatives)):
            for example in side:
                total += sign * similarities(vectors, example).max(axis=1)
        return total

    def bound(self, reach: float) -> float:
        """The best score a row no probe fetched can have, when each probe's rows reach similarity `reach`."""
        return len(self._positives) * reach + len(self._negatives)

    def distances(self, vectors: np.ndarray) -> np.ndarray:
        return nearest_distances(vectors, self._nearest)


def average_vector(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """Qdrant's average_vector recommendation: avg(positive) + (avg(positive) - avg(negative)), unit length."""
    query = np.asarray(positives, np.float32).mean(axis=0)
    if len(negatives):
        query = 2 * query - np.asarray(negatives, np.float32).mean(axis=0)
    norm = float(np.linalg.norm(query))
    if norm < 1e-12:
        raise ValueError("the examples cancel out: their average vector has no direction")
    return query / norm


def nearest_distances(vectors: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """min over probes of ||row - probe||, from differences: a dot product loses precision near 0."""
    vectors = np.asarray(vectors, np.float32)
    if len(probes) == 1:
        # np.linalg.norm's own sum (each row's squares reduced in one run) without its wrapper or the min over one
        # probe: the same bits, in half the time of a list answer's distances.
        differences = vectors - probes[0]
        return np.sqrt(np.add.reduce(differences * differences, axis=1))
    return np.linalg.norm(vectors[:, None, :] - probes[None, :, :], axis=2).min(axis=1)


@dataclass(frozen=True)
class ProductHit:
    """One result product: its rows best first (at least the best one), with their scores."""

    product_row: int
    rows: np.ndarray
    scores: np.ndarray
    distances: np.ndarray
    # The search whose catalogue the rows are of: the version's, or the fresh products' (server/fresh.py).
    segment: ProductSearch | None = None

    @property
    def score(self) -> float:
        return float(self.scores[0])

    @property
    def distance(self) -> float:
        return float(self.distances[0])


@dataclass(frozen=True)
class SearchResult:
    hits: list[ProductHit]
    plan: str


def csr_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of the ranges [start, start + count): rows of several products at once."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.repeat(starts - np.cumsum(counts) + counts, counts)
    return shift + np.arange(total, dtype=np.int64)


def top_products(scores: np.ndarray, products: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into scores) of the best row of each of the k best products, best first.

    Only the top rows are sorted; when they hold fewer than k products, more are taken. Products
    missing from the top t rows cannot beat those found in them, so the answer is exact. Equal scores (one photo
    in two products) go to the lower product row, as in the builder's neighbour lists, so that every plan
    returns the same products: every row tied with the t-th is taken, not whichever the partition kept.
    """
    n = len(scores)
    t = min(n, max(4 * k, 64))
    while True:
        if t < n:
            cutoff = scores[np.argpartition(-scores, t - 1)[t - 1]]
            top = np.flatnonzero(scores >= cutoff)
        else:
            top = np.arange(n)
        top = top[np.lexsort((products[top], -scores[top]))]
        _, first = np.unique(products[top], return_index=True)
        if len(first) >= k or t >= n:
            return top[np.sort(first)[:k]], products[top[np.sort(first)[:k]]]
        t = min(n, t * 4)


class ProductSearch:
    """The index of one version: Annoy or HNSW over the unit vectors, the vectors themselves, the catalogue. Without
    an index file (the fresh products of deltas, few by construction), every plan is exact."""

    def __init__(self, catalogue: Catalogue, vectors: np.ndarray, index_path: Path | None, search_k: int, n_trees: int,
                 config: SearchConfig = SearchConfig(), metric: str = "euclidean", kind: str = "annoy") -> None:
        self.catalogue = catalogue
        # A plain ndarray over the same mapped pages: numpy's memmap subclass costs more per slice than
        # the slice itself (measured: a fifth of a by-product query's time).
        self.vectors = vectors.view(np.ndarray) if isinstance(vectors, np.memmap) else vectors
        self.dimension = int(vectors.shape[1])
        self.search_k = search_k
        self.n_trees = n_trees
        self.config = config
        # search_k is the per-query budget in this index's unit: Annoy's search_k, HNSW's ef.
        self.kind = kind
        self.ann = None if index_path is None else open_index(kind, index_path, self.dimension, len(vectors), n_trees,
                                                              metric)
        if self.ann is not None and len(self.ann) != len(vectors):
            raise artifacts.ArtifactError(f"index has {len(self.ann)} images, the tables {len(vectors)}")

    def __len__(self) -> int:
        return len(self.vectors)

    def product_mask(self, allowed: np.ndarray | None, excluded: np.ndarray) -> np.ndarray | None:
        """Products a result may come from, or None for all of them."""
        if allowed is None and len(excluded) == 0:
            return None
        mask = np.ones(self.catalogue.product_count, bool) if allowed is None else allowed.copy()
        mask[excluded] = False
        return mask

    def search(self, scorer: Scorer, k: int, allowed: np.ndarray | None = None,
               excluded: np.ndarray | None = None, search_k: int = 0, group_size: int = 0,
               score_threshold: float | None = None) -> SearchResult:
        """The k best products for the scorer among the allowed ones, none of the excluded ones, none whose
        best image scores below score_threshold."""
        excluded = np.zeros(0, np.int64) if excluded is None else np.asarray(excluded, np.int64)
        mask = self.product_mask(allowed, excluded)
        counts = self.catalogue.image_count
        eligible_rows = len(self) if mask is None else int(counts[mask].sum())
        eligible_products = self.catalogue.product_count if mask is None else int(mask.sum())
        if eligible_rows == 0:
            return SearchResult([], EXACT)
        plan, found = EXACT, None
        if self.ann is not None and eligible_rows > self.config.exact_max_rows and eligible_products > k \
                and len(scorer.probes):
            plan = ANNOY
            found = self._annoy_search(scorer, k, mask, eligible_rows / len(self), search_k or self.search_k,
                                       score_threshold)
        if found is None:
            plan = ANNOY_THEN_EXACT if plan == ANNOY else EXACT
            found = self._exact_search(scorer, k, mask, score_threshold)
        hits = self.describe(scorer, found, group_size)
        if score_threshold is not None:
            # Scored again as served (another matrix product than the plan's): the threshold holds on what is
            # reported, to the last bit.
            hits = [hit for hit in hits if hit.score >= score_threshold]
        return SearchResult(hits, plan)

    def _exact_search(self, scorer: Scorer, k: int, mask: np.ndarray | None,
                      score_threshold: float | None) -> np.ndarray:
        products = self.catalogue.row_product
        if mask is None:
            scores = scorer.scores(self.vectors)
        elif 2 * int(self.catalogue.image_count[mask].sum()) >= len(self):
            # Most rows are allowed (say, all but the query's product): scoring every row and dropping the
            # few is cheaper than gathering the allowed rows' vectors.
            keep = mask[products]
            scores, products = scorer.scores(self.vectors)[keep], products[keep]
        else:
            rows = csr_rows(self.catalogue.first_row[mask], self.catalogue.image_count[mask])
            scores, products = scorer.scores(self.vectors[rows]), products[rows]
        if score_threshold is not None:
            keep = scores >= score_threshold
            scores, products = scores[keep], products[keep]
            if not len(scores):
                return np.zeros(0, np.int64)
        _, found = top_products(scores, products, k)
        return found

    def _annoy_search(self, scorer: Scorer, k: int, mask: np.ndarray | None, selectivity: float,
                      search_k: int, score_threshold: float | None) -> np.ndarray | None:
        """Annoy candidates, over-fetched for the filter's selectivity; None when rounds come back short.

        With a score threshold, fewer than k is the answer once every probe's farthest candidate is below
        it: rows not fetched are farther still (as far as Annoy can tell), so they are below it too."""
        wanted = min(len(self), max(k, math.ceil(k * self.config.fanout / selectivity)))
        for _ in range(self.config.annoy_rounds):
            # The manifest's search_k is what reaches the target recall for 10 neighbours; the index scales it.
            candidates: set[int] = set()
            reach = -np.inf  # the best similarity a row that no probe fetched can have
            for probe in scorer.probes:
                found_rows, distances = self.ann.nearest(probe, wanted, search_k)
                candidates.update(found_rows.tolist())
                # A probe that came back short says nothing of the rows it did not reach.
                reach = max(reach, 1 - distances[-1] ** 2 / 2 if len(found_rows) == wanted else np.inf)
            rows = np.fromiter(candidates, np.int64, len(candidates))
            products = self.catalogue.row_product[rows]
            if mask is not None:
                keep = mask[products]
                rows, products = rows[keep], products[keep]
            scores = scorer.scores(self.vectors[rows])
            # A scorer summing several similarities bounds an unfetched row's score otherwise than by `reach`.
            bound = scorer.bound(reach) if hasattr(scorer, "bound") else reach
            complete = score_threshold is not None and bound < score_threshold
            if score_threshold is not None:
                keep = scores >= score_threshold
                rows, products, scores = rows[keep], products[keep], scores[keep]
            if len(rows):
                _, found = top_products(scores, products, k)
                if len(found) >= k or complete:
                    return found
            elif complete:
                return np.zeros(0, np.int64)
            if wanted >= len(self):
                return None
            wanted = min(len(self), wanted * 4)
        return None

    def describe(self, scorer: Scorer, products: np.ndarray, group_size: int) -> list[ProductHit]:
        """Every image of each found product scored exactly: its best image and its group, best first."""
        if len(products) == 0:
            return []
        counts = self.catalogue.image_count[products]
        rows = csr_rows(self.catalogue.first_row[products], counts)
        vectors = self.vectors[rows]
        scores, distances = scorer.scores(vectors), scorer.distances(vectors)
        # One sort for every product: by product, then best score first (lexsort is stable, so equal scores keep
        # row order); each product's rows are then a run of `order` starting where its rows start.
        order = np.lexsort((-scores, np.repeat(np.arange(len(products)), counts)))
        rows, scores, distances = rows[order], scores[order], distances[order]
        starts = (np.cumsum(counts) - counts).tolist()
        ends = np.minimum(np.asarray(starts) + max(1, group_size), np.cumsum(counts)).tolist()
        ranked = np.argsort(-scores[starts], kind="stable").tolist()  # products by their best score
        product_rows = products.tolist()
        return [ProductHit(product_rows[n], rows[starts[n]:ends[n]], scores[starts[n]:ends[n]],
                           distances[starts[n]:ends[n]], self) for n in ranked]

    def describe_rows(self, scorer: Scorer, products: np.ndarray, rows: np.ndarray) -> list[ProductHit]:
        """Each found product by one given row (its best image, named by a neighbour list), scored exactly, best
        first: describe's answer for a group of one, without scoring the products' other images."""
        rows = np.asarray(rows, np.int64)
        vectors = self.vectors[rows]
        scores, distances = scorer.scores(vectors), scorer.distances(vectors)
        product_rows = products.tolist()
        return [ProductHit(product_rows[n], rows[n:n + 1], scores[n:n + 1], distances[n:n + 1], self)
                for n in np.argsort(-scores, kind="stable").tolist()]

    def products_at(self, vector: np.ndarray, max_distance: float) -> list[int]:
        """Products owning an image within max_distance of the vector: an image query's own products."""
        close = None
        if self.ann is not None and len(self) > self.config.exact_max_rows:
            # The index's nearest rows, four times more while all of them are the photo (a placeholder may be every
            # row of dozens of products); past OWN_ROWS_MOST, or when the index answers short, every row is scanned.
            wanted = OWN_ROWS_FIRST
            while close is None and wanted <= OWN_ROWS_MOST:
                rows = self.ann.nearest(vector, wanted, self.search_k)[0]
                if len(rows) < min(wanted, len(self)):
                    break  # an index that could not answer (hnswlib at a width near its size): scan
                near = nearest_distances(self.vectors[rows], vector[None, :]) <= max_distance
                if not near.all() or wanted >= len(self):
                    close = rows[near]
                wanted *= 4
        if close is None:
            rows = np.arange(len(self))
            close = rows[nearest_distances(self.vectors[rows], vector[None, :]) <= max_distance]
        return sorted({int(p) for p in self.catalogue.row_product[close]})

    def unload(self) -> None:
        if self.ann is not None:
            self.ann.unload()
