"""The serving core: admission, embedding, the result cache, and which thread answers a query."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from lookalike.availability import Availability
from lookalike.preprocess import ImageError, Region, check_region
from server.batcher import BatcherClosed, BatcherConfig, BatchObserver, Expired, MicroBatcher, QueueFull
from server.engine import (  # noqa: F401  (the core's public names: the servicer, CLI and tests use them)
    AVERAGE_VECTOR,
    BEST_SCORE,
    EXCLUDE_DISTANCE,
    PRODUCT_QUERIES,
    RESULT_CACHE,
    STRATEGIES,
    SUM_SCORES,
    Answer,
    Examples,
    HiddenProducts,
    ImageResult,
    ProductResult,
    Query,
    QueryEngine,
    QueryExpansion,
    SearchOptions,
)
from server.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from server.filters import check_size
from server.fresh import FreshProducts
from server.result_cache import ResultCache, key_bytes
from server.version import ServedVersion
from server.versions import VersionRuntime, Versions

log = logging.getLogger(__name__)
# Filter values (excluded ids and clause values) a neighbour-list answer may compile on the event loop; a request
# with more is answered in the index pool, so it never holds up the others.
MAX_LOOP_VALUES = 256
# MMR's work (k x candidates similarities) a neighbour-list answer may do on the event loop: k = 10 among the
# default 40 is a few tens of microseconds; a request asking for more is answered in the index pool.
MAX_LOOP_MMR = 4096
# Fresh products (delta rows) a neighbour-list answer may scan on the event loop beside its list (about 0.5 ms for
# 1,024 rows on a busy 2-core host); past it the answer goes to the index pool.
MAX_LOOP_FRESH_ROWS = 1024
# Result rows (k x group_size) a neighbour-list answer may score and render on the event loop: k = 10 is 10 rows;
# k = 1,000 with groups of 100 is 100,000 rows, tens of milliseconds, answered in the index pool.
MAX_LOOP_RESULT_ROWS = 2048


def _checked_region(region: Region, prefix: str = "") -> Region:
    try:
        return check_region(region)
    except ValueError as error:
        raise InvalidArgument(f"{prefix}{error}") from None


class CoreObserver(BatchObserver):
    """The batcher's hooks plus the query plans; the default does nothing."""

    def plan_chosen(self, plan: str) -> None: ...

    def result_cache(self, hit: bool) -> None: ...

    def result_cache_held(self, entries: int, held_bytes: int) -> None: ...


