"""What a review found: a version unloaded under a running thread, requests that cost what they like,
availability going back in time, a version mapped before it is leased. Each test failed before its fix."""

import asyncio
import json
import threading
import weakref

import grpc
import numpy as np
import pytest

from lookalike import artifacts
from lookalike.availability import AVAILABILITY_FILE
from lookalike.leases import LEASES_DIR
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from server.admission import Admission, AdmissionInterceptor
from server.app import LookalikeServer, ServerConfig
from server.core import CoreConfig, Query, SearchOptions, SimilarityCore
from server.errors import InvalidArgument, Overloaded
from server.filters import MAX_EXCLUDED_PRODUCTS, Filter
from server.metrics import ServerMetrics
from server.result_cache import ResultCache, answer_bytes
from server.servicer import ImageSimilarityServicer
from tests.server.fakes import fake_version, serve_core

GROUPS = [[p, p + 20] for p in range(20)]


class _GatedIndex:
    """Wraps a version's index: a search blocks until released, and unload records whether one was running."""

    def __init__(self, index) -> None:
        self._index = index
        self.entered = threading.Event()
        self.release = threading.Event()
        self.running = 0
        self.unloaded_while_running = None

    def __getattr__(self, name):
        return getattr(self._index, name)

    def search(self, *args, **kwargs):
        self.running += 1
        self.entered.set()
        try:
            assert self.release.wait(10), "the test never released the search"
            return self._index.search(*args, **kwargs)
        finally:
            self.running -= 1

    def unload(self) -> None:
        self.unloaded_while_running = self.running > 0
        self._index.unload()


async def test_a_cancelled_request_keeps_its_version_loaded_until_its_search_returns(tmp_path):
    version, _ = fake_version(tmp_path, groups=GROUPS)
    gated = _GatedIndex(version.index)
    version.index = gated
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000, result_cache_size=0))
    try:
        request = asyncio.ensure_future(core.find_similar(Query(product_id="prod-003"), SearchOptions(k=3)))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        request.cancel()  # the client went away while Annoy runs in a thread
        with pytest.raises(asyncio.CancelledError):
            await request
        (tmp_path / "other").mkdir()
        other, _ = fake_version(tmp_path / "other", name="fake-v2", groups=GROUPS)
        await core.swap(other)
        await asyncio.sleep(0.05)  # the retirement task runs: it must wait for the thread
        assert gated.unloaded_while_running is None and "fake-v1" in core.loaded_versions()
        gated.release.set()
        for _ in range(200):
            if gated.unloaded_while_running is not None:
                break
            await asyncio.sleep(0.01)
        assert gated.unloaded_while_running is False and core.loaded_versions() == ["fake-v2"]
    finally:
        gated.release.set()
        await core.close()


@pytest.fixture
async def core(tmp_path):
    version, images = fake_version(tmp_path, groups=GROUPS)
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000, max_image_bytes_in_flight=2**20))
    yield core, images
    await core.close()


async def test_search_k_is_bounded_by_a_multiple_of_the_versions_own(core):
    core, _ = core
    limit = core.max_search_k(core.version)
    assert limit == 8 * 1000  # the fake version's manifest says search_k 1000
    await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=3, search_k=limit))
    for search_k in (limit + 1, 2**31 - 1):
        with pytest.raises(InvalidArgument, match=f"search_k must be at most {limit}"):
            await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=3, search_k=search_k))
    with pytest.raises(InvalidArgument, match="search_k must not be negative"):
        await core.find_similar(Query(product_id="prod-001"), SearchOptions(search_k=-1))


async def test_excluded_products_are_bounded_on_every_path(core):
    core, _ = core
    many = Filter(exclude_product_ids=tuple(f"p{i}" for i in range(MAX_EXCLUDED_PRODUCTS + 1)))
    with pytest.raises(InvalidArgument, match=f"at most {MAX_EXCLUDED_PRODUCTS}"):
        await core.find_similar(Query(product_id="prod-001"), SearchOptions(filter=many))
    from server.core import Examples

    with pytest.raises(InvalidArgument, match=f"at most {MAX_EXCLUDED_PRODUCTS}"):
        await core.recommend(Examples(positive=(Query(product_id="prod-001"),)), SearchOptions(filter=many))


