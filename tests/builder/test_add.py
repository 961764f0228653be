"""`add` reads a folder's listings without Spark, as read_listings' schema has Spark read them."""

import gzip
import json

import numpy as np

from builder.add import listings_table
from builder.catalogue import membership_from_listings


def test_local_listings_match_what_spark_reads(tmp_path):
    lines = [
        {"item_id": "good", "main_image_id": "m1", "other_image_id": ["o1", "o2"], "product_type": [{"value": "SHOES"}],
         "brand": [{"language_tag": "de_DE", "value": "Marke"}, {"language_tag": "en_GB", "value": "Brand"}],
         "country": "US", "node": [{"node_id": 1, "node_name": "/Shoes"}]},
        {"item_id": 123, "main_image_id": "m2"},  # a number where a string is expected: Spark reads its text
        {"item_id": "string-others", "main_image_id": "m3", "other_image_id": "abc"},  # malformed in Spark
        {"item_id": "untagged", "main_image_id": "m4", "brand": "Plain"},  # malformed in Spark
    ]
    path = tmp_path / "listings_0.json.gz"
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
        handle.write("not json at all\n")
    table = listings_table([path], "en_US")
    assert table["malformed"].tolist() == [False, False, True, True, True]
    good = table.iloc[0]
    assert (good["product_id"], good["brand"], good["product_type"], good["node"], good["country"]) == (
        "good", "Brand", "SHOES", "/Shoes", "US")  # en_US absent: the same language elsewhere
    assert table.iloc[1]["product_id"] == "123"
    membership = membership_from_listings(table)
    assert membership.report["malformed_listings"] == 3
    assert membership.pairs["image_id"].tolist() == ["m2", "m1", "o1", "o2"]


def test_the_trunk_and_the_versions_head_give_the_versions_vectors(tmp_path):
    """What `add` computes from one backbone run (the cache's trunk, then head.npz) equals the version's model."""
    from builder.model import Head, Projection, export, l2_normalise, load_head, save_head
    from lookalike.runner import SavedModelEmbedder
    from tests.builder.fake_build import fake_trunk

    trunk = fake_trunk("fake", "pca")
    pixels = np.random.default_rng(3).integers(0, 255, (24, 256, 256, 3), dtype=np.uint8)
    export(trunk, tmp_path / "trunk", head=None, normalise=False)  # as the feature cache holds it
    features = SavedModelEmbedder(tmp_path / "trunk")(pixels)
    for head in (None, Head(((Projection.fit_pca(features, 6), 1.0),)),
                 Head(((Projection.fit_pca(features, 4), 0.7), (Projection.fit_pca(features[::-1], 3), 0.3)))):
        export(trunk, tmp_path / "model", head)
        save_head(head, tmp_path / "head.npz")
        loaded = load_head(tmp_path / "head.npz")
        from_trunk = l2_normalise(loaded.apply(features) if loaded is not None else features)
        assert np.allclose(from_trunk, SavedModelEmbedder(tmp_path / "model")(pixels), atol=1e-5)
