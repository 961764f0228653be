"""FindSimilar over products, in-process over real gRPC with the fake model: queries, grouping, exclusion."""

import grpc
import numpy as np
import pytest

from lookalike.v1 import lookalike_pb2 as pb
from server.core import CoreConfig, SimilarityCore
from server.search import SearchConfig
from tests.server.fakes import close_in_process, fake_version, serve_in_process

# 40 images, 20 products: product p owns images p (main) and p + 20.
GROUPS = [[p, p + 20] for p in range(20)]


@pytest.fixture(params=[10_000, 0], ids=["exact", "annoy"])
async def products(tmp_path, request):
    stub, images, metrics, parts = await serve_in_process(tmp_path, groups=GROUPS,
                                                config=SearchConfig(exact_max_rows=request.param))
    yield stub, images, metrics
    await close_in_process(parts)


def _products(response):
    return [m.product_id for m in response.matches]


async def test_results_are_distinct_products_with_their_best_image(products):
    stub, images, _ = products
    response = await stub.FindSimilar(pb.FindSimilarRequest(image=images[5], k=8))
    ids = _products(response)
    assert len(ids) == len(set(ids)) == 8 and ids[0] == "prod-005"
    best = response.matches[0]
    assert best.image_id == best.item_id == "item-005" and best.distance < 1e-3 and best.path == "aa/item-005.png"
    assert [m.score for m in response.matches] == sorted((m.score for m in response.matches), reverse=True)


@pytest.mark.parametrize("query", ["image", "image_id", "item_id", "vector", "product_id"])
async def test_exclude_query_leaves_out_the_whole_product_for_every_query_kind(products, query):
    stub, images, _ = products
    vector = (await stub.Embed(pb.EmbedRequest(images=[images[25]]))).vectors[0]
    request = {"image": pb.FindSimilarRequest(image=images[25]),
               "image_id": pb.FindSimilarRequest(image_id="item-025"),
               "item_id": pb.FindSimilarRequest(item_id="item-025"),
               "vector": pb.FindSimilarRequest(vector=vector),
               "product_id": pb.FindSimilarRequest(product_id="prod-005")}[query]
    request.k = 19
    unset = await stub.FindSimilar(request)
    request.exclude_query = False
    kept = await stub.FindSimilar(request)
    assert _products(kept)[0] == "prod-005" and len(kept.matches) == 19
    request.exclude_query = True
    excluded = await stub.FindSimilar(request)
    assert "prod-005" not in _products(excluded) and len(excluded.matches) == 19
    assert {m.image_id for m in excluded.matches}.isdisjoint({"item-005", "item-025"})
    # Unset, the server decides: the own product is left out of an id query and kept for a photo or vector.
    assert _products(unset) == _products(excluded if query.endswith("_id") else kept)


async def test_group_size_lists_each_products_images_best_first(products):
    stub, images, _ = products
    response = await stub.FindSimilar(pb.FindSimilarRequest(image=images[25], k=3, group_size=5))
    first = response.matches[0]
    assert [i.image_id for i in first.images] == ["item-025", "item-005"]
    assert [i.role for i in first.images] == ["other", "main"]
    assert first.images[0].distance <= first.images[1].distance
    assert first.image_id == first.images[0].image_id
    plain = await stub.FindSimilar(pb.FindSimilarRequest(image=images[25], k=3))
    assert all(len(m.images) == 0 for m in plain.matches)


async def test_a_product_query_uses_all_of_its_images(products):
    stub, _, _ = products
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-007", k=3, group_size=2,
                                                            exclude_query=False))
    assert response.matches[0].product_id == "prod-007"
    # Both of its images are near the mean of the two: neither is at distance 0.
    assert {i.image_id for i in response.matches[0].images} == {"item-007", "item-027"}


async def test_unknown_ids_are_not_found_and_bad_options_invalid(products):
    stub, _, _ = products
    for request in (pb.FindSimilarRequest(product_id="prod-999"), pb.FindSimilarRequest(image_id="nope")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FindSimilar(request)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-001", group_size=101))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "group_size" in info.value.details()


async def test_the_plan_chosen_is_counted(products):
    stub, _, metrics = products
    await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-001", k=3))
    counted = {plan: metrics.plans.labels(plan)._value.get() for plan in ("exact", "annoy", "annoy_then_exact")}
    assert sum(counted.values()) == 1


async def test_get_info_reports_products_and_images(products):
    stub, _, _ = products
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.product_count == 20 and info.image_count == info.item_count == 40


async def test_a_version_built_before_products_answers_with_images(tmp_path):
    stub, images, _, parts = await serve_in_process(tmp_path, has_products=False)
    try:
        response = await stub.FindSimilar(pb.FindSimilarRequest(item_id="item-003", k=4, exclude_query=True))
        assert len(response.matches) == 4 and all(m.product_id == "" for m in response.matches)
        assert "item-003" not in [m.item_id for m in response.matches]
        assert all(m.item_id == m.image_id for m in response.matches)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FindSimilar(pb.FindSimilarRequest(product_id="item-003"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "before products" in info.value.details()
        assert (await stub.GetInfo(pb.GetInfoRequest())).product_count == 0
    finally:
        await close_in_process(parts)


async def test_attributes_come_with_matches_when_asked(tmp_path):
    colours = ["Black" if p % 2 else None for p in range(20)]
    version, _ = fake_version(tmp_path, groups=GROUPS,
                              attributes={"color": colours, "brand": [f"B{p}" for p in range(20)]})
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000))
    try:
        from server.core import Query, SearchOptions

        matches = (await core.find_similar(Query(product_id="prod-003"),
                                           SearchOptions(k=2, exclude_query=False, with_attributes=True))).results
        assert matches[0].attributes == {"color": "Black", "brand": "B3"}
        plain = (await core.find_similar(Query(product_id="prod-003"), SearchOptions(k=2, exclude_query=False))).results
        assert plain[0].attributes == {}
        no_colour = (await core.find_similar(Query(product_id="prod-004"),
                                             SearchOptions(k=1, exclude_query=False, with_attributes=True))).results
        assert no_colour[0].attributes == {"brand": "B4"}
        assert np.isfinite(matches[0].score)
    finally:
        await core.close()
