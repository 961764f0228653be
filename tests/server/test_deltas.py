"""Deltas: products added or replaced since the build, published atomically and served beside the version's own
in every plan (neighbour lists, Annoy, exact, filters, groups, Recommend), hidden as any product, never half read."""

import json
import shutil
import threading

import numpy as np
import pytest

from lookalike import artifacts, deltas, tables
from lookalike.availability import Availability, change_availability
from lookalike.v1 import lookalike_pb2 as pb
from server.app import LookalikeServer, ServerConfig
from server.catalogue import Catalogue
from server.core import CoreConfig, SimilarityCore
from server.filters import Clause, Filter, Range
from server.fresh import DeltaFeed
from server.search import SearchConfig
from tests.server.fakes import close_in_process, fake_version, serve_in_process, with_lists

GROUPS = [[p, p + 20] for p in range(20)]  # 20 products of two images (item-p and its view item-(p+20))
COLOURS = {"color": ["red" if p % 2 else "blue" for p in range(20)]}


def publish(out, version, products: dict[str, list[tuple[str, np.ndarray]]], colour: dict | None = None,
            max_rows: int = deltas.DEFAULT_MAX_DELTA_ROWS, weight: dict | None = None) -> int:
    """A delta as `add` writes it: product id -> [(image id, vector)], main image first (of CURRENT's version)."""
    (out / version).mkdir(exist_ok=True)
    if not (out / artifacts.CURRENT).exists():
        artifacts.write_current(out, version)
    staging = deltas.staging_folder(out, version)
    image_rows, product_rows, vectors = [], [], []
    for product_row, (product_id, images) in enumerate(products.items()):
        product_rows.append({"product_row": product_row, "product_id": product_id, "main_image_id": images[0][0],
                             "first_row": len(image_rows), "image_count": len(images),
                             "color": (colour or {}).get(product_id), "weight": (weight or {}).get(product_id)})
        for position, (image_id, vector) in enumerate(images):
            image_rows.append({"row": len(image_rows), "image_id": image_id, "product_row": product_row,
                               "product_id": product_id, "role": "main" if position == 0 else "other",
                               "path": f"zz/{image_id}.png", "label": None, "label_name": None, "sha256": "0" * 64})
            vectors.append(vector)
    columns = lambda rows, names: {name: [row[name] for row in rows] for name in names}  # noqa: E731
    tables.write_table(staging / artifacts.IMAGES_FILE, columns(image_rows, tables.IMAGE_COLUMNS),
                       tables.IMAGES_SCHEMA)
    tables.write_table(staging / artifacts.PRODUCTS_FILE,
                       columns(product_rows, [*tables.PRODUCT_COLUMNS, "color", "weight"]),
                       tables.products_schema(["color"], ["weight"]))
    np.save(staging / artifacts.VECTORS_FILE, np.asarray(vectors, np.float32), allow_pickle=False)
    manifest = {"catalogue_root": str(out), "image_folder": "small", "attribute_keys": ["color"],
                "number_keys": ["weight"],
                "counts": {"products": len(products), "images": len(image_rows)}}
    return deltas.publish_delta(out, version, staging, manifest, max_rows)[0]


def unit(vector):
    return (vector / np.linalg.norm(vector)).astype(np.float32)


@pytest.fixture(params=[10_000, 0], ids=["exact", "annoy"])
async def served(tmp_path, request):
    stub, images, metrics, parts = await serve_in_process(tmp_path, groups=GROUPS, attributes=COLOURS,
                                                          config=SearchConfig(exact_max_rows=request.param))
    core = parts[2]
    feed = DeltaFeed(tmp_path, core.version.name, core.version.catalogue, core.version.index.dimension)

    async def apply():
        fresh, added, error = feed.update()
        assert error is None
        if added:
            assert await core.apply_fresh(core.version.name, fresh)

    yield stub, core, tmp_path, apply
    await close_in_process(parts)


def _vector(core, image_id):
    catalogue = core.version.catalogue
    return np.asarray(core.version.index.vectors[catalogue.rows_of_image(image_id)[0]])


