"""Annoy build and the recall measurement against exact search."""

import numpy as np

import builder.index as index_module
from builder.index import build_with_recall, exact_neighbours
from builder.model import Projection, l2_normalise


def test_exact_neighbours_orders_by_similarity():
    vectors = l2_normalise(np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32))
    assert exact_neighbours(vectors, vectors[:1], 3).tolist() == [[0, 1, 2]]


def test_search_k_is_raised_until_recall_meets_target(tmp_path):
    vectors = l2_normalise(np.random.default_rng(0).normal(size=(3000, 32)))
    report = build_with_recall(vectors, str(tmp_path / "i.ann"), n_trees=4, target_recall=0.95,
                               sample_queries=200)
    assert report.recall_at_10 >= 0.95
    assert report.recall_by_search_k[report.search_k] == report.recall_at_10
    assert all(r < 0.95 for k, r in report.recall_by_search_k.items() if k < report.search_k)


def test_pca_projection_keeps_variance_order():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(500, 10)) * np.array([10, 5, 1, 1, 1, 1, 1, 1, 1, 1])
    projection = Projection.fit_pca(features, 2)
    projected = projection.apply(features)
    assert projected.shape == (500, 2)
    assert projected[:, 0].var() > projected[:, 1].var() > 4


def clustered_vectors(rows: int, seed: int = 0) -> np.ndarray:
    """Products of 1 to 4 images near each other, products near one of 40 type centres: like real embeddings."""
    rng = np.random.default_rng(seed)
    products = rng.normal(size=(40, 16))[rng.integers(0, 40, rows)] + 0.7 * rng.normal(size=(rows, 16))
    return l2_normalise((products + 0.2 * rng.normal(size=(rows, 16))).astype(np.float32))


def test_trees_and_search_k_are_chosen_together_and_every_candidate_is_recorded(tmp_path, monkeypatch):
    # No budget floor, so that this small catalogue tries more than one tree count.
    monkeypatch.setattr(index_module, "MIN_SEARCH_K_BUDGET", 0)
    report = build_with_recall(clustered_vectors(6000), str(tmp_path / "i.ann"), n_trees=2, target_recall=0.95,
                               sample_queries=200, max_n_trees=8)
    section = report.manifest("index.ann")
    tried = section["trees_tried"]
    assert [t["n_trees"] for t in tried] == [2, 4, 8][:len(tried)] and len(tried) >= 2
    assert section["kind"] == "annoy" and section["file"] == "index.ann" and section["max_n_trees"] == 8
    assert report.n_trees in [t["n_trees"] for t in tried] and report.recall_at_10 >= 0.95
    # Each tree count's search_k is the smallest measured reaching the target, and its cost is recorded.
    for t in tried:
        points = [c for c in section["candidates"] if c["n_trees"] == t["n_trees"]]
        assert t["recall_at_10"] >= 0.95 and t["ms_per_query"] > 0 and t["bytes"] > 0
        assert all(c["recall_at_10"] < 0.95 for c in points if c["search_k"] < t["search_k"])
    # The chosen count is the fewest within 10% of the fastest measured.
    fastest = min(t["ms_per_query"] for t in tried)
    assert report.n_trees == next(t["n_trees"] for t in tried if t["ms_per_query"] * 0.9 <= fastest)
    assert f"n_trees={report.n_trees} search_k={report.search_k}" in section["reason"]
    # Only the chosen index is left beside the path.
    assert [p.name for p in tmp_path.iterdir()] == ["i.ann"]


def test_a_small_catalogue_builds_one_tree_count(tmp_path):
    report = build_with_recall(clustered_vectors(1500), str(tmp_path / "i.ann"), n_trees=10, target_recall=0.95,
                               sample_queries=200)
    assert [t["n_trees"] for t in report.extra["trees_tried"]] == [10] and report.n_trees == 10
    assert report.search_k <= report.extra["max_search_k"]
