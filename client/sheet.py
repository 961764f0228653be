"""Contact sheets: a query image beside its neighbours, each labelled."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

TILE = 160
CAPTION = 46


def _tile(image: Image.Image | None, lines: list[str], highlight: bool) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    if image is not None:
        thumb = ImageOps.contain(image.convert("RGB"), (TILE - 8, TILE - 8), Image.Resampling.NEAREST
                                 if max(image.size) < 64 else Image.Resampling.LANCZOS)
        tile.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
    draw = ImageDraw.Draw(tile)
    if image is None:
        draw.text((10, TILE // 2), "(image not found)", fill="grey")
    if highlight:
        draw.rectangle((1, 1, TILE - 2, TILE - 2), outline=(220, 40, 40), width=3)
    for row, line in enumerate(lines[:3]):
        draw.text((4, TILE + 2 + row * 14), line[:26], fill="black")
    return tile


def _open(path: Path | None) -> Image.Image | None:
    if path is None or not path.is_file():
        return None
    with Image.open(path) as image:
        return image.copy()


def contact_sheet(query_image: Image.Image | None, query_lines: list[str],
                  neighbours: list[tuple[Path | None, list[str]]], out: Path, columns: int = 6) -> Path:
    """Writes a PNG: the query first (outlined in red), then each neighbour with its caption."""
    tiles = [_tile(query_image, query_lines, True)] + [_tile(_open(p), lines, False) for p, lines in neighbours]
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), (235, 235, 235))
    for position, tile in enumerate(tiles):
        sheet.paste(tile, ((position % columns) * TILE, (position // columns) * (TILE + CAPTION)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
