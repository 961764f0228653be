"""bench/scale.py's catalogue of ABO's shape: exact counts, the builder's own tables, a cache a build can read."""

from __future__ import annotations

import numpy as np

from bench import scale


def test_shape_has_exact_counts_and_skewed_types():
    shape = scale.make_shape(products=500, images=1337, types=30)
    assert len(shape.product_ids) == 500 and len(set(shape.product_ids)) == 500
    assert len(shape.image_ids) == 1337 == shape.image_counts.sum() and len(set(shape.image_ids)) == 1337
    assert shape.image_counts.min() >= 1 and shape.image_counts.max() <= scale.MAX_IMAGES_PER_PRODUCT
    frequency = np.bincount(shape.product_types, minlength=30)
    assert frequency[0] > 4 * frequency[20:].mean()  # Zipf: the first type is far more common than the tail
    assert {"product_type", "brand", "color", "country", "item_name"} <= set(shape.attributes.columns)


def test_vectors_are_unit_and_views_of_a_product_are_nearest():
    shape = scale.make_shape(products=400, images=1000, types=12)
    vectors = scale.make_vectors(shape)
    assert vectors.shape == (1000, scale.DIMENSION) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    rows = shape.row_product
    stats = scale.vector_statistics(vectors, rows, shape.product_types[rows], pairs=2000, nn_queries=50)
    assert stats["views_of_one_product"] > stats["products_of_one_type"] > stats["different_types"]


def test_catalogue_is_the_builders_own(tmp_path):
    shape = scale.make_shape(products=50, images=120, types=5)
    sha = [f"{n:064x}" for n in range(120)]
    catalogue = scale.assemble_catalogue(shape, scale._paths(shape.image_ids), sha, [100] * 120)
    assert len(catalogue.rows) == 120 and len(catalogue.products) == 50
    assert (catalogue.products["image_count"].sum()) == 120
    assert "product_type" in catalogue.attribute_keys


def test_cache_holds_every_written_image(tmp_path):
    from builder.cache import FeatureCache

    shape = scale.make_shape(products=20, images=45, types=3)
    vectors = scale.make_vectors(shape)
    written = scale.write_catalogue(tmp_path / "catalogue", shape, np.arange(20), 0, seed=1)
    assert len(written) == 45 and written["sha256"].nunique() == 45
    assert (tmp_path / "catalogue" / "listings" / "metadata" / "listings_0.json.gz").exists()
    filled = scale.fill_cache(tmp_path / "out" / ".features", tmp_path / "catalogue", written, vectors)
    cache = FeatureCache(tmp_path / "out" / ".features")
    position, features, errors = cache.read(filled["model_key"], set(written["sha256"]))
    assert len(position) == 45 and features.shape == (45, 1280) and not errors
    scans = cache.read_scans()
    assert len(scans) == 45 and scans["uri"].str.startswith("file:/").all()
