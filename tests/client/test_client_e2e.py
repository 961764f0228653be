"""The library, async twin, CLI, load generator and Node.js client against one real server."""

import asyncio
import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from client import (
    AsyncImageSimilarityClient,
    DeadlineError,
    ImageSimilarityClient,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    any_of,
    none_of,
)
from lookalike import artifacts
from tests import helpers

pytestmark = pytest.mark.e2e
NODE_DIR = helpers.REPO / "client" / "node"


@pytest.fixture(scope="module")
def server(served):
    """The session's server on the shared build (conftest.served)."""
    return served.address, served.metrics_port


@pytest.fixture(scope="module")
def images(built):
    return pd.read_parquet(built / artifacts.read_current(built) / "images.parquet")


@pytest.fixture(scope="module")
def reference(built):
    """The built version's products and vectors, for exact numpy answers to compare the server with."""
    version = built / artifacts.read_current(built)
    products = pd.read_parquet(version / artifacts.PRODUCTS_FILE)
    vectors = np.load(version / artifacts.VECTORS_FILE)
    rows = [vectors[start:start + count] for start, count in zip(products["first_row"], products["image_count"],
                                                                    strict=True)]
    return products, rows


def _unit(vector):
    return vector / np.linalg.norm(vector)


def _ranked(reference, score, k, excluded=(), allowed=None):
    """Product ids by their best image's score, best first: what an exact server answers."""
    products, rows = reference
    best = [(float(score(r).max()), product_id) for product_id, r in zip(products["product_id"], rows, strict=True)
            if product_id not in excluded and (allowed is None or allowed(products.set_index("product_id"),
                                                                          product_id))]
    return [product_id for _, product_id in sorted(best, key=lambda pair: -pair[0])[:k]]


def _product_vector(reference, product_id):
    products, rows = reference
    return _unit(rows[int(np.flatnonzero(products["product_id"] == product_id)[0])].mean(axis=0))


