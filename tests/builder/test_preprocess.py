"""The shared preprocessing: formats, orientation, limits, determinism."""

import io

import numpy as np
import pytest
from PIL import Image

from lookalike.preprocess import INPUT_SIZE, ImageError, PreprocessConfig, Preprocessor, decode
from tests.helpers import png_bytes


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_common_formats_decode_to_rgb(fmt):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    array = decode(_encode(image, fmt))
    assert array.shape == (30, 40, 3) and array.dtype == np.uint8


def test_clahe_grey_output_is_grey_uint8_of_input_size_and_deterministic():
    rng = np.random.default_rng(0)
    data = png_bytes(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    preprocess = Preprocessor(PreprocessConfig(preprocessing="clahe-grey"))
    first, second = preprocess(data), preprocess(data)
    assert first.shape == (INPUT_SIZE, INPUT_SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first[..., 0], first[..., 1]) and np.array_equal(first[..., 1], first[..., 2])
    assert np.array_equal(first, second)


def test_plain_keeps_colour():
    data = png_bytes(np.full((20, 20, 3), (255, 0, 0), np.uint8))
    out = Preprocessor(PreprocessConfig(preprocessing="plain"))(data)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert decode(_encode(image, "JPEG", exif=exif.tobytes())).shape == (40, 20, 3)


def test_transparent_pixels_go_on_white_and_16_bit_keeps_range():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert tuple(decode(_encode(rgba, "PNG"))[0, 0]) == (255, 255, 255)
    wide = Image.fromarray(np.full((4, 4), 40000, np.uint16))
    assert decode(_encode(wide, "PNG"))[0, 0, 0] == 156  # 40000 / 257, not clipped to 255


def test_pixel_limit_refuses_before_decoding():
    data = png_bytes(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageError, match="too large: .* over the limit"):
        decode(data, max_pixels=5000)
    assert decode(data, max_pixels=10_000).shape == (100, 100, 3)


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"<svg></svg>"])
def test_garbage_is_an_image_error(data):
    with pytest.raises(ImageError):
        decode(data)


def test_an_image_over_pils_own_bomb_guard_is_too_large_not_undecodable():
    # 90 MP of one bit: PIL warns at 89.5 MP before our own limit is even checked.
    buffer = io.BytesIO()
    Image.new("1", (9500, 9500)).save(buffer, format="PNG")
    with pytest.raises(ImageError, match="^too large: "):
        decode(buffer.getvalue())
