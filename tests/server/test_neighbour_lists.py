"""FindSimilar by id answered from the version's neighbour lists equals the exact search, whatever is skipped."""

import numpy as np
import pytest

from lookalike.availability import Availability
from server.core import CoreConfig, CoreObserver, Examples, Query, SearchOptions, SimilarityCore
from server.engine import NEIGHBOUR_LIST
from server.filters import Clause, Filter
from server.fresh import DeltaFeed
from server.search import SearchConfig
from tests.server.fakes import fake_version, with_lists
from tests.server.test_deltas import publish

# 40 images, 20 products: product p owns images p (main) and p + 20 (a view of it).
GROUPS = [[p, p + 20] for p in range(20)]
COLOURS = ["Black" if p % 3 else "Red" for p in range(20)]


class Plans(CoreObserver):
    def __init__(self) -> None:
        self.plans: list[str] = []

    def plan_chosen(self, plan: str) -> None:
        self.plans.append(plan)




@pytest.fixture
def cores(tmp_path):
    """Two cores over the same catalogue: one with lists of 8 products, one that always scans exactly."""
    made = []

    def make(n: int = 8):
        listed, _ = fake_version(tmp_path, name="listed", groups=GROUPS, attributes={"color": COLOURS})
        exact, _ = fake_version(tmp_path, name="exact", groups=GROUPS, attributes={"color": COLOURS},
                                config=SearchConfig(exact_max_rows=10_000))
        plans = Plans()
        config = CoreConfig(max_pixels=1_000_000, result_cache_size=0)
        pair = SimilarityCore(with_lists(listed, n), config, plans), SimilarityCore(exact, config), plans
        made.append(pair)
        return pair

    yield make
    for listed, exact, _ in made:
        listed._versions.current.version.close()
        exact._versions.current.version.close()


def _same(a, b) -> None:
    assert [r.product_id for r in a.results] == [r.product_id for r in b.results]
    assert [r.image.image_id for r in a.results] == [r.image.image_id for r in b.results]
    assert np.allclose([r.score for r in a.results], [r.score for r in b.results], atol=1e-6)
    assert [[i.image_id for i in r.images] for r in a.results] == [[i.image_id for i in r.images] for r in b.results]


QUERIES = [Query(product_id="prod-004"), Query(image_id="item-024"), Query(product_id="prod-013")]
OPTIONS = [SearchOptions(k=5), SearchOptions(k=5, exclude_query=False, group_size=2, with_attributes=True),
           SearchOptions(k=4, filter=Filter((Clause("color", any_of=("Black",)),))),
           SearchOptions(k=3, filter=Filter(exclude_product_ids=("prod-001", "prod-009", "prod-016"))),
           SearchOptions(k=6, score_threshold=0.99),
           # The query's own product by its best image: of a product of two, both score alike against their mean.
           SearchOptions(k=5, exclude_query=False)]


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q.product_id or q.image_id)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "own-groups", "filter", "excluded", "threshold", "own"])
async def test_a_list_answer_equals_the_exact_search(cores, query, options):
    listed, exact, plans = cores()
    for core in (listed, exact):
        core.set_availability(Availability(3, {"prod-008": {}, "prod-002": {}}))
    from_list = await listed.find_similar(query, options)
    _same(from_list, await exact.find_similar(query, options))
    ids = [r.product_id for r in from_list.results]
    assert not {"prod-008", "prod-002"} & set(ids)
    own = query.product_id or "prod-004"  # item-024 is prod-004's other image
    assert (own in ids) == (options.exclude_query is False and (options.k or 10) > 0 and own == ids[0])
    assert plans.plans, "every answer names its plan"


@pytest.mark.parametrize("options", [SearchOptions(k=5), SearchOptions(k=4, group_size=1, with_attributes=True),
                                     SearchOptions(k=6, score_threshold=0.99)],
                         ids=["plain", "one-image-groups", "threshold"])
async def test_a_list_answer_is_the_exact_search_to_the_last_bit(cores, options):
    """Rendered from the list's arrays, every field of every match is what the search renders: ids, paths, labels,
    roles, attributes, scores and distances."""
    listed, exact, plans = cores()
    for query in QUERIES:
        answer = await listed.find_similar(query, options)
        assert plans.plans[-1] == NEIGHBOUR_LIST and answer.results
        assert answer.results == (await exact.find_similar(query, options)).results


