"""Alpha-query expansion in FindSimilar: against a plain numpy reference (fresh products and filters included),
unset equal to the plain answer, the defaults, every mistake, the Python client and HTTP/JSON."""

import math

import grpc
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from client import AsyncImageSimilarityClient, InvalidArgumentError
from lookalike.v1 import lookalike_pb2 as pb
from server.admission import Admission
from server.core import CoreConfig, Examples, Query, QueryExpansion, SearchOptions, SimilarityCore
from server.errors import InvalidArgument
from server.fresh import DeltaFeed
from server.http import HttpApi
from server.metrics import ServerMetrics
from server.search import SearchConfig
from server.servicer import ImageSimilarityServicer
from tests.server.fakes import close_in_process, fake_version, serve_core, serve_in_process
from tests.server.test_deltas import publish

# 40 images, 20 products: product p owns images p (main) and p + 20 (a view of it).
GROUPS = [[p, p + 20] for p in range(20)]
BRANDS = [f"B{p % 3}" for p in range(20)]


@pytest.fixture(params=[10_000, 0], ids=["exact", "annoy"])
async def served(tmp_path, request):
    stub, images, _, parts = await serve_in_process(tmp_path, groups=GROUPS, attributes={"brand": BRANDS},
                                                    config=SearchConfig(exact_max_rows=request.param))
    yield stub, images, parts[2]
    await close_in_process(parts)


def _catalogue(version) -> dict[str, np.ndarray]:
    """Product id -> its images' vectors."""
    catalogue, vectors = version.catalogue, np.asarray(version.index.vectors)
    return {catalogue.product_ids[p]: vectors[catalogue.rows_of_product(p)] for p in range(catalogue.product_count)}


def _ranking(products: dict[str, np.ndarray], query: np.ndarray) -> list[tuple[str, float, np.ndarray]]:
    """(product, best score, best image's vector), best first."""
    best = []
    for product, vectors in products.items():
        scores = vectors @ query
        best.append((product, float(scores.max()), vectors[int(scores.argmax())]))
    return sorted(best, key=lambda entry: -entry[1])


def reference(products: dict[str, np.ndarray], query: np.ndarray, k: int, alpha: float | None = None,
              results: int = 0) -> tuple[list[str], list[float]]:
    """Radenović et al.'s alpha-QE as it reads: the query plus its first results' best images weighted by
    max(0, score)^alpha, normalised, searched again (results 0: the plain query)."""
    query = query / np.linalg.norm(query)
    if results:
        expanded = query.astype(np.float64).copy()
        for _, score, vector in _ranking(products, query)[:results]:
            if score > 0:
                expanded += score ** alpha * vector
        query = expanded / np.linalg.norm(expanded)
    ranked = _ranking(products, query)[:k]
    return [product for product, _, _ in ranked], [score for _, score, _ in ranked]


def _request(vector: np.ndarray, k: int = 5, **expansion) -> pb.FindSimilarRequest:
    request = pb.FindSimilarRequest(vector=pb.Vector(values=vector.tolist()), k=k)
    if expansion:
        request.query_expansion.SetInParent()
        if "alpha" in expansion:
            request.query_expansion.alpha = expansion["alpha"]
        request.query_expansion.results = expansion.get("results", 0)
    return request


def _query_vector(version, seed: int = 11) -> np.ndarray:
    """A query between a few catalogue images, so that the expansion has something to move."""
    vectors = np.asarray(version.index.vectors)
    rng = np.random.default_rng(seed)
    query = vectors[[3, 8, 27]].T @ rng.uniform(0.2, 1.0, 3) + rng.normal(0, 0.05, vectors.shape[1])
    return (query / np.linalg.norm(query)).astype(np.float32)


def _names(response) -> list[str]:
    return [m.product_id for m in response.matches]


@pytest.mark.parametrize("alpha, results", [(3.0, 5), (0.0, 1), (1.0, 3), (10.0, 50)])
async def test_expansion_equals_the_reference(served, alpha, results):
    stub, _, core = served
    products = _catalogue(core.version)
    for seed in (11, 12, 13):
        query = _query_vector(core.version, seed)
        response = await stub.FindSimilar(_request(query, k=8, alpha=alpha, results=results))
        names, scores = reference(products, query, 8, alpha, results)
        assert _names(response) == names
        assert [m.score for m in response.matches] == pytest.approx(scores, abs=1e-5)


