"""Keras layers of our own, imported only where a model is built (keras is heavy to import)."""

from __future__ import annotations

import keras
from keras import ops


class GeneralizedMeanPooling(keras.layers.Layer):
    """GeM pooling (Radenovic, Tolias and Chum, 2018): (mean over H, W of max(x, eps)^p)^(1/p) per channel.

    p = 1 is average pooling and p -> inf max pooling; p = 3 weights the strongest responses, which is
    what an object's features are, over the background's.
    """

    def __init__(self, p: float = 3.0, epsilon: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.p = float(p)
        self.epsilon = float(epsilon)

    def call(self, maps):
        powered = ops.power(ops.maximum(maps, self.epsilon), self.p)
        return ops.power(ops.mean(powered, axis=(1, 2)), 1.0 / self.p)

    def get_config(self) -> dict:
        return {**super().get_config(), "p": self.p, "epsilon": self.epsilon}


class Mirror(keras.layers.Layer):
    """Flips images left to right ([N, H, W, C], W is axis 2)."""

    def call(self, images):
        return ops.flip(images, axis=2)
