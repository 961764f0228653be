"""The feature extractor: backbone + head as a SavedModel taking uint8 [N, 256, 256, 3]."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.backbones import SPECS, build_backbone
from lookalike.preprocess import INPUT_SIZE
from lookalike.runner import INPUT_NAME, OUTPUT_NAME, SIGNATURE

log = logging.getLogger(__name__)

HEADS = ("pca", "lda", "metric", "random-conv", "none")
# A build's default: with product types (label_key with two values or more), lda, or metric when it
# beats lda's precision@10 on a held-out share of the catalogue by more than noise; else pca.
AUTO_HEAD = "auto"
# Heads fitted on the catalogue's product types (an attribute), never on anything a query brings.
SUPERVISED_HEADS = ("lda", "metric")
POOLINGS = ("avg", "gem")
GEM_P = 3.0
_GEM_EPSILON = 1e-6
_RANDOM_HEAD_SEED = 1234
# Shrinkage of the within-type scatter towards its diagonal: with hundreds of feature axes and few
# images of a rare type, the raw scatter is near singular.
LDA_SHRINKAGE = 0.1
# How much of an lda head's cosine is product-type similarity (the rest is look similarity): 0.7
# measured best on Fashion-MNIST and clip art (BENCHMARKS.md).
DEFAULT_TYPE_WEIGHT = 0.7


class LabelError(ValueError):
    """A supervised head cannot be fitted: the catalogue lacks the labels it learns from."""


@dataclass(frozen=True)
class Projection:
    """A linear map baked into the model after the backbone: y = (x - mean) @ matrix."""

    mean: np.ndarray
    matrix: np.ndarray

    @classmethod
    def fit_pca(cls, features: np.ndarray, dimension: int) -> Projection:
        """Fits PCA on catalogue features; the components keep the most variance in `dimension` axes."""
        features = np.asarray(features, dtype=np.float64)
        if features.shape[0] < 2:
            raise ValueError("PCA needs at least two feature rows")
        mean = features.mean(axis=0)
        _, _, components = np.linalg.svd(features - mean, full_matrices=False)
        dimension = min(dimension, components.shape[0])
        return cls(mean.astype(np.float32), components[:dimension].T.astype(np.float32))

    @classmethod
    def fit_lda(cls, features: np.ndarray, labels, dimension: int,
                shrinkage: float = LDA_SHRINKAGE) -> Projection:
        """Fisher's linear discriminant on catalogue features and their product types.

        Axes are the generalised eigenvectors of the between-type scatter against the (shrunk)
        within-type scatter, most discriminative first: the first (types - 1) separate types, the rest
        are within-type whitened axes that keep look-alikes within a type apart from each other. Rows
        without a label (None or "") are left out of the fit.
        """
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray([None if label is None or label != label else str(label) for label in labels],
                            dtype=object)
        if len(labels) != len(features):
            raise ValueError(f"{len(labels)} labels for {len(features)} feature rows")
        known = np.array([label not in (None, "") for label in labels], dtype=bool)
        if not known.any():
            raise LabelError("no image has a label: a supervised head needs the catalogue's product types")
        types, codes = np.unique(labels[known].astype(str), return_inverse=True)
        if len(types) < 2:
            raise LabelError(f"a supervised head needs at least two labels, the catalogue has {len(types)}")
        x = features[known]
        counts = np.bincount(codes).astype(np.float64)
        means = np.zeros((len(types), x.shape[1]))
        np.add.at(means, codes, x)
        means /= counts[:, None]
        mean = x.mean(axis=0)
        within = x - means[codes]
        scatter_within = within.T @ within / len(x)
        # Shrunk towards its own diagonal: each axis keeps its scale, correlations are damped.
        scatter_within = (1 - shrinkage) * scatter_within + shrinkage * np.diag(np.diag(scatter_within))
        between = (means - mean) * np.sqrt(counts / len(x))[:, None]
        values, vectors = np.linalg.eigh(scatter_within)
        whiten = vectors / np.sqrt(np.maximum(values, 1e-12 * values.max()))
        whitened_between = whiten.T @ (between.T @ between) @ whiten
        strengths, axes = np.linalg.eigh(whitened_between)
        order = np.argsort(-strengths)[:min(dimension, len(mean))]
        return cls(mean.astype(np.float32), (whiten @ axes[:, order]).astype(np.float32))

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float32) - self.mean) @ self.matrix


@dataclass(frozen=True)
class Head:
    """What the model does after pooling: one or more projections. With one part of weight 1 (PCA) the
    output is that projection. With several, each part's output is unit-normalised and scaled by the
    square root of its weight before they are joined, so the cosine of two outputs is the weighted sum
    of the parts' cosines: for LDA, type similarity * type_weight + look similarity * (1 - type_weight)."""

    parts: tuple[tuple[Projection, float], ...]

    @property
    def dimension(self) -> int:
        return sum(projection.matrix.shape[1] for projection, _ in self.parts)

    @property
    def blended(self) -> bool:
        return len(self.parts) > 1

    def apply(self, features: np.ndarray) -> np.ndarray:
        if not self.blended:
            projection, _ = self.parts[0]
            return projection.apply(features)
        return np.hstack([np.sqrt(weight) * l2_normalise(projection.apply(features))
                          for projection, weight in self.parts])


