"""A deterministic fake model and a tiny real Annoy index, for in-process servicer tests."""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from builder.index import build_annoy
from lookalike.preprocess import decode
from server.version import ItemIndex, ServedVersion
from tests.helpers import png_bytes

DIMENSION = 8


class FakeEmbedder:
    """Vector = normalised colour statistics of an 8x8 thumbnail; optionally slow."""

    dimension = DIMENSION

    def __init__(self, delay_s: float = 0.0, max_pixels: int = 1_000_000) -> None:
        self.delay_s = delay_s
        self.max_pixels = max_pixels
        self.batches: list[int] = []

    def preprocess(self, data: bytes) -> np.ndarray:
        rgb = decode(data, self.max_pixels)
        return np.asarray(Image.fromarray(rgb).resize((8, 8)), np.uint8)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        time.sleep(self.delay_s)
        flat = batch.reshape(len(batch), -1, 3).astype(np.float32)
        vectors = np.concatenate([flat.mean(1), flat.std(1), flat.max(1)[:, :2]], axis=1) + 1.0
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def warmup(self) -> None:
        self.embed(np.zeros((1, 8, 8, 3), np.uint8))


def catalogue_images(count: int = 40) -> list[bytes]:
    rng = np.random.default_rng(3)
    return [png_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(count)]


def fake_version(tmp_path, name: str = "fake-v1", delay_s: float = 0.0) -> tuple[ServedVersion, list[bytes]]:
    embedder = FakeEmbedder(delay_s)
    images = catalogue_images()
    vectors = embedder.embed(np.stack([embedder.preprocess(i) for i in images]))
    embedder.batches.clear()
    path = tmp_path / f"{name}.ann"
    build_annoy(vectors, 5, str(path))
    ids = [f"item-{i:03d}" for i in range(len(images))]
    index = ItemIndex(path, DIMENSION, ids, [f"aa/{i}.png" for i in ids], ["label"] * len(ids))
    manifest = {"backbone": "fake", "preprocessing": "thumbnail", "head": "none", "dimension": DIMENSION,
                "metric": "euclidean", "index": {"search_k": 1000, "n_trees": 5, "recall_at_10": 1.0}}
    return ServedVersion(name, manifest, embedder, index), images
