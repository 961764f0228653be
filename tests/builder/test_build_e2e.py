"""The real build on the committed sample with banners and a corrupt file mixed in."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from builder.sample import CLASS_NAMES
from lookalike import artifacts
from lookalike.preprocess import PreprocessConfig, Preprocessor
from lookalike.runner import SavedModelEmbedder
from tests import helpers
from tests.builder import fake_build
from tests.conftest import CATALOGUE_PRODUCTS

pytestmark = pytest.mark.e2e


def manifest_preprocessing(version_dir) -> str:
    return json.loads((version_dir / "manifest.json").read_text())["preprocessing"]


def _current(out):
    return out / artifacts.read_current(out)


def kept_image_count(catalogue) -> int:
    """Every image in images.csv.gz but the three banners and the corrupt file."""
    return len(helpers.catalogue_images(catalogue)) - 4


def test_dataset_keeps_catalogue_and_drops_banners_and_corrupt_file_with_reasons(built, catalogue):
    version_dir = _current(built)
    dataset = pd.read_parquet(version_dir / "dataset.parquet")
    images = dataset.dropna(subset=["image_id"]).drop_duplicates("image_id").set_index("image_id")
    assert images["kept"].sum() == kept_image_count(catalogue)
    for image_id in helpers.BANNER_IDS + (helpers.UNLISTED_BANNER_ID,):
        assert not images.loc[image_id, "kept"]
        assert images.loc[image_id, "drop_reason"].startswith("aspect: |width - height| = ")
    assert images.loc["banner-wide-1", "drop_reason"] == "aspect: |width - height| = 340 >= 200"
    assert images.loc[helpers.UNLISTED_BANNER_ID, "size_from"] == "file"
    assert images.loc["banner-wide-1", "size_from"] == "metadata"
    assert images.loc[helpers.CORRUPT_ID, "drop_reason"].startswith("undecodable: ")
    first = helpers.first_listing(catalogue)
    assert images.loc[first["main_image_id"], "label_name"] in CLASS_NAMES
    # The broken product's rows: its dropped, corrupt and missing images, each with its reason.
    broken = dataset[dataset["product_id"] == helpers.BROKEN_PRODUCT].set_index("image_id")
    assert broken.loc["banner-wide-2", "drop_reason"].startswith("aspect: ")
    assert broken.loc[helpers.CORRUPT_ID, "drop_reason"].startswith("undecodable: ")
    assert broken.loc[helpers.MISSING_IMAGE_ID, "drop_reason"].startswith("missing: named by a listing")
    assert list(broken["role"]) == ["main", "other", "other"] and not broken["kept"].any()
    empty = dataset[dataset["product_id"] == helpers.EMPTY_PRODUCT]
    assert len(empty) == 1 and empty["image_id"].isna().all() and empty["drop_reason"].iloc[0].startswith("no image")


def test_products_group_their_images_and_problems_are_in_the_manifest(built, catalogue):
    version_dir = _current(built)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    report = manifest["catalogue"]
    assert report["source"] == "listings" and report["listing_files"] == 5
    assert report["products"] == CATALOGUE_PRODUCTS + 2  # the sample's, the shared and the German one
    assert report["products_without_kept_images"]["examples"] == [helpers.BROKEN_PRODUCT]
    assert report["listings_without_images"]["examples"] == [helpers.EMPTY_PRODUCT]
    assert report["listed_images_missing"]["examples"] == [helpers.MISSING_IMAGE_ID]
    first = helpers.first_listing(catalogue)
    assert report["images_in_several_products"]["examples"] == [first["main_image_id"]]
    products = pd.read_parquet(version_dir / "products.parquet").set_index("product_id")
    assert products.loc[helpers.GERMAN_PRODUCT, "item_name"] == "Schuh"  # no English name: any language
    assert products.loc[first["item_id"], "product_type"] == first["product_type"][0]["value"]
    images = pd.read_parquet(version_dir / "images.parquet")
    assert len(images) == kept_image_count(catalogue) + 1  # the shared image has a row in both products
    shared = images[images["image_id"] == first["main_image_id"]]
    assert set(shared["product_id"]) == {first["item_id"], helpers.SHARED_PRODUCT}
    mine = images[images["product_id"] == first["item_id"]]
    assert list(mine["image_id"]) == [first["main_image_id"], *first.get("other_image_id", [])]
    assert list(mine["role"])[0] == "main" and set(list(mine["role"])[1:]) <= {"other"}
    start = int(products.loc[first["item_id"], "first_row"])
    assert list(mine["row"]) == list(range(start, start + len(mine)))
    assert manifest["counts"]["products"] == len(products)
    assert "brand" in manifest["attribute_keys"] and "product_type" in manifest["attribute_keys"]


def test_manifest_records_counts_recall_checksums_and_timings(built, catalogue):
    version_dir = _current(built)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == kept_image_count(catalogue)
    assert manifest["counts"]["images_indexed"] == kept_image_count(catalogue) + 1
    assert manifest["counts"]["dropped"] == 5
    assert manifest["counts"]["dropped_by_reason"] == {"aspect": 4, "undecodable": 1}
    assert manifest["index"]["recall_at_10"] >= 0.95
    assert manifest["dimension"] == 128 and manifest["metric"] == "euclidean"
    assert manifest["backbone"] == "efficientnet_lite0" and manifest["preprocessing"] == "plain"
    stages = manifest["timings_seconds"]  # recorded, never asserted on: the machine is shared
    assert {"scan_filter", "catalogue", "embed", "index"}.issubset(stages)
    assert "tensorflow-cpu" in manifest["libraries"] and "pyspark" in manifest["libraries"]
    assert artifacts.checksums(version_dir) == manifest["files"]
    artifacts.load_manifest(version_dir, verify=True)


def test_index_vectors_are_what_the_exported_model_computes(built, catalogue):
    version_dir = _current(built)
    images = pd.read_parquet(version_dir / "images.parquet")
    vectors = np.load(version_dir / "vectors.npy")
    assert images["row"].tolist() == list(range(len(images))) == list(range(len(vectors)))
    model = SavedModelEmbedder(version_dir / "model")
    preprocess = Preprocessor(PreprocessConfig(preprocessing=manifest_preprocessing(version_dir)))
    rows = images.iloc[:8]
    batch = np.stack([preprocess((catalogue / "small" / p).read_bytes()) for p in rows["path"]])
    computed = model(batch)
    assert np.allclose(computed, vectors[:8], atol=1e-4)
    assert np.allclose(np.linalg.norm(computed, axis=1), 1, atol=1e-5)


def test_sources_are_untouched(catalogue, built):
    corrupt = catalogue / "small" / f"cc/{helpers.CORRUPT_ID}.png"
    assert corrupt.exists() and corrupt.stat().st_size > 0
    assert len(list((catalogue / "small").rglob("*.png"))) == len(helpers.catalogue_images(catalogue)) + 1


def test_a_killed_build_resumes_without_recomputing_and_never_moves_current(tmp_path, small_catalogue):
    """With the fake trunk (tests/builder/fake_build.py): resuming is the cache's logic, not the model's."""
    catalogue = small_catalogue
    out = tmp_path / "ARTIFACTS"
    out.mkdir()
    artifacts.write_current(out, "v1")
    # The build holds still once it has published two embedding jobs as cache shards (each holds a
    # _SUCCESS) and is killed there: never too late, however fast the machine.
    marker, log = tmp_path / "two-shards-published", tmp_path / "killed-build.log"
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "tests.builder.fake_build", "--block-after-shards", "2",
                                    marker, "build", "--images", catalogue, "--out", out, "--chunk-size", "16",
                                    "--head", "none", "--version", "v2"], cwd=helpers.REPO, env=helpers.env(),
                                   stdout=subprocess.DEVNULL, stderr=handle, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert process.poll() is None, f"the build ended before two shards: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no two shards published in time"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(60)
    shards = [path.parent for path in out.glob(".features/models/*/shards/[!.]*/_SUCCESS")]
    assert len(shards) == 2
    published = pd.concat([pd.read_parquet(shard) for shard in shards])["sha256"].nunique()
    assert artifacts.read_current(out) == "v1"
    assert not (out / "v2").exists()
    manifest = fake_build.run(catalogue, out, chunk_size=16, head="none", version="v2b", neighbours=0)
    embedding = manifest["embedding"]
    assert embedding["from_cache"] == published >= 32 and embedding["embedded"] > 0
    assert embedding["embedded"] + embedding["from_cache"] == embedding["contents"]
    # Contents, not images: two images with the same bytes are embedded once.
    indexed = pd.read_parquet(out / "v2b" / artifacts.IMAGES_FILE).drop_duplicates("image_id")
    assert embedding["contents"] == indexed["sha256"].nunique() and len(indexed) == kept_image_count(catalogue)
    assert manifest["scan"]["decoded"] == 0  # the killed build's scan is cached too
    assert artifacts.read_current(out) == "v2b"
    assert manifest["dimension"] == fake_build.FAKE_WIDTH  # --head none: the trunk's own features


def test_a_failed_build_leaves_current_untouched(tmp_path, built):
    out = tmp_path / "ARTIFACTS"
    out.mkdir()
    artifacts.write_current(out, "keep-me")
    empty = tmp_path / "empty"
    (empty / "small").mkdir(parents=True)
    result = helpers.build(empty, out, check=False)
    assert result.returncode != 0
    assert artifacts.read_current(out) == "keep-me"
