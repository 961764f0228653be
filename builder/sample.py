"""Writes Fashion-MNIST as an Amazon Berkeley Objects image folder: the catalogue the demo and CI use."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGED_DIR = Path(__file__).parent / "data"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
LABELS_FILE = "labels.csv"
_IDX_TYPES = {0x08: np.uint8, 0x0C: np.dtype(">i4")}


def read_idx(path: Path) -> np.ndarray:
    """Reads an idx file (gzip or plain): the format Fashion-MNIST ships in."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=_IDX_TYPES[type_code], offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    type_code = 0x08 if array.dtype == np.uint8 else 0x0C
    data = array.astype(np.uint8 if type_code == 0x08 else ">i4")
    header = struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + data.tobytes(), mtime=0))


@dataclass(frozen=True)
class Split:
    """Images of one split with their labels and their indices in the original split."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def load_split(split: str) -> Split:
    """Debian's full data set when installed, else the sample committed in the package."""
    prefix = {"train": "train", "test": "t10k"}[split]
    debian_images = DEBIAN_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if debian_images.exists():
        images = read_idx(debian_images)
        labels = read_idx(DEBIAN_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        return Split(split, images, labels, np.arange(len(images)))
    if split != "train":
        raise FileNotFoundError("the test split needs Debian's dataset-fashion-mnist package")
    log.info("dataset-fashion-mnist is not installed: using the committed 2,000-image sample")
    return Split(split, read_idx(PACKAGED_DIR / "fashion-mnist-sample-images-idx3-ubyte.gz"),
                 read_idx(PACKAGED_DIR / "fashion-mnist-sample-labels-idx1-ubyte.gz"),
                 read_idx(PACKAGED_DIR / "fashion-mnist-sample-indices-idx1-ubyte.gz").astype(np.int64))


def balanced_subset(split: Split, limit: int) -> Split:
    """The first `limit` images taken round-robin over classes, so every class is represented."""
    per_class = [np.flatnonzero(split.labels == c) for c in range(len(CLASS_NAMES))]
    order = [idx for group in zip(*per_class, strict=False) for idx in group][:limit]
    order = np.sort(np.asarray(order, dtype=np.int64))
    return Split(split.name, split.images[order], split.labels[order], split.indices[order])


def item_path(split: str, index: int) -> tuple[str, str]:
    """ABO-style (image_id, path): a stable id and `<2 hex>/<8 hex>.png` under small/."""
    image_id = f"fm-{split}-{index:05d}"
    digest = hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return image_id, f"{digest[:2]}/{digest}.png"


def write_catalogue(split: Split, out: Path) -> int:
    """Writes small/<2 hex>/<id>.png, images.csv.gz and labels.csv; returns the image count."""
    (out / "small").mkdir(parents=True, exist_ok=True)
    rows, label_rows = [], []
    for image, label, index in tqdm(zip(split.images, split.labels, split.indices, strict=True),
                                    total=len(split.images), desc="writing images", unit="img"):
        image_id, rel = item_path(split.name, int(index))
        target = out / "small" / rel
        target.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG")
        target.write_bytes(buffer.getvalue())
        rows.append((image_id, image.shape[0], image.shape[1], rel))
        label_rows.append((image_id, int(label), CLASS_NAMES[int(label)]))
    with gzip.open(out / "images.csv.gz", "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image_id", "height", "width", "path"))
        writer.writerows(rows)
    with open(out / LABELS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image_id", "label", "label_name"))
        writer.writerows(label_rows)
    return len(rows)


def write_sample(out: Path, limit: int | None = None, split: str = "train") -> int:
    data = load_split(split)
    if limit is not None and limit < len(data.images):
        data = balanced_subset(data, limit)
    return write_catalogue(data, out)


def refresh_packaged_sample(size: int = 2000) -> None:
    """Maintainers' helper: re-cuts the committed sample from Debian's data set."""
    subset = balanced_subset(load_split("train"), size)
    write_idx(PACKAGED_DIR / "fashion-mnist-sample-images-idx3-ubyte.gz", subset.images)
    write_idx(PACKAGED_DIR / "fashion-mnist-sample-labels-idx1-ubyte.gz", subset.labels)
    write_idx(PACKAGED_DIR / "fashion-mnist-sample-indices-idx1-ubyte.gz", subset.indices.astype(np.int32))