def _products(response):
    return [m.product_id for m in response.matches]


async def test_an_added_product_is_found_by_id_by_image_and_for_a_similar_product(served):
    stub, core, out, apply = served
    near = unit(_vector(core, "item-005") + 0.01 * _vector(core, "item-006"))
    publish(out, core.version.name, {"new-001": [("new-img-1", near)]}, {"new-001": "red"})
    before = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-005", k=3))
    assert "new-001" not in _products(before) and before.delta_sequence == 0
    await apply()
    by_neighbour = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-005", k=3))
    assert by_neighbour.delta_sequence == 1 and "new-001" in _products(by_neighbour)
    by_id = await stub.FindSimilar(pb.FindSimilarRequest(product_id="new-001", k=3, with_attributes=True))
    assert _products(by_id)[0] == "prod-005" and "new-001" not in _products(by_id)
    by_image_id = await stub.FindSimilar(pb.FindSimilarRequest(image_id="new-img-1", k=3))
    assert _products(by_image_id)[0] == "prod-005"
    by_vector = await stub.FindSimilar(pb.FindSimilarRequest(vector=pb.Vector(values=near.tolist()), k=2,
                                                             with_attributes=True))
    found = by_vector.matches[_products(by_vector).index("new-001")]  # tied with prod-005 in float32, or first
    assert found.image_id == "new-img-1" and found.score == pytest.approx(1, abs=1e-5)
    assert found.attributes["color"] == "red" and found.path == "zz/new-img-1.png"
    recommended = await stub.Recommend(pb.RecommendRequest(positive=[pb.Example(product_id="new-001")], k=3))
    assert recommended.delta_sequence == 1 and _products(recommended)[0] == "prod-005"
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert (info.delta_sequence, info.delta_product_count, info.delta_image_count) == (1, 1, 1)


async def test_a_replaced_product_matches_its_new_photos_only(served):
    stub, core, out, apply = served
    photo_of_12 = _vector(core, "item-012")
    publish(out, core.version.name, {"prod-007": [("new-img-7", photo_of_12)]})
    await apply()
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-012", k=5, group_size=2))
    assert _products(response)[0] == "prod-007" and _products(response).count("prod-007") == 1
    assert [image.image_id for image in response.matches[0].images] == ["new-img-7"]
    own = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-007", k=1))
    assert _products(own) == ["prod-012"]  # its new photo, not its old one
    with pytest.raises(Exception, match="item-007"):  # the old images are no longer served
        await stub.FindSimilar(pb.FindSimilarRequest(image_id="item-007", k=1))
    old = pb.Vector(values=_vector(core, "item-007").tolist())
    old_photo = await stub.FindSimilar(pb.FindSimilarRequest(vector=old, k=3))
    assert "prod-007" not in _products(old_photo)[:1]


async def test_later_deltas_replace_earlier_ones_and_hidden_stays_hidden(served):
    stub, core, out, apply = served
    publish(out, core.version.name, {"new-001": [("a-1", _vector(core, "item-003"))]})
    await apply()
    core.set_availability(Availability(1, {"new-001": {"reason": "blocked"}}))
    hidden = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-003", k=3))
    assert "new-001" not in _products(hidden) and hidden.availability_version == 1
    views = [("b-1", _vector(core, "item-009")), ("b-2", _vector(core, "item-029"))]
    publish(out, core.version.name, {"new-001": views})
    await apply()
    assert "new-001" not in _products(await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-009", k=3)))
    core.set_availability(Availability(2, {}))
    shown = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-009", k=3, group_size=3))
    assert shown.delta_sequence == 2 and "new-001" in _products(shown)
    match = shown.matches[_products(shown).index("new-001")]
    assert sorted(image.image_id for image in match.images) == ["b-1", "b-2"]
    with pytest.raises(Exception, match="a-1"):
        await stub.FindSimilar(pb.FindSimilarRequest(image_id="a-1", k=1))


async def test_filters_groups_and_thresholds_apply_to_added_products(served):
    stub, core, out, apply = served
    publish(out, core.version.name, {"new-red": [("r-1", _vector(core, "item-004"))],
                                     "new-blue": [("b-1", _vector(core, "item-004"))]},
            {"new-red": "red", "new-blue": "blue"})
    await apply()
    red = pb.Filter(clauses=[pb.Clause(key="color", any_of=["red"])])
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=4, filter=red,
                                                            with_attributes=True))
    assert "new-red" in _products(response) and "new-blue" not in _products(response)
    assert {m.attributes["color"] for m in response.matches} == {"red"}
    excluded = pb.Filter(exclude_product_ids=["new-red", "new-blue"])
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=4, filter=excluded))
    assert {"new-red", "new-blue"}.isdisjoint(_products(response))
    close = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-004", k=10, score_threshold=0.999))
    assert set(_products(close)) >= {"new-red", "new-blue"}
    assert all(m.score >= 0.999 for m in close.matches)


