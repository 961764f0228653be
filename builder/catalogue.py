"""The catalogue model: which images make which product, from ABO listings, a products.csv, or neither."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lookalike.tables import ROLES, check_attribute_key

log = logging.getLogger(__name__)

LISTINGS_GLOB = "listings_*.json.gz"
PRODUCTS_CSV = "products.csv"
# ABO's language-tagged fields that describe a product in a few words (not bullet points or descriptions).
TAGGED_ATTRIBUTES = ("item_name", "brand", "color", "material", "pattern", "style", "model_name", "fabric_type",
                     "finish_type", "item_shape")
PLAIN_ATTRIBUTES = ("country", "marketplace", "domain_name")
# ABO's measured fields kept as numbers, each in the unit its name says: (attribute, field, part of the field or
# None, unit). A listing writes a measure as {"normalized_value": {"unit", "value"}, "unit", "value"}.
MEASURES = (("item_weight_pounds", "item_weight", None, "pounds"),
            ("item_height_inches", "item_dimensions", "height", "inches"),
            ("item_length_inches", "item_dimensions", "length", "inches"),
            ("item_width_inches", "item_dimensions", "width", "inches"))
NUMBER_FIELDS = ("item_weight", "item_dimensions", "model_year")
NUMBER_ATTRIBUTES = (*(measure[0] for measure in MEASURES), "model_year")
# Each unit a listing may write, as the factor to the unit an attribute is named with (ABO normalises to pounds and
# inches; the raw value is the fallback when a listing has no normalized_value).
_UNITS = {
    "pounds": {"pounds": 1.0, "pound": 1.0, "lb": 1.0, "lbs": 1.0, "ounces": 1 / 16, "ounce": 1 / 16, "oz": 1 / 16,
               "kilograms": 2.2046226218, "kilogram": 2.2046226218, "kg": 2.2046226218,
               "grams": 0.0022046226218, "gram": 0.0022046226218, "g": 0.0022046226218,
               "milligrams": 2.2046226218e-6, "mg": 2.2046226218e-6},
    "inches": {"inches": 1.0, "inch": 1.0, "in": 1.0, "centimeters": 1 / 2.54, "centimetres": 1 / 2.54,
               "cm": 1 / 2.54, "millimeters": 1 / 25.4, "millimetres": 1 / 25.4, "mm": 1 / 25.4,
               "meters": 100 / 2.54, "metres": 100 / 2.54, "m": 100 / 2.54, "feet": 12.0, "foot": 12.0, "ft": 12.0},
}
# Each problem kind keeps this many example ids in the manifest; the dataset table has them all.
EXAMPLES_PER_PROBLEM = 10
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z0-9]{2,8})?$")


class CatalogueError(ValueError):
    """The catalogue's listings or products.csv cannot be read as a product model; the message says why."""


@dataclass(frozen=True)
class Membership:
    """Which images each product names, and each product's attributes (one string per key)."""

    # product_id, image_id, role ("main"/"other"), position (order within the product).
    pairs: pd.DataFrame
    # product_id, then one column per attribute key: strings, or float64 (NaN: none) for the number_keys.
    attributes: pd.DataFrame
    source: str
    report: dict = field(default_factory=dict)
    number_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalogue:
    """The assembled catalogue: what the index holds, grouped by product, and what was left out."""

    # One row per kept (product, image) pair, grouped by product, main image first: the index rows.
    rows: pd.DataFrame
    # One row per indexed product in product_row order: product_id, main_image_id, first_row,
    # image_count, attributes.
    products: pd.DataFrame
    # The scan table widened to (product, image) pairs, with the listings' problems as rows.
    dataset: pd.DataFrame
    # The string attributes, then the number attributes (float64 columns of products).
    attribute_keys: list[str]
    report: dict
    number_keys: list[str] = field(default_factory=list)


def check_language(language: str) -> str:
    if not _LANGUAGE.match(language):
        raise CatalogueError(f"--language must look like en_US, not {language!r}")
    return language


