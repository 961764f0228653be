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
from lookalike import artifacts, neighbours
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from tests import helpers

pytestmark = pytest.mark.e2e


@pytest.fixture
def served_copy(tmp_path, built):
    """A private copy of the built ARTIFACTS, so a test may add versions and move CURRENT."""
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
    return out


def _images(artifacts_dir):
    """The served version's images table with each row's vector."""
    version_dir = artifacts_dir / artifacts.read_current(artifacts_dir)
    images = pd.read_parquet(version_dir / "images.parquet")
    images["vector"] = list(np.load(version_dir / "vectors.npy"))
    return images


def _legacy_version(artifacts_dir, name: str) -> str:
    """The current version as 0.1 wrote it: items.parquet (image rows with vectors), no products."""
    source = artifacts_dir / artifacts.read_current(artifacts_dir)
    target = artifacts_dir / name
    shutil.copytree(source, target)
    images = _images(artifacts_dir)
    items = pd.DataFrame({"annoy_id": images["row"], "image_id": images["image_id"], "path": images["path"],
                          "label": images["label"], "label_name": images["label_name"], "vector": images["vector"]})
    items.to_parquet(target / "items.parquet", index=False)
    for new_file in ("images.parquet", "products.parquet", "vectors.npy"):
        (target / new_file).unlink()
    shutil.rmtree(target / neighbours.NEIGHBOURS_DIR, ignore_errors=True)  # 0.1 had no neighbour lists
    manifest = json.loads((target / "manifest.json").read_text())
    for key in ("catalogue", "attribute_keys", neighbours.MANIFEST_KEY):
        manifest.pop(key, None)
    manifest.update(version=name, files=artifacts.checksums(target))
    (target / "manifest.json").write_text(json.dumps(manifest))
    return name


def test_embed_and_find_similar_match_the_builder(served, built, catalogue):
    items = _images(built)
    address = served.address  # the session's server on the shared build (conftest.served)
    # The port opens before the model loads: health says NOT_SERVING until warm-up is done.
    assert served.health_seen[0] == "NOT_SERVING" and served.health_seen[-1] == "SERVING"
    client = ImageSimilarityClient(address)
    rows = items.iloc[[0, 17, 123]]
    vectors = client.embed([catalogue / "small" / p for p in rows["path"]])
    assert np.allclose(vectors, np.stack(rows["vector"].to_numpy()), atol=1e-4)
    query = rows.iloc[1]
    by_image = client.find_similar(catalogue / "small" / query["path"], k=5, exclude_query=False)
    assert by_image[0].item_id == query["image_id"] and by_image[0].distance < 1e-3
    assert by_image[0].label == query["label_name"]
    by_id = client.find_similar(image_id=query["image_id"], k=5)
    assert query["product_id"] not in [m.product_id for m in by_id]
    # The image's stored vector and its re-embedded image find the same products (approximately).
    assert len(by_id) == 5 and len({m.product_id for m in by_id} & {m.product_id for m in by_image[1:]}) >= 3
    by_vector = client.find_similar(vector=query["vector"], k=3, exclude_query=False)
    assert by_vector[0].item_id == query["image_id"]
    # Real neighbours, not noise: over 30 products, most results share the query's class (chance: 0.1).
    products = items.drop_duplicates("product_id").iloc[:30]
    same_class = [m.label == row["label_name"] for _, row in products.iterrows()
                  for m in client.find_similar(product_id=row["product_id"], k=5)]
    assert np.mean(same_class) > 0.4
    info = client.info()
    assert info["item_count"] == info["image_count"] == len(items) and info["dimension"] == 128
    assert info["product_count"] == items["product_id"].nunique()
    assert info["backbone"] == "efficientnet_lite0" and info["preprocessing"] == "plain"
    with pytest.raises(InvalidArgumentError):
        client.embed(b"definitely not an image")
    with pytest.raises(NotFoundError):
        client.find_similar(image_id="no-such-image")
    with pytest.raises(NotFoundError):
        client.find_similar(product_id="no-such-product")
    client.close()


