"""Business filters over product attributes: posting lists per attribute value, compiled to a product mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from server.columns import Strings
from server.errors import InvalidArgument

# What one request may ask for: bounds the work a filter costs, and says so when a caller overdoes it.
MAX_CLAUSES = 16
MAX_VALUES_PER_CLAUSE = 1024
MAX_EXCLUDED_PRODUCTS = 10_000


@dataclass(frozen=True)
class Clause:
    """A product passes when its value for `key` is one of `any_of`, or (with none_of) none of `none_of`.

    A product without a value for the key fails an any_of clause and passes a none_of clause."""

    key: str
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()


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

    def __init__(self, values: Sequence[str | None]) -> None:
        codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
        self.codes = codes.astype(np.int32)  # -1: no value
        self.uniques = Strings([str(value) for value in uniques], indexed=True)
        order = np.argsort(self.codes, kind="stable")
        present = order[self.codes[order] >= 0]
        self.products = present.astype(np.int64)
        counts = np.bincount(self.codes[present], minlength=len(uniques))
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.nbytes = self.codes.nbytes + self.uniques.nbytes + self.products.nbytes + self.offsets.nbytes

    def products_with(self, values: tuple[str, ...]) -> np.ndarray:
        """Product rows holding any of the values (unknown values hold none)."""
        codes = self.uniques.find(list(dict.fromkeys(values)))
        if not len(codes):
            return np.zeros(0, np.int64)
        return np.concatenate([self.products[self.offsets[c]:self.offsets[c + 1]] for c in codes.tolist()])

    def value_of(self, product_row: int) -> str | None:
        code = int(self.codes[product_row])
        return self.uniques[code] if code >= 0 else None

    def values(self) -> list[str | None]:
        return [self.uniques[code] if code >= 0 else None for code in self.codes]

    def value_counts(self) -> dict[str, int]:
        return {value: int(self.offsets[code + 1] - self.offsets[code]) for code, value in enumerate(self.uniques)}


class AttributeIndex:
    """Posting lists for every attribute key of a version, built once when the version loads."""

    def __init__(self, attributes: dict[str, Sequence[str | None]], product_ids: ProductIds,
                 product_count: int) -> None:
        self.keys = sorted(attributes)
        self._lists = {key: PostingLists(values) for key, values in attributes.items()}
        self._product_ids = product_ids
        self.product_count = product_count
        self.nbytes = sum(lists.nbytes for lists in self._lists.values())

    def lists(self, key: str) -> PostingLists:
        return self._lists[key]

    def attributes_of(self, product_row: int) -> dict[str, str]:
        """The product's attributes in the version's key order, without the keys it has no value for."""
        values = ((key, self._lists[key].value_of(product_row)) for key in self._lists)
        return {key: value for key, value in values if value is not None}

    def check(self, filter_: Filter) -> None:
        """INVALID_ARGUMENT naming what is wrong: an unknown key, an empty or two-sided clause, too much."""
        check_size(filter_)
        for position, clause in enumerate(filter_.clauses, 1):
            name = f"filter clause {position} ({clause.key!r})"
            if clause.key not in self._lists:
                known = ", ".join(self.keys) or "none: this version has no product attributes"
                raise InvalidArgument(f"{name}: unknown attribute key; the keys are {known}")
            if clause.any_of and clause.none_of:
                raise InvalidArgument(f"{name} sets both any_of and none_of: make them two clauses")
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
            lists = self._lists[clause.key]
            if clause.any_of:
                passing = np.zeros(self.product_count, bool)
                passing[lists.products_with(clause.any_of)] = True
                mask &= passing
            else:
                mask[lists.products_with(clause.none_of)] = False
        return mask
