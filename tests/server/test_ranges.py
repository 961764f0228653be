"""Range clauses over number attributes through the real servicer: every operator, with string clauses, the plan a
selective range gets, GetInfo's kinds and bounds, and every mistake named."""

import grpc
import numpy as np
import pytest

from lookalike.v1 import lookalike_pb2 as pb
from server.filters import Range
from server.search import SearchConfig
from tests.server.fakes import close_in_process, serve_in_process

PRODUCTS = 40
# Product p weighs p / 4 pounds, but every tenth has no weight; years cycle through 2010..2019.
WEIGHTS = [None if p % 10 == 0 else p / 4 for p in range(PRODUCTS)]
YEARS = [2010 + p % 10 for p in range(PRODUCTS)]
COLORS = ["Black" if p % 2 == 0 else "Blue" for p in range(PRODUCTS)]
EXACT_MAX_ROWS = 10


@pytest.fixture
async def served(tmp_path):
    stub, _, _, parts = await serve_in_process(
        tmp_path, config=SearchConfig(exact_max_rows=EXACT_MAX_ROWS), attributes={"color": COLORS},
        numbers={"weight": WEIGHTS, "year": YEARS})
    yield stub, parts[2].version.index
    await close_in_process(parts)


def _query(index, product: int) -> pb.Vector:
    return pb.Vector(values=index.vectors[int(index.catalogue.first_row[product])].tolist())


def _expected(index, product: int, passes, k: int) -> list[str]:
    """Exact filtered search: every passing product by its score, best first."""
    query = index.vectors[product]
    scored = sorted((float(index.vectors[p] @ query), p) for p in range(PRODUCTS) if passes(p))
    return [f"prod-{p:03d}" for _, p in sorted(scored, key=lambda pair: -pair[0])[:k]]


def _similar(index, product: int, k: int, *clauses: pb.Clause) -> pb.FindSimilarRequest:
    return pb.FindSimilarRequest(vector=_query(index, product), k=k, with_attributes=True,
                                 filter=pb.Filter(clauses=list(clauses)))


def _in(weight, **bounds):
    if weight is None:
        return False
    tests = {"gt": weight > bounds.get("gt", -np.inf), "gte": weight >= bounds.get("gte", -np.inf),
             "lt": weight < bounds.get("lt", np.inf), "lte": weight <= bounds.get("lte", np.inf)}
    return all(tests.values())


@pytest.mark.parametrize("bounds", [{"gt": 5}, {"gte": 5}, {"lt": 2}, {"lte": 2}, {"gt": 1, "lte": 3.5},
                                    {"gte": 2, "gt": 2, "lt": 9, "lte": 8.75}])
async def test_every_operator_keeps_exactly_the_products_in_range(served, bounds):
    stub, index = served
    response = await stub.FindSimilar(_similar(index, 7, 40, pb.Clause(key="weight", range=pb.Range(**bounds))))
    expected = _expected(index, 7, lambda p: _in(WEIGHTS[p], **bounds), 40)
    assert [m.product_id for m in response.matches] == expected and expected
    assert all(_in(float(m.attributes["weight"]), **bounds) for m in response.matches)


async def test_ranges_and_string_clauses_and_together(served):
    stub, index = served
    request = _similar(index, 3, 40, pb.Clause(key="weight", range=pb.Range(lt=6)),
                       pb.Clause(key="year", range=pb.Range(gte=2013)), pb.Clause(key="color", any_of=["Blue"]))
    response = await stub.FindSimilar(request)
    passes = lambda p: _in(WEIGHTS[p], lt=6) and YEARS[p] >= 2013 and COLORS[p] == "Blue"  # noqa: E731
    assert [m.product_id for m in response.matches] == _expected(index, 3, passes, 40)
    assert {m.attributes["color"] for m in response.matches} == {"Blue"}
    recommend = await stub.Recommend(pb.RecommendRequest(
        positive=[pb.Example(product_id="prod-003")], k=40, filter=request.filter))
    assert {m.product_id for m in recommend.matches} == set(_expected(index, 3, passes, 40)) - {"prod-003"}


async def test_a_selective_range_is_searched_exactly_and_a_broad_one_through_the_index(served):
    """The plan follows the rows a range lets through, counted from the sorted values (as any_of's posting lists)."""
    stub, index = served
    selective = pb.Clause(key="weight", range=pb.Range(lt=1.5))  # products 1..5: under exact_max_rows
    assert index.catalogue.filters.numbers("weight").count(Range(lt=1.5)) == 5
    response = await stub.FindSimilar(_similar(index, 20, 10, selective))
    assert response.plan == "exact"
    assert [m.product_id for m in response.matches] == _expected(index, 20, lambda p: _in(WEIGHTS[p], lt=1.5), 10)
    broad = pb.Clause(key="weight", range=pb.Range(gte=1.5))  # 30 products, over exact_max_rows
    response = await stub.FindSimilar(_similar(index, 20, 5, broad))
    assert response.plan == "annoy"
    assert [m.product_id for m in response.matches] == _expected(index, 20, lambda p: _in(WEIGHTS[p], gte=1.5), 5)


async def test_info_gives_each_keys_kind_and_a_numbers_bounds(served):
    stub, _ = served
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert list(info.attribute_keys) == ["color", "weight", "year"]
    attributes = {a.key: a for a in info.attributes}
    assert [a.key for a in info.attributes] == list(info.attribute_keys)
    assert attributes["color"].kind == "string" and not attributes["color"].HasField("min")
    assert attributes["color"].product_count == PRODUCTS
    weight = attributes["weight"]
    assert (weight.kind, weight.product_count, weight.min, weight.max) == ("number", 36, 0.25, 9.75)
    assert (attributes["year"].min, attributes["year"].max) == (2010, 2019)


@pytest.mark.parametrize(("clause", "message"), [
    (pb.Clause(key="height", range=pb.Range(lt=2)), "filter clause 1 ('height'): unknown attribute key; the keys are "
                                                    "color (string), weight (number), year (number)"),
    (pb.Clause(key="color", range=pb.Range(gt=1)), "'color' is a string attribute: give any_of or none_of values"),
    (pb.Clause(key="weight", any_of=["2.5"]), "'weight' is a number attribute: give a range (gt, gte, lt, lte)"),
    (pb.Clause(key="year", none_of=["2019"]), "'year' is a number attribute"),
    (pb.Clause(key="weight", range=pb.Range()), "filter clause 1 ('weight') is empty: give a range with gt, gte, lt "
                                                "or lte"),
    (pb.Clause(key="weight", range=pb.Range(gte=float("nan"))), "range gte is NaN"),
    (pb.Clause(key="weight", none_of=["1"], range=pb.Range(lt=1)), "sets both none_of and range"),
])
async def test_every_mistake_is_invalid_argument_saying_which(served, clause, message):
    stub, index = served
    for request in (_similar(index, 1, 5, clause),
                    pb.RecommendRequest(positive=[pb.Example(product_id="prod-001")], filter=pb.Filter(
                        clauses=[clause]))):
        call = stub.FindSimilar(request) if isinstance(request, pb.FindSimilarRequest) else stub.Recommend(request)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