def test_products_come_back_distinct_grouped_and_with_attributes(served, catalogue):
    listing = helpers.first_listing(catalogue)
    product = listing["item_id"]
    own_images = [listing["main_image_id"], *listing.get("other_image_id", [])]
    # The session's server on the shared build (conftest.served).
    with ImageSimilarityClient(served.address) as client:
        with_own = client.find_similar(product_id=product, k=10, exclude_query=False, group_size=4,
                                       with_attributes=True)
        # The shared product owns the main image too, so it ties with the product itself.
        first_two = {m.product_id: m for m in with_own[:2]}
        assert set(first_two) == {product, helpers.SHARED_PRODUCT}
        assert sorted(i.image_id for i in first_two[product].images) == sorted(own_images)
        assert first_two[product].attributes["product_type"] == listing["product_type"][0]["value"]
        others = client.find_similar(product_id=product, k=10)
        ids = [m.product_id for m in others]
        assert product not in ids and len(ids) == len(set(ids)) == 10
        assert ids[:5] == [m.product_id for m in with_own if m.product_id != product][:5]
        # An image query leaves out every product that owns the image (it is shared by two).
        by_image = client.find_similar(image_id=listing["main_image_id"], k=10)
        assert {product, helpers.SHARED_PRODUCT}.isdisjoint(m.product_id for m in by_image)
        shared = client.find_similar(image_id=listing["main_image_id"], k=2, exclude_query=False)
        assert {m.product_id for m in shared} == {product, helpers.SHARED_PRODUCT}


def test_a_01_client_and_a_01_version_are_served_as_before(served_copy):
    """The wire stays compatible: a 0.1 request (item_id) is answered, and a 0.1 version served."""
    image_id = _images(served_copy)["image_id"][5]
    with helpers.serving(served_copy) as (_, address, metrics_port):
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.ImageSimilarityStub(channel)
        old_request = pb.FindSimilarRequest(item_id=image_id, k=3, exclude_query=False)  # as 0.1 clients send it
        response = stub.FindSimilar(old_request, timeout=10)
        assert response.matches[0].item_id == image_id and len(response.matches) == 3
        legacy = _legacy_version(served_copy, "v-0.1")
        artifacts.write_current(served_copy, legacy)
        # The reload's outcome, not a guess at how long loading a model takes on a busy machine.
        _until(lambda: sum(v for k, v in helpers.scrape(metrics_port).items()
                           if k.startswith("lookalike_reloads_total{")) >= 1, 300)
        assert helpers.scrape(metrics_port).get("lookalike_reloads_total{result=swapped}") == 1
        response = stub.FindSimilar(old_request, timeout=10)
        assert response.index_version == legacy
        assert response.matches[0].item_id == image_id and all(m.product_id == "" for m in response.matches)
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).product_count == 0
        channel.close()


def test_sigterm_finishes_requests_in_flight_and_exits_zero(served_copy, catalogue):
    paths = [catalogue / "small" / p for p in _images(served_copy)["path"][:8]]
    with helpers.serving(served_copy, "--grace-s", "30") as (process, address, metrics_port):
        computed_before = helpers.scrape(metrics_port).get("lookalike_batch_size_sum{}", 0)
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
        # Every call admitted: all 6 x 8 images are queued for the model or computed already (the batch on
        # the model is in neither count until it is done, so the sum reaches 48 only once all are queued).
        _until(lambda: _admitted_images(metrics_port) - computed_before == 6 * len(paths), 120)
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
    image_id = _images(served_copy)["image_id"][0]
    with helpers.serving(served_copy) as (_, address, metrics_port):
        client = ImageSimilarityClient(address)
        second = helpers.add_version(served_copy, "v-reloaded")
        versions, failures = [], 0
        artifacts.write_current(served_copy, second)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not versions or versions[-1] != second or len(versions) < 20):
            try:
                versions.append(client.find_similar(image_id=image_id, k=3).version)
            except Exception:  # noqa: BLE001 (counted: there must be none)
                failures += 1
        assert failures == 0
        assert versions[0] == first and versions[-1] == second
        # The new version has the same model: shared, not loaded again (and no collection to free it).
        assert helpers.scrape(metrics_port)["lookalike_model_loads_total{}"] == 1
        # Nor when the first version comes back: it shares the model its own first load read.
        for version in (first, second):
            artifacts.write_current(served_copy, version)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and client.find_similar(image_id=image_id, k=3).version != version:
                time.sleep(0.1)
        assert helpers.scrape(metrics_port)["lookalike_model_loads_total{}"] == 1
        # Broken: the index does not match its checksum. Refused; the old version keeps serving.
        broken = helpers.add_version(served_copy, "v-broken", corrupt=True)
        artifacts.write_current(served_copy, broken)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and helpers.scrape(metrics_port).get(
                "lookalike_reloads_total{result=refused}", 0) < 1:
            assert client.find_similar(image_id=image_id, k=3).version == second
            time.sleep(0.2)
        assert helpers.scrape(metrics_port)["lookalike_reloads_total{result=refused}"] == 1
        assert client.find_similar(image_id=image_id, k=3).version == second
        assert client.health() == "SERVING"
        client.close()


