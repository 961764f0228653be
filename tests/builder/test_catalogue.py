"""The catalogue model: ABO listings and products.csv become products of kept images, problems reported."""

import gzip
import json

import pandas as pd
import pytest

from builder.catalogue import (
    NUMBER_ATTRIBUTES,
    CatalogueError,
    assemble,
    listing_numbers,
    listings_files,
    measure,
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


def test_products_csv_columns_of_numbers_become_number_attributes():
    """A column is a number when every non-empty value parses as one (Spark reads a CSV as strings)."""
    table = pd.DataFrame({"product_id": ["shoe-1", "shoe-1", "bag-9", "hat-3"],
                          "image_id": ["img-a1", "img-a2", "img-b1", "img-lonely"],
                          "price": [" 19.99", None, "5e1", ""], "year": ["2019", "2019", "2020", "2021"],
                          "sku": ["007", "007", "x-12", "9"], "ratio": ["1", "inf", "2", "3"],
                          "nothing": [None, None, None, None]})
    membership = membership_from_csv(table)
    assert membership.number_keys == ("price", "year") and membership.report["number_columns"] == ["price", "year"]
    catalogue = assemble(membership, SCANNED)
    assert catalogue.number_keys == ["price", "year"] and catalogue.attribute_keys == ["sku", "ratio"]
    products = catalogue.products.set_index("product_id")
    assert products.loc["shoe-1", "price"] == 19.99 and products.loc["bag-9", "price"] == 50.0
    assert pd.isna(products.loc["hat-3", "price"]) and products["year"].dtype == "float64"
    assert products.loc["bag-9", "sku"] == "x-12" and "nothing" not in products



def test_products_csv_attributes_take_each_products_first_non_empty_value():
    """A product listed on several rows takes, per column, the first value that is not empty: a blank first row
    (as a CSV writes a missing value) neither hides a later number nor stands for a string."""
    table = pd.DataFrame({"product_id": ["shoe-1", "shoe-1", "shoe-1", "bag-9"],
                          "image_id": ["img-a1", "img-a2", "img-a3", "img-b1"],
                          "price": ["", " ", "5", "7.5"], "colour": [" ", "red", "blue", ""]})
    membership = membership_from_csv(table)
    assert membership.number_keys == ("price",)
    products = assemble(membership, SCANNED).products.set_index("product_id")
    assert products.loc["shoe-1", "price"] == 5.0 and products.loc["bag-9", "price"] == 7.5
    assert products.loc["shoe-1", "colour"] == "red" and pd.isna(products.loc["bag-9", "colour"])

# ABO's number fields as its listings write them: normalized to pounds and inches, the raw value in the
# marketplace's unit; model_year a list of one value.
WEIGHED = {
    "item_weight": [{"normalized_value": {"unit": "pounds", "value": 1.5}, "unit": "pounds", "value": 24}],
    "item_dimensions": {"height": {"normalized_value": {"unit": "inches", "value": 3.1}, "unit": "centimeters",
                                   "value": 8},
                        "length": {"normalized_value": {"unit": "inches", "value": 12.5}, "unit": "inches",
                                   "value": 12.5},
                        "width": {"normalized_value": {"unit": "inches", "value": 4.0}, "unit": "centimeters",
                                  "value": 10.2}},
    "model_year": [{"value": 2018}],
}


@pytest.mark.parametrize(("fields", "expected"), [
    (WEIGHED, [1.5, 3.1, 12.5, 4.0, 2018]),
    ({}, [None] * 5),                                                        # no number fields at all
    # Only the raw value: converted from the unit it names; an unknown unit or a negative value counts as none.
    ({"item_weight": [{"unit": "kilograms", "value": 2}], "item_dimensions": {"height": {"unit": "mm", "value": 254},
                                                                              "width": {"unit": "cubits", "value": 3}},
      "model_year": [{"value": "2021"}]}, [4.409245, 10.0, None, None, 2021]),
    ({"item_weight": [{"unit": "ounces", "value": -8}, {"unit": "ounces", "value": 8}],
      "item_dimensions": {"length": {"normalized_value": None, "unit": "feet", "value": 2}}},
     [0.5, None, 24.0, None, None]),
    # Shapes other than ABO's and values that are not numbers are left out, never an error.
    ({"item_weight": {"normalized_value": {"unit": "pounds", "value": "heavy"}}, "item_dimensions": [],
      "model_year": [{"value": "2019-2020"}, {"value": True}]}, [None] * 5),
    # Language-tagged entries: the build's language first (en_US), then English elsewhere, then any.
    ({"item_weight": [{"language_tag": "de_DE", "unit": "Kilogramm", "value": 1,
                       "normalized_value": {"unit": "pounds", "value": 2.2}},
                      {"language_tag": "en_GB", "unit": "pounds", "value": 2.25}],
      "model_year": [{"language_tag": "ja_JP", "value": 2017}, {"language_tag": "en_US", "value": 2016}]},
     [2.25, None, None, None, 2016]),
])
def test_number_fields_of_real_format_listings(fields, expected):
    """As JSON text (what Spark hands over) and parsed: units, missing values, languages."""
    for as_text in (False, True):
        row = {name: (json.dumps(fields[name]) if as_text else fields[name]) if name in fields else None
               for name in ("item_weight", "item_dimensions", "model_year")}
        numbers = listing_numbers(pd.DataFrame([row]), "en_US")
        assert list(numbers.columns) == list(NUMBER_ATTRIBUTES)
        got = [None if pd.isna(value) else value for value in numbers.iloc[0]]
        assert got == [pytest.approx(v, rel=1e-6) if v is not None else None for v in expected], as_text


def test_a_measure_prefers_its_normalized_value_and_says_nan_when_unusable():
    assert measure({"normalized_value": {"unit": "pounds", "value": 1.5}, "unit": "kilograms", "value": 0.68},
                   "pounds") == 1.5
    assert measure({"unit": "Centimeters ", "value": "2.54"}, "inches") == pytest.approx(1.0)
    assert all(pd.isna(measure(entry, "inches")) for entry in
               (None, "3 in", {"unit": "inches"}, {"unit": "inches", "value": "NaN"}, {"unit": "pounds", "value": 1}))


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
    {"item_id": "B0004", "main_image_id": "img-b2", "product_type": [{"value": "CHAIR"}], "country": "DE",
     "item_name": [{"language_tag": "de_DE", "value": "Stuhl"}], **WEIGHED,
     "model_year": [{"value": "2019"}]},
    # Fields shaped otherwise than ABO's must not make the listing malformed.
    {"item_id": "B0005", "main_image_id": "img-b3", "item_weight": "heavy", "item_dimensions": [1, 2],
     "model_year": 2020},
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
    assert list(membership.pairs["image_id"]) == ["img-a1", "img-a2", "img-b1", "img-b2", "img-b3"]
    assert membership.report["malformed_listings"] == 1 and membership.report["listings"] == 5
    # Numbers: the normalized values in pounds and inches, whatever the listing's language and units.
    assert membership.number_keys == NUMBER_ATTRIBUTES
    assert attributes.loc["B0001", "item_weight_pounds"] == 1.2 and pd.isna(attributes.loc["B0001", "model_year"])
    assert list(attributes.loc["B0004", list(NUMBER_ATTRIBUTES)]) == [1.5, 3.1, 12.5, 4.0, 2019.0]
    assert attributes.loc["B0005", list(NUMBER_ATTRIBUTES)].tolist()[:4] == pytest.approx([float("nan")] * 4,
                                                                                       nan_ok=True)
    assert attributes.loc["B0005", "model_year"] == 2020.0
    assert membership.report["listings_with_numbers"]["item_weight_pounds"] == 2


def test_listings_are_found_beside_an_unpacked_abo_images_folder(tmp_path):
    (tmp_path / "listings" / "metadata").mkdir(parents=True)
    (tmp_path / "listings" / "metadata" / "listings_0.json.gz").write_bytes(gzip.compress(b"{}\n"))
    (tmp_path / "images").mkdir()
    assert [f.name for f in listings_files(tmp_path / "images")] == ["listings_0.json.gz"]
    assert listings_files(tmp_path / "images" / "nothing") == []
    with pytest.raises(CatalogueError, match="is not a folder"):
        listings_files(tmp_path, tmp_path / "absent")
