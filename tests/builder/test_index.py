"""Annoy build and the recall measurement against exact search."""

import numpy as np

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