async def test_the_list_answers_without_searching_when_it_holds_k_eligible_products(cores):
    listed, exact, plans = cores(n=8)
    answer = await listed.find_similar(Query(product_id="prod-004"), SearchOptions(k=5))
    assert plans.plans == [NEIGHBOUR_LIST] and len(answer.results) == 5
    hidden = [r.product_id for r in answer.results[:2]]
    listed.set_availability(Availability(1, {p: {} for p in hidden}))
    exact.set_availability(Availability(1, {p: {} for p in hidden}))
    again = await listed.find_similar(Query(product_id="prod-004"), SearchOptions(k=5))
    assert plans.plans[-1] == NEIGHBOUR_LIST and not set(hidden) & {r.product_id for r in again.results}
    _same(again, await exact.find_similar(Query(product_id="prod-004"), SearchOptions(k=5)))


async def test_a_list_that_runs_short_falls_back_to_search(cores):
    listed, exact, plans = cores(n=4)
    options = SearchOptions(k=6)  # 4 listed products, one of them the query's own: never enough
    answer = await listed.find_similar(Query(product_id="prod-004"), options)
    assert plans.plans == ["exact"] and len(answer.results) == 6
    _same(answer, await exact.find_similar(Query(product_id="prod-004"), options))
    short = await listed.find_similar(Query(image_id="item-004"), SearchOptions(k=2))
    assert plans.plans[-1] == NEIGHBOUR_LIST and len(short.results) == 2


async def test_photo_and_vector_queries_still_search(cores):
    listed, _, plans = cores()
    vector = np.asarray(listed.version.index.vectors[listed.version.catalogue.rows_of_product(3)[0]])
    answer = await listed.find_similar(Query(vector=vector), SearchOptions(k=3))
    assert plans.plans == ["exact"] and answer.results[0].product_id == "prod-003"


def test_lists_of_a_padded_catalogue_say_when_they_are_exhausted():
    from server.engine import walk_list

    products = np.asarray([3, 1, 2, -1, -1], np.int32)
    scores = np.asarray([0.9, 0.8, 0.5, -np.inf, -np.inf], np.float32)
    assert list(products[walk_list(products, scores, None, 2, None)]) == [3, 1]
    eligible = np.asarray([True, False, True, True, True])  # product 1 left out, per list entry
    assert list(products[walk_list(products, scores, eligible, 5, None)]) == [3, 2]  # padded: nothing past the end
    full = np.asarray([3, 1, 2], np.int32)
    assert walk_list(full, scores[:3], eligible[:3], 5, None) is None  # products past the end may qualify
    assert list(full[walk_list(full, scores[:3], None, 5, 0.7)]) == [3, 1]  # past the threshold none can


async def test_every_answer_names_the_plan_that_found_it(tmp_path):
    """The plan travels with the answer (FindSimilarResponse.plan, shown by the console): the list, a search's own
    plan, Recommend's search, and the result cache for a repeated request."""
    from server.engine import RESULT_CACHE

    version, _ = fake_version(tmp_path, name="listed", groups=GROUPS)
    core = SimilarityCore(with_lists(version, 8), CoreConfig(max_pixels=1_000_000))
    try:
        by_product = await core.find_similar(Query(product_id="prod-003"), SearchOptions(k=3))
        assert by_product.plan == NEIGHBOUR_LIST
        assert (await core.find_similar(Query(product_id="prod-003"), SearchOptions(k=3))).plan == RESULT_CACHE
        vector = np.asarray(version.index.vectors[0])
        assert (await core.find_similar(Query(vector=vector), SearchOptions(k=3))).plan == "exact"
        recommended = await core.recommend(Examples(positive=(Query(product_id="prod-003"),)), SearchOptions(k=3))
        assert recommended.plan == "exact" and len(recommended.results) == 3
        # More than the list holds: a search answers, and says so.
        assert (await core.find_similar(Query(product_id="prod-003"), SearchOptions(k=12))).plan == "exact"
    finally:
        await core.close()


