"""Versions and their lifetime: the served one, those retiring, and who still uses each."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future

from server.batcher import MicroBatcher
from server.version import ServedVersion

log = logging.getLogger(__name__)


def free_frozen_cycles() -> tuple[int, float]:
    """Frees what a retired version leaves in reference cycles (its model is full of them) when the server froze
    its heap out of the garbage collector's sight (server/app.py): a full collection, the one pause a swap costs,
    once the old version's last user is done. Returns the objects freed and the seconds it took."""
    if not gc.get_freeze_count():
        return 0, 0.0  # nothing frozen: the collector finds the cycles on its own
    started = time.perf_counter()
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    return freed, time.perf_counter() - started


class VersionRuntime:
    """A version with its own batcher, and a count of its users: requests, and jobs running in a thread pool.

    A job's use ends when the job itself ends, not when the request that started it is cancelled: a thread
    inside Annoy must never see its index unloaded."""

    def __init__(self, version: ServedVersion, batcher: MicroBatcher) -> None:
        self.version = version
        self.batcher = batcher
        self.users = 0
        self.admitted_images = 0
        self.admitted_bytes = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.users += 1
        self.idle.clear()

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.idle.set()

    async def run_in(self, pool: Executor, function: Callable, *args):
        """function(*args) in the pool; the version stays loaded until the function returns, even when the
        awaiting request is cancelled meanwhile."""
        loop = asyncio.get_running_loop()
        self.enter()
        try:
            job = pool.submit(function, *args)
        except BaseException:
            self.leave()
            raise

        def finished(_: Future) -> None:
            try:
                loop.call_soon_threadsafe(self.leave)
            except RuntimeError:  # the loop is closed: the process is ending, nothing will be unloaded
                pass

        job.add_done_callback(finished)
        return await asyncio.wrap_future(job)


class Versions:
    """The served version and the retiring ones; a retiring version is unloaded when its last user leaves."""

    def __init__(self, version: ServedVersion, make_batcher: Callable[[ServedVersion], MicroBatcher],
                 on_retired: Callable[[str, float], None] | None = None) -> None:
        self._make_batcher = make_batcher
        self._on_retired = on_retired
        self.current = VersionRuntime(version, make_batcher(version))
        self._retiring: set[VersionRuntime] = set()
        self._tasks: set[asyncio.Task] = set()

    def loaded(self) -> list[str]:
        """The served version and any still finishing requests after a swap: what must stay on disk."""
        return sorted({self.current.version.name, *(runtime.version.name for runtime in self._retiring)})

    def swap(self, version: ServedVersion) -> ServedVersion:
        """Serves `version` from now on; the old one finishes what uses it, then is unloaded."""
        old = self.current
        self.current = VersionRuntime(version, self._make_batcher(version))
        self._retiring.add(old)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("now serving version %s (was %s)", version.name, old.version.name)
        return old.version

    async def _retire(self, runtime: VersionRuntime) -> None:
        await runtime.idle.wait()
        await runtime.batcher.close()
        version = runtime.version
        version.close()
        self._retiring.discard(runtime)
        name = version.name
        # A version whose model lives on in another (server/version.py shares an unchanged model) leaves only
        # arrays and plain objects: freed by their reference counts, once the short-lived cycles that may still
        # point at it (a thread job's concurrent future and its asyncio twin refer to each other) are collected.
        # That collection leaves the frozen heap alone, so it costs what was allocated since, not the model. The
        # weak references say whether it was enough; if not, the full collection frees what is left.
        model_in_use = any(version.embedder is other.version.embedder for other in (self.current, *self._retiring))
        parts = [weakref.ref(version), weakref.ref(version.index), weakref.ref(version.catalogue)]
        del runtime, version  # the last references to the old version: the collection below can free it
        started = time.perf_counter()
        freed = gc.collect() if model_in_use else 0
        if model_in_use and all(part() is None for part in parts):
            seconds = time.perf_counter() - started
        else:
            freed, seconds = free_frozen_cycles()
        log.info("unloaded version %s (%d objects freed in %.0f ms)", name, freed, seconds * 1000)
        if self._on_retired is not None:
            self._on_retired(name, seconds)

    async def drain(self, grace_s: float) -> None:
        """Waits (up to grace_s) for the served version's users to finish."""
        try:
            await asyncio.wait_for(self.current.idle.wait(), grace_s)
        except TimeoutError:
            log.warning("%d requests still in flight after %.1f s", self.current.users, grace_s)

    async def close(self) -> None:
        await self.current.batcher.close()
