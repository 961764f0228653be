"""`lookalike-serve --workers N`: N server processes on one port, and a supervisor that keeps them.

Each worker is a whole `lookalike-serve` (event loop, micro-batcher, model, health, reload and
availability watch) bound to the same port with SO_REUSEPORT, which gRPC sets on Linux: the kernel
spreads connections over the workers that listen. A worker listens only once its version is loaded and
warm, so no connection lands on a worker that cannot answer. The index is memory-mapped, so the
workers share its pages. The supervisor:

- reserves the port (a bound, never listening SO_REUSEPORT socket) so `--port 0` gives all one port, and
  the HTTP port likewise;
- sizes each worker's TensorFlow threads to cores / N so N workers do not oversubscribe the cores;
- forwards SIGHUP (reload, availability; to a worker still starting once it serves) and SIGTERM/SIGINT (drain)
  to every worker and waits for them;
- restarts a worker that dies, with a backoff, and logs it; a worker that dies before it ever served
  stops the whole server (the version or the configuration is bad, and a restart would not help);
- replaces, one at a time, a worker that asks to be (a new version with a model of its own, which it would
  otherwise swap in and then free with a full collection of its heap, a third of a second with every request
  waiting): a fresh worker loads the new version beside it, and once it listens the old one drains and exits.
  A fresh worker that dies before it serves is logged, and the old one serves on;
- serves every worker's Prometheus metrics, summed (histograms, counters) or per worker, on
  `--metrics-port` (prometheus-client's multiprocess mode), plus its own worker gauges.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

log = logging.getLogger("lookalike-serve.supervisor")
READY = b"ready\n"
REPLACE = b"replace "  # + the version a worker wants a fresh worker to serve
# Sent to a worker once its fresh replacement listens: it stops listening, finishes its calls (serving any that still
# arrive on open connections) and exits; SIGTERM refuses new calls for the drain, as a server leaving a load balancer
# does.
REPLACED = signal.SIGUSR1
# A worker that dies sooner than this after it started counts as a crash loop: its restarts back off.
_STABLE_S = 30.0
_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(eq=False)  # a worker is itself: its replacement has the same index
class Worker:
    index: int
    process: subprocess.Popen
    ready_fd: int
    started_at: float
    ready: bool = False
    restarts: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)
    initial: bool = True  # one of the first N (a death before serving stops the server), not a replacement
    successor_of: Worker | None = None  # the worker this one replaces, until this one is ready
    asked_for: str = ""  # the version whose request started this replacement
    replaced_at: float | None = None  # when it was told to go: its successor is ready
    unread: bytes = b""  # the start of a message from the worker whose end has not arrived
    hangup_pending: bool = False  # a SIGHUP came while it started: sent on once it serves


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT and never listening: it holds the port number
    (port 0 picks one) while the kernel hands connections only to the workers' listening sockets."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host.strip("[]"), port))
    return holder


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // workers)


class Supervisor:
    def __init__(self, worker_argv: list[str], workers: int, host: str, port: int, metrics_port: int,
                 grace_s: float, model_threads: int, http_port: int = -1) -> None:
        self.worker_argv = worker_argv
        self.count = workers
        self.host = host
        self.grace_s = grace_s
        self.model_threads = model_threads or threads_per_worker(workers)
        self.holder = reserve_port(host, port)
        self.port = self.holder.getsockname()[1]
        # The HTTP port likewise, so that with --http-port 0 every worker serves HTTP on the same one.
        self.http_holder = reserve_port(host, http_port) if http_port >= 0 else None
        self.http_port = self.http_holder.getsockname()[1] if self.http_holder else -1
        self.metrics_dir = tempfile.mkdtemp(prefix="lookalike-metrics-")
        self.metrics_port = metrics_port
        self.workers: list[Worker] = []
        self._to_replace: list[tuple[Worker, str]] = []  # (worker, the version it asked a fresh worker for)
        # Versions whose fresh worker died before it served: not tried again until SIGHUP (as a refused version).
        self._failed_versions: set[str] = set()
        self.stopping = False
        self._pending: list[int] = []
        self._registry = None

    # -- metrics -------------------------------------------------------------------------------------------
    def _start_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        self._alive = Gauge("lookalike_workers", "worker processes by state", ["state"], registry=registry)
        self._restarts = Counter("lookalike_worker_restarts", "workers restarted after they died", registry=registry)
        self._replacements = Counter("lookalike_worker_replacements", "fresh workers started to serve a version "
                                     "with a model of its own, by result (replaced: the old one told to go; failed: "
                                     "the fresh one died before it served)", ["result"], registry=registry)
        self._registry = registry
        if self.metrics_port >= 0:
            server, _ = start_http_server(self.metrics_port, addr=self.host, registry=registry)
            self.metrics_port = server.server_port

    def _update_gauges(self) -> None:
        if self._registry is None:
            return
        ready = sum(1 for w in self.workers if w.ready and w.replaced_at is None and w.process.poll() is None)
        self._alive.labels("ready").set(ready)
        self._alive.labels("starting").set(sum(1 for w in self.workers if not w.ready and w.process.poll() is None))

    # -- workers -------------------------------------------------------------------------------------------
    def _spawn(self, index: int) -> tuple[subprocess.Popen, int]:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir, LOOKALIKE_WORKER_INDEX=str(index))
        # The supervisor's own command line, with what it decides appended (argparse keeps the last).
        argv = [sys.executable, "-m", "server.cli", *self.worker_argv, "--workers", "1", "--port", str(self.port),
                "--metrics-port", "-1", "--model-threads", str(self.model_threads), "--ready-fd", str(write_fd),
                "--http-port", str(self.http_port)]
        process = subprocess.Popen(argv, env=env, pass_fds=(write_fd,), start_new_session=True)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        log.info("worker %d started, pid %d, %d model threads", index, process.pid, self.model_threads)
        return process, read_fd

    def _start(self, index: int) -> Worker:
        process, ready_fd = self._spawn(index)
        return Worker(index, process, ready_fd, time.monotonic())

    def _restart(self, worker: Worker) -> None:
        os.close(worker.ready_fd)
        process, worker.ready_fd = self._spawn(worker.index)
        worker.process, worker.started_at, worker.ready, worker.restart_at = process, time.monotonic(), False, None
        worker.unread = b""
        worker.restarts += 1
        self._restarts.inc()
        # It loads CURRENT now: a fresh worker asked for before it died is not needed.
        self._to_replace = [(w, v) for w, v in self._to_replace if w is not worker]

    def _drop(self, worker: Worker) -> None:
        """Forgets a worker that has exited and is not to be restarted."""
        os.close(worker.ready_fd)
        self.workers.remove(worker)

    def _read_messages(self) -> None:
        """What the workers wrote on their pipes: "ready" once listening, "replace VERSION" to be replaced."""
        fds = {w.ready_fd: w for w in self.workers if w.restart_at is None and w.process.poll() is None}
        if not fds:
            return
        readable, _, _ = select.select(list(fds), [], [], 0)
        for fd in readable:
            worker = fds[fd]
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            *lines, worker.unread = (worker.unread + data).split(b"\n")
            for line in lines:
                self._on_message(worker, line + b"\n")

    def _on_message(self, worker: Worker, message: bytes) -> None:
        if message == READY:
            worker.ready = True
            log.info("worker %d (pid %d) is serving", worker.index, worker.process.pid)
            if worker.hangup_pending:  # it may have read CURRENT before the version the SIGHUP announced
                worker.hangup_pending = False
                worker.process.send_signal(signal.SIGHUP)
            old, worker.successor_of = worker.successor_of, None
            if old is not None:
                # Replaced even when it has just died, not yet reaped: dropped then, not restarted beside this one.
                old.replaced_at = time.monotonic()
            if old is not None and old.process.poll() is None:
                log.info("worker %d (pid %d) replaced by pid %d: it stops listening and finishes its calls",
                         old.index, old.process.pid, worker.process.pid)
                old.process.send_signal(REPLACED)
                self._replacements.labels("replaced").inc()
        elif message.startswith(REPLACE):
            # A worker asks again every time it checks CURRENT until it is replaced: the first request counts.
            version = message[len(REPLACE):].strip().decode(errors="replace")
            waiting = any(w is worker for w, _ in self._to_replace) or any(
                w.successor_of is worker for w in self.workers)
            if self.stopping or worker.replaced_at is not None or waiting or version in self._failed_versions:
                return
            log.info("worker %d (pid %d) asks for a fresh worker to serve version %s (a model of its own)",
                     worker.index, worker.process.pid, version)
            self._to_replace.append((worker, version))

    def _replace_next(self) -> None:
        """Starts a fresh worker for the first that asked, once no other is starting and no replaced one is still
        finishing its calls: one at a time, so one worker more than asked for at most, one model more in memory."""
        if self.stopping or any(w.successor_of is not None or w.replaced_at is not None for w in self.workers):
            return
        while self._to_replace:
            old, version = self._to_replace.pop(0)
            if old in self.workers and old.process.poll() is None and version not in self._failed_versions:
                successor = self._start(old.index)
                successor.initial, successor.successor_of, successor.asked_for = False, old, version
                self.workers.append(successor)
                log.info("worker %d (pid %d): its replacement is pid %d", old.index, old.process.pid,
                         successor.process.pid)
                return

    def _reap(self) -> int | None:
        """Restarts dead workers; returns an exit code when the server must stop."""
        from prometheus_client.multiprocess import mark_process_dead

        now = time.monotonic()
        for worker in list(self.workers):
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    self._restart(worker)
                continue
            code = worker.process.poll()
            if code is None:
                if worker.replaced_at is not None and now > worker.replaced_at + self.grace_s + 10:
                    log.error("worker %d (pid %d), replaced, did not stop in time: killed", worker.index,
                              worker.process.pid)
                    worker.process.kill()
                continue
            mark_process_dead(worker.process.pid, self.metrics_dir)
            if worker.replaced_at is not None:
                log.info("worker %d (pid %d) exited with %d, replaced", worker.index, worker.process.pid, code)
                self._drop(worker)
                continue
            if worker.successor_of is not None:
                old = worker.successor_of
                log.error("pid %d, started to replace worker %d (pid %d) with version %s, exited with %d before it "
                          "served: the old worker serves on, and %s is not tried again", worker.process.pid,
                          old.index, old.process.pid, worker.asked_for, code, worker.asked_for)
                self._failed_versions.add(worker.asked_for)
                self._replacements.labels("failed").inc()
                self._drop(worker)
                continue
            successor = next((w for w in self.workers if w.successor_of is worker), None)
            if successor is not None:
                log.error("worker %d (pid %d) died with %d while its replacement starts: that takes its place",
                          worker.index, worker.process.pid, code)
                successor.successor_of = None  # a worker like the others now: restarted should it die
                self._drop(worker)
                continue
            if not worker.ready and worker.restarts == 0 and worker.initial:
                log.error("worker %d (pid %d) exited with %d before it ever served: stopping", worker.index,
                          worker.process.pid, code)
                return code or 1
            lived = now - worker.started_at
            worker.quick_deaths = worker.quick_deaths + 1 if lived < _STABLE_S else 0
            delay = _BACKOFF_S[min(worker.quick_deaths, len(_BACKOFF_S) - 1)] if worker.quick_deaths else 0.0
            log.error("worker %d (pid %d) died with %d after %.1f s: restarting in %.1f s", worker.index,
                      worker.process.pid, code, lived, delay)
            worker.ready = False
            worker.restart_at = now + delay
        return None

    def _signal(self, signum: int, ready_only: bool = False) -> None:
        for worker in self.workers:
            if worker.process.poll() is None and (worker.ready or not ready_only):
                try:
                    worker.process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def _on_hangup(self) -> None:
        log.info("SIGHUP: every worker checks CURRENT and availability now")
        self._failed_versions.clear()  # a version whose fresh worker failed is tried again, as a refused one is
        # Those still starting get it once they serve: they may have read CURRENT before the change, and a SIGHUP in
        # their interpreter's first milliseconds, before server/cli.py sets its handler, would end them.
        for worker in self.workers:
            if not worker.ready and worker.process.poll() is None:
                worker.hangup_pending = True
        self._signal(signal.SIGHUP, ready_only=True)

    def _on_signal(self, signum, _frame) -> None:
        self._pending.append(signum)

    def _stop(self) -> int:
        self.stopping = True
        log.info("draining %d workers (grace %.1f s)", len(self.workers), self.grace_s)
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 10
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in time: killed", worker.index, worker.process.pid)
                worker.process.kill()
                worker.process.wait(10)
        return 0

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            self._start_metrics()
            log.info("%d workers on %s:%d (metrics port %s, HTTP port %s)", self.count, self.host, self.port,
                     self.metrics_port, self.http_port)
            self.workers = [self._start(i) for i in range(self.count)]
            while True:
                while self._pending:
                    signum = self._pending.pop(0)
                    if signum == signal.SIGHUP:
                        self._on_hangup()
                    else:
                        return self._stop()
                self._read_messages()
                code = self._reap()
                if code is not None:
                    self._stop()
                    return code
                self._replace_next()
                self._update_gauges()
                time.sleep(0.1)
        finally:
            for worker in self.workers:
                if worker.process.poll() is None:
                    worker.process.kill()
                    worker.process.wait(10)
                os.close(worker.ready_fd)
            self.holder.close()
            if self.http_holder is not None:
                self.http_holder.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
