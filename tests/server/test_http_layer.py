"""The HTTP layer in-process: what it decides on its own (loading, sizes, routes, timeouts), and beside a gRPC server
on a fake model, the deadline and the admission budget the two share."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from server.admission import Admission, AdmissionInterceptor
from server.core import CoreConfig, SimilarityCore
from server.fresh import DeltaFeed
from server.http import HttpAbort, HttpApi, max_body_bytes, parse_timeout
from server.metrics import ServerMetrics
from server.servicer import ImageSimilarityServicer
from tests.server import fakes

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def loading_client():
    """An HttpApi whose servicer has no core yet (the server is loading), with a 1 MiB message limit."""
    metrics = ServerMetrics()
    api = HttpApi(ImageSimilarityServicer(None, metrics), 1024 * 1024, Admission(2, metrics.admission_refused),
                  lambda: False, body_idle_s=0.3)
    client = TestClient(TestServer(api.app(), host="127.0.0.1"))
    client.metrics = metrics
    await client.start_server()
    yield client
    await client.close()


async def test_in_process_loading_oversize_and_unknown_routes(loading_client):
    response = await loading_client.get("/readyz")
    assert response.status == 503
    # Every route that needs the version says so while the model loads, not INTERNAL (a review found 500s).
    for route in ("/v1/info", "/v1/images/some-image", "/v1/attributes"):
        response = await loading_client.get(route)
        assert response.status == 503 and (await response.json())["code"] == "UNAVAILABLE", route
    # Parsed, then over the limit as a message; and a body too large to read at all.
    image = base64.b64encode(b"x" * (1024 * 1024 + 1)).decode()
    response = await loading_client.post("/v1/embed", data=json.dumps({"images": [image]}), headers=JSON)
    assert response.status == 413 and (await response.json())["code"] == "RESOURCE_EXHAUSTED"
    response = await loading_client.post("/v1/embed", data=b" " * (3 * 1024 * 1024), headers=JSON)
    assert response.status == 413 and (await response.json())["code"] == "RESOURCE_EXHAUSTED"
    response = await loading_client.get("/v1/nothing")
    assert response.status == 404 and (await response.json())["code"] == "NOT_FOUND"
    response = await loading_client.get("/v1/similar")
    assert response.status == 405


@pytest.mark.parametrize(("header", "seconds"), [(None, None), ("2S", 2.0), ("500m", 0.5), ("1H", 3600.0),
                                                 ("10u", 1e-5)])
def test_grpc_timeout_header(header, seconds):
    if seconds is None:
        assert parse_timeout(header) is None
    else:
        assert parse_timeout(header) == pytest.approx(seconds)


@pytest.mark.parametrize("header", ["soon", "2s", "-1S", "1.5S", "123456789S"])
def test_a_malformed_grpc_timeout_is_refused(header):
    with pytest.raises(HttpAbort, match="grpc-timeout"):
        parse_timeout(header)


async def test_a_body_is_read_only_up_to_what_a_message_under_the_limit_takes_in_json(loading_client):
    limit = 1024 * 1024
    bound = max_body_bytes(limit)
    assert bound == 4 * -(-limit // 3) + 256 * 1024  # base64 of the limit plus the stated allowance
    # The largest image a message under the limit holds, in base64: read and parsed (then UNAVAILABLE: loading).
    largest = json.dumps({"images": [base64.b64encode(b"x" * (limit - 16)).decode()]})
    assert len(largest) < bound
    response = await loading_client.post("/v1/embed", data=largest, headers=JSON)
    assert response.status == 503, await response.text()
    # Whitespace between a message's fields, past the bound (the old one was twice the limit plus 64 KiB): 413.
    padded = '{"images": []' + " " * (bound - 13) + "}"
    assert len(padded) == bound + 1 < 2 * limit
    response = await loading_client.post("/v1/embed", data=padded, headers=JSON)
    assert response.status == 413 and str(bound) in (await response.json())["message"]


@pytest.mark.parametrize(("content_type", "status"), [
    ("text/plain", 400), ("application/x-www-form-urlencoded", 400), ("multipart/form-data; boundary=x", 400),
    ("application/json", 503), ("application/json; charset=utf-8", 503), (None, 503)])
async def test_a_body_must_be_json(loading_client, content_type, status):
    """A form or text is INVALID_ARGUMENT, as grpc-gateway answers a body it cannot decode; JSON, or a body with no
    Content-Type, goes on (to UNAVAILABLE here: the model is loading)."""
    headers, skip = ({"Content-Type": content_type}, ()) if content_type else ({}, ["Content-Type"])
    response = await loading_client.post("/v1/similar", data=b'{"productId": "p"}', headers=headers,
                                         skip_auto_headers=skip)
    answer = await response.json()
    assert response.status == status, answer
    if status == 400:
        assert answer["code"] == "INVALID_ARGUMENT" and "application/json" in answer["message"]


async def test_a_body_that_stops_arriving_is_refused(loading_client):
    """A slow upload does not hold its admission place past body_idle_s (0.3 s here) without a byte."""
    reader, writer = await asyncio.open_connection(loading_client.host, loading_client.port)
    writer.write(b"POST /v1/similar HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"productId\"")
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"DEADLINE_EXCEEDED" in answer, answer
    assert 0.25 < time.monotonic() - started < 5


async def test_a_body_that_trickles_is_refused(loading_client):
    """A byte every 0.1 s keeps the idle timer (0.3 s here) from firing; the average rate (64 KiB/s after the first
    0.3 s) does not: before it, the 100 bytes held their admission place for 10 s."""
    reader, writer = await asyncio.open_connection(loading_client.host, loading_client.port)
    writer.write(b"POST /v1/similar HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n")
    answer, sent = b"", 0
    while not answer and sent < 100:
        writer.write(b" ")
        await writer.drain()
        sent += 1
        try:
            answer = await asyncio.wait_for(reader.read(4096), 0.1)
        except TimeoutError:
            pass
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"arrived too slowly" in answer, (sent, answer)
    assert sent < 50


async def test_bodies_still_arriving_hold_at_most_half_the_budget(loading_client):
    """Admission(2): one call whose body is still arriving holds the HTTP bodies' share (1); a second call is
    RESOURCE_EXHAUSTED 429 at once while the first still arrives, and admitted once it has been refused (408)."""
    reader, writer = await asyncio.open_connection(loading_client.host, loading_client.port)
    writer.write(b"POST /v1/similar HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{")
    await writer.drain()
    await asyncio.sleep(0.05)
    response = await loading_client.post("/v1/similar", data=json.dumps({"productId": "p"}), headers=JSON)
    answer = await response.json()
    assert response.status == 429 and answer["code"] == "RESOURCE_EXHAUSTED", answer
    assert "HTTP bodies arriving at once" in answer["message"]
    assert loading_client.metrics.registry.get_sample_value(
        "lookalike_admission_refused_total", {"protocol": "http", "reason": "http_bodies"}) == 1.0
    assert (await asyncio.wait_for(reader.read(4096), 10)).startswith(b"HTTP/1.1 408")
    writer.close()
    response = await loading_client.post("/v1/similar", data=json.dumps({"productId": "p"}), headers=JSON)
    assert response.status == 503 and (await response.json())["code"] == "UNAVAILABLE"  # admitted: still loading


def test_the_server_counts_what_its_admission_refuses(tmp_path):
    """The server's one budget reports its refusals to the server's metrics (the tests above build their own)."""
    from server.app import LookalikeServer, ServerConfig
    from server.errors import Overloaded

    server = LookalikeServer(ServerConfig(artifacts=tmp_path, metrics_port=-1, max_concurrent_rpcs=1))
    server.admission.enter()
    with pytest.raises(Overloaded):
        server.admission.enter("http")
    assert server.metrics.registry.get_sample_value(
        "lookalike_admission_refused_total", {"protocol": "http", "reason": "budget"}) == 1.0


async def test_health_and_reflection_take_no_place_in_the_budget():
    """With every place taken, a health check still answers (grpc's own limiter refused it) and a call to the
    service is refused."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    admission = Admission(1)
    server = grpc.aio.server(interceptors=[AdmissionInterceptor(admission)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    admission.enter()  # the only place, as a call in flight holds it
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.ImageSimilarityStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert admission.in_flight == 1
    finally:
        admission.leave()
        await server.stop(0)


@pytest.fixture
async def slow_pair(tmp_path):
    """A fake model that takes 0.3 s a batch behind one core, served by a gRPC server and an HttpApi drawing on one
    admission budget of a single call: (gRPC stub, HTTP client, core, admission, catalogue images, metrics)."""
    version, images = fakes.fake_version(tmp_path, delay_s=0.3)
    metrics = ServerMetrics()
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), metrics)
    servicer = ImageSimilarityServicer(core, metrics)
    admission = Admission(1, metrics.admission_refused)
    server = grpc.aio.server(interceptors=[AdmissionInterceptor(admission)])
    pb_grpc.add_ImageSimilarityServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = TestClient(TestServer(HttpApi(servicer, 1024 * 1024, admission, lambda: True).app(), host="127.0.0.1"))
    await client.start_server()
    yield pb_grpc.ImageSimilarityStub(channel), client, core, admission, images, metrics
    await client.close()
    await channel.close()
    await server.stop(0)
    await core.close()


async def _grpc_embed(stub, image: bytes, timeout_s: float | None = None):
    try:
        return "OK", len((await stub.Embed(pb.EmbedRequest(images=[image]), timeout=timeout_s)).vectors)
    except grpc.aio.AioRpcError as error:
        return error.code().name, error.details()


async def _http_embed(client, image: bytes, headers: dict | None = None):
    response = await client.post("/v1/embed", data=json.dumps({"images": [base64.b64encode(image).decode()]}),
                                 headers={**JSON, **(headers or {})})
    answer = await response.json()
    return response.status, ("OK", len(answer["vectors"])) if response.status == 200 else (answer["code"],
                                                                                           answer["message"])


async def _settled(core, admission) -> None:
    """Waits (bounded) for what a call holds to be given back: its admission place and its images in the core."""
    for _ in range(100):
        if admission.in_flight == 0 and core.admitted_images == 0 and core.admitted_bytes == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"left behind: {admission.in_flight} calls, {core.admitted_images} images")