async def test_exclusion_and_threshold_bite_on_the_list_path(cores):
    """Options that change the answer (the first product excluded, a threshold between the 2nd and 3rd
    scores), answered from the list, equal the exact search."""
    listed, exact, plans = cores()
    for query in QUERIES:
        first = (await listed.find_similar(query, SearchOptions(k=4))).results
        for options in (SearchOptions(k=3, filter=Filter(exclude_product_ids=(first[0].product_id,))),
                        SearchOptions(k=4, score_threshold=(first[1].score + first[2].score) / 2)):
            answer = await listed.find_similar(query, options)
            assert plans.plans[-1] == NEIGHBOUR_LIST
            assert answer.results == (await exact.find_similar(query, options)).results
            assert len(answer.results) < len(first) or options.score_threshold is None


async def test_a_replaced_product_answers_by_its_delta_only(tmp_path):
    """A product a delta replaced is never answered with its old image from the version's list."""
    version, _ = fake_version(tmp_path, name="v1", groups=GROUPS, attributes={"color": COLOURS})
    core = SimilarityCore(with_lists(version, 8), CoreConfig(max_pixels=1_000_000, result_cache_size=0))
    listed = (await core.find_similar(Query(product_id="prod-004"), SearchOptions(k=3))).results
    replaced = listed[0].product_id
    far = np.asarray(version.index.vectors[version.catalogue.rows_of_image("item-017")[0]])
    publish(tmp_path, "v1", {replaced: [("moved", far)]})
    fresh, _, _ = DeltaFeed(tmp_path, "v1", version.catalogue, version.index.dimension).update()
    assert await core.apply_fresh("v1", fresh)
    answer = (await core.find_similar(Query(product_id="prod-004"), SearchOptions(k=3))).results
    assert all(r.image.image_id != listed[0].image.image_id for r in answer), "the replaced product's old image"
    await core.close()


def test_the_head_of_an_unmasked_list_is_what_walk_list_finds():
    """unmasked_head (the plain request's walk, in Python) takes the entries walk_list takes when only the query's
    own products are left out, or says it cannot tell (a padded or short head)."""
    from server.engine import unmasked_head, walk_list

    rng = np.random.default_rng(11)
    for trial in range(300):
        listed = int(rng.integers(1, 30))
        n = listed + int(rng.integers(0, 4))  # padded past the listed products, or not
        products = np.full(n, -1, np.int32)
        products[:listed] = rng.permutation(50)[:listed]
        rows = np.where(products >= 0, products * 3 + 1, -1).astype(np.int32)
        scores = np.sort(rng.random(n).astype(np.float32))[::-1].copy()
        own = [int(products[rng.integers(0, listed)])] if rng.random() < 0.7 else []
        wanted = int(rng.integers(1, 15))
        eligible = np.isin(products, own, invert=True)
        found = walk_list(products, scores, eligible, wanted, None)
        head = unmasked_head(products, rows, own, wanted)
        if head is None:
            assert found is None or len(found) < wanted, trial
        else:
            assert found is not None and len(found) == wanted, trial
            assert head == (products[found].tolist(), rows[found].tolist()), trial


def test_a_products_query_vector_is_the_builders_to_the_last_bit():
    """The server's product query (np.mean's and np.linalg.norm's arithmetic without their wrappers) is the vector
    the builder made the product's neighbour list for, bit for bit: products of one to nine images."""
    from types import SimpleNamespace

    from lookalike.neighbours import product_query_vectors
    from server.engine import QueryEngine

    rng = np.random.default_rng(5)
    for dimension in (8, 128, 512):
        counts = rng.integers(1, 10, 300)
        vectors = rng.standard_normal((int(counts.sum()), dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        first_row = np.concatenate([[0], np.cumsum(counts)[:-1]])
        spans = list(zip(first_row.tolist(), counts.tolist(), strict=True))
        index = SimpleNamespace(vectors=vectors, catalogue=SimpleNamespace(span=spans.__getitem__))
        expected = product_query_vectors(vectors, first_row, counts)
        engine = QueryEngine()
        for product in range(len(counts)):
            found = engine._product_vectors(index, product)
            assert found.shape == (1, dimension) and found.dtype == np.float32
            assert np.array_equal(found[0].view(np.uint32), expected[product].view(np.uint32)), (dimension, product)
