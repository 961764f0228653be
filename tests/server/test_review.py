"""Review of 1f63124 and c0d6ac0 (the serving core split, the neighbour lists, the string columns): one test per
finding, each failing on those commits and passing since their fixes (96bb0c7 and after). Where a finding was
about time held on the event loop, the test asserts where the work runs (which thread), not how long it takes."""

import asyncio
import json
import threading

import numpy as np
import pytest

from lookalike.artifacts import write_current
from lookalike.availability import Availability
from lookalike.leases import LEASES_DIR
from server.app import LookalikeServer, ServerConfig
from server.core import CoreConfig, CoreObserver, Query, SearchOptions, SimilarityCore
from server.engine import NEIGHBOUR_LIST
from server.errors import InvalidArgument, Overloaded
from server.filters import MAX_CLAUSES, MAX_EXCLUDED_PRODUCTS, MAX_VALUES_PER_CLAUSE, Clause, Filter
from server.search import NearestScorer, SearchConfig
from server.version import ServedVersion
from tests.server.fakes import FakeEmbedder, fake_version, make_search, with_lists

# 40 images, 20 products: product p owns images p (main) and p + 20 (a view of it).
GROUPS = [[p, p + 20] for p in range(20)]
CONFIG = CoreConfig(max_pixels=1_000_000, result_cache_size=0)


class Plans(CoreObserver):
    def __init__(self) -> None:
        self.plans: list[str] = []

    def plan_chosen(self, plan: str) -> None:
        self.plans.append(plan)




class _FixedLists:
    """Neighbour lists that name the same products 1..n for every query (enough to take the list path)."""

    def __init__(self, n: int) -> None:
        self._products = np.arange(1, n + 1, dtype=np.int32)
        self._scores = np.linspace(0.99, 0.5, n).astype(np.float32)

    def list_of(self, kind: str, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._products, self._products, self._scores  # one-image products: product row = index row


def _wide_version(tmp_path, products: int = 20_000) -> tuple[ServedVersion, list[str]]:
    """A catalogue of `products` one-image products whose ids are shop URLs (one of them longer than 64 bytes,
    as URLs and SKUs of non-ABO catalogues often are), with a unique item_name each and 300 colours."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(products, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    product_ids = [f"https://shop.example.com/p/{i:08d}" for i in range(products)]
    product_ids[-1] += "?variant=" + "x" * 40  # one id of 85 bytes
    attributes = {"item_name": [f"Product number {i}, a descriptive title as shops write them, size {i % 7}"
                                for i in range(products)],
                  "color": [f"colour {i % 300}" for i in range(products)]}
    index = make_search(tmp_path, vectors, [[i] for i in range(products)], product_ids=product_ids,
                        attributes=attributes, name="wide")
    manifest = {"backbone": "fake", "preprocessing": "thumbnail", "head": "none", "dimension": 8,
                "metric": "euclidean", "index": {"search_k": 1000, "n_trees": 5, "recall_at_10": 1.0}}
    return ServedVersion("wide", manifest, FakeEmbedder(), index, _FixedLists(100)), product_ids


async def _ticks_during(work) -> tuple[object, int]:
    """Runs `work` (a coroutine) while a ticker counts how often the event loop got to run meanwhile."""
    ticks = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.001)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    try:
        result = await work
    finally:
        done.set()
        await ticker
    return result, ticks


# Finding 1 --------------------------------------------------------------------------------------------------

class _GatedEmbedder:
    """A version's embedder whose preprocessing waits until the test releases it."""

    def __init__(self, embedder) -> None:
        self._embedder = embedder
        self.dimension = embedder.dimension
        self.entered = threading.Event()
        self.release = threading.Event()

    def preprocess(self, data: bytes) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(10), "the test never released the preprocessing"
        return self._embedder.preprocess(data)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._embedder.embed(batch)

    def warmup(self) -> None:
        pass


async def test_image_bytes_in_flight_stay_bounded_across_a_swap(tmp_path):
    version, images = fake_version(tmp_path, groups=GROUPS)
    gated = _GatedEmbedder(version.embedder)
    version.embedder = gated
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000, max_image_bytes_in_flight=2**20))
    padding = b"\0" * (600 * 1024)  # two of these images are over the 1 MiB bound
    first = asyncio.ensure_future(core.find_similar(Query(image=images[0] + padding)))
    try:
        assert await asyncio.to_thread(gated.entered.wait, 10)
        other, _ = fake_version(tmp_path, name="fake-v2", groups=GROUPS)
        await core.swap(other)  # the watch loop swaps while the first photo is still decoding
        with pytest.raises(Overloaded, match="max_image_bytes_in_flight"):
            await core.find_similar(Query(image=images[1] + padding))
    finally:
        gated.release.set()
        await asyncio.gather(first, return_exceptions=True)
        await core.close()


