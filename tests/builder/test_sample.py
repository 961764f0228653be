"""The sample command writes ABO's layout: small/<2 hex>/<id>.png, images.csv.gz, labels and listings."""

import csv
import gzip
import json
from collections import Counter

import numpy as np
from PIL import Image

from builder.sample import CLASS_NAMES, PRODUCT_TYPES, derived_view, write_sample


def _listings(folder):
    out = []
    for part in sorted((folder / "listings" / "metadata").glob("listings_*.json.gz")):
        with gzip.open(part, "rt") as handle:
            out += [json.loads(line) for line in handle]
    return out


def test_sample_writes_abo_layout_with_products_balanced_over_classes(tmp_path):
    products, images = write_sample(tmp_path, limit=50)
    with gzip.open(tmp_path / "images.csv.gz", "rt") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image_id", "height", "width", "path"]
    assert products == 50 and len(rows) == images and 50 < images <= 200
    for row in rows[:5]:
        folder, name = row["path"].split("/")
        assert len(folder) == 2 and name.startswith(folder) and name.endswith(".png")
        with Image.open(tmp_path / "small" / row["path"]) as image:
            assert image.size == (int(row["width"]), int(row["height"])) == (28, 28)
    with open(tmp_path / "labels.csv") as handle:
        labels = {row["image_id"]: row for row in csv.DictReader(handle)}
    assert {row["label_name"] for row in labels.values()} == set(CLASS_NAMES)
    listings = _listings(tmp_path)
    assert len(listings) == 50 and len({listing["item_id"] for listing in listings}) == 50
    assert Counter(listing["product_type"][0]["value"] for listing in listings) == {t: 5 for t in PRODUCT_TYPES}
    named = set()
    for listing in listings:
        own = [listing["main_image_id"], *listing.get("other_image_id", [])]
        assert 1 <= len(own) <= 4 and ("other_image_id" in listing) == (len(own) > 1)  # absent, as ABO does
        assert {labels[i]["label"] for i in own} == {labels[own[0]]["label"]}  # views share the main's class
        expected_type = PRODUCT_TYPES[int(labels[own[0]]["label"])]
        assert listing["product_type"] == [{"value": expected_type}]
        for field in ("item_name", "brand", "color"):
            assert listing[field][0]["language_tag"].count("_") == 1 and listing[field][0]["value"]
        named.update(own)
    assert named == {row["image_id"] for row in rows}


def test_a_product_is_the_same_whatever_the_limit(tmp_path):
    write_sample(tmp_path / "small", limit=20)
    write_sample(tmp_path / "large", limit=60)
    small = {listing["item_id"]: listing for listing in _listings(tmp_path / "small")}
    large = {listing["item_id"]: listing for listing in _listings(tmp_path / "large")}
    assert small.items() <= large.items()


def test_attributes_have_uneven_frequencies(tmp_path):
    write_sample(tmp_path, limit=1000, max_images_per_product=1)
    listings = _listings(tmp_path)
    colours = Counter(listing["color"][0]["value"] for listing in listings)
    brands = Counter(listing["brand"][0]["value"] for listing in listings)
    assert 0.4 < colours["Black"] / 1000 < 0.6 and colours.most_common()[-1][1] < 50
    assert brands.most_common(1)[0][1] > 100 and min(brands.values()) <= 2
    assert all("other_image_id" not in listing for listing in listings)


def test_derived_views_differ_from_the_main_image_the_way_catalogue_photos_do():
    rng = np.random.default_rng(0)
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 9:19] = 200
    mirror = derived_view(image, "mirror", rng)
    assert np.array_equal(mirror, image[:, ::-1])
    for kind in ("shift", "zoom", "crop", "brightness"):
        view = derived_view(image, kind, rng)
        assert view.shape == image.shape and view.dtype == np.uint8 and not np.array_equal(view, image), kind
        # Still the same object: most of its mass stays where it was.
        assert (view[image > 0] > 0).mean() > 0.6, kind
