"""Session fixtures: one test catalogue, one real build and one real server on it, shared by the end-to-end
tests; the build starts with the session, beside the tests that do not need it, which run first. A test that changes
artifacts works on a copy (helpers.copy_artifacts), never on `built`."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from tests import helpers

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Builds run in this process too (tests/builder/fake_build.py): Spark's Python workers are this Python.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# Products in the test catalogue (about 2.1 images each), plus the test listings of helpers.make_catalogue.
CATALOGUE_PRODUCTS = 200


# For iterating on end-to-end tests by hand: LOOKALIKE_TEST_REUSE=DIR makes the catalogue and the build in DIR
# once and reuses them in later runs (remove DIR when the builder or the sample changes). make test never sets it.
REUSE = os.environ.get("LOOKALIKE_TEST_REUSE")


def _make_catalogue(factory: pytest.TempPathFactory) -> Path:
    if REUSE and (Path(REUSE) / "catalogue" / "images.csv.gz").exists():
        return Path(REUSE) / "catalogue"
    folder = Path(REUSE) / "catalogue" if REUSE else factory.mktemp("catalogue")
    return helpers.make_catalogue(folder, CATALOGUE_PRODUCTS)


def _build(factory: pytest.TempPathFactory, catalogue: Path, started=lambda process: None) -> Path:
    """The session build by the real CLI; `started` is given its process."""
    out = Path(REUSE) / "ARTIFACTS" if REUSE else factory.mktemp("artifacts") / "ARTIFACTS"
    if not (REUSE and (out / "CURRENT").exists()):
        with subprocess.Popen(helpers.build_command(catalogue, out, *helpers.SESSION_BUILD_OPTIONS), text=True,
                              env=helpers.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            started(process)
            stdout, stderr = process.communicate(timeout=helpers.BUILD_TIMEOUT_S)
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, process.args, stdout, stderr)
    return out


def _serve(built: Path, stack: contextlib.ExitStack) -> helpers.Served:
    """The shared server on `built`, stopped when `stack` closes."""
    helpers.SEEN_HEALTH.clear()
    http_port = helpers.free_port()
    process, address, metrics_port = stack.enter_context(helpers.serving(built, "--http-port", str(http_port)))
    return helpers.Served(process, address, metrics_port, tuple(helpers.SEEN_HEALTH), http_port)


class _Prepared:
    """The catalogue, the session build and (when a collected test needs it) the shared server on it, made on a
    thread from the end of collection while the tests that need none of them run: those use about one core of two,
    the build the rest. The fixtures wait for what they need; a failure is raised in each test that needs it, as a
    fixture's would be."""

    def __init__(self, factory: pytest.TempPathFactory, serve: bool) -> None:
        self.catalogue: Future[Path] = Future()
        self.built: Future[Path] = Future()
        self.served: Future[helpers.Served] | None = Future() if serve else None
        self.process: subprocess.Popen | None = None
        self._server = contextlib.ExitStack()
        self._stopping = False
        threading.Thread(target=self._run, args=(factory,), name="session-build", daemon=True).start()

    def _run(self, factory: pytest.TempPathFactory) -> None:
        steps = [(self.catalogue, lambda: _make_catalogue(factory)),
                 (self.built, lambda: _build(factory, self.catalogue.result(), self._started))]
        if self.served is not None:
            steps.append((self.served, lambda: _serve(self.built.result(), self._server)))
        for future, make in steps:
            try:
                future.set_result(make())
            except BaseException as error:  # noqa: BLE001 (handed to every fixture that waits on it)
                future.set_exception(error)

    def _started(self, process: subprocess.Popen) -> None:
        self.process = process
        if self._stopping:
            process.kill()

    def stop(self) -> None:
        """Stops the shared server, and ends a build still running when the session ends early (-x, an interrupt):
        neither outlives pytest."""
        self._stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.served is not None:
            with contextlib.suppress(Exception):
                self.served.exception(timeout=300)  # a server still starting is stopped once it is up
        self._server.close()


_PREPARED: _Prepared | None = None


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory) -> Path:
    return _PREPARED.catalogue.result() if _PREPARED else _make_catalogue(tmp_path_factory)


@pytest.fixture(scope="session")
def small_catalogue(tmp_path_factory) -> Path:
    """The test catalogue's layout and problems (banners, a corrupt file, broken listings) on 40 products (about
    90 images), for builds whose point is the builder's logic, not the catalogue's size."""
    return helpers.make_catalogue(tmp_path_factory.mktemp("small-catalogue"), 40)


@pytest.fixture(scope="session")
def built(tmp_path_factory, catalogue) -> Path:
    """ARTIFACTS built by the real CLI from the test catalogue; tests must not modify it."""
    return _PREPARED.built.result() if _PREPARED else _build(tmp_path_factory, catalogue)


@pytest.fixture(scope="session")
def served(built) -> helpers.Served:
    """One real server on `built` for every test that only reads: tests must not stop it, and must not count
    on its metrics starting from zero (compare before and after). It serves HTTP/JSON and the console too."""
    if _PREPARED is not None and _PREPARED.served is not None:
        yield _PREPARED.served.result()  # stopped at the session's end (pytest_sessionfinish)
        return
    with contextlib.ExitStack() as stack:
        yield _serve(built, stack)


def _needs_build(item: pytest.Item) -> bool:
    return "built" in getattr(item, "fixturenames", ())


def _phase(item: pytest.Item) -> int:
    """0: tests that need neither the session build nor real processes, run while it builds; 1: the rest; 2: the
    builder's end-to-end tests, last: make test runs bench-quick beside pytest, and its Spark builds take the first
    minutes; two Spark builds at once on 2 cores each take twice as long, while the server's tests mostly wait on
    sockets."""
    if _needs_build(item) or item.get_closest_marker("e2e") or item.get_closest_marker("spark_cluster"):
        return 2 if item.nodeid.startswith("tests/builder/") else 1
    return 0


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_phase)


def pytest_collection_finish(session):
    """Starts the catalogue and the session build on a thread when a collected test needs the build."""
    global _PREPARED
    if (_PREPARED is None and not session.config.option.collectonly
            and any(_needs_build(item) for item in session.items)):
        serve = any("served" in getattr(item, "fixturenames", ()) for item in session.items)
        _PREPARED = _Prepared(session.config._tmp_path_factory, serve)  # the tmp_path_factory fixture's own factory


def pytest_sessionfinish(session):
    if _PREPARED is not None:
        _PREPARED.stop()
