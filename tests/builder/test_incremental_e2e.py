"""Rebuilds that cost what changed: scans and features cached by content, shared between catalogues.

Real Spark, the real feature cache and executors running an exported trunk SavedModel, but a fake trunk
(tests/builder/fake_build.py): what is cached and reused does not depend on which network made it.
"""

import csv
import gzip
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from builder.add import AddConfig, run_add
from builder.operate import prune
from lookalike import artifacts, deltas
from tests import helpers
from tests.builder import fake_build

pytestmark = pytest.mark.e2e


def _build(images, out, cache, **options):
    # No neighbour lists: they are made from the vectors this test compares, and cost each build a Spark job.
    return fake_build.run(images, out, head="none", feature_cache=cache, chunk_size=64, neighbours=0, **options)


def _vectors_by_image(out) -> dict[str, np.ndarray]:
    version = out / artifacts.read_current(out)
    images = pd.read_parquet(version / artifacts.IMAGES_FILE)
    vectors = np.load(version / artifacts.VECTORS_FILE)
    return {image_id: vectors[row] for row, image_id in zip(images["row"], images["image_id"], strict=True)}


def _rewrite_index(catalogue, rows):
    with gzip.open(catalogue / "images.csv.gz", "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image_id", "height", "width", "path"])
        writer.writeheader()
        writer.writerows(rows)


def test_a_rebuild_embeds_only_new_and_changed_contents(tmp_path):
    catalogue, cache = tmp_path / "catalogue", tmp_path / "cache"
    subprocess.run([helpers.BIN / "lookalike-build", "sample", "fashion-mnist", "--out", catalogue, "--limit", "30"],
                   check=True, env=helpers.env(), capture_output=True)
    out = tmp_path / "ARTIFACTS"
    first = _build(catalogue, out, cache)
    contents = first["embedding"]["contents"]
    assert first["embedding"]["embedded"] == contents and first["scan"]["decoded"] == first["scan"]["files"]
    before = _vectors_by_image(out)

    rows = helpers.catalogue_images(catalogue)
    moved, changed, duplicated = rows[0], rows[1], rows[2]
    # Moved and renamed: the same bytes under another path and file name.
    new_path = f"zz/moved-{moved['image_id']}.png"
    (catalogue / "small" / "zz").mkdir()
    shutil.move(catalogue / "small" / moved["path"], catalogue / "small" / new_path)
    moved["path"] = new_path
    # Changed in place: other bytes under the same path.
    (catalogue / "small" / changed["path"]).write_bytes(helpers.png_bytes(
        np.random.default_rng(1).integers(0, 255, (28, 28, 3), dtype=np.uint8)))
    # A second image id with bytes the model has seen, and three images it has never seen.
    added = [{"image_id": "copy-of-2", "height": 28, "width": 28, "path": "zz/copy-of-2.png"}]
    shutil.copy(catalogue / "small" / duplicated["path"], catalogue / "small" / "zz" / "copy-of-2.png")
    for n in range(3):
        path = f"zz/new-{n}.png"
        (catalogue / "small" / path).write_bytes(helpers.png_bytes(
            np.random.default_rng(10 + n).integers(0, 255, (28, 28, 3), dtype=np.uint8)))
        added.append({"image_id": f"new-{n}", "height": 28, "width": 28, "path": path})
    _rewrite_index(catalogue, rows + added)
    # Two of the new images were published between builds by `add` (a folder of their own, each its own product).
    folder = tmp_path / "added"
    (folder / "small" / "zz").mkdir(parents=True)
    for n in range(2):
        shutil.copy(catalogue / "small" / f"zz/new-{n}.png", folder / "small" / "zz" / f"new-{n}.png")
    delta = run_add(AddConfig(out=out, images=folder))
    assert delta.manifest["counts"]["products"] == 2 and delta.manifest["embedding"]["features_cached"] == 2
    # One backbone run an image: the cache's trunk, then the version's head (head.npz).
    assert delta.manifest["embedding"]["model"] == "the cache's trunk and the version's head.npz"
    first_version = artifacts.read_current(out)

    second = _build(catalogue, out, cache)
    assert second["embedding"]["embedded"] == 2  # the changed file and the one new image `add` did not see
    absorbed = second["deltas_of_previous_version"]
    assert absorbed["products"] == 2 and absorbed["not_in_this_build"]["count"] == 0
    assert second["embedding"]["from_cache"] == second["embedding"]["contents"] - 2
    assert second["scan"]["decoded"] == 6  # the moved, changed, copied and three new files
    after = _vectors_by_image(out)
    for image_id in set(before) - {changed["image_id"]}:
        assert np.allclose(before[image_id], after[image_id], atol=1e-6), image_id
    assert not np.allclose(before[changed["image_id"]], after[changed["image_id"]], atol=1e-3)
    assert np.allclose(after["copy-of-2"], after[duplicated["image_id"]], atol=1e-6)
    assert len(list(cache.glob("models/*/trunk"))) == 1  # the trunk was exported once for this model
    # The delta's vectors are the ones the next build gives the same images (the version's model, either way).
    delta_vectors = np.load(delta.path / artifacts.VECTORS_FILE)
    for row, image_id in enumerate(pd.read_parquet(delta.path / artifacts.IMAGES_FILE)["image_id"]):
        assert np.allclose(delta_vectors[row], after[image_id], atol=1e-5), image_id
    # Retired with their version: prune removes them with it.
    assert prune(out, keep=1).removed == [first_version]
    assert deltas.list_deltas(out, first_version) == [] and not deltas.deltas_dir(out, first_version).exists()

    # Another catalogue folder sharing the cache embeds nothing it has seen.
    elsewhere = _build(catalogue, tmp_path / "OTHER", cache)
    assert elsewhere["embedding"]["embedded"] == 0
    # Another preprocessing is another model: it never reuses these features.
    other_model = _build(catalogue, tmp_path / "GREY", cache, preprocessing="clahe-grey")
    assert other_model["embedding"]["embedded"] == other_model["embedding"]["contents"]
    assert other_model["embedding"]["model_key"] != second["embedding"]["model_key"]
    assert len(list(cache.glob("models/*/trunk"))) == 2
