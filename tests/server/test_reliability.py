"""Bad input, overload, faults and security against the real server and model."""

import ast
import json
import shutil
import signal
import subprocess
import time

import grpc
import numpy as np
import pandas as pd
import pytest

from bench import reliability
from client import ImageSimilarityClient
from lookalike import artifacts
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from tests import corpus, helpers

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_queue_server(built):
    with helpers.serving(built, "--max-queue", "16", "--max-batch-size", "8",
                         "--max-images-per-request", "16") as served:
        yield served


@pytest.fixture(scope="module")
def items(built):
    version_dir = built / artifacts.read_current(built)
    images = pd.read_parquet(version_dir / "images.parquet")
    images["vector"] = list(np.load(version_dir / "vectors.npy"))
    return images


def test_bad_input_corpus_gets_clear_errors_and_good_requests_interleaved_stay_right(small_queue_server, items,
                                                                                     catalogue):
    process, address, _ = small_queue_server
    entries = corpus.corpus()
    assert sum(code == corpus.INVALID for _, _, code in entries) >= 28 and len(entries) >= 30
    good_row = items.iloc[5]
    good = (catalogue / "small" / good_row["path"]).read_bytes()
    rss_before = reliability.rss_mib(process.pid)
    outcomes = {}
    # The raw stub, not the client: the client refuses some of these itself before sending.
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.ImageSimilarityStub(channel)
    with ImageSimilarityClient(address, timeout_s=30) as client:
        for name, data, expected in entries:
            try:
                response = stub.Embed(pb.EmbedRequest(images=[data]), timeout=30)
                outcomes[name] = "OK"
                assert abs(np.linalg.norm(response.vectors[0].values) - 1) < 1e-5, name
            except grpc.RpcError as error:
                outcomes[name] = error.code().name
                assert error.details(), name  # a message that says why
            if expected == corpus.INVALID:
                with pytest.raises(grpc.RpcError) as similar_error:
                    stub.FindSimilar(pb.FindSimilarRequest(image=data), timeout=30)
                assert similar_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert np.allclose(client.embed(good)[0], good_row["vector"], atol=1e-4)
        assert outcomes == {name: expected for name, _, expected in entries}
        tagged, upright = corpus.rotated_twin()
        assert np.allclose(client.embed(tagged)[0], client.embed(upright)[0], atol=2e-2)
        assert client.health() == "SERVING"
    channel.close()
    assert process.poll() is None
    assert reliability.rss_mib(process.pid) - rss_before < 1024  # decode is bounded: no bomb got through


def test_a_message_over_the_size_limit_is_resource_exhausted(small_queue_server):
    _, address, _ = small_queue_server
    big = 100 * 1024 * 1024
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", big)])
    stub = pb_grpc.ImageSimilarityStub(channel)
    with pytest.raises(grpc.RpcError) as error:
        stub.Embed(pb.EmbedRequest(images=[b"\x00" * (70 * 1024 * 1024)]), timeout=60)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ImageSimilarityClient(address).health() == "SERVING"
    channel.close()


def test_overload_is_refused_fast_and_throughput_recovers(small_queue_server, catalogue, tmp_path):
    process, address, metrics_port = small_queue_server
    clean = helpers.load_catalogue(catalogue, tmp_path / "clean")
    figures = reliability.overload(address, clean, process.pid, measure_s=3, overload_s=4)
    codes = figures["flood_codes"]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # no deadline misses, no errors
    assert codes.get("RESOURCE_EXHAUSTED", 0) > codes.get("OK", 0)  # 5x the rate: most is refused
    refused, admitted = (figures["flood_latency_by_code"][c] for c in ("RESOURCE_EXHAUSTED", "OK"))
    assert refused["p50_ms"] < admitted["p50_ms"]  # refusing is faster than serving
    assert figures["recovered_codes"] == {"OK": figures["recovered_codes"]["OK"]}
    assert figures["recovered_qps"] >= 0.5 * figures["sustainable_qps"]
    assert figures["rss_mib_after_flood"] - figures["rss_mib_before"] < 1024
    assert helpers.scrape(metrics_port)["lookalike_requests_total{code=RESOURCE_EXHAUSTED,method=Embed}"] > 0


