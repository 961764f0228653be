"""A model-agnostic micro-batcher: many awaiting callers, one batch in flight on the accelerator."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The batcher's queue is at max_queue: the caller should be refused at once."""


class Expired(Exception):
    """The item's deadline passed while it waited: it was never computed."""


class BatcherClosed(Exception):
    """The batcher was stopped; no more work is taken."""


@dataclass(frozen=True)
class BatcherConfig:
    """The batching knobs, checked when the server starts."""

    # Items per model call: bigger batches use an accelerator better but wait longer to fill.
    # 8 is the fastest batch on a 2-core CPU (BENCHMARKS.md); raise it on a GPU.
    max_batch_size: int = 8
    # How long the first item of a batch waits for company: latency paid for throughput at low load.
    # 0: a batch is whatever queued while the model was busy, which is all the batching a CPU gains from.
    max_wait_ms: float = 0.0
    # Items waiting beyond this are refused with RESOURCE_EXHAUSTED instead of queueing forever.
    max_queue: int = 256

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must not be negative")
        if self.max_queue < self.max_batch_size:
            raise ValueError("max_queue must be at least max_batch_size")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future
    deadline: float | None  # time.monotonic() after which the result is useless


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def batch_done(self, size: int, seconds: float) -> None: ...

    def expired(self, count: int) -> None:
        """`count` queued items were dropped unseen by the model: deadline passed or caller gone."""

    def queue_depth(self, depth: int) -> None: ...


class MicroBatcher(Generic[T, R]):
    """Collects items from concurrent callers into batches for `run_batch(list[T]) -> list[R]`.

    One request, one future: `submit` enqueues and awaits its own result. Cancelled or expired
    items are dropped before the batch is formed, so they never reach the model.
    """

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[Sequence[R]]], config: BatcherConfig,
                 observer: BatchObserver | None = None) -> None:
        self._run_batch = run_batch
        self.config = config
        self._observer = observer or BatchObserver()
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit_many(self, items: Sequence[T], deadline: float | None = None) -> list[asyncio.Future]:
        """Enqueues all items or none: a request is refused whole when they do not all fit."""
        if self._closed:
            raise BatcherClosed("the batcher is stopped")
        if len(self._queue) + len(items) > self.config.max_queue:
            raise QueueFull(f"queue holds {len(self._queue)} of max_queue {self.config.max_queue}")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.append(_Pending(item, future, deadline))
            futures.append(future)
        self._observer.queue_depth(len(self._queue))
        self._wakeup.set()
        self.start()
        return futures

    async def submit(self, item: T, deadline: float | None = None) -> R:
        return await self.submit_many([item], deadline)[0]

    def _take_live(self, limit: int) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        expired = 0
        now = time.monotonic()
        while self._queue and len(batch) < limit:
            pending = self._queue.popleft()
            if pending.future.done():  # cancelled by its caller (gRPC cancels on deadline or disconnect)
                expired += 1
                continue
            if pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(Expired("deadline passed while queued"))
                expired += 1
                continue
            batch.append(pending)
        if expired:
            self._observer.expired(expired)
        return batch

    async def _next_batch(self) -> list[_Pending[T, R]]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        size = self.config.max_batch_size
        if len(self._queue) < size and self.config.max_wait_ms > 0:
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while len(self._queue) < size and (left := deadline - time.monotonic()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
        return self._take_live(size)

    async def _loop(self) -> None:
        while not self._closed:
            batch = await self._next_batch()
            self._observer.queue_depth(len(self._queue))
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await self._run_batch([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as error:  # every waiter hears of the failure
                log.exception("batch of %d failed", len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self._observer.batch_done(len(batch), time.perf_counter() - started)
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)

    async def close(self) -> None:
        """Stops taking work; items still queued get BatcherClosed."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherClosed("the batcher is stopped"))
