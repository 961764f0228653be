"""A version indexed with HNSW (lookalike-build build --index hnsw) is served like an Annoy one: filters, k distinct
products and the exact fallback behave the same, answers equal exact search on a small catalogue."""

import asyncio

import grpc
import numpy as np
import pytest

from builder.index import HNSW, build_hnsw_with_recall
from lookalike import artifacts
from lookalike.v1 import lookalike_pb2 as pb
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from server.catalogue import Catalogue
from server.core import CoreConfig, SimilarityCore
from server.metrics import ServerMetrics
from server.search import HnswNeighbours, NearestScorer, ProductSearch, SearchConfig, top_products
from server.servicer import ImageSimilarityServicer
from server.version import ServedVersion, load_version
from tests.builder import fake_build
from tests.server.fakes import DIMENSION, FakeEmbedder

PRODUCTS, COLOURS = 400, ("black", "blue", "red", "white")


def clustered(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors grouped by product (1 to 4 images near each other), products near one of 12 centres."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, PRODUCTS)
    centres = rng.normal(size=(12, DIMENSION))
    products = centres[rng.integers(0, 12, PRODUCTS)] + 0.6 * rng.normal(size=(PRODUCTS, DIMENSION))
    rows = np.repeat(products, counts, axis=0) + 0.15 * rng.normal(size=(int(counts.sum()), DIMENSION))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32), counts


@pytest.fixture(scope="module")
def hnsw_version(tmp_path_factory):
    """An HNSW-indexed catalogue as the builder writes it, and the exact answers to compare with."""
    folder = tmp_path_factory.mktemp("hnsw")
    vectors, counts = clustered()
    report = build_hnsw_with_recall(vectors, str(folder / artifacts.HNSW_INDEX_FILE), target_recall=0.95)
    colours = [COLOURS[p % len(COLOURS)] for p in range(PRODUCTS)]
    catalogue = Catalogue(
        image_ids=[f"img-{r:04d}" for r in range(len(vectors))],
        paths=[f"aa/img-{r:04d}.png" for r in range(len(vectors))],
        labels=["label"] * len(vectors), roles=[("main" if n == 0 else "other") for c in counts for n in range(c)],
        row_product=np.repeat(np.arange(PRODUCTS), counts), product_ids=[f"prod-{p:03d}" for p in range(PRODUCTS)],
        first_row=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), image_count=counts.astype(np.int64),
        attributes={"colour": colours}, has_products=True)
    return folder, vectors, catalogue, report, np.asarray(colours)


def search_of(hnsw_version, config: SearchConfig) -> ProductSearch:
    folder, vectors, catalogue, report, _ = hnsw_version
    return ProductSearch(catalogue, vectors, folder / artifacts.HNSW_INDEX_FILE, search_k=report.search_k, n_trees=0,
                         config=config, kind=HNSW)


def exact(vectors, catalogue, query, k, allowed=None):
    scores = vectors @ query
    products = catalogue.row_product
    if allowed is not None:
        keep = allowed[products]
        scores, products = scores[keep], products[keep]
    return [int(p) for p in top_products(scores, products, k)[1]]


def test_the_builder_records_the_ef_that_reaches_the_target_recall(hnsw_version):
    folder, vectors, _, report, _ = hnsw_version
    section = report.manifest(artifacts.HNSW_INDEX_FILE)
    assert section["kind"] == "hnsw" and section["file"] == artifacts.HNSW_INDEX_FILE
    assert section["ef_search"] == section["search_k"] == report.search_k
    assert section["recall_at_10"] >= 0.95 and section["recall_queries"] == min(500, len(vectors))
    smaller = [ef for ef in report.recall_by_search_k if ef < report.search_k]
    assert all(report.recall_by_search_k[ef] < 0.95 for ef in smaller)
    assert HnswNeighbours(folder / artifacts.HNSW_INDEX_FILE, DIMENSION, len(vectors)).__len__() == len(vectors)


@pytest.mark.parametrize("colours", [None, ("black",), ("red", "white")])
def test_hnsw_plans_return_k_distinct_products_equal_to_exact_search(hnsw_version, colours):
    _, vectors, catalogue, _, colour_of = hnsw_version
    search = search_of(hnsw_version, SearchConfig(exact_max_rows=0))  # the index plan at every selectivity
    allowed = None if colours is None else np.isin(colour_of, colours)
    for row in range(0, len(vectors), 37):
        result = search.search(NearestScorer(vectors[row]), 10, allowed=allowed)
        found = [hit.product_row for hit in result.hits]
        assert result.plan == "annoy"
        assert len(set(found)) == len(found) == 10
        assert found == exact(vectors, catalogue, vectors[row], 10, allowed)