# Finding 2 --------------------------------------------------------------------------------------------------

async def test_the_lease_renewed_while_a_version_loads_still_names_it(tmp_path):
    version, _ = fake_version(tmp_path, groups=GROUPS)
    server = LookalikeServer(ServerConfig(artifacts=tmp_path, metrics_port=-1, lease_ttl_s=3))  # renewed every 1 s
    server.core = SimilarityCore(version, CONFIG)
    leased_during_load = []

    async def load(name):
        await asyncio.sleep(1.5)  # loading ABO's size takes about 14 s; the default lease is renewed every 20 s
        lease = next((tmp_path / LEASES_DIR).glob("*.json"))
        leased_during_load.append(json.loads(lease.read_text())["versions"])
        other, _ = fake_version(tmp_path, name=name, groups=GROUPS)
        return other

    server._load = load
    renewing = asyncio.ensure_future(server._renew_lease())
    try:
        await asyncio.sleep(0.1)
        write_current(tmp_path, "fake-v2")
        assert await server.reload()
        # A prune running now would delete fake-v2 while this server maps it.
        assert leased_during_load == [["fake-v1", "fake-v2"]]
    finally:
        server._stopped.set()
        await renewing
        await server.core.close()


# Finding 3 --------------------------------------------------------------------------------------------------

def _list_score_above_its_served_score(version: ServedVersion) -> tuple[int, int, float]:
    """(query product, k, threshold): a product query whose k-th eligible list entry has a stored score above the
    score the answer reports for it (the builder's blocked matrix product and the server's rounding differ)."""
    catalogue, vectors = version.catalogue, np.asarray(version.index.vectors)
    for product in range(catalogue.product_count):
        query = vectors[catalogue.rows_of_product(product)].mean(axis=0, keepdims=True)
        query /= max(float(np.linalg.norm(query)), 1e-12)
        listed, _, stored = version.neighbours.list_of("product", product)
        others = 0
        for entry, score in zip(listed, stored, strict=True):
            if entry == product:
                continue
            others += 1
            served = version.index.describe(NearestScorer(query), np.asarray([entry]), 0)[0].score
            if served < score:
                return product, others, float(score)
    raise AssertionError("no list score differs from its served score on this catalogue")


async def test_a_list_answer_never_reports_a_match_below_the_score_threshold(tmp_path):
    listed, _ = fake_version(tmp_path, name="listed", groups=GROUPS)
    listed = with_lists(listed, 8)
    # The builder now stores the served scores; lists built before it did (by a blocked matrix product, as a server
    # may still map) hold scores a float32 step off: made so here.
    stored = listed.neighbours._lists["product"][2]
    stored[...] = np.where(np.isfinite(stored), np.nextafter(stored, np.float32(np.inf)), stored)
    exact, _ = fake_version(tmp_path, name="exact", groups=GROUPS, config=SearchConfig(exact_max_rows=10_000))
    product, k, threshold = _list_score_above_its_served_score(listed)
    plans = Plans()
    listed_core, exact_core = SimilarityCore(listed, CONFIG, plans), SimilarityCore(exact, CONFIG)
    try:
        query, options = Query(product_id=f"prod-{product:03d}"), SearchOptions(k=k, score_threshold=threshold)
        answer = await listed_core.find_similar(query, options)
        assert plans.plans == [NEIGHBOUR_LIST]
        assert all(result.score >= threshold for result in answer.results), \
            [(r.product_id, r.score, threshold) for r in answer.results]
        expected = await exact_core.find_similar(query, options)
        assert [r.product_id for r in answer.results] == [r.product_id for r in expected.results]
    finally:
        await listed_core.close()
        await exact_core.close()


