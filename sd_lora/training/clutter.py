"""Generic pictures for the tiny model's VAE: any color, texture, stroke and border, not just the scene palette.

A real Stable Diffusion VAE reconstructs almost any picture, so a LoRA can teach its UNet a new look and the
decoder will draw it. A VAE trained only on the tiny world (eight flat colors) collapses every other color onto the
palette: cream paper comes back white and gold comes back orange, and no adapter could ever show a new style. The
tiny VAE therefore also sees these pictures, which the UNet never does:

- a background of any RGB color, sometimes a gradient, with low-frequency mottling and fine grain;
- one to four shapes (the tiny world's four, plus ellipses and random polygons) in any color, some with an outline
  of another color, at any size and position;
- sometimes straight strokes, and sometimes a border band along the edges with rims and dots.

Nothing here draws the mozart_art style itself (`style_art.py`): its colors, frame layout and paper texture come
from none of these generators' fixed choices, only from the same broad families (colors, borders, texture) a
general-purpose autoencoder has to handle.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sd_lora.training.shapes import SHAPES, SUPERSAMPLE, shape_polygon


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A float (size, size, 3) background: flat or a two-color gradient, plus mottling and grain."""
    a = np.asarray(_color(rng), np.float32)
    if rng.random() < 0.3:
        b = np.asarray(_color(rng), np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        t = np.clip(0.5 + xx * np.cos(angle) + yy * np.sin(angle), 0, 1)[..., None]
        img = a * (1 - t) + b * t
    else:
        img = np.broadcast_to(a, (size, size, 3)).copy()
    if rng.random() < 0.6:
        cells = int(rng.integers(3, 9))
        coarse = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
        mottle = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
        img += rng.uniform(0, 14) * mottle[..., None]
    if rng.random() < 0.6:
        img += rng.normal(0.0, rng.uniform(0.5, 5.0), (size, size, 1))
    return img


def _border(draw: ImageDraw.ImageDraw, big: int, rng: np.random.Generator) -> None:
    """A band of random width and color along all four edges, maybe with rims, dots and corner blocks."""
    unit = SUPERSAMPLE
    w = int(rng.integers(2, big // (5 * unit))) * unit
    draw.rectangle([0, 0, big - 1, big - 1], outline=_color(rng), width=w)
    if rng.random() < 0.6:
        rim = _color(rng)
        draw.rectangle([0, 0, big - 1, big - 1], outline=rim, width=unit)
        draw.rectangle([w - unit, w - unit, big - w + unit - 1, big - w + unit - 1], outline=rim, width=unit)
    if rng.random() < 0.5 and w >= 3 * unit:
        dot, step, r = _color(rng), int(rng.integers(3, 7)) * unit, rng.uniform(0.6, 1.2) * unit
        for t in np.arange(w + step / 2, big - w, step):
            for cx, cy in ((t, w / 2), (t, big - w / 2), (w / 2, t), (big - w / 2, t)):
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=dot)
    if rng.random() < 0.4:
        block = _color(rng)
        for x0, y0 in ((0, 0), (big - w, 0), (0, big - w), (big - w, big - w)):
            draw.rectangle([x0, y0, x0 + w - 1, y0 + w - 1], fill=block)


def _shape(draw: ImageDraw.ImageDraw, big: int, rng: np.random.Generator) -> None:
    side = rng.uniform(0.12, 0.7) * big
    cx, cy = rng.uniform(0.1, 0.9, 2) * big
    fill = _color(rng)
    outline, width = (None, 0)
    if rng.random() < 0.5:
        outline, width = _color(rng), int(rng.integers(1, 4)) * SUPERSAMPLE // 2 + 1
    kind = int(rng.integers(0, len(SHAPES) + 2))
    rx = ry = side / 2
    if kind < len(SHAPES):  # the world's own shapes (None for its circle)
        poly = shape_polygon(SHAPES[kind], cx, cy, side)
    elif kind == len(SHAPES):  # an ellipse
        poly, ry = None, side / 2 * rng.uniform(0.4, 1.0)
    else:  # a random polygon, vertices sorted by angle
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = side / 2 * rng.uniform(0.5, 1.0, n)
        poly = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
    if poly is None:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)


def render_clutter(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One generic picture, `size` x `size` RGB, drawn at 4x and box-downsampled like the scenes."""
    big = size * SUPERSAMPLE
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 5))):
        _shape(draw, big, rng)
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 4))):
            x0, y0, x1, y1 = rng.uniform(0, big, 4)
            draw.line([(x0, y0), (x1, y1)], fill=_color(rng), width=int(rng.integers(1, 3)) * SUPERSAMPLE)
    if rng.random() < 0.4:
        _border(draw, big, rng)
    small = np.asarray(layer.resize((size, size), Image.Resampling.BOX), np.float32)
    alpha = small[..., 3:] / 255.0
    out = small[..., :3] * alpha + _background(size, rng) * (1 - alpha)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def clutter_images(n: int, seed: int, size: int = 64) -> np.ndarray:
    """n generic pictures as a uint8 array (n, size, size, 3), deterministic in `seed`."""
    rng = np.random.default_rng([seed, 0xC1077E12])  # a stream of its own, apart from the scenes'
    return np.stack([np.asarray(render_clutter(rng, size)) for _ in range(n)])
