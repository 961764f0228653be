"""The real server process with the real model on artifacts built from the committed sample."""

import json
import shutil
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import ImageSimilarityClient, InvalidArgumentError, NotFoundError
from lookalike import artifacts
from tests import helpers

pytestmark = pytest.mark.e2e


@pytest.fixture
def served_copy(tmp_path, built):
    """A private copy of the built ARTIFACTS, so a test may add versions and move CURRENT."""
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".work", ".staging-*"))
    return out


def _items(artifacts_dir):
    return pd.read_parquet(artifacts_dir / artifacts.read_current(artifacts_dir) / "items.parquet")


def _add_version(artifacts_dir, name: str, corrupt: bool = False) -> str:
    source = artifacts_dir / artifacts.read_current(artifacts_dir)
    target = artifacts_dir / name
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = name
    (target / "manifest.json").write_text(json.dumps(manifest))
    if corrupt:
        data = bytearray((target / "index.ann").read_bytes())
        data[100:110] = b"\xff" * 10
        (target / "index.ann").write_bytes(bytes(data))
    return name


def test_embed_and_find_similar_match_the_builder(served_copy, catalogue):
    items = _items(served_copy)
    helpers.SEEN_HEALTH.clear()
    with helpers.serving(served_copy) as (_, address, _metrics):
        # The port opens before the model loads: health says NOT_SERVING until warm-up is done.
        assert helpers.SEEN_HEALTH[0] == "NOT_SERVING" and helpers.SEEN_HEALTH[-1] == "SERVING"
        client = ImageSimilarityClient(address)
        rows = items.iloc[[0, 17, 123]]
        vectors = client.embed([catalogue / "small" / p for p in rows["path"]])
        assert np.allclose(vectors, np.stack(rows["vector"].to_numpy()), atol=1e-4)
        query = rows.iloc[1]
        by_image = client.find_similar(catalogue / "small" / query["path"], k=5, exclude_query=False)
        assert by_image[0].item_id == query["image_id"] and by_image[0].distance < 1e-3
        assert by_image[0].label == query["label_name"]
        by_id = client.find_similar(item_id=query["image_id"], k=5)
        assert query["image_id"] not in [m.item_id for m in by_id]
        # The item's stored vector and its re-embedded image find the same neighbours (approximately).
        assert len(by_id) == 5 and len({m.item_id for m in by_id} & {m.item_id for m in by_image[1:]}) >= 3
        by_vector = client.find_similar(vector=query["vector"], k=3, exclude_query=False)
        assert by_vector[0].item_id == query["image_id"]
        same_class = sum(m.label == query["label_name"] for m in by_id)
        assert same_class >= 2  # real neighbours, not noise (chance would be 0.5 of 5)
        info = client.info()
        assert info["item_count"] == len(items) and info["dimension"] == 128
        assert info["backbone"] == "efficientnet_lite0" and info["preprocessing"] == "plain"
        with pytest.raises(InvalidArgumentError):
            client.embed(b"definitely not an image")
        with pytest.raises(NotFoundError):
            client.find_similar(item_id="no-such-item")
        client.close()


def test_sigterm_finishes_requests_in_flight_and_exits_zero(served_copy, catalogue):
    paths = [catalogue / "small" / p for p in _items(served_copy)["path"][:8]]
    with helpers.serving(served_copy, "--grace-s", "30") as (process, address, _metrics):
        channel = grpc.insecure_channel(address)
        statuses = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="lookalike.v1.ImageSimilarity"), timeout=60)

        def follow():
            try:
                for response in watch:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            except grpc.RpcError:
                pass

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        results, errors = [], []

        def call():
            try:
                with ImageSimilarityClient(address, timeout_s=60) as client:
                    results.append(client.embed(paths))
            except Exception as error:  # noqa: BLE001 (collected and asserted below)
                errors.append(error)

        callers = [threading.Thread(target=call) for _ in range(6)]
        for caller in callers:
            caller.start()
        time.sleep(0.5)  # the calls are admitted and queued on the model
        process.send_signal(signal.SIGTERM)
        for caller in callers:
            caller.join(120)
        assert process.wait(60) == 0
        assert errors == [] and len(results) == 6
        follower.join(10)
        assert statuses[0] == "SERVING" and "NOT_SERVING" in statuses
        channel.close()


def test_reload_while_requests_run_changes_version_without_failures(served_copy):
    first = artifacts.read_current(served_copy)
    item_id = _items(served_copy)["image_id"][0]
    with helpers.serving(served_copy) as (_, address, metrics_port):
        client = ImageSimilarityClient(address)
        second = _add_version(served_copy, "v-reloaded")
        versions, failures = [], 0
        artifacts.write_current(served_copy, second)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not versions or versions[-1] != second or len(versions) < 20):
            try:
                versions.append(client.find_similar(item_id=item_id, k=3).version)
            except Exception:  # noqa: BLE001 (counted: there must be none)
                failures += 1
        assert failures == 0
        assert versions[0] == first and versions[-1] == second
        # Broken: the index does not match its checksum. Refused; the old version keeps serving.
        broken = _add_version(served_copy, "v-broken", corrupt=True)
        artifacts.write_current(served_copy, broken)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and helpers.scrape(metrics_port).get(
                "lookalike_reloads_total{result=refused}", 0) < 1:
            assert client.find_similar(item_id=item_id, k=3).version == second
            time.sleep(0.2)
        assert helpers.scrape(metrics_port)["lookalike_reloads_total{result=refused}"] == 1
        assert client.find_similar(item_id=item_id, k=3).version == second
        assert client.health() == "SERVING"
        client.close()


def test_server_refuses_to_start_on_a_checksum_mismatch(served_copy):
    version_dir = served_copy / artifacts.read_current(served_copy)
    (version_dir / "items.parquet").write_bytes((version_dir / "items.parquet").read_bytes() + b"x")
    result = subprocess.run([helpers.BIN / "lookalike-serve", "--artifacts", served_copy, "--port", "0",
                             "--metrics-port", "-1", "--log-format", "text"], env=helpers.env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "items.parquet does not match the manifest's sha256" in result.stderr


def test_server_refuses_to_start_without_current(tmp_path):
    result = subprocess.run([helpers.BIN / "lookalike-serve", "--artifacts", tmp_path, "--port", "0",
                             "--metrics-port", "-1", "--log-format", "text"], env=helpers.env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "CURRENT does not exist" in result.stderr
