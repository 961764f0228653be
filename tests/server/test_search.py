"""Product search: plans, k distinct products however many images one product has, exact grouping."""

import numpy as np
import pytest

from server.search import (
    ANNOY,
    ANNOY_THEN_EXACT,
    EXACT,
    BestScoreScorer,
    NearestScorer,
    SearchConfig,
    average_vector,
    csr_rows,
    top_products,
)
from tests.server.fakes import make_search

DIMENSION = 16


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.fixture
def crowded(tmp_path_factory):
    """Product 0 has 200 near-identical images around the query; 80 products of 1 to 3 images elsewhere."""
    rng = np.random.default_rng(11)
    query = unit(rng.normal(size=DIMENSION))
    crowd = unit(query + 0.01 * rng.normal(size=(200, DIMENSION)))
    others = unit(query + 0.6 * rng.normal(size=(160, DIMENSION)))
    vectors = np.concatenate([crowd, others])
    groups, start = [list(range(200))], 200
    for size in [1, 2, 3] * 26 + [1, 1]:
        groups.append(list(range(start, start + size)))
        start += size
    return vectors, groups, query, tmp_path_factory.mktemp("crowded")


def exact_products(vectors, groups, query, k, allowed=None, threshold=-np.inf):
    best = [(max(float(vectors[i] @ query) for i in group), p) for p, group in enumerate(groups)
            if allowed is None or allowed[p]]
    return [p for score, p in sorted(best, key=lambda pair: -pair[0])[:k] if score >= threshold]


@pytest.mark.parametrize("exact_max_rows", [0, 10_000])
def test_a_product_with_200_near_identical_images_never_starves_the_results(crowded, exact_max_rows):
    vectors, groups, query, folder = crowded
    search = make_search(folder, vectors, groups, config=SearchConfig(exact_max_rows=exact_max_rows),
                         name=f"crowded-{exact_max_rows}")
    result = search.search(NearestScorer(query), 10)
    products = [hit.product_row for hit in result.hits]
    assert len(set(products)) == 10 and products[0] == 0
    assert products == exact_products(vectors, groups, query, 10)
    assert result.plan == (EXACT if exact_max_rows else ANNOY)
    scores = [hit.score for hit in result.hits]
    assert scores == sorted(scores, reverse=True)


def test_annoy_rounds_that_come_back_short_fall_back_to_exact_search(crowded):
    vectors, groups, query, folder = crowded
    config = SearchConfig(exact_max_rows=0, fanout=1, annoy_rounds=1)
    result = make_search(folder, vectors, groups, config=config, name="short").search(NearestScorer(query), 10)
    assert result.plan == ANNOY_THEN_EXACT
    assert [hit.product_row for hit in result.hits] == exact_products(vectors, groups, query, 10)


def test_the_plan_follows_the_rows_a_query_may_return(crowded):
    vectors, groups, query, folder = crowded
    search = make_search(folder, vectors, groups, config=SearchConfig(exact_max_rows=100), name="plans")
    allowed = np.zeros(len(groups), bool)
    allowed[40:] = True  # 41 products of the small ones: fewer than 100 rows
    few = search.search(NearestScorer(query), 5, allowed=allowed)
    assert few.plan == EXACT
    assert [hit.product_row for hit in few.hits] == exact_products(vectors, groups, query, 5, allowed)
    assert search.search(NearestScorer(query), 5).plan == ANNOY
    excluded = search.search(NearestScorer(query), 5, excluded=np.array([0]))
    assert 0 not in [hit.product_row for hit in excluded.hits] and len(excluded.hits) == 5
    nothing = search.search(NearestScorer(query), 5, allowed=np.zeros(len(groups), bool))
    assert nothing.hits == []


def test_fewer_products_than_k_returns_them_all(crowded):
    vectors, groups, query, folder = crowded
    search = make_search(folder, vectors, groups, config=SearchConfig(exact_max_rows=0), name="all")
    allowed = np.zeros(len(groups), bool)
    allowed[[0, 5, 9]] = True
    result = search.search(NearestScorer(query), 10, allowed=allowed)
    assert sorted(hit.product_row for hit in result.hits) == [0, 5, 9]


def test_groups_list_a_products_images_best_first_with_exact_distances(crowded):
    vectors, groups, query, folder = crowded
    search = make_search(folder, vectors, groups, name="groups")
    hits = search.search(NearestScorer(query), 3, group_size=4).hits
    top = hits[0]
    assert len(top.rows) == 4 and list(top.scores) == sorted(top.scores, reverse=True)
    expected = np.linalg.norm(vectors[top.rows] - query, axis=1)
    assert np.allclose(top.distances, expected, atol=1e-6)
    assert all(len(hit.rows) <= len(groups[hit.product_row]) for hit in hits)
    single = search.search(NearestScorer(query), 3, group_size=0).hits
    assert all(len(hit.rows) == 1 for hit in single)