async def test_image_bytes_in_flight_are_bounded(core):
    core, images = core
    big = images[0] + b"\0" * (2**20)  # a PNG with trailing bytes: valid, and over the 1 MiB bound
    with pytest.raises(Overloaded, match="max_image_bytes_in_flight"):
        await core.find_similar(Query(image=big))
    assert core._versions.current.admitted_bytes == 0  # refused before anything was admitted
    await core.find_similar(Query(image=images[0]))


def test_the_result_cache_is_bounded_in_bytes_as_well_as_entries(tmp_path):
    version, _ = fake_version(tmp_path, groups=GROUPS)
    from server.engine import QueryEngine

    engine = QueryEngine()
    from lookalike.availability import Availability
    from server.engine import HiddenProducts

    hidden = HiddenProducts(Availability())
    answer = engine.find(version, hidden, Query(product_id="prod-001"),
                         SearchOptions(k=19, group_size=2, with_attributes=True), 19)
    size = answer_bytes(answer)
    assert size > 19 * 300
    cache = ResultCache(max_entries=1000, max_bytes=size * 10 + size // 2)
    for key in range(30):
        assert cache.put(key, answer)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 10 and cache.get(0) is None and cache.get(29) is answer
    assert not ResultCache(1000, size * 5).put("too large for a tenth", answer)
    assert not ResultCache(0, 10**9).enabled


async def test_rpcs_beyond_the_concurrency_bound_are_refused_before_their_message_is_read(tmp_path):
    version, images = fake_version(tmp_path, delay_s=0.5)
    metrics = ServerMetrics()
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), metrics)
    # The process's admission budget, as server/app.py installs it (in place of grpc's maximum_concurrent_rpcs).
    admission = Admission(2)
    server = grpc.aio.server(interceptors=[AdmissionInterceptor(admission)])
    pb_grpc.add_ImageSimilarityServicer_to_server(ImageSimilarityServicer(core, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ImageSimilarityStub(channel)
            calls = [stub.Embed(pb.EmbedRequest(images=[images[i]]), timeout=20) for i in range(6)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results]
            assert codes.count(grpc.StatusCode.OK) >= 2
            assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            for _ in range(500):  # every place given back, once the server's call tasks have ended
                if admission.in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            assert admission.in_flight == 0
    finally:
        await server.stop(0)
        await core.close()


def _write_availability(artifacts, version: int, hidden: list[str]) -> None:
    payload = {"version": version, "updated_at": None, "hidden": {p: {"reason": "out_of_stock"} for p in hidden}}
    (artifacts / AVAILABILITY_FILE).write_text(json.dumps(payload))


async def test_availability_only_goes_forward(tmp_path):
    version, _ = fake_version(tmp_path, groups=GROUPS)
    server = LookalikeServer(ServerConfig(artifacts=tmp_path, metrics_port=-1))
    server.core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000))
    try:
        _write_availability(tmp_path, 5, ["prod-001", "prod-002"])
        assert await server.check_availability() and server.core.hidden.version == 5
        _write_availability(tmp_path, 4, [])  # an older state read late (a racing reader, a restored file)
        assert not await server.check_availability()
        assert server.core.hidden.version == 5 and server.core.hidden.count(version) == 2
        # The watch loop and SIGHUP at once apply the new state once.
        _write_availability(tmp_path, 6, ["prod-003"])
        applied = await asyncio.gather(*(server.check_availability() for _ in range(4)))
        assert applied.count(True) == 1 and server.core.hidden.version == 6
    finally:
        await server.core.close()


async def test_a_version_is_leased_before_it_is_loaded_on_reload(tmp_path):
    from lookalike.artifacts import write_current

    version, _ = fake_version(tmp_path, groups=GROUPS)
    server = LookalikeServer(ServerConfig(artifacts=tmp_path, metrics_port=-1))
    server.core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000))
    leased_during_load = []

    async def load(name):
        lease = next((tmp_path / LEASES_DIR).glob("*.json"))
        leased_during_load.append(json.loads(lease.read_text())["versions"])
        (tmp_path / "v2").mkdir()
        other, _ = fake_version(tmp_path / "v2", name=name, groups=GROUPS)
        return other

    server._load = load
    try:
        write_current(tmp_path, "fake-v2")
        assert await server.reload()
        assert leased_during_load == [["fake-v1", "fake-v2"]]
        assert server.core.version.name == "fake-v2"
        assert np.isfinite(server.core.version.index.vectors).all()
    finally:
        await server.core.close()


