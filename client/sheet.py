"""Contact sheets: a query image beside its neighbours, each labelled."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

TILE = 160
CAPTION = 46
REGION_COLOUR = (30, 90, 230)


def _tile(image: Image.Image | None, lines: list[str], highlight: bool, region=None) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    draw = ImageDraw.Draw(tile)
    if image is not None:
        thumb = ImageOps.contain(image.convert("RGB"), (TILE - 8, TILE - 8), Image.Resampling.NEAREST
                                 if max(image.size) < 64 else Image.Resampling.LANCZOS)
        left, top = (TILE - thumb.width) // 2, (TILE - thumb.height) // 2
        tile.paste(thumb, (left, top))
        if region is not None:  # the part of the photo the query used, relative to its size
            x_min, y_min, x_max, y_max = region
            draw.rectangle((left + x_min * thumb.width, top + y_min * thumb.height,
                            left + x_max * thumb.width - 1, top + y_max * thumb.height - 1),
                           outline=REGION_COLOUR, width=2)
    if image is None:
        draw.text((10, TILE // 2), "(image not found)", fill="grey")
    if highlight:
        draw.rectangle((1, 1, TILE - 2, TILE - 2), outline=(220, 40, 40), width=3)
    for row, line in enumerate(lines[:3]):
        draw.text((4, TILE + 2 + row * 14), line[:26], fill="black")
    return tile


def open_image(path: Path | str | None) -> Image.Image | None:
    """An image file turned upright as the server turns it before it crops (EXIF orientation applied, as
    lookalike.preprocess.decode does; client/ stays apart from it), so that a region outlined on it covers the
    pixels the server crops. None when there is no such file or it is not an image."""
    if path is None or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as image:
            image.seek(0)
            upright = ImageOps.exif_transpose(image)
            upright.load()
            return upright
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def contact_sheet(query_image: Image.Image | None, query_lines: list[str],
                  neighbours: list[tuple[Path | None, list[str]]], out: Path, columns: int = 6,
                  query_region: tuple[float, float, float, float] | None = None) -> Path:
    """Writes a PNG: the query first (outlined in red, its region, when it has one, in blue), then each neighbour
    with its caption."""
    tiles = [_tile(query_image, query_lines, True, query_region)] + [_tile(open_image(p), lines, False)
                                                                     for p, lines in neighbours]
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), (235, 235, 235))
    for position, tile in enumerate(tiles):
        sheet.paste(tile, ((position % columns) * TILE, (position // columns) * (TILE + CAPTION)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