def test_top_products_equals_a_brute_force_grouping():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(1, 400))
        scores = rng.normal(size=n).astype(np.float32)
        products = rng.integers(0, int(rng.integers(1, 40)), size=n)
        k = int(rng.integers(1, 20))
        best = {}
        for score, product in zip(scores, products, strict=True):
            best[product] = max(best.get(product, -np.inf), score)
        expected = sorted(best, key=lambda p: -best[p])[:k]
        positions, found = top_products(scores, products, k)
        assert list(found) == expected
        assert list(scores[positions]) == [best[p] for p in expected]


def test_csr_rows_concatenates_ranges():
    assert list(csr_rows(np.array([5, 0, 9]), np.array([2, 1, 3]))) == [5, 6, 0, 9, 10, 11]
    assert list(csr_rows(np.array([], np.int64), np.array([], np.int64))) == []


def test_products_at_finds_the_products_owning_an_identical_image(crowded):
    vectors, groups, query, folder = crowded
    for exact_max_rows in (0, 10_000):
        search = make_search(folder, vectors, groups, config=SearchConfig(exact_max_rows=exact_max_rows),
                             name=f"at-{exact_max_rows}")
        assert search.products_at(vectors[205], 1e-4) == [search.catalogue.row_product[205]]
        assert search.products_at(unit(np.ones(DIMENSION)), 1e-4) == []


def test_each_filter_plan_returns_k_products_equal_to_exact_filtered_search(crowded):
    vectors, groups, query, folder = crowded
    search = make_search(folder, vectors, groups, config=SearchConfig(exact_max_rows=100), name="filtered")
    broad = np.arange(len(groups)) % 2 == 0  # product 0 (200 rows) and half the others: Annoy with over-fetch
    result = search.search(NearestScorer(query), 10, allowed=broad)
    assert result.plan == ANNOY
    assert [hit.product_row for hit in result.hits] == exact_products(vectors, groups, query, 10, broad)
    selective = np.zeros(len(groups), bool)
    selective[1::7] = True  # 12 small products, under 100 rows: an exact scan of just those rows
    result = search.search(NearestScorer(query), 10, allowed=selective)
    assert result.plan == EXACT
    assert [hit.product_row for hit in result.hits] == exact_products(vectors, groups, query, 10, selective)


def test_over_fetch_that_comes_back_short_of_a_filter_falls_back_to_exact(crowded):
    vectors, groups, query, folder = crowded
    # The allowed products are the ones farthest from the query: Annoy's nearest candidates miss them.
    best = [max(float(vectors[i] @ query) for i in group) for group in groups]
    allowed = np.zeros(len(groups), bool)
    allowed[np.argsort(best)[:60]] = True
    config = SearchConfig(exact_max_rows=0, fanout=1, annoy_rounds=1)
    result = make_search(folder, vectors, groups, config=config, name="far").search(NearestScorer(query), 10,
                                                                                   allowed=allowed)
    assert result.plan == ANNOY_THEN_EXACT
    assert [hit.product_row for hit in result.hits] == exact_products(vectors, groups, query, 10, allowed)


@pytest.mark.parametrize("exact_max_rows", [0, 10_000])
def test_score_threshold_leaves_out_weaker_products_without_a_fallback_scan(crowded, exact_max_rows):
    vectors, groups, query, folder = crowded
    search = make_search(folder, vectors, groups, config=SearchConfig(exact_max_rows=exact_max_rows),
                         name=f"threshold-{exact_max_rows}")
    scores = sorted((max(float(vectors[i] @ query) for i in group) for group in groups), reverse=True)
    threshold = (scores[3] + scores[4]) / 2  # exactly four products pass
    result = search.search(NearestScorer(query), 10, score_threshold=threshold)
    assert [hit.product_row for hit in result.hits] == exact_products(vectors, groups, query, 10, None, threshold)
    assert len(result.hits) == 4 and all(hit.score >= threshold for hit in result.hits)
    # Annoy's farthest candidate is below the threshold, so the short answer is complete.
    assert result.plan == (ANNOY if exact_max_rows == 0 else EXACT)
    assert search.search(NearestScorer(query), 10, score_threshold=1.0).hits == []


def test_best_score_follows_its_definition():
    rng = np.random.default_rng(2)
    positives, negatives, rows = unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(2, 8))), unit(
        rng.normal(size=(50, 8)))
    scores = BestScoreScorer(positives, negatives).scores(rows)
    for row, score in zip(rows, scores, strict=True):
        best_positive, best_negative = max(row @ positives.T), max(row @ negatives.T)
        expected = best_positive if best_positive > best_negative else -best_negative ** 2
        assert score == pytest.approx(expected, abs=1e-6)
    only_negative = BestScoreScorer(np.zeros((0, 8)), negatives)
    assert len(only_negative.probes) == 0
    assert np.allclose(only_negative.scores(rows), -np.max(rows @ negatives.T, axis=1) ** 2, atol=1e-6)


