"""Filters in FindSimilar and the Recommend RPC, in-process over real gRPC with the fake model."""

import grpc
import numpy as np
import pytest

from lookalike.v1 import lookalike_pb2 as pb
from server.search import SearchConfig
from tests.server.fakes import close_in_process, serve_in_process

# 40 images, 20 products: product p owns images p (main) and p + 20.
GROUPS = [[p, p + 20] for p in range(20)]
COLOURS = ["Black", "Blue", "Red", None] * 5  # prod-003, prod-007, ... have no colour
BRANDS = [f"B{p % 3}" for p in range(20)]


@pytest.fixture(params=[10_000, 0], ids=["exact", "annoy"])
async def served(tmp_path, request):
    stub, images, metrics, parts = await serve_in_process(
        tmp_path, groups=GROUPS, config=SearchConfig(exact_max_rows=request.param),
        attributes={"color": COLOURS, "brand": BRANDS})
    yield stub, images, parts[2].version
    await close_in_process(parts)


def _products(response):
    return [m.product_id for m in response.matches]


def _product(p: int) -> str:
    return f"prod-{p:03d}"


def _reference(version, score, k, excluded=(), allowed=lambda p: True):
    """Exact ranking of products by their best image under `score` (a numpy function of row vectors)."""
    catalogue, vectors = version.catalogue, np.asarray(version.index.vectors)
    best = {}
    for p in range(catalogue.product_count):
        if p in excluded or not allowed(p):
            continue
        best[p] = float(score(vectors[catalogue.rows_of_product(p)]).max())
    return [_product(p) for p in sorted(best, key=lambda p: -best[p])[:k]]


def _unit(v):
    return v / np.linalg.norm(v)


def _product_vector(version, p):
    """A product example is the normalised mean of its images (the server's product_query "mean")."""
    vectors = np.asarray(version.index.vectors)[version.catalogue.rows_of_product(p)]
    return _unit(vectors.mean(axis=0))


async def test_filters_keep_k_products_that_pass_every_clause(served):
    stub, _, version = served
    request = pb.FindSimilarRequest(product_id="prod-004", k=5, exclude_query=True, group_size=2, filter=pb.Filter(
        clauses=[pb.Clause(key="color", any_of=["Black", "Blue"]), pb.Clause(key="brand", none_of=["B2"])],
        exclude_product_ids=["prod-001", "not-in-catalogue"]))
    response = await stub.FindSimilar(request)
    passing = {p for p in range(20) if COLOURS[p] in ("Black", "Blue") and BRANDS[p] != "B2"} - {1, 4}
    query = _product_vector(version, 4)
    assert _products(response) == _reference(version, lambda v: v @ query, 5, allowed=lambda p: p in passing)
    assert len(response.matches) == 5 and all(len(m.images) == 2 for m in response.matches)


async def test_none_of_passes_products_without_the_attribute(served):
    stub, _, _ = served
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-000", k=20, filter=pb.Filter(
        clauses=[pb.Clause(key="color", none_of=["Black", "Blue", "Red"])])))
    assert sorted(_products(response)) == [_product(p) for p in range(20) if COLOURS[p] is None]


async def test_a_filter_nothing_matches_is_ok_with_no_matches(served):
    stub, _, _ = served
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-000", filter=pb.Filter(
        clauses=[pb.Clause(key="color", any_of=["Green"])])))
    assert list(response.matches) == [] and response.index_version == "fake-v1"


@pytest.mark.parametrize(("clause", "message"), [
    (pb.Clause(key="colour", any_of=["Black"]), "unknown attribute key; the keys are brand (string), color (string)"),
    (pb.Clause(key="color"), "is empty"),
    (pb.Clause(key="color", any_of=["Black"], none_of=["Red"]), "sets both any_of and none_of"),
])
async def test_filter_mistakes_are_invalid_argument(served, clause, message):
    stub, _, _ = served
    for request in (pb.FindSimilarRequest(product_id="prod-000", filter=pb.Filter(clauses=[clause])),
                    pb.RecommendRequest(positive=[pb.Example(product_id="prod-000")],
                                        filter=pb.Filter(clauses=[clause]))):
        method = stub.FindSimilar if isinstance(request, pb.FindSimilarRequest) else stub.Recommend
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()


