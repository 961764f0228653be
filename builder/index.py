"""The index over unit vectors (Annoy, or hnswlib's HNSW): built, measured against exact search (recall@10
and query time), and its query budget (Annoy's trees and search_k together, HNSW's ef) chosen from the figures."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

METRIC = "euclidean"
ANNOY, HNSW = "annoy", "hnsw"
INDEX_KINDS = (ANNOY, HNSW)
# The tree counts tried run from --n-trees, doubling, up to this cap. At 128-d each tree adds about 12 bytes per
# row to the mapped file and build time grows with the trees: at ABO's size (bench/index_scale.py) 80 trees are
# 556 MB against 245 MB for 10 and took 6x as long to build, and reached recall@10 0.95 at about the same search_k.
MAX_N_TREES = 80
# Trees double while a doubling cuts the search_k reaching the target by this much (a count, so that noisy
# timings do not decide when to stop building), and more trees win only when their query is measured this
# much faster: fewer trees are a smaller file and a faster build.
MIN_GAIN = 0.10
# Annoy's per-query budget: a search_k past this share of the rows is dearer than an exact scan of them all
# (measured: 51,200 of 395,039 rows cost 8.9 ms against 20.9 ms for numpy's exact scan, issue 17).
MAX_SEARCH_K_SHARE = 0.25
# Below this many candidates a query costs a fraction of a millisecond whatever the trees: more trees are
# tried only when the fewest need a larger search_k, and the budget is never smaller (the server answers a
# catalogue of up to 4,096 rows exactly anyway). Small catalogues (the tests') then build one tree count.
MIN_SEARCH_K_BUDGET = 4096
# Rounds of the side-by-side timing of the tree counts that reached the target (the best of each kept).
RUNOFF_ROUNDS = 3
# HNSW's graph, as measured at ABO's size (bench/index_scale.py): M = 16 links per node reached recall@10 0.95 at
# ef 48 to 64 in the 0.18 ms M = 32 took at ef 48, with 289 MB per worker against 338; ef_construction 100
# (hnswlib suggests 200, which about doubles a build that already takes two minutes at that size).
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 100
HNSW_EFS = (10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class IndexReport:
    n_trees: int
    search_k: int
    recall_at_10: float
    recall_by_search_k: dict[int, float]
    queries: int
    # Annoy or HNSW. For HNSW, n_trees is 0 and search_k is ef_search: the per-query budget in the index's unit.
    kind: str = ANNOY
    # Median single-thread milliseconds per 10-neighbour query at the chosen budget (noisy: a shared machine).
    ms_per_query: float | None = None
    # Every (n_trees, search_k) or ef pair measured, with its recall and query time, and why the choice won.
    candidates: tuple[dict, ...] = ()
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def manifest(self, file: str) -> dict:
        """The manifest's `index` section: what was built, what was tried and why this budget."""
        section = {"kind": self.kind, "file": file, "n_trees": self.n_trees, "search_k": self.search_k,
                   "recall_at_10": round(self.recall_at_10, 4), "recall_queries": self.queries,
                   "recall_by_search_k": {str(k): round(v, 4) for k, v in self.recall_by_search_k.items()},
                   "ms_per_query": self.ms_per_query, "reason": self.reason,
                   "candidates": [{**c, "recall_at_10": round(c["recall_at_10"], 4)} for c in self.candidates],
                   **self.extra}
        if self.kind == HNSW:
            section["ef_search"] = self.search_k
        return section


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
                      sample_queries: int = 500, seed: int = 42, max_n_trees: int = MAX_N_TREES) -> IndexReport:
    """Annoy's trees and search_k chosen together: the pair whose measured query is the fastest to reach the
    target recall@10, preferring pairs within the per-query budget (search_k at most MAX_SEARCH_K_SHARE of the
    rows) under a size cap (at most max_n_trees trees).

    Tree counts run from n_trees, doubling; for each, the smallest search_k (rising by sqrt(2) from n_trees * 10,
    up to a full scan's worth) reaching the target. More trees stop being built once a doubling makes that
    search_k less than MIN_GAIN smaller, or once it needs no more than MIN_SEARCH_K_BUDGET. The tree counts are
    then timed again side by side (RUNOFF_ROUNDS rounds, the best of each kept, so that a burst of load on a
    shared host does not decide), and of those within the budget (all of them when none is) the fewest trees
    within MIN_GAIN of the fastest win.
    """
    query_ids, truth = _sample(vectors, sample_queries, seed)
    k = truth.shape[1]
    budget = max(int(len(vectors) * MAX_SEARCH_K_SHARE), n_trees * k, MIN_SEARCH_K_BUDGET)
    max_n_trees = max(max_n_trees, n_trees)
    target = Path(path)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    candidates: list[dict] = []
    tried: list[dict] = []
    try:
        trees, fewest = n_trees, np.inf
        while True:
            built, points = _annoy_candidate(vectors, work / f"{trees}.ann", trees, seed, query_ids, truth,
                                             target_recall)
            candidates += [{"n_trees": trees, **point} for point in points]
            cheapest = reaching(points, target_recall)
            tried.append({**built, **cheapest, "within_budget": cheapest["search_k"] <= budget})
            cheaper = cheapest["search_k"] < fewest * (1 - MIN_GAIN)
            fewest = min(fewest, cheapest["search_k"])
            if trees * 2 > max_n_trees or not cheaper or cheapest["search_k"] <= MIN_SEARCH_K_BUDGET:
                break
            trees *= 2
        chosen = _runoff([t for t in tried if t["within_budget"]] or tried, work, vectors, query_ids, k)
        os.replace(work / f"{chosen['n_trees']}.ann", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    points = [p for p in candidates if p["n_trees"] == chosen["n_trees"]]
    reason = (f"n_trees={chosen['n_trees']} search_k={chosen['search_k']}: of the (trees, search_k) pairs "
              f"reaching recall@10 {target_recall} with search_k <= {budget} (the per-query budget: "
              f"{MAX_SEARCH_K_SHARE:.0%} of the rows, past which an exact scan is cheaper, and at least "
              f"{MIN_SEARCH_K_BUDGET}) and n_trees <= {max_n_trees}, the fewest trees whose query is "
              f"within {MIN_GAIN:.0%} of the fastest measured (more trees: a bigger file, a slower build); trees "
              f"doubled while that cut search_k by {MIN_GAIN:.0%} and it needed search_k > "
              f"{MIN_SEARCH_K_BUDGET}. Tried: "
              + "; ".join(f"{t['n_trees']} trees ({t['bytes'] / 2**20:.1f} MB, built in {t['build_seconds']} s): "
                          f"search_k {t['search_k']}, recall@10 {t['recall_at_10']:.4f}, {t['ms_per_query']} ms"
                          for t in tried))
    if not chosen["within_budget"]:
        reason += "; no pair reached the target within the per-query budget: it was exceeded"
        log.warning("no search_k up to %d reaches recall@10 %.3f with up to %d trees: search_k %d chosen", budget,
                    target_recall, trees, chosen["search_k"])
    log.info("index: %s", reason)
    return IndexReport(chosen["n_trees"], chosen["search_k"], chosen["recall_at_10"],
                       {p["search_k"]: p["recall_at_10"] for p in points}, len(query_ids), ANNOY,
                       chosen["ms_per_query"], tuple(candidates), reason,
                       {"max_search_k": budget, "max_n_trees": max_n_trees, "trees_tried": tried})


def _annoy_candidate(vectors: np.ndarray, file: Path, trees: int, seed: int, query_ids: np.ndarray,
                     truth: np.ndarray, target_recall: float) -> tuple[dict, list[dict]]:
    """One tree count: built into `file`, then its search_k sweep until the target (a full scan's worth at most)."""
    begin = time.perf_counter()
    index = build_annoy(vectors, trees, str(file), seed)
    built = {"n_trees": trees, "build_seconds": round(time.perf_counter() - begin, 2), "bytes": file.stat().st_size}
    start = trees * truth.shape[1]
    points = _search_k_sweep(index, vectors, query_ids, truth, start, max(len(vectors) * 4, start), target_recall)
    index.unload()
    return built, points


def _runoff(reached: list[dict], work: Path, vectors: np.ndarray, query_ids: np.ndarray, k: int) -> dict:
    """The tree counts, timed again in turns at their search_k (each its best of RUNOFF_ROUNDS medians); the
    fewest trees within MIN_GAIN of the fastest."""
    if len(reached) > 1:
        indexes = [_load_annoy(work / f"{t['n_trees']}.ann", vectors.shape[1]) for t in reached]
        best = [np.inf] * len(reached)
        for _ in range(RUNOFF_ROUNDS):
            for i, (index, t) in enumerate(zip(indexes, reached, strict=True)):
                best[i] = min(best[i], _median_ms(lambda v, x=index, s=t["search_k"]: x.get_nns_by_vector(
                    v, k, search_k=s), vectors[query_ids]))
        for index in indexes:
            index.unload()
        for t, ms in zip(reached, best, strict=True):
            t["ms_per_query"] = round(ms, 4)
    fastest = min(t["ms_per_query"] for t in reached)
    return next(t for t in reached if t["ms_per_query"] * (1 - MIN_GAIN) <= fastest)


def build_hnsw_with_recall(vectors: np.ndarray, path: str, target_recall: float, sample_queries: int = 500,
                           seed: int = 42, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION
                           ) -> IndexReport:
    """An hnswlib graph saved in hnswlib's own format, and the smallest ef_search whose recall@10 meets the
    target. The server searches with k = max(n, ef) (hnswlib's search width is max(ef, k)), so no shared
    ef setting changes between queries; the builder measures the same way."""
    import hnswlib

    query_ids, truth = _sample(vectors, sample_queries, seed)
    k = truth.shape[1]
    begin = time.perf_counter()
    index = hnswlib.Index(space="l2", dim=int(vectors.shape[1]))
    index.init_index(max_elements=len(vectors), ef_construction=ef_construction, M=m, random_seed=seed)
    index.add_items(np.ascontiguousarray(vectors, np.float32), np.arange(len(vectors)),
                    num_threads=os.cpu_count() or 1)
    build_seconds = round(time.perf_counter() - begin, 2)
    index.save_index(path)
    index.set_num_threads(1)
    points = []
    efs = [ef for ef in HNSW_EFS if ef < len(vectors)] + [len(vectors)]
    for ef in efs:
        width = max(k, ef)
        recall, ms = _measure(lambda v, w=width: index.knn_query(v, k=w)[0][0][:k], vectors, query_ids, truth)
        points.append({"ef_search": ef, "recall_at_10": recall, "ms_per_query": ms})
        log.info("hnsw M=%d ef=%d recall@10=%.4f %.3f ms", m, ef, recall, ms)
        if recall >= target_recall:
            break
    chosen = points[-1]
    reason = (f"ef_search={chosen['ef_search']}: the smallest ef whose recall@10 reaches {target_recall} "
              f"(M={m}, ef_construction={ef_construction})")
    return IndexReport(0, chosen["ef_search"], chosen["recall_at_10"],
                       {p["ef_search"]: p["recall_at_10"] for p in points}, len(query_ids), HNSW,
                       chosen["ms_per_query"], tuple(points), reason,
                       {"M": m, "ef_construction": ef_construction, "build_seconds": build_seconds,
                        "bytes": Path(path).stat().st_size})


def build_index(kind: str, vectors: np.ndarray, folder: Path, n_trees: int, target_recall: float,
                sample_queries: int = 500, seed: int = 42) -> tuple[str, IndexReport]:
    """The version's index of the given kind in `folder`: its file name (as the manifest lists it) and report."""
    from lookalike import artifacts

    if kind == ANNOY:
        return artifacts.INDEX_FILE, build_with_recall(vectors, str(folder / artifacts.INDEX_FILE), n_trees,
                                                       target_recall, sample_queries, seed)
    if kind == HNSW:
        return artifacts.HNSW_INDEX_FILE, build_hnsw_with_recall(vectors, str(folder / artifacts.HNSW_INDEX_FILE),
                                                                 target_recall, sample_queries, seed)
    raise ValueError(f"index must be one of {INDEX_KINDS}, not {kind!r}")


def _sample(vectors: np.ndarray, sample_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Catalogue rows to measure with, and their exact top 10."""
    rng = np.random.default_rng(seed)
    query_ids = rng.choice(len(vectors), size=min(sample_queries, len(vectors)), replace=False)
    return query_ids, exact_neighbours(vectors, vectors[query_ids], min(10, len(vectors)))


def _median_ms(query, queries: np.ndarray) -> float:
    """Median milliseconds of query(vector) over the queries, on this thread."""
    ms = np.empty(len(queries))
    for i, vector in enumerate(queries):
        begin = time.perf_counter()
        query(vector)
        ms[i] = time.perf_counter() - begin
    return float(np.median(ms)) * 1000


def _measure(query, vectors: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """recall@10 of query(vector) -> rows against the truth, and its median milliseconds (this thread only)."""
    hits, ms = 0, np.empty(len(query_ids))
    for i, (row, expected) in enumerate(zip(query_ids, truth, strict=True)):
        begin = time.perf_counter()
        found = query(vectors[row])
        ms[i] = time.perf_counter() - begin
        hits += len(np.intersect1d(np.asarray(found, np.int64), expected))
    return hits / truth.size, round(float(np.median(ms)) * 1000, 4)


def _search_k_sweep(index, vectors: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, start: int, stop: int,
                    target_recall: float) -> list[dict]:
    """search_k from start rising by sqrt(2) (at least one), up to stop or the first that reaches the target, then
    once halfway (geometrically) back towards the last that did not; by search_k. The chosen one is the first
    reaching the target (`reaching`)."""
    k = truth.shape[1]
    points = []

    def measure(search_k: int) -> dict:
        recall, ms = _measure(lambda v: index.get_nns_by_vector(v, k, search_k=search_k), vectors, query_ids, truth)
        log.info("n_trees=%d search_k=%d recall@10=%.4f %.3f ms", index.get_n_trees(), search_k, recall, ms)
        return {"search_k": search_k, "recall_at_10": recall, "ms_per_query": ms}

    for step in range(200):
        search_k = round(start * 2 ** (step / 2))
        if step and search_k > stop:
            break
        points.append(measure(search_k))
        if points[-1]["recall_at_10"] >= target_recall:
            if len(points) > 1:
                points.insert(-1, measure(round((points[-2]["search_k"] * search_k) ** 0.5)))
            break
    return points


def reaching(points: list[dict], target_recall: float) -> dict:
    """The first point (the smallest search_k or ef) reaching the target, else the last (the best tried)."""
    return next((p for p in points if p["recall_at_10"] >= target_recall), points[-1])


def _load_annoy(path: Path, dimension: int):
    from annoy import AnnoyIndex

    index = AnnoyIndex(dimension, METRIC)
    index.load(str(path))
    return index
