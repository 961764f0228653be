"""Swaps and availability changes leave nothing alive: the soak's memory trend is not a version kept per swap."""

import asyncio
import gc
import tracemalloc

from lookalike.availability import Availability
from server.core import CoreConfig, SimilarityCore
from server.engine import Query, SearchOptions
from server.metrics import ServerMetrics
from tests.server.fakes import fake_version


async def test_swapped_out_versions_and_old_availability_states_are_freed(tmp_path):
    def version(i: int):
        (tmp_path / f"v{i}").mkdir()
        return fake_version(tmp_path / f"v{i}", name=f"v{i}")[0]

    # The result cache off: its entries name the version and availability that answered, and fill it by design.
    core = SimilarityCore(version(0), CoreConfig(max_pixels=1_000_000, result_cache_size=0), ServerMetrics())
    traced = {}
    tracemalloc.start()
    try:
        for i in range(1, 161):
            new = version(i)
            await core.prepare(new)
            await core.swap(new)
            for j in range(5):
                core.set_availability(Availability(i * 5 + j, {f"prod-00{j}": {}}))
            await core.find_similar(Query(product_id="prod-007"), SearchOptions(k=5))
            await asyncio.sleep(0.005)
            if i in (40, 160):
                await asyncio.sleep(0.2)  # the last retirement
                gc.collect()
                traced[i] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        await core.close()
    # A version kept alive would be tens of KiB each (its columns, index, masks); 120 of them, megabytes.
    assert traced[160] - traced[40] < 64 * 1024, traced
