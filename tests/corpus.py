"""Malformed, hostile and merely unusual images, made here: what the decode path must survive."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

INVALID = "INVALID_ARGUMENT"
ACCEPTED = "OK"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, colour_type: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG whose header claims width x height; its pixel data may be tiny or a zlib bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    payload = zlib.compress(rows if rows is not None else b"\x00" * 64, 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", payload)
            + _png_chunk(b"IEND", b""))


def gif_declaring(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + descriptor + b"\x02\x02\x4c\x01\x00;"


def bmp_declaring(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\x00" * 16


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int = 0, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8))


def corpus() -> list[tuple[str, bytes, str]]:
    """(name, bytes, expected code): 28 refused, 9 unusual but valid."""
    rng = np.random.default_rng(11)
    jpeg = _encode(_photo(), "JPEG")
    png = _encode(_photo(), "PNG")
    gif = _encode(_photo(), "GIF")
    webp = _encode(_photo(), "WEBP")
    tiff = _encode(_photo(), "TIFF")
    bad_crc = bytearray(png)
    bad_crc[20] ^= 0xFF
    grey_bomb_rows = b"".join(b"\x00" + b"\x00" * 7000 for _ in range(7000))
    exif = Image.Exif()
    exif[0x0112] = 6
    huge_exif = Image.Exif()
    huge_exif[0x010E] = "x" * 60000
    frames = [_photo(i) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    palette = _photo().convert("P")
    palette.info["transparency"] = 0
    refused = [
        ("empty", b""),
        ("random-16-bytes", rng.bytes(16)),
        ("random-4-kib", rng.bytes(4096)),
        ("random-1-mib", rng.bytes(1 << 20)),
        ("truncated-jpeg", jpeg[: len(jpeg) // 2]),
        ("jpeg-soi-only", b"\xff\xd8"),
        ("jpeg-header-then-garbage", b"\xff\xd8\xff\xe0" + rng.bytes(2000)),
        ("truncated-png", png[: len(png) // 2]),
        ("png-signature-only", b"\x89PNG\r\n\x1a\n"),
        ("png-bad-crc", bytes(bad_crc)),
        ("wrong-magic-jpeg-over-png", b"\xff\xd8\xff" + png[3:]),
        ("png-declaring-50000x50000", png_declaring(50000, 50000)),
        ("gif-declaring-50000x50000", gif_declaring(50000, 50000)),
        ("bmp-declaring-50000x50000", bmp_declaring(50000, 50000)),
        ("png-zlib-bomb-7000x7000", png_declaring(7000, 7000, colour_type=0, rows=grey_bomb_rows)),
        ("png-zero-width", png_declaring(0, 10)),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10"/></svg>'),
        ("plain-text", b"this is a product description, not a photo"),
        ("html", b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"),
        ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
        ("zip", b"PK\x03\x04" + rng.bytes(200)),
        ("ico", _encode(_photo(size=(32, 32)), "ICO")),
        ("truncated-gif", gif[: len(gif) // 2]),
        ("truncated-webp", webp[: len(webp) // 2]),
        ("webp-riff-header-only", b"RIFF\x00\x00\x00\x00WEBPVP8 "),
        ("null-bytes", b"\x00" * 1000),
        ("truncated-tiff", tiff[:200]),
        ("png-huge-iend-less", png_declaring(30000, 30000)[:-12]),
    ]
    accepted = [
        ("animated-gif", animated.getvalue()),
        ("cmyk-jpeg", _encode(_photo().convert("CMYK"), "JPEG")),
        ("16-bit-png", _encode(Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)), "PNG")),
        ("grey-alpha-png", _encode(_photo().convert("LA"), "PNG")),
        ("exif-rotated-jpeg", _encode(_photo(), "JPEG", exif=exif.tobytes())),
        ("huge-exif-jpeg", _encode(_photo(), "JPEG", exif=huge_exif.tobytes())),
        ("1x1", _encode(Image.new("RGB", (1, 1), "red"), "PNG")),
        ("banner-10000x10", _encode(Image.new("RGB", (10000, 10), "blue"), "PNG")),
        ("palette-png-with-transparency", _encode(palette, "PNG")),
    ]
    return [(n, d, INVALID) for n, d in refused] + [(n, d, ACCEPTED) for n, d in accepted]


def rotated_twin() -> tuple[bytes, bytes]:
    """An EXIF-rotated JPEG and the same pixels rotated for real: both must embed alike."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = _photo()
    tagged = _encode(photo, "JPEG", exif=exif.tobytes(), quality=95)
    upright = Image.open(io.BytesIO(tagged))
    upright.load()
    from PIL import ImageOps

    return tagged, _encode(ImageOps.exif_transpose(upright), "PNG")