def test_an_hnsw_over_fetch_that_comes_back_short_falls_back_to_exact(hnsw_version):
    _, vectors, catalogue, _, colour_of = hnsw_version
    search = search_of(hnsw_version, SearchConfig(exact_max_rows=0, fanout=1, annoy_rounds=1))
    allowed = np.zeros(PRODUCTS, bool)
    allowed[[7, 150, 333, 398, 12, 60, 90, 200, 250, 301, 350]] = True  # 11 scattered products
    result = search.search(NearestScorer(vectors[0]), 10, allowed=allowed)
    assert result.plan == "annoy_then_exact"
    assert [hit.product_row for hit in result.hits] == exact(vectors, catalogue, vectors[0], 10, allowed)


def test_a_version_with_an_hnsw_index_answers_find_similar_with_filters(hnsw_version):
    _, vectors, catalogue, report, colour_of = hnsw_version
    search = search_of(hnsw_version, SearchConfig(exact_max_rows=0))
    manifest = {"backbone": "fake", "preprocessing": "thumbnail", "head": "none", "dimension": DIMENSION,
                "metric": "euclidean", "index": report.manifest(artifacts.HNSW_INDEX_FILE)}
    version = ServedVersion("hnsw-v1", manifest, FakeEmbedder(), search)

    async def scenario():
        metrics = ServerMetrics()
        core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), metrics)
        server = grpc.aio.server()
        pb_grpc.add_ImageSimilarityServicer_to_server(ImageSimilarityServicer(core, metrics), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.ImageSimilarityStub(channel)
                info = await stub.GetInfo(pb.GetInfoRequest())
                assert info.search_k == report.search_k and info.n_trees == 0
                for product in (3, 101, 256):
                    request = pb.FindSimilarRequest(
                        product_id=f"prod-{product:03d}", k=10,
                        filter=pb.Filter(clauses=[pb.Clause(key="colour", none_of=["blue"])],
                                         exclude_product_ids=["prod-000"]))
                    response = await stub.FindSimilar(request)
                    first = int(catalogue.first_row[product])
                    query = vectors[first:first + int(catalogue.image_count[product])].mean(axis=0)
                    allowed = colour_of != "blue"
                    allowed[[0, product]] = False
                    expected = exact(vectors, catalogue, query / np.linalg.norm(query), 10, allowed)
                    assert [m.product_id for m in response.matches] == [f"prod-{p:03d}" for p in expected]
        finally:
            await server.stop(0)
            await core.close()

    asyncio.run(scenario())


def test_a_version_names_its_index_file_and_every_earlier_one_is_annoy():
    assert artifacts.index_file({"index": {"search_k": 800, "n_trees": 10}}) == artifacts.INDEX_FILE
    assert artifacts.index_file({"index": {"kind": "hnsw", "file": artifacts.HNSW_INDEX_FILE}}) == "index.hnsw"


@pytest.mark.e2e
def test_a_build_with_index_hnsw_is_checked_loaded_and_served_like_exact_search(tmp_path, small_catalogue):
    out = tmp_path / "ARTIFACTS"
    manifest = fake_build.run(small_catalogue, out, head="none", index="hnsw", chunk_size=64, neighbours=0)
    index = manifest["index"]
    assert index["kind"] == "hnsw" and index["file"] == artifacts.HNSW_INDEX_FILE
    assert index["recall_at_10"] >= 0.95 and index["ef_search"] == index["search_k"] >= 10 and index["M"] == 16
    # hnswlib's own file, checksummed like every file; no Annoy index beside it.
    assert artifacts.HNSW_INDEX_FILE in manifest["files"] and artifacts.INDEX_FILE not in manifest["files"]
    version = load_version(out, manifest["version"], max_pixels=1_000_000,
                           search=SearchConfig(exact_max_rows=0))
    try:
        assert isinstance(version.index.ann, HnswNeighbours)
        vectors, catalogue_ = version.index.vectors, version.catalogue
        allowed = np.ones(catalogue_.product_count, bool)
        allowed[::3] = False
        for row in range(0, len(vectors), 7):
            result = version.index.search(NearestScorer(vectors[row]), 10, allowed=allowed)
            assert [hit.product_row for hit in result.hits] == exact(vectors, catalogue_, vectors[row], 10, allowed)
    finally:
        version.close()
