"""The serving core: admission, preprocessing, micro-batching, index queries and version swaps."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lookalike.preprocess import ImageError
from server.batcher import BatcherClosed, BatcherConfig, BatchObserver, Expired, MicroBatcher, QueueFull
from server.errors import DeadlineExceeded, InvalidArgument, NotFound, Overloaded, Unavailable
from server.version import Match, ServedVersion

log = logging.getLogger(__name__)
EXCLUDE_DISTANCE = 1e-4  # an image or vector this close to an item is that item


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

    def __post_init__(self) -> None:
        if self.preprocess_threads < 1 or self.index_threads < 1:
            raise ValueError("thread counts must be at least 1")
        if self.max_images_per_request > self.batcher.max_queue:
            raise ValueError("max_images_per_request must not exceed max_queue")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError("default_k must be in 1..max_k")


@dataclass(frozen=True)
class Query:
    """Exactly one of image, item_id or vector."""

    image: bytes | None = None
    item_id: str | None = None
    vector: np.ndarray | None = None


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
                 observer: BatchObserver | None = None) -> None:
        self.config = config
        self._observer = observer
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._preprocess_pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
        self._index_pool = ThreadPoolExecutor(config.index_threads, thread_name_prefix="index")
        self._runtime = self._make_runtime(version)
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

    async def find_similar(self, query: Query, k: int = 0, exclude_query: bool = False, search_k: int = 0,
                           deadline: float | None = None) -> tuple[list[Match], str]:
        """The k nearest catalogue items to an image, an item or a vector, and the answering version."""
        given = [query.image is not None, query.item_id is not None, query.vector is not None]
        if sum(given) != 1:
            raise InvalidArgument("set exactly one of image, item_id or vector")
        k = self._check_k(k)
        if search_k < 0:
            raise InvalidArgument("search_k must not be negative")
        images = 1 if query.image is not None else 0
        runtime = self._acquire(images)
        try:
            version = runtime.version
            index = version.index
            search_k = search_k or version.search_k
            wanted = min(k + (1 if exclude_query else 0), len(index))
            loop = asyncio.get_running_loop()
            if query.item_id is not None:
                row = index.row_of.get(query.item_id)
                if row is None:
                    raise NotFound(f"item {query.item_id!r} is not in index version {version.name}")
                matches = await loop.run_in_executor(self._index_pool, index.by_row, row, wanted, search_k)
                if exclude_query:
                    matches = [m for m in matches if m.item_id != query.item_id]
            else:
                if query.image is not None:
                    vector = (await self._embed_on(runtime, [query.image], deadline))[0]
                else:
                    vector = self._check_vector(query.vector, index.dimension)
                matches = await loop.run_in_executor(self._index_pool, index.by_vector, vector, wanted, search_k)
                if exclude_query and matches and matches[0].distance <= EXCLUDE_DISTANCE:
                    matches = matches[1:]
            return matches[:k], version.name
        finally:
            self._release(runtime, images)

    async def swap(self, version: ServedVersion) -> ServedVersion:
        """Serves `version` from now on; the old one finishes its requests, then is unloaded."""
        old = self._runtime
        self._runtime = self._make_runtime(version)
        log.info("now serving version %s (was %s)", version.name, old.version.name)
        asyncio.get_running_loop().create_task(self._retire(old))
        return old.version

    async def _retire(self, runtime: _Runtime) -> None:
        await runtime.idle.wait()
        await runtime.batcher.close()
        runtime.version.close()
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