@dataclass(frozen=True)
class CoreConfig:
    """Request limits and worker pools of the serving core. Every knob a request controls has a bound here."""

    batcher: BatcherConfig = BatcherConfig()
    # Threads that decode and preprocess images while the model runs the previous batch.
    preprocess_threads: int = max(1, os.cpu_count() or 1)
    # Threads answering index queries off the event loop.
    index_threads: int = 2
    # Images per Embed request: bounds one request's share of the queue.
    max_images_per_request: int = 64
    # Encoded image bytes admitted at once (all requests of this process): decoded, each image costs far more
    # memory than its bytes, so this bounds the worker's memory under a flood of large photos.
    max_image_bytes_in_flight: int = 256 * 1024 * 1024
    # Largest k per FindSimilar.
    max_k: int = 1000
    default_k: int = 10
    # Decoded pixels per image; larger images are refused before decoding.
    max_pixels: int = 40_000_000
    # Most images listed per product (group_size) in one match.
    max_group_size: int = 100
    # Largest search_k a request may ask for, as a multiple of the served version's own (the manifest's,
    # which reaches the builder's target recall): a larger one only costs time.
    max_search_k_factor: int = 8
    # How a query by product id uses the product's images (PRODUCT_QUERIES).
    product_query: str = "mean"
    # Positive plus negative examples per Recommend request.
    max_examples: int = 64
    # Most products MMR may choose among (a request's `candidates`): its cost is k x candidates dot products.
    max_candidates: int = 2000
    # MMR's candidates when a request leaves them at 0: this many times k (up to max_candidates).
    candidates_per_result: int = 4
    # Most MMR work a request may ask for, k x candidates (k = 1,000 among 2,000 took 0.6 s of an index thread).
    max_diversity_work: int = 250_000
    # Query expansion (image and vector queries): the most first results a request may average in (each one more
    # product fetched by the first search), the bound on alpha, and the defaults for a request that leaves them unset
    # (chosen by measurement, BENCHMARKS.md; the results' default is held to the bound).
    max_expansion_results: int = 50
    max_expansion_alpha: float = 10.0
    default_expansion_alpha: float = 3.0
    default_expansion_results: int = 5
    # Answers to FindSimilar by image id or product id kept per (version, availability, request): a
    # product page asks the same question many times. 0 turns the cache off.
    result_cache_size: int = 4096
    # ... and the memory they may hold, in MiB (k = 1000 with groups and attributes is ~0.7 MB an answer).
    result_cache_mb: int = 64

    def __post_init__(self) -> None:
        if self.product_query not in PRODUCT_QUERIES:
            raise ValueError(f"product_query must be one of {PRODUCT_QUERIES}")
        if self.result_cache_size < 0 or self.result_cache_mb < 0:
            raise ValueError("result_cache_size and result_cache_mb must not be negative")
        if self.preprocess_threads < 1 or self.index_threads < 1:
            raise ValueError("thread counts must be at least 1")
        if self.max_images_per_request > self.batcher.max_queue:
            raise ValueError("max_images_per_request must not exceed max_queue")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError("default_k must be in 1..max_k")
        if not self.max_k <= self.max_candidates or self.candidates_per_result < 1:
            raise ValueError("max_candidates must be at least max_k and candidates_per_result at least 1")
        if not (1 <= self.default_expansion_results and 1 <= self.max_expansion_results
                and 0 <= self.default_expansion_alpha <= self.max_expansion_alpha):
            raise ValueError("default_expansion_results and max_expansion_results must be at least 1 and "
                             "default_expansion_alpha in 0..max_expansion_alpha")
        if self.max_search_k_factor < 1 or self.max_image_bytes_in_flight < 1024 * 1024:
            raise ValueError("max_search_k_factor must be at least 1 and max_image_bytes_in_flight at least 1 MiB")


