"""The SavedModel runner: the one place TensorFlow executes an exported feature extractor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookalike.preprocess import INPUT_SIZE

# The serving signature every exported extractor has: uint8 [N, 256, 256, 3] -> float32 [N, D].
SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class SavedModelEmbedder:
    """Loads an exported extractor and runs it on batches of preprocessed images."""

    def __init__(self, path: str | Path, intra_op_threads: int = 0) -> None:
        import tensorflow as tf

        if intra_op_threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass  # TensorFlow was initialised already in this process; keep its setting.
        self._tf = tf
        self._loaded = tf.saved_model.load(str(path))
        self._signature = self._loaded.signatures[SIGNATURE]
        spec = self._signature.structured_outputs[OUTPUT_NAME]
        self.dimension = int(spec.shape[-1])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype != np.uint8 or batch.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"model input must be uint8 [N, {INPUT_SIZE}, {INPUT_SIZE}, 3], not "
                             f"{batch.dtype} {batch.shape}")
        out = self._signature(**{INPUT_NAME: self._tf.constant(batch)})[OUTPUT_NAME]
        return out.numpy()
