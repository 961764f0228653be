"""Database-side augmentation: each catalogue vector the similarity-weighted mean of itself and its nearest."""

import numpy as np
import pytest

import builder.augment as augment_module
from builder.augment import augment
from builder.build import BuildConfig
from builder.model import l2_normalise


def _reference(vectors: np.ndarray, n: int) -> np.ndarray:
    """The definition, one row at a time in float64: the row itself (weight 1) plus its n most similar
    other rows, each weighted by its cosine clipped at 0, renormalised."""
    vectors = vectors.astype(np.float64)
    out = []
    for row, vector in enumerate(vectors):
        scores = vectors @ vector
        others = [other for other in np.argsort(-scores, kind="stable") if other != row][:n]
        total = vector + sum(max(scores[other], 0.0) * vectors[other] for other in others)
        out.append(total / np.linalg.norm(total))
    return np.array(out)


def test_augmentation_equals_the_numpy_reference_on_a_tiny_catalogue(monkeypatch):
    vectors = l2_normalise(np.random.default_rng(0).normal(size=(23, 6)))
    for n in (1, 3, 22):
        expected = _reference(vectors, n)
        assert np.allclose(augment(vectors, n), expected, atol=1e-5)
        # Scored a few rows at a time (as at ABO's size), the result is the same.
        monkeypatch.setattr(augment_module, "_SCORES_PER_BLOCK", 5 * len(vectors))
        assert np.allclose(augment(vectors, n), expected, atol=1e-5)
        monkeypatch.undo()
    # More neighbours than the catalogue has: every other row.
    assert np.allclose(augment(vectors, 40), _reference(vectors, 22), atol=1e-5)
    assert np.array_equal(augment(vectors, 0), vectors)


def test_augmentation_pulls_look_alikes_together_and_leaves_unit_vectors():
    # Two tight groups of near-duplicates: after augmentation each group is tighter still.
    rng = np.random.default_rng(1)
    centres = l2_normalise(rng.normal(size=(2, 8)))
    vectors = l2_normalise(np.repeat(centres, 5, axis=0) + rng.normal(0, 0.3, (10, 8)))
    augmented = augment(vectors, 4)
    assert np.allclose(np.linalg.norm(augmented, axis=1), 1.0, atol=1e-6)
    within = lambda v: np.mean([v[i] @ v[j] for g in (range(5), range(5, 10)) for i in g for j in g if i < j])  # noqa: E731
    assert within(augmented) > within(vectors) + 0.05


def test_the_number_of_neighbours_is_bounded(tmp_path):
    with pytest.raises(ValueError, match="augment_neighbours must be between 0 and 50, not -1"):
        BuildConfig(images=tmp_path, out=tmp_path, augment_neighbours=-1)
    with pytest.raises(ValueError, match="not 51"):
        augment(np.eye(3, dtype=np.float32), 51)


def test_the_quality_bench_augments_the_catalogue_and_never_the_queries():
    from bench.quality import with_augmented

    raw = np.random.default_rng(2).normal(size=(30, 5))
    seconds = {"pca": 1.0, "pca-whiten": 1.0}
    out = with_augmented({"pca": raw, "pca-whiten": raw}, 24, seconds)
    assert set(out) == {"pca", "pca + augment 3", "pca + augment 10", "pca-whiten"}
    unit = l2_normalise(raw)
    assert np.array_equal(out["pca + augment 3"][24:], unit[24:])
    assert np.allclose(out["pca + augment 3"][:24], _reference(unit[:24], 3), atol=1e-5)
    assert seconds["pca + augment 10"] >= 1.0
