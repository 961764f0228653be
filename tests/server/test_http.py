"""JSON over HTTP on the shared server: the same answers as gRPC, images by id, the OpenAPI document."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import pytest
from google.protobuf import json_format
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_openapi

from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from server.http import HTTP_STATUS
from server.openapi import ROUTES
from tests import helpers

pytestmark = pytest.mark.e2e
# The server's default max_message_bytes (64 MiB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def http(served: helpers.Served, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(served.http_url + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


@pytest.fixture(scope="module")
def stub(served):
    options = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(served.address, options=options) as channel:
        yield pb_grpc.ImageSimilarityStub(channel)


@pytest.fixture(scope="module")
def info(stub) -> pb.GetInfoResponse:
    return stub.GetInfo(pb.GetInfoRequest(), timeout=30)


@pytest.fixture(scope="module")
def sample(catalogue):
    """A product with other images, one of its image ids, and its photo's bytes."""
    listing = helpers.first_listing(catalogue)
    rows = {row["image_id"]: row for row in helpers.catalogue_images(catalogue)}
    image_id = listing["main_image_id"]
    return listing["item_id"], image_id, (catalogue / "small" / rows[image_id]["path"]).read_bytes()


ROUTE_OF = {"Embed": ROUTES["Embed"], "FindSimilar": ROUTES["FindSimilar"], "Recommend": ROUTES["Recommend"]}
RESPONSE_OF = {"Embed": pb.EmbedResponse, "FindSimilar": pb.FindSimilarResponse, "Recommend": pb.RecommendResponse}


def both(served, stub, method: str, request):
    """(gRPC outcome, HTTP outcome): each the response message or (code name, message), plus the HTTP status."""
    try:
        grpc_outcome = getattr(stub, method)(request, timeout=60)
    except grpc.RpcError as error:
        grpc_outcome = (error.code().name, error.details())
    status, body, _ = http(served, ROUTE_OF[method], json_format.MessageToJson(request).encode())
    if status == 200:
        http_outcome = json_format.Parse(body, RESPONSE_OF[method]())
    else:
        answer = json.loads(body)
        http_outcome = (answer["code"], answer["message"])
    # The second of two equal requests by id may come from the result cache: the plan says so, the rest is equal.
    for outcome in (grpc_outcome, http_outcome):
        if isinstance(outcome, (pb.FindSimilarResponse, pb.RecommendResponse)):
            assert outcome.plan in ("neighbour_list", "exact", "annoy", "annoy_then_exact", "result_cache")
            outcome.ClearField("plan")
    return grpc_outcome, http_outcome, status


def requests(sample, info):
    product_id, image_id, photo = sample
    key = "product_type"
    assert key in info.attribute_keys
    clause = pb.Clause(key=key, none_of=["SHIRT"])
    return {
        "embed": ("Embed", pb.EmbedRequest(images=[photo, photo])),
        "similar by product": ("FindSimilar", pb.FindSimilarRequest(product_id=product_id, k=7, group_size=2,
                                                                    with_attributes=True)),
        "similar by image": ("FindSimilar", pb.FindSimilarRequest(image_id=image_id, k=5)),
        "similar by photo": ("FindSimilar", pb.FindSimilarRequest(image=photo, k=4, exclude_query=False)),
        "similar with a filter": ("FindSimilar", pb.FindSimilarRequest(
            product_id=product_id, k=6, with_attributes=True, filter=pb.Filter(clauses=[clause]),
            score_threshold=-1.0)),
        "similar with a range": ("FindSimilar", pb.FindSimilarRequest(
            product_id=product_id, k=6, with_attributes=True, filter=pb.Filter(clauses=[
                clause, pb.Clause(key="item_weight_pounds", range=pb.Range(gt=0.5, lte=2))]))),
        "recommend": ("Recommend", pb.RecommendRequest(
            positive=[pb.Example(product_id=product_id), pb.Example(image_id=image_id)],
            negative=[pb.Example(product_id=helpers.SHARED_PRODUCT)], k=5, with_attributes=True,
            strategy=pb.RECOMMEND_STRATEGY_BEST_SCORE, filter=pb.Filter(clauses=[clause]))),
        "recommend ignoring missing": ("Recommend", pb.RecommendRequest(
            positive=[pb.Example(product_id=product_id), pb.Example(product_id="no-such-product")],
            ignore_missing=True, k=3)),
        "not found": ("FindSimilar", pb.FindSimilarRequest(product_id="no-such-product")),
        "unknown filter key": ("FindSimilar", pb.FindSimilarRequest(
            product_id=product_id, filter=pb.Filter(clauses=[pb.Clause(key="no-such-key", any_of=["x"])]))),
        "k too large": ("FindSimilar", pb.FindSimilarRequest(image_id=image_id, k=100_000)),
        "no query": ("FindSimilar", pb.FindSimilarRequest(k=3)),
        "not an image": ("Embed", pb.EmbedRequest(images=[b"not an image"])),
        "recommend with nothing": ("Recommend", pb.RecommendRequest(k=3)),
    }


