"""Session fixtures: one test catalogue and one real build, shared by the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import helpers

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
