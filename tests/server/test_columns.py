"""String columns as arrays: positions by value and values by position, for short ids and long values alike."""

import numpy as np
import pyarrow as pa
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
    picked = np.asarray([len(values) - 1, 0, 3, 0])
    assert column.take(picked) == [values[i] for i in picked] and column.take(np.zeros(0, np.int32)) == []
    assert column.take(picked.tolist()) == [values[i] for i in picked] and column.take([]) == []


def test_an_empty_column_and_one_without_an_index():
    empty = Strings([], indexed=True)
    assert len(empty) == 0 and empty.position("a") is None and list(empty.find(["a"])) == []
    with pytest.raises(TypeError):
        Strings(["a"]).position("a")


def test_codes_hold_few_distinct_values():
    roles = Codes(["main", "other", "other", "main"])
    assert list(roles) == ["main", "other", "other", "main"] and roles[1] == "other"
    assert roles.codes.dtype == np.int8 and len(Codes([])) == 0
    assert roles.take(np.asarray([2, 0, 2])) == ["other", "main", "other"] == roles.take([2, 0, 2])
    assert roles[np.int64(1)] == "other" and roles.take([]) == []


@pytest.mark.parametrize("values", [SHORT, LONG, []], ids=["short", "long", "empty"])
def test_a_column_from_arrow_buffers_is_the_column_from_values(values):
    from_values = Strings(values, indexed=True)
    # Sliced and chunked: the buffers' offsets do not start at zero.
    array = pa.chunked_array([pa.array(["before", *values[:3]]).slice(1), pa.array(values[3:], pa.string())],
                             pa.string())
    column = Strings.from_arrow(array, indexed=True)
    assert list(column) == values and column.nbytes == from_values.nbytes
    for value in [*set(values), "absent"]:
        assert list(column.positions(value)) == list(from_values.positions(value))
    assert list(column.find([*values, "absent"])) == list(from_values.find([*values, "absent"]))
    assert list(Strings.from_arrow(pa.array(values, pa.large_string()))) == values
    with pytest.raises(ValueError):
        Strings.from_arrow(pa.array(["a", None]))


def test_codes_from_arrow_number_values_as_the_constructor_does():
    values = ["other", None, "main", "other", None]
    codes = Codes.from_arrow(pa.chunked_array([pa.array(values[:2]), pa.array(values[2:])]))
    expected = Codes([value or "" for value in values])
    assert list(codes) == list(expected) and codes.uniques == expected.uniques
    assert codes.codes.tolist() == expected.codes.tolist() and codes.codes.dtype == np.int8
    assert Codes([str(n) for n in range(300)]).codes.dtype == np.int16


def test_look_ups_are_right_when_every_string_has_the_same_hash(monkeypatch):
    """Equal hashes come out of the (unstable) sort in any order: positions stay ascending, find gives the first."""
    from server import columns

    monkeypatch.setattr(columns, "string_hashes", lambda offsets, data: np.zeros(len(offsets) - 1, np.uint64))
    monkeypatch.setattr(columns, "string_hash", lambda key: 0)
    values = ["b", "a", "b", "c", "a", "b"] * 50
    column = Strings(values, indexed=True)
    for value in ("a", "b", "c"):
        assert list(column.positions(value)) == [i for i, v in enumerate(values) if v == value]
    assert list(column.find(["c", "absent", "b", "a"])) == [3, 0, 1]


def test_the_hash_of_a_column_is_the_hash_of_each_value():
    from server.columns import HASH_SLICE, string_hash, string_hashes

    values = ["", "a", "ü-ß", "x" * 300, "B07X\0", *(f"img-{i}" for i in range(HASH_SLICE + 5))]
    keys = [value.encode() for value in values]
    offsets = np.concatenate([[0], np.cumsum([len(key) for key in keys])])
    hashes = string_hashes(offsets, np.frombuffer(b"".join(keys), np.uint8))
    assert [int(h) for h in hashes[:5]] == [string_hash(key) for key in keys[:5]]
    assert int(hashes[-1]) == string_hash(keys[-1]) and len(set(hashes.tolist())) == len(values)


def test_a_value_longer_than_every_string_held_is_absent_without_hashing_it(monkeypatch):
    """A query's id is hashed byte by byte in Python: a request naming a product or image by a megabytes-long id
    held the event loop for as long (about 1 s for 8 MB, within the server's 64 MiB messages), every request waiting.
    No held string is that long, so the look-ups answer at once, and look-ups of held ids are unchanged."""
    from server import columns

    column = Strings(SHORT, indexed=True)
    hashed: list[int] = []
    real_hash = columns.string_hash
    monkeypatch.setattr(columns, "string_hash", lambda key: hashed.append(len(key)) or real_hash(key))
    huge = "B07X" * 2_000_000
    assert column.position(huge) is None and len(column.positions(huge)) == 0
    assert list(column.find([huge, "img-2", huge])) == [1]
    assert hashed == [], "a value longer than every held string was hashed"
    assert column.position("img-10") == 5 and list(column.positions("B07X")) == [0, 2]
    assert Strings([], indexed=True).position(huge) is None
