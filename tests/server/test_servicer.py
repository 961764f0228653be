"""The servicer in-process over real gRPC on 127.0.0.1 with a deterministic fake model: every status code."""

import asyncio
import logging
import time

import grpc
import numpy as np
import pytest

from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from server.batcher import BatcherConfig
from server.core import CoreConfig, SimilarityCore
from server.metrics import ServerMetrics
from server.servicer import ImageSimilarityServicer
from tests.helpers import png_bytes
from tests.server.fakes import DIMENSION, fake_version


class Harness:
    def __init__(self, core, metrics, server, stub):
        self.core, self.metrics, self.server, self.stub = core, metrics, server, stub


async def _start(tmp_path, delay_s=0.0, config=None):
    version, images = fake_version(tmp_path, delay_s=delay_s)
    metrics = ServerMetrics()
    core = SimilarityCore(version, config or CoreConfig(max_pixels=1_000_000), metrics)
    server = grpc.aio.server()
    pb_grpc.add_ImageSimilarityServicer_to_server(ImageSimilarityServicer(core, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Harness(core, metrics, server, pb_grpc.ImageSimilarityStub(channel)), images, channel


@pytest.fixture
async def harness(tmp_path):
    h, images, channel = await _start(tmp_path)
    yield h, images
    await channel.close()
    await h.server.stop(0)
    await h.core.close()


async def _until(condition, timeout_s: float = 30.0) -> None:
    """Waits (bounded) for something the test can observe, instead of for a guessed time."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def test_embed_returns_unit_vectors_in_order_and_the_version(harness):
    h, images = harness
    response = await h.stub.Embed(pb.EmbedRequest(images=images[:3]))
    vectors = np.array([v.values for v in response.vectors])
    assert vectors.shape == (3, DIMENSION) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    assert response.model_version == "fake-v1"
    single = await h.stub.Embed(pb.EmbedRequest(images=[images[2]]))
    assert np.allclose(single.vectors[0].values, vectors[2], atol=1e-6)


async def test_find_similar_by_image_item_and_vector(harness):
    h, images = harness
    by_image = await h.stub.FindSimilar(pb.FindSimilarRequest(image=images[5], k=3))
    assert by_image.matches[0].item_id == "item-005" and by_image.matches[0].distance < 1e-3
    assert by_image.matches[0].score == pytest.approx(1.0, abs=1e-4)
    assert by_image.index_version == "fake-v1"
    excluded = await h.stub.FindSimilar(pb.FindSimilarRequest(image=images[5], k=3, exclude_query=True))
    assert [m.item_id for m in excluded.matches] == [m.item_id for m in by_image.matches][1:] + [
        excluded.matches[-1].item_id]
    by_item = await h.stub.FindSimilar(pb.FindSimilarRequest(item_id="item-005", k=4, exclude_query=True))
    assert "item-005" not in [m.item_id for m in by_item.matches] and len(by_item.matches) == 4
    vector = np.array((await h.stub.Embed(pb.EmbedRequest(images=[images[7]]))).vectors[0].values) * 3
    by_vector = await h.stub.FindSimilar(pb.FindSimilarRequest(vector=pb.Vector(values=vector), k=2))
    assert by_vector.matches[0].item_id == "item-007"
    default_k = await h.stub.FindSimilar(pb.FindSimilarRequest(item_id="item-001"))
    assert len(default_k.matches) == 10


@pytest.mark.parametrize("scale", [1e37, 1e-25], ids=["norm-overflows-float32", "norm-underflows-float32"])
async def test_a_vector_is_a_direction_whatever_its_float32_length(harness, scale):
    """Finite, non-zero components whose float32 sum of squares overflows (or underflows to 0) are still a
    direction: the answer is the unit vector's (they were refused as "zero length")."""
    h, images = harness
    vector = np.array((await h.stub.Embed(pb.EmbedRequest(images=[images[7]]))).vectors[0].values, np.float32)
    scaled = (vector * np.float32(scale)).astype(np.float32)
    assert np.isfinite(scaled).all() and scaled.any()
    plain = await h.stub.FindSimilar(pb.FindSimilarRequest(vector=pb.Vector(values=vector.tolist()), k=3))
    answer = await h.stub.FindSimilar(pb.FindSimilarRequest(vector=pb.Vector(values=scaled.tolist()), k=3))
    assert [m.item_id for m in answer.matches] == [m.item_id for m in plain.matches]
    assert answer.matches[0].item_id == "item-007"
    assert [m.score for m in answer.matches] == pytest.approx([m.score for m in plain.matches], abs=1e-6)


@pytest.mark.parametrize("request_", [
    pb.EmbedRequest(images=[b"not an image"]),
    pb.EmbedRequest(images=[]),
    pb.EmbedRequest(images=[png_bytes(np.zeros((1100, 1000, 3), np.uint8))]),  # over max_pixels
])
async def test_embed_invalid_argument(harness, request_):
    h, _ = harness
    assert await _code(h.stub.Embed(request_)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("request_", [
    pb.FindSimilarRequest(item_id="item-001", k=1001),
    pb.FindSimilarRequest(vector=pb.Vector(values=[1.0, 2.0])),
    pb.FindSimilarRequest(vector=pb.Vector(values=[float("nan")] * DIMENSION)),
    pb.FindSimilarRequest(vector=pb.Vector(values=[float("inf")] + [0.0] * (DIMENSION - 1))),
    pb.FindSimilarRequest(vector=pb.Vector(values=[0.0] * DIMENSION)),
    pb.FindSimilarRequest(image=b"\x89PNG\r\n\x1a\ntruncated"),
    pb.FindSimilarRequest(k=3),
])
async def test_find_similar_invalid_argument(harness, request_):
    h, _ = harness
    assert await _code(h.stub.FindSimilar(request_)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("length", [20_000, 2_000_000])
@pytest.mark.parametrize("char", ["x", "ü"])
async def test_an_unknown_id_of_any_length_is_not_found_in_a_bounded_message(harness, length, char):
    """The refusal names the id, but not all of it: a status message past gRPC's metadata limit (8 KiB) reached the
    client as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of NOT_FOUND."""
    from server.errors import MAX_DETAIL_CHARS

    h, _ = harness
    for request in (pb.FindSimilarRequest(product_id=char * length), pb.FindSimilarRequest(image_id=char * length)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await h.stub.FindSimilar(request)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
        details = refused.value.details()
        assert details.startswith(("product '" + char * 20, "image '" + char * 20))
        assert details.endswith("is not in index version fake-v1") and len(details) <= MAX_DETAIL_CHARS
        kind = "product" if request.product_id else "image"
        assert f"[{len(kind) + length + 35:,} characters in all]" in details  # the message's whole length



async def test_unknown_item_is_not_found(harness):
    h, _ = harness
    assert await _code(h.stub.FindSimilar(pb.FindSimilarRequest(item_id="nope"))) == grpc.StatusCode.NOT_FOUND


async def test_draining_is_unavailable(harness):
    h, images = harness
    await h.core.drain(0.1)
    assert await _code(h.stub.Embed(pb.EmbedRequest(images=images[:1]))) == grpc.StatusCode.UNAVAILABLE


async def test_a_replaced_workers_drain_serves_what_still_arrives(harness):
    """A worker replaced by a fresh one drains without refusing (its listeners are closed: what still arrives came on
    an open connection, and a refusal would be the only failure of the hand-over)."""
    h, images = harness
    await h.core.drain(0.1, refuse=False)
    assert len((await h.stub.Embed(pb.EmbedRequest(images=images[:1]))).vectors) == 1


async def test_full_queue_is_resource_exhausted_and_admitted_requests_succeed(tmp_path):
    config = CoreConfig(batcher=BatcherConfig(max_batch_size=4, max_wait_ms=0, max_queue=8),
                        max_images_per_request=8)
    h, images, channel = await _start(tmp_path, config=config)
    embedder = h.core.version.embedder
    try:
        # One call on the model, held there: the queue is empty and nothing leaves it until the gate opens.
        embedder.gate.clear()
        first = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(images=images[:4])))
        await _until(lambda: embedder.batches == [4])
        calls = [asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(images=images[i:i + 4])))
                 for i in range(4, 24, 4)]
        # Each call is queued or answered at once, while the model is still held: wait until all five are.
        await _until(lambda: h.core.queue_depth() + 4 * sum(call.done() for call in calls) == 20)
        answered = [call for call in calls if call.done()]
        assert len(answered) >= 3  # at most 8 images queued: at most two of the five fit
        assert {call.exception().code() for call in answered} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        embedder.gate.set()
        admitted = [call for call in calls if call not in answered]
        assert all(result.model_version == "fake-v1" for result in await asyncio.gather(first, *admitted))
        refused = h.metrics.requests.labels("Embed", "RESOURCE_EXHAUSTED")._value.get()
        assert refused == len(answered)
    finally:
        await channel.close()
        await h.server.stop(0)
        await h.core.close()


async def test_a_request_whose_deadline_passes_in_the_queue_is_not_computed(tmp_path):
    config = CoreConfig(batcher=BatcherConfig(max_batch_size=1, max_wait_ms=0, max_queue=16),
                        max_images_per_request=16)
    h, images, channel = await _start(tmp_path, config=config)
    embedder = h.core.version.embedder
    try:
        # The slow request is held on the model until the late one's deadline has passed in the queue.
        embedder.gate.clear()
        slow = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(images=[images[0]]), timeout=30))
        await _until(lambda: embedder.batches == [1])
        # Its deadline passes while it waits in the queue: it must be queued first, whatever the host's load
        # (a request arriving after its deadline is refused before the queue, and never counted there).
        late = asyncio.ensure_future(_code(h.stub.Embed(pb.EmbedRequest(images=[images[1]]), timeout=2.0)))
        await _until(lambda: h.core.queue_depth() == 1 or late.done())
        assert await late == grpc.StatusCode.DEADLINE_EXCEEDED
        assert h.core.queue_depth() == 1, "the late request was refused before it reached the queue"
        # The client's deadline is its own clock's: wait for the server's too, or the model could take the late
        # request an instant before the server sees its deadline pass (and rightly compute it).
        queued = list(h.core._versions.current.batcher._queue)
        await _until(lambda: all(p.future.done() or p.deadline <= time.monotonic() for p in queued))
        embedder.gate.set()
        await slow
        # The batcher takes the late request next and drops it: counted, never computed.
        await _until(lambda: h.metrics.dropped_expired._value.get() == 1)
        assert embedder.batches == [1]  # only the slow request reached the model
    finally:
        await channel.close()
        await h.server.stop(0)
        await h.core.close()