async def test_score_threshold_leaves_out_weaker_matches(served):
    stub, _, _ = served
    everything = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-002", k=10))
    threshold = (everything.matches[2].score + everything.matches[3].score) / 2
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-002", k=10, score_threshold=threshold))
    assert _products(response) == _products(everything)[:3]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-002", score_threshold=1.5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "score_threshold" in info.value.details()


async def test_average_vector_equals_its_numpy_reference_and_never_returns_examples(served):
    stub, _, version = served
    response = await stub.Recommend(pb.RecommendRequest(
        positive=[pb.Example(product_id="prod-001"), pb.Example(product_id="prod-002")],
        negative=[pb.Example(product_id="prod-010")], k=6))
    positive = (_product_vector(version, 1) + _product_vector(version, 2)) / 2
    query = _unit(2 * positive - _product_vector(version, 10))
    assert _products(response) == _reference(version, lambda v: v @ query, 6, excluded={1, 2, 10})
    scores = [m.score for m in response.matches]
    assert scores == sorted(scores, reverse=True)


async def test_best_score_equals_its_numpy_reference(served):
    stub, _, version = served
    response = await stub.Recommend(pb.RecommendRequest(
        positive=[pb.Example(product_id="prod-001"), pb.Example(image_id="item-025")],
        negative=[pb.Example(product_id="prod-010"), pb.Example(product_id="prod-011")],
        strategy=pb.RECOMMEND_STRATEGY_BEST_SCORE, k=6))
    vectors = np.asarray(version.index.vectors)
    positives = np.stack([_product_vector(version, 1), vectors[version.catalogue.rows_of_image("item-025")[0]]])
    negatives = np.stack([_product_vector(version, 10), _product_vector(version, 11)])

    def best_score(rows):
        best_positive, best_negative = (rows @ positives.T).max(1), (rows @ negatives.T).max(1)
        return np.where(best_positive > best_negative, best_positive, -best_negative ** 2)

    assert _products(response) == _reference(version, best_score, 6, excluded={1, 5, 10, 11})


async def test_best_score_accepts_negatives_alone(served):
    stub, _, version = served
    response = await stub.Recommend(pb.RecommendRequest(negative=[pb.Example(product_id="prod-003")],
                                                        strategy=pb.RECOMMEND_STRATEGY_BEST_SCORE, k=4))
    negative = _product_vector(version, 3)
    assert _products(response) == _reference(version, lambda v: -(v @ negative) ** 2, 4, excluded={3})


SUM_POSITIVES = [pb.Example(product_id="prod-001"), pb.Example(image_id="item-025"), pb.Example(product_id="prod-007")]
SUM_NEGATIVES = [pb.Example(product_id="prod-010"), pb.Example(product_id="prod-011")]


async def test_sum_scores_equals_its_numpy_reference(served):
    stub, _, version = served
    response = await stub.Recommend(pb.RecommendRequest(positive=SUM_POSITIVES, negative=SUM_NEGATIVES,
                                                        strategy=pb.RECOMMEND_STRATEGY_SUM_SCORES, k=6))
    vectors = np.asarray(version.index.vectors)
    positives = np.stack([_product_vector(version, 1), vectors[version.catalogue.rows_of_image("item-025")[0]],
                          _product_vector(version, 7)])
    negatives = np.stack([_product_vector(version, 10), _product_vector(version, 11)])

    def sum_scores(rows):
        return (rows @ positives.T).sum(1) - (rows @ negatives.T).sum(1)

    assert _products(response) == _reference(version, sum_scores, 6, excluded={1, 5, 7, 10, 11})
    # The score is the strategy's, beyond 1 when the positives agree; a threshold may be up to P + N.
    best = vectors[version.catalogue.rows_of_product(int(response.matches[0].product_id[-3:]))]
    assert response.matches[0].score == pytest.approx(float(sum_scores(best).max()), abs=1e-5)
    assert response.matches[0].score > 1
    threshold = (response.matches[1].score + response.matches[2].score) / 2
    above = await stub.Recommend(pb.RecommendRequest(positive=SUM_POSITIVES, negative=SUM_NEGATIVES, k=6,
                                                     strategy=pb.RECOMMEND_STRATEGY_SUM_SCORES,
                                                     score_threshold=threshold))
    assert _products(above) == _products(response)[:2]


