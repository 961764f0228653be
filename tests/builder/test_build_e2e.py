"""The real build on the committed sample with banners and a corrupt file mixed in."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from lookalike import artifacts
from lookalike.preprocess import PreprocessConfig, Preprocessor
from lookalike.runner import SavedModelEmbedder
from tests import helpers
from tests.conftest import CATALOGUE_SIZE

pytestmark = pytest.mark.e2e


def manifest_preprocessing(version_dir) -> str:
    return json.loads((version_dir / "manifest.json").read_text())["preprocessing"]


def _current(out):
    return out / artifacts.read_current(out)


def test_dataset_keeps_catalogue_and_drops_banners_and_corrupt_file_with_reasons(built):
    version_dir = _current(built)
    dataset = pd.read_parquet(version_dir / "dataset.parquet").set_index("image_id")
    assert dataset["kept"].sum() == CATALOGUE_SIZE
    for image_id in helpers.BANNER_IDS + (helpers.UNLISTED_BANNER_ID,):
        assert not dataset.loc[image_id, "kept"]
        assert dataset.loc[image_id, "drop_reason"].startswith("aspect: |width - height| = ")
    assert dataset.loc["banner-wide-1", "drop_reason"] == "aspect: |width - height| = 340 >= 200"
    assert dataset.loc[helpers.UNLISTED_BANNER_ID, "size_from"] == "file"
    assert dataset.loc["banner-wide-1", "size_from"] == "metadata"
    assert dataset.loc[helpers.CORRUPT_ID, "drop_reason"].startswith("undecodable: ")
    assert dataset.loc["fm-train-00001", "label_name"] == "T-shirt/top"


def test_manifest_records_counts_recall_checksums_and_timings(built):
    version_dir = _current(built)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == CATALOGUE_SIZE == manifest["counts"]["indexed"]
    assert manifest["counts"]["dropped"] == 5
    assert manifest["counts"]["dropped_by_reason"] == {"aspect": 4, "undecodable": 1}
    assert manifest["index"]["recall_at_10"] >= 0.95
    assert manifest["dimension"] == 128 and manifest["metric"] == "euclidean"
    assert manifest["backbone"] == "efficientnet_lite0" and manifest["preprocessing"] == "plain"
    stages = manifest["timings_seconds"]  # recorded, never asserted on: the machine is shared
    assert {"scan_filter", "embed", "index"}.issubset(stages)
    assert "tensorflow-cpu" in manifest["libraries"] and "pyspark" in manifest["libraries"]
    assert artifacts.checksums(version_dir) == manifest["files"]
    artifacts.load_manifest(version_dir, verify=True)


def test_items_vectors_are_what_the_exported_model_computes(built, catalogue):
    version_dir = _current(built)
    items = pd.read_parquet(version_dir / "items.parquet")
    assert items["annoy_id"].tolist() == list(range(CATALOGUE_SIZE))
    model = SavedModelEmbedder(version_dir / "model")
    preprocess = Preprocessor(PreprocessConfig(preprocessing=manifest_preprocessing(version_dir)))
    rows = items.iloc[:8]
    batch = np.stack([preprocess((catalogue / "small" / p).read_bytes()) for p in rows["path"]])
    vectors = model(batch)
    assert np.allclose(vectors, np.stack(rows["vector"].to_numpy()), atol=1e-4)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_sources_are_untouched(catalogue, built):
    corrupt = catalogue / "small" / f"cc/{helpers.CORRUPT_ID}.png"
    assert corrupt.exists() and corrupt.stat().st_size > 0
    assert len(list((catalogue / "small").rglob("*.png"))) == CATALOGUE_SIZE + 5


def test_a_killed_build_resumes_without_recomputing_and_never_moves_current(tmp_path, catalogue, built):
    out = tmp_path / "ARTIFACTS"
    out.mkdir()
    artifacts.write_current(out, "v1")
    # Kill the build once it has finished some embedding jobs (each job commits a _SUCCESS).
    process = subprocess.Popen([helpers.BIN / "lookalike-build", "build", "--images", catalogue, "--out", out,
                                "--chunk-size", "32", "--head", "none", "--version", "v2"],
                               env=helpers.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(out.glob(".work/*/features/*/_SUCCESS"))) >= 2:
            break
        time.sleep(0.5)
    assert process.poll() is None, "the build finished before it could be interrupted"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(60)
    assert artifacts.read_current(out) == "v1"
    assert not (out / "v2").exists()
    resumed = helpers.build(catalogue, out, "--chunk-size", "32", "--head", "none", "--version", "v2b", "--json")
    manifest = json.loads(resumed.stdout[resumed.stdout.index("{"):])
    assert manifest["embedding"]["resumed_images"] >= 64
    assert manifest["embedding"]["computed_images"] + manifest["embedding"]["resumed_images"] == CATALOGUE_SIZE
    assert manifest["embedding"]["computed_images"] < CATALOGUE_SIZE
    assert artifacts.read_current(out) == "v2b"
    assert manifest["dimension"] == 1280


def test_a_failed_build_leaves_current_untouched(tmp_path, built):
    out = tmp_path / "ARTIFACTS"
    out.mkdir()
    artifacts.write_current(out, "keep-me")
    empty = tmp_path / "empty"
    (empty / "small").mkdir(parents=True)
    result = helpers.build(empty, out, check=False)
    assert result.returncode != 0
    assert artifacts.read_current(out) == "keep-me"