@pytest.mark.parametrize("table, column", [("images.parquet", "product_row"), ("products.parquet", "first_row")])
def test_a_version_whose_table_lacks_a_column_is_refused_naming_it(built, tmp_path, table, column):
    import shutil

    import pyarrow.parquet as pq

    from lookalike import artifacts
    from server.catalogue import load_catalogue

    name = artifacts.read_current(built)
    version_dir = tmp_path / name
    shutil.copytree(built / name, version_dir)
    manifest = artifacts.load_manifest(version_dir, verify=False)
    assert load_catalogue(version_dir, manifest)[0].product_count > 0
    pq.write_table(pq.read_table(version_dir / table).drop_columns([column]), version_dir / table)
    with pytest.raises(artifacts.ArtifactError, match=f"{table} has no column '{column}'"):
        load_catalogue(version_dir, manifest)


async def _swap_to_a_second_version(core: SimilarityCore, tmp_path, embedder, retired: list, polls: int = 200) -> None:
    """Swaps `core` to a second fake version (sharing `embedder`, a model, when given) and waits until `retired`
    tells a version was retired (bounded by `polls` x 10 ms)."""
    (tmp_path / "next").mkdir()
    following, _ = fake_version(tmp_path / "next", name="fake-v2", groups=GROUPS)
    if embedder is not None:
        following.embedder = embedder
    await core.swap(following)
    for _ in range(polls):
        if retired:
            break
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("same_model", [True, False])
async def test_a_swap_to_a_version_with_the_same_model_frees_the_old_one_without_a_collection(
        tmp_path, monkeypatch, same_model):
    """The swap's one pause was the full collection that frees a retired model's reference cycles. A version that
    shares the served model (server/version.py: load_version) leaves none: it is freed as its last user leaves."""
    from server import versions

    collections = []
    monkeypatch.setattr(versions, "free_frozen_cycles", lambda: collections.append(1) or (0, 0.0))
    retired = []
    version, _ = fake_version(tmp_path, groups=GROUPS)
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), on_retired=lambda n, s: retired.append(n))
    try:
        await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=3))
        old = weakref.ref(version)
        embedder = version.embedder if same_model else None
        del version
        await _swap_to_a_second_version(core, tmp_path, embedder, retired)
        assert retired == ["fake-v1"] and old() is None and core.loaded_versions() == ["fake-v2"]
        assert collections == ([] if same_model else [1])
        assert "fake-v1" not in core.hidden._masks  # nor is its hidden-products mask kept (a review found it was)
        answer = await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=3))
        assert answer.version == "fake-v2" and len(answer.results) == 3
    finally:
        await core.close()


# NOT_FOUND (raised in an index thread) and INVALID_ARGUMENT (a corrupt image).
@pytest.mark.parametrize("request_", [pb.FindSimilarRequest(product_id="not-a-product"),
                                      pb.FindSimilarRequest(image=b"\x89PNG\r\n\x1a\ncorrupt")])
async def test_a_version_that_refused_a_call_is_freed_by_reference_counts_after_a_swap(tmp_path, request_):
    """A refused call's error kept the request's frames (and in them its version) alive in reference cycles: the
    abort's exception carried it as its context, and run_in's frame held the failed job. After a swap the old version
    then waited RELEASE_WAIT_S and a collection (up to 0.9 s with every request waiting, in a chaos run)."""
    import gc

    retired = []
    version, _ = fake_version(tmp_path, groups=GROUPS)
    metrics = ServerMetrics()
    core, server, port = await serve_core(version, metrics)
    core._on_retired = lambda name, seconds: retired.append((name, seconds))
    gc.disable()  # the cycles are then left for the retirement to find, whenever the collector would have run
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.ImageSimilarityStub(channel).FindSimilar(request_, timeout=30)
            assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        del refused
        embedder = version.embedder  # a reindex: the old version is freed by reference counts alone
        del version
        await _swap_to_a_second_version(core, tmp_path, embedder, retired, polls=500)
        assert retired == [("fake-v1", None)], "the old version needed a collection to be freed"
    finally:
        gc.enable()
        await server.stop(0)
        await core.close()


