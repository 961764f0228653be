"""Versions and their lifetime: the served one, those retiring, and who still uses each."""

from __future__ import annotations

import asyncio
import copy
import gc
import inspect
import logging
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future

from server.batcher import MicroBatcher
from server.version import ServedVersion

log = logging.getLogger(__name__)
# How long a retired version sharing the served model may take to be freed by reference counts once its last user
# has left (a pool thread drops a finished job's arguments a moment after the job's future is done), checked every
# RELEASE_POLL_S; past it, what still holds it is collected.
RELEASE_WAIT_S = 2.0
RELEASE_POLL_S = 0.005


def free_frozen_cycles() -> tuple[int, float]:
    """Frees what a retired version leaves in reference cycles (its model is full of them) when the server froze
    its heap out of the garbage collector's sight (server/app.py): a full collection, the one pause a swap to a
    version with a model of its own costs (a third of a second with TensorFlow's heap), once the old version's
    last user is done. Returns the objects freed and the seconds it took."""
    if not gc.get_freeze_count():
        return 0, 0.0  # nothing frozen: the collector finds the cycles on its own
    started = time.perf_counter()
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    return freed, time.perf_counter() - started


async def _released(parts: list[weakref.ref], wait_s: float) -> bool:
    """Whether the objects behind `parts` are all freed within wait_s, checked every RELEASE_POLL_S."""
    deadline = time.monotonic() + wait_s
    while any(part() is not None for part in parts):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(RELEASE_POLL_S)
    return True


def _unload(held: list[ServedVersion]) -> None:
    """Unloads the version `held` names and drops the reference, so that the thread running this frees it when it
    was the last one."""
    held.pop().close()


class VersionRuntime:
    """A version with its own batcher, and a count of its users: requests, and jobs running in a thread pool.

    A job's use ends when the job itself ends, not when the request that started it is cancelled: a thread
    inside Annoy must never see its index unloaded."""

    def __init__(self, version: ServedVersion, make_batcher: Callable[[VersionRuntime], MicroBatcher]) -> None:
        self.version = version
        self.users = 0
        self.admitted_images = 0
        self.admitted_bytes = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.batcher = make_batcher(self)

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
        # The pool's thread holds its work item (the callable, its arguments, the future and its callbacks) a moment
        # after the future is done, past this runtime's last leave(): were the function, its arguments or this runtime
        # in it, the retirement's collection could run in that moment and find the version's model still held (and
        # freeze it again with the heap, until the next swap). So the job takes them out of a cell as it starts and
        # the callback takes this runtime out of one: the work item ends up holding neither.
        call = [function, args]
        user = [self]

        def run():
            function_, args_ = call
            call.clear()
            try:
                return function_(*args_)
            except BaseException as error:
                # The future keeps the exception, and its traceback the frames of the failed call, with their
                # arguments (the version, its model) as locals: cleared, so that a failed job holds no more than a
                # finished one. The traceback keeps its lines for the log.
                traceback.clear_frames(error.__traceback__)
                del function_, args_
                raise

        try:
            job = pool.submit(run)
        except BaseException:
            self.leave()
            raise

        def finished(_: Future) -> None:
            runtime = user.pop()
            try:
                loop.call_soon_threadsafe(runtime.leave)
            except RuntimeError:  # the loop is closed: the process is ending, nothing will be unloaded
                pass

        job.add_done_callback(finished)
        try:
            return await asyncio.wrap_future(job)
        except Exception as error:
            # The future, which the pool's thread holds that moment longer, keeps `error`: what goes on up is a copy
            # (the same type, arguments and message), whose traceback gathers this frame and the callers' (each
            # holding the version) out of the future's reach; `error` keeps only the job's own frames, cleared.
            raised = _copy_of(error)
            if raised is error:
                raise
            here = error.__traceback__
            if here is not None and here.tb_frame is inspect.currentframe():
                error.__traceback__ = here.tb_next  # the await above: this frame, which holds the version
            del here
            try:
                raise raised from error
            finally:
                del raised  # this frame is in its traceback: no cycle
        finally:
            # A job's exception holds this frame in its traceback, and the frame would hold the job and its exception:
            # a cycle keeping the version's objects until a collection.
            del job


