"""The quality bench's query expansion is the server's: the same products for the same query and catalogue."""

import numpy as np
import pytest

from server.core import CoreConfig, Query, QueryExpansion, SearchOptions, SimilarityCore
from server.search import SearchConfig
from server.version import ServedVersion
from tests.server.fakes import FakeEmbedder, make_search


@pytest.mark.parametrize("alpha, results", [(3.0, 5), (0.0, 3), (1.0, 20)])
async def test_the_benchs_expansion_ranks_as_the_server(tmp_path, alpha, results):
    from bench.quality import expand_queries

    rng = np.random.default_rng(5)
    catalogue = rng.normal(size=(60, 8)).astype(np.float32)
    catalogue /= np.linalg.norm(catalogue, axis=1, keepdims=True)
    index = make_search(tmp_path, catalogue, [[i] for i in range(60)], config=SearchConfig(exact_max_rows=10_000))
    manifest = {"dimension": 8, "index": {"search_k": 1000, "n_trees": 5, "recall_at_10": 1.0}}
    core = SimilarityCore(ServedVersion("v", manifest, FakeEmbedder(), index), CoreConfig())
    try:
        for _ in range(5):
            query = catalogue[rng.choice(60, 3)].sum(axis=0) + rng.normal(0, 0.3, 8)
            query = (query / np.linalg.norm(query)).astype(np.float32)
            expanded = expand_queries(catalogue, query[None, :], alpha, results)[0]
            expected = [f"prod-{row:03d}" for row in np.argsort(-(catalogue @ expanded))[:8]]
            options = SearchOptions(k=8, query_expansion=QueryExpansion(alpha, results))
            answer = await core.find_similar(Query(vector=query), options)
            assert [result.product_id for result in answer.results] == expected
    finally:
        await core.close()
