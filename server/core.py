"""The serving core: admission, preprocessing, micro-batching, index queries and version swaps."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from lookalike.availability import Availability
from lookalike.preprocess import ImageError
from server.batcher import BatcherClosed, BatcherConfig, BatchObserver, Expired, MicroBatcher, QueueFull
from server.errors import DeadlineExceeded, InvalidArgument, NotFound, Overloaded, Unavailable
from server.filters import Filter
from server.search import BestScoreScorer, NearestScorer, ProductHit, Scorer, average_vector
from server.version import ServedVersion

log = logging.getLogger(__name__)
EXCLUDE_DISTANCE = 1e-4  # a query image or vector this close to a catalogue image is that image
# How a product's images form one query: "mean" (their normalised mean vector) or "max" (each image
# a probe; a candidate's score is its best match with any of them). Chosen by measurement (BENCHMARKS.md).
PRODUCT_QUERIES = ("mean", "max")
# Recommendation strategies, as Qdrant defines them (server/search.py).
AVERAGE_VECTOR, BEST_SCORE = "average_vector", "best_score"
STRATEGIES = (AVERAGE_VECTOR, BEST_SCORE)


class CoreObserver(BatchObserver):
    """The batcher's hooks plus the query plans; the default does nothing."""

    def plan_chosen(self, plan: str) -> None: ...

    def result_cache(self, hit: bool) -> None: ...


@dataclass(frozen=True)
class CoreConfig:
    """Request limits and worker pools of the serving core."""

    batcher: BatcherConfig = BatcherConfig()
    # Threads that decode and preprocess images while the model runs the previous batch.
    preprocess_threads: int = max(1, os.cpu_count() or 1)
    # Threads answering index queries off the event loop.
    index_threads: int = 2
    # Images per Embed request: bounds one request's share of the queue.
    max_images_per_request: int = 64
    # Largest k per FindSimilar.
    max_k: int = 1000
    default_k: int = 10
    # Decoded pixels per image; larger images are refused before decoding.
    max_pixels: int = 40_000_000
    # Most images listed per product (group_size) in one match.
    max_group_size: int = 100
    # How a query by product id uses the product's images (PRODUCT_QUERIES).
    product_query: str = "mean"
    # Positive plus negative examples per Recommend request.
    max_examples: int = 64
    # Answers to FindSimilar by image id or product id kept per (version, availability, request): a
    # product page asks the same question many times. 0 turns the cache off.
    result_cache_size: int = 4096

    def __post_init__(self) -> None:
        if self.product_query not in PRODUCT_QUERIES:
            raise ValueError(f"product_query must be one of {PRODUCT_QUERIES}")
        if self.result_cache_size < 0:
            raise ValueError("result_cache_size must not be negative")
        if self.preprocess_threads < 1 or self.index_threads < 1:
            raise ValueError("thread counts must be at least 1")
        if self.max_images_per_request > self.batcher.max_queue:
            raise ValueError("max_images_per_request must not exceed max_queue")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError("default_k must be in 1..max_k")


@dataclass(frozen=True)
class Query:
    """Exactly one of image, image_id, product_id or vector."""

    image: bytes | None = None
    image_id: str | None = None
    product_id: str | None = None
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class SearchOptions:
    """What a FindSimilar request asks for besides its query."""

    k: int = 0
    # Leave out the query's own product. None: the server's default, which is to leave it out for a query
    # by image id or product id and keep every product for a photo or vector query.
    exclude_query: bool | None = None
    search_k: int = 0
    group_size: int = 0
    with_attributes: bool = False
    filter: Filter = Filter()
    # Matches whose best image scores below this are left out (None: no threshold).
    score_threshold: float | None = None


@dataclass(frozen=True)
class Examples:
    """What a Recommend request recommends from: each example is a Query with exactly one field set."""

    positive: tuple[Query, ...] = ()
    negative: tuple[Query, ...] = ()
    strategy: str = AVERAGE_VECTOR
    # Leave out examples that are not in the served version (and name them) instead of NOT_FOUND.
    ignore_missing: bool = False


