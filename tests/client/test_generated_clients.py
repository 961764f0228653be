"""The clients in four languages (Python, Node, and Go and Java generated from protos/ with Debian's protoc
plugins) and the compiled load generator: with the field unset, the same answers from a real server; the
same status codes; the same retry policy and mTLS against a fake server on 127.0.0.1."""

import contextlib
import json
import re
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pandas as pd
import pytest

from client import ImageSimilarityClient, LookalikeError
from client.cli import _clause
from lookalike import artifacts
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from tests import helpers
from tests.server.test_tls import pki  # noqa: F401  (the module fixture: a CA, a server and a client certificate)

pytestmark = pytest.mark.e2e
BIN = helpers.REPO / "build" / "clients" / "bin"
EXAMPLES = {"go": "lookalike-example-go", "java": "lookalike-example-java"}
LANGUAGES = ("python", "node", "go", "java")
NODE_EXAMPLE = helpers.REPO / "client" / "node" / "example.js"
# How each example takes a query and its TLS files (Go's flag package takes the double dash too).
EXAMPLE_FLAGS = {"photo": "--image", "image_id": "--image-id", "product_id": "--product", "ca": "--ca",
                 "cert": "--cert", "key": "--key"}
NODE_FLAGS = {"photo": "{}", "image_id": "image:{}", "product_id": "product:{}", "ca": "--root-ca",
              "cert": "--client-cert", "key": "--client-key"}
PYTHON_QUERY = {"photo": "image", "image_id": "image_id", "product_id": "product_id"}
RETRY_POLICY = json.loads((helpers.REPO / "protos" / "lookalike" / "v1" / "service_config.json").read_text())[
    "methodConfig"][0]["retryPolicy"]


