"""The catalogue model: ABO listings and products.csv become products of kept images, problems reported."""

import gzip
import json

import pandas as pd
import pytest

from builder.catalogue import (
    CatalogueError,
    assemble,
    listings_files,
    membership_from_csv,
    membership_from_listings,
    no_membership,
    read_listings,
)


def scan(rows):
    """A scan table as scan_and_filter makes it: (image_id, kept, drop_reason)."""
    return pd.DataFrame([{"image_id": i, "path": f"aa/{i}.jpg", "kept": kept, "drop_reason": reason,
                          "label": None, "label_name": None} for i, kept, reason in rows])


def listings(rows):
    return pd.DataFrame(rows, columns=["product_id", "main_image_id", "other_image_id", "product_type", "brand"])


SCANNED = scan([("img-a1", True, None), ("img-a2", True, None), ("img-b1", True, None),
                ("img-wide", False, "aspect: |width - height| = 340 >= 200"),
                ("img-bad", False, "undecodable: cannot decode image"), ("img-shared", True, None),
                ("img-lonely", True, None)])


def test_listings_group_images_by_product_and_report_every_problem():
    membership = membership_from_listings(listings([
        ("P-A", "img-a1", ["img-a2", "img-shared"], "SHOES", "Acme"),
        ("P-B", "img-b1", None, "BAG", "Bolt"),                          # no other_image_id at all
        ("P-C", "img-wide", ["img-bad", "img-gone"], "HAT", "Cap"),      # dropped, corrupt, missing
        ("P-D", "img-shared", [], "SHOES", "Dune"),                       # shares an image with P-A
        ("P-E", None, None, "BOX", None),                                 # names no image
    ]))
    catalogue = assemble(membership, SCANNED)
    rows = catalogue.rows
    assert list(catalogue.products["product_id"]) == ["P-A", "P-B", "P-D", "img-lonely"]
    # A product's images are one contiguous run of index rows, main image first.
    assert list(rows["image_id"]) == ["img-a1", "img-a2", "img-shared", "img-b1", "img-shared", "img-lonely"]
    assert list(rows["role"]) == ["main", "other", "other", "main", "main", "main"]
    products = catalogue.products.set_index("product_id")
    assert products.loc["P-A", "first_row"] == 0 and products.loc["P-A", "image_count"] == 3
    assert products.loc["P-D", "first_row"] == 4 and products.loc["P-D", "brand"] == "Dune"
    assert pd.isna(products.loc["img-lonely", "brand"])  # an unlisted image is a product of its own
    assert list(rows["product_row"]) == [0, 0, 0, 1, 2, 3]
    report = catalogue.report
    assert report["products_without_kept_images"] == {"count": 1, "examples": ["P-C"]}
    assert report["listed_images_missing"] == {"count": 1, "examples": ["img-gone"]}
    assert report["images_in_several_products"] == {"count": 1, "examples": ["img-shared"]}
    assert report["listings_without_images"] == {"count": 1, "examples": ["P-E"]}
    assert report["unlisted_images"] == 1
    dataset = catalogue.dataset.set_index(["product_id", "image_id"], drop=False)
    assert dataset.loc[("P-C", "img-gone"), "drop_reason"].startswith("missing: named by a listing")
    assert dataset.loc[("P-C", "img-bad"), "drop_reason"].startswith("undecodable: ")
    assert dataset.loc[("P-C", "img-wide"), "drop_reason"].startswith("aspect: ")
    no_image = catalogue.dataset[catalogue.dataset["product_id"] == "P-E"]
    assert len(no_image) == 1 and no_image["drop_reason"].iloc[0] == "no image: the listing names no image"
    assert catalogue.attribute_keys == ["product_type", "brand"]


def test_a_product_listed_twice_keeps_its_first_attributes_and_all_images():
    membership = membership_from_listings(listings([
        ("P-A", "img-a1", None, "SHOES", "First"),
        ("P-A", "img-a2", None, "SHOES", "Second"),
    ]))
    catalogue = assemble(membership, SCANNED)
    a = catalogue.rows[catalogue.rows["product_id"] == "P-A"]
    assert list(a["image_id"]) == ["img-a1", "img-a2"] and list(a["role"]) == ["main", "other"]
    assert catalogue.products.set_index("product_id").loc["P-A", "brand"] == "First"
    assert catalogue.report["duplicate_listings"] == 1


def test_products_csv_roles_default_and_attribute_columns():
    table = pd.DataFrame({"product_id": ["shoe-1", "shoe-1", "bag-9", None],
                          "image_id": ["img-a2", "img-a1", "img-b1", "img-lonely"],
                          "role": ["", "main", None, "other"], "colour": ["red", None, "blue", "x"]})
    catalogue = assemble(membership_from_csv(table), SCANNED)
    shoe = catalogue.rows[catalogue.rows["product_id"] == "shoe-1"]
    assert list(shoe["image_id"]) == ["img-a1", "img-a2"] and list(shoe["role"]) == ["main", "other"]
    bag = catalogue.rows[catalogue.rows["product_id"] == "bag-9"]
    assert list(bag["role"]) == ["main"]  # its first row becomes main
    products = catalogue.products.set_index("product_id")
    assert products.loc["shoe-1", "colour"] == "red" and products.loc["bag-9", "colour"] == "blue"
    assert catalogue.attribute_keys == ["colour"]
    assert catalogue.report["rows_without_ids"] == 1


