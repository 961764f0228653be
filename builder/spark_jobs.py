"""What runs inside Spark: the image scan and the batch embedding, one pandas batch at a time."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import pandas as pd

SCAN_SCHEMA = "uri string, bytes long, mtime long, sha256 string, file_width int, file_height int, error string"
# Features are keyed by the sha256 of the image bytes: the same content is embedded once, wherever it is.
EMBED_SCHEMA = "sha256 string, features array<float>, error string"

# One model and one preprocessor per Python worker: Spark reuses workers across tasks.
_WORKER_STATE: dict[tuple, object] = {}


def scan_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Width and height from each file, decoding it fully so a corrupt file is caught here. Batches hold
    binaryFile's path, length and content, plus mtime (epoch milliseconds)."""
    from lookalike.preprocess import ImageError, decode

    for batch in batches:
        widths, heights, errors, digests = [], [], [], []
        for content in batch["content"]:
            digests.append(hashlib.sha256(content).hexdigest())
            try:
                height, width = decode(bytes(content)).shape[:2]
                widths.append(width)
                heights.append(height)
                errors.append(None)
            except ImageError as error:
                widths.append(None)
                heights.append(None)
                errors.append(str(error))
        yield pd.DataFrame({
            "uri": batch["path"], "bytes": batch["length"], "mtime": batch["mtime"], "sha256": digests,
            "file_width": pd.array(widths, dtype="Int32"), "file_height": pd.array(heights, dtype="Int32"),
            "error": errors,
        })


def _worker_model(model_dir: str, preprocessing: str, threads: int):
    key = (model_dir, preprocessing, threads)
    if key not in _WORKER_STATE:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from lookalike.preprocess import PreprocessConfig, Preprocessor
        from lookalike.runner import SavedModelEmbedder

        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (SavedModelEmbedder(model_dir, intra_op_threads=threads),
                              Preprocessor(PreprocessConfig(preprocessing=preprocessing)))
    return _WORKER_STATE[key]


def make_embedder(model_dir: str, preprocessing: str, threads: int, batch_size: int, ids: dict[str, str]):
    """Returns the mapInPandas function that embeds binaryFile (path, content) rows on an executor.

    `ids` maps each file's URI to the sha256 of its content, the key of its features; it travels with
    the task (a group's worth of ids).
    """

    def embed_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from lookalike.preprocess import ImageError

        model, preprocess = _worker_model(model_dir, preprocessing, threads)
        for batch in batches:
            digests = [ids[uri] for uri in batch["path"]]
            contents = list(batch["content"])
            for start in range(0, len(digests), batch_size):
                arrays, good, errors = [], [], {}
                for digest, content in zip(digests[start:start + batch_size],
                                          contents[start:start + batch_size], strict=True):
                    try:
                        arrays.append(preprocess(bytes(content)))
                        good.append(digest)
                    except ImageError as error:
                        errors[digest] = str(error)
                features = model(np.stack(arrays)) if arrays else np.zeros((0, 0), np.float32)
                yield pd.DataFrame({
                    "sha256": good + list(errors),
                    "features": [row.astype(np.float32) for row in features] + [None] * len(errors),
                    "error": [None] * len(good) + list(errors.values()),
                })

    return embed_batches
