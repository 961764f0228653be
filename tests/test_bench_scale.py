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


def _results() -> dict:
    point = {"qps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0, "codes": {"OK": 10}}
    served = {"ready_s": 9.0, "memory": {"rss_mb": 900.0}, "memory_after_load": {"rss_mb": 950.0}, "plans": {},
              **{name: dict(point) for name in ("info", "product", "id", "image")},
              **{f"{name}_open_{share}": {"rate": 50.0, **point} for name in ("product", "id") for share in (50, 80)}}
    memory = {"1": {"ready_s": 9.0, "processes": 1, "rss_mb": 900.0, "pss_mb": 600.0},
              "2": {"ready_s": 12.0, "processes": 3, "rss_mb": 1800.0, "pss_mb": 700.0}}
    shape = scale.shape_summary(scale.make_shape(products=50, images=120, types=5))
    return {"started_at": "2026-12-01T06:00:00+00:00", "machine": {"cores": 2}, "seconds": 100.0,
            "config": {"duration_s": 6.0, "build_products": 10}, "embedding_images_per_s": 30.0, "abo": shape,
            "realism": {"demo": {"products": 1, "images": 2, "types": 1, "views_of_one_product": 0.9,
                                 "products_of_one_type": 0.7, "different_types": 0.0,
                                 "nearest_other_product_median": 0.9, "effective_dimension": 6.0, "search_k": 100,
                                 "recall_at_10": 1.0}},
            "lists": {"seconds": 50.0, "section": {"recall_at_10": 1.0}, "stage_seconds": {"neighbours": 40.0},
                      "recall": {"product_recall_at_10": 1.0, "product_queries": 10, "image_recall_at_10": 1.0,
                                 "image_queries": 10}},
            "serving": {"demo": served, "abo": served, "workers": {"demo": memory, "abo": memory},
                        "swap": {"swaps": 2, "load_to_swap_s": [5.0, 6.0], "errors": 0,
                                 "without_swaps": {"calls": 5, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0}}},
            "errors": {"build": "Overrun: stopped"}}


def test_scale_section_replaces_itself_and_keeps_the_rest(tmp_path):
    from bench.report import SCALE_BEGIN, write_scale_section

    results = _results()
    results["targets"] = scale.targets(results)
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# lookalike benchmarks\n\n## Serving\n\nfigures\n\n## Builder\n\nbuild figures\n")
    write_scale_section(results, path)
    write_scale_section(results, path)
    text = path.read_text()
    assert text.count(SCALE_BEGIN) == 1 and "## At ABO's size" in text
    assert text.index("## Serving") < text.index("## At ABO's size") < text.index("## Builder")
    assert "build figures" in text and "did not complete" in text


def test_ranking_section_replaces_itself_and_keeps_the_rest(tmp_path):
    from bench.report import RANKING_BEGIN, write_ranking_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# lookalike benchmarks\n\n## Filters\n\nfigures\n\n## A living catalogue\n\nliving figures\n")
    write_ranking_section(path)
    write_ranking_section(path)
    text = path.read_text()
    assert text.count(RANKING_BEGIN) == 1 and text.count("## Diversity and regions") == 1
    assert text.index("## Filters") < text.index("## Diversity and regions") < text.index("## A living catalogue")
    assert "| 0.3 | 40 |" in text and "| left half |" in text and "living figures" in text