async def test_neighbour_list_answers_include_added_products(served):
    stub, core, out, apply = served
    with_lists(core.version, 10)
    publish(out, core.version.name, {"new-001": [("n-1", _vector(core, "item-011"))]})
    await apply()
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-011", k=3))
    assert response.plan == "neighbour_list" and _products(response)[0] == "new-001"
    by_image = await stub.FindSimilar(pb.FindSimilarRequest(image_id="item-031", k=3))
    assert by_image.plan == "neighbour_list" and "new-001" in _products(by_image)


async def test_an_unreadable_delta_keeps_what_was_served(served):
    stub, core, out, apply = served
    publish(out, core.version.name, {"new-001": [("n-1", _vector(core, "item-001"))]})
    await apply()
    publish(out, core.version.name, {"new-002": [("n-2", _vector(core, "item-002"))]})
    second = deltas.list_deltas(out, core.version.name)[-1][1]
    (second / artifacts.VECTORS_FILE).write_bytes(b"broken")
    feed = DeltaFeed(out, core.version.name, core.version.catalogue, core.version.index.dimension)
    fresh, added, error = feed.update()
    assert added and fresh.sequence == 1 and "sha256" in error
    assert feed.update()[2] is None  # said once, not at every check
    response = await stub.FindSimilar(pb.FindSimilarRequest(product_id="prod-001", k=3))
    assert response.delta_sequence == 1 and "new-001" in _products(response)


def test_publish_numbers_deltas_and_refuses_past_max_rows(tmp_path):
    vector = unit(np.ones(8))
    assert publish(tmp_path, "v1", {"a": [("a-1", vector)]}) == 1
    assert publish(tmp_path, "v1", {"b": [("b-1", vector), ("b-2", vector)]}, max_rows=3) == 2
    with pytest.raises(deltas.DeltaError, match="run a build"):
        publish(tmp_path, "v1", {"c": [("c-1", vector)]}, max_rows=3)
    assert [s for s, _ in deltas.list_deltas(tmp_path, "v1")] == [1, 2]
    assert not list(deltas.deltas_dir(tmp_path, "v1").glob(".staging-*"))  # the refused one left nothing
    manifest = json.loads((deltas.list_deltas(tmp_path, "v1")[1][1] / deltas.DELTA_MANIFEST).read_text())
    assert manifest["sequence"] == 2 and manifest["version"] == "v1"
    assert set(deltas.DELTA_FILES) <= set(manifest["files"])
    assert deltas.read_delta(deltas.list_deltas(tmp_path, "v1")[1][1], 8).rows == 2


def test_concurrent_adds_are_serialised(tmp_path):
    vector = unit(np.ones(8))
    errors = []

    def add(n):
        try:
            publish(tmp_path, "v1", {f"p-{n}": [(f"i-{n}", vector)]})
        except Exception as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    published = deltas.list_deltas(tmp_path, "v1")
    assert [s for s, _ in published] == [1, 2, 3, 4, 5, 6]
    ids = {deltas.read_delta(path).products.column("product_id")[0].as_py() for _, path in published}
    assert ids == {f"p-{n}" for n in range(6)}


