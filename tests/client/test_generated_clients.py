"""The Go and Java clients generated from protos/ (Debian's protoc plugins), and the compiled load
generator, against one real server: the same answers as the Python client, the same status codes."""

import json
import subprocess

import pandas as pd
import pytest

from client import ImageSimilarityClient
from lookalike import artifacts
from tests import helpers

pytestmark = pytest.mark.e2e
BIN = helpers.REPO / "build" / "clients" / "bin"
EXAMPLES = {"go": "lookalike-example-go", "java": "lookalike-example-java"}


@pytest.fixture(scope="module")
def clients():
    """Builds both clients and the load generator (installing Debian's packages when missing, as root)."""
    result = subprocess.run(["bash", helpers.REPO / "client" / "build-clients.sh"], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return BIN


@pytest.fixture(scope="module")
def server(built):
    with helpers.serving(built) as (_, address, _metrics):
        yield address


def _run(clients, language: str, address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([clients / EXAMPLES[language], "--address", address, *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("language", ["go", "java"])
def test_generated_client_answers_what_the_python_client_answers(clients, server, built, catalogue, language):
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    python = ImageSimilarityClient(server)
    for product_id in images["product_id"].drop_duplicates().iloc[[0, 7, 42]]:
        result = _run(clients, language, server, "--product", product_id, "--k", "5")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        expected = python.find_similar(product_id=product_id, k=5)
        assert [m["product_id"] for m in answer["matches"]] == [m.product_id for m in expected]
        assert [m["image_id"] for m in answer["matches"]] == [m.image_id for m in expected]
        assert [m["distance"] for m in answer["matches"]] == pytest.approx([m.distance for m in expected], abs=1e-6)
        assert answer["index_version"] == artifacts.read_current(built)
    photo = images.iloc[11]
    by_photo = _run(clients, language, server, "--image", str(catalogue / "small" / photo["path"]), "--k", "3")
    assert by_photo.returncode == 0, by_photo.stderr
    expected = python.find_similar(catalogue / "small" / photo["path"], k=3, exclude_query=False)
    assert [m["product_id"] for m in json.loads(by_photo.stdout)["matches"]] == [m.product_id for m in expected]
    python.close()


@pytest.mark.parametrize("language", ["go", "java"])
def test_generated_client_reports_the_right_status_codes(clients, server, tmp_path, language):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"definitely not an image")
    result = _run(clients, language, server, "--image", str(bad))
    assert result.returncode == 2 and "INVALID_ARGUMENT" in result.stderr, result.stderr
    unknown = _run(clients, language, server, "--product", "no-such-product")
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr, unknown.stderr
    unknown = _run(clients, language, server, "--image-id", "no-such-image")
    assert unknown.returncode == 2 and "NOT_FOUND" in unknown.stderr, unknown.stderr
    # Nothing listens here: UNAVAILABLE after its retries, never a hang.
    down = _run(clients, language, f"127.0.0.1:{helpers.free_port()}", "--product", "x")
    assert down.returncode == 2 and "UNAVAILABLE" in down.stderr, down.stderr


def test_compiled_load_generator_reports_codes_and_percentiles(clients, server, catalogue):
    result = subprocess.run([clients / "lookalike-loadgen", "--address", server, "--catalogue", str(catalogue),
                             "--mix", "info=1,id=2,product=2", "--concurrency", "4", "--requests", "400",
                             "--duration", "30s", "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 400 and report["mode"] == "closed"
    # The catalogue's corrupt image and banners are not in the index: their ids are NOT_FOUND, the rest OK.
    assert report["codes"]["OK"] + report["codes"].get("NOT_FOUND", 0) == 400 and report["codes"]["OK"] > 300
    assert set(report["latency"]) == {"all", "info", "id", "product"}
    stats = report["latency"]["all"]
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    opened = subprocess.run([clients / "lookalike-loadgen", "--address", server, "--mode", "open", "--rate", "200",
                             "--duration", "1s", "--mix", "info=1", "--json"], capture_output=True, text=True,
                            timeout=60)
    report = json.loads(opened.stdout)
    assert report["mode"] == "open" and report["rate"] == 200 and 100 <= report["requests"] <= 320
    for flags, message in ((["--duration", "11m"], "-duration must be in"), (["--mix", "bogus=1"], "-mix part"),
                           (["--mode", "sideways"], "-mode is closed or open")):
        bad = subprocess.run([clients / "lookalike-loadgen", "--address", server, *flags], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
