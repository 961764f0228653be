"""Deltas: products added or replaced since a version was built, published in seconds by `lookalike-build add`.

Layout: `ARTIFACTS/.deltas/<version>/<sequence>/` (sequence zero-padded: 000001, 000002, ...), each holding
`delta.json` (what it is, with every file's sha256), `images.parquet` and `products.parquet` (the version's
table schemas, rows numbered within the delta) and `vectors.npy` (float32 [rows, D], unit, made by the version's
own model). A delta is written once in a staging folder beside its final name and made visible by one rename,
so a reader sees it whole or not at all; writers of one version's deltas take an exclusive lock, so sequence
numbers never repeat. A later delta's product replaces an earlier delta's, and the version's, with the same
product id whole. The deltas of a version are retired with it: servers of another version never read them, and
`prune` removes them with their version.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lookalike import artifacts, tables

DELTAS_DIR = ".deltas"
DELTA_MANIFEST = "delta.json"
LOCK_FILE = ".lock"
# The highest sequence ever published for the version (under the lock).
HIGH_WATER_FILE = ".sequence"
STAGING_PREFIX = ".staging-"
DELTA_FILES = (artifacts.IMAGES_FILE, artifacts.PRODUCTS_FILE, artifacts.VECTORS_FILE)
# Image rows a version's deltas may hold together: they are scanned exactly on every query, so past this a
# build (which indexes them) is the right tool.
DEFAULT_MAX_DELTA_ROWS = 10_000


class DeltaError(ValueError):
    """A delta cannot be published or read; the message says why."""


@dataclass(frozen=True)
class Delta:
    """One published delta, read and checked: its manifest, tables and vectors."""

    sequence: int
    manifest: dict
    images: pa.Table
    products: pa.Table
    vectors: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.vectors)


def deltas_dir(out: Path, version: str) -> Path:
    return out / DELTAS_DIR / artifacts.check_version_name(version)


def sequence_name(sequence: int) -> str:
    return f"{sequence:06d}"


def list_deltas(out: Path, version: str) -> list[tuple[int, Path]]:
    """The published deltas of a version, oldest first (staging folders are never listed)."""
    folder = deltas_dir(out, version)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted((int(name), folder / name) for name in names if name.isdigit())


def read_delta(path: Path, dimension: int | None = None) -> Delta:
    """A delta's files, checked against its manifest's checksums and the table schemas: DeltaError saying what is
    wrong (a server that cannot read a delta keeps serving what it had)."""
    try:
        manifest = json.loads((path / DELTA_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DeltaError(f"{path / DELTA_MANIFEST} cannot be read: {error}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(DELTA_FILES) - set(files):
        raise DeltaError(f"{path / DELTA_MANIFEST} does not list {', '.join(DELTA_FILES)}")
    for rel in DELTA_FILES:
        try:
            digest = artifacts.sha256_file(path / rel)
        except OSError as error:
            raise DeltaError(f"{path / rel} cannot be read: {error}") from None
        if digest != files[rel]:
            raise DeltaError(f"{path / rel} does not match the sha256 in {DELTA_MANIFEST}")
    keys = list(manifest.get("attribute_keys", []))
    try:
        images = tables.read_images(path / artifacts.IMAGES_FILE,
                                    columns=["row", "image_id", "product_row", "role", "path", "label_name"])
        products = tables.read_products(path / artifacts.PRODUCTS_FILE, keys,
                                        number_keys=list(manifest.get("number_keys", [])))
        vectors = np.load(path / artifacts.VECTORS_FILE, allow_pickle=False)
    except (artifacts.ArtifactError, OSError, ValueError) as error:
        raise DeltaError(f"delta {path.name}: {error}") from None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or len(vectors) != images.num_rows:
        raise DeltaError(f"{path / artifacts.VECTORS_FILE} is not float32 [{images.num_rows}, D]")
    if dimension is not None and vectors.shape[1] != dimension:
        raise DeltaError(f"delta {path.name} has {vectors.shape[1]}-d vectors; the version's are {dimension}-d")
    counts = products.column("image_count").to_numpy()
    first = products.column("first_row").to_numpy()
    if int(counts.sum()) != images.num_rows or not np.array_equal(first, np.cumsum(counts) - counts):
        raise DeltaError(f"delta {path.name}: its products do not own its image rows in order")
    try:
        sequence = int(manifest.get("sequence", path.name))
    except (TypeError, ValueError):
        raise DeltaError(f"{path / DELTA_MANIFEST} has no sequence number") from None
    return Delta(sequence, manifest, images, products, vectors)


@contextmanager
def locked(out: Path, version: str) -> Iterator[Path]:
    """The version's deltas folder, held exclusively: two `add`s at once are serialised."""
    folder = deltas_dir(out, version)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def staging_folder(out: Path, version: str) -> Path:
    """A new folder to write a delta in, on the same file system as its final name (a rename publishes it)."""
    folder = deltas_dir(out, version)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f"{STAGING_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    staging.mkdir()
    return staging