def _cli(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([helpers.BIN / "lookalike", *map(str, args)], capture_output=True, text=True,
                          env=helpers.env(), timeout=120, check=check)


def test_every_call_of_the_sync_client(server, images, catalogue):
    address, _ = server
    with ImageSimilarityClient(address) as client:
        assert client.health() == "SERVING"
        assert client.info()["item_count"] == len(images)
        path = catalogue / "small" / images["path"][3]
        from_path, from_bytes, from_pil = (client.embed(path), client.embed(path.read_bytes()),
                                           client.embed(Image.open(path)))
        assert from_path.shape == (1, 128)
        assert np.allclose(from_path, from_bytes) and np.allclose(from_path, from_pil, atol=1e-5)
        matches = client.find_similar(path, k=3)  # exclude_query unset: the server keeps a photo's own product
        assert images["product_id"][3] in [m.product_id for m in matches] and len(matches) == 3
        matches = client.find_similar(path, k=3, exclude_query=True)
        assert images["product_id"][3] not in [m.product_id for m in matches] and len(matches) == 3
        with pytest.raises(InvalidArgumentError, match="INVALID_ARGUMENT"):
            client.find_similar(image_id=images["image_id"][0], k=5000)
        with pytest.raises(NotFoundError):
            client.find_similar(image_id="missing")
        by_old_name = client.find_similar(item_id=images["image_id"][3], k=3)  # the 0.1 keyword still works
        assert [m.product_id for m in by_old_name] == [m.product_id for m in client.find_similar(
            image_id=images["image_id"][3], k=3)]
        with pytest.raises(DeadlineError):
            client.embed([path] * 32, timeout_s=0.001)


def test_async_twin_matches_sync(server, images):
    address, _ = server

    async def run():
        async with AsyncImageSimilarityClient(address) as client:
            results = await asyncio.gather(*(client.find_similar(product_id=p, k=4) for p in products))
            return [[m.product_id for m in r] for r in results], await client.health()

    products = list(images["product_id"].unique()[:5])
    async_ids, status = asyncio.run(run())
    with ImageSimilarityClient(address) as client:
        assert async_ids == [[m.product_id for m in client.find_similar(product_id=p, k=4)] for p in products]
    assert status == "SERVING"


def test_unreachable_server_is_unavailable_after_retries():
    with ImageSimilarityClient(f"127.0.0.1:{helpers.free_port()}", timeout_s=5) as client:
        with pytest.raises(UnavailableError):
            client.info()


def test_cli_similar_prints_products_and_writes_a_contact_sheet(server, images, catalogue, tmp_path):
    address, _ = server
    item = images.iloc[10]
    sheet = tmp_path / "sheet.png"
    result = _cli("--address", address, "similar", "--image-id", item["image_id"], "-k", "5", "--catalogue",
                  catalogue, "--sheet", sheet)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"products like image {item['image_id']} ({item['label_name']})")
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and item["product_id"] not in result.stdout
    with Image.open(sheet) as image:
        assert image.size == (6 * 160, 206)  # the query and one tile per product
    as_json = json.loads(_cli("--address", address, "similar", "--product", item["product_id"], "--json",
                              "--with-attributes").stdout)
    products = [m["product_id"] for m in as_json["matches"]]
    assert len(products) == len(set(products)) == 10 and item["product_id"] not in products
    assert {"product_id", "image_id", "score", "distance"} <= set(as_json["matches"][0])
    assert "product_type" in as_json["matches"][0]["attributes"]
    old_flag = json.loads(_cli("--address", address, "similar", "--item", item["image_id"], "--json").stdout)
    assert [m["image_id"] for m in old_flag["matches"]][:3] == [
        m["image_id"] for m in json.loads(_cli("--address", address, "similar", "--image-id", item["image_id"],
                                               "--json").stdout)["matches"]][:3]
    assert _cli("--address", address, "health").stdout.strip() == "SERVING"
    assert json.loads(_cli("--address", address, "info", "--json").stdout)["dimension"] == 128
    bad = _cli("--address", address, "similar", "--product", "nope", check=False)
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def _requests_by_code(metrics_port):
    out = {}
    for key, value in helpers.scrape(metrics_port).items():
        if key.startswith("lookalike_requests_total{"):
            code = key.split("code=")[1].split(",")[0].rstrip("}")
            out[code] = out.get(code, 0) + value
    return out


def test_bench_counts_agree_with_server_metrics(server, catalogue, tmp_path):
    address, metrics_port = server
    catalogue = helpers.load_catalogue(catalogue, tmp_path / "clean")
    before = _requests_by_code(metrics_port)
    closed = json.loads(_cli("--address", address, "bench", "--catalogue", catalogue, "--requests", "60",
                             "--concurrency", "4", "--json", "--no-progress").stdout)
    opened = json.loads(_cli("--address", address, "bench", "--catalogue", catalogue, "--mode", "open", "--rate",
                             "40", "--duration-s", "1.5", "--mix", "id=3,product=3,embed=1", "--json",
                             "--no-progress").stdout)
    after = _requests_by_code(metrics_port)
    assert closed["requests"] == 60 and closed["codes"] == {"OK": 60}
    assert set(closed["latency"]) >= {"all", "embed", "image", "id"}
    sent = {code: closed["codes"].get(code, 0) + opened["codes"].get(code, 0)
            for code in set(closed["codes"]) | set(opened["codes"])}
    assert {code: after.get(code, 0) - before.get(code, 0) for code in sent} == sent


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_client_results_equal_python_client(server, images, catalogue):
    address, _ = server
    image_path = str(catalogue / "small" / images["path"][7])
    queries = [f"image:{i}" for i in images["image_id"][:2]] + [f"product:{p}" for p in images["product_id"][:2]]
    queries.append(image_path)
    queries.append(f"recommend:{images['product_id'][0]},{images['product_id'][5]}")
    result = subprocess.run(["node", NODE_DIR / "example.js", address, *queries], capture_output=True, text=True,
                            timeout=120, check=True)
    node = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(node) == len(queries)
    with ImageSimilarityClient(address) as client:
        for query, answer in zip(queries, node, strict=True):
            kind, _, value = query.partition(":")
            if kind == "image":
                python = client.find_similar(image_id=value, k=5)
            elif kind == "product":
                python = client.find_similar(product_id=value, k=5)
            elif kind == "recommend":
                python = client.recommend(value.split(","), k=5)
            else:
                python = client.find_similar(image_path, k=5)
            assert [m["productId"] for m in answer["matches"]] == [m.product_id for m in python]
            assert [m["imageId"] for m in answer["matches"]] == [m.image_id for m in python]
            assert np.allclose([m["distance"] for m in answer["matches"]], [m.distance for m in python], atol=1e-5)
            assert answer["indexVersion"] == python.version
    with ImageSimilarityClient(address) as client:
        product_type = client.find_similar(product_id=images["product_id"][0], k=1, exclude_query=False,
                                           with_attributes=True)[0].attributes["product_type"]
        python = client.find_similar(product_id=images["product_id"][1], k=5, filters={"product_type": product_type})
    filtered = subprocess.run(["node", NODE_DIR / "example.js", address, "--filter", f"product_type={product_type}",
                               f"product:{images['product_id'][1]}"], capture_output=True, text=True, timeout=120,
                              check=True)
    answer = json.loads(filtered.stdout)
    assert [m["productId"] for m in answer["matches"]] == [m.product_id for m in python]
    assert all(m["attributes"]["product_type"] == product_type for m in answer["matches"])


