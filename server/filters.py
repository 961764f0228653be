"""Business filters over product attributes: posting lists per string value and sorted values per number,
compiled to a product mask."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from server.columns import Strings, narrow
from server.errors import InvalidArgument

# What one request may ask for: bounds the work a filter costs, and says so when a caller overdoes it.
MAX_CLAUSES = 16
MAX_VALUES_PER_CLAUSE = 1024
MAX_EXCLUDED_PRODUCTS = 10_000


STRING = "string"
NUMBER = "number"


@dataclass(frozen=True)
class Range:
    """Bounds on a number: every bound given must hold (None: no such bound)."""

    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    def bounds(self) -> dict[str, float]:
        return {name: value for name, value in (("gt", self.gt), ("gte", self.gte), ("lt", self.lt),
                                                ("lte", self.lte)) if value is not None}


@dataclass(frozen=True)
class Clause:
    """A product passes when its value for `key` is one of `any_of`, or (with none_of) none of `none_of`, or (with
    range, for a number key) lies in `range`.

    A product without a value for the key fails an any_of or range clause and passes a none_of clause."""

    key: str
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    range: Range | None = None


@dataclass(frozen=True)
class Filter:
    """Every clause must hold (AND); excluded products never come back, whatever the clauses say."""

    clauses: tuple[Clause, ...] = ()
    exclude_product_ids: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.clauses or self.exclude_product_ids)


def check_size(filter_: Filter) -> None:
    """INVALID_ARGUMENT when a filter asks for more work than one request may: checked on every path, before
    anything else is done for the request."""
    if len(filter_.clauses) > MAX_CLAUSES:
        raise InvalidArgument(f"filter has {len(filter_.clauses)} clauses; at most {MAX_CLAUSES}")
    if len(filter_.exclude_product_ids) > MAX_EXCLUDED_PRODUCTS:
        raise InvalidArgument(f"filter excludes {len(filter_.exclude_product_ids)} products; at most "
                              f"{MAX_EXCLUDED_PRODUCTS}")


class ProductIds(Protocol):
    def find(self, values: Sequence[str]) -> np.ndarray: ...


class PostingLists:
    """For one attribute key: a code per product, its values (packed, searchable), and the products holding each
    value as one sorted array with offsets. No Python object per product, even for a key like item_name whose
    every value is different."""

    def __init__(self, values: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> None:
        if isinstance(values, pa.Array | pa.ChunkedArray):
            # A table's column: encoded by pyarrow, without a Python string per product (values numbered in order
            # of first appearance, as factorize numbers them).
            encoded = (values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values).dictionary_encode()
            codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            self.uniques = Strings.from_arrow(encoded.dictionary.cast(pa.string()), indexed=True)
        else:
            codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
            self.uniques = Strings([str(value) for value in uniques], indexed=True)
        self.codes = codes.astype(np.int32)  # -1: no value
        # Products grouped by code, ascending within each: one sort of the distinct keys code x products + product,
        # which numpy's default sort does without holding the interpreter (its stable sort held it, stalling the
        # event loop while a version loads beside the served one).
        rows = max(len(self.codes), 1)
        keys = np.sort(self.codes.astype(np.int64) * rows + np.arange(len(self.codes)))
        present = keys[keys >= 0] % rows
        self.products = narrow(present)
        counts = np.bincount(self.codes[present], minlength=len(self.uniques))
        self.offsets = narrow(np.concatenate([[0], np.cumsum(counts)]))
        self.nbytes = self.codes.nbytes + self.uniques.nbytes + self.products.nbytes + self.offsets.nbytes

    def products_with(self, values: tuple[str, ...]) -> np.ndarray:
        """Product rows holding any of the values (unknown values hold none)."""
        codes = self.uniques.find(list(dict.fromkeys(values)))
        if not len(codes):
            return np.zeros(0, self.products.dtype)
        return np.concatenate([self.products[self.offsets[c]:self.offsets[c + 1]] for c in codes.tolist()])

    def value_of(self, product_row: int) -> str | None:
        code = int(self.codes[product_row])
        return self.uniques[code] if code >= 0 else None

    def values(self) -> list[str | None]:
        return [self.uniques[code] if code >= 0 else None for code in self.codes]

    def value_counts(self) -> dict[str, int]:
        return {value: int(self.offsets[code + 1] - self.offsets[code]) for code, value in enumerate(self.uniques)}


def format_number(value: float) -> str:
    """A number as Match.attributes carries it: its shortest decimal form, without ".0" for a whole number."""
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)


class SortedNumbers:
    """For one number key: the value per product (NaN: none) and the products holding one, sorted by it. A range's
    products are one slice of that order, found by two binary searches, without a pass over the values. The
    planner does not count that slice: like any filter's, a range's products go into the request's one mask
    (every clause, hidden and excluded products), and the plan is chosen from the images of the products that
    mask keeps. Costs 20 bytes a product."""

    def __init__(self, values: Sequence[float | None] | np.ndarray) -> None:
        self.values = np.asarray([np.nan if v is None else v for v in values] if not isinstance(values, np.ndarray)
                                 else values, np.float64)
        present = np.flatnonzero(~np.isnan(self.values))
        self.products = present[np.argsort(self.values[present], kind="stable")].astype(np.int32)
        self.sorted = self.values[self.products]
        self.nbytes = self.values.nbytes + self.products.nbytes + self.sorted.nbytes

    def span(self, range_: Range) -> tuple[int, int]:
        """The slice of the sorted values that lies in the range."""
        start, end = 0, len(self.sorted)
        if range_.gt is not None:
            start = max(start, int(np.searchsorted(self.sorted, range_.gt, "right")))
        if range_.gte is not None:
            start = max(start, int(np.searchsorted(self.sorted, range_.gte, "left")))
        if range_.lt is not None:
            end = min(end, int(np.searchsorted(self.sorted, range_.lt, "left")))
        if range_.lte is not None:
            end = min(end, int(np.searchsorted(self.sorted, range_.lte, "right")))
        return start, max(start, end)

    def count(self, range_: Range) -> int:
        """How many products the range alone lets through, from its slice's length (bench.ranges sizes its ranges
        so); a request's plan counts its combined mask instead."""
        start, end = self.span(range_)
        return end - start

    def products_in(self, range_: Range) -> np.ndarray:
        start, end = self.span(range_)
        return self.products[start:end]

    def value_of(self, product_row: int) -> str | None:
        value = float(self.values[product_row])
        return None if math.isnan(value) else format_number(value)

    @property
    def held(self) -> int:
        return len(self.sorted)

    def bounds(self) -> tuple[float, float] | None:
        """The smallest and the largest value held, or None when no product holds one."""
        return (float(self.sorted[0]), float(self.sorted[-1])) if len(self.sorted) else None