async def test_unset_is_the_plain_answer_and_an_empty_message_the_defaults(served):
    stub, _, core = served
    products, query = _catalogue(core.version), _query_vector(core.version)
    plain = await stub.FindSimilar(_request(query, k=8))
    names, scores = reference(products, query, 8)
    assert _names(plain) == names and [m.score for m in plain.matches] == pytest.approx(scores, abs=1e-5)
    defaults = await stub.FindSimilar(_request(query, k=8, results=0))  # the message set, nothing in it
    config = CoreConfig()
    expected = reference(products, query, 8, config.default_expansion_alpha, config.default_expansion_results)[0]
    assert _names(defaults) == expected
    # The expansion moved the query: the scores are against the expanded one.
    assert [m.score for m in defaults.matches] != pytest.approx([m.score for m in plain.matches], abs=1e-6)


async def test_an_image_query_expands_as_its_vector(served):
    stub, images, core = served
    vector = core.version.embedder.embed(core.version.embedder.preprocess(images[4])[None])[0]
    by_image = pb.FindSimilarRequest(image=images[4], k=6, query_expansion=pb.QueryExpansion(alpha=2, results=4))
    by_vector = _request(vector, k=6, alpha=2, results=4)
    assert _names(await stub.FindSimilar(by_image)) == _names(await stub.FindSimilar(by_vector))


async def test_filters_and_exclusions_apply_to_both_searches(served):
    stub, _, core = served
    query = _query_vector(core.version)
    request = _request(query, k=4, alpha=3, results=5)
    request.filter.clauses.add(key="brand", any_of=["B1"])
    request.filter.exclude_product_ids.append("prod-004")
    response = await stub.FindSimilar(request)
    allowed = {p: v for p, v in _catalogue(core.version).items() if BRANDS[int(p[-3:])] == "B1" and p != "prod-004"}
    assert _names(response) == reference(allowed, query, 4, 3.0, 5)[0]
    # The threshold shapes the answer, not the expansion: the same products, cut at the threshold.
    request.score_threshold = response.matches[2].score - 1e-6
    assert _names(await stub.FindSimilar(request)) == _names(response)[:3]


async def test_the_first_search_includes_fresh_products(tmp_path):
    stub, _, _, parts = await serve_in_process(tmp_path, groups=GROUPS, config=SearchConfig(exact_max_rows=10_000))
    core = parts[2]
    try:
        query = _query_vector(core.version)
        near = np.asarray(core.version.index.vectors[core.version.catalogue.rows_of_image("item-003")[0]])
        added = (query + 0.05 * near) / np.linalg.norm(query + 0.05 * near)
        publish(tmp_path, core.version.name, {"new-001": [("new-img-1", added.astype(np.float32))]})
        fresh, _, error = DeltaFeed(tmp_path, core.version.name, core.version.catalogue,
                                    core.version.index.dimension).update()
        assert error is None and await core.apply_fresh(core.version.name, fresh)
        products = {**_catalogue(core.version), "new-001": added[None, :].astype(np.float32)}
        response = await stub.FindSimilar(_request(query, k=8, alpha=1, results=3))
        names, scores = reference(products, query, 8, 1.0, 3)
        assert "new-001" in reference(products, query, 3)[0]  # among the results averaged in
        assert _names(response) == names and [m.score for m in response.matches] == pytest.approx(scores, abs=1e-5)
    finally:
        await close_in_process(parts)


