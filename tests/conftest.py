"""Session fixtures: one test catalogue, one real build and one real server on it, shared by the end-to-end
tests. A test that changes artifacts works on a copy (helpers.copy_artifacts), never on `built`."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory) -> Path:
    if REUSE and (Path(REUSE) / "catalogue" / "images.csv.gz").exists():
        return Path(REUSE) / "catalogue"
    folder = Path(REUSE) / "catalogue" if REUSE else tmp_path_factory.mktemp("catalogue")
    return helpers.make_catalogue(folder, CATALOGUE_PRODUCTS)


@pytest.fixture(scope="session")
def small_catalogue(tmp_path_factory) -> Path:
    """The test catalogue's layout and problems (banners, a corrupt file, broken listings) on 40 products (about
    90 images), for builds whose point is the builder's logic, not the catalogue's size."""
    return helpers.make_catalogue(tmp_path_factory.mktemp("small-catalogue"), 40)


@pytest.fixture(scope="session")
def built(tmp_path_factory, catalogue) -> Path:
    """ARTIFACTS built by the real CLI from the test catalogue; tests must not modify it."""
    out = Path(REUSE) / "ARTIFACTS" if REUSE else tmp_path_factory.mktemp("artifacts") / "ARTIFACTS"
    if not (REUSE and (out / "CURRENT").exists()):
        helpers.build(catalogue, out, *helpers.SESSION_BUILD_OPTIONS)
    return out


@pytest.fixture(scope="session")
def served(built) -> helpers.Served:
    """One real server on `built` for every test that only reads: tests must not stop it, and must not count
    on its metrics starting from zero (compare before and after). It serves HTTP/JSON and the console too."""
    helpers.SEEN_HEALTH.clear()
    http_port = helpers.free_port()
    with helpers.serving(built, "--http-port", str(http_port)) as (process, address, metrics_port):
        yield helpers.Served(process, address, metrics_port, tuple(helpers.SEEN_HEALTH), http_port)


def pytest_collection_modifyitems(session, config, items):
    """The builder's tests last: make test runs bench-quick beside pytest, and its Spark builds take the first minutes;
    two Spark builds at once on 2 cores each take twice as long, while the server's tests mostly wait on sockets."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/builder/"))
