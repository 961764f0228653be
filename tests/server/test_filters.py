"""Filters over product attributes: posting lists, clause semantics, and every mistake named."""

import numpy as np
import pytest

from server.columns import Strings
from server.errors import InvalidArgument
from server.filters import MAX_CLAUSES, MAX_VALUES_PER_CLAUSE, AttributeIndex, Clause, Filter, PostingLists

PRODUCTS = [f"P{i}" for i in range(8)]
ATTRIBUTES = {
    "color": ["Black", "Blue", None, "Black", "Red", "Blue", "Black", None],
    "brand": ["Acme", "Acme", "Zeta", "Zeta", "Acme", "Omni", "Omni", "Zeta"],
}


@pytest.fixture
def index():
    return AttributeIndex(ATTRIBUTES, Strings(PRODUCTS, indexed=True), len(PRODUCTS))


def rows(mask):
    return [int(i) for i in np.flatnonzero(mask)]


def test_posting_lists_hold_each_values_products():
    lists = PostingLists(ATTRIBUTES["color"])
    assert sorted(lists.products_with(("Black",))) == [0, 3, 6]
    assert sorted(lists.products_with(("Blue", "Red", "Blue"))) == [1, 4, 5]
    assert list(lists.products_with(("Green",))) == []
    assert lists.value_counts() == {"Black": 3, "Blue": 2, "Red": 1}


def test_any_of_is_an_or_and_clauses_are_an_and(index):
    assert rows(index.allowed(Filter((Clause("color", any_of=("Black", "Red")),)))) == [0, 3, 4, 6]
    both = Filter((Clause("color", any_of=("Black", "Red")), Clause("brand", any_of=("Acme",))))
    assert rows(index.allowed(both)) == [0, 4]


def test_none_of_lets_through_products_without_the_key(index):
    assert rows(index.allowed(Filter((Clause("color", none_of=("Black",)),)))) == [1, 2, 4, 5, 7]
    assert rows(index.allowed(Filter((Clause("brand", none_of=("Acme", "Zeta")),)))) == [5, 6]


def test_a_filter_nothing_matches_allows_nothing(index):
    assert rows(index.allowed(Filter((Clause("color", any_of=("Green",)),)))) == []


def test_no_clauses_allow_everything_and_excluded_ids_ignore_unknown_products(index):
    only_excluded = Filter(exclude_product_ids=("P2", "gone", "P5"))
    assert index.allowed(only_excluded) is None
    assert list(index.excluded_rows(only_excluded)) == [2, 5]
    assert not Filter() and only_excluded


@pytest.mark.parametrize(("filter_", "message"), [
    (Filter((Clause("colour", any_of=("Black",)),)), "filter clause 1 ('colour'): unknown attribute key; the keys "
                                                      "are brand, color"),
    (Filter((Clause("brand", any_of=("Acme",)), Clause("color"))), "filter clause 2 ('color') is empty"),
    (Filter((Clause("color", any_of=("Black",), none_of=("Red",)),)), "sets both any_of and none_of"),
    (Filter((Clause("color", any_of=tuple(map(str, range(MAX_VALUES_PER_CLAUSE + 1)))),)),
     f"has {MAX_VALUES_PER_CLAUSE + 1} values; at most {MAX_VALUES_PER_CLAUSE}"),
    (Filter(tuple(Clause("color", any_of=("Black",)) for _ in range(MAX_CLAUSES + 1))),
     f"{MAX_CLAUSES + 1} clauses; at most {MAX_CLAUSES}"),
])
def test_mistakes_are_invalid_arguments_naming_what_is_wrong(index, filter_, message):
    with pytest.raises(InvalidArgument, match=None) as info:
        index.allowed(filter_)
    assert message in str(info.value)


def test_a_version_without_attributes_says_so():
    index = AttributeIndex({}, Strings(["P0"], indexed=True), 1)
    with pytest.raises(InvalidArgument) as info:
        index.allowed(Filter((Clause("brand", any_of=("Acme",)),)))
    assert "this version has no product attributes" in str(info.value)