@dataclass(frozen=True)
class Answer:
    """Matches, the index version and the availability version that answered; from Recommend, also the
    example ids the version does not hold (with ignore_missing)."""

    results: list[ProductResult]
    version: str
    availability_version: int = 0
    missing_product_ids: list[str] = field(default_factory=list)
    missing_image_ids: list[str] = field(default_factory=list)


class HiddenProducts:
    """One availability state, as a mask over each served version's products (computed once per version)."""

    def __init__(self, availability: Availability) -> None:
        self.availability = availability
        self._masks: dict[str, np.ndarray | None] = {}

    @property
    def version(self) -> int:
        return self.availability.version

    def mask(self, version: ServedVersion) -> np.ndarray | None:
        """True for the hidden products of `version`; None when none of its products is hidden."""
        if version.name not in self._masks:
            rows = [version.catalogue.product_row_of.get(p) for p in self.availability.hidden]
            rows = [r for r in rows if r is not None]
            mask = None
            if rows and version.catalogue.has_products:
                mask = np.zeros(version.catalogue.product_count, bool)
                mask[rows] = True
            self._masks[version.name] = mask
        return self._masks[version.name]

    def count(self, version: ServedVersion) -> int:
        mask = self.mask(version)
        return 0 if mask is None else int(mask.sum())


@dataclass(frozen=True)
class ImageResult:
    image_id: str
    distance: float
    score: float
    path: str
    label: str
    role: str


@dataclass(frozen=True)
class ProductResult:
    """A matched product: its best image, optionally its group of images, and its attributes."""

    product_id: str  # "" for a version built before products
    image: ImageResult
    images: list[ImageResult]
    attributes: dict[str, str]

    @property
    def score(self) -> float:
        return self.image.score

    @property
    def distance(self) -> float:
        return self.image.distance


@dataclass(frozen=True)
class _Resolved:
    """A query made ready for search: its vectors ([m, D], unit), and which products are the query's own."""

    vectors: np.ndarray
    own_products: list[int]


