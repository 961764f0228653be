"""The tables of a version: what each row is, its columns, and the names both sides agree on."""

from __future__ import annotations

import re

# images.parquet: one row per (product, image) pair in the index, in Annoy id order, grouped by
# product (main image first), so a product's images are the rows first_row .. first_row+image_count-1.
# An image shared by two products has a row in each (same vector).
IMAGE_COLUMNS = ("row", "image_id", "product_row", "product_id", "role", "path", "label", "label_name", "sha256")

# products.parquet: one row per indexed product, in product_row order, then one string column per
# attribute (product_type, brand, color, ... for ABO; the extra columns of a products.csv).
PRODUCT_COLUMNS = ("product_row", "product_id", "main_image_id", "first_row", "image_count")

# dataset.parquet: one row per (product, image) pair the catalogue names, kept or dropped with a
# reason, plus a row (image_id null) for each listing that names no image at all.
DATASET_COLUMNS = ("image_id", "product_id", "role", "listed", "path", "width", "height", "size_from", "bytes",
                   "sha256", "kept", "drop_reason", "label", "label_name")

ROLES = ("main", "other")
# Column names an attribute may not take: they name the table's own columns.
RESERVED_NAMES = frozenset(PRODUCT_COLUMNS) | frozenset(IMAGE_COLUMNS) | {"image_ids"}
_ATTRIBUTE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_attribute_key(key: str) -> str:
    """An attribute key is an identifier (letters, digits, _) that is not one of the tables' own columns."""
    if not _ATTRIBUTE_KEY.match(key):
        raise ValueError(f"attribute name {key!r} is not an identifier (letters, digits and _, at most 64)")
    if key in RESERVED_NAMES:
        raise ValueError(f"attribute name {key!r} is reserved (a column of the version's own tables)")
    return key
