"""The same build against a real Spark standalone master and worker on 127.0.0.1."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyspark
import pytest

from lookalike import artifacts
from tests import helpers
from tests.builder import fake_build

pytestmark = pytest.mark.spark_cluster
SPARK_HOME = Path(pyspark.__file__).parent


def _spark_class(*args: str, log: Path) -> subprocess.Popen:
    env = helpers.env()
    env.update(SPARK_HOME=str(SPARK_HOME), SPARK_LOG_DIR=str(log.parent), SPARK_WORKER_DIR=str(log.parent / "work"))
    with open(log, "w") as handle:
        return subprocess.Popen([SPARK_HOME / "bin" / "spark-class", *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {path}: {path.read_text()[-2000:]}")


@pytest.fixture
def standalone_cluster(tmp_path):
    port = helpers.free_port()
    master_log, worker_log = tmp_path / "master.log", tmp_path / "worker.log"
    master = _spark_class("org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                          "--webui-port", str(helpers.free_port()), log=master_log)
    worker = None
    try:
        _wait_for(master_log, "I have been elected leader")
        url = f"spark://127.0.0.1:{port}"
        worker = _spark_class("org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", "2",
                              "--memory", "4g", "--webui-port", str(helpers.free_port()), url, log=worker_log)
        _wait_for(worker_log, "Successfully registered with master")
        yield url
    finally:
        for process in (worker, master):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, 15)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)


def test_build_on_a_standalone_cluster_matches_local(tmp_path, small_catalogue, standalone_cluster):
    """With the fake trunk (tests/builder/fake_build.py) on both sides: the cluster changes where the scan, the
    embedding (the exported trunk SavedModel, loaded by the cluster's executors) and the neighbour lists run, not
    the network; the real model's export and serving are proved by every end-to-end test."""
    options = ("--chunk-size", "32", "--head", "none")
    # The local reference needs no neighbour lists: only the cluster's are under test.
    local_manifest = fake_build.run(small_catalogue, tmp_path / "LOCAL", chunk_size=32, head="none", neighbours=0)
    out = tmp_path / "ARTIFACTS"
    result = subprocess.run([sys.executable, "-m", "tests.builder.fake_build", "build", "--images", small_catalogue,
                             "--out", out, *options, "--spark-master", standalone_cluster], cwd=helpers.REPO,
                            env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "published" in result.stdout, result.stderr[-3000:]
    version_dir = out / artifacts.read_current(out)
    manifest = artifacts.load_manifest(version_dir)
    assert manifest["spark_master"] == standalone_cluster and local_manifest["spark_master"] != standalone_cluster
    assert manifest["counts"] == local_manifest["counts"] and manifest["counts"]["indexed"] > 64
    assert manifest["index"]["recall_at_10"] >= 0.95
    assert manifest["catalogue"]["products"] == local_manifest["catalogue"]["products"]
    local_dir = tmp_path / "LOCAL" / local_manifest["version"]
    cluster = pd.read_parquet(version_dir / "images.parquet")
    local = pd.read_parquet(local_dir / "images.parquet")
    assert cluster[["image_id", "product_id", "role"]].equals(local[["image_id", "product_id", "role"]])
    # The same images through the same network: the same unit vectors.
    cluster_vectors, local_vectors = np.load(version_dir / "vectors.npy"), np.load(local_dir / "vectors.npy")
    assert np.allclose(cluster_vectors, local_vectors, atol=1e-5)
