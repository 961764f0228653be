"""Hidden products leave every result at once, still work as queries, and are reported."""

import pytest

from lookalike.availability import Availability
from lookalike.v1 import lookalike_pb2 as pb
from server.search import SearchConfig
from tests.server.fakes import close_in_process, serve_in_process

GROUPS = [[p, p + 20] for p in range(20)]


@pytest.fixture(params=[10_000, 0], ids=["exact", "annoy"])
async def served(tmp_path, request):
    stub, images, metrics, parts = await serve_in_process(tmp_path, groups=GROUPS,
                                                          config=SearchConfig(exact_max_rows=request.param))
    yield stub, images, parts[2]
    await close_in_process(parts)


def _products(response):
    return [m.product_id for m in response.matches]


async def test_hidden_products_leave_every_kind_of_result(served):
    stub, images, core = served
    before = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=5, exclude_query=True))
    hidden = _products(before)[:2]
    core.set_availability(Availability(3, {p: {"reason": "out_of_stock"} for p in [*hidden, "not-in-version"]}))
    requests = [pb.FindSimilarRequest(product_id="prod-004", k=5, exclude_query=True),
                pb.FindSimilarRequest(image=images[4], k=5, exclude_query=True),
                pb.FindSimilarRequest(image_id="item-024", k=5, exclude_query=True)]
    for request in requests:
        response = await stub.FindSimilar(request)
        assert set(hidden).isdisjoint(_products(response)) and len(response.matches) == 5
        assert response.availability_version == 3
    after = await stub.FindSimilar(requests[0])
    assert _products(after)[:3] == _products(before)[2:5]
    recommended = await stub.Recommend(pb.RecommendRequest(positive=[pb.Example(product_id="prod-004")], k=5))
    assert set(hidden).isdisjoint(_products(recommended)) and recommended.availability_version == 3
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.hidden_product_count == 2 and info.availability_version == 3


async def test_a_hidden_product_still_works_as_a_query_and_shows_again(served):
    stub, _, core = served
    core.set_availability(Availability(1, {"prod-004": {}}))
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=3, exclude_query=False))
    assert "prod-004" not in _products(response) and len(response.matches) == 3
    recommended = await stub.Recommend(pb.RecommendRequest(positive=[pb.Example(product_id="prod-004")], k=3))
    assert len(recommended.matches) == 3
    core.set_availability(Availability(2, {}))
    again = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=3, exclude_query=False))
    assert _products(again)[0] == "prod-004" and again.availability_version == 2


async def test_hiding_everything_answers_with_no_matches(served):
    stub, _, core = served
    core.set_availability(Availability(1, {f"prod-{p:03d}": {} for p in range(20)}))
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-001", k=3))
    assert list(response.matches) == []
    assert (await stub.GetInfo(pb.GetInfoRequest())).hidden_product_count == 20


async def test_a_rollback_keeps_the_served_versions_hidden_mask(tmp_path):
    """CURRENT back to a version still retiring (A, then B, then A again while a call still holds the first A): the
    first A's retirement dropped the masks of its name, the served A's included, so the next request worked the mask
    out again on the event loop (44 ms for 20,000 hidden products of 147,702)."""
    import asyncio

    from server.core import CoreConfig, Query, SearchOptions, SimilarityCore
    from tests.server.fakes import fake_version

    first, _ = fake_version(tmp_path, name="fake-a")
    core = SimilarityCore(first, CoreConfig(max_pixels=1_000_000, result_cache_size=0))
    try:
        core.set_availability(Availability(1, {"prod-003": {}}))
        runtime = core._versions.current
        runtime.enter()  # a call still running on the first A
        await core.swap(fake_version(tmp_path, name="fake-b")[0])
        again, _ = fake_version(tmp_path, name="fake-a")
        await core.prepare(again)
        await core.swap(again)
        runtime.leave()
        for _ in range(500):
            if core.loaded_versions() == ["fake-a"] and not core._versions._retiring:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert core.loaded_versions() == ["fake-a"]
        assert "fake-a" in core.hidden._masks, "the served version's mask was dropped by its namesake's retirement"
        mask = core.hidden.mask(again)
        assert mask is not None and mask[3] and mask.sum() == 1
        answer = await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=39))
        assert "prod-003" not in {r.product_id for r in answer.results}
    finally:
        await core.close()
