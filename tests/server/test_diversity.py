"""Diversity (maximal marginal relevance) in FindSimilar and Recommend: MMR against a plain numpy reference,
diversity 0 equal to the plain answer, the neighbour lists' candidates, and every mistake."""

import math
from dataclasses import replace

import grpc
import numpy as np
import pytest

from lookalike.availability import Availability
from lookalike.v1 import lookalike_pb2 as pb
from server.core import CoreConfig, Query, SearchOptions, SimilarityCore
from server.diversity import mmr
from server.engine import NEIGHBOUR_LIST
from server.errors import InvalidArgument
from server.filters import Clause, Filter, Range
from server.search import EXACT, SearchConfig
from tests.server.fakes import close_in_process, fake_version, serve_in_process, with_lists
from tests.server.test_neighbour_lists import Plans

# 40 images, 20 products: product p owns images p (main) and p + 20 (a view of it).
GROUPS = [[p, p + 20] for p in range(20)]
BRANDS = [f"B{p % 3}" for p in range(20)]


def reference_mmr(relevance, vectors, k, diversity):
    """MMR as its definition reads, one candidate at a time, in plain Python."""
    chosen, rest = [], list(range(len(relevance)))
    while rest and len(chosen) < k:
        def value(i):
            if not chosen:
                return relevance[i]
            return (1 - diversity) * relevance[i] - diversity * max(float(vectors[i] @ vectors[j]) for j in chosen)

        best = max(rest, key=lambda i: (value(i), -i))
        chosen.append(best)
        rest.remove(best)
    return chosen


@pytest.mark.parametrize("diversity", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_mmr_equals_the_reference(diversity):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    relevance = np.sort(rng.uniform(0.2, 1.0, 30))[::-1]
    chosen = mmr(relevance, vectors, 10, diversity)
    assert chosen.tolist() == reference_mmr(relevance, vectors, 10, diversity)
    if diversity == 0:
        assert chosen.tolist() == list(range(10))
    assert mmr(relevance[:3], vectors[:3], 10, diversity).tolist() == reference_mmr(relevance[:3], vectors[:3], 10,
                                                                                     diversity)


def test_mmr_leaves_out_near_copies():
    """Three near-copies of the most relevant result and one different one: diversity picks the different one."""
    vectors = np.asarray([[1, 0], [0.999, 0.045], [0.998, 0.063], [0.6, 0.8]], np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    relevance = np.asarray([0.95, 0.94, 0.93, 0.6])
    assert mmr(relevance, vectors, 2, 0.0).tolist() == [0, 1]
    assert mmr(relevance, vectors, 2, 0.5).tolist() == [0, 3]


@pytest.fixture(params=[10_000, 0], ids=["exact", "annoy"])
async def served(tmp_path, request):
    stub, images, _, parts = await serve_in_process(tmp_path, groups=GROUPS, attributes={"brand": BRANDS},
                                                    config=SearchConfig(exact_max_rows=request.param))
    yield stub, images, parts[2].version
    await close_in_process(parts)


def _products(response):
    return [m.product_id for m in response.matches]


def _reference(version, score, k, candidates, diversity, excluded=(), allowed=lambda p: True):
    """The exact top `candidates` products by their best image under `score`, then MMR over their best images."""
    catalogue, vectors = version.catalogue, np.asarray(version.index.vectors)
    best = {}
    for p in range(catalogue.product_count):
        if p not in excluded and allowed(p):
            rows = catalogue.rows_of_product(p)
            scores = score(vectors[rows])
            best[p] = (float(scores.max()), rows[int(np.argmax(scores))])
    top = sorted(best, key=lambda p: -best[p][0])[:candidates]
    chosen = reference_mmr([best[p][0] for p in top], vectors[[best[p][1] for p in top]], k, diversity)
    return [f"prod-{top[i]:03d}" for i in chosen], [best[top[i]][0] for i in chosen]


def _product_vector(version, p):
    vectors = np.asarray(version.index.vectors)[version.catalogue.rows_of_product(p)]
    mean = vectors.mean(axis=0)
    return mean / np.linalg.norm(mean)


async def test_find_similar_with_diversity_equals_the_reference_under_filters_and_groups(served):
    stub, _, version = served
    request = pb.FindSimilarRequest(product_id="prod-004", k=5, diversity=0.6, candidates=12, group_size=2,
                                    filter=pb.Filter(clauses=[pb.Clause(key="brand", none_of=["B2"])],
                                                     exclude_product_ids=["prod-001"]))
    response = await stub.FindSimilar(request)
    query = _product_vector(version, 4)
    expected, scores = _reference(version, lambda v: v @ query, 5, 12, 0.6, excluded={1, 4},
                                  allowed=lambda p: BRANDS[p] != "B2")
    assert _products(response) == expected
    assert [m.score for m in response.matches] == pytest.approx(scores, abs=1e-5)  # each keeps its own score
    assert all(len(m.images) == 2 for m in response.matches)
    plain = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=5, filter=request.filter))
    assert _products(response) != _products(plain)  # this query's near neighbours are alike: MMR changes them


