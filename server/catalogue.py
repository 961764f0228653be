"""A served version's catalogue as arrays: index rows (images) grouped by product, ids, paths and attributes."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from lookalike import artifacts, tables
from server.columns import Codes, Strings, narrow
from server.filters import AttributeIndex


class Catalogue:
    """Row r of the index is image `image_ids[r]` of product `row_product[r]`; product p owns the contiguous
    rows first_row[p] .. first_row[p] + image_count[p] - 1, main image first. String attributes are codes per
    product with their posting lists, number attributes a float64 per product (NaN: none) with a sorted copy
    (server/filters.py). A version built before products existed (has_products False)
    has one product per image and results carry no product ids."""

    def __init__(self, image_ids: Sequence[str] | Strings, paths: Sequence[str] | Strings,
                 labels: Sequence[str] | Codes, roles: Sequence[str] | Codes, row_product: np.ndarray,
                 product_ids: Sequence[str] | Strings, first_row: np.ndarray, image_count: np.ndarray,
                 attributes: dict[str, Sequence[str | None] | pa.Array | pa.ChunkedArray] | None = None,
                 has_products: bool = True, numbers: dict[str, np.ndarray] | None = None) -> None:
        # Columns come built (load_catalogue makes them from the tables' buffers) or as values.
        self.image_ids = image_ids if isinstance(image_ids, Strings) else Strings(image_ids, indexed=True)
        self.paths = paths if isinstance(paths, Strings) else Strings(paths)
        self.labels = labels if isinstance(labels, Codes) else Codes(labels)
        self.roles = roles if isinstance(roles, Codes) else Codes(roles)
        # Rows and products are counted in int32 (half of int64's bytes, in every worker) while they fit.
        self.row_product = narrow(row_product)
        self.product_ids = product_ids if isinstance(product_ids, Strings) else Strings(product_ids, indexed=True)
        self.first_row = narrow(first_row)
        self.image_count = narrow(image_count)
        # The same counts read as Python ints (a memoryview's item is one): a query's product costs no numpy scalar.
        self._first_row_of, self._image_count_of = memoryview(self.first_row), memoryview(self.image_count)
        self.has_products = has_products
        rows = len(self.image_ids)
        if not (len(self.paths) == len(self.labels) == len(self.roles) == len(self.row_product) == rows) \
                or len(self.first_row) != len(self.product_ids) or len(self.image_count) != len(self.product_ids) \
                or int(self.image_count.sum()) != rows:
            raise artifacts.ArtifactError("the images and products tables do not describe the same rows")
        # Posting lists per attribute value, built here rather than by the builder: a factorize per key
        # takes well under a second on ABO's 147,702 products and keeps the artifact format as it is.
        self.filters = AttributeIndex(attributes or {}, self.product_ids, len(self.product_ids), numbers)

    @property
    def image_count_total(self) -> int:
        return len(self.image_ids)

    @property
    def product_count(self) -> int:
        return len(self.product_ids)

    @property
    def attribute_keys(self) -> list[str]:
        return self.filters.keys

    @property
    def nbytes(self) -> int:
        """Memory the columns hold (the vectors, index and neighbour lists are mapped, shared between workers)."""
        columns = (self.image_ids, self.paths, self.labels, self.roles, self.product_ids)
        arrays = (self.row_product, self.first_row, self.image_count)
        return sum(c.nbytes for c in columns) + sum(a.nbytes for a in arrays) + self.filters.nbytes

    def attribute_values(self, key: str) -> list[str | None]:
        """One value (or None) per product of a string key: for tools and benchmarks, not the request path."""
        return self.filters.lists(key).values()

    def with_attributes(self, extra: dict[str, Sequence[str | None]]) -> Catalogue:
        """The same catalogue with more attribute keys (benchmarks add synthetic ones)."""
        other = copy.copy(self)
        attributes = {key: self.attribute_values(key) for key in self.filters.string_keys}
        numbers = {key: self.filters.numbers(key).values for key in self.filters.number_keys}
        other.filters = AttributeIndex({**attributes, **extra}, self.product_ids, self.product_count, numbers)
        return other

    def rows_of_image(self, image_id: str) -> np.ndarray:
        return self.image_ids.positions(image_id)

    def product_row(self, product_id: str) -> int | None:
        return self.product_ids.position(product_id)

    def span(self, product_row: int) -> tuple[int, int]:
        """The first row of a product and how many it owns."""
        return self._first_row_of[product_row], self._image_count_of[product_row]

    def rows_of_product(self, product_row: int) -> np.ndarray:
        start, count = self.span(product_row)
        return np.arange(start, start + count)

    def products_of_image(self, image_id: str) -> list[int]:
        return sorted({int(p) for p in self.row_product[self.rows_of_image(image_id)]})

    def attributes_of(self, product_row: int) -> dict[str, str]:
        return self.filters.attributes_of(product_row)


def load_catalogue(version_dir: Path, manifest: dict) -> tuple[Catalogue, np.ndarray]:
    """The catalogue and the index's vectors ([N, D] float32, memory-mapped) of a version; its tables are checked
    against the schemas the builder wrote them with (lookalike/tables.py): a missing or mistyped column is an
    ArtifactError naming it."""
    files = manifest["files"]
    if artifacts.IMAGES_FILE not in files:
        return _load_legacy(version_dir)
    # Read on this thread alone: pyarrow's pool would take every core from the requests served meanwhile.
    images = tables.read_images(version_dir / artifacts.IMAGES_FILE,
                                columns=["row", "image_id", "product_row", "role", "path", "label_name"],
                                use_threads=False)
    if not np.array_equal(images.column("row").to_numpy(), np.arange(images.num_rows)):
        raise artifacts.ArtifactError(f"{artifacts.IMAGES_FILE} rows are not in index order")
    keys = list(manifest.get("attribute_keys", []))
    # Versions built before number attributes have none: they load and serve as before.
    number_keys = list(manifest.get("number_keys", []))
    products = tables.read_products(version_dir / artifacts.PRODUCTS_FILE, keys, number_keys=number_keys,
                                    use_threads=False)
    # Columns from the tables' own buffers, not Python lists: 400,000 Python strings a column would leave their
    # freed memory in each worker (pymalloc keeps an arena while one object in it lives).
    catalogue = Catalogue(
        image_ids=Strings.from_arrow(images.column("image_id"), indexed=True),
        paths=Strings.from_arrow(images.column("path")), labels=Codes.from_arrow(images.column("label_name")),
        roles=Codes.from_arrow(images.column("role")), row_product=images.column("product_row").to_numpy(),
        product_ids=Strings.from_arrow(products.column("product_id"), indexed=True),
        first_row=products.column("first_row").to_numpy(), image_count=products.column("image_count").to_numpy(),
        attributes={key: products.column(key) for key in keys},
        numbers={key: products.column(key).to_numpy() for key in number_keys})
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