def listings_files(images: Path, listings: Path | None = None) -> list[Path]:
    """ABO's listings parts: under --listings, else <images>/listings/metadata or, as ABO's archives
    unpack side by side, <images>/../listings/metadata."""
    if listings is not None:
        folder = listings
        if not folder.is_dir():
            raise CatalogueError(f"--listings {folder} is not a folder")
        files = sorted(folder.glob(LISTINGS_GLOB)) or sorted((folder / "metadata").glob(LISTINGS_GLOB))
        if not files:
            raise CatalogueError(f"no {LISTINGS_GLOB} under {folder}")
        return files
    for folder in (images / "listings" / "metadata", images.parent / "listings" / "metadata"):
        files = sorted(folder.glob(LISTINGS_GLOB))
        if files:
            return files
    return []


def _tagged(column: str, language: str) -> str:
    """Spark SQL: the value in `language`, else in the same language elsewhere (en_GB for en_US), else any."""
    prefix = language.split("_")[0]
    return (f"coalesce(try_element_at(filter({column}, x -> x.language_tag = '{language}'), 1).value, "
            f"try_element_at(filter({column}, x -> substring_index(x.language_tag, '_', 1) = '{prefix}'), 1).value, "
            f"try_element_at({column}, 1).value)")


def read_listings(spark, files: list[Path], language: str) -> Membership:
    """Parses ABO listings (gzipped JSON lines) with Spark's JSON source; malformed lines are counted."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    check_language(language)
    tagged = T.ArrayType(T.StructType([T.StructField("language_tag", T.StringType()),
                                       T.StructField("value", T.StringType())]))
    schema = T.StructType(
        [T.StructField("item_id", T.StringType()), T.StructField("main_image_id", T.StringType()),
         T.StructField("other_image_id", T.ArrayType(T.StringType())),
         T.StructField("product_type", T.ArrayType(T.StructType([T.StructField("value", T.StringType())]))),
         T.StructField("node", T.ArrayType(T.StructType([T.StructField("node_id", T.LongType()),
                                                         T.StructField("node_name", T.StringType())])))]
        + [T.StructField(name, T.StringType()) for name in PLAIN_ATTRIBUTES]
        + [T.StructField(name, tagged) for name in TAGGED_ATTRIBUTES]
        # As JSON text, parsed in Python: a field shaped otherwise than expected must not make its listing malformed.
        + [T.StructField(name, T.StringType()) for name in NUMBER_FIELDS]
        + [T.StructField("_corrupt_record", T.StringType())])
    raw = (spark.read.schema(schema).option("mode", "PERMISSIVE")
           .option("columnNameOfCorruptRecord", "_corrupt_record").json([str(f) for f in files])
           .withColumn("_file", F.input_file_name()).withColumn("_line", F.monotonically_increasing_id()))
    attributes = [F.expr("try_element_at(product_type, 1).value").alias("product_type"),
                  *[F.col(name) for name in PLAIN_ATTRIBUTES],
                  F.expr("try_element_at(node, 1).node_name").alias("node"),
                  *[F.expr(_tagged(name, language)).alias(name) for name in TAGGED_ATTRIBUTES],
                  *[F.col(name) for name in NUMBER_FIELDS]]
    table = (raw.select(F.col("item_id").alias("product_id"), "main_image_id", "other_image_id", *attributes,
                        F.col("_corrupt_record").isNotNull().alias("malformed"), "_file", "_line")
             .orderBy("_file", "_line").toPandas())
    return membership_from_listings(table, len(files), language)


def membership_from_listings(table: pd.DataFrame, files: int = 1, language: str = "en_US") -> Membership:
    """Listings rows (product_id, main_image_id, other_image_id list, attribute columns, and ABO's item_weight,
    item_dimensions and model_year fields as JSON text or parsed) -> Membership.

    A product id listed twice keeps its first listing's attributes and the union of both image lists.
    """
    malformed = table["malformed"].fillna(False).astype(bool) if "malformed" in table else False
    no_id = table["product_id"].isna() | (table["product_id"].astype(str).str.len() == 0)
    bad = table[malformed | no_id]
    table = table[~(malformed | no_id)]
    duplicates = table["product_id"].duplicated()
    records = []
    positions: dict[str, int] = {}  # images named so far per product, across duplicate listings
    for product_id, main, others in zip(table["product_id"], table["main_image_id"], table["other_image_id"],
                                        strict=True):
        has_main = isinstance(main, str) and bool(main)
        named = ([main] if has_main else []) + [
            image for image in (others if others is not None else []) if isinstance(image, str) and image]
        start = positions.get(product_id, 0)
        for offset, image_id in enumerate(named):
            role = "main" if has_main and offset == 0 and product_id not in positions else "other"
            records.append((product_id, image_id, role, start + offset))
        positions[product_id] = start + len(named)
    pairs = _ordered_pairs(pd.DataFrame(records, columns=["product_id", "image_id", "role", "position"]))
    keys = [c for c in ("product_type", *PLAIN_ATTRIBUTES, "node", *TAGGED_ATTRIBUTES) if c in table]
    attributes = table[~duplicates][["product_id", *keys]].reset_index(drop=True)
    fields = [name for name in NUMBER_FIELDS if name in table]
    numbers = listing_numbers(table[~duplicates][fields], language) if fields else pd.DataFrame(index=attributes.index)
    attributes = pd.concat([attributes, numbers.set_axis(attributes.index)], axis=1)
    report = {"listing_files": files, "language": language, "listings": int(len(table) + len(bad)),
              "malformed_listings": int(len(bad)), "duplicate_listings": int(duplicates.sum()),
              "listings_with_numbers": {key: int(numbers[key].notna().sum()) for key in numbers}}
    return Membership(pairs, attributes, "listings", report, tuple(numbers.columns))


def listing_numbers(fields: pd.DataFrame, language: str = "en_US") -> pd.DataFrame:
    """NUMBER_ATTRIBUTES (float64, NaN when a listing has no usable value) from ABO's item_weight, item_dimensions and
    model_year fields, one row per listing: language-tagged entries in the order _tagged prefers them, the first
    usable one counting."""
    columns: dict[str, list[float]] = {key: [] for key in NUMBER_ATTRIBUTES}
    empty = pd.Series([None] * len(fields), index=fields.index, dtype=object)
    weights, dimensions, years = (fields[name] if name in fields else empty for name in NUMBER_FIELDS)
    for weight, dimension, year in zip(weights, dimensions, years, strict=True):
        weight, dimension, year = (_in_language(_parsed(raw), language) for raw in (weight, dimension, year))
        for key, _, part, unit in MEASURES:
            entries = weight if part is None else [entry.get(part) for entry in dimension]
            columns[key].append(_first(measure(entry, unit) for entry in entries))
        columns["model_year"].append(_first(_number(entry.get("value")) for entry in year))
    return pd.DataFrame(columns, index=fields.index, dtype=np.float64)


def measure(entry, unit: str) -> float:
    """One measure as a listing writes it ({"normalized_value": {"unit", "value"}, "unit", "value"}) in `unit`: the
    normalized value, else the raw one, converted; NaN when neither has a known unit and a finite value >= 0."""
    if not isinstance(entry, dict):
        return math.nan
    for part in (entry.get("normalized_value"), entry):
        if isinstance(part, dict):
            factor = _UNITS[unit].get(str(part.get("unit") or "").strip().lower())
            value = _number(part.get("value"))
            if factor is not None and value >= 0:
                return value * factor
    return math.nan


def _parsed(raw):
    """A field as Spark hands it over (its JSON text) or as a test writes it (parsed); None when absent or broken."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return None
    return raw