async def test_swap_finishes_in_flight_requests_on_the_old_version_and_a_drain_waits_for_them(tmp_path):
    """SIGTERM soon after a swap: a call still on the old version finishes within the grace period too (the drain
    waited for the served version's calls alone, and stop() then gave this one a second)."""
    h, images, channel = await _start(tmp_path)
    embedder = h.core.version.embedder
    try:
        embedder.gate.clear()
        in_flight = asyncio.ensure_future(h.stub.Embed(pb.EmbedRequest(images=[images[0]])))
        await _until(lambda: embedder.batches == [1])  # on the old version's model, held there
        new_version, _ = fake_version(tmp_path, name="fake-v2")
        swapped = asyncio.ensure_future(h.core.swap(new_version))
        await _until(lambda: h.core.version.name == "fake-v2")  # swapped while the request is on the model
        after = await h.stub.FindSimilar(pb.FindSimilarRequest(item_id="item-001"))
        assert after.index_version == "fake-v2"
        drained = asyncio.ensure_future(h.core.drain(30))
        await asyncio.sleep(0.2)
        assert not drained.done(), "the drain ended with a call in flight on the swapped-out version"
        embedder.gate.set()
        await swapped
        assert (await in_flight).model_version == "fake-v1"
        await asyncio.wait_for(drained, 30)
    finally:
        embedder.gate.set()
        await channel.close()
        await h.server.stop(0)
        await h.core.close()


