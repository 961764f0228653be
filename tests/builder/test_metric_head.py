"""The metric head: its held-out split, its training, the auto choice, and its export."""

import numpy as np
import pytest

import builder.metric as metric
from builder.metric import fit_metric, fit_supervised, held_out_precision, held_out_rows, labelled_split
from builder.model import Head, LabelError, Projection, export, fit_head, l2_normalise
from lookalike.runner import SavedModelEmbedder
from tests.builder.fake_build import fake_trunk


def _typed_features(rng, products: int, types: int = 5, images_per_product: int = 2):
    """Products of a few photos each; the type is in a few quiet axes under loud ones that carry none."""
    product_types = rng.integers(0, types, products)
    labels = np.repeat(product_types, images_per_product)
    groups = np.repeat([f"product-{p}" for p in range(products)], images_per_product)
    loud = rng.normal(0, 4.0, (len(labels), 20))
    quiet = np.eye(types)[labels] + rng.normal(0, 0.6, (len(labels), types))
    return np.hstack([loud, quiet]).astype(np.float32), [f"type-{t}" for t in labels], groups


def test_the_held_out_split_takes_whole_products_the_same_way_every_time():
    groups = np.repeat([f"p{i}" for i in range(50)], 3)
    held = held_out_rows(groups, share=0.2, seed=5)
    assert held.sum() == 30  # 10 of the 50 products, all 3 photos each
    for product in set(groups):
        assert len(set(held[groups == product])) == 1, "a product is split across training and held-out rows"
    assert np.array_equal(held, held_out_rows(groups, share=0.2, seed=5))
    assert not np.array_equal(held, held_out_rows(groups, share=0.2, seed=6))
    # At least one product on each side, however small the share or the catalogue.
    assert held_out_rows(["a", "a", "b"], share=0.01).sum() in (1, 2)
    assert held_out_rows(["a", "b"], share=0.99).sum() == 1
    with pytest.raises(LabelError, match="at least two products, the labelled catalogue has 1"):
        held_out_rows(["a", "a"])


def test_unlabelled_rows_sit_out_of_the_split_and_the_training():
    rng = np.random.default_rng(1)
    features, labels, groups = _typed_features(rng, 60)
    labels[0], labels[3] = None, ""
    split = labelled_split(features, labels, groups)
    assert len(split.features) == len(features) - 2 and split.types == 5
    assert np.array_equal(split.features[0], features[1])
    with pytest.raises(LabelError, match="at least two labels"):
        labelled_split(features, ["same"] * len(features), groups)
    with pytest.raises(ValueError, match="3 labels and 120 products for 120 feature rows"):
        labelled_split(features, labels[:3], groups)


def test_training_lifts_the_held_out_precision_above_where_it_started_and_repeats():
    rng = np.random.default_rng(2)
    features, labels, groups = _typed_features(rng, 600)
    split = labelled_split(features, labels, groups)
    fit = fit_metric(split, 8)
    pca = Head(((Projection.fit_pca(split.features[split.train], 8), 1.0),))
    assert fit.best_epoch >= 1 and fit.held_out_precision_at_10 > held_out_precision(pca, split) + 0.2
    assert fit.held_out_precision_at_10 == held_out_precision(Head(((fit.projection, 1.0),)), split)
    again = fit_metric(split, 8)
    assert np.array_equal(again.projection.matrix, fit.projection.matrix)


def test_an_epoch_trains_on_at_most_epoch_rows(monkeypatch):
    rng = np.random.default_rng(7)
    features, labels, groups = _typed_features(rng, 300)
    split = labelled_split(features, labels, groups)
    batches = []
    real = metric._loss_gradients
    monkeypatch.setattr(metric, "_loss_gradients", lambda x, *rest: batches.append(len(x)) or real(x, *rest))
    monkeypatch.setattr(metric, "EPOCH_ROWS", 100)
    monkeypatch.setattr(metric, "BATCH_ROWS", 30)
    fit_metric(split, 8, max_epochs=2)
    assert sum(batches) == 200 and len(batches) == 6


