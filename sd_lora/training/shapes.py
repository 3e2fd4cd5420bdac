"""The tiny model's world: one colored shape on a colored background, and the captions that describe it.

Everything here is deterministic from a seed and needs only PIL + numpy, so the training data of the built-in
model (`train/base_tiny.py`), the style data set (`style_art.py`) and the quality benchmark (`metrics.py`) all
describe the same world, and any of them can be regenerated bit for bit.

Train/eval split: a (color, shape, background) combination is held out for evaluation when (color index +
shape index + background index) % 4 == 0. That reserves exactly one of the four shapes for every (color,
background) pair (56 of the 224 combinations), so every word is seen in every role during training, but the
benchmark's prompts ask for combinations the model never saw: it must compose, not recall.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# Fixed, well-separated colors (the closest pair, yellow/orange, is 85 apart in RGB) so a pixel classifier can
# name them after antialiasing, VAE round trips and diffusion noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

SIZE_RANGE = (0.3, 0.62)  # side of the shape's bounding box, as a fraction of the image side
MARGIN = 0.07  # the shape stays this far from the edge, so the border pixels always show the background
SUPERSAMPLE = 4  # render at 4x and downsample: antialiased edges like a real (blurry) image
STAR_INNER = 0.382  # inner/outer radius of the regular five-pointed star (the pentagram's own ratio)

# Paraphrases of one description. Every word is in the tiny tokenizer's vocabulary (make_tokenizer.WORDS); the
# comma is a byte token there. The first template is the canonical caption used for evaluation prompts.
# {a}/{ab} are "a" or "an" for the color / background word that follows ("an orange star").
TEMPLATES: tuple[str, ...] = (
    "{a} {color} {shape} on {ab} {background} background",
    "{ab} {background} background with {a} {color} {shape}",
    "{color} {shape}, {background} background",
    "a picture of {a} {color} {shape} on {ab} {background} background",
    "{a} {color} {shape} with {ab} {background} background",
    "{color} {shape} on {background} background",
)


@dataclass(frozen=True)
class Scene:
    """One picture: `size` is the bounding-box side, `center` its center (x, y); fractions of the image."""

    shape: str
    color: str
    background: str
    size: float
    center: tuple[float, float]


class Parsed(NamedTuple):
    """What a caption says about a scene (no size or position: captions do not mention them)."""

    shape: str
    color: str
    background: str


def _as_random(rng) -> random.Random:
    """Accept random.Random, an int seed, None (seed 0) or a numpy Generator: callers use what they have."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    return random.Random(0 if rng is None else rng)


def is_held_out(color: str, shape: str, background: str) -> bool:
    """True when this combination is reserved for evaluation (see the module docstring for why this rule)."""
    return (COLORS.index(color) + SHAPES.index(shape) + COLORS.index(background)) % 4 == 0


def combos(split: str = "train") -> list[Parsed]:
    """All (shape, color, background) combinations of a split: "train" (168), "eval" (56) or "all" (224)."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', not {split!r}")
    out = []
    for color in COLORS:
        for background in COLORS:
            if background == color:
                continue
            for shape in SHAPES:
                held = is_held_out(color, shape, background)
                if split == "all" or held == (split == "eval"):
                    out.append(Parsed(shape, color, background))
    return out


def random_scene(rng=None, split: str = "train") -> Scene:
    """A random scene from `split`, uniform over its combinations, sizes and positions."""
    r = _as_random(rng)
    shape, color, background = r.choice(combos(split))
    size = r.uniform(*SIZE_RANGE)
    lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
    center = (round(r.uniform(lo, hi), 4), round(r.uniform(lo, hi), 4))
    return Scene(shape, color, background, round(size, 4), center)


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Vertices of `shape` filling a `side`-wide box centered at (cx, cy), in pixels; None for the circle.

    Shapes point up and are never rotated: a fixed pose keeps the classifier's fill ratios stable.
    """
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, base down, centered on its bounding box
        height = side * np.sqrt(3) / 2
        return [(cx, cy - height / 2), (cx + h, cy + height / 2), (cx - h, cy + height / 2)]
    if shape == "star":
        r = side / (2 * np.cos(np.radians(18)))  # outer radius whose star is `side` wide
        top, bottom = -r, r * np.cos(np.radians(36))
        oy = cy - (top + bottom) / 2  # center the star's bounding box, not its circumcircle
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * STAR_INNER
            a = np.radians(-90 + 36 * i)
            pts.append((cx + rad * np.cos(a), oy + rad * np.sin(a)))
        return pts
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, box: tuple[float, float, float, float], fill,
               outline=None, width: int = 0) -> None:
    """Draw the scene's shape into `box` (left, top, right, bottom) of the canvas behind `draw`.

    Scene coordinates are fractions of the box, so a framed style can place the same scene inside its frame.
    """
    left, top, right, bottom = box
    w = right - left
    cx, cy, side = left + scene.center[0] * w, top + scene.center[1] * (bottom - top), scene.size * w
    poly = shape_polygon(scene.shape, cx, cy, side)
    if poly is None:
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=fill, outline=outline,
                     width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a `size` x `size` RGB image, drawn at 4x and box-downsampled for antialiasing."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw_shape(ImageDraw.Draw(img), scene, (0, 0, big, big), PALETTE[scene.color])
    return img.resize((size, size), Image.Resampling.BOX)


def caption(scene: Scene | Parsed, rng=None, paraphrase: bool = True) -> str:
    """Describe the scene: the canonical form, or (paraphrase=True) a template drawn with `rng`."""
    template = _as_random(rng).choice(TEMPLATES) if paraphrase else TEMPLATES[0]
    return template.format(color=scene.color, shape=scene.shape, background=scene.background,
                           a=_article(scene.color), ab=_article(scene.background))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse_caption(text: str) -> Parsed | None:
    """Read (shape, color, background) back from any caption in TEMPLATES' style, ignoring other words.

    The object's color is the color word right before the shape; the background's is the one right before
    "background". Extra words (a trigger token, "picture of") are fine; None when the caption is not
    understood.
    """
    words = re.findall(r"[a-z]+", text.lower())
    shape = color = background = None
    for i, word in enumerate(words):
        prev = words[i - 1] if i > 0 else None
        if word in SHAPES and shape is None:
            shape = word
            color = prev if prev in PALETTE else None
        elif word == "background" and background is None:
            background = prev if prev in PALETTE else None
    if shape is None or color is None or background is None:
        return None
    return Parsed(shape, color, background)


def held_out_captions(n: int = 48, seed: int = 0) -> list[str]:
    """`n` canonical captions of held-out combinations (never produced by random_scene's "train" split).

    A fixed list for a given seed: benchmarks and tests compare numbers over the same prompts.
    """
    pool = combos("eval")
    if not 0 < n <= len(pool):
        raise ValueError(f"n must be in 1..{len(pool)} (the number of held-out combinations), not {n}")
    random.Random(seed).shuffle(pool)
    return [caption(p, paraphrase=False) for p in pool[:n]]
