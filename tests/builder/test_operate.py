"""Operating a catalogue: versions, rollback, prune (never the served or a leased version), the feature cache."""

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from builder.cache import FeatureCache, model_identity, model_key, new_tmp, publish, shard_name
from builder.operate import list_versions, prune, rollback
from lookalike import artifacts
from lookalike.leases import write_lease
from tests import helpers


def _version(out, name, created_at, key="model-a", contents=("a", "b")):
    folder = out / name
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"sha256": list(contents)}), folder / artifacts.IMAGES_FILE)
    pq.write_table(pa.table({"product_id": ["P1", "P2"]}), folder / artifacts.PRODUCTS_FILE)
    manifest = {"version": name, "created_at": created_at, "embedding": {"model_key": key},
                "counts": {"products": 2, "images_indexed": len(contents)},
                "files": {f"{artifacts.MODEL_DIR}/saved_model.pb": "0", artifacts.INDEX_FILE: "0",
                          artifacts.IMAGES_FILE: "0", artifacts.PRODUCTS_FILE: "0", artifacts.VECTORS_FILE: "0"}}
    (folder / artifacts.MANIFEST).write_text(json.dumps(manifest))
    for rel in manifest["files"]:
        if not (folder / rel).exists():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text("x")


def _shard(cache, key, contents):
    tmp = new_tmp(cache.shards_dir(key))
    tmp.mkdir()
    pq.write_table(pa.table({"sha256": list(contents), "features": [[float(len(c))] * 3 for c in contents],
                             "error": [None] * len(contents)}), tmp / "part-0.parquet")
    (tmp / "_SUCCESS").touch()
    assert publish(tmp, cache.shards_dir(key) / shard_name())


@pytest.fixture
def out(tmp_path):
    out = tmp_path / "ARTIFACTS"
    for n, contents in enumerate([("a", "b"), ("b", "c"), ("c", "d"), ("d", "e")]):
        _version(out, f"v{n + 1}", f"2026-11-0{n + 1}T00:00:00+00:00", contents=contents)
    artifacts.write_current(out, "v4")
    return out


def test_versions_are_listed_oldest_first(out):
    assert [v.name for v in list_versions(out)] == ["v1", "v2", "v3", "v4"]


def test_rollback_goes_to_the_previous_version_or_the_named_one(out):
    assert rollback(out) == ("v4", "v3")
    assert artifacts.read_current(out) == "v3"
    assert rollback(out, "v1") == ("v3", "v1")
    with pytest.raises(ValueError, match="no version older than v1"):
        rollback(out)
    with pytest.raises(ValueError, match="has no version 'v9'"):
        rollback(out, "v9")
    (out / "v2" / artifacts.INDEX_FILE).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        rollback(out, "v2")
    assert artifacts.read_current(out) == "v1"


def test_prune_keeps_the_newest_the_served_and_the_leased_versions(out):
    artifacts.write_current(out, "v1")  # rolled back: the served version is the oldest
    write_lease(out, "server-on-another-host", ["v2"], ttl_s=60)
    report = prune(out, keep=1, cache_grace_s=0)
    assert report.removed == ["v3"] and report.kept == ["v1", "v2", "v4"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["CURRENT", "v1", "v2", "v4"]
    assert report.leased == {"server-on-another-host": ["v2"]}
    with pytest.raises(ValueError, match="at least 1"):
        prune(out, keep=0)


def test_prune_compacts_the_cache_to_what_kept_versions_use(out):
    cache = FeatureCache(out / ".features")
    _shard(cache, "model-a", ["a", "b", "c"])
    _shard(cache, "model-a", ["d", "e", "z"])
    _shard(cache, "model-gone", ["a"])
    report = prune(out, keep=2, cache_grace_s=0)
    assert report.removed == ["v1", "v2"]
    assert report.cache["models_removed"] == ["model-gone"]
    assert (report.cache["features_before"], report.cache["features_after"]) == (6, 3)
    assert cache.known("model-a") == {"c", "d", "e"}
    position, features, _ = cache.read("model-a", {"c", "e"})
    assert features[position["e"]].tolist() == [1.0, 1.0, 1.0]


def test_prune_leaves_young_cache_shards_alone(out):
    cache = FeatureCache(out / ".features")
    _shard(cache, "model-a", ["a", "z"])
    _shard(cache, "model-young", ["q"])
    report = prune(out, keep=4)  # the default grace: a build may be about to publish these
    assert report.cache["models_removed"] == [] and cache.known("model-a") == {"a", "z"}


def test_model_identity_separates_what_changes_features():
    base = dict(backbone="efficientnet_lite0", weights_source="w", weights_file=None, preprocessing="plain")
    keys = {model_key(model_identity(**base, head="pca")), model_key(model_identity(**base, head="none"))}
    assert len(keys) == 1  # PCA is fitted after the features: same features
    assert model_key(model_identity(**base, head="random-conv")) not in keys
    assert model_key(model_identity(**{**base, "preprocessing": "clahe-grey"}, head="pca")) not in keys
    assert model_key(model_identity(**{**base, "backbone": "mobilenet_v2"}, head="pca")) not in keys


def test_cache_reads_keep_one_row_per_content_and_errors_apart(tmp_path):
    cache = FeatureCache(tmp_path)
    _shard(cache, "m", ["a", "b"])
    _shard(cache, "m", ["b"])  # two builds embedded b at once
    tmp = new_tmp(cache.shards_dir("m"))  # a killed build's leftover: never read
    tmp.mkdir()
    position, features, errors = cache.read("m", {"a", "b", "missing"})
    assert set(position) == {"a", "b"} and features.shape == (2, 3) and errors == {}
    assert np.allclose(features[position["a"]], [1.0, 1.0, 1.0])


def _cli(*args):
    return subprocess.run([helpers.BIN / "lookalike-build", *map(str, args)], capture_output=True, text=True,
                          env=helpers.env(), timeout=60)


def test_the_cli_hides_lists_rolls_back_and_prunes(out):
    hidden = _cli("hide", "--out", out, "--reason", "blocked", "P1", "P2", "P7")
    assert hidden.returncode == 0 and "availability version 1: 3 of 3 products hidden" in hidden.stdout
    assert "1 of them are not in the served version (e.g. P7)" in hidden.stderr
    shown = _cli("unhide", "--out", out, "P1")
    assert "availability version 2: 1 of 1 products shown again; 2 hidden in all" in shown.stdout
    listed = json.loads(_cli("versions", "--out", out, "--json").stdout)
    assert [v["version"] for v in listed if v["current"]] == ["v4"]
    assert _cli("rollback", "--out", out).stdout.strip() == "CURRENT: v4 -> v3"
    pruned = _cli("prune", "--out", out, "--keep", "2")
    assert pruned.returncode == 0 and "removed 2 (v1, v2)" in pruned.stdout
    for args, message in ((["hide", "--out", out], "give product ids"),
                          (["rollback", "--out", out, "v1"], "has no version 'v1'"),
                          (["prune", "--out", out / "nope", "--keep", "1"], "is not a folder"),
                          (["hide", "--out", out, "--file", out / "ids.txt"], "is not a file")):
        bad = _cli(*args)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
