"""Filters over product attributes: posting lists, clause semantics, and every mistake named."""

import numpy as np
import pyarrow as pa
import pytest

from server.columns import Strings
from server.errors import InvalidArgument
from server.filters import (
    MAX_CLAUSES,
    MAX_VALUES_PER_CLAUSE,
    AttributeIndex,
    Clause,
    Filter,
    KeyInfo,
    PostingLists,
    Range,
    SortedNumbers,
    format_number,
)

PRODUCTS = [f"P{i}" for i in range(8)]
ATTRIBUTES = {
    "color": ["Black", "Blue", None, "Black", "Red", "Blue", "Black", None],
    "brand": ["Acme", "Acme", "Zeta", "Zeta", "Acme", "Omni", "Omni", "Zeta"],
}
NUMBERS = {
    "weight": [1.5, None, 2.5, 0.25, 2.5, None, 7.0, 3.0],
    "year": [2018, 2019, 2020, None, 2021, 2019, None, 2022],
}


@pytest.fixture
def index():
    return AttributeIndex(ATTRIBUTES, Strings(PRODUCTS, indexed=True), len(PRODUCTS), NUMBERS)


def rows(mask):
    return [int(i) for i in np.flatnonzero(mask)]


def test_posting_lists_hold_each_values_products():
    lists = PostingLists(ATTRIBUTES["color"])
    assert sorted(lists.products_with(("Black",))) == [0, 3, 6]
    assert sorted(lists.products_with(("Blue", "Red", "Blue"))) == [1, 4, 5]
    assert list(lists.products_with(("Green",))) == []
    assert lists.value_counts() == {"Black": 3, "Blue": 2, "Red": 1}


@pytest.mark.parametrize("values", [ATTRIBUTES["color"], [None, None], []], ids=["some", "none held", "empty"])
def test_posting_lists_from_a_tables_column_are_those_from_its_values(values):
    from_values = PostingLists(values)
    lists = PostingLists(pa.chunked_array([pa.array(values[:3], pa.string()), pa.array(values[3:], pa.string())]))
    assert lists.codes.tolist() == from_values.codes.tolist() and list(lists.uniques) == list(from_values.uniques)
    assert lists.products.tolist() == from_values.products.tolist()
    assert lists.offsets.tolist() == from_values.offsets.tolist() and lists.values() == values
    for value in {*values} - {None}:
        assert lists.products_with((value,)).tolist() == from_values.products_with((value,)).tolist()


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
                                                      "are brand (string), color (string), weight (number), year "
                                                      "(number)"),
    (Filter((Clause("brand", any_of=("Acme",)), Clause("color"))), "filter clause 2 ('color') is empty"),
    (Filter((Clause("color", any_of=("Black",), none_of=("Red",)),)), "sets both any_of and none_of"),
    (Filter((Clause("weight", range=Range(lt=2)), Clause("colour", range=Range(lt=2)))),
     "filter clause 2 ('colour'): unknown attribute key"),
    (Filter((Clause("color", range=Range(gt=1)),)),
     "filter clause 1 ('color') is a range, but 'color' is a string attribute: give any_of or none_of values"),
    (Filter((Clause("weight", any_of=("2.5",)),)),
     "filter clause 1 ('weight') gives values, but 'weight' is a number attribute: give a range (gt, gte, lt, lte)"),
    (Filter((Clause("year", none_of=("2019",)),)), "'year' is a number attribute"),
    (Filter((Clause("weight", any_of=("2.5",), range=Range(lt=3)),)), "sets both any_of and range"),
    (Filter((Clause("weight", range=Range()),)), "filter clause 1 ('weight') is empty: give a range with gt, gte, lt "
                                                 "or lte"),
    (Filter((Clause("weight"),)), "filter clause 1 ('weight') is empty"),
    (Filter((Clause("weight", range=Range(gt=1, lt=float("nan"))),)), "filter clause 1 ('weight'): range lt is NaN"),
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


def ranged(key, **bounds):
    return Filter((Clause(key, range=Range(**bounds)),))


@pytest.mark.parametrize(("bounds", "expected"), [
    ({"gt": 2.5}, [6, 7]),
    ({"gte": 2.5}, [2, 4, 6, 7]),
    ({"lt": 2.5}, [0, 3]),
    ({"lte": 2.5}, [0, 2, 3, 4]),
    ({"gt": 0.25, "lte": 3}, [0, 2, 4, 7]),
    ({"gte": 0.25, "gt": 1.5, "lt": 7, "lte": 100}, [2, 4, 7]),  # every bound holds
    ({"gte": 3, "lte": 2}, []),                                   # an empty range lets nothing through
    ({"gt": float("-inf")}, [0, 2, 3, 4, 6, 7]),                  # a product without the key fails any range
])
def test_a_range_takes_every_operator_and_products_without_the_key_fail_it(index, bounds, expected):
    assert rows(index.allowed(ranged("weight", **bounds))) == expected
    assert index.numbers("weight").count(Range(**bounds)) == len(expected)


def test_ranges_and_string_clauses_and_together(index):
    both = Filter((Clause("weight", range=Range(gte=1)), Clause("brand", any_of=("Acme", "Omni")),
                   Clause("year", range=Range(lt=2022)), Clause("color", none_of=("Red",))))
    assert rows(index.allowed(both)) == [0]
    assert rows(index.allowed(Filter((Clause("year", range=Range(gte=2019)), Clause("color", any_of=("Blue",)))))) \
        == [1, 5]


def test_sorted_numbers_give_a_ranges_products_and_count_from_two_binary_searches():
    numbers = SortedNumbers(np.array([3.0, np.nan, 1.0, 2.0, 2.0]))
    assert list(numbers.sorted) == [1.0, 2.0, 2.0, 3.0] and list(numbers.products) == [2, 3, 4, 0]
    assert numbers.span(Range(gte=2, lt=3)) == (1, 3) and numbers.count(Range(gt=2)) == 1
    assert sorted(numbers.products_in(Range(lte=2))) == [2, 3, 4]
    assert numbers.bounds() == (1.0, 3.0) and SortedNumbers([None, None]).bounds() is None


def test_numbers_come_back_as_attributes_in_their_shortest_form(index):
    assert index.attributes_of(0) == {"brand": "Acme", "color": "Black", "weight": "1.5", "year": "2018"}
    assert index.attributes_of(6) == {"brand": "Omni", "color": "Black", "weight": "7"}
    assert [format_number(v) for v in (2019.0, 0.1, -3.0, 1e20, 2.5e-7)] == ["2019", "0.1", "-3", "1e+20", "2.5e-07"]


def test_the_index_describes_each_keys_kind_and_a_numbers_bounds(index):
    assert index.describe() == [KeyInfo("brand", "string", 8), KeyInfo("color", "string", 6),
                                KeyInfo("weight", "number", 6, 0.25, 7.0), KeyInfo("year", "number", 6, 2018, 2022)]
    assert index.keys == ["brand", "color", "weight", "year"] and index.number_keys == ["weight", "year"]
    with pytest.raises(ValueError, match="both a string and a number"):
        AttributeIndex({"year": ["x"]}, Strings(["P0"], indexed=True), 1, {"year": [1.0]})
