"""Columns of strings as numpy arrays: no Python object per row, whatever the catalogue's size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa


class Strings:
    """Strings by position, packed in one buffer with offsets; with `indexed`, positions by string too.

    The index is each string's hash (string_hashes), sorted, with the positions in that order: a look-up is a
    binary search and a byte comparison (microseconds at 400,000 ids, vectorised over many values), whatever the
    strings' length. Building it is numpy's work on whole slices of the column, which releases the interpreter
    (a Python call per string, or sorting the strings themselves, held it for tens of milliseconds at a time,
    stalling the event loop while a version loads beside the served one). A column costs its UTF-8 bytes plus
    4 bytes a row, 16 when indexed (8 and 24 past 2 GB of bytes or 2**31 rows)."""

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
        # The same offsets read one at a time as Python ints (a memoryview's item is one; a numpy array's is a
        # numpy scalar made per read): take()'s few positions cost no numpy call.
        self._starts = memoryview(offsets)
        self._data = data
        # The longest string's UTF-8 bytes: a longer value is absent without being hashed (a request's id is hashed
        # in Python, a byte at a time: a megabytes-long one held the event loop for as long).
        self._longest = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
        self._order: np.ndarray | None = None
        self._hashes: np.ndarray | None = None
        if indexed:
            hashes = string_hashes(offsets, np.frombuffer(data, np.uint8))
            # numpy's default sort releases the interpreter (its stable sort did not): equal hashes may come in any
            # order, which the look-ups put right.
            self._order = narrow(np.argsort(hashes))
            self._hashes = hashes[self._order]
        extra = 0 if self._order is None else self._order.nbytes + self._hashes.nbytes
        self.nbytes = len(self._data) + self._offsets.nbytes + extra

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _bytes(self, position: int) -> bytes:
        return self._data[self._starts[position]:self._starts[position + 1]]

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
        if len(key) > self._longest:
            return np.zeros(0, np.int64)
        digest = np.uint64(string_hash(key))
        start = int(hashes.searchsorted(digest, "left"))
        end = int(hashes.searchsorted(digest, "right"))
        return np.asarray(sorted(p for p in order[start:end].tolist() if self._bytes(p) == key), np.int64)

    def position(self, value: str) -> int | None:
        """The first position holding `value`, or None (the look-up of every query by product id)."""
        order, hashes = self._index()
        key = value.encode()
        if len(key) > self._longest:
            return None
        digest = np.uint64(string_hash(key))
        start = int(hashes.searchsorted(digest, "left"))
        end = int(hashes.searchsorted(digest, "right"))
        if end - start == 1:  # nearly always: one string of this hash
            position = int(order[start])
            return position if self._bytes(position) == key else None
        # Equal hashes are in no particular order: the first position is the least of the matches.
        return min((p for p in order[start:end].tolist() if self._bytes(p) == key), default=None)

    def find(self, values: Sequence[str]) -> np.ndarray:
        """The first position of each of `values` that is present (absent ones are left out), in their order."""
        order, hashes = self._index()
        keys = [key for key in (value.encode() for value in values) if len(key) <= self._longest]
        offsets = np.zeros(len(keys) + 1, np.int64)
        np.cumsum([len(key) for key in keys], out=offsets[1:])
        digests = string_hashes(offsets, np.frombuffer(b"".join(keys), np.uint8))
        starts = np.searchsorted(hashes, digests, "left").tolist()
        ends = np.searchsorted(hashes, digests, "right").tolist()
        found = []
        for key, start, end in zip(keys, starts, ends, strict=True):
            # Usually one candidate; equal hashes are in no particular order, so the first position is the least.
            matches = [p for p in order[start:end].tolist() if self._bytes(p) == key]
            if matches:
                found.append(min(matches))
        return np.asarray(found, np.int64)

    def take(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """The strings at a few positions (an answer's): each offset read as a Python int, no numpy call a string."""
        if isinstance(positions, np.ndarray):
            positions = positions.tolist()
        starts, data = self._starts, self._data
        return [data[starts[position]:starts[position + 1]].decode() for position in positions]


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
        self._code_of = memoryview(self.codes)  # codes read as Python ints, as Strings._starts
        self.uniques = uniques
        self.nbytes = self.codes.nbytes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, position: int) -> str:
        return self.uniques[self._code_of[position]]

    def __iter__(self) -> Iterator[str]:
        return (self.uniques[code] for code in self.codes)

    def take(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """The values at a few positions."""
        if isinstance(positions, np.ndarray):
            positions = positions.tolist()
        uniques, code_of = self.uniques, self._code_of
        return [uniques[code_of[position]] for position in positions]


# A string's hash: the polynomial of its UTF-8 bytes (each plus one, so that zeros count) in HASH_BASE, modulo 2**64,
# mixed by splitmix64's finaliser. numpy computes it for a column a slice at a time (HASH_SLICE_BYTES of strings,
# a few MB of temporaries: its steps that hold the interpreter, such as np.repeat, stay well under a millisecond),
# and Python for one value, with the same integers.
HASH_BASE = 0x100000001B3
HASH_SLICE_BYTES = 2**18
HASH_SLICE = 65_536
_MASK = 2**64 - 1
_MIX = (30, 0xBF58476D1CE4E5B9, 27, 0x94D049BB133111EB, 31)


def string_hashes(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """uint64 hashes of the strings data[offsets[i]:offsets[i + 1]] (data: their UTF-8 bytes as uint8)."""
    offsets = np.asarray(offsets, np.int64)
    count = len(offsets) - 1
    hashes = np.zeros(max(count, 0), np.uint64)
    if count <= 0:
        return hashes
    lengths = np.diff(offsets)
    # powers[k] = HASH_BASE ** k modulo 2**64 (uint64 products wrap).
    powers = np.cumprod(np.concatenate([[1], np.full(int(lengths.max()), HASH_BASE)]).astype(np.uint64))
    first = 0
    while first < count:
        # The strings of at most HASH_SLICE_BYTES (one at least), and at most HASH_SLICE of them.
        last = int(np.searchsorted(offsets, offsets[first] + HASH_SLICE_BYTES, "right")) - 1
        last = min(max(last, first + 1), first + HASH_SLICE)
        begin = int(offsets[first])
        ends = offsets[first + 1:last + 1] - begin
        sizes = lengths[first:last]
        # Horner's order: a string's last byte has power 0.
        place = np.repeat(ends - 1, sizes) - np.arange(int(ends[-1]))
        terms = (data[begin:begin + int(ends[-1])].astype(np.uint64) + np.uint64(1)) * powers[place]
        sums = np.zeros(len(terms) + 1, np.uint64)
        np.cumsum(terms, out=sums[1:])
        hashes[first:last] = sums[ends] - sums[ends - sizes]
        first = last
    first_shift, first_factor, second_shift, second_factor, third_shift = (np.uint64(x) for x in _MIX)
    hashes ^= hashes >> first_shift
    hashes *= first_factor
    hashes ^= hashes >> second_shift
    hashes *= second_factor
    hashes ^= hashes >> third_shift
    return hashes


def string_hash(key: bytes) -> int:
    """string_hashes' hash of one string's UTF-8 bytes, in Python: a look-up's, without numpy's fixed costs."""
    value = 0
    for byte in key:
        value = (value * HASH_BASE + byte + 1) & _MASK
    first_shift, first_factor, second_shift, second_factor, third_shift = _MIX
    value ^= value >> first_shift
    value = (value * first_factor) & _MASK
    value ^= value >> second_shift
    value = (value * second_factor) & _MASK
    return value ^ (value >> third_shift)


def narrow(positions: np.ndarray) -> np.ndarray:
    """Offsets, positions or counts (never negative) as int32 when they fit (half the bytes of int64), else int64."""
    positions = np.asarray(positions)
    fits = not len(positions) or int(positions.max()) <= np.iinfo(np.int32).max
    return positions.astype(np.int32 if fits else np.int64, copy=False)
