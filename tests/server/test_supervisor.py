"""The supervisor's replacement of workers (server/workers.py), with stand-in processes: what it does when a worker
asks to be replaced, when the fresh worker serves, and when it or the old one dies first. The real thing runs in
test_workers.py."""

import os
import shutil
import signal

import pytest

from server.workers import REPLACED, Supervisor


class FakeProcess:
    """A worker process as the supervisor sees it: a pid, an exit code once it has exited, the signals sent."""

    pids = iter(range(1000, 100_000))

    def __init__(self) -> None:
        self.pid = next(self.pids)
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def kill(self) -> None:
        self.code = -9

    def wait(self, _timeout=None) -> int | None:
        return self.code


@pytest.fixture
def supervisor(monkeypatch):
    """A supervisor of 2 stand-in workers, both serving; `writers[pid]` writes on a worker's pipe."""
    chief = Supervisor([], 2, "127.0.0.1", 0, -1, 1.0, 1)
    chief.writers = {}

    def spawn(_index):
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        process = FakeProcess()
        chief.writers[process.pid] = write_fd
        return process, read_fd

    monkeypatch.setattr(chief, "_spawn", spawn)
    monkeypatch.setattr("prometheus_client.multiprocess.mark_process_dead", lambda *_: None)
    chief._start_metrics()
    chief.workers = [chief._start(i) for i in range(2)]
    say(chief, chief.workers[0], b"ready\n")
    say(chief, chief.workers[1], b"ready\n")
    yield chief
    for worker in chief.workers:
        os.close(worker.ready_fd)
    for write_fd in chief.writers.values():
        os.close(write_fd)
    chief.holder.close()
    shutil.rmtree(chief.metrics_dir, ignore_errors=True)


def say(chief, worker, message: bytes) -> None:
    """The worker writes `message` (in two parts: the supervisor reads whole lines) and the supervisor reads."""
    os.write(chief.writers[worker.process.pid], message[:3])
    chief._read_messages()
    os.write(chief.writers[worker.process.pid], message[3:])
    chief._read_messages()


def step(chief) -> int | None:
    code = chief._reap()
    chief._replace_next()
    return code


def counted(chief, result: str) -> float:
    return chief._replacements.labels(result)._value.get()


def test_a_worker_is_replaced_once_its_fresh_worker_serves(supervisor):
    old, other = supervisor.workers
    say(supervisor, old, b"replace v-model\n")
    say(supervisor, old, b"replace v-model\n")  # asked again at its next check: one fresh worker all the same
    say(supervisor, other, b"replace v-model\n")  # waits its turn: one replacement at a time
    assert step(supervisor) is None
    fresh = supervisor.workers[2]
    assert len(supervisor.workers) == 3 and fresh.successor_of is old and fresh.index == old.index
    assert step(supervisor) is None and len(supervisor.workers) == 3
    supervisor._signal(signal.SIGHUP, ready_only=True)  # not to the fresh one: SIGHUP would end it as it starts
    assert fresh.process.signals == [] and old.process.signals == [signal.SIGHUP]
    say(supervisor, fresh, b"ready\n")
    assert old.process.signals[-1] == REPLACED and old.replaced_at is not None and counted(supervisor, "replaced") == 1
    # The next fresh worker waits for the replaced one to finish its calls and exit: one model more at most.
    assert step(supervisor) is None and len(supervisor.workers) == 3
    old.process.code = 0
    assert step(supervisor) is None
    assert old not in supervisor.workers and supervisor.workers[-1].successor_of is other
    assert supervisor._restarts._value.get() == 0


def test_a_fresh_worker_that_dies_before_it_serves_leaves_the_old_one_serving(supervisor):
    old, other = supervisor.workers
    say(supervisor, old, b"replace v-broken\n")
    say(supervisor, other, b"replace v-broken\n")
    step(supervisor)
    supervisor.workers[2].process.code = 1  # the version does not load
    assert step(supervisor) is None  # not a reason to stop the server, as a first worker's death would be
    assert supervisor.workers == [old, other] and old.process.signals == [] and counted(supervisor, "failed") == 1
    # Not tried again for the other worker, nor when the old one asks again; a later version is.
    say(supervisor, old, b"replace v-broken\n")
    assert step(supervisor) is None and len(supervisor.workers) == 2
    say(supervisor, old, b"replace v-fixed\n")
    step(supervisor)
    assert len(supervisor.workers) == 3 and supervisor.workers[2].asked_for == "v-fixed"


