"""The HTTP layer in-process, with no model: what it decides on its own (loading, sizes, routes, timeouts)."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.http import HttpAbort, HttpApi, parse_timeout
from server.metrics import ServerMetrics
from server.servicer import ImageSimilarityServicer


@pytest.fixture
async def loading_client():
    """An HttpApi whose servicer has no core yet (the server is loading), with a 1 MiB message limit."""
    api = HttpApi(ImageSimilarityServicer(None, ServerMetrics()), 1024 * 1024, 2, lambda: False)
    client = TestClient(TestServer(api.app(), host="127.0.0.1"))
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
    response = await loading_client.post("/v1/embed", data=json.dumps({"images": [image]}))
    assert response.status == 413 and (await response.json())["code"] == "RESOURCE_EXHAUSTED"
    response = await loading_client.post("/v1/embed", data=b" " * (3 * 1024 * 1024))
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