async def test_an_exact_answer_never_reports_a_match_below_the_score_threshold(tmp_path):
    exact, _ = fake_version(tmp_path, name="exact", groups=GROUPS, config=SearchConfig(exact_max_rows=10_000))
    catalogue, vectors = exact.catalogue, np.asarray(exact.index.vectors)
    core = SimilarityCore(exact, CONFIG)
    below = []
    try:
        for product in range(catalogue.product_count):
            query = vectors[catalogue.rows_of_product(product)].mean(axis=0, keepdims=True)
            query /= max(float(np.linalg.norm(query)), 1e-12)
            every = NearestScorer(query).scores(vectors)  # what the exact plan thresholds
            for other in range(catalogue.product_count):
                if other == product:
                    continue
                threshold = float(every[catalogue.rows_of_product(other)].max())
                answer = await core.find_similar(Query(product_id=f"prod-{product:03d}"),
                                                 SearchOptions(k=19, score_threshold=threshold))
                below += [(r.product_id, r.score, threshold) for r in answer.results if r.score < threshold]
        assert not below, f"{len(below)} matches below their threshold, e.g. {below[0]}"
    finally:
        await core.close()


# Finding 4 --------------------------------------------------------------------------------------------------

async def test_search_k_is_bounded_on_the_list_path_too(tmp_path):
    listed, _ = fake_version(tmp_path, name="listed", groups=GROUPS)
    core = SimilarityCore(with_lists(listed, 8), CONFIG)
    try:
        limit = core.max_search_k(core.version)
        with pytest.raises(InvalidArgument, match=f"search_k must be at most {limit}"):
            await core.find_similar(Query(product_id="prod-004"), SearchOptions(k=3, search_k=2**31 - 1))
    finally:
        await core.close()


# Finding 5 --------------------------------------------------------------------------------------------------

async def test_a_swap_works_out_the_hidden_products_of_the_new_version_off_the_event_loop(tmp_path):
    small, _ = fake_version(tmp_path, groups=GROUPS)
    wide, product_ids = _wide_version(tmp_path, products=40_000)
    core = SimilarityCore(small, CONFIG)
    loop_thread = threading.get_ident()
    computed_on = []
    try:
        # 20,000 sold-out products, applied while the small version serves.
        core.set_availability(Availability(1, {product_id: {} for product_id in product_ids[::2]}))
        mask = core.hidden.mask

        def recording(version):
            computed_on.append(threading.get_ident())
            return mask(version)

        core.hidden.mask = recording
        await core.prepare(wide)  # what the server's reload does before it swaps
        await core.swap(wide)
        assert computed_on and loop_thread not in computed_on
        assert core.hidden.count(wide) == 20_000
    finally:
        await core.close()


def test_excluded_ids_of_a_catalogue_with_long_ids_all_resolve(tmp_path):
    wide, product_ids = _wide_version(tmp_path)
    excluded = Filter(exclude_product_ids=tuple(product_ids[:MAX_EXCLUDED_PRODUCTS]))
    rows = wide.catalogue.filters.excluded_rows(excluded)
    assert sorted(rows.tolist()) == list(range(MAX_EXCLUDED_PRODUCTS))


# Finding 6 --------------------------------------------------------------------------------------------------

async def test_a_list_answer_with_a_large_filter_is_worked_out_off_the_event_loop(tmp_path):
    wide, product_ids = _wide_version(tmp_path)
    plans = Plans()
    core = SimilarityCore(wide, CONFIG, plans)
    # The largest filter a request may send: 16 none_of clauses of 1,024 values (a shop's blocklists of names).
    clauses = tuple(Clause("item_name", none_of=tuple(f"blocked name {c}-{v}" for v in range(MAX_VALUES_PER_CLAUSE)))
                    for c in range(MAX_CLAUSES))
    loop_thread = threading.get_ident()
    answered_on = []
    from_list = core.engine.from_list

    def recording(*args):
        answered_on.append(threading.get_ident())
        return from_list(*args)

    core.engine.from_list = recording
    try:
        answer = await core.find_similar(Query(product_id=product_ids[0]), SearchOptions(k=10, filter=Filter(clauses)))
        assert plans.plans == [NEIGHBOUR_LIST] and len(answer.results) == 10
        assert answered_on and loop_thread not in answered_on  # compiled in the index pool
        small = await core.find_similar(Query(product_id=product_ids[0]), SearchOptions(k=10))
        assert len(small.results) == 10 and answered_on[-1] == loop_thread  # a plain list answer stays on the loop
        # Many results with their groups: thousands of rows to score and render, in the index pool too.
        await core.find_similar(Query(product_id=product_ids[0]), SearchOptions(k=100, group_size=100))
        assert answered_on[-1] != loop_thread
    finally:
        await core.close()


# Finding 7 --------------------------------------------------------------------------------------------------

