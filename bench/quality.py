"""Retrieval quality on Fashion-MNIST: precision@10 and mAP@10 per backbone x head x preprocessing."""

from __future__ import annotations

import logging
import time

import numpy as np

from builder.model import Projection, build_feature_map_model, l2_normalise, seed_head
from builder.sample import balanced_subset, load_split
from lookalike.preprocess import PreprocessConfig, Preprocessor

log = logging.getLogger(__name__)
HEAD_NAMES = ("random-conv", "pca", "none")
# Levers measured ahead of building them (issue 12): generalized-mean pooling (p = 3, Radenovic et al.)
# and PCA whitening fitted on the catalogue (Jegou and Chum). Not build options yet.
GEM_P = 3.0


def gem_pool(maps: np.ndarray, p: float = GEM_P) -> np.ndarray:
    """Generalized-mean pooling over the spatial axes: (mean(max(x, eps)^p))^(1/p)."""
    return np.power(np.power(np.maximum(maps, 1e-6), p).mean(axis=(1, 2)), 1.0 / p)


def pca_whiten(catalogue: np.ndarray, everything: np.ndarray, dimension: int) -> np.ndarray:
    """PCA fitted on the catalogue with each axis scaled to unit variance."""
    projection = Projection.fit_pca(catalogue, dimension)
    projected = projection.apply(catalogue)
    scale = 1.0 / np.sqrt(projected.var(axis=0) + 1e-6)
    return projection.apply(everything) * scale


def queries_and_catalogue(catalogue_size: int, query_count: int):
    """Catalogue from the training split, queries from the test split (or a disjoint part of the sample)."""
    train = load_split("train")
    try:
        test = load_split("test")
        catalogue = balanced_subset(train, catalogue_size)
        queries = balanced_subset(test, query_count)
        source = "Debian dataset-fashion-mnist: catalogue from train, queries from test"
    except FileNotFoundError:
        both = balanced_subset(train, catalogue_size + query_count)
        order = np.random.default_rng(0).permutation(len(both.images))
        pick = lambda idx: type(both)(both.name, both.images[idx], both.labels[idx], both.indices[idx])  # noqa: E731
        catalogue, queries = pick(order[query_count:]), pick(order[:query_count])
        source = "committed 2,000-image sample, split into catalogue and queries"
    return catalogue, queries, source


def precision_and_map_at_10(catalogue_vectors, catalogue_labels, query_vectors, query_labels) -> tuple[float, float]:
    """Exact search on unit vectors: the quality of the embedding itself, apart from the index."""
    scores = query_vectors @ catalogue_vectors.T
    top = np.argsort(-scores, axis=1)[:, :10]
    relevant = catalogue_labels[top] == query_labels[:, None]
    precision = relevant.mean()
    hits = np.cumsum(relevant, axis=1)
    precision_at_rank = hits / np.arange(1, 11)
    denominators = np.minimum(10, np.bincount(catalogue_labels, minlength=10)[query_labels])
    average_precision = (precision_at_rank * relevant).sum(axis=1) / np.maximum(denominators, 1)
    return float(precision), float(average_precision.mean())


def _feature_maps(backbone: str, preprocessing: str, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    model = build_feature_map_model(backbone)
    preprocess = Preprocessor(PreprocessConfig(preprocessing=preprocessing))
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([preprocess.from_array(np.repeat(img[:, :, None], 3, axis=2))
                          for img in images[start:start + batch_size]])
        out.append(model.predict_on_batch(batch))
    return np.concatenate(out)


def evaluate(catalogue_size: int, query_count: int, backbones, preprocessings, dimension: int = 128) -> dict:
    catalogue, queries, source = queries_and_catalogue(catalogue_size, query_count)
    rows = []
    raw_catalogue = l2_normalise(catalogue.images.reshape(len(catalogue.images), -1).astype(np.float32))
    raw_queries = l2_normalise(queries.images.reshape(len(queries.images), -1).astype(np.float32))
    p10, map10 = precision_and_map_at_10(raw_catalogue, catalogue.labels, raw_queries, queries.labels)
    rows.append({"backbone": "raw pixels", "preprocessing": "none", "head": "none", "dimension": 784,
                 "precision_at_10": round(p10, 4), "map_at_10": round(map10, 4)})
    images = np.concatenate([catalogue.images, queries.images])
    n = len(catalogue.images)
    for backbone in backbones:
        for preprocessing in preprocessings:
            started = time.perf_counter()
            maps = _feature_maps(backbone, preprocessing, images)
            seconds = time.perf_counter() - started
            pooled = maps.mean(axis=(1, 2))
            heads = {"none": pooled}
            projection = Projection.fit_pca(pooled[:n], dimension)
            heads["pca"] = projection.apply(pooled)
            heads["random-conv"] = np.asarray(seed_head()(maps)).mean(axis=(1, 2))
            gem = gem_pool(maps)
            heads["pca-whiten"] = pca_whiten(pooled[:n], pooled, dimension)
            heads["gem + pca"] = Projection.fit_pca(gem[:n], dimension).apply(gem)
            heads["gem + pca-whiten"] = pca_whiten(gem[:n], gem, dimension)
            for head in (*HEAD_NAMES, "pca-whiten", "gem + pca", "gem + pca-whiten"):
                vectors = l2_normalise(heads[head])
                p10, map10 = precision_and_map_at_10(vectors[:n], catalogue.labels, vectors[n:], queries.labels)
                rows.append({"backbone": backbone, "preprocessing": preprocessing, "head": head,
                             "dimension": int(vectors.shape[1]), "precision_at_10": round(p10, 4),
                             "map_at_10": round(map10, 4), "feature_seconds": round(seconds, 1)})
                log.info("%s", rows[-1])
    # The best configuration a build can make today (the levers above are measured, not yet options).
    best = max((r for r in rows[1:] if r["head"] in HEAD_NAMES), key=lambda r: (r["precision_at_10"], r["map_at_10"]))
    return {"catalogue_size": n, "query_count": len(queries.images), "source": source, "rows": rows,
            "best": best, "raw_pixel_floor": rows[0]}