async def test_diversity_zero_is_the_plain_answer(served):
    stub, images, _ = served
    for plain in (pb.FindSimilarRequest(product_id="prod-007", k=6, group_size=2),
                  pb.FindSimilarRequest(image=images[3], k=6, score_threshold=0.9),
                  pb.RecommendRequest(positive=[pb.Example(product_id="prod-002")], k=6,
                                      strategy=pb.RECOMMEND_STRATEGY_BEST_SCORE)):
        method = stub.FindSimilar if isinstance(plain, pb.FindSimilarRequest) else stub.Recommend
        expected = await method(plain)
        # candidates are ignored at diversity 0, as the proto says: below k or above the bound too.
        for candidates in (17, 3, 5000):
            zero = type(plain)()
            zero.CopyFrom(plain)
            zero.diversity, zero.candidates = 0.0, candidates
            answered = await method(zero)
            assert [(m.product_id, m.image_id, m.score) for m in answered.matches] == [
                (m.product_id, m.image_id, m.score) for m in expected.matches]


async def test_recommend_with_diversity_equals_the_reference(served):
    stub, _, version = served
    request = pb.RecommendRequest(positive=[pb.Example(product_id="prod-001"), pb.Example(product_id="prod-002")],
                                  negative=[pb.Example(product_id="prod-010")],
                                  strategy=pb.RECOMMEND_STRATEGY_SUM_SCORES, k=4, diversity=0.3)
    response = await stub.Recommend(request)
    positives = np.stack([_product_vector(version, 1), _product_vector(version, 2)])
    negative = _product_vector(version, 10)

    def sum_scores(rows):
        return (rows @ positives.T).sum(1) - rows @ negative

    # The default candidates: 4 x k.
    expected, scores = _reference(version, sum_scores, 4, 16, 0.3, excluded={1, 2, 10},
                                  allowed=lambda p: True)
    assert _products(response) == expected
    assert [m.score for m in response.matches] == pytest.approx(scores, abs=1e-5)
    # A threshold between the plain ranking's 3rd and 4th scores leaves MMR three candidates: three come back.
    plain = await stub.Recommend(pb.RecommendRequest(positive=request.positive, negative=request.negative,
                                                     strategy=request.strategy, k=4))
    request.score_threshold = (plain.matches[2].score + plain.matches[3].score) / 2
    thresholded = await stub.Recommend(request)
    expected, scores = _reference(version, sum_scores, 4, 3, 0.3, excluded={1, 2, 10})
    assert len(thresholded.matches) == 3 and _products(thresholded) == expected
    assert sorted(_products(thresholded)) == sorted(_products(plain)[:3])
    assert [m.score for m in thresholded.matches] == pytest.approx(scores, abs=1e-5)


async def test_a_threshold_with_diversity_leaves_out_what_it_leaves_out_without(served):
    stub, images, _ = served
    for query in ({"product_id": "prod-005"}, {"image": images[3]}):
        plain = await stub.FindSimilar(pb.FindSimilarRequest(**query, k=10))
        threshold = (plain.matches[2].score + plain.matches[3].score) / 2
        for diversity in (0.0, 0.5, 1.0):
            answer = await stub.FindSimilar(pb.FindSimilarRequest(**query, k=5, diversity=diversity,
                                                                  score_threshold=threshold))
            assert sorted(_products(answer)) == sorted(_products(plain)[:3]), (query.keys(), diversity)


async def test_diversity_takes_its_candidates_from_the_neighbour_lists(tmp_path):
    listed, _ = fake_version(tmp_path, name="listed", groups=GROUPS)
    exact, _ = fake_version(tmp_path, name="exact", groups=GROUPS, config=SearchConfig(exact_max_rows=10_000))
    plans = Plans()
    config = CoreConfig(max_pixels=1_000_000, result_cache_size=0)
    cores = SimilarityCore(with_lists(listed, 12), config, plans), SimilarityCore(exact, config)
    try:
        for query in (Query(product_id="prod-004"), Query(image_id="item-027")):
            options = SearchOptions(k=4, diversity=0.5, candidates=10, group_size=2)
            answers = [await core.find_similar(query, options) for core in cores]
            assert plans.plans[-1] == NEIGHBOUR_LIST
            assert [r.product_id for r in answers[0].results] == [r.product_id for r in answers[1].results]
            assert [r.score for r in answers[0].results] == pytest.approx([r.score for r in answers[1].results],
                                                                         abs=1e-6)
        # More candidates than a list holds: the list cannot tell, a search answers.
        await cores[0].find_similar(Query(product_id="prod-004"), SearchOptions(k=4, diversity=0.5, candidates=16))
        assert plans.plans[-1] != NEIGHBOUR_LIST
    finally:
        for core in cores:
            await core.close()


