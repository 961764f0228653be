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


def _row(head: str, precision: float, pooling: str = "avg") -> dict:
    from bench.quality import SUPERVISED, base_head

    return {"backbone": "efficientnet_lite0", "pooling": pooling, "mirror": False, "head": head, "dimension": 128,
            "supervised": base_head(head) in SUPERVISED, "buildable": True, "precision_at_10": precision,
            "map_at_10": round(precision - 0.05, 4), "images_per_s": None, "index_mb": 1.0, "fit_s": 2.0,
            "augment_s": 0.5 if "augment" in head else None, "query_expansion": "query expansion" in head,
            "query_ms": 0.1}


def test_the_lever_ladder_takes_each_levers_best_row_and_its_distance_to_the_target():
    from bench.report import _lever_ladder

    rows = [_row("lda", 0.85), _row("lda", 0.86, "gem"), _row("lda + augment 3", 0.855),
            _row("lda + augment 10", 0.87, "gem"), _row("lda + query expansion 3, 5", 0.88),
            _row("lda + augment 3 + query expansion 3, 5", 0.905), _row("pca", 0.8), _row("none", 0.79)]
    assert _lever_ladder(rows, True, 0.90) == [
        ["lda", "efficientnet_lite0 / gem / lda", 0.86, 0.81, "-0.0400"],
        ["lda + augment N", "efficientnet_lite0 / gem / lda + augment 10", 0.87, 0.82, "-0.0300"],
        ["lda + query expansion", "efficientnet_lite0 / avg / lda + query expansion 3, 5", 0.88, 0.83, "-0.0200"],
        ["lda + augment N + query expansion", "efficientnet_lite0 / avg / lda + augment 3 + query expansion 3, 5",
         0.905, 0.855, "+0.0050 (met)"]]
    assert [step[:3] for step in _lever_ladder(rows, False, 0.84)] == [
        ["none", "efficientnet_lite0 / avg / none", 0.79], ["pca", "efficientnet_lite0 / avg / pca", 0.8]]


def test_the_levers_section_replaces_its_predecessor_before_the_index(tmp_path):
    from bench.report import LEVERS_BEGIN, LEVERS_END, write_levers_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# lookalike benchmarks\n\n## Retrieval quality\n\nkept\n\n## Index\n\nkept too\n")
    found = {"catalogue_size": 4, "query_count": 2, "source": "test", "features_s": {"efficientnet_lite0": 3.0},
             "raw_pixel_floor": {"precision_at_10": 0.5}, "rows": [_row("lda", 0.85), _row("pca", 0.8)],
             "default": _row("lda", 0.85),
             "auto_head": {"chosen": "lda", "held_out_precision_at_10": {"metric": 0.9, "lda": 0.91},
                           "held_out_queries": 100, "margin": 0.0286, "metric_epochs": 5, "seconds": 1.0},
             "run": {"command": "python -m bench.quality", "started_at": "now", "seconds": 9, "cores": 2,
                     "niceness": 10, "load_average": [1.0, 2.0]}}
    for precision in (0.85, 0.95):
        found["rows"][0]["precision_at_10"] = precision
        write_levers_section({"sets": {"fashion-mnist": found}}, path)
    text = path.read_text()
    assert text.count(LEVERS_BEGIN) == 1 and text.count(LEVERS_END) == 1
    assert text.index("kept\n") < text.index(LEVERS_BEGIN) < text.index(LEVERS_END) < text.index("## Index")
    assert "`--head auto` (the default build's head, with product types) picks **lda**" in text
    assert "precision@10 >= 0.9 with product types: **met**" in text
    assert "precision@10 >= 0.84 without product types: **missed**" in text
    assert "`PYTHONPATH=. nice -n 10 python -m bench.quality`" in text
