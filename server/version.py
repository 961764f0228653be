"""One served artifact version: the checked model, the memory-mapped index and the catalogue."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike import artifacts
from lookalike.neighbours import NeighbourLists, load_neighbours
from lookalike.preprocess import INPUT_SIZE, PreprocessConfig, Preprocessor, Region
from server.catalogue import Catalogue, load_catalogue
from server.fresh import FreshProducts
from server.search import ProductSearch, SearchConfig

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """The model interface: N images in, N unit vectors out."""

    dimension: int

    def preprocess(self, data: bytes, region: Region | None = None) -> np.ndarray:
        """The model's input for encoded bytes, or for the part of the image a relative region covers."""
        ...

    def embed(self, batch: np.ndarray) -> np.ndarray: ...

    def warmup(self) -> None: ...


class SavedModelBackend:
    """The builder's SavedModel with the builder's preprocessing: the two can never disagree."""

    def __init__(self, model_dir: Path, preprocessing: str, max_pixels: int, model_threads: int = 0) -> None:
        from lookalike.runner import SavedModelEmbedder

        self._model = SavedModelEmbedder(model_dir, intra_op_threads=model_threads)
        self._preprocess = Preprocessor(PreprocessConfig(preprocessing=preprocessing, max_pixels=max_pixels))
        self.dimension = self._model.dimension

    def preprocess(self, data: bytes, region: Region | None = None) -> np.ndarray:
        return self._preprocess(data, region)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._model(batch)

    def warmup(self) -> None:
        # Two shapes: TensorFlow traces per batch size, so the first real batches pay less.
        for size in (1, 8):
            self.embed(np.zeros((size, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))


class Neighbours(Protocol):
    """A version's neighbour lists: the exact top products of each product and of each index row."""

    def list_of(self, kind: str, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Product rows (-1 past the end), each one's best index row and its score, best first, of product
        `row` ("product") or of index row `row` ("image")."""
        ...


class ListedNeighbours:
    """A version's neighbour lists as the query engine walks them (plain views of the mapped arrays: numpy's
    memmap subclass costs more per row slice than the slice itself)."""

    def __init__(self, lists: NeighbourLists) -> None:
        self.n = lists.n
        self._lists = {
            "product": (_plain(lists.product_neighbours), _plain(lists.product_neighbour_rows),
                        _plain(lists.product_neighbour_scores)),
            "image": (_plain(lists.image_neighbours), _plain(lists.image_neighbour_rows),
                      _plain(lists.image_neighbour_scores))}

    def list_of(self, kind: str, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        products, rows, scores = self._lists[kind]
        return products[row], rows[row], scores[row]


def _plain(array: np.ndarray) -> np.ndarray:
    return array.view(np.ndarray) if isinstance(array, np.memmap) else array


@dataclass
class ServedVersion:
    """Everything one version serves with; the servicer never sees files."""

    name: str
    manifest: dict
    embedder: Embedder
    index: ProductSearch
    # None for a version built without neighbour lists: every query then searches.
    neighbours: Neighbours | None = None
    # The version whose load read the model in `embedder`: this one, or the served version it shares it with.
    model_of: str = ""
    # The products of the version's deltas read so far (server/fresh.py), or None. A request keeps the object it
    # started with: a delta applied meanwhile is a new ServedVersion sharing everything else.
    fresh: FreshProducts | None = None

    def __post_init__(self) -> None:
        self.model_of = self.model_of or self.name

    @property
    def catalogue(self) -> Catalogue:
        return self.index.catalogue

    @property
    def delta_sequence(self) -> int:
        """The last delta this object serves (0: none)."""
        return 0 if self.fresh is None else self.fresh.sequence

    @property
    def fresh_key(self) -> str:
        """Names the fresh products' state, as the version's name names its own."""
        return f"{self.name}+{self.delta_sequence}"

    @property
    def search_k(self) -> int:
        return int(self.manifest["index"]["search_k"])

    def close(self) -> None:
        self.index.unload()


def model_identity(manifest: dict) -> tuple:
    """What decides the vectors a version's model gives: its SavedModel's files (by checksum), its
    preprocessing and dimension. Two versions with the same identity embed every image alike."""
    model_files = tuple(sorted((rel, digest) for rel, digest in manifest["files"].items()
                               if rel.startswith(f"{artifacts.MODEL_DIR}/")))
    return manifest["preprocessing"], int(manifest["dimension"]), model_files


def load_version(artifacts_dir: Path, version: str, max_pixels: int,
                 search: SearchConfig = SearchConfig(), model_threads: int = 0,
                 served: ServedVersion | None = None) -> ServedVersion:
    """Checks and loads a version; raises ArtifactError saying what is wrong.

    When `served` (the version being served now) has the same model (model_identity), its loaded model is
    shared instead of loaded again: a daily build or a reindex keeps the model, so its swap neither loads
    TensorFlow a second time nor leaves a model's reference cycles behind to collect (server/versions.py)."""
    version = artifacts.check_version_name(version)
    version_dir = artifacts_dir / version
    if not version_dir.is_dir():
        raise artifacts.ArtifactError(f"version {version} named by CURRENT has no folder {version_dir}")
    manifest = artifacts.load_manifest(version_dir, verify=True)
    dimension = int(manifest["dimension"])
    shared = served is not None and model_identity(served.manifest) == model_identity(manifest)
    try:
        backend = served.embedder if shared else SavedModelBackend(
            version_dir / artifacts.MODEL_DIR, manifest["preprocessing"], max_pixels, model_threads)
    except Exception as error:
        raise artifacts.ArtifactError(f"the model of {version} does not load: {error}") from error
    if backend.dimension != dimension:
        raise artifacts.ArtifactError(f"model outputs {backend.dimension}-d vectors, manifest and index "
                                      f"say {dimension}")
    catalogue, vectors = load_catalogue(version_dir, manifest)
    if vectors.shape[1] != dimension:
        raise artifacts.ArtifactError(f"the index's vectors are {vectors.shape[1]}-d, the manifest says {dimension}")
    # The index the manifest names: Annoy (every version before HNSW) or HNSW; search_k is its budget (ef for HNSW).
    index = ProductSearch(catalogue, vectors, version_dir / artifacts.index_file(manifest),
                          search_k=int(manifest["index"]["search_k"]), n_trees=int(manifest["index"]["n_trees"]),
                          config=search, metric=manifest.get("metric", "euclidean"),
                          kind=manifest["index"].get("kind", "annoy"))
    lists = load_neighbours(version_dir, manifest)
    if shared:
        log.info("version %s has the model of %s: sharing it, not loading it again", version, served.name)
    else:
        backend.warmup()
    release_freed_memory()
    return ServedVersion(version, manifest, backend, index, None if lists is None else ListedNeighbours(lists),
                         model_of=served.model_of if shared else version)


def release_freed_memory() -> None:
    """Gives back to the system what a load allocated and freed: pyarrow's pool keeps the pages of the tables read
    for the next ones, and glibc's malloc keeps freed pages in its heaps. Kept, they count in every worker's memory
    (tens of MB at ABO's size); pages still in use are untouched."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = getattr(_libc(), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
