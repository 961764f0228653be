"""The heads and poolings a build can bake into its model: what each computes, on synthetic features."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from builder.build import BuildConfig, choose_head
from builder.model import LabelError, Projection, build_trunk, export, fit_head, gem_pool, l2_normalise, pool
from lookalike.runner import SavedModelEmbedder


def _precision_at_10(vectors: np.ndarray, labels: np.ndarray, n: int) -> float:
    vectors = l2_normalise(vectors)
    top = np.argsort(-(vectors[n:] @ vectors[:n].T), axis=1)[:, :10]
    return float((labels[:n][top] == labels[n:, None]).mean())


def _types_in_quiet_axes(rng, rows: int, types: int = 4):
    """Loud axes carry no product type; four quiet axes carry it. PCA keeps the loud ones."""
    labels = rng.integers(0, types, rows)
    loud = rng.normal(0, 10.0, (rows, 12))
    quiet = np.eye(types)[labels] * 1.0 + rng.normal(0, 0.3, (rows, types))
    return np.hstack([loud, quiet]).astype(np.float32), labels


def test_lda_finds_the_product_types_that_pca_throws_away():
    rng = np.random.default_rng(0)
    features, labels = _types_in_quiet_axes(rng, 1200)
    n = 1000  # catalogue; the rest are queries the fit never sees
    pca = Projection.fit_pca(features[:n], 6).apply(features)
    lda = Projection.fit_lda(features[:n], [f"type-{t}" for t in labels[:n]], 6).apply(features)
    assert _precision_at_10(pca, labels, n) < 0.45
    assert _precision_at_10(lda, labels, n) > 0.9
    # The first (types - 1) axes separate the types; the projection keeps the asked dimension.
    assert lda.shape == (1200, 6)


def test_lda_leaves_unlabelled_rows_out_and_refuses_without_two_labels():
    rng = np.random.default_rng(1)
    features, labels = _types_in_quiet_axes(rng, 400)
    names = [None if i % 3 == 0 else f"type-{t}" for i, t in enumerate(labels)]
    names[1] = ""
    with_gaps = Projection.fit_lda(features, names, 3)
    assert _precision_at_10(with_gaps.apply(features), labels, 300) > 0.9
    with pytest.raises(LabelError, match="no image has a label"):
        Projection.fit_lda(features, [None] * len(features), 3)
    with pytest.raises(LabelError, match="at least two labels, the catalogue has 1"):
        Projection.fit_lda(features, ["SHOES"] * len(features), 3)
    with pytest.raises(ValueError, match="3 labels for 400"):
        Projection.fit_lda(features, ["a", "b", "a"], 3)


def test_choose_head_resolves_auto_and_refuses_lda_without_labels(tmp_path):
    config = BuildConfig(images=tmp_path, out=tmp_path, head="lda", label_key="product_type")
    with pytest.raises(LabelError, match=r"'product_type', which this catalogue does not have \(its attributes: "
                                         r"brand, color\)"):
        choose_head(config, pd.DataFrame({"product_id": ["p"], "brand": ["b"], "color": ["red"]}))
    single = pd.DataFrame({"product_id": ["p", "q", "r"], "product_type": ["SHOES", "SHOES", ""]})
    with pytest.raises(LabelError, match="at least two values of 'product_type'; the catalogue has 1"):
        choose_head(config, single)
    typed = pd.DataFrame({"product_id": ["p", "q"], "product_type": ["SHOES", "SHIRT"]})
    assert choose_head(config, typed).head == "lda"
    # The default: lda or metric where there are product types to learn from (chosen when the head is
    # fitted, on the held-out products), pca where there are not.
    auto = BuildConfig(images=tmp_path, out=tmp_path)
    assert auto.head == "auto" and auto.pooling == "avg"
    assert choose_head(auto, typed).head == "auto"
    assert choose_head(replace(config, head="metric"), typed).head == "metric"
    with pytest.raises(LabelError, match="head 'metric' needs at least two values"):
        choose_head(replace(config, head="metric"), single)
    assert choose_head(auto, single).head == "pca"
    assert choose_head(auto, pd.DataFrame({"product_id": ["p"]})).head == "pca"
    # Unsupervised heads need no labels at all.
    pca = BuildConfig(images=tmp_path, out=tmp_path, head="pca")
    assert choose_head(pca, pd.DataFrame({"product_id": ["p"]})).head == "pca"


def test_gem_pooling_sits_between_average_and_max():
    rng = np.random.default_rng(2)
    maps = rng.uniform(0, 6, (3, 8, 8, 5)).astype(np.float32)
    gem = gem_pool(maps)
    assert np.all(gem > maps.mean(axis=(1, 2))) and np.all(gem < maps.max(axis=(1, 2)))
    assert np.allclose(gem_pool(maps, p=1.0), maps.mean(axis=(1, 2)), atol=1e-5)
    one_hot = np.zeros((1, 2, 2, 1), np.float32)
    one_hot[0, 0, 0, 0] = 4.0
    assert np.allclose(gem_pool(one_hot), (4.0 ** 3 / 4) ** (1 / 3), atol=1e-4)
    assert np.allclose(pool(maps, "avg"), maps.mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(maps, "max")


def test_the_trunks_gem_layer_computes_numpys_gem():
    trunk = build_trunk("efficientnet_lite0", "none", pooling="gem")
    pixels = np.random.default_rng(3).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    import keras

    maps = keras.Model(trunk.input, trunk.get_layer("pool").input)(pixels)
    assert np.allclose(trunk(pixels), gem_pool(np.asarray(maps)), rtol=1e-4, atol=1e-5)


def test_the_lda_head_blends_type_axes_with_look_axes_by_type_weight():
    rng = np.random.default_rng(4)
    features, labels = _types_in_quiet_axes(rng, 1200)
    names = [f"type-{t}" for t in labels]
    head = fit_head("lda", features[:1000], 8, names[:1000], type_weight=0.7)
    (types, type_weight), (looks, look_weight) = head.parts
    assert types.matrix.shape[1] == 3 and looks.matrix.shape[1] == 5 and head.dimension == 8
    assert (type_weight, look_weight) == (0.7, pytest.approx(0.3))
    vectors = l2_normalise(head.apply(features))
    # The cosine of two outputs is 0.7 x the types' cosine + 0.3 x the looks' cosine.
    t, k = l2_normalise(types.apply(features[:2])), l2_normalise(looks.apply(features[:2]))
    assert vectors[0] @ vectors[1] == pytest.approx(0.7 * t[0] @ t[1] + 0.3 * k[0] @ k[1], abs=1e-5)
    assert _precision_at_10(vectors, labels, 1000) > 0.9
    with pytest.raises(LabelError, match="no labels were given"):
        fit_head("lda", features, 8)


def test_an_exported_blended_head_computes_what_the_builder_computes(tmp_path):
    trunk = build_trunk("efficientnet_lite0", "lda", pooling="gem")
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 256, (12, 256, 256, 3), dtype=np.uint8)
    features = np.asarray(trunk(pixels))
    head = fit_head("lda", features, 6, [f"type-{i % 3}" for i in range(12)])
    export(trunk, tmp_path / "model", head)
    served = SavedModelEmbedder(tmp_path / "model")(pixels[:4])
    assert served.shape == (4, 6)
    assert np.allclose(served, l2_normalise(head.apply(features[:4])), atol=1e-4)


def test_a_mirrored_trunk_gives_an_image_and_its_mirror_one_vector():
    trunk = build_trunk("efficientnet_lite0", "pca", pooling="gem", mirror=True)
    plain = build_trunk("efficientnet_lite0", "pca", pooling="gem")
    pixels = np.random.default_rng(7).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    mirrored = np.asarray(trunk(pixels))
    assert np.allclose(mirrored, np.asarray(trunk(pixels[:, :, ::-1])), atol=1e-4)
    expected = (np.asarray(plain(pixels)) + np.asarray(plain(pixels[:, :, ::-1]))) / 2
    assert np.allclose(mirrored, expected, rtol=1e-4, atol=1e-5)
