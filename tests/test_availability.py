"""availability.json and leases: the small shared files that let servers hide products and keep versions."""

import json
import multiprocessing
import os
import time

import pytest

from lookalike.availability import AVAILABILITY_FILE, AvailabilityError, change_availability, read_availability
from lookalike.leases import leased_versions, remove_lease, write_lease


def test_nothing_hidden_is_version_zero(tmp_path):
    state = read_availability(tmp_path)
    assert state.version == 0 and state.hidden == {}


def test_hide_and_show_increment_the_version_and_a_no_op_does_not(tmp_path):
    state, changed = change_availability(tmp_path, hide=["P1", "P2"], reason="delisted")
    assert (state.version, changed) == (1, 2) and state.hidden["P1"]["reason"] == "delisted"
    state, changed = change_availability(tmp_path, hide=["P2"])
    assert (state.version, changed) == (1, 0)
    state, changed = change_availability(tmp_path, show=["P1", "never-hidden"])
    assert (state.version, changed) == (2, 1) and set(state.hidden) == {"P2"}
    assert read_availability(tmp_path) == state
    assert not list(tmp_path.glob(f".{AVAILABILITY_FILE}.*"))  # no temporary file left behind


@pytest.mark.parametrize(("kwargs", "message"), [({"hide": [""]}, "not a product id"),
                                                 ({"hide": [" P1"]}, "not a product id"),
                                                 ({"hide": ["P1"], "reason": "sold"}, "reason must be one of")])
def test_mistakes_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        change_availability(tmp_path, **kwargs)
    assert read_availability(tmp_path).version == 0


def test_a_malformed_file_is_an_error_naming_it(tmp_path):
    (tmp_path / AVAILABILITY_FILE).write_text('{"version": "x"}')
    with pytest.raises(AvailabilityError, match="not an availability file"):
        read_availability(tmp_path)


@pytest.mark.parametrize("content", [b'{"version": 2, "hidden": {"caf\xe9": {}}}',  # latin-1, not UTF-8
                                     b'{"version": 2, "hidden": ' + b"[" * 100_000,  # nested past the parser's depth
                                     b'{"version": 2' + b"0" * 5000 + b', "hidden": {}}'])  # past int's digit limit
def test_a_file_that_is_not_json_text_is_an_error_naming_it(tmp_path, content):
    """Before, these escaped as UnicodeDecodeError, RecursionError or ValueError: a server starting beside such a file
    failed to start (only AvailabilityError is refused and logged), and its watch loop logged a traceback per check."""
    (tmp_path / AVAILABILITY_FILE).write_bytes(content)
    with pytest.raises(AvailabilityError, match="cannot be read"):
        read_availability(tmp_path)


def _hide_many(folder, start):
    for n in range(start, start + 25):
        change_availability(folder, hide=[f"P{n}"])


def test_concurrent_writers_never_lose_a_change(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hide_many, args=(tmp_path, start)) for start in (0, 100, 200)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    state = read_availability(tmp_path)
    assert len(state.hidden) == 75 and state.version == 75
    json.loads((tmp_path / AVAILABILITY_FILE).read_text())  # whole, never half written


def test_leases_are_live_until_they_expire_or_their_process_is_gone(tmp_path):
    write_lease(tmp_path, "server-a", ["v2", "v1"], ttl_s=30)
    assert leased_versions(tmp_path) == {"server-a": {"v1", "v2"}}
    assert leased_versions(tmp_path, now=time.time() + 31) == {}
    remove_lease(tmp_path, "server-a")
    assert leased_versions(tmp_path) == {}
    # A lease of a process of this host that no longer exists is dead at once.
    path = write_lease(tmp_path, "server-b", ["v3"], ttl_s=30)
    lease = json.loads(path.read_text())
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    lease["pid"] = child
    path.write_text(json.dumps(lease))
    assert leased_versions(tmp_path) == {}
