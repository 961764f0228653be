"""The tables of a version: what each row is, its columns and their types, checked on write and on read."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.artifacts import ArtifactError

if TYPE_CHECKING:
    import pyarrow as pa

# Each column is (name, pyarrow type, nullable). The types are named rather than built here, so that
# importing this module (the catalogue code of the builder does) needs no pyarrow; the pyarrow schemas
# are IMAGES_SCHEMA, PRODUCTS_SCHEMA and DATASET_SCHEMA below, built on first use.

# images.parquet: one row per (product, image) pair in the index, in Annoy id order, grouped by
# product (main image first), so a product's images are the rows first_row .. first_row+image_count-1.
# An image shared by two products has a row in each (same vector). `path` is relative to the catalogue's
# image folder (the manifest's catalogue_root / image_folder: ABO's small/), as images.csv.gz has it.
_IMAGES = (("row", "int32", False), ("image_id", "string", False), ("product_row", "int32", False),
           ("product_id", "string", False), ("role", "string", False), ("path", "string", False),
           ("label", "int32", True), ("label_name", "string", True), ("sha256", "string", False))

# products.parquet: one row per indexed product, in product_row order, then one string column per
# attribute (product_type, brand, color, ... for ABO; the extra columns of a products.csv), named by
# the manifest's attribute_keys, then one float64 column per number attribute (item_weight_pounds,
# model_year, ... for ABO; a products.csv's numeric columns), named by the manifest's number_keys
# (versions built before numbers have none). Empty values are nulls.
_PRODUCTS = (("product_row", "int32", False), ("product_id", "string", False), ("main_image_id", "string", False),
             ("first_row", "int32", False), ("image_count", "int32", False))

# dataset.parquet: one row per (product, image) pair the catalogue names, kept or dropped with a
# reason, plus a row (image_id null) for each listing that names no image at all. `path` as in images.
_DATASET = (("image_id", "string", True), ("product_id", "string", True), ("role", "string", True),
            ("listed", "bool", True), ("path", "string", True), ("width", "int64", True),
            ("height", "int64", True), ("size_from", "string", True), ("bytes", "int64", True),
            ("sha256", "string", True), ("kept", "bool", False), ("drop_reason", "string", True),
            ("label", "int64", True), ("label_name", "string", True))

IMAGE_COLUMNS = tuple(name for name, _, _ in _IMAGES)
PRODUCT_COLUMNS = tuple(name for name, _, _ in _PRODUCTS)
DATASET_COLUMNS = tuple(name for name, _, _ in _DATASET)
_SCHEMAS = {"IMAGES_SCHEMA": _IMAGES, "PRODUCTS_SCHEMA": _PRODUCTS, "DATASET_SCHEMA": _DATASET}

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


@cache
def _schema(name: str) -> pa.Schema:
    import pyarrow as pa

    types = {"int32": pa.int32(), "int64": pa.int64(), "string": pa.string(), "bool": pa.bool_()}
    return pa.schema([pa.field(column, types[kind], nullable=nullable) for column, kind, nullable in _SCHEMAS[name]])


def __getattr__(name: str) -> Any:
    """IMAGES_SCHEMA, PRODUCTS_SCHEMA and DATASET_SCHEMA, built (with pyarrow) when first asked for."""
    if name in _SCHEMAS:
        return _schema(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def products_schema(attribute_keys: Sequence[str] = (), number_keys: Sequence[str] = ()) -> pa.Schema:
    """PRODUCTS_SCHEMA followed by one nullable string column per attribute key, then one nullable float64
    column per number key."""
    import pyarrow as pa

    schema = _schema("PRODUCTS_SCHEMA")
    both = set(attribute_keys) & set(number_keys)
    if both:
        raise ValueError(f"attribute {sorted(both)[0]!r} cannot be both a string and a number")
    for key in attribute_keys:
        schema = schema.append(pa.field(check_attribute_key(key), pa.string()))
    for key in number_keys:
        schema = schema.append(pa.field(check_attribute_key(key), pa.float64()))
    return schema


def read_images(path: Path, columns: Sequence[str] | None = None, use_threads: bool = True) -> pa.Table:
    """A version's images.parquet, checked against IMAGES_SCHEMA (ArtifactError naming the file and the
    missing, mistyped or null column); only `columns`, in that order, when given. Columns the schema does
    not know are left out. Without use_threads, read on the calling thread alone (a server loading a version
    beside the served one leaves the other cores to the requests)."""
    return _read(Path(path), _schema("IMAGES_SCHEMA"), columns, use_threads)


def read_products(path: Path, attribute_keys: Sequence[str] = (), columns: Sequence[str] | None = None,
                  number_keys: Sequence[str] = (), use_threads: bool = True) -> pa.Table:
    """A version's products.parquet, checked against products_schema(attribute_keys, number_keys) (pass the
    manifest's attribute_keys and number_keys): the fixed columns, then one string column per attribute key and
    one float64 column per number key. Only `columns` when given; use_threads as read_images'."""
    try:
        schema = products_schema(attribute_keys, number_keys)
    except ValueError as error:  # the manifest names a key no builder would write
        raise ArtifactError(f"{path}: {error}") from None
    return _read(Path(path), schema, columns, use_threads)


