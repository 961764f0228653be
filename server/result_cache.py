"""Answers to repeated FindSimilar-by-id questions, bounded in entries and in bytes (least recently used out)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Protocol

# What one cached answer costs besides its strings: the entry, the result objects and their floats (measured
# with tracemalloc on answers of k = 10..1000, group_size 0..100, with and without attributes; rounded up).
_ENTRY_BYTES = 400
_RESULT_BYTES = 350
_IMAGE_BYTES = 300
_ATTRIBUTE_BYTES = 150
_STRING_BYTES = 60  # a str object's header and its slot in a tuple


class _Image(Protocol):
    image_id: str
    path: str


class _Result(Protocol):
    product_id: str
    image: _Image
    images: Sequence[_Image]
    attributes: dict[str, str]


def answer_bytes(results: Sequence[_Result]) -> int:
    """An estimate of the memory one cached answer holds: what the byte bound counts."""
    total = _ENTRY_BYTES
    for result in results:
        total += _RESULT_BYTES + len(result.product_id) + len(result.image.image_id) + len(result.image.path)
        total += sum(_IMAGE_BYTES + len(image.image_id) + len(image.path) for image in result.images)
        total += sum(_ATTRIBUTE_BYTES + len(key) + len(value) for key, value in result.attributes.items())
    return total


def key_bytes(options) -> int:
    """What a request's key holds besides a few small fields: its filter's strings (up to 10,000 excluded ids and
    16 x 1,024 clause values), counted against the same bound as the answers."""
    strings = [*options.filter.exclude_product_ids]
    for clause in options.filter.clauses:
        strings += [clause.key, *clause.any_of, *clause.none_of]
    return _ENTRY_BYTES + sum(_STRING_BYTES + len(value) for value in strings)


class ResultCache:
    """An LRU map from a question to its answer, holding at most max_entries answers and max_bytes bytes.

    Touched on the event loop only. Keys name the version and availability version that answered, so a swap
    or a hide makes old entries unreachable; they age out of the LRU order."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must not be negative")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, tuple[list, int]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> list | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, results: list, key_size: int = 0) -> bool:
        """Keeps the answer unless it and its key (key_size bytes) exceed a tenth of the byte bound alone (they
        would flush the cache)."""
        size = answer_bytes(results) + key_size
        if not self.enabled or size > self.max_bytes // 10:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (results, size)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        return True
