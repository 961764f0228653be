"""Columns of strings as numpy arrays: no Python object per row, whatever the catalogue's size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa


class Strings:
    """Strings by position, packed in one buffer with offsets; with `indexed`, positions by string too.

    The index is each string's hash, sorted, with the positions in that order: a look-up is a binary search
    and a byte comparison (microseconds at 400,000 ids, vectorised over many values), whatever the strings'
    length, and building it sorts integers, which never holds the interpreter for long (sorting the strings
    themselves would, stalling the event loop while a version loads beside the served one). A column costs
    its UTF-8 bytes plus 4 bytes a row, 16 when indexed (8 and 24 past 2 GB of bytes or 2**31 rows). Hashes are
    Python's, so the index lives in memory."""

    def __init__(self, values: Sequence[str], indexed: bool = False) -> None:
        encoded = [value.encode() for value in values]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(value) for value in encoded], out=offsets[1:])
        self._fill(narrow(offsets), b"".join(encoded), indexed)

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray, indexed: bool = False) -> Strings:
        """The column of a pyarrow string array without nulls, made from its own offsets and UTF-8 bytes (the same
        layout): no Python string per row, whose freed memory would stay in the process after a load."""
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if array.null_count:
            raise ValueError("a Strings column holds no nulls")
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise TypeError(f"a Strings column is made from strings, not {array.type}")
        _, offsets_buffer, data_buffer = array.buffers()
        width = np.int64 if pa.types.is_large_string(array.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, width, len(array) + 1, array.offset * np.dtype(width).itemsize)
        start, end = int(offsets[0]), int(offsets[-1])
        data = b"" if data_buffer is None or end == start else data_buffer[start:end].to_pybytes()
        column = cls.__new__(cls)
        column._fill(narrow(offsets - start), data, indexed)
        return column

    def _fill(self, offsets: np.ndarray, data: bytes, indexed: bool) -> None:
        self._offsets = offsets
        self._data = data
        self._order: np.ndarray | None = None
        self._hashes: np.ndarray | None = None
        if indexed:
            bounds = offsets.tolist()
            hashes = np.fromiter((hash(data[start:end]) for start, end in zip(bounds[:-1], bounds[1:], strict=True)),
                                 np.int64, len(bounds) - 1)
            self._order = narrow(np.argsort(hashes, kind="stable"))
            self._hashes = hashes[self._order]
        extra = 0 if self._order is None else self._order.nbytes + self._hashes.nbytes
        self.nbytes = len(self._data) + self._offsets.nbytes + extra

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _bytes(self, position: int) -> bytes:
        return self._data[self._offsets[position]:self._offsets[position + 1]]

    def __getitem__(self, position: int) -> str:
        return self._bytes(position).decode()

    def __iter__(self) -> Iterator[str]:
        return (self[position] for position in range(len(self)))

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._order is None:
            raise TypeError("this column has no index: build it with indexed=True")
        return self._order, self._hashes

    def positions(self, value: str) -> np.ndarray:
        """Every position holding `value`, ascending (an image shared by two products has two rows)."""
        order, hashes = self._index()
        key = value.encode()
        digest = hash(key)
        start = int(hashes.searchsorted(digest, "left"))
        end = int(hashes.searchsorted(digest, "right"))
        # Equal hashes keep their positions' order (a stable sort): the matches come out ascending.
        return np.asarray([p for p in order[start:end].tolist() if self._bytes(p) == key], np.int64)

    def position(self, value: str) -> int | None:
        """The first position holding `value`, or None (the look-up of every query by product id: no array made)."""
        order, hashes = self._index()
        key = value.encode()
        digest = hash(key)
        return self._first(order, hashes, key, digest, int(hashes.searchsorted(digest, "left")))

    def find(self, values: Sequence[str]) -> np.ndarray:
        """The first position of each of `values` that is present (absent ones are left out), in their order."""
        order, hashes = self._index()
        keys = [value.encode() for value in values]
        digests = np.fromiter((hash(key) for key in keys), np.int64, len(keys))
        starts = hashes.searchsorted(digests, "left").tolist()
        found = (self._first(order, hashes, key, digest, start)
                 for key, digest, start in zip(keys, digests.tolist(), starts, strict=True))
        return np.asarray([position for position in found if position is not None], np.int64)

    def _first(self, order: np.ndarray, hashes: np.ndarray, key: bytes, digest: int, start: int) -> int | None:
        """The first position holding `key` among the run of equal hashes from `start` (positions ascend in it)."""
        while start < len(hashes) and hashes[start] == digest:
            if self._bytes(int(order[start])) == key:
                return int(order[start])
            start += 1
        return None

    def take(self, positions: np.ndarray) -> list[str]:
        """The strings at many positions: one gather of the offsets instead of two numpy look-ups a string."""
        positions = np.asarray(positions, np.int64)
        starts, ends = self._offsets[positions].tolist(), self._offsets[positions + 1].tolist()
        data = self._data
        return [data[start:end].decode() for start, end in zip(starts, ends, strict=True)]


class Codes:
    """A column with few distinct values (roles, labels) as one small code per row (int8 while the values are few)."""

    def __init__(self, values: Sequence[str]) -> None:
        code_of: dict[str, int] = {}
        # A dict, not numpy's unique over objects: this loop lets other threads (the event loop) run.
        codes = np.fromiter((code_of.setdefault(value, len(code_of)) for value in values), np.int32, len(values))
        self._fill(codes, list(code_of))

    @classmethod
    def from_arrow(cls, array: pa.Array | pa.ChunkedArray, null: str = "") -> Codes:
        """The column of a pyarrow string array, nulls read as `null`, without a Python string per row; the codes
        are numbered in order of first appearance, as the constructor numbers them."""
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        encoded = array.fill_null(null).dictionary_encode()
        column = cls.__new__(cls)
        column._fill(encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist())
        return column

    def _fill(self, codes: np.ndarray, uniques: list[str]) -> None:
        width = next(dtype for dtype in (np.int8, np.int16, np.int32) if len(uniques) <= np.iinfo(dtype).max + 1)
        self.codes = codes.astype(width)
        self.uniques = uniques
        self.nbytes = self.codes.nbytes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, position: int) -> str:
        return self.uniques[self.codes[position]]

    def __iter__(self) -> Iterator[str]:
        return (self.uniques[code] for code in self.codes)

    def take(self, positions: np.ndarray) -> list[str]:
        """The values at many positions."""
        uniques = self.uniques
        return [uniques[code] for code in self.codes[positions].tolist()]


def narrow(positions: np.ndarray) -> np.ndarray:
    """Offsets, positions or counts (never negative) as int32 when they fit (half the bytes of int64), else int64."""
    positions = np.asarray(positions)
    fits = not len(positions) or int(positions.max()) <= np.iinfo(np.int32).max
    return positions.astype(np.int32 if fits else np.int64, copy=False)