def _in_language(value, language: str) -> list[dict]:
    """A field's entries (a list, or one object), those in `language` first, then the same language elsewhere; a bare
    number or string is an entry of that value."""
    entries = [entry if isinstance(entry, dict) else {"value": entry}
               for entry in (value if isinstance(value, list) else [value]) if entry is not None]
    prefix = language.split("_")[0]

    def rank(entry: dict) -> int:
        tag = str(entry.get("language_tag") or "")
        return 0 if tag == language else 1 if tag.split("_")[0] == prefix else 2

    return sorted(entries, key=rank)


def _number(value) -> float:
    """A finite number from a JSON number or a numeric string, else NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return math.nan
    try:
        number = float(value)
    except ValueError:
        return math.nan
    return number if math.isfinite(number) else math.nan


def _first(values) -> float:
    return next((value for value in values if not math.isnan(value)), math.nan)


def read_products_csv(spark, path: Path) -> Membership:
    """A non-ABO catalogue's products.csv: product_id,image_id[,role] and any attribute columns."""
    table = (spark.read.option("header", "true").option("mode", "PERMISSIVE").csv(str(path))
             .toPandas())
    return membership_from_csv(table, path)


def membership_from_csv(table: pd.DataFrame, path: Path | str = PRODUCTS_CSV) -> Membership:
    missing = {"product_id", "image_id"} - set(table.columns)
    if missing:
        raise CatalogueError(f"{path} has no {', '.join(sorted(missing))} column (it needs product_id,image_id "
                             f"and may have role and attribute columns)")
    keys = [c for c in table.columns if c not in ("product_id", "image_id", "role")]
    for key in keys:
        try:
            check_attribute_key(key)
        except ValueError as error:
            raise CatalogueError(f"{path}: {error}") from None
    blank = table["product_id"].isna() | table["image_id"].isna()
    roles = table["role"].fillna("").str.strip().str.lower() if "role" in table else pd.Series("", index=table.index)
    bad_role = ~roles.isin(("", *ROLES))
    if bad_role.any():
        first = table.loc[bad_role, "role"].iloc[0]
        raise CatalogueError(f"{path}: role must be one of {', '.join(ROLES)} (or empty), not {first!r}")
    rows = table[~blank].assign(role=roles[~blank])
    rows = rows.drop_duplicates(["product_id", "image_id"])
    rows["position"] = rows.groupby("product_id", sort=False).cumcount()
    # A product with no row marked main: its first row is its main image.
    has_main = rows.groupby("product_id")["role"].transform(lambda r: (r == "main").any())
    rows.loc[~has_main & (rows["position"] == 0), "role"] = "main"
    # Only one main image per product: later "main" rows become other views.
    later_main = (rows["role"] == "main") & rows.duplicated(["product_id", "role"])
    rows.loc[later_main | (rows["role"] == ""), "role"] = "other"
    pairs = _ordered_pairs(rows[["product_id", "image_id", "role", "position"]])
    attributes = (_first_values(rows, keys) if keys
                  else rows[["product_id"]].drop_duplicates().reset_index(drop=True))
    number_keys = tuple(key for key in keys if _is_numeric(table[key]))
    for key in number_keys:
        attributes[key] = _as_numbers(attributes[key])
    report = {"rows": int(len(table)), "rows_without_ids": int(blank.sum()), "number_columns": list(number_keys)}
    return Membership(pairs, attributes, "products.csv", report, number_keys)