def test_a_sighup_tries_a_failed_version_again(supervisor):
    old = supervisor.workers[0]
    say(supervisor, old, b"replace v-flaky\n")
    step(supervisor)
    supervisor.workers[2].process.code = 1
    step(supervisor)
    say(supervisor, old, b"replace v-flaky\n")
    assert step(supervisor) is None and len(supervisor.workers) == 2
    supervisor._on_hangup()  # as a refused version is tried again on SIGHUP
    say(supervisor, old, b"replace v-flaky\n")
    step(supervisor)
    assert len(supervisor.workers) == 3 and supervisor.workers[2].asked_for == "v-flaky"


def test_a_worker_that_dies_while_its_fresh_worker_starts_is_not_restarted(supervisor):
    old = supervisor.workers[0]
    say(supervisor, old, b"replace v-model\n")
    step(supervisor)
    fresh = supervisor.workers[2]
    old.process.code = -9
    assert step(supervisor) is None
    assert old not in supervisor.workers and len(supervisor.workers) == 2 and fresh.successor_of is None
    fresh.process.code = 1  # and should the fresh one die now, it is restarted like any worker, not the server ended
    assert step(supervisor) is None and fresh.restart_at is not None


def test_a_worker_that_dies_as_its_fresh_worker_turns_ready_is_not_restarted(supervisor):
    """The old worker dies in the moment before the supervisor reads its fresh worker's "ready": the fresh one has
    taken its place, so it is dropped, not restarted beside it (a worker more than asked for, for good)."""
    old, other = supervisor.workers
    say(supervisor, old, b"replace v-model\n")
    step(supervisor)
    fresh = supervisor.workers[2]
    old.process.code = -9  # not reaped yet: the supervisor reads the pipes before it reaps
    say(supervisor, fresh, b"ready\n")
    assert step(supervisor) is None
    assert supervisor.workers == [other, fresh] and old.restart_at is None
    assert step(supervisor) is None and len(supervisor.workers) == 2 and supervisor._restarts._value.get() == 0

def test_a_worker_restarted_while_it_waits_for_a_fresh_one_needs_none(supervisor):
    old, other = supervisor.workers
    say(supervisor, old, b"replace v-model\n")
    say(supervisor, other, b"replace v-model\n")
    step(supervisor)
    other.started_at -= 60  # long enough ago that it restarts at once
    other.process.code = -9  # dies while queued: restarted, it loads CURRENT itself
    supervisor._reap()
    supervisor._reap()  # the restart (no backoff: it lived long enough)
    assert other.restart_at is None and other.process.code is None
    say(supervisor, supervisor.workers[2], b"ready\n")
    old.process.code = 0
    step(supervisor)
    assert len(supervisor.workers) == 2 and not supervisor._to_replace


def test_a_replaced_worker_that_does_not_stop_is_killed(supervisor, monkeypatch):
    old = supervisor.workers[0]
    say(supervisor, old, b"replace v-model\n")
    step(supervisor)
    say(supervisor, supervisor.workers[2], b"ready\n")
    step(supervisor)
    assert old.process.code is None
    old.replaced_at -= supervisor.grace_s + 11
    step(supervisor)
    assert old.process.code == -9
    step(supervisor)
    assert old not in supervisor.workers and len(supervisor.workers) == 2


def test_a_sighup_reaches_a_worker_that_starts_once_it_serves(supervisor):
    """A starting worker may have read CURRENT before the version a SIGHUP announces: it gets the SIGHUP once it
    serves (not before: in its interpreter's first milliseconds the signal would end it)."""
    old, other = supervisor.workers
    say(supervisor, old, b"replace v-model\n")
    step(supervisor)
    fresh = supervisor.workers[2]
    supervisor._on_hangup()
    supervisor._on_hangup()
    assert fresh.process.signals == [] and old.process.signals == other.process.signals == [signal.SIGHUP] * 2
    say(supervisor, fresh, b"ready\n")
    assert fresh.process.signals == [signal.SIGHUP]  # one reload covers both
    supervisor._on_hangup()
    assert fresh.process.signals == [signal.SIGHUP] * 2