class SimilarityCore:
    """What the servicer, the CLI and the tests call: no protobuf here."""

    def __init__(self, version: ServedVersion, config: CoreConfig = CoreConfig(),
                 observer: CoreObserver | None = None,
                 on_retired: Callable[[str, float | None], None] | None = None) -> None:
        self.config = config
        self._observer = observer or CoreObserver()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._preprocess_pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
        self._index_pool = ThreadPoolExecutor(config.index_threads, thread_name_prefix="index")
        self.engine = QueryEngine(config.product_query, self._observer)
        self._results = ResultCache(config.result_cache_size, config.result_cache_mb * 1024 * 1024)
        # on_retired(version name, seconds): once a swapped-out version's last user has left, it is unloaded and freed;
        # seconds is the collection that freed it, None when reference counts did (server/versions.py).
        self._on_retired = on_retired
        self._versions = Versions(version, self._make_batcher, self._retired)
        self.hidden = HiddenProducts(Availability())
        self.draining = False
        self.admitted_images = 0
        self.admitted_bytes = 0

    def _retired(self, name: str, seconds: float | None) -> None:
        if name != self.version.name:  # a rollback serves the same version again: its masks are the served one's
            self.hidden.forget(name)
        if self._on_retired is not None:
            self._on_retired(name, seconds)

    def _make_batcher(self, runtime: VersionRuntime) -> MicroBatcher:
        embedder = runtime.version.embedder
        # Weakly: the runtime holds its batcher, and a cycle would keep a retired version from being freed by reference
        # counts. The runtime outlives its batcher's work: its retirement closes the batcher first.
        user = weakref.ref(runtime)

        async def run_batch(images: list[np.ndarray]) -> list[np.ndarray]:
            # The version's user until the model returns, though every caller is cancelled meanwhile: its retirement
            # must not collect the model while the batch still holds it (the collection would keep it, frozen).
            vectors = await user().run_in(self._model_thread, embedder.embed, np.stack(images))
            return list(vectors)

        return MicroBatcher(run_batch, self.config.batcher, self._observer)

    @property
    def version(self) -> ServedVersion:
        return self._versions.current.version

    def loaded_versions(self) -> list[str]:
        """The served version and any still finishing requests after a swap: what must stay on disk."""
        return self._versions.loaded()

    def set_availability(self, availability: Availability) -> HiddenProducts:
        """Hides what `availability` hides from the next request on; requests running finish as they are."""
        hidden = HiddenProducts(availability)
        version = self.version
        hidden.mask(version)  # computed here, off the request path
        hidden.fresh_mask(version)
        self.hidden = hidden
        return hidden

    async def apply_fresh(self, version_name: str, fresh: FreshProducts) -> bool:
        """Serves `fresh` (the products of the served version's deltas) from the next request on, beside the version's
        own; requests running finish with what they started with. False when `version_name` is no longer served."""
        runtime = self._versions.current
        if runtime.version.name != version_name or runtime.version.delta_sequence >= fresh.sequence:
            return False
        served = replace(runtime.version, fresh=fresh)
        await asyncio.get_running_loop().run_in_executor(self._index_pool, self.hidden.fresh_mask, served)
        if self._versions.current is not runtime or runtime.version.delta_sequence >= fresh.sequence:
            return False  # swapped, or a newer state applied, while the mask was worked out
        runtime.version = served
        # Requests still running on an earlier delta sequence work out its mask again if they need it (rarely: it was
        # there when they started); new ones find theirs ready.
        self.hidden.forget(version_name, keep_fresh=served.fresh_key)
        return True

    def queue_depth(self) -> int:
        return self._versions.current.batcher.depth

    def max_search_k(self, version: ServedVersion) -> int:
        return self.config.max_search_k_factor * max(1, version.search_k)

    def _acquire(self, images: list[bytes]) -> VersionRuntime:
        """Admits a request on the served version, or refuses it at once. The image bounds are the process's,
        whichever version the images are for: a swap does not make room."""
        if self.draining:
            raise Unavailable("the server is shutting down")
        count, size = len(images), sum(map(len, images))
        if count and self.admitted_images + count > self.config.batcher.max_queue:
            raise Overloaded(f"{self.admitted_images} images are queued (max_queue "
                             f"{self.config.batcher.max_queue}): retry later")
        if size and self.admitted_bytes + size > self.config.max_image_bytes_in_flight:
            raise Overloaded(f"{self.admitted_bytes} image bytes are in flight (max_image_bytes_in_flight "
                             f"{self.config.max_image_bytes_in_flight}): retry later")
        runtime = self._versions.current
        runtime.enter()
        self.admitted_images += count
        self.admitted_bytes += size
        return runtime

    def _release(self, runtime: VersionRuntime, images: list[bytes]) -> None:
        self.admitted_images -= len(images)
        self.admitted_bytes -= sum(map(len, images))
        runtime.leave()

    def _check_search_k(self, version: ServedVersion, options: SearchOptions) -> None:
        """The same bound whichever plan answers: a request is valid or not whatever is hidden meanwhile."""
        limit = self.max_search_k(version)
        if options.search_k > limit:
            raise InvalidArgument(f"search_k must be at most {limit} on version {version.name} "
                                  f"({self.config.max_search_k_factor} times its own {version.search_k}), "
                                  f"not {options.search_k}")

    async def _embed_on(self, runtime: VersionRuntime, images: list[bytes], deadline: float | None,
                        regions: list[Region | None] | None = None) -> np.ndarray:
        embedder = runtime.version.embedder
        regions = regions or [None] * len(images)
        # Each job the version's user until it returns, as a batch on the model is (above).
        preprocessed = await asyncio.gather(
            *(runtime.run_in(self._preprocess_pool, embedder.preprocess, data, *([] if region is None else [region]))
              for data, region in zip(images, regions, strict=True)),
            return_exceptions=True)
        for position, result in enumerate(preprocessed):
            if isinstance(result, ImageError):
                prefix = f"image {position}: " if len(images) > 1 else ""
                raise InvalidArgument(f"{prefix}{result}")
            if isinstance(result, BaseException):
                raise result
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the images reached the model")
        try:
            futures = runtime.batcher.submit_many(preprocessed, deadline)
        except QueueFull as error:
            raise Overloaded(str(error)) from None
        except BatcherClosed:
            raise Unavailable("the version is being unloaded; retry") from None
        try:
            return np.stack(await asyncio.gather(*futures))
        except Expired as error:
            raise DeadlineExceeded(str(error)) from None
        finally:
            for future in futures:
                future.cancel()  # a no-op for finished ones; drops the rest from the batch

    async def embed(self, images: list[bytes], deadline: float | None = None,
                    regions: list[Region] | None = None) -> tuple[np.ndarray, str]:
        """Unit vectors for encoded images (or for the part of each that its relative region covers), and the
        version that made them."""
        if not images:
            raise InvalidArgument("no images: send at least one")
        if len(images) > self.config.max_images_per_request:
            raise InvalidArgument(f"{len(images)} images in one request; at most "
                                  f"{self.config.max_images_per_request}")
        if regions and len(regions) != len(images):
            raise InvalidArgument(f"{len(regions)} regions for {len(images)} images: send none or one per image")
        regions = [_checked_region(region, f"region {position}: " if len(images) > 1 else "")
                   for position, region in enumerate(regions or [])]
        runtime = self._acquire(images)
        try:
            return await self._embed_on(runtime, images, deadline, regions), runtime.version.name
        finally:
            self._release(runtime, images)

    def _check_options(self, options: SearchOptions, score_bound: int = 1) -> tuple[int, SearchOptions]:
        """k and the options, checked, with MMR's candidates resolved; every option checked that needs no version
        (the filter's keys need one). Scores are in [-score_bound, score_bound]: 1 but for a sum of similarities
        (sum_scores: one per example)."""
        if not 0 <= options.group_size <= self.config.max_group_size:
            raise InvalidArgument(f"group_size must be in 0..{self.config.max_group_size}, not {options.group_size}")
        threshold = options.score_threshold
        if threshold is not None and not (math.isfinite(threshold) and -score_bound <= threshold <= score_bound):
            raise InvalidArgument(f"score_threshold must be in {-score_bound}..{score_bound}, not {threshold}")
        if options.search_k < 0:
            raise InvalidArgument(f"search_k must not be negative, not {options.search_k}")
        check_size(options.filter)
        k = options.k or self.config.default_k
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument(f"k must be in 1..{self.config.max_k}, not {k}")
        return k, self._check_expansion(self._check_diversity(options, k))

    def _check_expansion(self, options: SearchOptions) -> SearchOptions:
        """The options with query expansion's defaults filled in, so that a request and its cache key say the
        values used."""
        expansion = options.query_expansion
        if expansion is None:
            return options
        alpha = self.config.default_expansion_alpha if expansion.alpha is None else expansion.alpha
        if not (math.isfinite(alpha) and 0 <= alpha <= self.config.max_expansion_alpha):
            raise InvalidArgument(f"query_expansion.alpha must be in 0..{self.config.max_expansion_alpha:g}, "
                                  f"not {alpha}")
        results = expansion.results or min(self.config.default_expansion_results, self.config.max_expansion_results)
        if not 1 <= results <= self.config.max_expansion_results:
            raise InvalidArgument(f"query_expansion.results must be in 1..{self.config.max_expansion_results}, "
                                  f"not {results}")
        return replace(options, query_expansion=QueryExpansion(float(alpha), results))

    def _check_diversity(self, options: SearchOptions, k: int) -> SearchOptions:
        """The options with MMR's candidates resolved: 0 without diversity (the same request, and cache key, as
        before diversity existed, whatever candidates it sent), else the request's or the default: 4 x k held to
        max_candidates and to the work bound, never below k. k x candidates within the work bound with candidates
        at least k puts diversity's own bound on k: isqrt(max_diversity_work), 500 by default."""
        diversity, limit, work = options.diversity, self.config.max_candidates, self.config.max_diversity_work
        if not (math.isfinite(diversity) and 0 <= diversity <= 1):
            raise InvalidArgument(f"diversity must be in 0..1, not {diversity}")
        if diversity == 0:
            # The request as it came when it is already that (every plain request: no copy on the hot path).
            return options if options.candidates == 0 else replace(options, diversity=0.0, candidates=0)
        if k * k > work:
            raise InvalidArgument(f"with diversity, k must be in 1..{math.isqrt(work)} (MMR's work, k x candidates "
                                  f"with candidates at least k, is bounded by {work:,}), not {k}")
        if options.candidates and not k <= options.candidates <= limit:
            raise InvalidArgument(f"candidates must be in k..{limit} ({k}..{limit}), not {options.candidates}")
        options = replace(options, candidates=options.candidates or max(
            k, min(limit, self.config.candidates_per_result * k, work // k)))
        if k * options.candidates > work:
            raise InvalidArgument(f"diversity over k x candidates = {k} x {options.candidates} is more work than the "
                                  f"{work:,} allowed: for k = {k}, candidates must be in {k}..{work // k}")
        return options

    async def find_similar(self, query: Query, options: SearchOptions = SearchOptions(),
                           deadline: float | None = None) -> Answer:
        """The k catalogue products nearest to an image, image id, product id or vector, and the versions."""
        given = [query.image is not None, query.image_id is not None, query.product_id is not None,
                 query.vector is not None]
        if sum(given) != 1:
            raise InvalidArgument("set exactly one of image, image_id, product_id or vector")
        if query.region is not None and query.image is None:
            raise InvalidArgument("a region applies to an image query only")
        if options.query_expansion is not None and query.by_id:
            raise InvalidArgument("query_expansion applies to image and vector queries only, not to a query by "
                                  "image_id or product_id")
        region = None if query.region is None else _checked_region(query.region)
        k, options = self._check_options(options)
        images = [query.image] if query.image is not None else []
        runtime = self._acquire(images)
        try:
            version = runtime.version
            if options.filter:  # an empty one has nothing to check
                version.catalogue.filters.check(options.filter)
            self._check_search_k(version, options)
            if images:
                vector = (await self._embed_on(runtime, images, deadline, [region]))[0]
                query = Query(vector=vector)
            hidden = self.hidden
            key = None
            if self._results.enabled and query.by_id:
                key = (version.name, version.delta_sequence, hidden.version, query.image_id, query.product_id,
                       options, k)
                cached = self._results.get(key)
                self._observer.result_cache(cached is not None)
                if cached is not None:
                    return Answer(cached, version.name, hidden.version, plan=RESULT_CACHE,
                                  delta_sequence=version.delta_sequence)
            # A neighbour list answers on the event loop (tens of microseconds of numpy) unless the filter is
            # large enough to take longer to compile or MMR has much to do; a search, or either of those, in a thread.
            on_loop = not options.filter or len(options.filter.exclude_product_ids) + sum(
                len(clause.any_of) + len(clause.none_of) for clause in options.filter.clauses) <= MAX_LOOP_VALUES
            on_loop = on_loop and (options.diversity == 0 or k * options.candidates <= MAX_LOOP_MMR)
            on_loop = on_loop and (version.fresh is None or version.fresh.rows <= MAX_LOOP_FRESH_ROWS)
            on_loop = on_loop and options.wanted(k) * max(1, options.group_size) <= MAX_LOOP_RESULT_ROWS
            results = self.engine.from_list(version, hidden, query, options, k) if on_loop else None
            if results is None:
                results = await runtime.run_in(self._index_pool, self.engine.find, version, hidden, query, options,
                                               k, not on_loop)
            if key is not None and self._results.put(key, results, key_bytes(options)):
                self._observer.result_cache_held(len(self._results), self._results.bytes)
            return Answer(results, version.name, hidden.version, plan=results.plan,
                          delta_sequence=version.delta_sequence)
        finally:
            self._release(runtime, images)

    async def recommend(self, examples: Examples, options: SearchOptions = SearchOptions(),
                        deadline: float | None = None) -> Answer:
        """The k products most like the positive examples and least like the negative ones; the examples'
        own products never come back."""
        if examples.strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}, not {examples.strategy!r}")
        every = examples.positive + examples.negative
        if options.query_expansion is not None:
            raise InvalidArgument("query_expansion applies to FindSimilar only")
        k, options = self._check_options(options, max(1, len(every)) if examples.strategy == SUM_SCORES else 1)
        if not every:
            raise InvalidArgument("no examples: give at least one positive (or, with best_score or sum_scores, "
                                  "negative) example")
        if examples.strategy == AVERAGE_VECTOR and not examples.positive:
            raise InvalidArgument("average_vector needs at least one positive example")
        if len(every) > self.config.max_examples:
            raise InvalidArgument(f"{len(every)} examples; at most {self.config.max_examples}")
        for position, example in enumerate(every):
            set_ = [v is not None for v in (example.image, example.image_id, example.product_id, example.vector)]
            if sum(set_) != 1:
                raise InvalidArgument(f"example {position}: set exactly one of image, image_id, product_id or vector")
            if example.region is not None and example.image is None:
                raise InvalidArgument(f"example {position}: a region applies to an image example only")
        images = [example.image for example in every if example.image is not None]
        regions = [None if example.region is None else _checked_region(example.region, f"example {position}: ")
                   for position, example in enumerate(every) if example.image is not None]
        if len(images) > self.config.max_images_per_request:
            raise InvalidArgument(f"{len(images)} image examples; at most {self.config.max_images_per_request}")
        runtime = self._acquire(images)
        try:
            version = runtime.version
            version.catalogue.filters.check(options.filter)
            self._check_search_k(version, options)
            if images:
                embedded = iter(await self._embed_on(runtime, images, deadline, regions))
                positive, negative = ([Query(vector=next(embedded)) if e.image is not None else e for e in side]
                                      for side in (examples.positive, examples.negative))
                examples = Examples(tuple(positive), tuple(negative), examples.strategy, examples.ignore_missing)
            return await runtime.run_in(self._index_pool, self.engine.recommend, version, self.hidden, examples,
                                        options, k)
        finally:
            self._release(runtime, images)

    async def prepare(self, version: ServedVersion) -> None:
        """Works out, in a thread, what serving `version` needs besides its files (which of its products are
        hidden), so that the swap itself is a pointer change on the event loop."""
        hidden = self.hidden

        def masks() -> None:
            hidden.mask(version)
            hidden.fresh_mask(version)

        await asyncio.get_running_loop().run_in_executor(self._index_pool, masks)

    async def swap(self, version: ServedVersion) -> ServedVersion:
        """Serves `version` from now on; the old one finishes what uses it (threads included), then is unloaded.
        Call prepare(version) first: what it does not find ready is worked out by the first requests."""
        return self._versions.swap(version)

    async def drain(self, grace_s: float, refuse: bool = True) -> None:
        """Refuses new requests (unless `refuse` is False: the listeners have closed and the transports send no new
        ones) and waits (up to grace_s) for those in flight."""
        self.draining = refuse
        await self._versions.drain(grace_s)

    async def close(self) -> None:
        await self._versions.close()
        for pool in (self._model_thread, self._preprocess_pool, self._index_pool):
            pool.shutdown(wait=False, cancel_futures=True)