def fit_head(head: str, features: np.ndarray, dimension: int, labels=None,
             type_weight: float = DEFAULT_TYPE_WEIGHT) -> Head | None:
    """The head a build bakes in, fitted on catalogue features (and, for lda, their product types).

    lda: min(types - 1, dimension / 2) discriminant axes, which tell product types apart, blended with
    PCA axes for the rest of the dimension, which keep look-alikes within a type in order."""
    if head == "pca":
        return Head(((Projection.fit_pca(features, dimension), 1.0),))
    if head == "lda":
        if labels is None:
            raise LabelError("head 'lda' learns from product types: no labels were given")
        if not 0 < type_weight < 1:
            raise ValueError("type_weight must be between 0 and 1 (exclusive)")
        known = {label for label in labels if isinstance(label, str) and label}
        axes = max(1, min(len(known) - 1, dimension // 2))
        types = Projection.fit_lda(features, labels, axes)
        return Head(((types, type_weight), (Projection.fit_pca(features, dimension - axes), 1.0 - type_weight)))
    if head in (*SUPERVISED_HEADS, AUTO_HEAD):
        raise ValueError(f"head {head!r} is fitted with a held-out split of products: builder.metric.fit_supervised")
    return None


def save_head(head: Head | None, path: Path) -> None:
    """The head's projections as plain arrays (no pickle) beside the SavedModel that holds them too: `add` applies
    them to the feature cache's trunk output, so one backbone run gives both the features and the vector."""
    arrays: dict[str, np.ndarray] = {"weights": np.asarray([w for _, w in head.parts] if head else [], np.float64)}
    for n, (projection, _) in enumerate(head.parts if head else ()):
        arrays[f"mean_{n}"], arrays[f"matrix_{n}"] = projection.mean, projection.matrix
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_head(path: Path) -> Head | None:
    """What save_head wrote: the head, or None for a version whose vectors are the trunk's, normalised."""
    with np.load(path, allow_pickle=False) as arrays:
        weights = arrays["weights"].tolist()
        parts = tuple((Projection(arrays[f"mean_{n}"], arrays[f"matrix_{n}"]), float(w)) for n, w in enumerate(weights))
    return Head(parts) if parts else None


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows; an all-zero row stays zero rather than becoming NaN."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def gem_pool(maps: np.ndarray, p: float = GEM_P) -> np.ndarray:
    """NumPy's GeM pooling over [N, H, W, C] maps, the same as the trunk's GeneralizedMeanPooling."""
    maps = np.asarray(maps, np.float64)
    return np.power(np.power(np.maximum(maps, _GEM_EPSILON), p).mean(axis=(1, 2)), 1.0 / p).astype(np.float32)


def pool(maps: np.ndarray, pooling: str) -> np.ndarray:
    """[N, H, W, C] feature maps -> [N, C] features, as the trunk pools them."""
    if pooling == "gem":
        return gem_pool(maps)
    if pooling == "avg":
        return np.asarray(maps, np.float32).mean(axis=(1, 2))
    raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")


def build_feature_map_model(backbone: str, weights_file: str | None = None):
    """uint8 pixels -> the backbone's last feature map, with the backbone's own normalisation inside."""
    import keras

    spec = SPECS[backbone]
    pixels = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), dtype="uint8", name=INPUT_NAME)
    x = keras.layers.Rescaling(1.0, name="to_float")(pixels)
    x = keras.layers.Normalization(mean=list(spec.mean), variance=[s * s for s in spec.std],
                                   name="backbone_normalisation")(x)
    x = build_backbone(backbone, INPUT_SIZE, weights_file=weights_file)(x)
    return keras.Model(pixels, x, name=f"{backbone}_feature_map")