def _first_values(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each product's first non-empty value per column: first() skips nulls only, and a CSV's blank may be "" or
    " " (a product whose first row is blank and a later one "5" holds 5)."""
    values = rows[keys].apply(lambda column: column.where(column.astype("string").str.strip() != ""))
    return values.assign(product_id=rows["product_id"]).groupby("product_id", sort=False)[keys].first().reset_index()


def _as_numbers(column: pd.Series) -> pd.Series:
    """A column's values as float64 (NaN for empty or not a finite number)."""
    text = column.astype("string").str.strip()
    numbers = pd.to_numeric(text.where(text != ""), errors="coerce").astype(np.float64)
    return numbers.where(np.isfinite(numbers))


def _is_numeric(column: pd.Series) -> bool:
    """A products.csv column is a number attribute when it has a value and every non-empty value is a number."""
    present = column.notna() & (column.astype("string").str.strip() != "")
    return bool(present.any()) and bool(_as_numbers(column)[present].notna().all())


def no_membership() -> Membership:
    empty = pd.DataFrame({"product_id": pd.Series(dtype=str), "image_id": pd.Series(dtype=str),
                          "role": pd.Series(dtype=str), "position": pd.Series(dtype="int64")})
    return Membership(empty, pd.DataFrame({"product_id": pd.Series(dtype=str)}), "images")


def _ordered_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Main image first, then the listing's order; an image named twice by one product counts once."""
    pairs = pairs.assign(main_first=(pairs["role"] != "main").astype(int))
    pairs = pairs.sort_values(["product_id", "main_first", "position"], kind="stable")
    return pairs.drop_duplicates(["product_id", "image_id"]).drop(columns="main_first").reset_index(drop=True)


def _examples(ids) -> dict:
    ids = list(ids)
    return {"count": len(ids), "examples": [str(i) for i in ids[:EXAMPLES_PER_PROBLEM]]}


def assemble(membership: Membership, scanned: pd.DataFrame) -> Catalogue:
    """Joins what the catalogue names with what the scan found, and groups the kept images by product.

    `scanned` is the scan table: one row per image file or images.csv.gz entry, with kept/drop_reason.
    An image no product names is a product of its own (product_id = image_id). An image named by two
    products belongs to both: it gets an index row in each, so each product's results are complete.
    """
    scanned = scanned.drop_duplicates("image_id")
    pairs = membership.pairs.assign(listed=True)
    product_ids = set(pairs["product_id"])
    unlisted = scanned[~scanned["image_id"].isin(set(pairs["image_id"]))]
    clash = unlisted["image_id"].isin(product_ids)
    own = pd.DataFrame({"product_id": unlisted.loc[~clash, "image_id"], "image_id": unlisted.loc[~clash, "image_id"],
                        "role": "main", "position": 0, "listed": False})
    table = pd.concat([pairs, own], ignore_index=True).merge(scanned, on="image_id", how="left")
    missing = table["kept"].isna()
    missing_ids = table.loc[missing, "image_id"].unique()
    table["kept"] = table["kept"].where(~missing, False).astype(bool)
    table["drop_reason"] = table["drop_reason"].where(
        ~missing, "missing: named by a listing, not in images.csv.gz and no file")
    table = _ordered_pairs(table)
    rows = table[table["kept"]].reset_index(drop=True)
    products = _products(rows, membership.attributes)
    rows["product_row"] = rows["product_id"].map(pd.Series(products.index, index=products["product_id"]))
    rows["row"] = np.arange(len(rows), dtype=np.int64)
    shared = rows.groupby("image_id")["product_id"].nunique()
    without_kept = sorted(set(table.loc[table["listed"], "product_id"]) - set(products["product_id"]))
    clashing = scanned[scanned["image_id"].isin(set(unlisted.loc[clash, "image_id"]))].assign(
        product_id=None, role=None, listed=False, kept=False,
        drop_reason="conflict: this unlisted image's id is also a product id")
    imageless = _listings_without_images(membership)
    no_image_rows = pd.DataFrame({"product_id": imageless, "image_id": None, "role": None, "listed": True,
                                  "kept": False, "drop_reason": "no image: the listing names no image"})
    dataset = pd.concat([frame for frame in (table, clashing, no_image_rows) if len(frame)], ignore_index=True)
    report = {
        "source": membership.source, **membership.report,
        "products": int(len(products)), "images_indexed": int(len(rows)),
        "unlisted_images": int((~table["listed"]).sum()),
        "products_without_kept_images": _examples(without_kept),
        "listed_images_missing": _examples(missing_ids),
        "images_in_several_products": _examples(shared[shared > 1].index),
        "unlisted_image_id_clashes": _examples(clashing["image_id"]),
        "listings_without_images": _examples(imageless),
    }
    # ABO fields that no product of this catalogue has do not become attributes.
    held = [c for c in membership.attributes.columns if c != "product_id" and products[c].notna().any()]
    keys = [c for c in held if c not in membership.number_keys]
    number_keys = [c for c in held if c in membership.number_keys]
    return Catalogue(rows, products.drop(columns=[c for c in membership.attributes.columns
                                                  if c != "product_id" and c not in held]), dataset, keys, report,
                     number_keys)


def _listings_without_images(membership: Membership) -> list[str]:
    """Products whose listings name no image at all (not even a dropped or missing one)."""
    named = set(membership.pairs["product_id"])
    return [p for p in membership.attributes["product_id"] if p not in named]


def _products(rows: pd.DataFrame, attributes: pd.DataFrame) -> pd.DataFrame:
    """Rows are grouped by product, main image first: a product is a contiguous run of index rows."""
    grouped = rows.reset_index(drop=True).reset_index().groupby("product_id", sort=False)
    products = pd.DataFrame({"product_id": list(grouped.groups)})
    products["main_image_id"] = products["product_id"].map(grouped["image_id"].first())
    products["first_row"] = products["product_id"].map(grouped["index"].first()).astype(np.int64)
    products["image_count"] = products["product_id"].map(grouped.size()).astype(np.int64)
    products = products.merge(attributes.drop_duplicates("product_id"), on="product_id", how="left")
    products.insert(0, "product_row", np.arange(len(products), dtype=np.int64))
    return products
