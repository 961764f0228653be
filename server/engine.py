"""The query engine: a resolved request to product results on one version, synchronously, no protobuf."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from lookalike.availability import Availability
from lookalike.preprocess import Region
from server.diversity import mmr
from server.errors import InvalidArgument, NotFound
from server.filters import Filter
from server.search import BestScoreScorer, NearestScorer, ProductHit, Scorer, SumScoresScorer, average_vector
from server.version import ServedVersion

EXCLUDE_DISTANCE = 1e-4  # a query image or vector this close to a catalogue image is that image
# How a product's images form one query: "mean" (their normalised mean vector) or "max" (each image
# a probe; a candidate's score is its best match with any of them). Chosen by measurement (BENCHMARKS.md).
PRODUCT_QUERIES = ("mean", "max")
# Recommendation strategies, as Qdrant defines them (server/search.py).
AVERAGE_VECTOR, BEST_SCORE, SUM_SCORES = "average_vector", "best_score", "sum_scores"
STRATEGIES = (AVERAGE_VECTOR, BEST_SCORE, SUM_SCORES)
# The plan of a query answered from the version's neighbour lists (the others are in server/search.py).
NEIGHBOUR_LIST = "neighbour_list"
# The plan an answer reports when the result cache gave it (an earlier answer to the same request).
RESULT_CACHE = "result_cache"
# How far a list's stored score may be from the score served for the same row (float32 rounding of two
# different matrix products of unit vectors: about 1e-7; kept far above it).
SCORE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Query:
    """Exactly one of image, image_id, product_id or vector; with an image, optionally the region to use."""

    image: bytes | None = None
    image_id: str | None = None
    product_id: str | None = None
    vector: np.ndarray | None = None
    region: Region | None = None

    @property
    def by_id(self) -> bool:
        return self.image_id is not None or self.product_id is not None


@dataclass(frozen=True)
class QueryExpansion:
    """Alpha-query expansion: the query plus its `results` most similar products' best images, each weighted by
    max(0, score)^alpha. None in a request is the server's default (the core resolves it)."""

    alpha: float | None = None
    results: int = 0


@dataclass(frozen=True)
class SearchOptions:
    """What a FindSimilar request asks for besides its query."""

    k: int = 0
    # Leave out the query's own product. None: the server's default, which is to leave it out for a query
    # by image id or product id and keep every product for a photo or vector query.
    exclude_query: bool | None = None
    search_k: int = 0
    group_size: int = 0
    with_attributes: bool = False
    filter: Filter = Filter()
    # Matches whose best image scores below this are left out (None: no threshold).
    score_threshold: float | None = None
    # MMR's trade-off in [0, 1] (0: the plain ranking) and how many relevant products it chooses among (the core
    # resolves 0 to its default).
    diversity: float = 0.0
    candidates: int = 0
    # Searching with the query averaged with its first results (image and vector queries only); None: the plain query.
    query_expansion: QueryExpansion | None = None

    def wanted(self, k: int) -> int:
        """How many products to fetch: k, or MMR's candidates."""
        return max(k, self.candidates) if self.diversity > 0 else k


@dataclass(frozen=True)
class Examples:
    """What a Recommend request recommends from: each example is a Query with exactly one field set."""

    positive: tuple[Query, ...] = ()
    negative: tuple[Query, ...] = ()
    strategy: str = AVERAGE_VECTOR
    # Leave out examples that are not in the served version (and name them) instead of NOT_FOUND.
    ignore_missing: bool = False


# Results are named tuples, immutable as frozen dataclasses are and made in half their time: a list answer makes
# twenty of them.
class ImageResult(NamedTuple):
    image_id: str
    distance: float
    score: float
    path: str
    label: str
    role: str


class ProductResult(NamedTuple):
    """A matched product: its best image, optionally its group of images, and its attributes."""

    product_id: str  # "" for a version built before products
    image: ImageResult
    images: list[ImageResult]
    attributes: dict[str, str]

    @property
    def score(self) -> float:
        return self.image.score

    @property
    def distance(self) -> float:
        return self.image.distance


