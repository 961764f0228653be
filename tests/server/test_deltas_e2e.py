"""`lookalike-build add` with the real model, applied by a running server within its watch interval."""

import json
import shutil
import subprocess

import pytest

from client import ImageSimilarityClient, NotFoundError
from lookalike import artifacts, deltas
from tests import helpers

pytestmark = pytest.mark.e2e


def _listed_products(catalogue, count: int) -> list[tuple[str, str, str]]:
    """(product id, main image id, main image path) of the first sample listings with a main image of their own."""
    paths = {row["image_id"]: row["path"] for row in helpers.catalogue_images(catalogue)}
    import gzip

    found = []
    with gzip.open(catalogue / "listings" / "metadata" / "listings_1.json.gz", "rt") as lines:
        for line in lines:
            listing = json.loads(line)
            if listing.get("main_image_id") in paths and len(found) < count:
                found.append((listing["item_id"], listing["main_image_id"], paths[listing["main_image_id"]]))
    return found


def _folder(root, catalogue, rows: list[tuple[str, str, str, str]]):
    """An `add` folder: products.csv (product_id,image_id,product_type) and small/zz/<image_id>.png, each a copy of
    a catalogue file."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "small" / "zz").mkdir(parents=True)
    lines = ["product_id,image_id,product_type"]
    for product_id, image_id, source, product_type in rows:
        shutil.copy(catalogue / "small" / source, root / "small" / "zz" / f"{image_id}.png")
        lines.append(f"{product_id},{image_id},{product_type}")
    (root / "products.csv").write_text("\n".join(lines) + "\n")
    return root


def test_added_products_are_served_in_seconds_replaced_and_kept_hidden(tmp_path, built, catalogue):
    out = helpers.copy_artifacts(built, tmp_path / "ARTIFACTS")
    version = artifacts.read_current(out)
    (like_a, image_a, path_a), (like_b, image_b, path_b) = _listed_products(catalogue, 2)
    add_args = ("--out", out, "--feature-cache", tmp_path / "cache")  # never the session build's own cache
    with helpers.serving(out) as (_, address, metrics_port):
        client = ImageSimilarityClient(address)
        first = _folder(tmp_path / "first", catalogue, [("new-prod", "new-img", path_a, "DELTA")])
        added = helpers.build_cli("add", "--images", first, *add_args, timeout_s=300)
        assert f"published delta 1 of {version}: 1 products with 1 images (0 replaced" in added.stdout
        helpers.until(lambda: client.info()["delta_sequence"] == 1, 30)
        # By its own photo (the same file as product A's main image): both, equally alike.
        by_photo = client.find_similar(first / "small" / "zz" / "new-img.png", k=2)
        assert {m.product_id for m in by_photo} == {"new-prod", like_a} and by_photo.delta_sequence == 1
        assert client.find_similar(product_id="new-prod", k=1)[0].product_id == like_a
        assert client.find_similar(image_id="new-img", k=1)[0].product_id == like_a
        similar = client.find_similar(product_id=like_a, k=3)
        assert similar[0].product_id == "new-prod" and similar.delta_sequence == 1
        typed = client.find_similar(product_id=like_b, k=5, filters={"product_type": ["DELTA"]}, with_attributes=True)
        assert [m.product_id for m in typed] == ["new-prod"] and typed[0].attributes["product_type"] == "DELTA"

        # Replaced whole: its photo is now product B's, its old image id is gone.
        second = _folder(tmp_path / "second", catalogue, [("new-prod", "new-img-2", path_b, "DELTA")])
        assert "(1 replaced" in helpers.build_cli("add", "--images", second, *add_args, timeout_s=300).stdout
        helpers.until(lambda: client.info()["delta_sequence"] == 2, 30)
        assert client.find_similar(product_id=like_b, k=1)[0].product_id == "new-prod"
        assert "new-prod" not in [m.product_id for m in client.find_similar(product_id=like_a, k=3)]
        with pytest.raises(NotFoundError):
            client.find_similar(image_id="new-img", k=1)

        # Hidden as any product (tests/server/test_deltas.py: also when added again), shown again.
        helpers.build_cli("hide", "--out", out, "new-prod")
        helpers.until(lambda: "new-prod" not in [m.product_id for m in client.find_similar(product_id=like_b, k=3)])
        helpers.build_cli("unhide", "--out", out, "new-prod")
        helpers.until(lambda: client.find_similar(product_id=like_b, k=1)[0].product_id == "new-prod")
        metrics = helpers.scrape(metrics_port)
        assert metrics["lookalike_delta_sequence{}"] == 2 and metrics["lookalike_delta_rows{}"] == 1
        client.close()

    listed = json.loads(helpers.build_cli("deltas", "--out", out, "--json").stdout)
    assert [d["sequence"] for d in listed["deltas"]] == [1, 2] and listed["version"] == version
    # Past --max-delta-rows: refused in one line before anything is embedded, nothing published.
    refused = subprocess.run([helpers.BIN / "lookalike-build", "add", "--images", second, *map(str, add_args),
                              "--max-delta-rows", "2"], capture_output=True, text=True, env=helpers.env(), timeout=300)
    assert refused.returncode == 2 and "run a build" in refused.stderr and "Traceback" not in refused.stderr
    assert len(deltas.list_deltas(out, version)) == 2
