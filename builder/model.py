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

HEADS = ("pca", "random-conv", "none")
_RANDOM_HEAD_SEED = 1234


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

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float32) - self.mean) @ self.matrix


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows; an all-zero row stays zero rather than becoming NaN."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


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


def build_trunk(backbone: str, head: str, weights_file: str | None = None):
    """Returns a Keras model: uint8 pixels -> un-normalised features (the part the executors run)."""
    import keras

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    feature_map = build_feature_map_model(backbone, weights_file)
    x = feature_map.output
    if head == "random-conv":
        x = seed_head()(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(feature_map.input, x, name=f"{backbone}_{head}_trunk")


def export(trunk, path: str | Path, projection: Projection | None, normalise: bool = True) -> int:
    """Saves trunk (+ projection) (+ L2 normalisation) as a SavedModel; returns the output dimension."""
    import tensorflow as tf

    class Extractor(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = trunk
            self.mean = None if projection is None else tf.constant(projection.mean)
            self.matrix = None if projection is None else tf.constant(projection.matrix)

        @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.uint8,
                                                    name=INPUT_NAME)])
        def serve(self, images):
            features = self.trunk(images, training=False)
            if self.matrix is not None:
                features = tf.matmul(features - self.mean, self.matrix)
            if normalise:
                features = tf.math.l2_normalize(features, axis=1, epsilon=1e-24)
            return {OUTPUT_NAME: features}

    module = Extractor()
    tf.saved_model.save(module, str(path), signatures={SIGNATURE: module.serve})
    dimension = projection.matrix.shape[1] if projection is not None else int(trunk.output.shape[-1])
    return dimension