async def test_a_retired_version_is_unloaded_and_freed_off_the_event_loop(tmp_path, monkeypatch):
    """Unmapping a retired version (Annoy's file, its memory-mapped columns and lists) held the event loop 10 to 20 ms
    at ABO's size, right after the swap (issue 17): it is done in a thread, once its last user has left."""
    retired = []
    version, _ = fake_version(tmp_path, groups=GROUPS)
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), on_retired=lambda n, s: retired.append((n, s)))
    loop_thread = threading.get_ident()
    unloaded_on, freed_on = [], []
    try:
        (tmp_path / "next").mkdir()
        following, _ = fake_version(tmp_path / "next", name="fake-v2", groups=GROUPS)
        following.embedder = version.embedder
        unload = type(version.index).unload

        on_disk_while_unmapped = []

        def recording(index) -> None:
            unloaded_on.append(threading.get_ident())
            on_disk_while_unmapped.append(core.loaded_versions())  # what a prune must keep meanwhile
            unload(index)

        monkeypatch.setattr(type(version.index), "unload", recording)
        weakref.finalize(version.index, lambda: freed_on.append(threading.get_ident()))
        held = core._acquire([])  # a request still running on the old version when the swap happens
        assert held.version is version
        del version
        await core.swap(following)
        await asyncio.sleep(0.05)
        assert unloaded_on == [] and freed_on == [] and not retired  # still loaded while it is used
        core._release(held, [])
        del held
        for _ in range(300):
            if retired:
                break
            await asyncio.sleep(0.01)
        assert retired == [("fake-v1", None)] and core.loaded_versions() == ["fake-v2"]
        assert len(unloaded_on) == 1 and len(freed_on) == 1
        assert loop_thread not in unloaded_on + freed_on
        assert on_disk_while_unmapped == [["fake-v1", "fake-v2"]]
    finally:
        await core.close()


async def test_a_version_a_pool_thread_still_holds_is_freed_by_reference_counts_not_collected(tmp_path, monkeypatch):
    """A pool thread drops a finished job's arguments (the version it loaded beside the served one, the version it
    searched) a moment after the job's future is done, so the retirement can find the old version still referenced.
    It used to collect then: at ABO's size a full collection over the frozen heap, 230 to 500 ms with every request
    waiting. Now it waits, yielding the event loop, for the last reference to go."""
    import gc

    from server import versions

    collections = []
    monkeypatch.setattr(versions, "free_frozen_cycles", lambda: collections.append("full") or (0, 0.0))
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append("collect") or collect(*a))
    retired = []
    version, _ = fake_version(tmp_path, groups=GROUPS)
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), on_retired=lambda n, s: retired.append((n, s)))
    try:
        (tmp_path / "next").mkdir()
        following, _ = fake_version(tmp_path / "next", name="fake-v2", groups=GROUPS)
        following.embedder = version.embedder
        old = weakref.ref(version)
        held = threading.Event()

        def finishing_job(job_arguments) -> None:  # what a pool thread does after the job's future is done
            held.set()
            threading.Event().wait(0.2)
            del job_arguments

        holder = threading.Thread(target=finishing_job, args=([version],))
        holder.start()
        held.wait(5)
        del version
        await core.swap(following)
        ticks = 0
        for _ in range(300):
            if retired:
                break
            ticks += 1
            await asyncio.sleep(0.01)
        holder.join(5)
        assert retired == [("fake-v1", None)] and old() is None and core.loaded_versions() == ["fake-v2"]
        assert collections == []
        assert ticks >= 3  # the event loop ran while the retirement waited (a blocking wait: 0 or 1)
    finally:
        await core.close()


def test_a_current_that_cannot_be_read_is_an_artifact_error(tmp_path):
    """The watch loop refuses an ArtifactError once and serves on; anything else was a traceback at every check."""
    (tmp_path / artifacts.CURRENT).write_bytes(b"\xff\xfe v1\n")  # not UTF-8
    with pytest.raises(artifacts.ArtifactError, match="CURRENT cannot be read"):
        artifacts.read_current(tmp_path)
    (tmp_path / artifacts.CURRENT).unlink()
    (tmp_path / artifacts.CURRENT).mkdir()  # not a file
    with pytest.raises(artifacts.ArtifactError, match="CURRENT cannot be read"):
        artifacts.read_current(tmp_path)