class Ranked(list):
    """Results best first, and the plan that found them (a search's plan, or the neighbour list)."""

    def __init__(self, results, plan: str) -> None:
        super().__init__(results)
        self.plan = plan


@dataclass(frozen=True)
class Answer:
    """Matches, the index version and the availability version that answered; from
    Recommend, also the example ids the version does not hold (with ignore_missing)."""

    results: list[ProductResult]
    version: str
    availability_version: int = 0
    missing_product_ids: list[str] = field(default_factory=list)
    missing_image_ids: list[str] = field(default_factory=list)
    # How the results were found (server/search.py PLANS, NEIGHBOUR_LIST, RESULT_CACHE); "" when not told.
    plan: str = ""
    # The last of the version's deltas (products added since its build) the answer includes; 0: none.
    delta_sequence: int = 0


class HiddenProducts:
    """One availability state, as a mask over each served version's products and over its fresh products (computed
    once per version and per delta sequence)."""

    def __init__(self, availability: Availability) -> None:
        self.availability = availability
        self._masks: dict[str, np.ndarray | None] = {}

    @property
    def version(self) -> int:
        return self.availability.version

    def mask(self, version: ServedVersion) -> np.ndarray | None:
        """True for the hidden products of `version`; None when none of its products is hidden."""
        return self._mask_of(version.name, version.catalogue)

    def fresh_mask(self, version: ServedVersion) -> np.ndarray | None:
        """True for the hidden products among `version`'s fresh products (its deltas'); None when none is."""
        if version.fresh is None:
            return None
        return self._mask_of(version.fresh_key, version.fresh.catalogue)

    def _mask_of(self, key: str, catalogue) -> np.ndarray | None:
        # Index threads and the event loop share the dict: each step is one operation on it (atomic under the GIL),
        # and a mask worked out twice at once is the same mask.
        if key in self._masks:
            return self._masks[key]
        rows = catalogue.product_ids.find(sorted(self.availability.hidden)) if catalogue.has_products else []
        mask = None
        if len(rows):
            mask = np.zeros(catalogue.product_count, bool)
            mask[rows] = True
        self._masks[key] = mask
        return mask

    def forget(self, version_name: str, keep_fresh: str | None = None) -> None:
        """Drops a retired version's masks (each version served would otherwise keep one until availability changes),
        or with keep_fresh, those of its fresh products but the named state's (the earlier delta sequences)."""
        prefix = f"{version_name}+"
        for key in list(self._masks):
            if (key.startswith(prefix) and key != keep_fresh) or (keep_fresh is None and key == version_name):
                self._masks.pop(key, None)

    def count(self, version: ServedVersion) -> int:
        masks = (self.mask(version), self.fresh_mask(version))
        return sum(int(mask.sum()) for mask in masks if mask is not None)


class _Resolved(NamedTuple):
    """A query made ready for search: its vectors ([m, D], unit), the products that are its own (when asked
    to leave them out), and its neighbour list when the version has one for exactly this query."""

    vectors: np.ndarray
    own_products: list[int]
    list_position: tuple[str, int] | None = None  # ("product" | "image", row of the list)
    own_fresh: tuple[int, ...] = ()  # the query's own products among the fresh ones (server/fresh.py)


def eligible_products(version: ServedVersion, hidden: HiddenProducts, filter_: Filter,
                      own_products: list[int]) -> np.ndarray | None:
    """The version's products a result may come from, worked out once per request: the filter's clauses, not
    hidden, not replaced by a delta, not excluded, not the query's own. None: every product."""
    superseded = None if version.fresh is None else version.fresh.superseded
    return _eligible(version.catalogue, filter_, own_products, hidden.mask(version), superseded)


def fresh_eligible(version: ServedVersion, hidden: HiddenProducts, filter_: Filter,
                   own_fresh: tuple[int, ...]) -> np.ndarray | None:
    """The same for the version's fresh products (its deltas')."""
    return _eligible(version.fresh.catalogue, filter_, list(own_fresh), hidden.fresh_mask(version))