@pytest.mark.parametrize("columns,message", [
    ({"product": ["p"], "image_id": ["i"]}, "no product_id column"),
    ({"product_id": ["p"], "image_id": ["i"], "role": ["hero"]}, "role must be one of main, other"),
    ({"product_id": ["p"], "image_id": ["i"], "first_row": ["1"]}, "reserved"),
    ({"product_id": ["p"], "image_id": ["i"], "bad key": ["1"]}, "not an identifier"),
])
def test_products_csv_mistakes_are_named(columns, message):
    with pytest.raises(CatalogueError, match=message):
        membership_from_csv(pd.DataFrame(columns))


def test_without_listings_every_kept_image_is_a_product():
    catalogue = assemble(no_membership(), SCANNED)
    assert list(catalogue.products["product_id"]) == list(catalogue.rows["image_id"])
    assert len(catalogue.rows) == 5 and set(catalogue.rows["role"]) == {"main"}
    assert catalogue.attribute_keys == []


def test_an_unlisted_image_whose_id_is_a_product_id_is_reported_not_merged():
    membership = membership_from_listings(listings([("img-lonely", "img-a1", None, "SHOES", "Acme")]))
    catalogue = assemble(membership, SCANNED)
    assert list(catalogue.products["product_id"]).count("img-lonely") == 1
    assert catalogue.report["unlisted_image_id_clashes"]["examples"] == ["img-lonely"]


LINES = [
    {"item_id": "B0001", "main_image_id": "img-a1", "other_image_id": ["img-a2"],
     "product_type": [{"value": "SHOES"}], "country": "GB", "marketplace": "Amazon", "domain_name": "amazon.co.uk",
     "node": [{"node_id": 1, "node_name": "/Shoes/Trainers"}],
     "brand": [{"language_tag": "de_DE", "value": "Marke"}, {"language_tag": "en_GB", "value": "Brand"}],
     "item_name": [{"language_tag": "en_US", "value": "Runner"}, {"language_tag": "fr_FR", "value": "Coureur"}],
     "color": [{"language_tag": "ja_JP", "value": "黒", "standardized_values": ["black"]}],
     "item_weight": [{"normalized_value": {"unit": "pounds", "value": 1.2}, "unit": "pounds", "value": 1.2}]},
    {"item_id": "B0002", "main_image_id": "img-b1", "product_type": [{"value": "BAG"}]},
]


def test_spark_reads_real_format_listing_lines_with_language_fallbacks(tmp_path):
    from pyspark.sql import SparkSession

    folder = tmp_path / "listings" / "metadata"
    folder.mkdir(parents=True)
    for part, lines in enumerate((LINES[:1], LINES[1:])):
        with gzip.open(folder / f"listings_{part}.json.gz", "wt") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
            if part == 1:
                handle.write('{"item_id": "B0003", "main_image_id": \n')  # a truncated line
    files = listings_files(tmp_path)
    assert [f.name for f in files] == ["listings_0.json.gz", "listings_1.json.gz"]
    spark = (SparkSession.builder.master("local[1]").appName("test-listings").config("spark.ui.enabled", "false")
             .getOrCreate())
    try:
        membership = read_listings(spark, files, "en_US")
    finally:
        spark.stop()
    attributes = membership.attributes.set_index("product_id")
    assert attributes.loc["B0001", "brand"] == "Brand"        # en_GB before de_DE for en_US
    assert attributes.loc["B0001", "item_name"] == "Runner"   # the exact language
    assert attributes.loc["B0001", "color"] == "黒"            # any language when English has none
    assert attributes.loc["B0001", "node"] == "/Shoes/Trainers"
    assert attributes.loc["B0001", "country"] == "GB" and attributes.loc["B0001", "product_type"] == "SHOES"
    assert pd.isna(attributes.loc["B0002", "brand"])
    assert list(membership.pairs["image_id"]) == ["img-a1", "img-a2", "img-b1"]
    assert membership.report["malformed_listings"] == 1 and membership.report["listings"] == 3


def test_listings_are_found_beside_an_unpacked_abo_images_folder(tmp_path):
    (tmp_path / "listings" / "metadata").mkdir(parents=True)
    (tmp_path / "listings" / "metadata" / "listings_0.json.gz").write_bytes(gzip.compress(b"{}\n"))
    (tmp_path / "images").mkdir()
    assert [f.name for f in listings_files(tmp_path / "images")] == ["listings_0.json.gz"]
    assert listings_files(tmp_path / "images" / "nothing") == []
    with pytest.raises(CatalogueError, match="is not a folder"):
        listings_files(tmp_path, tmp_path / "absent")
