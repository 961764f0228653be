"""`add` reads a folder's listings without Spark, as read_listings' schema has Spark read them."""

import gzip
import json

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
