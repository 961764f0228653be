"""A served version's catalogue: index rows (images) grouped by product, ids, paths and attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lookalike import artifacts
from server.filters import AttributeIndex


@dataclass
class Catalogue:
    """Row r of the index is image `image_ids[r]` of product `row_product[r]`; product p owns the
    contiguous rows first_row[p] .. first_row[p] + image_count[p] - 1, main image first."""

    image_ids: list[str]
    paths: list[str]
    labels: list[str]
    roles: list[str]
    row_product: np.ndarray  # int64 [N]
    product_ids: list[str]
    first_row: np.ndarray  # int64 [P]
    image_count: np.ndarray  # int64 [P]
    # attribute key -> one value (or None) per product
    attributes: dict[str, list[str | None]] = field(default_factory=dict)
    # False for a 0.1 version: every image is its own product and results carry no product ids.
    has_products: bool = True

    def __post_init__(self) -> None:
        self.rows_of_image: dict[str, list[int]] = {}
        for row, image_id in enumerate(self.image_ids):
            self.rows_of_image.setdefault(image_id, []).append(row)
        self.product_row_of = {product_id: row for row, product_id in enumerate(self.product_ids)}
        if len(self.row_product) != len(self.image_ids) or int(self.image_count.sum()) != len(self.image_ids):
            raise artifacts.ArtifactError("the images and products tables do not describe the same rows")
        # Posting lists per attribute value, built here rather than by the builder: a factorize per key
        # takes well under a second on ABO's 147,702 products and keeps the artifact format as it is.
        self.filters = AttributeIndex(self.attributes, self.product_row_of, len(self.product_ids))

    @property
    def image_count_total(self) -> int:
        return len(self.image_ids)

    @property
    def product_count(self) -> int:
        return len(self.product_ids)

    def rows_of_product(self, product_row: int) -> np.ndarray:
        start = int(self.first_row[product_row])
        return np.arange(start, start + int(self.image_count[product_row]))

    def products_of_image(self, image_id: str) -> list[int]:
        return sorted({int(self.row_product[row]) for row in self.rows_of_image.get(image_id, [])})

    def attributes_of(self, product_row: int) -> dict[str, str]:
        return {key: values[product_row] for key, values in self.attributes.items()
                if values[product_row] is not None}


def load_catalogue(version_dir: Path, manifest: dict) -> tuple[Catalogue, np.ndarray]:
    """The catalogue and the index's vectors ([N, D] float32, memory-mapped) of a version."""
    import pyarrow.parquet as pq

    files = manifest["files"]
    if artifacts.IMAGES_FILE not in files:
        return _load_legacy(version_dir)
    images = pq.read_table(version_dir / artifacts.IMAGES_FILE).to_pydict()
    if images["row"] != list(range(len(images["row"]))):
        raise artifacts.ArtifactError(f"{artifacts.IMAGES_FILE} rows are not in index order")
    products = pq.read_table(version_dir / artifacts.PRODUCTS_FILE).to_pydict()
    keys = [key for key in manifest.get("attribute_keys", []) if key in products]
    catalogue = Catalogue(
        image_ids=images["image_id"], paths=images["path"], labels=[n or "" for n in images["label_name"]],
        roles=images["role"], row_product=np.asarray(images["product_row"], np.int64),
        product_ids=products["product_id"], first_row=np.asarray(products["first_row"], np.int64),
        image_count=np.asarray(products["image_count"], np.int64),
        attributes={key: products[key] for key in keys})
    vectors = np.load(version_dir / artifacts.VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != len(catalogue.image_ids):
        raise artifacts.ArtifactError(f"{artifacts.VECTORS_FILE} is not float32 [{len(catalogue.image_ids)}, D]")
    return catalogue, vectors


def _load_legacy(version_dir: Path) -> tuple[Catalogue, np.ndarray]:
    """A 0.1 version: items.parquet holds image rows with their vectors; each image stands alone."""
    import pyarrow.parquet as pq

    items = pq.read_table(version_dir / artifacts.LEGACY_ITEMS_FILE,
                          columns=["annoy_id", "image_id", "path", "label_name", "vector"]).to_pydict()
    if items["annoy_id"] != list(range(len(items["annoy_id"]))):
        raise artifacts.ArtifactError(f"{artifacts.LEGACY_ITEMS_FILE} rows are not in annoy id order")
    count = len(items["image_id"])
    catalogue = Catalogue(
        image_ids=items["image_id"], paths=items["path"], labels=[n or "" for n in items["label_name"]],
        roles=["main"] * count, row_product=np.arange(count, dtype=np.int64), product_ids=items["image_id"],
        first_row=np.arange(count, dtype=np.int64), image_count=np.ones(count, np.int64), has_products=False)
    return catalogue, np.asarray(items["vector"], np.float32)