def _copy_of(error: Exception) -> Exception:
    """A new exception equal to `error` (type, arguments, attributes) with no traceback yet; `error` itself when it
    cannot be made again from its arguments."""
    try:
        copied = copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception class whose constructor wants other arguments than its args
        return error
    return copied if type(copied) is type(error) and str(copied) == str(error) else error


class Versions:
    """The served version and the retiring ones; a retiring version is unloaded when its last user leaves."""

    def __init__(self, version: ServedVersion, make_batcher: Callable[[VersionRuntime], MicroBatcher],
                 on_retired: Callable[[str, float | None], None] | None = None) -> None:
        self._make_batcher = make_batcher
        self._on_retired = on_retired
        self.current = VersionRuntime(version, make_batcher)
        self._retiring: set[VersionRuntime] = set()
        # Names of retired versions whose unload (a thread unmapping their files) has not finished: still on disk.
        self._unloading: list[str] = []
        self._tasks: set[asyncio.Task] = set()

    def loaded(self) -> list[str]:
        """The served version, any still finishing requests after a swap, and any still being unmapped: what must
        stay on disk."""
        return sorted({self.current.version.name, *(runtime.version.name for runtime in self._retiring),
                       *self._unloading})

    def swap(self, version: ServedVersion) -> ServedVersion:
        """Serves `version` from now on; the old one finishes what uses it, then is unloaded."""
        old = self.current
        self.current = VersionRuntime(version, self._make_batcher)
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
        name = version.name
        self._unloading.append(name)
        self._retiring.discard(runtime)
        # A version whose model lives on in another (server/version.py shares an unchanged model) holds no reference
        # cycle (its columns are arrays, its index a mapping): it is freed by reference counts, on whichever thread
        # drops the last one. That may be a moment after its last user left: a pool thread that ran a job for it
        # (its load, its masks, a search) drops the job's arguments after the job's future is done. So the
        # retirement waits for that, yielding the event loop, instead of collecting: a full collection walks the
        # whole frozen heap (TensorFlow's objects: a third of a second at ABO's size) while every request waits.
        # The weak references say when the version is gone; should something still hold it past the wait, the
        # collections below free what cycles hold (and the log says so).
        model_in_use = any(version.embedder is other.version.embedder for other in (self.current, *self._retiring))
        parts = [weakref.ref(version), weakref.ref(version.index), weakref.ref(version.catalogue)]
        # Unloaded and, when this task holds the last reference, freed in a thread: unmapping Annoy's file and the
        # version's memory-mapped columns and lists costs 10 to 20 ms at ABO's size, which on the event loop every
        # request waited for. numpy's memory maps release the interpreter while they unmap; Annoy's unload (annoy
        # 1.17) does not, so its part (a few ms at ABO's size) still holds the loop from the thread.
        held = [version]
        del runtime, version  # the last references this task holds, but for `held`, which the thread empties
        try:
            await asyncio.get_running_loop().run_in_executor(None, _unload, held)
        finally:
            self._unloading.remove(name)
        freed, seconds = 0, None
        if not (model_in_use and await _released(parts, RELEASE_WAIT_S)):
            if model_in_use:
                log.warning("version %s still referenced %.1f s after its last user left: collecting", name,
                            RELEASE_WAIT_S)
            started = time.perf_counter()
            # What was allocated since the heap was frozen: the short-lived cycles (an exception's traceback, a
            # thread job's futures) that may hold the version, at the cost of the objects made since, not the model.
            freed = gc.collect() if model_in_use else 0
            seconds = time.perf_counter() - started
            if not (model_in_use and all(part() is None for part in parts)):
                freed, seconds = free_frozen_cycles()
        log.info("unloaded version %s (%s)", name, "freed by reference counts" if seconds is None else
                 f"{freed} objects freed by a collection of {seconds * 1000:.0f} ms")
        if self._on_retired is not None:
            self._on_retired(name, seconds)

    async def drain(self, grace_s: float) -> None:
        """Waits (up to grace_s) for the users of the served version and of those still retiring to finish."""
        runtimes = [self.current, *self._retiring]
        try:
            await asyncio.wait_for(asyncio.gather(*(runtime.idle.wait() for runtime in runtimes)), grace_s)
        except TimeoutError:
            log.warning("%d requests still in flight after %.1f s", sum(runtime.users for runtime in runtimes),
                        grace_s)

    async def close(self) -> None:
        await self.current.batcher.close()