def test_filters_and_recommend_equal_exact_numpy_answers_on_the_real_artifacts(server, reference):
    address, _ = server
    products, _ = reference
    query = products[products["image_count"] > 1].iloc[0]
    kind = query["product_type"]

    def passes(table, product_id):
        return table.at[product_id, "product_type"] == kind and table.at[product_id, "color"] != "Black"

    vector = _product_vector(reference, query["product_id"])
    with ImageSimilarityClient(address) as client:
        filtered = client.find_similar(product_id=query["product_id"], k=5, with_attributes=True,
                                       filters=[any_of("product_type", kind), none_of("color", "Black")])
        assert [m.product_id for m in filtered] == _ranked(reference, lambda v: v @ vector, 5,
                                                            excluded={query["product_id"]}, allowed=passes)
        assert len(filtered) == 5 and all(m.attributes["product_type"] == kind for m in filtered)
        positive, negative = list(products["product_id"][1:3]), [products["product_id"][3]]
        averaged = client.recommend(positive, negative, k=6)
        target = _unit(2 * np.mean([_product_vector(reference, p) for p in positive], axis=0)
                       - _product_vector(reference, negative[0]))
        examples = {*positive, *negative}
        assert [m.product_id for m in averaged] == _ranked(reference, lambda v: v @ target, 6, examples)
        best = client.recommend(positive, negative, strategy="best_score", k=6)
        positives = np.stack([_product_vector(reference, p) for p in positive])
        negatives = _product_vector(reference, negative[0])[None, :]

        def best_score(v):
            top_positive, top_negative = (v @ positives.T).max(1), (v @ negatives.T).max(1)
            return np.where(top_positive > top_negative, top_positive, -top_negative ** 2)

        assert [m.product_id for m in best] == _ranked(reference, best_score, 6, examples)
        with pytest.raises(NotFoundError, match="product 'no-such-product'"):
            client.recommend([positive[0], "no-such-product"])
        kept = client.recommend([positive[0], "no-such-product"], ignore_missing=True, k=3)
        assert kept.missing_product_ids == ["no-such-product"] and len(kept) == 3


