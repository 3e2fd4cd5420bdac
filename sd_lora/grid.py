"""Labelled image grids (column labels on top, row labels on the left): the UI's Compare and weight sweep, and the
style demo's before/after picture."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 160  # tiny 64x64 images are scaled up (nearest) so the labels stay readable next to them


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(rows: list[list[Image.Image]], col_labels: list[str], row_labels: list[str] | None = None,
                  title: str = "") -> Image.Image:
    """rows[j][i] is the tile in row j, column i; every tile has the same size."""
    tw, th = rows[0][0].size
    scale = max(1, -(-MIN_TILE // max(tw, th)))  # ceil
    tw, th = tw * scale, th * scale
    font = _font(max(14, min(28, tw // 9)))
    pad = 8
    line = font.getbbox("Ag")[3] + 4
    head = line * (2 if title else 1) + pad
    left = (max((int(font.getlength(t)) for t in row_labels), default=0) + 2 * pad) if row_labels else 0
    grid = Image.new("RGB", (left + tw * len(col_labels), head + th * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad // 2), title, fill="black", font=font)
    for i, label in enumerate(col_labels):
        x = left + i * tw + (tw - font.getlength(_fit(label, font, tw))) / 2
        draw.text((x, head - line), _fit(label, font, tw), fill="black", font=font)
    for j, row in enumerate(rows):
        if row_labels:
            draw.text((pad, head + j * th + (th - line) / 2), row_labels[j], fill="black", font=font)
        for i, tile in enumerate(row):
            resized = tile.convert("RGB").resize((tw, th), Image.NEAREST) if scale > 1 else tile.convert("RGB")
            grid.paste(resized, (left + i * tw, head + j * th))
    return grid


def _fit(text: str, font, width: int) -> str:
    """Shorten a label with an ellipsis so it fits in one tile's width."""
    if font.getlength(text) <= width - 4:
        return text
    while text and font.getlength(text + "…") > width - 4:
        text = text[:-1]
    return text + "…"