def test_average_vector_is_twice_the_positive_mean_less_the_negative_mean():
    rng = np.random.default_rng(4)
    positives, negatives = unit(rng.normal(size=(3, 8))), unit(rng.normal(size=(2, 8)))
    expected = 2 * positives.mean(0) - negatives.mean(0)
    assert np.allclose(average_vector(positives, negatives), expected / np.linalg.norm(expected), atol=1e-6)
    assert np.allclose(average_vector(positives, np.zeros((0, 8))), unit(positives.mean(0)), atol=1e-6)
    with pytest.raises(ValueError, match="cancel out"):
        average_vector(positives[:1], 2 * positives[:1])


def test_a_rows_score_does_not_depend_on_the_rows_scored_with_it():
    """A neighbour-list answer scores 10 rows, a search hundreds: the same row must get the same score in both, or
    a threshold at that score keeps it in one plan and drops it in the other."""
    from server.search import similarities

    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((500, 64)).astype(np.float32)
    probes = rng.standard_normal((3, 64)).astype(np.float32)
    together = similarities(vectors, probes)
    assert all(np.array_equal(similarities(vectors[n:n + 1], probes), together[n:n + 1]) for n in range(500))
    assert all(np.array_equal(similarities(vectors[n:n + 7], probes), together[n:n + 7]) for n in range(0, 490, 7))
    assert np.allclose(together, vectors @ probes.T, atol=1e-4)


def test_tied_products_go_to_the_lower_product_row_as_in_the_neighbour_lists():
    """One photo in several products scores the same for each: a search keeps the same products as a list answer
    (the lower product rows), not whichever of the tied rows a partition happened to keep (a review found 100 of 100
    trials differing)."""
    from server.search import top_products

    rng = np.random.default_rng(0)
    for trial in range(20):
        scores = rng.random(20_000).astype(np.float32)
        products = np.arange(20_000) // 2
        tied = rng.choice(20_000, 30, replace=False)
        scores[tied] = np.float32(1.5)
        positions, found = top_products(scores, products, 10)
        assert list(found) == sorted(set(products[tied].tolist()))[:10], trial
        assert np.all(scores[positions] == np.float32(1.5))


def test_distances_to_one_probe_are_numpys_norm_to_the_last_bit():
    """The one-probe path (every query by id) skips np.linalg.norm's wrapper, not its arithmetic."""
    from server.search import nearest_distances

    rng = np.random.default_rng(7)
    for rows, dimension in ((0, 8), (1, 128), (13, 128), (40, 512)):
        vectors = rng.standard_normal((rows, dimension)).astype(np.float32)
        probe = rng.standard_normal((1, dimension)).astype(np.float32)
        if rows:
            probe[0] = vectors[0] + np.float32(1e-6) * rng.standard_normal(dimension).astype(np.float32)
        expected = np.linalg.norm(vectors[:, None, :] - probe[None, :, :], axis=2).min(axis=1)
        found = nearest_distances(vectors[::1], probe)
        assert found.dtype == expected.dtype and np.array_equal(found, expected)


def _one_photo_of_40_products() -> tuple[np.ndarray, np.ndarray]:
    """A photo whose vector is rows 0..39 (a placeholder image of 40 products), and 300 other rows around it."""
    rng = np.random.default_rng(12)
    photo = unit(rng.normal(size=DIMENSION))
    others = unit(photo + 0.5 * rng.normal(size=(300, DIMENSION)))
    return photo, np.concatenate([np.repeat(photo[None, :], 40, axis=0), others]).astype(np.float32)


def test_products_at_finds_every_product_sharing_one_photo_however_many(tmp_path):
    """A placeholder photo named by 40 products: a photo query leaving out its own products leaves out all 40 (the
    index's first 16 neighbours held only some of them)."""
    photo, vectors = _one_photo_of_40_products()
    groups = [[row] for row in range(len(vectors))]
    for exact_max_rows in (0, 10_000):
        search = make_search(tmp_path, vectors, groups, config=SearchConfig(exact_max_rows=exact_max_rows),
                             name=f"shared-{exact_max_rows}")
        assert search.products_at(photo, 1e-4) == sorted(int(p) for p in search.catalogue.row_product[:40])


def test_products_at_scans_every_row_when_the_index_answers_a_wider_query_short(tmp_path):
    """HnswNeighbours answers no rows when hnswlib cannot search that wide: the photo's own products then come from
    an exact scan, never from the short answer (which left none)."""
    photo, vectors = _one_photo_of_40_products()
    search = make_search(tmp_path, vectors, [[row] for row in range(len(vectors))],
                         config=SearchConfig(exact_max_rows=0))
    index = search.ann

    class ShortWhenWide:
        def nearest(self, vector, n, budget):
            return (np.zeros(0, np.int64), np.zeros(0, np.float32)) if n > 16 else index.nearest(vector, n, budget)

        def __len__(self):
            return len(index)

    search.ann = ShortWhenWide()
    assert search.products_at(photo, 1e-4) == sorted(int(p) for p in search.catalogue.row_product[:40])