async def test_an_http_deadline_cancels_the_call_as_grpcs_does(slow_pair):
    """The model takes 0.3 s; with a 20 ms deadline both protocols answer DEADLINE_EXCEEDED at the deadline (HTTP
    answered 200 after 0.3 s before), and neither leaves its admission place or its images behind."""
    stub, client, core, admission, images, metrics = slow_pair
    grpc_outcome = await _grpc_embed(stub, images[0], 0.02)
    await _settled(core, admission)
    # Before, HTTP answered 200 with the vector once the model was done: the outcome says where the call ended.
    status, http_outcome = await _http_embed(client, images[0], {"grpc-timeout": "20m"})
    assert grpc_outcome == http_outcome == ("DEADLINE_EXCEEDED", "Deadline Exceeded")
    assert status == 504
    await _settled(core, admission)
    # A deadline the call meets is no deadline at all.
    assert await _http_embed(client, images[1], {"grpc-timeout": "5S"}) == (200, ("OK", 1))


async def test_grpc_and_http_draw_on_one_admission_budget(slow_pair):
    """One place (max_concurrent_rpcs 1): while a gRPC call holds it an HTTP call is refused, and the other way round;
    before, each protocol had its own budget and a process ran twice --max-concurrent-rpcs."""
    stub, client, core, admission, images, metrics = slow_pair
    holding = asyncio.ensure_future(_grpc_embed(stub, images[0]))
    while admission.in_flight == 0:
        await asyncio.sleep(0.005)
    status, refused = await _http_embed(client, images[1])
    assert status == 429 and refused[0] == "RESOURCE_EXHAUSTED" and "gRPC and HTTP together" in refused[1]
    assert await holding == ("OK", 1)
    await _settled(core, admission)

    holding = asyncio.ensure_future(_http_embed(client, images[0]))
    while admission.in_flight == 0:
        await asyncio.sleep(0.005)
    refused = await _grpc_embed(stub, images[1])
    assert refused[0] == "RESOURCE_EXHAUSTED" and "gRPC and HTTP together" in refused[1]
    # Refused before its message is read: one over the server's 4 MiB receive limit gets the budget's answer, not
    # the size's.
    refused = await _grpc_embed(stub, b"x" * (5 * 1024 * 1024))
    assert refused[0] == "RESOURCE_EXHAUSTED" and "gRPC and HTTP together" in refused[1], refused
    assert await holding == (200, ("OK", 1))
    await _settled(core, admission)
    assert await _grpc_embed(stub, images[2]) == ("OK", 1)
    # Refused before the servicer saw them, so in no RPC count: the server counts them apart, by protocol.
    registry = metrics.registry
    assert [registry.get_sample_value("lookalike_admission_refused_total", {"protocol": protocol, "reason": "budget"})
            for protocol in ("grpc", "http")] == [2.0, 1.0]
    assert registry.get_sample_value("lookalike_requests_total", {"method": "Embed", "code": "RESOURCE_EXHAUSTED"}) \
        is None