def test_restart_after_sigkill_serves_again(tmp_path, built):
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
    image_id = pd.read_parquet(out / artifacts.read_current(out) / "images.parquet")["image_id"][0]
    port = helpers.free_port()

    def start():
        log = open(tmp_path / f"server-{time.monotonic_ns()}.log", "w")
        process = subprocess.Popen([helpers.BIN / "lookalike-serve", "--artifacts", out, "--port", str(port),
                                    "--metrics-port", "-1", "--log-format", "text"], env=helpers.env(),
                                   stdout=log, stderr=subprocess.STDOUT)
        return process, f"127.0.0.1:{port}"

    def wait(address, process):
        helpers.wait_healthy(address, process, 180, tmp_path / "none.log")

    first, address = start()
    try:
        wait(address, first)
        figures = reliability.restart_after_sigkill(start, wait, first)
        second = figures["process"]
        with ImageSimilarityClient(address) as client:
            assert len(client.find_similar(image_id=image_id, k=3)) == 3
        second.terminate()
        assert second.wait(60) == 0
        print(json.dumps({"restart_to_serving_s": figures["restart_to_serving_s"]}))
    finally:
        for process in (first,):
            if process.poll() is None:
                process.kill()


def test_a_sighup_while_the_server_starts_does_not_end_it_and_is_acted_on_once_serving(tmp_path, built):
    """SIGHUP asks a serving server to reload. Sent while it still loads its model (an operator's reload racing a
    restart), it ended the process (the signal's default action); then, ignored, it was lost: a version published
    after start-up had read CURRENT waited for the next SIGHUP (the watch loop off). Now it is acted on once serving."""
    out = helpers.copy_artifacts(built, tmp_path / "ARTIFACTS")
    second = helpers.add_version(out, "v-published-while-starting")
    port, log = helpers.free_port(), tmp_path / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen([helpers.BIN / "lookalike-serve", "--artifacts", out, "--port", str(port),
                                    "--metrics-port", "-1", "--log-format", "text", "--watch-interval-s", "0"],
                                   env=helpers.env(), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)  # past the interpreter's start, into the imports
        for _ in range(5):
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGHUP)
            time.sleep(0.2)
        # CURRENT read, the model loading (seconds): a new version is published and announced.
        helpers.until(lambda: "loading version" in log.read_text() or process.poll() is not None, 120)
        artifacts.write_current(out, second)
        process.send_signal(signal.SIGHUP)
        address = f"127.0.0.1:{port}"
        helpers.wait_healthy(address, process, 180, log)
        client = ImageSimilarityClient(address)
        helpers.until(lambda: client.info()["version"] == second, 60)
        assert "a SIGHUP came while starting" in log.read_text()
        process.send_signal(signal.SIGHUP)  # and once serving, a reload as ever
        time.sleep(0.5)
        assert process.poll() is None
        process.terminate()
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_current_naming_a_path_outside_artifacts_is_refused(tmp_path, built):
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
    version = artifacts.read_current(out)
    (out / "CURRENT").write_text(f"../{out.name}/{version}\n")
    result = subprocess.run([helpers.BIN / "lookalike-serve", "--artifacts", out, "--port", "0", "--metrics-port",
                             "-1", "--log-format", "text"], env=helpers.env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "invalid version name" in result.stderr
    manifest_path = out / version / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../../outside"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(artifacts.ArtifactError, match="outside"):
        artifacts.load_manifest(out / version)


def test_mismatched_dimension_is_refused(tmp_path, built):
    out = tmp_path / "ARTIFACTS"
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(".features", ".leases", ".staging-*"))
    manifest_path = out / artifacts.read_current(out) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dimension"] = 64
    manifest_path.write_text(json.dumps(manifest))
    result = subprocess.run([helpers.BIN / "lookalike-serve", "--artifacts", out, "--port", "0", "--metrics-port",
                             "-1", "--log-format", "text"], env=helpers.env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "model outputs 128-d vectors, manifest and index say 64" in result.stderr


def test_product_code_has_no_pickle_eval_or_exec():
    offenders = []
    for package in ("builder", "server", "client", "bench"):
        for path in (helpers.REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                    if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal") for n in names):
                        offenders.append(f"{path}: imports {names}")
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("eval", "exec"):
                    offenders.append(f"{path}:{node.lineno}: {node.func.id}")
                if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and getattr(node.value, "value", 0):
                    offenders.append(f"{path}:{node.lineno}: allow_pickle=True")
    assert offenders == []
