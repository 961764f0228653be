"""A version's tables: one schema, checked on write and on read; paths relative to the catalogue, never the host's."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lookalike import artifacts, tables
from lookalike.artifacts import ArtifactError


def _images(rows: int = 3) -> dict:
    return {"row": list(range(rows)), "image_id": [f"img-{n}" for n in range(rows)],
            "product_row": [0] * rows, "product_id": ["P1"] * rows, "role": ["main"] + ["other"] * (rows - 1),
            "path": [f"aa/img-{n}.png" for n in range(rows)], "label": [1, None, 3][:rows],
            "label_name": ["Shirt", None, "Dress"][:rows], "sha256": [f"{n:064x}" for n in range(rows)]}


def _products() -> dict:
    return {"product_row": [0], "product_id": ["P1"], "main_image_id": ["img-0"], "first_row": [0],
            "image_count": [3], "brand": ["Acme"], "colour": [None]}


def test_a_version_s_tables_are_written_and_read_back(tmp_path):
    tables.write_table(tmp_path / artifacts.IMAGES_FILE, _images(), tables.IMAGES_SCHEMA)
    tables.write_table(tmp_path / artifacts.PRODUCTS_FILE, _products(), tables.products_schema(["brand", "colour"]))
    images = tables.read_images(tmp_path / artifacts.IMAGES_FILE)
    assert images.schema.names == list(tables.IMAGE_COLUMNS)
    assert images.to_pydict() == _images()
    assert images.schema.field("product_row").type == pa.int32()
    products = tables.read_products(tmp_path / artifacts.PRODUCTS_FILE, ["brand", "colour"])
    assert products.to_pydict() == _products()
    # The server asks for the columns it uses, in its order; attributes it was not told of are left out.
    assert tables.read_products(tmp_path / artifacts.PRODUCTS_FILE).column_names == list(tables.PRODUCT_COLUMNS)
    assert tables.read_images(tmp_path / artifacts.IMAGES_FILE, columns=["path", "row"]).column_names == ["path", "row"]


def test_a_missing_column_is_refused_with_its_name(tmp_path):
    path = tmp_path / artifacts.IMAGES_FILE
    columns = _images()
    del columns["product_row"]
    pq.write_table(pa.table(columns), path)
    with pytest.raises(ArtifactError, match=r"images\.parquet has no column 'product_row'"):
        tables.read_images(path)
    tables.write_table(tmp_path / artifacts.PRODUCTS_FILE, _products(), tables.products_schema(["brand"]))
    with pytest.raises(ArtifactError, match=r"products\.parquet has no column 'material'"):
        tables.read_products(tmp_path / artifacts.PRODUCTS_FILE, ["brand", "material"])
    with pytest.raises(ArtifactError, match=r"products\.parquet: attribute name 'first_row' is reserved"):
        tables.read_products(tmp_path / artifacts.PRODUCTS_FILE, ["first_row"])


def test_a_mistyped_column_is_refused_with_its_name_and_types(tmp_path):
    path = tmp_path / artifacts.PRODUCTS_FILE
    columns = _products()
    columns["first_row"] = ["0"]
    pq.write_table(pa.table(columns), path)
    with pytest.raises(ArtifactError, match=r"products\.parquet column 'first_row' is string, expected int32"):
        tables.read_products(path)
    columns = _products()
    columns["brand"] = [7]
    pq.write_table(pa.table(columns), path)
    with pytest.raises(ArtifactError, match=r"products\.parquet column 'brand' is int64, expected string"):
        tables.read_products(path, ["brand"])


def test_a_required_column_with_empty_values_is_refused(tmp_path):
    columns = _images()
    columns["product_id"] = ["P1", None, "P1"]
    pq.write_table(pa.table(columns), tmp_path / artifacts.IMAGES_FILE)
    with pytest.raises(ArtifactError, match=r"images\.parquet column 'product_id' has 1 empty values"):
        tables.read_images(tmp_path / artifacts.IMAGES_FILE)


def test_what_is_not_a_table_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="is missing"):
        tables.read_images(tmp_path / artifacts.IMAGES_FILE)
    (tmp_path / artifacts.IMAGES_FILE).write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="is not a parquet file"):
        tables.read_images(tmp_path / artifacts.IMAGES_FILE)
    with pytest.raises(ValueError, match="'vector' is not a column of images.parquet"):
        tables.read_images(tmp_path / artifacts.IMAGES_FILE, columns=["vector"])


def test_the_writer_refuses_what_the_readers_would(tmp_path):
    path = tmp_path / artifacts.IMAGES_FILE
    columns = _images()
    del columns["sha256"]
    with pytest.raises(ArtifactError, match="images.parquet would have no column 'sha256'"):
        tables.write_table(path, columns, tables.IMAGES_SCHEMA)
    with pytest.raises(ArtifactError, match="images.parquet column 'row' is not int32"):
        tables.write_table(path, {**_images(), "row": ["a", "b", "c"]}, tables.IMAGES_SCHEMA)
    with pytest.raises(ArtifactError, match="images.parquet column 'image_id' has 1 empty values"):
        tables.write_table(path, {**_images(), "image_id": ["a", None, "c"]}, tables.IMAGES_SCHEMA)
    assert not path.exists()
    with pytest.raises(ValueError, match="reserved"):
        tables.products_schema(["first_row"])


def test_number_attributes_are_float64_columns_after_the_strings(tmp_path):
    path = tmp_path / artifacts.PRODUCTS_FILE
    columns = {**_products(), "weight": [1.5], "year": [None]}
    tables.write_table(path, columns, tables.products_schema(["brand"], ["weight", "year"]))
    products = tables.read_products(path, ["brand"], number_keys=["weight", "year"])
    assert products.column_names == [*tables.PRODUCT_COLUMNS, "brand", "weight", "year"]
    assert products.column("weight").type == pa.float64() and products.column("year").null_count == 1
    # A version built before numbers existed reads as it did; one written by another tool may hold integers.
    assert tables.read_products(path, ["brand"]).column_names == [*tables.PRODUCT_COLUMNS, "brand"]
    pq.write_table(pa.table({**_products(), "year": pa.array([2019], pa.int16())}), path)
    assert tables.read_products(path, number_keys=["year"]).column("year").to_pylist() == [2019.0]
    with pytest.raises(ArtifactError, match=r"column 'brand' is string, expected double"):
        tables.read_products(path, number_keys=["brand"])
    with pytest.raises(ValueError, match="both a string and a number"):
        tables.products_schema(["year"], ["year"])


def test_the_schemas_need_no_pyarrow_until_used():
    """The builder's catalogue code imports the column names and roles; pyarrow comes with the schemas."""
    code = ("import sys; from lookalike.tables import ROLES, check_attribute_key; assert 'pyarrow' not in sys.modules; "
            "from lookalike.tables import IMAGES_SCHEMA; assert 'pyarrow' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.e2e
def test_the_builder_s_tables_pass_the_check(built):
    version_dir = built / artifacts.read_current(built)
    manifest = artifacts.load_manifest(version_dir, verify=False)
    images = tables.read_images(version_dir / artifacts.IMAGES_FILE)
    products = tables.read_products(version_dir / artifacts.PRODUCTS_FILE, manifest["attribute_keys"],
                                    number_keys=manifest["number_keys"])
    dataset = tables.read_dataset(version_dir / artifacts.DATASET_FILE)
    assert images.num_rows == manifest["counts"]["images_indexed"]
    assert products.num_rows == manifest["counts"]["products"]
    assert dataset.num_rows >= images.num_rows
    # Exactly the schema's columns, so nothing the builder writes escapes the contract.
    assert pq.read_schema(version_dir / artifacts.IMAGES_FILE).names == list(tables.IMAGE_COLUMNS)
    names = pq.read_schema(version_dir / artifacts.PRODUCTS_FILE).names
    fixed = len(tables.PRODUCT_COLUMNS)
    assert names[:fixed] == list(tables.PRODUCT_COLUMNS)
    assert sorted(names[fixed:]) == sorted(manifest["attribute_keys"] + manifest["number_keys"])
    # The sample's listings carry ABO's weights, dimensions and model years: float64 columns.
    assert set(manifest["number_keys"]) == {"item_weight_pounds", "item_height_inches", "item_length_inches",
                                            "item_width_inches", "model_year"}
    assert products.schema.field("model_year").type == pa.float64()
    assert pq.read_schema(version_dir / artifacts.DATASET_FILE).names == list(tables.DATASET_COLUMNS)


def _strings(value, where=""):
    """Every string in a manifest, with where it is."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _strings(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [found for n, item in enumerate(value) for found in _strings(item, f"{where}[{n}]")]
    return [(where, value)] if isinstance(value, str) else []


@pytest.mark.e2e
def test_a_version_records_its_catalogue_root_once_and_every_other_path_relative_to_it(built, catalogue):
    version_dir = built / artifacts.read_current(built)
    manifest = artifacts.load_manifest(version_dir, verify=False)
    root = Path(manifest["catalogue_root"])
    assert root == catalogue.resolve() and manifest["image_folder"] == "small"
    absolute = [(where, value) for where, value in _strings(manifest)
                if value.startswith("/") and where != ".catalogue_root"]
    assert not absolute, f"build host paths in the manifest: {absolute}"
    assert manifest["config"]["images"] == "." and (root / manifest["config"]["out"]).resolve() == built.resolve()
    assert (root / manifest["embedding"]["cache"]).resolve() == (built / ".features").resolve()
    # The tables' paths are relative to the image folder (what ImageMatch.path carries to clients).
    images = tables.read_images(version_dir / artifacts.IMAGES_FILE, columns=["path"]).column("path").to_pylist()
    dataset = tables.read_dataset(version_dir / artifacts.DATASET_FILE, columns=["path", "kept"]).to_pylist()
    assert all((root / "small" / path).is_file() for path in images)
    assert all((root / "small" / row["path"]).is_file() for row in dataset if row["kept"])
