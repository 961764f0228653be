"""The micro-batcher with plain functions: sizes, waits, queue bound, errors, cancellation, deadlines."""

import asyncio
import time

import pytest

from server.batcher import BatcherConfig, Expired, MicroBatcher, QueueFull


class Recorder:
    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.gate = asyncio.Event()  # cleared by a test to hold a batch on the "model" until it is set
        self.gate.set()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.wait_for(self.gate.wait(), 30)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ValueError("model exploded")
        return [item * 10 for item in items]


async def _until(condition, timeout_s: float = 10.0) -> None:
    """Waits (bounded) for something the test can observe, instead of for a guessed time."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def test_batches_up_to_max_batch_size_and_returns_each_its_own_result():
    run = Recorder()
    batcher = MicroBatcher(run, BatcherConfig(max_batch_size=4, max_wait_ms=50, max_queue=64))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert [len(b) for b in run.batches] == [4, 4, 2]
    await batcher.close()


async def test_a_lone_item_waits_at_most_max_wait_ms():
    run = Recorder()
    batcher = MicroBatcher(run, BatcherConfig(max_batch_size=8, max_wait_ms=30, max_queue=64))
    assert await asyncio.wait_for(batcher.submit(7), timeout=5) == 70
    assert run.batches == [[7]]
    await batcher.close()


async def test_items_arriving_while_a_batch_runs_form_the_next_batch():
    run = Recorder(delay_s=0.2)
    batcher = MicroBatcher(run, BatcherConfig(max_batch_size=8, max_wait_ms=0, max_queue=64))
    first = asyncio.ensure_future(batcher.submit(0))
    await _until(lambda: run.batches)  # the first batch is on the model (for 0.2 s)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.gather(first, *rest)
    assert run.batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


async def test_queue_full_refuses_at_once_and_whole():
    run = Recorder(delay_s=0.3)
    batcher = MicroBatcher(run, BatcherConfig(max_batch_size=2, max_wait_ms=0, max_queue=4))
    running = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    await _until(lambda: run.batches)  # the first batch is in flight; the queue is empty again
    queued = batcher.submit_many([10, 11, 12])
    with pytest.raises(QueueFull):
        batcher.submit_many([20, 21])
    assert batcher.depth == 3
    await asyncio.gather(*running, *queued)
    await batcher.close()


async def test_an_exception_reaches_every_waiter_of_the_batch():
    batcher = MicroBatcher(Recorder(fail=True), BatcherConfig(max_batch_size=4, max_wait_ms=20, max_queue=8))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and "exploded" in str(r) for r in results)
    await batcher.close()


async def test_wrong_result_count_fails_the_batch():
    async def short(items):
        return items[:-1]

    batcher = MicroBatcher(short, BatcherConfig(max_batch_size=4, max_wait_ms=20, max_queue=8))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    await batcher.close()


async def test_cancelled_and_expired_waiters_are_never_computed():
    run = Recorder()
    run.gate.clear()
    expired = []
    from server.batcher import BatchObserver

    class Observer(BatchObserver):
        def expired(self, count):
            expired.append(count)

    batcher = MicroBatcher(run, BatcherConfig(max_batch_size=8, max_wait_ms=0, max_queue=64), Observer())
    blocker = asyncio.ensure_future(batcher.submit(0))
    await _until(lambda: run.batches)  # the blocker is on the model, held there
    cancelled = asyncio.ensure_future(batcher.submit(1))
    late_deadline = time.monotonic() + 0.05
    late = asyncio.ensure_future(batcher.submit(2, deadline=late_deadline))
    alive = asyncio.ensure_future(batcher.submit(3))
    await _until(lambda: batcher.depth == 3)
    cancelled.cancel()
    await _until(lambda: time.monotonic() > late_deadline)  # passed while queued
    run.gate.set()
    assert await blocker == 0 and await alive == 30
    with pytest.raises(Expired):
        await late
    assert run.batches == [[0], [3]]
    assert expired == [2]  # one cancelled, one past its deadline
    await batcher.close()


def test_config_is_validated():
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=0)
    with pytest.raises(ValueError):
        BatcherConfig(max_batch_size=8, max_queue=4)
    with pytest.raises(ValueError):
        BatcherConfig(max_wait_ms=-1)
