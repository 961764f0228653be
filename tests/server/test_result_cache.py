"""FindSimilar by id answers are cached per (version, availability, request): repeated questions skip the
search, and a hide or another request never gets a stale answer."""

from lookalike.availability import Availability
from lookalike.v1 import lookalike_pb2 as pb
from tests.server.fakes import close_in_process, serve_in_process

GROUPS = [[p, p + 20] for p in range(20)]


def _lookups(metrics, result: str) -> float:
    return metrics.registry.get_sample_value("lookalike_result_cache_total", {"result": result}) or 0.0


def _products(response):
    return [m.product_id for m in response.matches]


async def test_repeated_questions_are_answered_from_the_cache_and_never_stale(tmp_path):
    stub, _, metrics, parts = await serve_in_process(tmp_path, groups=GROUPS)
    core = parts[2]
    try:
        request = pb.FindSimilarRequest(product_id="prod-004", k=5, exclude_query=True)
        first = await stub.FindSimilar(request)
        again = await stub.FindSimilar(request)
        assert _products(again) == _products(first) and len(first.matches) == 5
        assert [m.score for m in again.matches] == [m.score for m in first.matches]
        assert (_lookups(metrics, "miss"), _lookups(metrics, "hit")) == (1, 1)
        # Another k, another query kind or a filter is another question.
        await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=3, exclude_query=True))
        await stub.FindSimilar(pb.FindSimilarRequest(image_id="item-004", k=5, exclude_query=True))
        excluded = pb.FindSimilarRequest(product_id="prod-004", k=5, exclude_query=True,
                                         filter=pb.Filter(exclude_product_ids=[first.matches[0].product_id]))
        assert first.matches[0].product_id not in _products(await stub.FindSimilar(excluded))
        assert (_lookups(metrics, "miss"), _lookups(metrics, "hit")) == (4, 1)
        # What it holds is exported as the cache counts it (the soak reads it beside the server's RSS).
        held = metrics.registry.get_sample_value("lookalike_result_cache_bytes")
        assert metrics.registry.get_sample_value("lookalike_result_cache_entries") == len(core._results) == 4
        assert held == core._results.bytes > 0
        # A hide is a new availability version: the cached answer is not reused.
        core.set_availability(Availability(1, {first.matches[0].product_id: {}}))
        after = await stub.FindSimilar(request)
        assert after.availability_version == 1 and _products(after)[:4] == _products(first)[1:]
        assert first.matches[0].product_id not in _products(after)
        assert _lookups(metrics, "miss") == 5
    finally:
        await close_in_process(parts)