def test_the_options_of_plain_requests_are_made_once_and_differ_when_a_field_does():
    """Requests without a filter share the SearchOptions of their fields; any field changed gives other options, and
    a filter is never shared."""
    from server.core import SearchOptions
    from server.filters import Filter
    from server.servicer import _options

    plain = _options(pb.FindSimilarRequest(product_id="a", k=10), None)
    assert plain == SearchOptions(k=10) and _options(pb.FindSimilarRequest(product_id="b", k=10), None) is plain
    changed = [pb.FindSimilarRequest(k=11), pb.FindSimilarRequest(k=10, search_k=5),
               pb.FindSimilarRequest(k=10, group_size=2), pb.FindSimilarRequest(k=10, with_attributes=True),
               pb.FindSimilarRequest(k=10, score_threshold=0.0), pb.FindSimilarRequest(k=10, diversity=0.5),
               pb.FindSimilarRequest(k=10, candidates=20)]
    made = [_options(request, None) for request in changed] + [_options(pb.FindSimilarRequest(k=10), False)]
    assert len({id(options) for options in made}) == len(made) and plain not in made
    assert made[4].score_threshold == 0.0 and made[6].candidates == 20 and made[-1].exclude_query is False
    excluded = _options(pb.FindSimilarRequest(k=10, filter=pb.Filter(exclude_product_ids=["x"])), None)
    assert excluded.filter == Filter(exclude_product_ids=("x",)) and excluded != plain