def test_auto_chooses_metric_only_when_its_held_out_figure_beats_ldas_by_more_than_noise(monkeypatch):
    rng = np.random.default_rng(3)
    features, labels, groups = _typed_features(rng, 200)
    head, report = fit_supervised("auto", features, labels, groups, 8, 0.7)
    figures = report["held_out"]["precision_at_10"]
    assert set(figures) == {"lda", "metric"}
    margin = report["held_out"]["margin"]
    assert report["held_out"]["queries"] == report["held_out"]["rows"] == 40
    assert margin == pytest.approx(np.sqrt(figures["lda"] * (1 - figures["lda"]) / 40), abs=1e-4)
    assert report["chosen"] == ("metric" if figures["metric"] > figures["lda"] + margin else "lda")
    assert head.blended == (report["chosen"] == "lda")

    real = metric.fit_metric
    for figure, chosen in ((1.0, "metric"), (0.0, "lda")):
        monkeypatch.setattr(metric, "fit_metric", lambda split, dimension, f=figure: metric.MetricFit(
            real(split, dimension, max_epochs=1).projection, 1, 1, f, 0.0))
        head, report = fit_supervised("auto", features, labels, groups, 8, 0.7)
        assert report["chosen"] == chosen and head.blended == (chosen == "lda")
        assert ("type_axes" in report) == (chosen == "lda")
    # A chosen lda is the one --head lda fits, on every labelled row.
    lda = fit_head("lda", features, 8, labels, 0.7)
    assert np.allclose(head.apply(features[:5]), lda.apply(features[:5]))
    # metric must beat lda by more than the standard error of lda's figure: 0.05 on 100 queries at 0.5.
    assert metric.pick_by_held_out({"lda": 0.5, "metric": 0.5}, 100) == "lda"
    assert metric.pick_by_held_out({"lda": 0.5, "metric": 0.549}, 100) == "lda"
    assert metric.pick_by_held_out({"lda": 0.5, "metric": 0.551}, 100) == "metric"
    assert metric.pick_by_held_out({"lda": 0.5, "metric": 0.51}, 10000) == "metric"
    assert metric.pick_by_held_out({"metric": 0.1}, 100) == "metric"


def test_an_exported_metric_head_computes_what_the_builder_computes(tmp_path):
    trunk = fake_trunk("efficientnet_lite0", "metric")
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (48, 256, 256, 3), dtype=np.uint8)
    # Four types by colour, so the trained axes are not the ones they started from.
    types = np.arange(48) % 4
    pixels[..., 0] = np.clip(pixels[..., 0] // 2 + 40 * types[:, None, None], 0, 255)
    features = np.asarray(trunk(pixels))
    head, report = fit_supervised("metric", features, [f"type-{t}" for t in types],
                                  [f"product-{i // 2}" for i in range(48)], 16, 0.7)
    assert report["chosen"] == "metric" and not head.blended
    export(trunk, tmp_path / "model", head)
    served = SavedModelEmbedder(tmp_path / "model")(pixels[:6])
    assert served.shape == (6, 16)
    assert np.allclose(served, l2_normalise(head.apply(features[:6])), atol=1e-4)


def test_the_quality_bench_holds_out_catalogue_rows_never_a_query(monkeypatch):
    from bench import quality

    rng = np.random.default_rng(5)
    features, labels, _ = _typed_features(rng, 150)
    n = 240  # the first 240 rows are the catalogue, the last 60 the queries
    codes = np.array([int(label.split("-")[1]) for label in labels])
    seen = []
    real = metric.labelled_split

    def spy(rows, row_labels, groups, *args):
        split = real(rows, row_labels, groups, *args)
        seen.append((np.asarray(rows), split))
        return split

    monkeypatch.setattr(metric, "labelled_split", spy)
    vectors = quality.heads(features, n, codes[:n], 8)
    (rows, split), = seen
    assert np.array_equal(rows, features[:n])
    held = split.features[split.held_out]
    assert 0 < len(held) < n
    queries = {row.tobytes() for row in features[n:]}
    assert not queries & {row.tobytes() for row in split.features}
    assert vectors["metric"].shape == (300, 8)


def test_a_build_fits_metric_and_auto_on_its_product_types_by_product(tmp_path):
    from types import SimpleNamespace

    import pandas as pd

    from builder.build import BuildConfig, fit_version_head

    rng = np.random.default_rng(6)
    features, labels, groups = _typed_features(rng, 100)
    product_ids = list(dict.fromkeys(groups))
    products = pd.DataFrame({"product_id": product_ids, "product_type": labels[::2]})
    products.loc[0, "product_type"] = None  # an untyped product sits out
    rows = pd.DataFrame({"image_id": [f"image-{i}" for i in range(len(features))], "product_id": groups,
                         "product_row": np.repeat(np.arange(100), 2)})
    catalogue = SimpleNamespace(rows=rows, products=products)
    ids = list(rows["image_id"])[::-1]  # features in another order than the index rows
    for head in ("metric", "auto"):
        config = BuildConfig(images=tmp_path, out=tmp_path, head=head, dimension=8)
        fitted, report = fit_version_head(config, features[::-1], ids, catalogue)
        assert report["rows"] == 198 and report["labels"] == 5 and report["label_key"] == "product_type"
        assert report["held_out"]["products"] == 10 and report["held_out"]["rows"] == 20
        assert report["chosen"] in (("metric",) if head == "metric" else ("lda", "metric"))
        assert set(report["held_out"]["precision_at_10"]) == ({"metric"} if head == "metric" else {"lda", "metric"})
        assert fitted.dimension == 8