async def test_large_bodies_are_parsed_on_the_http_layers_own_threads(slow_pair):
    """With the default executor (where versions load and swap) busy, a large body is still parsed and answered: the
    parsing does not queue behind a swap, nor a swap behind a flood of parsing."""
    stub, client, core, admission, images, metrics = slow_pair
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    release = threading.Event()
    busy = loop.run_in_executor(None, release.wait, 30)
    try:
        padding = " " * (512 * 1024)  # over ON_LOOP_JSON_BYTES: parsed off the event loop
        body = '{"images": ["' + base64.b64encode(images[0]).decode() + '"]' + padding + "}"
        response = await asyncio.wait_for(client.post("/v1/embed", data=body, headers=JSON), 10)
        assert response.status == 200 and len((await response.json())["vectors"]) == 1
    finally:
        release.set()
        await busy


async def test_images_and_attributes_include_the_deltas_products(tmp_path):
    """GET /v1/images/{id} serves a delta's image from the folder `add` read it from, and no longer the old images of
    a product a delta replaced; /v1/attributes counts the served products (the version's less the replaced, plus the
    deltas'); a catalogue file that is a symlink out of the root is 404."""
    from tests.server.test_deltas import COLOURS, GROUPS, publish, unit

    weights = {"weight": np.arange(20, dtype=np.float64)}
    _, images, metrics, parts = await fakes.serve_in_process(tmp_path, groups=GROUPS, attributes=COLOURS,
                                                             numbers=weights)
    core = parts[2]
    catalogue = core.version.catalogue
    root = tmp_path / "catalogue" / "small"
    (root / "aa").mkdir(parents=True)
    for image_id, image in (("item-005", images[5]), ("item-003", images[3])):
        (root / catalogue.paths[int(catalogue.rows_of_image(image_id)[0])]).write_bytes(image)
    outside = tmp_path / "outside.png"
    outside.write_bytes(images[7])
    (root / catalogue.paths[int(catalogue.rows_of_image("item-007")[0])]).symlink_to(outside)
    client = TestClient(TestServer(HttpApi(ImageSimilarityServicer(core, metrics), 1024 * 1024, Admission(2),
                                           lambda: True, tmp_path / "catalogue").app(), host="127.0.0.1"))
    await client.start_server()
    try:
        # A new product (green, the heaviest) and prod-003 (red, weight 3) replaced by a green one without a weight.
        vector = unit(np.ones(fakes.DIMENSION))
        publish(tmp_path, core.version.name, {"new-001": [("new-img-1", vector)], "prod-003": [("prod3-b", vector)]},
                {"new-001": "green", "prod-003": "green"}, weight={"new-001": 50.0})
        (tmp_path / "small" / "zz").mkdir(parents=True)  # publish's manifest: catalogue_root is tmp_path
        (tmp_path / "small" / "zz" / "new-img-1.png").write_bytes(images[11])
        fresh, added, error = DeltaFeed(tmp_path, core.version.name, catalogue, fakes.DIMENSION).update()
        assert added and error is None and await core.apply_fresh(core.version.name, fresh)

        response = await client.get("/v1/images/new-img-1")
        assert response.status == 200 and await response.read() == images[11]
        assert response.headers["Content-Type"] == "image/png"
        response = await client.get("/v1/images/item-005")
        assert response.status == 200 and await response.read() == images[5]
        for gone in ("item-003", "item-007", "prod3-b"):  # replaced; a symlink out of the root; no file
            response = await client.get(f"/v1/images/{gone}")
            assert response.status == 404 and (await response.json())["code"] == "NOT_FOUND", gone

        # A product's images, main first: a delta's definition wins over the version's.
        for product_id, expected in (("new-001", ["new-img-1"]), ("prod-003", ["prod3-b"]),
                                     ("prod-005", ["item-005", "item-025"])):
            answer = await (await client.get(f"/v1/products/{product_id}/images")).json()
            assert [image["imageId"] for image in answer["images"]] == expected, product_id
            assert answer["imageCount"] == len(expected) and answer["images"][0]["role"] == "main"
        response = await client.get("/v1/products/no-such-product/images")
        assert response.status == 404 and (await response.json())["code"] == "NOT_FOUND"

        answer = await (await client.get("/v1/attributes")).json()
        assert answer["deltaSequence"] == 1
        assert answer["attributes"]["color"] == [{"value": "blue", "products": 10}, {"value": "red", "products": 9},
                                                 {"value": "green", "products": 2}]
        # Weights 0..19, less prod-003's 3, plus new-001's 50 (the replacing prod-003 has none).
        assert answer["numbers"]["weight"] == {"min": 0.0, "max": 50.0, "products": 20}
    finally:
        await client.close()
        await fakes.close_in_process(parts)