def test_server_refuses_to_start_on_a_checksum_mismatch(served_copy):
    version_dir = served_copy / artifacts.read_current(served_copy)
    (version_dir / "images.parquet").write_bytes((version_dir / "images.parquet").read_bytes() + b"x")
    result = subprocess.run([helpers.BIN / "lookalike-serve", "--artifacts", served_copy, "--port", "0",
                             "--metrics-port", "-1", "--log-format", "text"], env=helpers.env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "images.parquet does not match the manifest's sha256" in result.stderr


def test_server_refuses_to_start_without_current(tmp_path):
    result = subprocess.run([helpers.BIN / "lookalike-serve", "--artifacts", tmp_path, "--port", "0",
                             "--metrics-port", "-1", "--log-format", "text"], env=helpers.env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "CURRENT does not exist" in result.stderr


def _admitted_images(metrics_port: int) -> float:
    """Images queued for the model plus images it has computed, from the server's metrics."""
    metrics = helpers.scrape(metrics_port)
    return metrics.get("lookalike_queue_depth{}", 0) + metrics.get("lookalike_batch_size_sum{}", 0)


_build_cli, _until = helpers.build_cli, helpers.until


def test_hide_rollback_and_prune_on_a_running_server_under_load(served_copy, catalogue, tmp_path):
    original = artifacts.read_current(served_copy)
    load_catalogue = helpers.load_catalogue(catalogue, tmp_path / "clean")
    with helpers.serving(served_copy, "--lease-ttl-s", "3") as (process, address, metrics_port):
        client = ImageSimilarityClient(address)
        query = client.find_similar(product_id=_images(served_copy)["product_id"][0], k=5)
        hidden = [m.product_id for m in query[:2]]
        load = subprocess.Popen([helpers.BIN / "lookalike", "--address", address, "bench", "--catalogue",
                                 load_catalogue, "--mix", "id=1,product=1,recommend=1", "--concurrency", "4",
                                 "--duration-s", "6", "--json", "--no-progress"], env=helpers.env(),
                                stdout=subprocess.PIPE, text=True)
        _build_cli("hide", "--out", served_copy, *hidden)
        product = _images(served_copy)["product_id"][0]
        _until(lambda: set(hidden).isdisjoint(m.product_id for m in client.find_similar(product_id=product, k=5)))
        answer = client.find_similar(product_id=product, k=5)
        assert len(answer) == 5 and answer.availability_version == 1
        assert client.info()["hidden_product_count"] == 2
        assert helpers.scrape(metrics_port)["lookalike_hidden_products{}"] == 2
        # Still a query: alternatives to a hidden product.
        assert len(client.find_similar(product_id=hidden[0], k=3)) == 3
        _build_cli("unhide", "--out", served_copy, *hidden)
        _until(lambda: [m.product_id for m in client.find_similar(product_id=product, k=5)] ==
               [m.product_id for m in query])
        report = json.loads(load.communicate(timeout=60)[0])
        assert report["requests"] > 0 and report["codes"] == {"OK": report["requests"]}

        # Forward to a new version, then back with rollback: the server follows CURRENT both ways.
        helpers.add_version(served_copy, "v-next", created_at="2099-01-01T00:00:00+00:00")
        artifacts.write_current(served_copy, "v-next")
        _until(lambda: client.info()["version"] == "v-next", 60)
        assert _build_cli("rollback", "--out", served_copy).stdout.strip() == f"CURRENT: v-next -> {original}"
        _until(lambda: client.info()["version"] == original, 60)
        # A version the server refuses: CURRENT names it, the server keeps serving (and leasing) the original.
        helpers.add_version(served_copy, "v-broken", corrupt=True, created_at="2099-02-01T00:00:00+00:00")
        artifacts.write_current(served_copy, "v-broken")
        _until(lambda: helpers.scrape(metrics_port).get("lookalike_reloads_total{result=refused}", 0) >= 1, 60)
        _until(lambda: json.loads(_build_cli("versions", "--out", served_copy, "--json").stdout)[0]["leased"]
               and not json.loads(_build_cli("versions", "--out", served_copy, "--json").stdout)[1]["leased"])
        pruned = _build_cli("prune", "--out", served_copy, "--keep", "1").stdout
        assert "removed 1 (v-next)" in pruned
        assert (served_copy / original).is_dir() and (served_copy / "v-broken").is_dir()
        assert client.info()["version"] == original and len(client.find_similar(product_id=product, k=3)) == 3
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    assert not list((served_copy / ".leases").glob("*.json"))  # a server that stops gives its lease back
