"""The artifact layout shared by builder and server: versions, CURRENT, manifest and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
INDEX_FILE = "index.ann"
# A version built with --index hnsw has hnswlib's graph instead (manifest: index.kind "hnsw", index.file).
HNSW_INDEX_FILE = "index.hnsw"
DATASET_FILE = "dataset.parquet"
IMAGES_FILE = "images.parquet"
PRODUCTS_FILE = "products.parquet"
VECTORS_FILE = "vectors.npy"
# The head inside the SavedModel, as arrays (versions since deltas): lets `add` run only the backbone.
HEAD_FILE = "head.npz"
# Versions built by 0.1 have items.parquet (image rows with their vectors) and no products.
LEGACY_ITEMS_FILE = "items.parquet"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(RuntimeError):
    """An artifact version is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(version_dir: Path) -> dict[str, str]:
    """sha256 of every file below a version folder except the manifest, by relative path."""
    out = {}
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(version_dir).as_posix()
        if rel != MANIFEST:
            out[rel] = sha256_file(path)
    return out


def check_version_name(version: str) -> str:
    """A version names a folder directly under ARTIFACTS/: no separators, no '..'."""
    if not _VERSION_RE.match(version) or version in (".", ".."):
        raise ArtifactError(f"invalid version name {version!r}")
    return version


def read_current(artifacts: Path) -> str:
    try:
        version = (artifacts / CURRENT).read_text().strip()
    except FileNotFoundError:
        raise ArtifactError(f"{artifacts / CURRENT} does not exist: build an index first "
                            f"(lookalike-build build --images DIR --out {artifacts})") from None
    except (OSError, UnicodeDecodeError) as error:  # unreadable, or not text: refused like a bad name
        raise ArtifactError(f"{artifacts / CURRENT} cannot be read: {error}") from None
    return check_version_name(version)


def write_current(artifacts: Path, version: str) -> None:
    """Points CURRENT at a version atomically: readers see the old name or the new, never half."""
    check_version_name(version)
    write_atomic(artifacts / CURRENT, version + "\n")


def write_json_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def default_file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 less the process umask (umask 022: 0o644)."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    # Linux reports it in /proc; elsewhere it can only be read by setting it (and back at once).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def folder_mode(file_mode: int) -> int:
    """A folder's mode to go with a file mode: whoever may read the files may also enter the folder."""
    return file_mode | ((file_mode & 0o444) >> 2)


def use_file_mode(file_mode: int) -> None:
    """Makes `file_mode` the mode of every file this process creates from now on, and folder_mode() that
    of every folder, by setting the umask: Spark, pyarrow, TensorFlow and Annoy follow it too, as do
    child processes. For command lines (--file-mode), before they write anything."""
    if file_mode & ~0o666 or file_mode & 0o600 != 0o600:
        raise ValueError(f"file mode {file_mode:04o} must let the owner read and write and nobody execute "
                         f"(e.g. 0644, 0640)")
    os.umask(0o777 & ~folder_mode(file_mode))


def write_atomic(path: Path, data: str | bytes, mode: int | None = None, durable: bool = True) -> None:
    """Replaces `path` with `data` in one step: written beside it, fsynced, given `mode` (default: what
    the umask gives a new file, so another user can read it as they could any file; a temporary file
    would be 0o600), then renamed over it. `durable` also fsyncs the folder, so the rename survives a
    crash; a file rewritten every few seconds (a lease) can skip both fsyncs."""
    content = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), default_file_mode() if mode is None else mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Makes the names created or renamed in a folder durable (a rename is only in the folder's data)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle_folder(folder: Path, file_mode: int | None = None) -> None:
    """Makes a finished folder what its readers rely on: every file and folder below it, and itself, given
    `file_mode` (default: what the umask gives, whatever mode a library chose) or the folder_mode() to go
    with it, and flushed to disk."""
    file_mode = default_file_mode() if file_mode is None else file_mode
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, folder_mode(file_mode))
            fsync_folder(path)
            continue
        os.chmod(path, file_mode)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.chmod(folder, folder_mode(file_mode))
    fsync_folder(folder)


def index_file(manifest: dict) -> str:
    """The version's index file: the one its manifest names, else Annoy's (every version before HNSW)."""
    index = manifest.get("index")
    return str(index.get("file", INDEX_FILE)) if isinstance(index, dict) else INDEX_FILE


def load_manifest(version_dir: Path, verify: bool = True) -> dict:
    """Reads a version's manifest and, with `verify`, checks every file's sha256 against it."""
    manifest_path = version_dir / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {error}") from None
    expected = manifest.get("files")
    if not isinstance(expected, dict) or not expected:
        raise ArtifactError(f"{manifest_path} lists no files")
    for required in (f"{MODEL_DIR}/saved_model.pb", index_file(manifest)):
        if required not in expected:
            raise ArtifactError(f"{manifest_path} does not list {required}")
    if LEGACY_ITEMS_FILE not in expected and not {IMAGES_FILE, PRODUCTS_FILE, VECTORS_FILE} <= set(expected):
        raise ArtifactError(f"{manifest_path} lists neither {IMAGES_FILE}, {PRODUCTS_FILE} and {VECTORS_FILE} "
                            f"nor a 0.1 {LEGACY_ITEMS_FILE}")
    if verify:
        root = version_dir.resolve()
        for rel, digest in expected.items():
            path = (version_dir / rel).resolve()
            if root not in path.parents:
                raise ArtifactError(f"manifest entry {rel!r} points outside {version_dir}")
            if not path.is_file():
                raise ArtifactError(f"{rel} is listed in the manifest but missing from {version_dir}")
            actual = sha256_file(path)
            if actual != digest:
                raise ArtifactError(f"{rel} does not match the manifest's sha256 "
                                    f"(expected {digest[:12]}..., found {actual[:12]}...)")
    return manifest