def test_grpcs_error_for_an_answer_it_could_not_send_is_one_info_line_and_a_count(caplog):
    """grpc logs ExecuteBatchError, with a traceback, at ERROR when the servicer answers a call that ended first
    (cancelled, past its deadline): a race with the client, counted and logged in one line; other records pass."""
    from server.metrics import GRPC_CORE_LOGGER, UndeliveredAnswers

    metrics = ServerMetrics()
    core_logger = logging.getLogger(GRPC_CORE_LOGGER)
    undelivered = UndeliveredAnswers(metrics)
    core_logger.addFilter(undelivered)
    try:
        with caplog.at_level(logging.INFO):
            for message in ("ExecuteBatchError raised in core by servicer method [%s]", "Unexpected [%s] raised"):
                try:
                    raise RuntimeError("Failed execute_batch")
                except RuntimeError:
                    core_logger.exception(message, "/lookalike.v1.ImageSimilarity/FindSimilar")
    finally:
        core_logger.removeFilter(undelivered)
    answer, other = caplog.records
    assert (answer.levelname, answer.exc_info) == ("INFO", None)
    assert answer.getMessage().startswith("FindSimilar: the answer was not sent, its call had ended first")
    assert other.levelname == "ERROR" and other.exc_info is not None  # anything else gRPC says is left as it is
    assert metrics.registry.get_sample_value("lookalike_undelivered_answers_total", {"method": "FindSimilar"}) == 1


async def test_a_server_that_fails_to_start_leaves_no_filter_on_grpcs_logger(tmp_path):
    from server.app import LookalikeServer, ServerConfig
    from server.metrics import GRPC_CORE_LOGGER

    server = LookalikeServer(ServerConfig(artifacts=tmp_path, port=0, metrics_port=-1))  # no CURRENT here
    with pytest.raises(Exception, match="CURRENT"):
        await server.start()
    assert server._undelivered not in logging.getLogger(GRPC_CORE_LOGGER).filters