def _eligible(catalogue, filter_: Filter, own_products: list[int], *out: np.ndarray | None) -> np.ndarray | None:
    mask = catalogue.filters.allowed(filter_)
    for left_out in out:
        if left_out is not None:
            mask = ~left_out if mask is None else mask & ~left_out
    excluded = catalogue.filters.excluded_rows(filter_)
    if len(excluded) or own_products:
        mask = np.ones(catalogue.product_count, bool) if mask is None else mask
        mask[excluded] = False
        mask[np.asarray(own_products, np.int64)] = False
    return mask


def listed_eligible(version: ServedVersion, hidden: HiddenProducts, filter_: Filter, own_products: list[int],
                    products: np.ndarray) -> np.ndarray:
    """Which entries of a neighbour list (product rows, -1 past its end) a result may come from: eligible_products's
    rule looked up for the list's entries alone, so that a list answer costs the same whatever the catalogue's size
    (eligible_products builds a mask over every product as soon as the query's own product is left out)."""
    eligible = products >= 0
    superseded = None if version.fresh is None else version.fresh.superseded
    masks = [(keep, mask) for keep, mask in ((True, version.catalogue.filters.allowed(filter_) if filter_ else None),
                                             (False, hidden.mask(version)), (False, superseded)) if mask is not None]
    # The padding (-1) looks up product 0 and `eligible` already drops it; without masks no look-up is needed.
    listed = np.where(eligible, products, 0) if masks or filter_.exclude_product_ids else products
    for keep, mask in masks:
        eligible &= mask[listed] if keep else ~mask[listed]
    if filter_.exclude_product_ids:
        eligible &= ~np.isin(listed, version.catalogue.filters.excluded_rows(filter_))
    for product in own_products:
        eligible &= listed != product
    return eligible


def unmasked_head(products: np.ndarray, rows: np.ndarray, own_products: list[int],
                  wanted: int) -> tuple[list[int], list[int]] | None:
    """walk_list's first `wanted` entries (their products and best rows) when nothing but the query's own products
    is left out: read from the head of the list in Python, a dozen entries costing less than numpy calls over the
    list. None when the head holds fewer (a padded or short list): walk_list then tells."""
    end = wanted + len(own_products)
    head = products[:end].tolist()
    kept = [position for position, product in enumerate(head) if product >= 0 and product not in own_products]
    if len(kept) < wanted:
        return None
    del kept[wanted:]
    head_rows = rows[:end].tolist()
    return [head[position] for position in kept], [head_rows[position] for position in kept]


def walk_list(products: np.ndarray, scores: np.ndarray, eligible: np.ndarray | None, k: int,
              score_threshold: float | None) -> np.ndarray | None:
    """The positions in a neighbour list of its first k eligible entries (best first; `eligible` per entry, None:
    every product listed), or None when the list cannot tell: it runs out before k and the products past its end
    might qualify."""
    present = products >= 0
    eligible = present if eligible is None else eligible & present
    if score_threshold is not None:
        eligible = eligible & (scores >= score_threshold)
    found = np.flatnonzero(eligible)[:k]
    if len(found) >= k:
        return found
    # A padded list holds every product; past a threshold nothing further can pass.
    exhausted = not present.all() or (score_threshold is not None and bool(scores[-1] < score_threshold))
    return found if exhausted else None


