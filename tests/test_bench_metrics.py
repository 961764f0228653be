"""The benchmark's quality metrics on hand-made cases."""

import numpy as np

from bench.quality import precision_and_map_at_10


def test_perfect_and_useless_rankings():
    labels = np.repeat(np.arange(10), 10)
    vectors = np.eye(10)[labels] + 0.001 * np.arange(100)[:, None]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    precision, average = precision_and_map_at_10(vectors, labels, vectors[::10], labels[::10])
    assert precision == 1.0 and abs(average - 1.0) < 1e-9
    wrong = (labels[::10] + 1) % 10
    precision, average = precision_and_map_at_10(vectors, labels, vectors[::10], wrong)
    assert precision == 0.0 and average == 0.0


def test_map_rewards_relevant_items_ranked_first():
    catalogue = np.eye(12)
    labels = np.array([0] * 5 + [1] * 7)
    relevant_first = np.array([[1.0, 0.99, 0.98, 0.97, 0.96, 0.6, 0.59, 0.58, 0.57, 0.56, 0.1, 0.1]])
    relevant_last = np.array([[0.6, 0.59, 0.58, 0.57, 0.56, 1.0, 0.99, 0.98, 0.97, 0.96, 0.1, 0.1]])
    first = precision_and_map_at_10(catalogue, labels, relevant_first, np.array([0]))
    last = precision_and_map_at_10(catalogue, labels, relevant_last, np.array([0]))
    assert first[0] == last[0] == 0.5
    assert first[1] == 1.0 and last[1] < first[1]
