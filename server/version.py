"""One served artifact version: the checked model, the memory-mapped index and the items table."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike import artifacts
from lookalike.preprocess import INPUT_SIZE, PreprocessConfig, Preprocessor

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """The model interface: N images in, N unit vectors out."""

    dimension: int

    def preprocess(self, data: bytes) -> np.ndarray: ...

    def embed(self, batch: np.ndarray) -> np.ndarray: ...

    def warmup(self) -> None: ...


class SavedModelBackend:
    """The builder's SavedModel with the builder's preprocessing: the two can never disagree."""

    def __init__(self, model_dir: Path, preprocessing: str, max_pixels: int) -> None:
        from lookalike.runner import SavedModelEmbedder

        self._model = SavedModelEmbedder(model_dir)
        self._preprocess = Preprocessor(PreprocessConfig(preprocessing=preprocessing, max_pixels=max_pixels))
        self.dimension = self._model.dimension

    def preprocess(self, data: bytes) -> np.ndarray:
        return self._preprocess(data)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._model(batch)

    def warmup(self) -> None:
        # Two shapes: TensorFlow traces per batch size, so the first real batches pay less.
        for size in (1, 8):
            self.embed(np.zeros((size, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))


@dataclass(frozen=True)
class Match:
    item_id: str
    distance: float
    path: str
    label: str


class ItemIndex:
    """Annoy over unit vectors plus the id <-> row mapping from items.parquet."""

    def __init__(self, index_path: Path, dimension: int, item_ids: list[str], paths: list[str],
                 labels: list[str], metric: str = "euclidean") -> None:
        from annoy import AnnoyIndex

        self._annoy = AnnoyIndex(dimension, metric)
        # prefault: read the pages in now, so the first queries do not pay for page faults.
        if not self._annoy.load(str(index_path), prefault=True):
            raise artifacts.ArtifactError(f"annoy could not load {index_path}")
        if self._annoy.get_n_items() != len(item_ids):
            raise artifacts.ArtifactError(f"index has {self._annoy.get_n_items()} items, items table "
                                          f"{len(item_ids)}")
        self.dimension = dimension
        self.item_ids = item_ids
        self.paths = paths
        self.labels = labels
        self.row_of = {item_id: row for row, item_id in enumerate(item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def vector_of(self, row: int) -> np.ndarray:
        return np.asarray(self._annoy.get_item_vector(row), np.float32)

    def _matches(self, rows: list[int], distances: list[float]) -> list[Match]:
        return [Match(self.item_ids[r], d, self.paths[r], self.labels[r]) for r, d in
                zip(rows, distances, strict=True)]

    def by_vector(self, vector: np.ndarray, k: int, search_k: int) -> list[Match]:
        rows, distances = self._annoy.get_nns_by_vector(vector.tolist(), k, search_k=search_k,
                                                         include_distances=True)
        return self._matches(rows, distances)

    def by_row(self, row: int, k: int, search_k: int) -> list[Match]:
        rows, distances = self._annoy.get_nns_by_item(row, k, search_k=search_k, include_distances=True)
        return self._matches(rows, distances)

    def unload(self) -> None:
        self._annoy.unload()


@dataclass
class ServedVersion:
    """Everything one version serves with; the servicer never sees files."""

    name: str
    manifest: dict
    embedder: Embedder
    index: ItemIndex

    @property
    def search_k(self) -> int:
        return int(self.manifest["index"]["search_k"])

    def close(self) -> None:
        self.index.unload()


def load_version(artifacts_dir: Path, version: str, max_pixels: int) -> ServedVersion:
    """Checks and loads a version; raises ArtifactError saying what is wrong."""
    import pyarrow.parquet as pq

    version = artifacts.check_version_name(version)
    version_dir = artifacts_dir / version
    if not version_dir.is_dir():
        raise artifacts.ArtifactError(f"version {version} named by CURRENT has no folder {version_dir}")
    manifest = artifacts.load_manifest(version_dir, verify=True)
    dimension = int(manifest["dimension"])
    try:
        backend = SavedModelBackend(version_dir / artifacts.MODEL_DIR, manifest["preprocessing"], max_pixels)
    except Exception as error:
        raise artifacts.ArtifactError(f"the model of {version} does not load: {error}") from error
    if backend.dimension != dimension:
        raise artifacts.ArtifactError(f"model outputs {backend.dimension}-d vectors, manifest and index "
                                      f"say {dimension}")
    items = pq.read_table(version_dir / artifacts.ITEMS_FILE, columns=["annoy_id", "image_id", "path",
                                                                       "label_name"]).to_pydict()
    if items["annoy_id"] != list(range(len(items["annoy_id"]))):
        raise artifacts.ArtifactError("items.parquet rows are not in annoy id order")
    labels = [name or "" for name in items["label_name"]]
    index = ItemIndex(version_dir / artifacts.INDEX_FILE, dimension, items["image_id"], items["path"], labels,
                      manifest.get("metric", "euclidean"))
    backend.warmup()
    return ServedVersion(version, manifest, backend, index)