class _Runtime:
    """A version with its own batcher and a count of requests running on it."""

    def __init__(self, version: ServedVersion, batcher: MicroBatcher) -> None:
        self.version = version
        self.batcher = batcher
        self.in_flight = 0
        self.admitted_images = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class SimilarityCore:
    """What the servicer, the CLI and the tests call: no protobuf here."""

    def __init__(self, version: ServedVersion, config: CoreConfig = CoreConfig(),
                 observer: CoreObserver | None = None) -> None:
        self.config = config
        self._observer = observer or CoreObserver()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._preprocess_pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
        self._index_pool = ThreadPoolExecutor(config.index_threads, thread_name_prefix="index")
        # Touched on the event loop only. Keys name the version and availability version that answered,
        # so a swap or a hide makes old entries unreachable; they age out of the LRU order.
        self._results: OrderedDict[tuple, list[ProductResult]] = OrderedDict()
        self._runtime = self._make_runtime(version)
        self._retiring: set[str] = set()
        self.hidden = HiddenProducts(Availability())
        self.draining = False

    def _make_runtime(self, version: ServedVersion) -> _Runtime:
        embedder = version.embedder

        async def run_batch(images: list[np.ndarray]) -> list[np.ndarray]:
            loop = asyncio.get_running_loop()
            vectors = await loop.run_in_executor(self._model_thread, embedder.embed, np.stack(images))
            return list(vectors)

        return _Runtime(version, MicroBatcher(run_batch, self.config.batcher, self._observer))

    @property
    def version(self) -> ServedVersion:
        return self._runtime.version

    def loaded_versions(self) -> list[str]:
        """The served version and any still finishing requests after a swap: what must stay on disk."""
        return sorted({self._runtime.version.name, *self._retiring})

    def set_availability(self, availability: Availability) -> HiddenProducts:
        """Hides what `availability` hides from the next request on; requests running finish as they are."""
        hidden = HiddenProducts(availability)
        hidden.mask(self._runtime.version)  # computed here, off the request path
        self.hidden = hidden
        return hidden

    def queue_depth(self) -> int:
        return self._runtime.batcher.depth

    def _acquire(self, images: int) -> _Runtime:
        if self.draining:
            raise Unavailable("the server is shutting down")
        runtime = self._runtime
        if images and runtime.admitted_images + images > self.config.batcher.max_queue:
            raise Overloaded(f"{runtime.admitted_images} images are queued (max_queue "
                             f"{self.config.batcher.max_queue}): retry later")
        runtime.enter()
        runtime.admitted_images += images
        return runtime

    @staticmethod
    def _release(runtime: _Runtime, images: int) -> None:
        runtime.admitted_images -= images
        runtime.leave()

    async def _embed_on(self, runtime: _Runtime, images: list[bytes], deadline: float | None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        embedder = runtime.version.embedder
        preprocessed = await asyncio.gather(
            *(loop.run_in_executor(self._preprocess_pool, embedder.preprocess, data) for data in images),
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

    async def embed(self, images: list[bytes], deadline: float | None = None) -> tuple[np.ndarray, str]:
        """Unit vectors for encoded images, and the version that made them."""
        if not images:
            raise InvalidArgument("no images: send at least one")
        if len(images) > self.config.max_images_per_request:
            raise InvalidArgument(f"{len(images)} images in one request; at most "
                                  f"{self.config.max_images_per_request}")
        runtime = self._acquire(len(images))
        try:
            return await self._embed_on(runtime, images, deadline), runtime.version.name
        finally:
            self._release(runtime, len(images))

    def _check_k(self, k: int) -> int:
        k = k or self.config.default_k
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument(f"k must be in 1..{self.config.max_k}, not {k}")
        return k

    def _check_vector(self, vector: np.ndarray, dimension: int) -> np.ndarray:
        vector = np.asarray(vector, np.float32).ravel()
        if vector.shape[0] != dimension:
            raise InvalidArgument(f"vector has {vector.shape[0]} components; the served dimension is {dimension}")
        if not np.all(np.isfinite(vector)):
            raise InvalidArgument("vector has NaN or infinite components")
        norm = float(np.linalg.norm(vector))
        if norm == 0 or not math.isfinite(norm):
            raise InvalidArgument("vector has zero length")
        return vector / norm

    async def find_similar(self, query: Query, options: SearchOptions = SearchOptions(),
                           deadline: float | None = None) -> Answer:
        """The k catalogue products nearest to an image, image id, product id or vector, and the versions."""
        given = [query.image is not None, query.image_id is not None, query.product_id is not None,
                 query.vector is not None]
        if sum(given) != 1:
            raise InvalidArgument("set exactly one of image, image_id, product_id or vector")
        k = self._check_options(options)
        images = 1 if query.image is not None else 0
        runtime = self._acquire(images)
        try:
            version = runtime.version
            if query.image is not None:
                vector = (await self._embed_on(runtime, [query.image], deadline))[0]
                query = Query(vector=vector)
            loop = asyncio.get_running_loop()
            hidden = self.hidden
            key = None
            if self.config.result_cache_size and (query.image_id is not None or query.product_id is not None):
                key = (version.name, hidden.version, query.image_id, query.product_id, options, k)
                cached = self._results.get(key)
                self._observer.result_cache(cached is not None)
                if cached is not None:
                    self._results.move_to_end(key)
                    return Answer(cached, version.name, hidden.version)
            results = await loop.run_in_executor(self._index_pool, self._find, version, hidden, query, options, k)
            if key is not None:
                self._results[key] = results
                if len(self._results) > self.config.result_cache_size:
                    self._results.popitem(last=False)
            return Answer(results, version.name, hidden.version)
        finally:
            self._release(runtime, images)

    def _check_options(self, options: SearchOptions) -> int:
        """k, checked; every other option checked (the filter against the served version's keys later)."""
        if not 0 <= options.group_size <= self.config.max_group_size:
            raise InvalidArgument(f"group_size must be in 0..{self.config.max_group_size}, not {options.group_size}")
        threshold = options.score_threshold
        if threshold is not None and not (math.isfinite(threshold) and -1 <= threshold <= 1):
            raise InvalidArgument(f"score_threshold must be in -1..1, not {threshold}")
        return self._check_k(options.k)

    def _find(self, version: ServedVersion, hidden: HiddenProducts, query: Query, options: SearchOptions,
              k: int) -> list[ProductResult]:
        # A hidden product still works as a query ("alternatives to this sold-out product").
        exclude = options.exclude_query
        if exclude is None:
            exclude = query.image_id is not None or query.product_id is not None
        resolved = self._resolve(version, query, exclude)
        return self._search(version, hidden, NearestScorer(resolved.vectors), resolved.own_products, options, k)

    def _search(self, version: ServedVersion, hidden: HiddenProducts, scorer: Scorer, own_products: list[int],
                options: SearchOptions, k: int) -> list[ProductResult]:
        filters = version.catalogue.filters
        allowed = filters.allowed(options.filter)
        hidden_mask = hidden.mask(version)
        if hidden_mask is not None:
            allowed = ~hidden_mask if allowed is None else allowed & ~hidden_mask
        excluded = np.union1d(np.asarray(own_products, np.int64), filters.excluded_rows(options.filter))
        result = version.index.search(scorer, k, allowed=allowed, excluded=excluded, search_k=options.search_k,
                                      group_size=options.group_size, score_threshold=options.score_threshold)
        self._observer.plan_chosen(result.plan)
        return [self._product_result(version, hit, options) for hit in result.hits]

    def _resolve(self, version: ServedVersion, query: Query, own: bool) -> _Resolved:
        """The vectors of a query and, when `own` is asked for, the products that are the query's own."""
        catalogue, index = version.catalogue, version.index
        if query.image_id is not None:
            rows = catalogue.rows_of_image.get(query.image_id)
            if not rows:
                raise NotFound(f"image {query.image_id!r} is not in index version {version.name}")
            return _Resolved(np.asarray(index.vectors[rows[:1]], np.float32),
                             catalogue.products_of_image(query.image_id) if own else [])
        if query.product_id is not None:
            if not catalogue.has_products:
                raise InvalidArgument(f"index version {version.name} was built before products existed: query by "
                                      f"image_id instead")
            product = catalogue.product_row_of.get(query.product_id)
            if product is None:
                raise NotFound(f"product {query.product_id!r} is not in index version {version.name}")
            vectors = np.asarray(index.vectors[catalogue.rows_of_product(product)], np.float32)
            if self.config.product_query == "mean":
                vectors = vectors.mean(axis=0, keepdims=True)
                vectors /= max(float(np.linalg.norm(vectors)), 1e-12)
            return _Resolved(vectors, [product] if own else [])
        vector = self._check_vector(query.vector, index.dimension)
        return _Resolved(vector[None, :], index.products_at(vector, EXCLUDE_DISTANCE) if own else [])

    async def recommend(self, examples: Examples, options: SearchOptions = SearchOptions(),
                        deadline: float | None = None) -> Answer:
        """The k products most like the positive examples and least like the negative ones; the examples'
        own products never come back."""
        k = self._check_options(options)
        if examples.strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}, not {examples.strategy!r}")
        every = examples.positive + examples.negative
        if not every:
            raise InvalidArgument("no examples: give at least one positive (or, with best_score, negative) example")
        if examples.strategy == AVERAGE_VECTOR and not examples.positive:
            raise InvalidArgument("average_vector needs at least one positive example")
        if len(every) > self.config.max_examples:
            raise InvalidArgument(f"{len(every)} examples; at most {self.config.max_examples}")
        for position, example in enumerate(every):
            set_ = [v is not None for v in (example.image, example.image_id, example.product_id, example.vector)]
            if sum(set_) != 1:
                raise InvalidArgument(f"example {position}: set exactly one of image, image_id, product_id or vector")
        images = [example.image for example in every if example.image is not None]
        if len(images) > self.config.max_images_per_request:
            raise InvalidArgument(f"{len(images)} image examples; at most {self.config.max_images_per_request}")
        runtime = self._acquire(len(images))
        try:
            version = runtime.version
            if images:
                embedded = iter(await self._embed_on(runtime, images, deadline))
                positive, negative = ([Query(vector=next(embedded)) if e.image is not None else e for e in side]
                                      for side in (examples.positive, examples.negative))
                examples = Examples(tuple(positive), tuple(negative), examples.strategy, examples.ignore_missing)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._index_pool, self._recommend, version, self.hidden, examples,
                                              options, k)
        finally:
            self._release(runtime, len(images))

    def _recommend(self, version: ServedVersion, hidden: HiddenProducts, examples: Examples, options: SearchOptions,
                   k: int) -> Answer:
        missing_products, missing_images, own = [], [], []
        sides = []
        for side in (examples.positive, examples.negative):
            vectors = []
            for example in side:
                try:
                    resolved = self._resolve(version, example, own=True)
                except NotFound:
                    if example.product_id is None and example.image_id is None:
                        raise
                    (missing_products if example.product_id is not None else missing_images).append(
                        example.product_id or example.image_id)
                    continue
                vectors.append(resolved.vectors)
                own += resolved.own_products
            sides.append(vectors)
        if (missing_products or missing_images) and not examples.ignore_missing:
            named = [f"product {p!r}" for p in missing_products] + [f"image {i!r}" for i in missing_images]
            raise NotFound(f"examples not in index version {version.name}: {', '.join(named)}")
        positive, negative = sides
        results: list[ProductResult] = []
        if positive or (negative and examples.strategy == BEST_SCORE):
            dimension = version.index.dimension
            if examples.strategy == AVERAGE_VECTOR:
                # Each example weighs the same, however many images a product example has.
                means = [self._unit(v.mean(axis=0)) for v in positive], [self._unit(v.mean(axis=0)) for v in negative]
                try:
                    scorer = NearestScorer(average_vector(np.asarray(means[0]), np.asarray(means[1])))
                except ValueError as error:
                    raise InvalidArgument(str(error)) from None
            else:
                stack = lambda vs: np.concatenate(vs) if vs else np.zeros((0, dimension), np.float32)  # noqa: E731
                scorer = BestScoreScorer(stack(positive), stack(negative))
            results = self._search(version, hidden, scorer, own, options, k)
        return Answer(results, version.name, hidden.version, missing_products, missing_images)

    @staticmethod
    def _unit(vector: np.ndarray) -> np.ndarray:
        return vector / max(float(np.linalg.norm(vector)), 1e-12)

    @staticmethod
    def _product_result(version: ServedVersion, hit: ProductHit, options: SearchOptions) -> ProductResult:
        catalogue = version.catalogue
        images = [ImageResult(catalogue.image_ids[row], float(distance), float(score), catalogue.paths[row],
                              catalogue.labels[row], catalogue.roles[row])
                  for row, score, distance in zip(hit.rows, hit.scores, hit.distances, strict=True)]
        return ProductResult(
            product_id=catalogue.product_ids[hit.product_row] if catalogue.has_products else "",
            image=images[0], images=images[:options.group_size],
            attributes=catalogue.attributes_of(hit.product_row) if options.with_attributes else {})

    async def swap(self, version: ServedVersion) -> ServedVersion:
        """Serves `version` from now on; the old one finishes its requests, then is unloaded."""
        old = self._runtime
        self.hidden.mask(version)
        self._retiring.add(old.version.name)
        self._runtime = self._make_runtime(version)
        log.info("now serving version %s (was %s)", version.name, old.version.name)
        asyncio.get_running_loop().create_task(self._retire(old))
        return old.version

    async def _retire(self, runtime: _Runtime) -> None:
        await runtime.idle.wait()
        await runtime.batcher.close()
        runtime.version.close()
        self._retiring.discard(runtime.version.name)
        log.info("unloaded version %s", runtime.version.name)

    async def drain(self, grace_s: float) -> None:
        """Refuses new requests and waits (up to grace_s) for those in flight."""
        self.draining = True
        try:
            await asyncio.wait_for(self._runtime.idle.wait(), grace_s)
        except TimeoutError:
            log.warning("%d requests still in flight after %.1f s", self._runtime.in_flight, grace_s)

    async def close(self) -> None:
        await self._runtime.batcher.close()
        for pool in (self._model_thread, self._preprocess_pool, self._index_pool):
            pool.shutdown(wait=False, cancel_futures=True)
