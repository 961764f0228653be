"""`lookalike-build reindex`: a new version from an existing one's vectors and tables, index and lists derived again."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from builder import __version__
from builder.build import (
    NEIGHBOURS_KEY,
    BuildConfig,
    BuildResult,
    Stopwatch,
    library_versions,
    neighbour_stage,
    open_version,
    publish_version,
)
from builder.index import ANNOY, INDEX_KINDS, build_index
from lookalike import artifacts
from lookalike.neighbours import DEFAULT_N, NEIGHBOURS_DIR, check_neighbours

log = logging.getLogger(__name__)
_BUILD_DEFAULTS = BuildConfig(images=Path("."), out=Path("."))


@dataclass(frozen=True)
class ReindexConfig:
    """What `lookalike-build reindex` depends on; each field is one of its flags."""

    out: Path
    # The version whose vectors and tables are reused; by default the served one (CURRENT).
    source: str | None = None
    # annoy or hnsw; by default the kind the source version has.
    index: str | None = None
    n_trees: int = _BUILD_DEFAULTS.n_trees
    target_recall: float = _BUILD_DEFAULTS.target_recall
    neighbours: int = DEFAULT_N
    spark_master: str = _BUILD_DEFAULTS.spark_master
    # The new version's name; by default the time and a random suffix.
    version: str | None = None

    def __post_init__(self) -> None:
        if self.index is not None and self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}")
        if self.n_trees < 1:
            raise ValueError("n_trees must be at least 1")
        if not 0 < self.target_recall <= 1:
            raise ValueError("target_recall must be in (0, 1]")
        check_neighbours(self.neighbours)


def run_reindex(config: ReindexConfig) -> BuildResult:
    """Publishes a new version with the source's model, tables and vectors and a new index and lists;
    nothing is embedded, so neither TensorFlow nor the images are needed."""
    source_name = artifacts.check_version_name(config.source or artifacts.read_current(config.out))
    source_dir = config.out / source_name
    if not (source_dir / artifacts.MANIFEST).is_file():
        raise ValueError(f"{config.out} has no version {source_name!r} (lookalike-build versions lists them)")
    source = artifacts.load_manifest(source_dir, verify=True)
    if artifacts.VECTORS_FILE not in source["files"]:
        raise ValueError(f"version {source_name} was built by 0.1 ({artifacts.LEGACY_ITEMS_FILE}, no "
                         f"{artifacts.VECTORS_FILE}): build it again with lookalike-build build")
    clock = Stopwatch()
    version, staging = open_version(config.out, config.version)
    # What a reindex derives again: the index (whichever file the source's manifest names) and the lists;
    # every other file of the source version is taken as it is.
    derived = (source.get("index", {}).get("file", artifacts.INDEX_FILE), f"{NEIGHBOURS_DIR}/")
    try:
        with clock.stage("copy"):
            link_files(source_dir, staging, [rel for rel in source["files"] if not rel.startswith(derived)],
                       derived)
        vectors = np.load(staging / artifacts.VECTORS_FILE, allow_pickle=False)
        kind = config.index or source.get("index", {}).get("kind", ANNOY)
        with clock.stage("index"):
            index_file, report = build_index(kind, vectors, staging, config.n_trees, config.target_recall)
        del vectors
        neighbours = neighbour_stage(clock, staging, config.neighbours, config.spark_master, {})
        manifest = reindexed_manifest(source, version, report.manifest(index_file), neighbours, clock, config)
        final = publish_version(config.out, version, staging, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("published %s from %s: %s index recall@10 %.3f, lists %s", version, source_name, report.kind,
             report.recall_at_10, f"of {config.neighbours}" if neighbours else "none")
    return BuildResult(version, final, manifest)


def link_files(source_dir: Path, target_dir: Path, relative_paths: list[str], skipped: tuple[str, ...]) -> None:
    """Hard links (a copy across file systems) of a version's files: they are written once and never
    changed, so two versions may share them. Folders under `skipped` prefixes are not made."""
    for folder in sorted(p for p in source_dir.rglob("*") if p.is_dir()):
        rel = folder.relative_to(source_dir).as_posix()
        if not f"{rel}/".startswith(skipped):
            # Empty folders too (a SavedModel's assets/): the copy is the same tree.
            (target_dir / rel).mkdir(parents=True, exist_ok=True)
    for rel in relative_paths:
        target = target_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source_dir / rel, target)
        except OSError:
            shutil.copy2(source_dir / rel, target)


def reindexed_manifest(source: dict, version: str, index: dict, neighbours: dict | None, clock: Stopwatch,
                       config: ReindexConfig) -> dict:
    """The source's manifest (how the vectors were made, the catalogue's counts and reports) with this
    version's name, index, lists and timings; `files` is filled in when it is published."""
    manifest = {key: value for key, value in source.items() if key not in ("files", NEIGHBOURS_KEY)}
    manifest.update({
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": __version__,
        "libraries": library_versions(),
        "index": index,
        "reindexed_from": {"version": source.get("version"), "created_at": source.get("created_at")},
        "config": {**source.get("config", {}), "index": index["kind"], "n_trees": config.n_trees,
                   "target_recall": config.target_recall, "neighbours": config.neighbours},
        "timings_seconds": clock.seconds,
    })
    if neighbours:
        manifest[NEIGHBOURS_KEY] = neighbours
    return manifest