@pytest.fixture(scope="module")
def clients():
    """Builds both clients and the load generator (installing Debian's packages when missing, as root) when
    `make clients` has not built them from the current sources yet: under `make test`, never twice."""
    result = subprocess.run(["make", "--no-print-directory", "clients"], cwd=helpers.REPO, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return BIN


@pytest.fixture(scope="module")
def server(served):
    """The session's server on the shared build (conftest.served)."""
    return served.address


def _run(clients, language: str, address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([clients / EXAMPLES[language], "--address", address, *args], capture_output=True,
                          text=True, timeout=120)


def _similar(language: str, address: str, kind: str, value: str, tls: dict | None = None,
             timeout_s: float | None = None, ranking: dict | None = None,
             filters: tuple[str, ...] = ()) -> tuple[str, list[tuple[str, str, float]]]:
    """FindSimilar(k=5) from one client with exclude_query left unset: the status code's name and the
    (product_id, image_id, distance) of each match. timeout_s: Python and Go only. ranking: {"diversity": D,
    "candidates": N, "region": (...), "query_expansion": (ALPHA, RESULTS)}, sent by every client. filters: --filter
    clauses as the command lines write them."""
    tls, ranking = tls or {}, ranking or {}
    if language == "python":
        try:
            with ImageSimilarityClient(address, timeout_s=timeout_s or 10, root_ca=tls.get("ca"),
                                       client_cert=tls.get("cert"), client_key=tls.get("key")) as client:
                matches = client.find_similar(**{PYTHON_QUERY[kind]: value}, k=5, **ranking,
                                              filters=[_clause(text) for text in filters])
            return "OK", [(m.product_id, m.image_id, m.distance) for m in matches]
        except LookalikeError as error:
            return error.code.name, []
    flags = NODE_FLAGS if language == "node" else EXAMPLE_FLAGS
    args = [arg for name, path in tls.items() for arg in (flags[name], str(path))]
    args += _ranking_flags(ranking) + [arg for text in filters for arg in ("--filter", text)]
    code, answer = _example(language, address, [*args, NODE_FLAGS[kind].format(value)],
                            [*args, EXAMPLE_FLAGS[kind], value, "--k", "5",
                             *(["--timeout", f"{timeout_s}s"] if timeout_s else [])])
    return code, _matches(answer)


def _ranking_flags(ranking: dict) -> list[str]:
    """{"diversity": 0.5, "region": (...)} as every example's command line takes it: --diversity 0.5 ..."""
    return [arg for name, value in ranking.items()
            for arg in (f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple)
                        else str(value))]


def _example(language: str, address: str, node_args: list[str], example_args: list[str]) -> tuple[str, dict]:
    """Node's example or a compiled one: the status code's name (OK, or as the example printed it) and its JSON
    answer (Node's last line)."""
    if language == "node":
        command = ["node", NODE_EXAMPLE, address, *node_args]
    else:
        command = [BIN / EXAMPLES[language], "--address", address, *example_args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        code = re.search(r"\b([A-Z][A-Z_]{3,}): ", result.stderr)
        return (code.group(1) if code else result.stderr), {}
    return "OK", json.loads(result.stdout.strip().splitlines()[-1] if language == "node" else result.stdout)


def _matches(answer: dict, measure: str = "distance") -> list[tuple[str, str, float]]:
    """(product_id, image_id, distance or score) of each match, as any example prints them."""
    return [(m.get("product_id", m.get("productId")), m.get("image_id", m.get("imageId")), m[measure])
            for m in answer.get("matches", [])]


def _agreeing(answers: dict, scores: bool = True, context: tuple = ()) -> list[tuple[str, str, float]]:
    """Python's matches, once every client's answer is OK and the others' matches are Python's (their scores too, to
    1e-5, unless scores is False)."""
    code, python = answers.pop("python")
    assert code == "OK", ("python", *context, code)
    for language, (code, answer) in answers.items():
        assert code == "OK", (language, *context, code)
        assert [m[:2] for m in answer] == [m[:2] for m in python], (language, *context)
        if scores:
            assert [m[2] for m in answer] == pytest.approx([m[2] for m in python], abs=1e-5), (language, *context)
    return python


def test_every_client_gives_the_same_answers_with_the_servers_defaults(clients, server, built, catalogue):
    """exclude_query unset in all four: a photo's own product comes back, an id query's does not."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    photo, image, product = images.iloc[11], images.iloc[7], images.iloc[42]
    queries = [("photo", str(catalogue / "small" / photo["path"]), photo["product_id"]),
               ("image_id", image["image_id"], image["product_id"]),
               ("product_id", product["product_id"], product["product_id"])]
    for kind, value, own_product in queries:
        answers = {language: _similar(language, server, kind, value) for language in LANGUAGES}
        python = _agreeing(answers, context=(kind,))
        assert len(python) == 5
        assert (own_product in [m[0] for m in python]) == (kind == "photo"), kind


def test_every_client_sends_diversity_and_candidates(clients, server, built):
    """The same diverse answer from all four, unlike the plain one; an out-of-range value is INVALID_ARGUMENT."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    product = images.iloc[42]["product_id"]
    _, plain = _similar("python", server, "product_id", product)
    answers = {language: _similar(language, server, "product_id", product, ranking={"diversity": 0.9,
                                                                                   "candidates": 30})
               for language in LANGUAGES}
    python = _agreeing(answers, scores=False)
    assert len(python) == 5 and [m[0] for m in python] != [m[0] for m in plain]
    for language in LANGUAGES[1:]:
        code, _ = _similar(language, server, "product_id", product, ranking={"diversity": 0.5, "candidates": 3})
        assert code == "INVALID_ARGUMENT", language


def test_every_client_sends_a_region(clients, server, built, catalogue):
    """A photo query with a region: the same answer from all four, unlike the whole photo's."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    photo = str(catalogue / "small" / images.iloc[11]["path"])
    _, whole = _similar("python", server, "photo", photo)
    answers = {language: _similar(language, server, "photo", photo, ranking={"region": (0.1, 0.2, 0.6, 0.9)})
               for language in LANGUAGES}
    python = _agreeing(answers)
    assert len(python) == 5 and [m[2] for m in python] != pytest.approx([m[2] for m in whole])
    for language in LANGUAGES[1:]:
        code, _ = _similar(language, server, "photo", photo, ranking={"region": (0.6, 0.2, 0.1, 0.9)})
        assert code == "INVALID_ARGUMENT", language


def _recommend(language: str, address: str, positive: list[str], negative: list[str],
               ranking: dict) -> tuple[str, list[tuple[str, str, float]]]:
    """Recommend(k=5) by product ids from one client: the status code's name and the (product_id, image_id,
    score) of each match. ranking: {"strategy": S, "diversity": D, "candidates": N}."""
    if language == "python":
        try:
            with ImageSimilarityClient(address) as client:
                matches = client.recommend(positive, negative, k=5, **ranking)
            return "OK", [(m.product_id, m.image_id, m.score) for m in matches]
        except LookalikeError as error:
            return error.code.name, []
    args = _ranking_flags(ranking) + ["--negative", ",".join(negative)]
    code, answer = _example(language, address, [*args, f"recommend:{','.join(positive)}"],
                            [*args, "--recommend", ",".join(positive), "--k", "5"])
    return code, _matches(answer, "score")


def test_every_client_sends_sum_scores_and_diversity_on_recommend(clients, server, built):
    """sum_scores (its scores a sum over the examples) with diversity: the same answer and scores from all four,
    unlike sum_scores alone and unlike the default strategy; candidates below k are INVALID_ARGUMENT."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    positive, negative = list(images.iloc[[42, 7]]["product_id"]), [images.iloc[11]["product_id"]]
    ranking = {"strategy": "sum_scores", "diversity": 0.9, "candidates": 30}
    _, plain = _recommend("python", server, positive, negative, {"strategy": "sum_scores"})
    _, average = _recommend("python", server, positive, negative, {"diversity": 0.9, "candidates": 30})
    answers = {language: _recommend(language, server, positive, negative, ranking) for language in LANGUAGES}
    python = _agreeing(answers)
    assert len(python) == 5 and [m[0] for m in python] != [m[0] for m in plain]
    assert [m[2] for m in python] != pytest.approx([m[2] for m in average], abs=1e-3)
    for language in LANGUAGES:
        code, _ = _recommend(language, server, positive, negative, {**ranking, "candidates": 3})
        assert code == "INVALID_ARGUMENT", language


def test_every_client_embeds_a_region(clients, server, built, catalogue):
    """Embed with a region: the same vector from all four, unlike the whole photo's; an empty region is
    INVALID_ARGUMENT."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    photo = str(catalogue / "small" / images.iloc[11]["path"])
    with ImageSimilarityClient(server) as client:
        whole, python = client.embed([photo]), client.embed([photo], regions=[(0.1, 0.2, 0.6, 0.9)])
    assert python.shape == whole.shape and abs(float(python[0] @ whole[0])) < 0.999
    for language in LANGUAGES[1:]:
        code, answer = _example(language, server, ["--region", "0.1,0.2,0.6,0.9", f"embed:{photo}"],
                                ["--region", "0.1,0.2,0.6,0.9", "--embed", photo])
        assert code == "OK", (language, code)
        assert answer["vectors"][0] == pytest.approx(python[0].tolist(), abs=1e-5), language
        code, _ = _example(language, server, ["--region", "0.6,0.2,0.1,0.9", f"embed:{photo}"],
                           ["--region", "0.6,0.2,0.1,0.9", "--embed", photo])
        assert code == "INVALID_ARGUMENT", language


def test_every_client_sends_query_expansion(clients, server, built, catalogue):
    """A photo query with query expansion: the same answer from all four, unlike the plain one; an out-of-range
    alpha is INVALID_ARGUMENT."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    photo = str(catalogue / "small" / images.iloc[11]["path"])
    _, plain = _similar("python", server, "photo", photo)
    answers = {language: _similar(language, server, "photo", photo, ranking={"query_expansion": (1.0, 20)})
               for language in LANGUAGES}
    python = _agreeing(answers)
    assert len(python) == 5 and [m[2] for m in python] != pytest.approx([m[2] for m in plain])
    for language in LANGUAGES:
        code, _ = _similar(language, server, "photo", photo, ranking={"query_expansion": (11.0, 5)})
        assert code == "INVALID_ARGUMENT", language


def test_every_client_sends_range_and_string_clauses(clients, server, built):
    """The same filtered answer from all four (ranges over the sample's number attributes AND a string clause), every
    match in range; a range on a string key and values on a number key are INVALID_ARGUMENT in every client."""
    images = pd.read_parquet(built / artifacts.read_current(built) / artifacts.IMAGES_FILE)
    product = images.iloc[42]["product_id"]
    filters = ("item_weight_pounds<1.5", "model_year>=2016", "country!=JP")
    with ImageSimilarityClient(server) as client:
        checked = client.find_similar(product_id=product, k=5, with_attributes=True,
                                      filters=[_clause(text) for text in filters])
    assert len(checked) == 5 and all(float(m.attributes["item_weight_pounds"]) < 1.5
                                     and float(m.attributes["model_year"]) >= 2016
                                     and m.attributes.get("country") != "JP" for m in checked)
    answers = {language: _similar(language, server, "product_id", product, filters=filters) for language in LANGUAGES}
    python = _agreeing(answers, scores=False)
    assert [m[0] for m in python] == [m.product_id for m in checked]
    for wrong in ("product_type>1", "model_year=2019"):
        for language in LANGUAGES:
            code, _ = _similar(language, server, "product_id", product, filters=(wrong,))
            assert code == "INVALID_ARGUMENT", (language, wrong, code)


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


class _Fake(pb_grpc.ImageSimilarityServicer):
    """Answers FindSimilar with one match after `failures` answers with `code` (UNAVAILABLE: a draining server;
    CANCELLED: a call cut by a worker's shutdown), each after `delay_s`; keeps every attempt's request."""

    def __init__(self, failures: int = 0, delay_s: float = 0.0,
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures, self.delay_s, self.code = failures, delay_s, code
        self.requests: list[pb.FindSimilarRequest] = []
        self._lock = threading.Lock()

    def FindSimilar(self, request, context):  # noqa: N802
        with self._lock:
            self.requests.append(request)
            attempt = len(self.requests)
        time.sleep(self.delay_s)
        if attempt <= self.failures:
            context.abort(self.code, "draining")
        return pb.FindSimilarResponse(index_version="fake", matches=[pb.Match(product_id="p1", image_id="i1")])

    def GetInfo(self, request, context):  # noqa: N802
        return pb.GetInfoResponse(version="fake")


@contextlib.contextmanager
def _fake_server(servicer: _Fake, credentials: grpc.ServerCredentials | None = None):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_ImageSimilarityServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _built_if_needed(request, language: str) -> None:
    if language in EXAMPLES:
        request.getfixturevalue("clients")


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_client_retries_unavailable_and_cancelled_under_the_shared_policy(request, language):
    _built_if_needed(request, language)
    draining = _Fake(failures=2)
    with _fake_server(draining) as address:
        code, matches = _similar(language, address, "product_id", "p0")
    assert code == "OK" and [m[0] for m in matches] == ["p1"]
    assert len(draining.requests) == 3  # two UNAVAILABLE answers, then the answer
    assert not any(r.HasField("exclude_query") for r in draining.requests)  # the server decides
    down = _Fake(failures=1_000)
    with _fake_server(down) as address:
        code, _ = _similar(language, address, "image_id", "i0")
    assert code == "UNAVAILABLE" and len(down.requests) == RETRY_POLICY["maxAttempts"]
    cut = _Fake(failures=1, code=grpc.StatusCode.CANCELLED)  # cut by a replaced worker's shutdown: asked again
    with _fake_server(cut) as address:
        code, matches = _similar(language, address, "product_id", "p0")
    assert code == "OK" and [m[0] for m in matches] == ["p1"] and len(cut.requests) == 2


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_client_retries_a_photo_larger_than_grpcs_default_retry_buffer(request, tmp_path, language):
    """gRPC retries only what it kept of a call's request, 256 KiB by default in Python and Go, 1 MiB in Java and
    Node: a product photo beyond that met a draining replica's UNAVAILABLE, or a replaced worker's CANCELLED, with
    no retry. Every client keeps a request up to the message limit."""
    _built_if_needed(request, language)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 12_000)  # 3 MB: the fake server reads no pixels
    cut = _Fake(failures=1, code=grpc.StatusCode.CANCELLED)
    with _fake_server(cut) as address:
        code, matches = _similar(language, address, "photo", str(photo))
    assert code == "OK" and [m[0] for m in matches] == ["p1"] and len(cut.requests) == 2
    assert cut.requests[-1].image == photo.read_bytes()


@pytest.mark.parametrize("language", ["python", "go"])
def test_retries_stay_within_the_calls_one_deadline(request, language):
    """Each attempt takes 0.4 s: within a 1 s deadline there is no room for every attempt, and the call
    ends with DEADLINE_EXCEEDED (a fresh deadline per attempt would end UNAVAILABLE after all of them)."""
    _built_if_needed(request, language)
    slow = _Fake(failures=1_000, delay_s=0.4)
    with _fake_server(slow) as address:
        code, _ = _similar(language, address, "product_id", "p0", timeout_s=1)
    assert code == "DEADLINE_EXCEEDED" and len(slow.requests) < RETRY_POLICY["maxAttempts"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_client_speaks_mtls(request, language):
    _built_if_needed(request, language)
    certificates = request.getfixturevalue("pki")
    ca, (server_cert, server_key), (client_cert, client_key) = (certificates[name] for name in ("ca", "server",
                                                                                                "client"))
    credentials = grpc.ssl_server_credentials([(server_key.read_bytes(), server_cert.read_bytes())],
                                              root_certificates=ca.read_bytes(), require_client_auth=True)
    with _fake_server(_Fake(), credentials) as address:
        code, matches = _similar(language, address, "product_id", "p0",
                                 tls={"ca": ca, "cert": client_cert, "key": client_key})
        anonymous, _ = _similar(language, address, "product_id", "p0", tls={"ca": ca})
    assert code == "OK" and [m[0] for m in matches] == ["p1"]
    assert anonymous == "UNAVAILABLE"  # the server asks for a certificate this client does not have
