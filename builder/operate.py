"""Operating a catalogue between builds: list versions, roll back, prune old versions and cached features."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from builder.cache import DEFAULT_CACHE, FeatureCache
from lookalike import artifacts, deltas
from lookalike.leases import leased_versions
from lookalike.tables import read_images


@dataclass(frozen=True)
class VersionInfo:
    name: str
    created_at: str
    model_key: str | None
    products: int | None
    images: int | None


def list_versions(out: Path) -> list[VersionInfo]:
    """Published versions (folders with a manifest), oldest first."""
    found = []
    for folder in out.iterdir() if out.is_dir() else []:
        if folder.name.startswith(".") or not (folder / artifacts.MANIFEST).is_file():
            continue
        try:
            manifest = json.loads((folder / artifacts.MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        counts = manifest.get("counts", {})
        found.append(VersionInfo(folder.name, str(manifest.get("created_at", "")),
                                 manifest.get("embedding", {}).get("model_key"), counts.get("products"),
                                 counts.get("images_indexed", counts.get("indexed"))))
    return sorted(found, key=lambda v: (v.created_at, v.name))


def rollback(out: Path, target: str | None = None) -> tuple[str, str]:
    """Points CURRENT at `target`, or at the version published before the current one; returns (from, to)."""
    current = artifacts.read_current(out)
    versions = list_versions(out)
    names = [v.name for v in versions]
    if target is None:
        if current not in names or names.index(current) == 0:
            raise ValueError(f"no version older than {current} in {out}: name one (lookalike-build versions)")
        target = names[names.index(current) - 1]
    artifacts.check_version_name(target)
    if target not in names:
        raise ValueError(f"{out} has no version {target!r}; versions: {', '.join(names) or 'none'}")
    manifest = artifacts.load_manifest(out / target, verify=False)
    missing = [rel for rel in manifest["files"] if not (out / target / rel).is_file()]
    if missing:
        raise ValueError(f"version {target} is incomplete (missing {missing[0]}): not rolling back to it")
    artifacts.write_current(out, target)
    return current, target


@dataclass(frozen=True)
class PruneReport:
    kept: list[str]
    removed: list[str]
    leased: dict[str, list[str]]
    cache: dict


def prune(out: Path, keep: int, cache_grace_s: float = 3600.0) -> PruneReport:
    """Removes all but the `keep` newest versions, never CURRENT's and never one a live lease names; then
    the features in OUT/.features that no kept version uses (shards and models younger than
    cache_grace_s are left alone: a build may be about to publish them)."""
    if keep < 1:
        raise ValueError("--keep must be at least 1")
    current = artifacts.read_current(out)
    versions = list_versions(out)
    leases = leased_versions(out)
    protected = {current} | {v for held in leases.values() for v in held}
    newest = {v.name for v in versions[-keep:]}
    removed = []
    for version in versions:
        if version.name in newest or version.name in protected:
            continue
        # One rename takes it out of sight; then it is deleted at leisure.
        trash = out / f".trash-{version.name}-{os.urandom(3).hex()}"
        os.rename(out / version.name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deltas.remove_deltas(out, version.name)  # a version's deltas are retired with it
        removed.append(version.name)
    now = time.time()
    for leftover in out.glob(".staging-*"):
        if now - leftover.stat().st_mtime > cache_grace_s:
            shutil.rmtree(leftover, ignore_errors=True)
    deltas.remove_stale_staging(out, cache_grace_s)
    kept = [v for v in versions if v.name not in removed]
    return PruneReport([v.name for v in kept], removed, {h: sorted(v) for h, v in leases.items()},
                       _prune_cache(out, kept, cache_grace_s))


def _prune_cache(out: Path, kept: list[VersionInfo], grace_s: float) -> dict:
    cache = FeatureCache(out / DEFAULT_CACHE)
    if not cache.root.is_dir():
        return {"cache": str(cache.root), "present": False}
    used: dict[str, set[str]] = {}
    for version in kept:
        if version.model_key is None:
            continue
        # A version's deltas were embedded by its model: their features are what the next build reads back.
        for folder in [out / version.name] + [path for _, path in deltas.list_deltas(out, version.name)]:
            images = read_images(folder / artifacts.IMAGES_FILE, columns=["sha256"])
            used.setdefault(version.model_key, set()).update(images.column("sha256").to_pylist())
    report = {"cache": str(cache.root), "present": True, "models_removed": [], "features_before": 0,
              "features_after": 0, "tmp_removed": cache.remove_stale_tmp(grace_s)}
    now = time.time()
    for key in cache.models():
        young = now - cache.model_dir(key).stat().st_mtime < grace_s
        if key not in used:
            if not young and not any(now - p.stat().st_mtime < grace_s for p in cache.model_dir(key).rglob("*")):
                cache.remove_model(key)
                report["models_removed"].append(key)
            continue
        before, after = cache.compact(key, used[key], min_age_s=grace_s)
        report["features_before"] += before
        report["features_after"] += after
    return report
