"""The supervisor's replacement of workers (server/workers.py), with stand-in processes: what it does when a worker
asks to be replaced, when the fresh worker serves, and when it dies first. The real thing runs in test_workers.py."""

import os
import shutil
import signal

import pytest

from server.workers import Supervisor


class FakeProcess:
    """A worker process as the supervisor sees it: a pid, an exit code once it has exited, the signals sent."""

    pids = iter(range(1000, 2000))

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


def test_a_worker_is_replaced_once_its_fresh_worker_serves(supervisor):
    old, other = supervisor.workers
    say(supervisor, old, b"replace v-model\n")
    say(supervisor, old, b"replace v-model\n")  # asked again (SIGHUP): one fresh worker all the same
    say(supervisor, other, b"replace v-model\n")  # waits its turn: one replacement at a time
    assert step(supervisor) is None
    fresh = supervisor.workers[2]
    assert len(supervisor.workers) == 3 and fresh.successor_of is old and fresh.index == old.index
    assert step(supervisor) is None and len(supervisor.workers) == 3
    say(supervisor, fresh, b"ready\n")
    assert old.process.signals == [signal.SIGTERM] and old.replaced and other.process.signals == []
    old.process.code = 0  # drained and exited
    assert step(supervisor) is None
    assert old not in supervisor.workers and supervisor.workers[-1].successor_of is other
    assert supervisor._replacements._value.get() == 1 and supervisor._restarts._value.get() == 0


def test_a_fresh_worker_that_dies_before_it_serves_leaves_the_old_one_serving(supervisor):
    old = supervisor.workers[0]
    say(supervisor, old, b"replace v-broken\n")
    step(supervisor)
    fresh = supervisor.workers[2]
    fresh.process.code = 1  # the version does not load
    assert step(supervisor) is None  # not a reason to stop the server, as a first worker's death would be
    assert supervisor.workers[:2] == [old, supervisor.workers[1]] and len(supervisor.workers) == 2
    assert old.ready and old.process.signals == [] and supervisor._restarts._value.get() == 0


def test_a_worker_that_dies_while_its_fresh_worker_starts_is_not_restarted(supervisor):
    old = supervisor.workers[0]
    say(supervisor, old, b"replace v-model\n")
    step(supervisor)
    fresh = supervisor.workers[2]
    old.process.code = -9
    assert step(supervisor) is None
    assert old not in supervisor.workers and len(supervisor.workers) == 2
    say(supervisor, fresh, b"ready\n")
    assert fresh.ready and fresh.successor_of is None and supervisor._restarts._value.get() == 0
