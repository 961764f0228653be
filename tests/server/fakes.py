"""A deterministic fake model and a tiny real Annoy index and catalogue, for in-process server tests."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
from PIL import Image

from builder.index import build_annoy
from lookalike.preprocess import Region, crop, decode
from lookalike.v1 import lookalike_pb2_grpc as pb_grpc
from server.catalogue import Catalogue
from server.core import CoreConfig, SimilarityCore
from server.metrics import ServerMetrics
from server.search import ProductSearch, SearchConfig
from server.servicer import ImageSimilarityServicer
from server.version import ServedVersion
from tests.helpers import png_bytes

DIMENSION = 8


class FakeEmbedder:
    """Vector = normalised colour statistics of an 8x8 thumbnail; optionally slow."""

    dimension = DIMENSION

    def __init__(self, delay_s: float = 0.0, max_pixels: int = 1_000_000) -> None:
        self.delay_s = delay_s
        self.max_pixels = max_pixels
        self.batches: list[int] = []
        # Cleared by a test to hold the model on its current batch (a batch in flight, for as long as the
        # test needs) until the test sets it again.
        self.gate = threading.Event()
        self.gate.set()

    def preprocess(self, data: bytes, region: Region | None = None) -> np.ndarray:
        rgb = crop(decode(data, self.max_pixels), region)
        return np.asarray(Image.fromarray(rgb).resize((8, 8)), np.uint8)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        if not self.gate.wait(60):  # bounded: a test that forgets to open it fails instead of hanging
            raise TimeoutError("the fake model's gate stayed closed")
        time.sleep(self.delay_s)
        flat = batch.reshape(len(batch), -1, 3).astype(np.float32)
        vectors = np.concatenate([flat.mean(1), flat.std(1), flat.max(1)[:, :2]], axis=1) + 1.0
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def warmup(self) -> None:
        self.embed(np.zeros((1, 8, 8, 3), np.uint8))


def catalogue_images(count: int = 40, views_from: int | None = None) -> list[bytes]:
    """Random images; with views_from=n, image n + i is a slightly changed view of image i."""
    rng = np.random.default_rng(3)
    pixels = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(count)]
    if views_from is not None:
        for i in range(views_from, count):
            noise = rng.integers(-12, 13, (16, 16, 3))
            pixels[i] = np.clip(pixels[i - views_from].astype(int) + noise, 0, 255).astype(np.uint8)
    return [png_bytes(p) for p in pixels]


def make_search(tmp_path, vectors: np.ndarray, groups: list[list[int]], image_ids: list[str] | None = None,
                product_ids: list[str] | None = None, attributes: dict | None = None, has_products: bool = True,
                config: SearchConfig = SearchConfig(), name: str = "index", numbers: dict | None = None
                ) -> ProductSearch:
    """A real Annoy index and catalogue over `vectors`; groups[p] lists product p's image indices, main first."""
    order = [i for group in groups for i in group]
    image_ids = image_ids or [f"item-{i:03d}" for i in range(len(vectors))]
    product_ids = product_ids or [f"prod-{p:03d}" for p in range(len(groups))]
    rows = np.asarray(vectors, np.float32)[order]
    path = tmp_path / f"{name}.ann"
    build_annoy(rows, 5, str(path))
    counts = np.asarray([len(g) for g in groups], np.int64)
    catalogue = Catalogue(
        image_ids=[image_ids[i] for i in order], paths=[f"aa/{image_ids[i]}.png" for i in order],
        labels=["label"] * len(order), roles=[("main" if n == 0 else "other") for g in groups for n in range(len(g))],
        row_product=np.repeat(np.arange(len(groups)), counts), product_ids=product_ids,
        first_row=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), image_count=counts,
        attributes=attributes or {}, has_products=has_products, numbers=numbers)
    return ProductSearch(catalogue, rows, path, search_k=1000, n_trees=5, config=config)


def fake_version(tmp_path, name: str = "fake-v1", delay_s: float = 0.0, groups: list[list[int]] | None = None,
                 has_products: bool = True, config: SearchConfig = SearchConfig(), attributes: dict | None = None,
                 numbers: dict | None = None) -> tuple[ServedVersion, list[bytes]]:
    """40 catalogue images; by default each is a product of its own (prod-000 owns item-000). With
    groups, a product's other images are views of its main one."""
    embedder = FakeEmbedder(delay_s)
    images = catalogue_images(views_from=None if groups is None else 40 - sum(len(g) > 1 for g in groups))
    vectors = embedder.embed(np.stack([embedder.preprocess(i) for i in images]))
    embedder.batches.clear()
    groups = groups or [[i] for i in range(len(images))]
    index = make_search(tmp_path, vectors, groups, has_products=has_products, config=config, name=name,
                        attributes=attributes, numbers=numbers)
    manifest = {"backbone": "fake", "preprocessing": "thumbnail", "head": "none", "dimension": DIMENSION,
                "metric": "euclidean", "index": {"search_k": 1000, "n_trees": 5, "recall_at_10": 1.0}}
    return ServedVersion(name, manifest, embedder, index), images


async def serve_core(version: ServedVersion, metrics: ServerMetrics):
    """A core on `version` behind the real servicer on a real gRPC server on 127.0.0.1: (core, server, port)."""
    core = SimilarityCore(version, CoreConfig(max_pixels=1_000_000), metrics)
    server = grpc.aio.server()
    pb_grpc.add_ImageSimilarityServicer_to_server(ImageSimilarityServicer(core, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return core, server, port


async def serve_in_process(tmp_path, **version_args):
    """The fake version behind the real servicer on a real gRPC server on 127.0.0.1; returns
    (stub, catalogue images, metrics, parts for close_in_process)."""
    version, images = fake_version(tmp_path, **version_args)
    metrics = ServerMetrics()
    core, server, port = await serve_core(version, metrics)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return pb_grpc.ImageSimilarityStub(channel), images, metrics, (channel, server, core)


async def close_in_process(parts):
    channel, server, core = parts
    await channel.close()
    await server.stop(0)
    await core.close()


def with_lists(version: ServedVersion, n: int) -> ServedVersion:
    """The version with exact neighbour lists of n products, as the builder computes them."""
    from lookalike.neighbours import NeighbourLists, exact_top_products, product_query_vectors
    from server.version import ListedNeighbours

    catalogue, vectors = version.catalogue, np.asarray(version.index.vectors)
    products = exact_top_products(product_query_vectors(vectors, catalogue.first_row, catalogue.image_count),
                                  vectors, catalogue.first_row, catalogue.image_count, n)
    images = exact_top_products(vectors, vectors, catalogue.first_row, catalogue.image_count, n)
    version.neighbours = ListedNeighbours(NeighbourLists(n, *products, *images))
    return version