def read_dataset(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A version's dataset.parquet, checked against DATASET_SCHEMA."""
    return _read(Path(path), _schema("DATASET_SCHEMA"), columns)


def write_table(path: Path, data: pa.Table | Mapping[str, Any], schema: pa.Schema) -> None:
    """Writes `data` (a table, or columns by name: lists, arrays, pandas) as parquet with exactly `schema`'s
    columns, in its order and types; a missing column, one that cannot take its type or a required one
    with empty values is an ArtifactError naming it, and nothing is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    names = data.column_names if isinstance(data, pa.Table) else list(data)
    missing = [name for name in schema.names if name not in names]
    if missing:
        raise ArtifactError(f"{path.name} would have no column {missing[0]!r}")
    pq.write_table(_conform(data, schema, path.name), path)


def check_schema(found: pa.Schema, expected: pa.Schema, where: Path | str) -> None:
    """Every column of `expected` is in `found` with its type, or any integer type for an integer column, or any
    number type for a float column (a table written by another tool; it is converted on read); extra columns
    are allowed."""
    import pyarrow.types as pat

    for field in expected:
        index = found.get_field_index(field.name)
        if index < 0:
            raise ArtifactError(f"{where} has no column {field.name!r}")
        kind = found.field(index).type
        if kind != field.type and not (pat.is_integer(kind) and pat.is_integer(field.type)) and not (
                pat.is_floating(field.type) and (pat.is_integer(kind) or pat.is_floating(kind))):
            raise ArtifactError(f"{where} column {field.name!r} is {kind}, expected {field.type}")


def _conform(data: pa.Table | Mapping[str, Any], schema: pa.Schema, where: Path | str) -> pa.Table:
    """`schema`'s columns of `data`, each converted to its type, none of the required ones with empty values."""
    import pyarrow as pa

    columns = []
    for field in schema:
        try:
            columns.append(data.column(field.name).cast(field.type) if isinstance(data, pa.Table)
                           else pa.array(data[field.name], field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
            raise ArtifactError(f"{where} column {field.name!r} is not {field.type}: {error}") from None
        # The schema says which columns are required: a file written without the flag has it unset.
        if not field.nullable and columns[-1].null_count:
            raise ArtifactError(f"{where} column {field.name!r} has {columns[-1].null_count} empty values; "
                                f"it may have none")
    return pa.Table.from_arrays(columns, schema=schema)


def _read(path: Path, schema: pa.Schema, columns: Sequence[str] | None, use_threads: bool = True) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if columns is not None:
        unknown = [name for name in columns if schema.get_field_index(name) < 0]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a column of {path.name} (its columns: {', '.join(schema.names)})")
        schema = pa.schema([schema.field(name) for name in columns])
    try:
        found = pq.read_schema(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except (OSError, pa.ArrowInvalid) as error:
        raise ArtifactError(f"{path} is not a parquet file: {error}") from None
    check_schema(found, schema, path)
    return _conform(pq.read_table(path, columns=schema.names, use_threads=use_threads), schema, path)