@dataclass(frozen=True)
class KeyInfo:
    """One attribute key as GetInfo describes it: its kind, how many products hold it, and a number's bounds."""

    key: str
    kind: str
    product_count: int
    min: float | None = None
    max: float | None = None


class AttributeIndex:
    """Posting lists for every string key and sorted values for every number key of a version, built once when the
    version loads."""

    def __init__(self, attributes: dict[str, Sequence[str | None]], product_ids: ProductIds,
                 product_count: int, numbers: Mapping[str, Sequence[float | None] | np.ndarray] | None = None) -> None:
        numbers = numbers or {}
        both = set(attributes) & set(numbers)
        if both:
            raise ValueError(f"attribute {sorted(both)[0]!r} cannot be both a string and a number")
        self.keys = sorted([*attributes, *numbers])
        self._lists = {key: PostingLists(values) for key, values in attributes.items()}
        self._numbers = {key: SortedNumbers(values) for key, values in numbers.items()}
        self._product_ids = product_ids
        self.product_count = product_count
        self.nbytes = sum(column.nbytes for column in [*self._lists.values(), *self._numbers.values()])
        self._described: list[KeyInfo] | None = None

    def lists(self, key: str) -> PostingLists:
        return self._lists[key]

    def numbers(self, key: str) -> SortedNumbers:
        return self._numbers[key]

    @property
    def string_keys(self) -> list[str]:
        return sorted(self._lists)

    @property
    def number_keys(self) -> list[str]:
        return sorted(self._numbers)

    def kind(self, key: str) -> str | None:
        return STRING if key in self._lists else NUMBER if key in self._numbers else None

    def describe(self) -> list[KeyInfo]:
        """Every key, sorted, with its kind, the products holding it and, for a number, its bounds; worked out once
        (GetInfo asks on every call, and counting is a pass over every product per key)."""
        if self._described is None:
            self._described = self._describe()
        return self._described

    def _describe(self) -> list[KeyInfo]:
        out = []
        for key in self.keys:
            if key in self._numbers:
                column = self._numbers[key]
                low, high = column.bounds() or (None, None)
                out.append(KeyInfo(key, NUMBER, column.held, low, high))
            else:
                out.append(KeyInfo(key, STRING, int(np.count_nonzero(self._lists[key].codes >= 0))))
        return out

    def attributes_of(self, product_row: int) -> dict[str, str]:
        """The product's attributes in the version's key order, without the keys it has no value for; numbers as
        format_number writes them."""
        columns = (self._lists[key] if key in self._lists else self._numbers[key] for key in self.keys)
        values = ((key, column.value_of(product_row)) for key, column in zip(self.keys, columns, strict=True))
        return {key: value for key, value in values if value is not None}

    def check(self, filter_: Filter) -> None:
        """INVALID_ARGUMENT naming what is wrong: an unknown key, an empty or two-sided clause, a clause of the wrong
        kind for its key, a range without bounds or with a NaN, too much."""
        check_size(filter_)
        for position, clause in enumerate(filter_.clauses, 1):
            name = f"filter clause {position} ({clause.key!r})"
            kind = self.kind(clause.key)
            if kind is None:
                known = ", ".join(f"{key} ({self.kind(key)})" for key in self.keys) or \
                    "none: this version has no product attributes"
                raise InvalidArgument(f"{name}: unknown attribute key; the keys are {known}")
            given = [part for part, present in (("any_of", clause.any_of), ("none_of", clause.none_of),
                                                ("range", clause.range is not None)) if present]
            if len(given) > 1:
                raise InvalidArgument(f"{name} sets {'both ' if len(given) == 2 else ''}{' and '.join(given)}: set "
                                      f"one of them, or make them several clauses")
            if kind == NUMBER:
                _check_range(name, clause)
                continue
            if clause.range is not None:
                raise InvalidArgument(f"{name} is a range, but {clause.key!r} is a string attribute: give any_of or "
                                      f"none_of values")
            values = clause.any_of or clause.none_of
            if not values:
                raise InvalidArgument(f"{name} is empty: give any_of or none_of values")
            if len(values) > MAX_VALUES_PER_CLAUSE:
                raise InvalidArgument(f"{name} has {len(values)} values; at most {MAX_VALUES_PER_CLAUSE}")

    def excluded_rows(self, filter_: Filter) -> np.ndarray:
        """Product rows of the excluded product ids; ids not in this version are ignored (a basket may
        hold products the catalogue has since dropped)."""
        return self._product_ids.find(filter_.exclude_product_ids)

    def allowed(self, filter_: Filter) -> np.ndarray | None:
        """The products the clauses let through (a bool mask), or None when there are no clauses."""
        if not filter_.clauses:
            return None
        self.check(filter_)
        mask = np.ones(self.product_count, bool)
        for clause in filter_.clauses:
            if clause.none_of:
                mask[self._lists[clause.key].products_with(clause.none_of)] = False
                continue
            passing = np.zeros(self.product_count, bool)
            passing[self.products_passing(clause)] = True
            mask &= passing
        return mask

    def products_passing(self, clause: Clause) -> np.ndarray:
        """The product rows an any_of or range clause lets through: posting lists, or a slice of the sorted values."""
        if clause.range is not None:
            return self._numbers[clause.key].products_in(clause.range)
        return self._lists[clause.key].products_with(clause.any_of)


def _check_range(name: str, clause: Clause) -> None:
    """A clause on a number key: a range with at least one bound, none of them NaN."""
    if clause.any_of or clause.none_of:
        raise InvalidArgument(f"{name} gives values, but {clause.key!r} is a number attribute: give a range (gt, gte, "
                              f"lt, lte)")
    bounds = clause.range.bounds() if clause.range is not None else {}
    if not bounds:
        raise InvalidArgument(f"{name} is empty: give a range with gt, gte, lt or lte")
    for bound, value in bounds.items():
        if math.isnan(value):
            raise InvalidArgument(f"{name}: range {bound} is NaN; bounds are numbers")
