"""The one image path from encoded bytes to the model's uint8 input, shared by builder and server."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

INPUT_SIZE = 256
PREPROCESSINGS = ("clahe-grey", "plain")
# 40 megapixels: a 6000x6000 product photo fits; a decompression bomb does not.
DEFAULT_MAX_PIXELS = 40_000_000
_ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}


class ImageError(ValueError):
    """The bytes are not an image this service accepts; the message says why."""


# Every refusal of an image for its size starts so: a build reports those as their own drop reason.
TOO_LARGE = "too large"


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded image becomes model input."""

    # "plain" (resize only, keeps colour) or "clahe-grey" (the seed: CLAHE on lightness, then grey).
    preprocessing: str = "plain"
    # Pixel budget per decoded image; larger images are refused before their pixels are decoded.
    max_pixels: int = DEFAULT_MAX_PIXELS
    # CLAHE's contrast limit; fixed (the seed drew it at random from [1, 4] per image).
    clahe_clip_limit: float = 4.0

    def __post_init__(self) -> None:
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, not {self.preprocessing!r}")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # PIL's own guard (89 MP warns, 179 MP refuses) fires before our limit is checked.
        raise ImageError(f"{TOO_LARGE}: {error}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("cannot decode image: not a recognised image format") from None
    except Exception as error:  # PIL raises many types for bad bytes; all mean the same here.
        raise ImageError(f"cannot decode image: {type(error).__name__}: {error}") from None
    if image.format not in _ALLOWED_FORMATS:
        raise ImageError(f"unsupported image format {image.format}")
    return image


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes an encoded image (first frame, EXIF orientation applied) to RGB uint8 [H, W, 3]."""
    image = _open(data)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{TOO_LARGE}: {width}x{height} pixels ({width * height / 1e6:.1f} MP) is over the "
                         f"limit of {max_pixels / 1e6:g} MP")
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Product photos with transparency go on white, as a shop page shows them.
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, rgba)
        elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: scale 0..65535 to 0..255 (PIL's own convert would clip at 255).
            wide = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"cannot decode image: {type(error).__name__}: {error}") from None
    return array


# A box of an image in relative coordinates: (x_min, y_min, x_max, y_max), (0, 0) the top left corner.
Region = tuple[float, float, float, float]


def check_region(region: Region) -> Region:
    """The region as four floats, or ValueError saying what is wrong with it."""
    try:
        x_min, y_min, x_max, y_max = (float(v) for v in region)
    except (TypeError, ValueError):
        raise ValueError(f"a region is four numbers x_min, y_min, x_max, y_max, not {region!r}") from None
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in (x_min, y_min, x_max, y_max)):
        raise ValueError(f"region ({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g}) is out of range: every coordinate is "
                         f"relative, in 0..1")
    if not (x_min < x_max and y_min < y_max):
        raise ValueError(f"region ({x_min:g}, {y_min:g}, {x_max:g}, {y_max:g}) is empty: x_min < x_max and "
                         f"y_min < y_max")
    return x_min, y_min, x_max, y_max


def region_box(region: Region, width: int, height: int) -> tuple[int, int, int, int]:
    """The pixels a relative region covers: (left, top, right, bottom), right and bottom exclusive, at least one
    pixel. Every pixel the box touches is in: a region drawn on a thumbnail covers the same part at full size."""
    x_min, y_min, x_max, y_max = check_region(region)
    # Coordinates come as float32 (the wire): an edge meant to fall on a pixel boundary lands a hair beside it,
    # which must not add a pixel.
    slack = 1e-4
    left = min(math.floor(x_min * width + slack), width - 1)
    top = min(math.floor(y_min * height + slack), height - 1)
    right = max(math.ceil(x_max * width - slack), left + 1)
    bottom = max(math.ceil(y_max * height - slack), top + 1)
    return left, top, min(right, width), min(bottom, height)


def crop(rgb: np.ndarray, region: Region | None) -> np.ndarray:
    """The part of a decoded [H, W, 3] image a relative region covers (the whole image for None)."""
    if region is None:
        return rgb
    left, top, right, bottom = region_box(region, rgb.shape[1], rgb.shape[0])
    return np.ascontiguousarray(rgb[top:bottom, left:right])


class Preprocessor:
    """Turns encoded bytes or decoded RGB arrays into the model's uint8 [256, 256, 3] input."""

    def __init__(self, config: PreprocessConfig = PreprocessConfig()) -> None:
        import albumentations as A  # noqa: N812 (the library's own convention)

        self.config = config
        steps = [A.Resize(INPUT_SIZE, INPUT_SIZE)]
        if config.preprocessing == "clahe-grey":
            clip = (config.clahe_clip_limit, config.clahe_clip_limit)
            steps += [A.CLAHE(clip_limit=clip, tile_grid_size=(8, 8), p=1.0),
                      A.ToGray(num_output_channels=3, p=1.0)]
        self._transform = A.Compose(steps)

    def from_array(self, rgb: np.ndarray) -> np.ndarray:
        return self._transform(image=rgb)["image"]

    def __call__(self, data: bytes, region: Region | None = None) -> np.ndarray:
        """The model input for encoded bytes, or for the part of the image a relative region covers."""
        return self.from_array(crop(decode(data, self.config.max_pixels), region))