@pytest.mark.parametrize("expansion, message", [
    (pb.QueryExpansion(alpha=-0.5), "query_expansion.alpha must be in 0..10, not -0.5"),
    (pb.QueryExpansion(alpha=10.5), "query_expansion.alpha must be in 0..10, not 10.5"),
    (pb.QueryExpansion(alpha=math.nan), "query_expansion.alpha must be in 0..10, not nan"),
    (pb.QueryExpansion(results=51), "query_expansion.results must be in 1..50, not 51"),
])
async def test_out_of_range_values_are_invalid(served, expansion, message):
    stub, _, core = served
    request = _request(_query_vector(core.version))
    request.query_expansion.CopyFrom(expansion)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.FindSimilar(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details() == message


@pytest.mark.parametrize("query", [{"image_id": "item-003"}, {"item_id": "item-003"}, {"product_id": "prod-003"}])
async def test_id_queries_refuse_it(served, query):
    stub, _, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.FindSimilar(pb.FindSimilarRequest(**query, query_expansion=pb.QueryExpansion(results=3)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "query_expansion applies to image and vector queries only" in error.value.details()


async def test_the_core_refuses_it_in_recommend_and_resolves_its_defaults(tmp_path):
    version, _ = fake_version(tmp_path, groups=GROUPS)
    core = SimilarityCore(version, CoreConfig(default_expansion_results=7, default_expansion_alpha=2.0))
    try:
        with pytest.raises(InvalidArgument, match="FindSimilar only"):
            await core.recommend(Examples(positive=(Query(product_id="prod-001"),)),
                                 SearchOptions(query_expansion=QueryExpansion()))
        assert core._check_options(SearchOptions(query_expansion=QueryExpansion()))[1].query_expansion == \
            QueryExpansion(2.0, 7)
        with pytest.raises(InvalidArgument, match="results must be in 1..50, not -1"):
            core._check_options(SearchOptions(query_expansion=QueryExpansion(1.0, -1)))
    finally:
        await core.close()
    with pytest.raises(ValueError, match="default_expansion_results"):
        CoreConfig(default_expansion_results=0)
    with pytest.raises(ValueError, match="default_expansion_alpha"):
        CoreConfig(default_expansion_alpha=11)


async def test_the_python_client_sends_it(tmp_path):

    version, images = fake_version(tmp_path, groups=GROUPS, config=SearchConfig(exact_max_rows=10_000))
    core, server, port = await serve_core(version, ServerMetrics())
    client = AsyncImageSimilarityClient(f"127.0.0.1:{port}")
    try:
        products, query = _catalogue(version), _query_vector(version)
        found = await client.find_similar(vector=query, k=6, query_expansion=(2, 4))
        assert [m.product_id for m in found] == reference(products, query, 6, 2.0, 4)[0]
        config = CoreConfig()
        by_default = await client.find_similar(vector=query, k=6, query_expansion=True)
        assert [m.product_id for m in by_default] == reference(
            products, query, 6, config.default_expansion_alpha, config.default_expansion_results)[0]
        plain = await client.find_similar(vector=query, k=6)
        assert [m.product_id for m in plain] == reference(products, query, 6)[0]
        by_image = await client.find_similar(images[4], k=6, query_expansion=(None, 3))
        assert len(by_image) == 6
        with pytest.raises(InvalidArgumentError, match="alpha must be in 0..10"):
            await client.find_similar(vector=query, query_expansion=11)
    finally:
        await client.close()
        await server.stop(0)
        await core.close()


async def test_http_json_carries_it(tmp_path):
    """The canonical JSON mapping: queryExpansion {alpha, results} on /v1/similar, as on gRPC."""
    version, _ = fake_version(tmp_path, groups=GROUPS, config=SearchConfig(exact_max_rows=10_000))
    metrics = ServerMetrics()
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), metrics)
    client = TestClient(TestServer(HttpApi(ImageSimilarityServicer(core, metrics), 1024 * 1024, Admission(2),
                                           lambda: False).app(), host="127.0.0.1"))
    await client.start_server()
    try:
        query = _query_vector(version)
        body = {"vector": {"values": query.tolist()}, "k": 6, "queryExpansion": {"alpha": 2, "results": 4}}
        response = await client.post("/v1/similar", json=body)
        assert response.status == 200
        found = [match["productId"] for match in (await response.json())["matches"]]
        assert found == reference(_catalogue(version), query, 6, 2.0, 4)[0]
        body["queryExpansion"]["results"] = 51
        response = await client.post("/v1/similar", json=body)
        assert response.status == 400 and "results must be in 1..50" in (await response.json())["message"]
    finally:
        await client.close()
        await core.close()


async def test_the_server_flag_bounds_the_results(tmp_path, monkeypatch):
    from server.cli import config_from_args, parse_args

    artifacts = ["--artifacts", str(tmp_path)]
    assert config_from_args(parse_args(artifacts)).core.max_expansion_results == 50
    monkeypatch.setenv("LOOKALIKE_MAX_EXPANSION_RESULTS", "30")
    assert config_from_args(parse_args(artifacts)).core.max_expansion_results == 30
    config = config_from_args(parse_args([*artifacts, "--max-expansion-results", "3"])).core
    assert config.max_expansion_results == 3
    core = SimilarityCore(fake_version(tmp_path, groups=GROUPS)[0], config)
    try:  # the default (5) held to the bound
        assert core._check_options(SearchOptions(query_expansion=QueryExpansion()))[1].query_expansion.results == 3
        with pytest.raises(InvalidArgument, match=r"results must be in 1..3, not 4"):
            core._check_options(SearchOptions(query_expansion=QueryExpansion(results=4)))
    finally:
        await core.close()