def seed_head():
    """The seed's head: an untrained Conv2D(128, 5, relu); its initialiser is seeded so builds repeat."""
    import keras

    init = keras.initializers.GlorotUniform(seed=_RANDOM_HEAD_SEED)
    return keras.layers.Conv2D(128, 5, activation="relu", kernel_initializer=init, name="seed_head")


def build_trunk(backbone: str, head: str, weights_file: str | None = None, pooling: str = "avg",
                mirror: bool = False):
    """Returns a Keras model: uint8 pixels -> un-normalised features (the part the executors run).

    With `mirror`, the features are the mean of the image's and its left-right mirror's: a shirt facing
    left looks like the same shirt facing right (twice the model work)."""
    import keras

    # The auto head, like pca, lda and metric, is fitted after the trunk and leaves it as it is.
    if head not in (*HEADS, AUTO_HEAD):
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    feature_map = build_feature_map_model(backbone, weights_file)
    conv = seed_head() if head == "random-conv" else None
    if pooling == "gem":
        from builder.layers import GeneralizedMeanPooling

        pool_layer = GeneralizedMeanPooling(GEM_P, _GEM_EPSILON, name="pool")
    else:
        pool_layer = keras.layers.GlobalAveragePooling2D(name="pool")

    def features(pixels):
        x = feature_map(pixels)
        return pool_layer(conv(x) if conv is not None else x)

    pixels = feature_map.input
    x = features(pixels)
    if mirror:
        from builder.layers import Mirror

        x = keras.layers.Average(name="with_mirror")([x, features(Mirror(name="mirror")(pixels))])
    suffix = "_mirror" if mirror else ""
    return keras.Model(pixels, x, name=f"{backbone}_{head}_{pooling}{suffix}_trunk")


def export(trunk, path: str | Path, head: Head | None, normalise: bool = True) -> int:
    """Saves trunk (+ head) (+ L2 normalisation) as a SavedModel; returns the output dimension."""
    import tensorflow as tf

    parts = [] if head is None else [(tf.constant(p.mean), tf.constant(p.matrix), float(np.sqrt(w)))
                                     for p, w in head.parts]
    blended = head is not None and head.blended

    class Extractor(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = trunk
            self.parts = parts

        @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.uint8,
                                                    name=INPUT_NAME)])
        def serve(self, images):
            features = self.trunk(images, training=False)
            if self.parts:
                projected = [tf.matmul(features - mean, matrix) for mean, matrix, _ in self.parts]
                if blended:
                    projected = [scale * tf.math.l2_normalize(part, axis=1, epsilon=1e-24)
                                 for part, (_, _, scale) in zip(projected, self.parts, strict=True)]
                features = tf.concat(projected, axis=1)
            if normalise:
                features = tf.math.l2_normalize(features, axis=1, epsilon=1e-24)
            return {OUTPUT_NAME: features}

    module = Extractor()
    tf.saved_model.save(module, str(path), signatures={SIGNATURE: module.serve})
    return head.dimension if head is not None else int(trunk.output.shape[-1])