async def test_an_empty_attribute_value_can_be_filtered_on(tmp_path):
    brands = ["" if p % 2 else "Acme" for p in range(20)]
    version, _ = fake_version(tmp_path, groups=GROUPS, attributes={"brand": brands})
    core = SimilarityCore(version, CONFIG)
    try:
        assert version.catalogue.filters.lists("brand").value_counts() == {"Acme": 10, "": 10}
        answer = await core.find_similar(Query(product_id="prod-000"), SearchOptions(
            k=5, with_attributes=True, filter=Filter((Clause("brand", any_of=("",)),))))
        assert len(answer.results) == 5 and all(r.attributes["brand"] == "" for r in answer.results)
        answer = await core.find_similar(Query(product_id="prod-000"), SearchOptions(
            k=5, with_attributes=True, filter=Filter((Clause("brand", none_of=("",)),))))
        assert all(r.attributes["brand"] == "Acme" for r in answer.results)
    finally:
        await core.close()


# Finding 8 --------------------------------------------------------------------------------------------------

class _CyclicEmbedder(FakeEmbedder):
    """TensorFlow's model objects are full of reference cycles: only the cycle collector frees them."""

    def __init__(self) -> None:
        super().__init__()
        self.itself = self


async def test_the_first_version_is_freed_after_a_swap(tmp_path):
    import gc
    import weakref

    from server.app import _freeze_heap

    version, _ = fake_version(tmp_path, groups=GROUPS)
    version.embedder = _CyclicEmbedder()
    freed = weakref.ref(version.embedder)
    core = SimilarityCore(version, CONFIG)
    del version
    _freeze_heap()  # what LookalikeServer.start does once its first version is loaded, before SERVING
    try:
        other, _ = fake_version(tmp_path, name="fake-v2", groups=GROUPS)
        await core.swap(other)
        for _ in range(200):
            if core.loaded_versions() == ["fake-v2"]:
                break
            await asyncio.sleep(0.01)
        assert core.loaded_versions() == ["fake-v2"]
        gc.collect()
        assert freed() is None, "the retired first version's model is still in memory"
    finally:
        gc.unfreeze()
        await core.close()


def _hold_preprocessing(embedder: FakeEmbedder, gate: threading.Event, started: list) -> None:
    """The embedder's preprocessing waits for `gate`; `started` gets each image it takes."""
    preprocess = embedder.preprocess

    def held(data, region=None):
        started.append(data)
        assert gate.wait(60), "the test never released the preprocessing"
        return preprocess(data, region)

    embedder.preprocess = held


@pytest.mark.parametrize("stage", ["preprocess", "model"])
async def test_a_retired_model_is_freed_when_a_cancelled_call_left_work_on_it(tmp_path, stage):
    """A call cancelled while its image is preprocessed, or while its batch runs on the model thread, leaves at once;
    the thread goes on, holding the model. The retirement's collection then ran beside it, found the model still held,
    and froze it again with the heap: a whole model kept until the next swap. Each job is the version's user until it
    returns."""
    import gc
    import weakref

    from server.app import _freeze_heap

    version, images = fake_version(tmp_path, groups=GROUPS)
    version.embedder = embedder = _CyclicEmbedder()
    gate, started = embedder.gate, embedder.batches
    if stage == "preprocess":
        gate, started = threading.Event(), []
        _hold_preprocessing(embedder, gate, started)
    freed = weakref.ref(embedder)
    core = SimilarityCore(version, CONFIG)
    del version
    _freeze_heap()
    try:
        gate.clear()
        call = asyncio.ensure_future(core.embed(images[:1]))
        for _ in range(1000):
            if started:
                break
            await asyncio.sleep(0.005)
        other, _ = fake_version(tmp_path, name="fake-v2", groups=GROUPS)
        await core.swap(other)
        call.cancel()  # its job stays in its thread: the gate holds it there
        with pytest.raises(asyncio.CancelledError):
            await call
        del call, embedder  # the test's own references (a cancelled task keeps its frames)
        await asyncio.sleep(0.2)
        gate.set()
        for _ in range(400):
            if core.loaded_versions() == ["fake-v2"]:
                break
            await asyncio.sleep(0.01)
        assert core.loaded_versions() == ["fake-v2"]
        for pool in (core._preprocess_pool, core._model_thread):  # the job has returned
            await asyncio.get_running_loop().run_in_executor(pool, lambda: None)
        gc.collect()
        assert freed() is None, "the retired version's model is still in memory"
    finally:
        gate.set()
        gc.unfreeze()
        await core.close()


