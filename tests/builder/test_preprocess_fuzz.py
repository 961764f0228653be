"""Property-based fuzzing of the decode path: any bytes give an RGB array or an ImageError, nothing else."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike.preprocess import ImageError, decode


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(5)
    photo = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buffer = io.BytesIO()
        photo.save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


SEEDS = _seed_images()


def _check(data: bytes) -> None:
    try:
        array = decode(data, max_pixels=4_000_000)
    except ImageError as error:
        assert str(error)
        return
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.shape[0] * array.shape[1] <= 4_000_000


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    _check(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=12),
       st.integers(0, 10_000))
def test_mutated_real_images(seed, flips, cut):
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    _check(bytes(data[: max(1, len(data) - cut % len(data))]))