class QueryEngine:
    """Answers resolved requests on one version, in the calling thread: the core decides which thread."""

    def __init__(self, product_query: str = "mean", observer=None) -> None:
        if product_query not in PRODUCT_QUERIES:
            raise ValueError(f"product_query must be one of {PRODUCT_QUERIES}")
        self.product_query = product_query
        self._observer = observer

    def _plan(self, plan: str) -> None:
        if self._observer is not None:
            self._observer.plan_chosen(plan)

    def from_list(self, version: ServedVersion, hidden: HiddenProducts, query: Query, options: SearchOptions,
                  k: int) -> Ranked | None:
        """The answer from the version's neighbour lists, or None when the lists cannot give it (no lists, a
        photo or vector query, a list that runs short of eligible products): then search."""
        if version.neighbours is None or not query.by_id:
            return None
        resolved = self.resolve(version, query, self._exclude(query, options))
        if resolved.list_position is None:
            return None
        kind, row = resolved.list_position
        products, best_rows, scores = version.neighbours.list_of(kind, row)
        threshold = options.score_threshold
        wanted = options.wanted(k)  # with diversity, MMR's candidates come from the list too
        scorer = NearestScorer(resolved.vectors)
        # The common answer (a product page's "more like this"): each product by the best image its list names,
        # scored again exactly and rendered from lists, with no hit objects between.
        best_only = options.group_size <= 1 and options.diversity == 0 and version.fresh is None
        if best_only and threshold is None and not options.filter and hidden.mask(version) is None:
            head = unmasked_head(products, best_rows, resolved.own_products, wanted)
            if head is not None:
                self._plan(NEIGHBOUR_LIST)
                return self._best_rows(version, scorer, *head, options, k)
        eligible = listed_eligible(version, hidden, options.filter, resolved.own_products, products)
        if threshold is None:
            found = walk_list(products, scores, eligible, wanted, None)
        else:
            # The builder's scores and the served ones may differ in the last bits (another matrix product): the
            # walk also takes the entries this close to the threshold, and their served scores decide. At least
            # `wanted` of what it takes are then clear of the threshold, unless the list ends first.
            near = int(np.count_nonzero(np.abs(scores - threshold) < SCORE_TOLERANCE))
            found = walk_list(products, scores, eligible, wanted + near, threshold - SCORE_TOLERANCE)
        if found is None:
            return None
        self._plan(NEIGHBOUR_LIST)
        if best_only:
            return self._best_rows(version, scorer, products[found].tolist(), best_rows[found].tolist(), options, k)
        if options.group_size <= 1:
            # The list names each product's best image: scored again exactly, no other image of it is read.
            hits = version.index.describe_rows(scorer, products[found], best_rows[found])
        else:
            hits = version.index.describe(scorer, products[found], options.group_size)
        if threshold is not None:
            hits = [hit for hit in hits if hit.score >= threshold][:wanted]
        hits = self._with_fresh(version, hidden, scorer, resolved.own_fresh, options, wanted, hits)
        return self.results(version, hits, options, k, NEIGHBOUR_LIST)

    @staticmethod
    def _best_rows(version: ServedVersion, scorer: Scorer, products: list[int], rows: list[int],
                   options: SearchOptions, k: int) -> Ranked:
        """describe_rows, the threshold and results() in one, for products of the version's own catalogue given
        with their best rows: the same answer (describe_rows's scores, distances and order) without a ProductHit
        per product, from Python lists once the rows are scored (a dozen entries cost less than numpy calls)."""
        vectors = version.index.vectors[rows]
        scored = scorer.scores(vectors)
        scores, distances = scored.tolist(), scorer.distances(vectors).tolist()
        # describe_rows's order, np.argsort(-scores, kind="stable"): best first, equal scores in list order (sorted
        # is stable, reversed too).
        order = sorted(range(len(rows)), key=scores.__getitem__, reverse=True)
        if options.score_threshold is not None:
            passing = (scored >= options.score_threshold).tolist()  # numpy's comparison (float32), as before
            order = [position for position in order if passing[position]]
        del order[k:]
        rows, products = [rows[position] for position in order], [products[position] for position in order]
        catalogue = version.index.catalogue
        ids, paths = catalogue.image_ids.take(rows), catalogue.paths.take(rows)
        labels, roles = catalogue.labels.take(rows), catalogue.roles.take(rows)
        product_ids = catalogue.product_ids.take(products) if catalogue.has_products else [""] * len(rows)
        distances, scores = [distances[position] for position in order], [scores[position] for position in order]
        images = list(map(ImageResult._make, zip(ids, distances, scores, paths, labels, roles, strict=True)))
        return Ranked([ProductResult(product_id, image, [image] if options.group_size else [],
                                     catalogue.attributes_of(product) if options.with_attributes else {})
                       for product_id, image, product in zip(product_ids, images, products, strict=True)],
                      NEIGHBOUR_LIST)

    @staticmethod
    def _with_fresh(version: ServedVersion, hidden: HiddenProducts, scorer: Scorer, own_fresh: tuple[int, ...],
                    options: SearchOptions, wanted: int, hits: list[ProductHit]) -> list[ProductHit]:
        """The version's best `wanted` hits merged with those of its fresh products, found by an exact scan: the
        best `wanted` of both (on equal scores the version's first)."""
        if version.fresh is None:
            return hits
        mask = fresh_eligible(version, hidden, options.filter, own_fresh)
        fresh = version.fresh.index.search(scorer, wanted, allowed=mask, group_size=options.group_size,
                                           score_threshold=options.score_threshold).hits
        return sorted(hits + fresh, key=lambda hit: -hit.score)[:wanted] if fresh else hits

    def find(self, version: ServedVersion, hidden: HiddenProducts, query: Query, options: SearchOptions,
             k: int, try_list: bool = True) -> Ranked:
        """The answer from the neighbour lists when they can give it (unless the caller tried them already),
        else from a search."""
        results = self.from_list(version, hidden, query, options, k) if try_list else None
        if results is not None:
            return results
        # A hidden product still works as a query ("alternatives to this sold-out product").
        resolved = self.resolve(version, query, self._exclude(query, options))
        vectors = resolved.vectors
        if options.query_expansion is not None:
            vectors = self.expand(version, hidden, vectors, resolved, options)
        return self.search(version, hidden, NearestScorer(vectors), resolved.own_products, options, k,
                           resolved.own_fresh)

    def expand(self, version: ServedVersion, hidden: HiddenProducts, vectors: np.ndarray, resolved: _Resolved,
               options: SearchOptions) -> np.ndarray:
        """The query ([1, D]) averaged with its first results' best images (fresh products included), each weighted
        by max(0, score)^alpha, the query by 1; unit length. The first search keeps the filter, the hidden and the
        own products, and drops what only shapes the answer (threshold, diversity, groups)."""
        expansion = options.query_expansion
        first = replace(options, score_threshold=None, diversity=0.0, candidates=0, group_size=0,
                        with_attributes=False, query_expansion=None)
        hits, _ = self._hits(version, hidden, NearestScorer(vectors), resolved.own_products, first,
                             expansion.results, resolved.own_fresh)
        if not hits:
            return vectors
        best_images = np.asarray([(hit.segment or version.index).vectors[int(hit.rows[0])] for hit in hits],
                                 np.float32)
        scores = np.asarray([hit.score for hit in hits], np.float64)
        weights = np.where(scores > 0, np.maximum(scores, 0) ** expansion.alpha, 0.0)
        expanded = vectors[0].astype(np.float64) + weights @ best_images.astype(np.float64)
        return unit(expanded).astype(np.float32)[None, :]

    @staticmethod
    def _exclude(query: Query, options: SearchOptions) -> bool:
        return query.by_id if options.exclude_query is None else options.exclude_query

    def search(self, version: ServedVersion, hidden: HiddenProducts, scorer: Scorer, own_products: list[int],
               options: SearchOptions, k: int, own_fresh: tuple[int, ...] = ()) -> Ranked:
        hits, plan = self._hits(version, hidden, scorer, own_products, options, options.wanted(k), own_fresh)
        self._plan(plan)
        return self.results(version, hits, options, k, plan)

    def _hits(self, version: ServedVersion, hidden: HiddenProducts, scorer: Scorer, own_products: list[int],
              options: SearchOptions, wanted: int, own_fresh: tuple[int, ...]) -> tuple[list[ProductHit], str]:
        """The best `wanted` eligible products of the version and its fresh ones, and the version's search plan."""
        mask = eligible_products(version, hidden, options.filter, own_products)
        result = version.index.search(scorer, wanted, allowed=mask, search_k=options.search_k,
                                      group_size=options.group_size, score_threshold=options.score_threshold)
        return self._with_fresh(version, hidden, scorer, own_fresh, options, wanted, result.hits), result.plan

    def results(self, version: ServedVersion, hits: list[ProductHit], options: SearchOptions,
                k: int, plan: str = "") -> Ranked:
        """The k results from hits best first: the first k, or with diversity the k that MMR chooses among them
        by their best images' vectors."""
        if options.diversity > 0 and len(hits) > 1:
            best_images = np.asarray([(hit.segment or version.index).vectors[int(hit.rows[0])] for hit in hits],
                                     np.float32)
            # MMR weighs relevance against a cosine in [-1, 1]: scores that span more (sum_scores: up to P + N)
            # are brought to that scale, so that a diversity means the same whatever the strategy.
            relevance = np.asarray([hit.score for hit in hits], np.float64)
            relevance /= max(1.0, float(np.abs(relevance).max()))
            order = mmr(relevance, best_images, k, options.diversity)
            hits = [hits[position] for position in order]
        return Ranked([self.product_result(version, hit, options) for hit in hits[:k]], plan)

    def resolve(self, version: ServedVersion, query: Query, own: bool) -> _Resolved:
        """The vectors of a query and, when `own` is asked for, the products that are the query's own."""
        catalogue, index, fresh = version.catalogue, version.index, version.fresh
        if query.image_id is not None:
            rows = catalogue.rows_of_image(query.image_id)
            if fresh is not None and fresh.superseded is not None:
                # A replaced product's images are no longer served: only the delta's own, if it kept them.
                rows = rows[~fresh.superseded[catalogue.row_product[rows]]]
            fresh_rows = fresh.catalogue.rows_of_image(query.image_id) if fresh is not None else rows[:0]
            if not len(rows) and not len(fresh_rows):
                raise NotFound(f"image {query.image_id!r} is not in index version {version.name}")
            own_products = sorted({int(p) for p in catalogue.row_product[rows]}) if own else []
            own_fresh = tuple(sorted({int(p) for p in fresh.catalogue.row_product[fresh_rows]})) if own and len(
                fresh_rows) else ()
            if len(fresh_rows):
                return _Resolved(np.asarray(fresh.index.vectors[fresh_rows[:1]], np.float32), own_products, None,
                                 own_fresh)
            return _Resolved(np.asarray(index.vectors[rows[:1]], np.float32), own_products, ("image", int(rows[0])))
        if query.product_id is not None:
            if not catalogue.has_products:
                raise InvalidArgument(f"index version {version.name} was built before products existed: query by "
                                      f"image_id instead")
            product = None if fresh is None else fresh.catalogue.product_row(query.product_id)
            if product is not None:  # added or replaced by a delta: its images there, and no neighbour list
                vectors = self._product_vectors(fresh.index, product)
                return _Resolved(vectors, [], None, (product,) if own else ())
            product = catalogue.product_row(query.product_id)
            if product is None:
                raise NotFound(f"product {query.product_id!r} is not in index version {version.name}")
            position = ("product", product) if self.product_query == "mean" else None
            return _Resolved(self._product_vectors(index, product), [product] if own else [], position)
        vector = check_vector(query.vector, index.dimension)
        if not own:
            return _Resolved(vector[None, :], [])
        own_fresh = tuple(fresh.index.products_at(vector, EXCLUDE_DISTANCE)) if fresh is not None else ()
        return _Resolved(vector[None, :], index.products_at(vector, EXCLUDE_DISTANCE), None, own_fresh)

    def _product_vectors(self, index, product: int) -> np.ndarray:
        """A product's query vectors: its images' normalised mean (product_query "mean"), or each of them."""
        # A slice (the product's rows are contiguous), not a gather; np.mean's and np.linalg.norm's arithmetic without
        # their Python wrappers: the same bits as the builder's product_query_vectors (tested): a fraction of the time.
        start, count = index.catalogue.span(product)
        vectors = index.vectors[start:start + count]
        if self.product_query != "mean":
            return vectors
        if count != 1:  # the mean of one vector is that vector
            # np.mean divides the float32 sum in float64 and rounds to float32; float32's own division rounds the
            # same (float64 holds more than twice float32's precision), without a float64 loop and its casts.
            vectors = np.add.reduce(vectors, axis=0, keepdims=True) / np.float32(count)
        flat = vectors[0]
        # The float32 square root of the float32 dot product: math.sqrt's float64 root rounds to the same float32
        # (float64 holds more than twice float32's precision), which the division by a Python float rounds it to.
        return vectors / max(math.sqrt(flat.dot(flat)), 1e-12)

    def recommend(self, version: ServedVersion, hidden: HiddenProducts, examples: Examples, options: SearchOptions,
                  k: int) -> Answer:
        missing_products, missing_images, own, own_fresh = [], [], [], []
        sides = []
        for side in (examples.positive, examples.negative):
            vectors = []
            for example in side:
                try:
                    resolved = self.resolve(version, example, own=True)
                except NotFound:
                    if not example.by_id:
                        raise
                    (missing_products if example.product_id is not None else missing_images).append(
                        example.product_id or example.image_id)
                    continue
                vectors.append(resolved.vectors)
                own += resolved.own_products
                own_fresh += resolved.own_fresh
            sides.append(vectors)
        if (missing_products or missing_images) and not examples.ignore_missing:
            named = [f"product {p!r}" for p in missing_products] + [f"image {i!r}" for i in missing_images]
            raise NotFound(f"examples not in index version {version.name}: {', '.join(named)}")
        positive, negative = sides
        results = Ranked([], "")  # every example missing (ignore_missing): nothing searched
        if positive or (negative and examples.strategy != AVERAGE_VECTOR):
            dimension = version.index.dimension
            if examples.strategy == AVERAGE_VECTOR:
                # Each example weighs the same, however many images a product example has.
                means = [unit(v.mean(axis=0)) for v in positive], [unit(v.mean(axis=0)) for v in negative]
                try:
                    scorer = NearestScorer(average_vector(np.asarray(means[0]), np.asarray(means[1])))
                except ValueError as error:
                    raise InvalidArgument(str(error)) from None
            elif examples.strategy == SUM_SCORES:
                scorer = SumScoresScorer(positive, negative, dimension)
            else:
                def stack(vs: list[np.ndarray]) -> np.ndarray:
                    return np.concatenate(vs) if vs else np.zeros((0, dimension), np.float32)

                scorer = BestScoreScorer(stack(positive), stack(negative))
            results = self.search(version, hidden, scorer, own, options, k, tuple(own_fresh))
        return Answer(results, version.name, hidden.version, missing_products, missing_images, results.plan,
                      version.delta_sequence)

    @staticmethod
    def product_result(version: ServedVersion, hit: ProductHit, options: SearchOptions) -> ProductResult:
        catalogue = (hit.segment or version.index).catalogue
        ids, paths, labels, roles = catalogue.image_ids, catalogue.paths, catalogue.labels, catalogue.roles
        images = [ImageResult(ids[row], distance, score, paths[row], labels[row], roles[row])
                  for row, score, distance in zip(hit.rows.tolist(), hit.scores.tolist(), hit.distances.tolist(),
                                                  strict=True)]
        return ProductResult(
            product_id=catalogue.product_ids[hit.product_row] if catalogue.has_products else "",
            image=images[0], images=images[:options.group_size],
            attributes=catalogue.attributes_of(hit.product_row) if options.with_attributes else {})


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def check_vector(vector: np.ndarray, dimension: int) -> np.ndarray:
    """A query vector of the served dimension, finite and non-zero, made unit length."""
    vector = np.asarray(vector, np.float32).ravel()
    if vector.shape[0] != dimension:
        raise InvalidArgument(f"vector has {vector.shape[0]} components; the served dimension is {dimension}")
    if not np.all(np.isfinite(vector)):
        raise InvalidArgument("vector has NaN or infinite components")
    if not vector.any():
        raise InvalidArgument("vector has zero length")
    with np.errstate(over="ignore", under="ignore"):
        norm = float(np.linalg.norm(vector))
    if norm == 0 or not math.isfinite(norm):
        # Finite components whose float32 sum of squares overflows or underflows: the same direction, brought to
        # where float32 holds it (only then: a vector of ordinary length keeps the bits it had).
        vector = vector / np.abs(vector).max()
        norm = float(np.linalg.norm(vector))
    return vector / norm
