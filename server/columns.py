"""Columns of strings as numpy arrays: no Python object per row, whatever the catalogue's size."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np

MAX_FIXED_WIDTH = 64


class Strings:
    """Strings by position, packed in one buffer with offsets; with `indexed`, positions by string too.

    A look-up is a binary search over the strings' sorted order (about 20 steps at 400,000 ids: microseconds),
    and a column costs its UTF-8 bytes plus 8 bytes a row (16 when indexed)."""

    def __init__(self, values: Sequence[str], indexed: bool = False) -> None:
        encoded = [value.encode() for value in values]
        self._offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(value) for value in encoded], out=self._offsets[1:])
        self._data = b"".join(encoded)
        self._order: np.ndarray | None = None
        # Short strings (ids) also sorted as fixed-width bytes: numpy's binary search, vectorised over many
        # values (a hidden list of 10,000 products in milliseconds); long ones (item names) by bisect.
        self._sorted: np.ndarray | None = None
        if indexed:
            keys = np.empty(len(encoded), dtype=object)
            keys[:] = encoded
            self._order = np.argsort(keys, kind="stable").astype(np.int64)
            width = max((len(value) for value in encoded), default=0)
            if width <= MAX_FIXED_WIDTH and not any(value.endswith(b"\0") for value in encoded):
                self._sorted = np.array(encoded or [b""], dtype=f"S{max(width, 1)}")[self._order] if encoded \
                    else np.zeros(0, "S1")
        extra = sum(a.nbytes for a in (self._order, self._sorted) if a is not None)
        self.nbytes = len(self._data) + self._offsets.nbytes + extra

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _bytes(self, position: int) -> bytes:
        return self._data[self._offsets[position]:self._offsets[position + 1]]

    def __getitem__(self, position: int) -> str:
        return self._bytes(position).decode()

    def __iter__(self) -> Iterator[str]:
        return (self[position] for position in range(len(self)))

    def positions(self, value: str) -> np.ndarray:
        """Every position holding `value`, ascending (an image shared by two products has two rows)."""
        if self._order is None:
            raise TypeError("this column has no index: build it with indexed=True")
        key = value.encode()
        if self._sorted is not None:
            if not key or len(key) > self._sorted.dtype.itemsize or key.endswith(b"\0"):
                return self._order[:0]  # a fixed-width comparison would truncate or strip it
            start = int(np.searchsorted(self._sorted, key, "left"))
            end = int(np.searchsorted(self._sorted, key, "right"))
        else:
            start = bisect.bisect_left(self._order, key, key=self._bytes)
            end = bisect.bisect_right(self._order, key, lo=start, key=self._bytes)
        return self._order[start:end]

    def position(self, value: str) -> int | None:
        """The first position holding `value`, or None."""
        found = self.positions(value)
        return int(found[0]) if len(found) else None

    def find(self, values: Sequence[str]) -> np.ndarray:
        """The first position of each of `values` that is present (absent ones are left out)."""
        if self._sorted is None or not len(values):
            found = (self.position(value) for value in values)
            return np.asarray([position for position in found if position is not None], np.int64)
        keys = [value.encode() for value in values]
        width = self._sorted.dtype.itemsize
        keys = [key for key in keys if 0 < len(key) <= width and not key.endswith(b"\0")]
        if not keys:
            return np.zeros(0, np.int64)
        keys = np.array(keys, dtype=self._sorted.dtype)
        at = np.minimum(np.searchsorted(self._sorted, keys, "left"), max(len(self._sorted) - 1, 0))
        hit = (self._sorted[at] == keys) if len(self._sorted) else np.zeros(len(keys), bool)
        return self._order[at[hit]]


class Codes:
    """A column with few distinct values (roles, labels) as one small code per row."""

    def __init__(self, values: Sequence[str]) -> None:
        uniques, codes = np.unique(np.asarray(list(values) or [""], dtype=object), return_inverse=True)
        self.uniques = [str(value) for value in uniques]
        self.codes = codes.astype(np.int32)[:len(values)]
        self.nbytes = self.codes.nbytes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, position: int) -> str:
        return self.uniques[self.codes[position]]

    def __iter__(self) -> Iterator[str]:
        return (self.uniques[code] for code in self.codes)
