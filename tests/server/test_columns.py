"""String columns as arrays: positions by value and values by position, for short ids and long values alike."""

import numpy as np
import pytest

from server.columns import Codes, Strings

SHORT = ["B07X", "img-2", "B07X", "ü-ß", "a", "img-10"]
LONG = [f"{'x' * 64}-{i % 3}" for i in range(7)] + ["short", "ü" * 40, ""]


@pytest.mark.parametrize("values", [SHORT, LONG], ids=["short", "long"])
def test_positions_by_value_and_values_by_position(values):
    column = Strings(values, indexed=True)
    assert list(column) == values and len(column) == len(values)
    for value in set(values):
        assert list(column.positions(value)) == [i for i, v in enumerate(values) if v == value]
        assert column.position(value) == values.index(value)
    for absent in ("B07", "B07XY", "nope", "x" * 200, "B07X\0"):
        assert column.position(absent) is None and len(column.positions(absent)) == 0
    asked = [values[3], "absent", values[0], values[3]]
    assert list(column.find(asked)) == [values.index(values[3]), values.index(values[0]), values.index(values[3])]
    assert list(column.find(["absent", "B07X\0"])) == [] and list(column.find([])) == []
    assert list(column.find([""])) == ([values.index("")] if "" in values else [])


def test_an_empty_column_and_one_without_an_index():
    empty = Strings([], indexed=True)
    assert len(empty) == 0 and empty.position("a") is None and list(empty.find(["a"])) == []
    with pytest.raises(TypeError):
        Strings(["a"]).position("a")


def test_codes_hold_few_distinct_values():
    roles = Codes(["main", "other", "other", "main"])
    assert list(roles) == ["main", "other", "other", "main"] and roles[1] == "other"
    assert roles.codes.dtype == np.int32 and len(Codes([])) == 0