@pytest.mark.parametrize("listed", [True, False], ids=["neighbour-list", "search"])
async def test_hidden_products_are_never_candidates(tmp_path, listed):
    """Hidden products leave the candidates before MMR chooses, alone and beside a range filter: the answer is
    MMR over the best products that are neither hidden nor filtered out."""
    weights = [None if p % 5 == 0 else p / 2 for p in range(20)]
    version, _ = fake_version(tmp_path, groups=GROUPS, numbers={"weight": weights},
                              config=SearchConfig(exact_max_rows=0 if listed else 10_000))
    core = SimilarityCore(with_lists(version, 16) if listed else version,
                          CoreConfig(max_pixels=1_000_000, result_cache_size=0))
    query, options = Query(product_id="prod-004"), SearchOptions(k=5, diversity=0.5, candidates=10)
    vector = _product_vector(version, 4)
    try:
        first = [r.product_id for r in (await core.find_similar(query, options)).results]
        hidden = {int(first[0][-3:]), int(first[2][-3:])}
        core.set_availability(Availability(1, {f"prod-{p:03d}": {} for p in hidden}))
        answer = await core.find_similar(query, options)
        assert answer.plan == (NEIGHBOUR_LIST if listed else EXACT)
        expected, scores = _reference(version, lambda v: v @ vector, 5, 10, 0.5, excluded={4, *hidden})
        assert [r.product_id for r in answer.results] == expected
        assert [r.score for r in answer.results] == pytest.approx(scores, abs=1e-5)
        ranged = await core.find_similar(query, replace(options, filter=Filter((Clause("weight",
                                                                                       range=Range(gte=3)),))))
        expected, scores = _reference(version, lambda v: v @ vector, 5, 10, 0.5, excluded={4, *hidden},
                                      allowed=lambda p: weights[p] is not None and weights[p] >= 3)
        assert [r.product_id for r in ranged.results] == expected
        assert [r.score for r in ranged.results] == pytest.approx(scores, abs=1e-5)
    finally:
        await core.close()


@pytest.mark.parametrize(("diversity", "candidates", "message"), [
    (1.5, 0, "diversity must be in 0..1, not 1.5"),
    (-0.25, 0, "diversity must be in 0..1, not -0.25"),
    (math.nan, 0, "diversity must be in 0..1, not nan"),
    (0.5, 4, "candidates must be in k..2000 (5..2000), not 4"),
    (0.5, 2001, "candidates must be in k..2000 (5..2000), not 2001"),
])
async def test_diversity_mistakes_are_invalid_argument(served, diversity, candidates, message):
    stub, _, _ = served
    for request in (pb.FindSimilarRequest(product_id="prod-000", k=5, diversity=diversity, candidates=candidates),
                    pb.RecommendRequest(positive=[pb.Example(product_id="prod-000")], k=5, diversity=diversity,
                                        candidates=candidates)):
        method = stub.FindSimilar if isinstance(request, pb.FindSimilarRequest) else stub.Recommend
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()


async def test_diversity_work_is_bounded(tmp_path):
    """k x candidates is MMR's work in an index thread: 1,000 among 2,000 took 0.6 s, so it is refused by name."""
    version, _ = fake_version(tmp_path)
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000))
    try:
        with pytest.raises(InvalidArgument, match=r"k x candidates = 500 x 1000 is more work than the 250,000"):
            await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=500, diversity=0.5, candidates=1000))
        answer = await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=20, diversity=0.5))
        assert len(answer.results) == 20  # 20 x 80 by default: well within
        # The default candidates are held to the work bound: k from 251 to 500 is answered without candidates set.
        for k, candidates in ((250, 1000), (300, 833), (500, 500)):
            answer = await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=k, diversity=0.5))
            assert len(answer.results) == version.catalogue.product_count - 1
            assert core._check_options(SearchOptions(k=k, diversity=0.5))[1].candidates == candidates
        with pytest.raises(InvalidArgument, match=r"with diversity, k must be in 1\.\.500 .* not 501"):
            await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=501, diversity=0.5))
        with pytest.raises(InvalidArgument, match=r"for k = 300, candidates must be in 300\.\.833"):
            await core.find_similar(Query(product_id="prod-001"), SearchOptions(k=300, diversity=0.5, candidates=834))
    finally:
        await core.close()


def test_diversity_means_the_same_whatever_the_scale_of_the_scores(tmp_path):
    """sum_scores' relevance spans up to P + N, MMR's penalty a cosine: relevance is brought to the cosine's scale,
    so that the same diversity chooses the same products (a review found 0.5 acting like 0.5 / N)."""
    from dataclasses import replace as replaced

    from server.engine import QueryEngine, SearchOptions
    from server.search import NearestScorer

    version, _ = fake_version(tmp_path, groups=[[p, p + 20] for p in range(20)])
    query = np.asarray(version.index.vectors[0:1], np.float32)
    hits = version.index.describe(NearestScorer(query), np.arange(20), 1)
    options = SearchOptions(k=6, diversity=0.5, candidates=20)
    engine = QueryEngine()
    plain = [r.product_id for r in engine.results(version, hits, options, 6)]
    scaled = [replaced(hit, scores=hit.scores * 4) for hit in hits]  # 4: exact in floating point
    assert [r.product_id for r in engine.results(version, scaled, options, 6)] == plain
    assert plain != [r.product_id for r in engine.results(version, hits, SearchOptions(k=6), 6)]  # it diversifies
