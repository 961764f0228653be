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


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory) -> Path:
    return helpers.make_catalogue(tmp_path_factory.mktemp("catalogue"), CATALOGUE_PRODUCTS)


@pytest.fixture(scope="session")
def built(tmp_path_factory, catalogue) -> Path:
    """ARTIFACTS built by the real CLI from the test catalogue; tests must not modify it."""
    out = tmp_path_factory.mktemp("artifacts") / "ARTIFACTS"
    helpers.build(catalogue, out)
    return out


@pytest.fixture(scope="session")
def served(built) -> helpers.Served:
    """One real server on `built` for every test that only reads: tests must not stop it, and must not count
    on its metrics starting from zero (compare before and after)."""
    helpers.SEEN_HEALTH.clear()
    with helpers.serving(built) as (process, address, metrics_port):
        yield helpers.Served(process, address, metrics_port, tuple(helpers.SEEN_HEALTH))