def delta_rows(path: Path) -> int:
    """How many image rows a published delta holds (from its manifest)."""
    try:
        return int(json.loads((path / DELTA_MANIFEST).read_text())["counts"]["images"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DeltaError(f"{path / DELTA_MANIFEST} cannot be read: {error}") from None


def delta_product_ids(out: Path, version: str, skip_unreadable: bool = False) -> tuple[int, set[str]]:
    """(how many deltas the version has, the product ids they define). skip_unreadable: a delta whose products
    table cannot be read is left out rather than raising (for reports, never for what add publishes)."""
    published = list_deltas(out, version)
    product_ids: set[str] = set()
    for _, path in published:
        try:
            table = tables.read_products(path / artifacts.PRODUCTS_FILE, columns=["product_id"])
        except (artifacts.ArtifactError, OSError, ValueError):
            if not skip_unreadable:
                raise
            continue
        product_ids.update(table.column("product_id").to_pylist())
    return len(published), product_ids


def check_room(out: Path, version: str, rows: int, max_delta_rows: int) -> list[tuple[int, Path]]:
    """The version's published deltas, when `rows` more image rows keep them within max_delta_rows; else DeltaError
    saying to run a build."""
    published = list_deltas(out, version)
    held = sum(delta_rows(path) for _, path in published)
    if held + rows > max_delta_rows:
        raise DeltaError(f"version {version}'s deltas would hold {held + rows:,} image rows, more than "
                         f"--max-delta-rows {max_delta_rows:,}: run a build (lookalike-build build), which indexes "
                         f"them and reuses their features")
    return published


def publish_delta(out: Path, version: str, staging: Path, manifest: dict, max_delta_rows: int) -> tuple[int, Path]:
    """Numbers the staged delta (the next sequence of the version), checksums it into its manifest and renames it
    into place, under the version's lock; refuses it (and removes the staging folder) when the version's deltas
    would hold more than max_delta_rows image rows."""
    try:
        with locked(out, version) as folder:
            current = artifacts.read_current(out)
            if current != version or not (out / version).is_dir():
                raise DeltaError(f"CURRENT moved from {version} to {current} while adding: nothing was published; "
                                 f"run add again (it embeds with the version served now)")
            published = check_room(out, version, int(manifest["counts"]["images"]), max_delta_rows)
            # Numbers are never reused, even when the latest delta's folder was removed by hand: a replica that
            # applied that number would skip a new delta carrying it.
            sequence = max(published[-1][0] if published else 0, _high_water(folder)) + 1
            artifacts.write_atomic(folder / HIGH_WATER_FILE, f"{sequence}\n")
            manifest = {**manifest, "sequence": sequence, "version": version,
                        "files": {rel: artifacts.sha256_file(staging / rel) for rel in DELTA_FILES}}
            artifacts.write_json_atomic(staging / DELTA_MANIFEST, manifest)
            artifacts.settle_folder(staging)
            final = folder / sequence_name(sequence)
            os.rename(staging, final)
            artifacts.fsync_folder(folder)
            return sequence, final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _high_water(folder: Path) -> int:
    try:
        return int((folder / HIGH_WATER_FILE).read_text())
    except (OSError, ValueError):
        return 0


def remove_deltas(out: Path, version: str) -> int:
    """Removes a version's deltas (prune does, with the version); returns how many there were."""
    folder = deltas_dir(out, version)
    count = len(list_deltas(out, version))
    if folder.is_dir():
        trash = out / DELTAS_DIR / f".trash-{version}-{os.urandom(3).hex()}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return count


def remove_stale_staging(out: Path, older_than_s: float) -> int:
    """Staging folders of `add`s killed before they published (never of one running: those are younger)."""
    removed, now = 0, time.time()
    for staging in (out / DELTAS_DIR).glob(f"*/{STAGING_PREFIX}*"):
        try:
            if now - staging.stat().st_mtime > older_than_s:
                shutil.rmtree(staging)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
