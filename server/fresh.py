"""Products added since the served version was built (its deltas), folded into one small segment searched exactly.

The version's index and neighbour lists stay as they are: a query's answer is the version's (its products that a
delta replaced left out) merged with an exact scan of this segment, which `--max-delta-rows` keeps small. As in
Qdrant's appendable segment beside its indexed ones, the next build indexes these products and the segment goes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.deltas import Delta, DeltaError, list_deltas, read_delta
from server.catalogue import Catalogue
from server.filters import format_number
from server.search import ProductSearch, SearchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreshProducts:
    """The products of a version's deltas 1..sequence, the latest definition of each, as one exact segment."""

    sequence: int
    index: ProductSearch
    # The version's product rows that a delta's product replaces (same product id): never served again.
    superseded: np.ndarray | None
    # The image folder of each delta folded, and which of them each row's path is relative to.
    roots: tuple[Path, ...]
    row_root: np.ndarray

    @property
    def catalogue(self) -> Catalogue:
        return self.index.catalogue

    @property
    def rows(self) -> int:
        return len(self.index)

    def image_file(self, row: int) -> Path:
        return self.roots[int(self.row_root[row])] / self.catalogue.paths[row]


def fold_deltas(read: list[Delta], base: Catalogue, search: SearchConfig = SearchConfig()) -> FreshProducts | None:
    """The latest definition of every product the deltas hold (a later delta replaces an earlier one's product
    whole), with the base's attribute keys (a key the version does not have is served after the next build)."""
    if not read:
        return None
    latest: dict[str, tuple[int, int]] = {}
    columns = []
    for position, delta in enumerate(read):
        products, images = delta.products, delta.images
        columns.append({
            "product_id": products.column("product_id").to_pylist(),
            "first_row": products.column("first_row").to_numpy(), "count": products.column("image_count").to_numpy(),
            "image_id": images.column("image_id").to_pylist(), "path": images.column("path").to_pylist(),
            "label": [name or "" for name in images.column("label_name").to_pylist()],
            "role": images.column("role").to_pylist(),
            "attributes": {key: products.column(key).to_pylist() for key in base.attribute_keys
                           if key in products.column_names}})
        for row, product_id in enumerate(columns[-1]["product_id"]):
            latest.pop(product_id, None)  # re-inserted: the product's row order follows its latest definition
            latest[product_id] = (position, row)
    image_ids, paths, labels, roles, row_product, row_root, vectors = [], [], [], [], [], [], []
    first_row, image_count = [], []
    filters = base.filters
    attributes: dict[str, list] = {key: [] for key in filters.string_keys}
    numbers: dict[str, list] = {key: [] for key in filters.number_keys}
    for product_row, (position, row) in enumerate(latest.values()):
        table = columns[position]
        start, count = int(table["first_row"][row]), int(table["count"][row])
        first_row.append(len(image_ids))
        image_count.append(count)
        for name, out in (("image_id", image_ids), ("path", paths), ("label", labels), ("role", roles)):
            out.extend(table[name][start:start + count])
        row_product.extend([product_row] * count)
        row_root.extend([position] * count)
        vectors.append(read[position].vectors[start:start + count])
        for key, values in attributes.items():
            values.append(_as_string(table["attributes"].get(key, [None] * (row + 1))[row]))
        for key, values in numbers.items():
            values.append(_as_number(table["attributes"].get(key, [None] * (row + 1))[row]))
    catalogue = Catalogue(image_ids, paths, labels, roles, np.asarray(row_product, np.int64), list(latest),
                          np.asarray(first_row, np.int64), np.asarray(image_count, np.int64), attributes,
                          numbers={key: np.asarray(values, np.float64) for key, values in numbers.items()})
    replaced = base.product_ids.find(list(latest)) if base.has_products else np.zeros(0, np.int64)
    superseded = None
    if len(replaced):
        superseded = np.zeros(base.product_count, bool)
        superseded[replaced] = True
    roots = tuple(Path(str(d.manifest.get("catalogue_root", ""))) / str(d.manifest.get("image_folder", "small"))
                  for d in read)
    index = ProductSearch(catalogue, np.ascontiguousarray(np.concatenate(vectors), np.float32), None, 0, 0, search)
    return FreshProducts(read[-1].sequence, index, superseded, roots, np.asarray(row_root, np.int32))


def _as_string(value) -> str | None:
    """A delta's value for one of the version's string keys (a number when the delta's own column was all numbers)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return format_number(value) if isinstance(value, float) else str(value)


def _as_number(value) -> float:
    """A delta's value for one of the version's number keys: NaN (none) when it is missing or not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


class DeltaFeed:
    """The deltas of one version as read so far. A delta that cannot be read stops the reading there: the server
    keeps serving the deltas before it, says so once in its log, and tries again at the next check."""

    def __init__(self, artifacts_dir: Path, version: str, base: Catalogue, dimension: int,
                 search: SearchConfig = SearchConfig()) -> None:
        self.artifacts_dir = artifacts_dir
        self.version = version
        self._base = base
        self._dimension = dimension
        self._search = search
        self.read: list[Delta] = []
        self.failed: tuple[int, str] | None = None

    @property
    def sequence(self) -> int:
        return self.read[-1].sequence if self.read else 0

    def update(self) -> tuple[FreshProducts | None, bool, str | None]:
        """Reads the deltas published since the last call: (the fresh products of every delta read, whether any
        was read now, the error that stopped the reading, if any, the first time it is met). Never raises: whatever
        goes wrong (an unreadable folder, a malformed delta, a fold that fails) leaves the state as it was."""
        try:
            published = [(sequence, path) for sequence, path in list_deltas(self.artifacts_dir, self.version)
                         if sequence > self.sequence]
        except OSError as problem:
            return None, False, self._failed(self.sequence + 1, f"the deltas folder cannot be listed: {problem}")
        read: list[Delta] = []
        error = None
        for sequence, path in published:
            try:
                delta = read_delta(path, self._dimension)
                if delta.manifest.get("version") != self.version or delta.sequence != sequence:
                    raise DeltaError(f"{path} names version {delta.manifest.get('version')!r} and sequence "
                                     f"{delta.sequence}, not {self.version!r} and {sequence}")
            except Exception as problem:  # noqa: BLE001  (any unreadable delta is refused the same way)
                error = self._failed(sequence, str(problem))
                break
            read.append(delta)
        if not read:
            return None, False, error
        try:
            fresh = fold_deltas(self.read + read, self._base, self._search)
        except Exception as problem:  # noqa: BLE001
            return None, False, self._failed(read[0].sequence, f"the deltas cannot be folded: {problem!r}")
        self.read += read
        if error is None:
            self.failed = None
        return fresh, True, error

    def _failed(self, sequence: int, problem: str) -> str | None:
        """Records a failure; returns its message the first time it is met (logged once, not at every check)."""
        failed = (sequence, problem)
        first = failed != self.failed
        self.failed = failed
        return problem if first else None