async def test_sum_scores_accepts_negatives_alone_and_bounds_its_threshold(served):
    stub, _, version = served
    negatives = [pb.Example(product_id="prod-003"), pb.Example(product_id="prod-004")]
    response = await stub.Recommend(pb.RecommendRequest(negative=negatives, strategy=pb.RECOMMEND_STRATEGY_SUM_SCORES,
                                                        k=4))
    both = np.stack([_product_vector(version, 3), _product_vector(version, 4)])
    assert _products(response) == _reference(version, lambda v: -(v @ both.T).sum(1), 4, excluded={3, 4})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Recommend(pb.RecommendRequest(negative=negatives, strategy=pb.RECOMMEND_STRATEGY_SUM_SCORES,
                                                 score_threshold=2.5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "score_threshold must be in -2..2, not 2.5" in info.value.details()


async def test_image_and_vector_examples_and_filters(served):
    stub, images, version = served
    embedder = version.embedder
    embedder.batches.clear()
    vector = (await stub.Embed(pb.EmbedRequest(images=[images[6]]))).vectors[0]
    response = await stub.Recommend(pb.RecommendRequest(
        positive=[pb.Example(image=images[5]), pb.Example(image=images[8]), pb.Example(vector=vector)], k=4,
        filter=pb.Filter(clauses=[pb.Clause(key="brand", any_of=["B0", "B1"])]), with_attributes=True))
    assert embedder.batches[-1] == 2  # both image examples went to the model in one micro-batch
    # The examples' own products (found by identical images and vectors) never come back.
    assert {"prod-005", "prod-006", "prod-008"}.isdisjoint(_products(response)) and len(response.matches) == 4
    assert all(m.attributes["brand"] in ("B0", "B1") for m in response.matches)


async def test_missing_examples_are_not_found_by_name_unless_ignored(served):
    stub, _, version = served
    request = pb.RecommendRequest(positive=[pb.Example(product_id="prod-001"), pb.Example(product_id="gone"),
                                            pb.Example(image_id="no-such-image")], k=3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Recommend(request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "product 'gone'" in info.value.details() and "image 'no-such-image'" in info.value.details()
    request.ignore_missing = True
    response = await stub.Recommend(request)
    assert list(response.missing_product_ids) == ["gone"] and list(response.missing_image_ids) == ["no-such-image"]
    query = _product_vector(version, 1)
    assert _products(response) == _reference(version, lambda v: v @ query, 3, excluded={1})
    request = pb.RecommendRequest(positive=[pb.Example(product_id="gone")], ignore_missing=True)
    empty = await stub.Recommend(request)
    assert list(empty.matches) == [] and list(empty.missing_product_ids) == ["gone"]


@pytest.mark.parametrize(("request_", "message"), [
    (pb.RecommendRequest(), "no examples"),
    (pb.RecommendRequest(negative=[pb.Example(product_id="prod-001")]), "average_vector needs at least one positive"),
    (pb.RecommendRequest(positive=[pb.Example()]), "example 0: set exactly one"),
    (pb.RecommendRequest(positive=[pb.Example(product_id="prod-001")], strategy=7), "strategy must be one of"),
    (pb.RecommendRequest(positive=[pb.Example(product_id="prod-001")] * 65), "65 examples; at most 64"),
    (pb.RecommendRequest(positive=[pb.Example(vector=pb.Vector(values=[1.0]))]), "vector has 1 components"),
    (pb.RecommendRequest(positive=[pb.Example(image=b"not an image")]), "image"),
    (pb.RecommendRequest(positive=[pb.Example(product_id="prod-001")], negative=[pb.Example(product_id="prod-001")],
                         strategy=pb.RECOMMEND_STRATEGY_AVERAGE_VECTOR), None),
])
async def test_recommend_mistakes_are_invalid_argument(served, request_, message):
    stub, _, _ = served
    if message is None:  # the same product as positive and negative is allowed: it only leaves it out
        response = await stub.Recommend(request_)
        assert "prod-001" not in _products(response)
        return
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Recommend(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