@pytest.mark.parametrize("fails", [False, True], ids=["returned", "raised"])
async def test_a_job_holds_nothing_of_its_version_once_it_has_returned(fails):
    """A pool's thread keeps its work item (the callable, its arguments, the future and its callbacks) a moment after
    the future is done: ThreadPoolExecutor drops it only after the callbacks ran, so past the runtime's last leave().
    A retirement collecting in that moment found the model still held, and froze it again with the heap until the
    next swap (test_a_retired_model_is_freed_when_a_cancelled_call_left_work_on_it failed so, now and then, on a
    busy host). Here the pool keeps its work item for as long as the test wants: nothing of the version is in it,
    when the job returned and when it raised (a corrupt photo's preprocessing: the future keeps the exception)."""
    import gc
    import weakref
    from concurrent.futures import Executor, Future
    from types import SimpleNamespace

    from server.versions import VersionRuntime

    class LingeringPool(Executor):
        def __init__(self) -> None:
            self.release = threading.Event()
            self.threads: list[threading.Thread] = []

        def submit(self, fn, /, *args, **kwargs):
            future = Future()

            def work() -> None:  # holds fn, args and the future until released, after the future is done
                try:
                    future.set_result(fn(*args, **kwargs))
                except ValueError as error:
                    future.set_exception(error)
                assert self.release.wait(30)

            self.threads.append(threading.Thread(target=work))
            self.threads[-1].start()
            return future

    class Model:
        def embed(self, value: int) -> int:
            if fails:
                raise ValueError(f"not an image: {value}")
            return 2 * value

    model = Model()
    freed = weakref.ref(model)
    runtime = VersionRuntime(SimpleNamespace(embedder=model), lambda runtime: None)
    pool = LingeringPool()
    try:
        try:
            assert await runtime.run_in(pool, model.embed, 21) == 42 and not fails
        except ValueError as error:
            assert fails and str(error) == "not an image: 21"  # the caller gets the job's error as it was
        await asyncio.wait_for(runtime.idle.wait(), 10)
        del model, runtime
        gc.collect()
        assert freed() is None, "the pool's finished work item still holds the version's model"
    finally:
        pool.release.set()
        for thread in pool.threads:
            thread.join(30)


# Finding 9 --------------------------------------------------------------------------------------------------

async def test_the_event_loop_keeps_running_while_a_catalogue_of_abo_size_loads_beside_it():
    from server.catalogue import Catalogue

    rng = np.random.default_rng(11)
    images, products = 398_212, 147_702
    counts = np.bincount(np.sort(rng.integers(0, products, images - products)), minlength=products) + 1
    image_ids = [f"{int(x):08x}" for x in rng.permutation(images)]  # ABO's image ids: 8 hex digits, unordered
    product_ids = [f"B0{int(x):08X}" for x in rng.permutation(products)]

    def load() -> Catalogue:
        return Catalogue(image_ids=image_ids, paths=[f"{i[:2]}/{i}.jpg" for i in image_ids],
                         labels=[""] * images, roles=["other"] * images,
                         row_product=np.repeat(np.arange(products), counts), product_ids=product_ids,
                         first_row=np.concatenate([[0], np.cumsum(counts)[:-1]]), image_count=counts)

    catalogue, ticks = await _ticks_during(asyncio.to_thread(load))
    assert catalogue.rows_of_image(image_ids[5]).tolist() == [5]
    assert catalogue.product_row(product_ids[7]) == 7
    # The event loop kept running while the catalogue loaded (an object sort holding the interpreter throughout
    # let it tick at most once or twice); how long it stalled at most is a benchmark figure, not a test's.
    assert ticks >= 10, f"the event loop ran {ticks} times while the catalogue loaded"


# Finding 10 -------------------------------------------------------------------------------------------------

async def test_the_result_cache_byte_bound_counts_what_its_keys_hold(tmp_path):
    import gc
    import tracemalloc

    version, _ = fake_version(tmp_path, groups=GROUPS)
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000, result_cache_mb=1))

    async def ask(request: int) -> None:
        # A shop page leaving out the basket and the recently seen: ids of other catalogues' products too.
        basket = Filter(exclude_product_ids=tuple(f"seen-{request}-{i:05d}" for i in range(MAX_EXCLUDED_PRODUCTS)))
        await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=5, filter=basket))

    try:
        await ask(-1)  # warm up: the first request allocates what every request shares
        gc.collect()
        tracemalloc.start()
        for request in range(20):
            await ask(request)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert core._results.bytes <= 2**20
        assert held <= 3 * 2**20, f"the cache holds {held / 2**20:.1f} MiB under a bound of 1 MiB"
    finally:
        await core.close()
