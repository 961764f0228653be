"""Writes Fashion-MNIST as an Amazon Berkeley Objects catalogue (images and listings): the demo's and CI's."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
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


def image_path(image_id: str) -> str:
    """ABO-style path under small/ for an image id: `<2 hex>/<8 hex>.png`, stable across runs."""
    digest = hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return f"{digest[:2]}/{digest}.png"


def main_image_id(split: str, index: int) -> str:
    return f"fm-{split}-{index:05d}"


def product_id(split: str, index: int) -> str:
    return f"prod-{split}-{index:05d}"


# Each class as an ABO product_type.
PRODUCT_TYPES = ("T_SHIRT", "PANTS", "SWEATER", "DRESS", "COAT", "SANDAL", "SHIRT", "SNEAKER", "HANDBAG", "BOOT")
# Attributes with uneven frequencies, as a real catalogue has them: filters in the benchmark pick
# values near 50%, 5%, 0.5% and 0.05% of the products.
COLOURS = (("Black", 0.50), ("White", 0.15), ("Blue", 0.10), ("Grey", 0.08), ("Red", 0.06), ("Beige", 0.05),
           ("Green", 0.04), ("Pink", 0.02))
COUNTRIES = (("US", "en_US", "amazon.com", 0.50), ("GB", "en_GB", "amazon.co.uk", 0.21),
             ("DE", "de_DE", "amazon.de", 0.13), ("IN", "en_IN", "amazon.in", 0.08),
             ("JP", "ja_JP", "amazon.co.jp", 0.05), ("FR", "fr_FR", "amazon.fr", 0.025),
             ("ES", "es_ES", "amazon.es", 0.005))
BRAND_COUNT = 300
BRAND_ZIPF_EXPONENT = 1.1
# Each product type's typical weight in pounds (a product's is log-normal about it, as a real catalogue's spread),
# and the shares of listings with a weight, with dimensions and with a model year (ABO leaves many fields out).
TYPICAL_POUNDS = (0.4, 0.9, 1.1, 0.8, 2.5, 0.9, 0.5, 1.8, 1.5, 3.0)
WEIGHT_SPREAD = 0.35
HAS_WEIGHT, HAS_DIMENSIONS, HAS_MODEL_YEAR = 0.9, 0.6, 0.7
MODEL_YEARS = (2014, 2022)
# Marketplaces whose listings write metric units (ABO's normalized_value is still in pounds and inches).
METRIC_COUNTRIES = ("DE", "FR", "ES", "JP")
# Products have 1 to 4 images with these shares; the other images are views of the main one.
IMAGES_PER_PRODUCT = (0.45, 0.30, 0.15, 0.10)
LISTING_PARTS = 4
_VIEWS = ("mirror", "shift", "zoom", "crop", "brightness")


def _brand_weights() -> np.ndarray:
    weights = np.arange(1, BRAND_COUNT + 1, dtype=np.float64) ** -BRAND_ZIPF_EXPONENT
    return weights / weights.sum()


def derived_view(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Another photo of the same product: mirrored, shifted, zoomed, cropped or lit differently."""
    height, width = image.shape
    if kind == "mirror":
        return image[:, ::-1].copy()
    if kind == "shift":
        dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
        out = np.zeros_like(image)
        out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
            image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
        return out
    if kind == "zoom":
        size = int(round(width * rng.uniform(1.15, 1.35)))
        large = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        top = (size - height) // 2
        return large[top:top + height, top:top + width].copy()
    if kind == "crop":
        side = int(rng.integers(20, 25))
        top, left = (int(v) for v in rng.integers(0, width - side + 1, size=2))
        window = Image.fromarray(image[top:top + side, left:left + side])
        return np.asarray(window.resize((width, height), Image.BILINEAR))
    if kind == "brightness":
        return np.clip(image.astype(np.float32) * rng.uniform(0.6, 1.4), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown view {kind!r}")


def _listing(split: Split, position: int, image_ids: list[str], rng: np.random.Generator) -> dict:
    label = int(split.labels[position])
    country, language, domain, _ = COUNTRIES[rng.choice(len(COUNTRIES), p=[c[3] for c in COUNTRIES])]
    colour = COLOURS[rng.choice(len(COLOURS), p=[c[1] for c in COLOURS])][0]
    brand = f"Brand{int(rng.choice(BRAND_COUNT, p=_brand_weights())) + 1:03d}"
    tagged = lambda value: [{"language_tag": language, "value": value}]  # noqa: E731
    listing = {"item_id": product_id(split.name, int(split.indices[position])), "main_image_id": image_ids[0],
               "product_type": [{"value": PRODUCT_TYPES[label]}], "country": country, "marketplace": "Amazon",
               "domain_name": domain, "item_name": tagged(f"{brand} {CLASS_NAMES[label]}"),
               "brand": tagged(brand), "color": tagged(colour)}
    if len(image_ids) > 1:  # like ABO, a listing without other images has no other_image_id at all
        listing["other_image_id"] = image_ids[1:]
    # Drawn last, so that every earlier choice is what it was before listings had numbers.
    listing.update(_numbers(label, country in METRIC_COUNTRIES, rng))
    return listing


def _measure(value: float, unit: str, metric_unit: str, factor: float, metric: bool) -> dict:
    """A measure as ABO writes it: normalized to pounds or inches, the raw value in the marketplace's unit."""
    raw = (round(value * factor, 1), metric_unit) if metric else (round(value, 2), unit)
    return {"normalized_value": {"unit": unit, "value": round(value, 2)}, "unit": raw[1], "value": raw[0]}


def _numbers(label: int, metric: bool, rng: np.random.Generator) -> dict:
    """ABO's item_weight, item_dimensions and model_year for a product, each present for its share of listings."""
    pounds = TYPICAL_POUNDS[label] * float(np.exp(rng.normal(0, WEIGHT_SPREAD)))
    sides = np.sort(rng.uniform(2, 16, size=3) * (pounds / 1.2) ** (1 / 3))
    year = int(rng.integers(MODEL_YEARS[0], MODEL_YEARS[1] + 1))
    present = rng.random(3) < (HAS_WEIGHT, HAS_DIMENSIONS, HAS_MODEL_YEAR)
    out: dict = {}
    if present[0]:
        out["item_weight"] = [_measure(pounds, "pounds", "kilograms", 0.45359237, metric)]
    if present[1]:
        out["item_dimensions"] = {side: _measure(float(inches), "inches", "centimeters", 2.54, metric)
                                  for side, inches in zip(("height", "width", "length"), sides[::-1], strict=True)}
    if present[2]:
        out["model_year"] = [{"value": year}]
    return out


def write_catalogue(split: Split, out: Path, max_images_per_product: int = 4) -> tuple[int, int]:
    """Writes small/<2 hex>/<8 hex>.png, images.csv.gz, labels.csv and ABO listings (one product per
    Fashion-MNIST image, with 0 to 3 derived views); returns (products, images)."""
    (out / "small").mkdir(parents=True, exist_ok=True)
    shares = np.asarray(IMAGES_PER_PRODUCT[:max_images_per_product])
    shares = shares / shares.sum()
    rows, label_rows, listings = [], [], []
    for position in tqdm(range(len(split.images)), desc="writing products", unit="product"):
        index = int(split.indices[position])
        # Seeded by the image's index in its split, so a product is the same whatever --limit is.
        rng = np.random.default_rng([index, 0 if split.name == "train" else 1])
        main = split.images[position]
        views = [main] + [derived_view(main, kind, rng) for kind in
                          rng.choice(_VIEWS, size=int(rng.choice(len(shares), p=shares)), replace=False)]
        image_ids = [main_image_id(split.name, index)] + [
            f"{main_image_id(split.name, index)}-v{n}" for n in range(1, len(views))]
        for image_id, pixels in zip(image_ids, views, strict=True):
            rel = image_path(image_id)
            target = out / "small" / rel
            target.parent.mkdir(exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
            target.write_bytes(buffer.getvalue())
            rows.append((image_id, pixels.shape[0], pixels.shape[1], rel))
            label = int(split.labels[position])
            label_rows.append((image_id, label, CLASS_NAMES[label]))
        listings.append(_listing(split, position, image_ids, rng))
    with gzip.open(out / "images.csv.gz", "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image_id", "height", "width", "path"))
        writer.writerows(rows)
    with open(out / LABELS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("image_id", "label", "label_name"))
        writer.writerows(label_rows)
    folder = out / "listings" / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(LISTING_PARTS):
        with gzip.open(folder / f"listings_{part}.json.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(listing, ensure_ascii=False) + "\n"
                              for listing in listings[part::LISTING_PARTS])
    return len(listings), len(rows)


def write_sample(out: Path, limit: int | None = None, split: str = "train",
                 max_images_per_product: int = 4) -> tuple[int, int]:
    """`limit` products (balanced over the classes); returns (products, images)."""
    data = load_split(split)
    if limit is not None and limit < len(data.images):
        data = balanced_subset(data, limit)
    return write_catalogue(data, out, max_images_per_product)


def refresh_packaged_sample(size: int = 2000) -> None:
    """Maintainers' helper: re-cuts the committed sample from Debian's data set."""
    subset = balanced_subset(load_split("train"), size)
    write_idx(PACKAGED_DIR / "fashion-mnist-sample-images-idx3-ubyte.gz", subset.images)
    write_idx(PACKAGED_DIR / "fashion-mnist-sample-labels-idx1-ubyte.gz", subset.labels)
    write_idx(PACKAGED_DIR / "fashion-mnist-sample-indices-idx1-ubyte.gz", subset.indices.astype(np.int32))