def test_cli_filters_and_recommend_print_the_library_answers(server, reference):
    address, _ = server
    products, _ = reference
    first, second, third = products["product_id"][:3]
    kind = products["product_type"][0]
    similar = json.loads(_cli("--address", address, "similar", "--product", first, "--filter",
                              f"product_type={kind}", "--filter", "color!=Black", "--exclude-product", second,
                              "-k", "4", "--json").stdout)
    recommended = json.loads(_cli("--address", address, "recommend", "--positive", first, "--positive", second,
                                  "--negative", third, "--strategy", "best_score", "-k", "4", "--json").stdout)
    with ImageSimilarityClient(address) as client:
        assert [m["product_id"] for m in similar["matches"]] == [m.product_id for m in client.find_similar(
            product_id=first, k=4, filters={"product_type": kind}, exclude_products=[second] + [
                p for p, c in zip(products["product_id"], products["color"], strict=True) if c == "Black"])]
        assert [m["product_id"] for m in recommended["matches"]] == [m.product_id for m in client.recommend(
            [first, second], [third], strategy="best_score", k=4)]
    assert {"product_id", "image_id", "score", "distance"} <= set(recommended["matches"][0])
    for args, message in ((["similar", "--product", first, "--filter", "colour"], "is not KEY=V1,V2"),
                          (["similar", "--product", first, "--filter", "colour=Black"], "unknown attribute key"),
                          (["recommend", "-k", "3"], "at least one positive")):
        bad = _cli("--address", address, *args, check=False)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_diversity_and_sum_scores_print_the_library_answers(server, reference):
    address, _ = server
    products, _ = reference
    first, second, third = products["product_id"][:3]
    similar = json.loads(_cli("--address", address, "similar", "--product", first, "--diversity", "0.5",
                              "--candidates", "20", "-k", "4", "--json").stdout)
    recommended = json.loads(_cli("--address", address, "recommend", "--positive", first, "--positive", second,
                                  "--negative", third, "--strategy", "sum_scores", "--diversity", "0.3",
                                  "--score-threshold", "1.2", "-k", "4", "--json").stdout)
    with ImageSimilarityClient(address) as client:
        assert [m["product_id"] for m in similar["matches"]] == [m.product_id for m in client.find_similar(
            product_id=first, k=4, diversity=0.5, candidates=20)]
        assert [m["product_id"] for m in recommended["matches"]] == [m.product_id for m in client.recommend(
            [first, second], [third], strategy="sum_scores", diversity=0.3, score_threshold=1.2, k=4)]
    assert all(m["score"] >= 1.2 for m in recommended["matches"])
    for args, message in ((["similar", "--product", first, "--diversity", "2"], "diversity must be in 0..1"),
                          (["similar", "--product", first, "--diversity", "0.5", "--candidates", "3"],
                           "candidates must be in k..2000")):
        bad = _cli("--address", address, *args, check=False)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_a_region_query_equals_the_cropped_image_with_the_real_model(server, images, catalogue, tmp_path):
    address, _ = server
    photo = catalogue / "small" / images.iloc[11]["path"]
    with Image.open(photo) as image:
        width, height = image.size
        box = (width // 4, height // 5, 3 * width // 4, 4 * height // 5)
        image.convert("RGB").crop(box).save(tmp_path / "cropped.png")
    region = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
    with ImageSimilarityClient(address) as client:
        by_region, whole = client.embed([photo, photo], regions=[region, (0, 0, 1, 1)])
        (cropped,) = client.embed(tmp_path / "cropped.png")
        assert np.allclose(by_region, cropped, atol=1e-5) and not np.allclose(by_region, whole, atol=1e-3)
        similar = client.find_similar(photo, region=region, k=5)
        expected = client.find_similar(tmp_path / "cropped.png", k=5)
        assert [m.product_id for m in similar] == [m.product_id for m in expected]
        assert [m.score for m in similar] == pytest.approx([m.score for m in expected], abs=1e-5)
    sheet = tmp_path / "sheet.png"
    shown = _cli("--address", address, "similar", photo, "--region", ",".join(map(str, region)), "-k", "5",
                 "--catalogue", catalogue, "--sheet", sheet)
    assert [line.split()[1] for line in shown.stdout.splitlines() if line.strip()[:1].isdigit()] == [
        m.product_id for m in similar]
    with Image.open(sheet) as image:
        assert image.size == (6 * 160, 206)