CASES = ["embed", "similar by product", "similar by image", "similar by photo", "similar with a filter",
         "similar with a range", "recommend", "recommend ignoring missing", "not found", "unknown filter key",
         "k too large", "no query", "not an image", "recommend with nothing"]
ERRORS = {"not found": "NOT_FOUND", "unknown filter key": "INVALID_ARGUMENT", "k too large": "INVALID_ARGUMENT",
          "no query": "INVALID_ARGUMENT", "not an image": "INVALID_ARGUMENT",
          "recommend with nothing": "INVALID_ARGUMENT"}


@pytest.mark.parametrize("case", CASES)
def test_http_answers_what_grpc_answers(served, stub, sample, info, case):
    method, request = requests(sample, info)[case]
    grpc_outcome, http_outcome, status = both(served, stub, method, request)
    assert http_outcome == grpc_outcome
    if case in ERRORS:
        assert grpc_outcome[0] == ERRORS[case]
        assert status == HTTP_STATUS[grpc.StatusCode[ERRORS[case]]]
    else:
        assert status == 200
        if method != "Embed":
            assert len(http_outcome.matches) > 0 and http_outcome.index_version == info.version


def test_filter_results_hold_in_json(served, sample):
    product_id, _, _ = sample
    body = json.dumps({"productId": product_id, "k": 8, "withAttributes": True,
                       "filter": {"clauses": [{"key": "product_type", "anyOf": ["SHIRT", "SHOES"]}]}}).encode()
    status, answer, headers = http(served, "/v1/similar", body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    matches = json.loads(answer)["matches"]
    assert matches and {m["attributes"]["product_type"] for m in matches} <= {"SHIRT", "SHOES"}
    assert product_id not in {m["productId"] for m in matches}


def test_info_over_http_equals_grpc(served, info):
    status, body, _ = http(served, "/v1/info")
    assert status == 200
    assert json_format.Parse(body, pb.GetInfoResponse()) == info
    assert json.loads(body)["productCount"] == str(info.product_count)  # 64-bit integers as strings, as mapped


def test_a_request_over_the_size_limit_is_refused_as_grpc_refuses_it(served, stub):
    request = pb.EmbedRequest(images=[b"\xff" * (MAX_MESSAGE_BYTES + 1)])
    grpc_outcome, http_outcome, status = both(served, stub, "Embed", request)
    assert grpc_outcome[0] == http_outcome[0] == "RESOURCE_EXHAUSTED"
    assert status == 413


def test_bad_json_and_bad_timeout_are_invalid_argument(served):
    status, body, _ = http(served, "/v1/similar", b'{"productId": ')
    assert status == 400 and json.loads(body)["code"] == "INVALID_ARGUMENT"
    status, body, _ = http(served, "/v1/similar", b'{"noSuchField": 1}')
    assert status == 400 and "noSuchField" in json.loads(body)["message"]
    status, body, _ = http(served, "/v1/similar", b'{"imageId": "x"}', {"grpc-timeout": "soon"})
    assert status == 400 and "grpc-timeout" in json.loads(body)["message"]


def test_deadline_over_http_is_deadline_exceeded(served, sample):
    _, _, photo = sample
    body = json.dumps({"images": [base64.b64encode(photo).decode()] * 8}).encode()
    status, answer, _ = http(served, "/v1/embed", body, {"grpc-timeout": "1n"})
    assert (status, json.loads(answer)["code"]) == (504, "DEADLINE_EXCEEDED")


def test_probes(served):
    assert http(served, "/healthz")[0] == 200
    status, body, _ = http(served, "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "SERVING"})


def test_images_by_id(served, sample, catalogue, info):
    _, image_id, photo = sample
    status, body, headers = http(served, f"/v1/images/{image_id}")
    assert status == 200 and body == photo and headers["Content-Type"] == "image/png"
    assert http(served, "/v1/images/no-such-image")[0] == 404
    # The dropped banners are in the catalogue folder but not in the version: not served.
    assert http(served, f"/v1/images/{helpers.BANNER_IDS[0]}")[0] == 404


@pytest.mark.parametrize("path", ["/v1/images/..%2F..%2Fimages.csv.gz", "/v1/images/%2E%2E%2Fimages.csv.gz",
                                  "/v1/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/v1/images/%2Fetc%2Fpasswd",
                                  "/v1/images/../../images.csv.gz", "/console/../http.py",
                                  "/console/..%2Fhttp.py"])
def test_traversal_is_refused(served, path):
    status, body, _ = http(served, path)
    assert status == 404
    assert b"root:" not in body and b"import" not in body


def test_attributes_offer_the_versions_values(served, info):
    status, body, _ = http(served, "/v1/attributes")
    answer = json.loads(body)
    assert status == 200 and answer["version"] == info.version
    assert sorted([*answer["attributes"], *answer["numbers"]]) == sorted(info.attribute_keys)
    types = {entry["value"]: entry["products"] for entry in answer["attributes"]["product_type"]}
    assert types["SHOES"] >= 1 and sum(types.values()) <= info.product_count
    # A number key offers its bounds, as GetInfo gives them.
    weight = next(a for a in info.attributes if a.key == "item_weight_pounds")
    assert answer["numbers"]["item_weight_pounds"] == {"min": weight.min, "max": weight.max,
                                                      "products": weight.product_count}
    assert weight.kind == "number" and 0 < weight.min < weight.max


def test_openapi_lists_every_route_and_resolves(served, sample):
    status, body, _ = http(served, "/openapi.json")
    document = json.loads(body)
    assert status == 200 and document["openapi"].startswith("3.0")
    validate_openapi(document)
    # What the routes answer is what the document says they answer.
    product_id, _, _ = sample
    for route, body, schema in [("/v1/info", None, "GetInfoResponse"),
                                ("/v1/similar", {"productId": product_id, "k": 3, "groupSize": 2,
                                                 "withAttributes": True}, "FindSimilarResponse"),
                                ("/v1/similar", {"productId": "no-such-product"}, "Error")]:
        _, answer, _ = http(served, route, None if body is None else json.dumps(body).encode())
        OAS30Validator({"$ref": f"#/components/schemas/{schema}", "components": document["components"]}).validate(
            json.loads(answer))
    assert set(document["paths"]) == {"/v1/embed", "/v1/similar", "/v1/recommend", "/v1/info", "/healthz",
                                      "/readyz", "/v1/attributes", "/v1/images/{image_id}", "/openapi.json", "/",
                                      "/v1/products/{product_id}/images", "/console/{file}"}
    # Every console file the document names is served.
    for name in document["paths"]["/console/{file}"]["get"]["parameters"][0]["schema"]["enum"]:
        assert http(served, f"/console/{name}")[0] == 200, name
    schemas = document["components"]["schemas"]
    assert set(pb.DESCRIPTOR.message_types_by_name) <= set(schemas)
    # Every field of every message, by its JSON name; every reference resolves.
    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        assert set(schemas[name]["properties"]) == {field.json_name for field in message.fields}
    assert schemas["FindSimilarRequest"]["properties"]["image"]["format"] == "byte"
    assert schemas["GetInfoResponse"]["properties"]["productCount"]["type"] == "string"
    refs = []

    def walk(node):
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            assert verb in ("get", "post") and operation["responses"] and operation["operationId"], path