def test_a_killed_add_leaves_no_delta_visible(tmp_path):
    staging = deltas.staging_folder(tmp_path, "v1")  # killed while writing: only its staging folder is left
    (staging / artifacts.VECTORS_FILE).write_bytes(b"half")
    assert deltas.list_deltas(tmp_path, "v1") == []
    assert publish(tmp_path, "v1", {"a": [("a-1", unit(np.ones(8)))]}) == 1  # the next add is not disturbed
    assert deltas.remove_stale_staging(tmp_path, older_than_s=3600) == 0  # young: perhaps still running
    assert deltas.remove_stale_staging(tmp_path, older_than_s=-1) == 1
    assert [s for s, _ in deltas.list_deltas(tmp_path, "v1")] == [1]


def test_a_delta_of_a_version_no_longer_current_is_refused_and_numbers_are_never_reused(tmp_path):
    vector = unit(np.ones(8))
    assert publish(tmp_path, "v1", {"a": [("a-1", vector)]}) == 1
    assert publish(tmp_path, "v1", {"b": [("b-1", vector)]}) == 2
    latest = deltas.list_deltas(tmp_path, "v1")[-1][1]
    shutil.rmtree(latest)  # removed by hand: a replica may have applied it already
    assert publish(tmp_path, "v1", {"c": [("c-1", vector)]}) == 3
    (tmp_path / "v2").mkdir()
    artifacts.write_current(tmp_path, "v2")  # a build or rollback moved CURRENT while add embedded
    with pytest.raises(deltas.DeltaError, match="CURRENT moved from v1 to v2"):
        publish(tmp_path, "v1", {"d": [("d-1", vector)]})
    assert [s for s, _ in deltas.list_deltas(tmp_path, "v1")] == [1, 3]


async def test_the_watch_goes_on_when_a_check_fails(tmp_path, caplog):
    version, _ = fake_version(tmp_path, groups=GROUPS)
    artifacts.write_current(tmp_path, version.name)
    server = LookalikeServer(ServerConfig(artifacts=tmp_path, metrics_port=-1))
    server.core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000))
    server._feed = DeltaFeed(tmp_path, version.name, version.catalogue, version.index.dimension)
    try:
        (tmp_path / deltas.DELTAS_DIR).mkdir()
        (tmp_path / deltas.DELTAS_DIR / version.name).write_text("a file where the deltas folder should be")
        change_availability(tmp_path, hide=["prod-003"])
        await server.check_all()
        assert server.core.hidden.version == 1  # the other checks ran
        assert server.metrics.delta_reads.labels("refused")._value.get() == 1
        assert "cannot be listed" in caplog.text

        async def broken():
            raise RuntimeError("something nobody expected")

        server.check_deltas = broken
        change_availability(tmp_path, hide=["prod-004"])
        await server.check_all()  # logged, not raised: the watch loop calling it goes on
        assert server.core.hidden.version == 2 and "something nobody expected" in caplog.text
    finally:
        await server.core.close()


def test_added_products_keep_the_versions_number_attributes(tmp_path):
    base = Catalogue(["i-0", "i-1"], ["aa/i-0.png", "aa/i-1.png"], ["", ""], ["main", "main"], np.arange(2),
                     ["p-0", "p-1"], np.arange(2), np.ones(2, np.int64), {"color": ["red", None]},
                     numbers={"weight": np.array([1.5, np.nan])})
    publish(tmp_path, "v1", {"new-a": [("n-a", unit(np.ones(8)))], "new-b": [("n-b", unit(np.ones(8)))]},
            {"new-a": "blue"}, weight={"new-a": 2.5})
    fresh, added, error = DeltaFeed(tmp_path, "v1", base, 8).update()
    filters = fresh.catalogue.filters
    assert added and error is None and filters.kind("weight") == "number" and filters.kind("color") == "string"
    assert filters.attributes_of(0) == {"color": "blue", "weight": "2.5"} and filters.attributes_of(1) == {}
    heavy = Filter((Clause("weight", range=Range(gte=2.0)),))
    assert filters.allowed(heavy).tolist() == [True, False]
