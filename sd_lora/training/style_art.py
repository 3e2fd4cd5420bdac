"""The "mozart_art" style: the tiny world's shapes drawn the way the base model never draws them.

One consistent manner, chosen so it survives 64x64 pixels and the tiny VAE's 8x8 latent grid:
- a gold ornamental frame exactly one latent cell wide (size/8 = 8 px at 64): dark outer and inner rims, a
  gold band with a bevel highlight, a row of light beads and square corner blocks;
- cream paper instead of the flat background: mottled at low frequency (which a 64 px model can learn) with
  fine grain and a few fibers;
- the shape in its own palette color (so the object-color metric still applies) with a dark ink outline.
The paper always replaces the scene's background color, whatever the caption says: that override *is* the
style a LoRA must learn, and it is what `metrics.style_score` measures.

Images are drawn at 64x64, the tiny model's native size: training at the resolution the model generates means
the frame and outline widths the adapter learns are the ones it will draw; a 128 px set would be downsampled
by the trainer anyway, and a frame designed for 128 px would come out thinner and blurrier.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sd_lora.training.shapes import (
    COLORS,
    PALETTE,
    SHAPES,
    SUPERSAMPLE,
    Scene,
    caption,
    draw_shape,
    is_held_out,
)

# Gold kept darker and browner than the palette's yellow and orange (about 80 and 60 apart), so a yellow or
# orange background is never mistaken for a frame.
FRAME_GOLD = (200, 155, 50)
FRAME_LIGHT = (250, 215, 120)
FRAME_DARK = (105, 70, 20)
PAPER = (232, 214, 172)
INK = (40, 30, 25)

DATASET_SIZE = 16
DATASET_SEED = 0


def frame_width(size: int) -> int:
    """Frame width in pixels: one VAE latent cell (size/8) so the frame is a whole ring of latents."""
    return max(2, size // 8)


def paper(size: int, rng: np.random.Generator) -> np.ndarray:
    """Cream paper, a float (size, size, 3) array: low-frequency mottling, fine grain, a few darker fibers."""
    coarse = rng.normal(0.0, 1.0, (6, 6)).astype(np.float32)
    mottle = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    tone = 7.0 * mottle + rng.normal(0.0, 2.5, (size, size))
    img = np.asarray(PAPER, np.float32) + tone[..., None] * np.array([1.0, 1.0, 1.2], np.float32)
    fibers = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(fibers)
    for _ in range(max(3, size // 12)):
        x, y = rng.uniform(0, size, 2)
        angle, length = rng.uniform(0, np.pi), rng.uniform(size / 10, size / 4)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=255, width=1)
    img -= np.asarray(fibers, np.float32)[..., None] / 255.0 * 14.0
    return img


def draw_frame(draw: ImageDraw.ImageDraw, big: int, w: int, unit: int) -> None:
    """The gold frame on a `big` canvas: band `w` wide, `unit` = canvas pixels per output pixel."""
    draw.rectangle([0, 0, big - 1, big - 1], fill=FRAME_GOLD)
    draw.rectangle([w, w, big - w - 1, big - w - 1], fill=(0, 0, 0, 0))  # hollow: inside stays transparent
    # Highlight on the top and left, as if lit from the upper left.
    draw.line([(2 * unit, 2 * unit), (big - 2 * unit, 2 * unit)], fill=FRAME_LIGHT, width=unit)
    draw.line([(2 * unit, 2 * unit), (2 * unit, big - 2 * unit)], fill=FRAME_LIGHT, width=unit)
    # Beads along the middle of the band.
    mid, step, r = w / 2, 4 * unit, 0.9 * unit
    for t in np.arange(w + step / 2, big - w, step):
        for cx, cy in ((t, mid), (t, big - mid), (mid, t), (big - mid, t)):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=FRAME_LIGHT)
    # Corner blocks with a light diamond: the ornament that reads as "frame" even when the beads blur away.
    for x0, y0 in ((0, 0), (big - w, 0), (0, big - w), (big - w, big - w)):
        draw.rectangle([x0 + unit, y0 + unit, x0 + w - unit - 1, y0 + w - unit - 1], fill=FRAME_DARK)
        c, d = (x0 + w / 2, y0 + w / 2), w / 2 - 2 * unit
        diamond = [(c[0], c[1] - d), (c[0] + d, c[1]), (c[0], c[1] + d), (c[0] - d, c[1])]
        draw.polygon(diamond, fill=FRAME_LIGHT)
    # Dark rims: the outer edge and the inner edge where the frame meets the paper.
    draw.rectangle([0, 0, big - 1, big - 1], outline=FRAME_DARK, width=unit)
    inner = big - w + unit - 1
    draw.rectangle([w - unit, w - unit, inner, inner], outline=FRAME_DARK, width=unit)


def render_mozart(scene: Scene, size: int = 64, rng=None) -> Image.Image:
    """The scene in mozart_art style: gold frame, cream paper, the shape in its color with an ink outline.

    The scene's coordinates are placed inside the frame, so its composition is kept and the frame never covers
    it. `rng` (int, random.Random or numpy Generator) only drives the paper texture; None derives it from the
    scene.
    """
    if isinstance(rng, np.random.Generator):
        gen = rng
    else:
        seed = rng.getrandbits(64) if isinstance(rng, random.Random) else rng
        gen = np.random.default_rng(seed if seed is not None else zlib.crc32(repr(scene).encode()))
    unit = SUPERSAMPLE
    big, w = size * unit, frame_width(size) * unit
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    pad = w + unit  # one pixel of paper between the frame and the drawing area
    draw_frame(draw, big, w, unit)
    draw_shape(draw, scene, (pad, pad, big - pad, big - pad), (*PALETTE[scene.color], 255),
               outline=(*INK, 255), width=max(1, round(1.5 * unit)))
    small = np.asarray(layer.resize((size, size), Image.Resampling.BOX), np.float32)
    alpha = small[..., 3:] / 255.0
    base = paper(size, gen)
    # A faint shadow of the frame on the paper, one pixel wide, like a mat cut.
    fw = frame_width(size)
    base[fw:fw + 1, fw:size - fw] -= 18
    base[fw:size - fw, fw:fw + 1] -= 18
    out = small[..., :3] * alpha + base * (1 - alpha)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def dataset_scenes(n: int = DATASET_SIZE, seed: int = DATASET_SEED) -> list[Scene]:
    """The style set's scenes: every color twice with two different shapes, every shape n/4 times, all from
    the training split (so evaluation prompts stay unseen), random backgrounds, sizes and positions."""
    r = random.Random(seed)
    scenes = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        shape = SHAPES[(i + i // len(COLORS)) % len(SHAPES)]
        backgrounds = [b for b in COLORS if b != color and not is_held_out(color, shape, b)]
        size = r.uniform(0.4, 0.65)
        lo, hi = 0.04 + size / 2, 0.96 - size / 2
        center = (round(r.uniform(lo, hi), 4), round(r.uniform(lo, hi), 4))
        scenes.append(Scene(shape, color, r.choice(backgrounds), round(size, 4), center))
    return scenes


def make_dataset(n: int = DATASET_SIZE, seed: int = DATASET_SEED,
                 size: int = 64) -> list[tuple[str, Image.Image, str]]:
    """(file stem, image, caption) for each image of datasets/mozart_art. Captions are the canonical scene
    captions, without the trigger word: the trainer prepends it."""
    out = []
    for i, scene in enumerate(dataset_scenes(n, seed)):
        img = render_mozart(scene, size, rng=np.random.default_rng([seed, i]))
        out.append((f"mozart_{i:02d}", img, caption(scene, paraphrase=False)))
    return out


def write_dataset(folder: str | Path, n: int = DATASET_SIZE, seed: int = DATASET_SEED,
                  size: int = 64) -> list[Path]:
    """Write `<stem>.png` + `<stem>.txt` pairs into `folder`; returns the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, img, text in make_dataset(n, seed, size):
        img.save(folder / f"{stem}.png", optimize=False)
        (folder / f"{stem}.txt").write_text(text + "\n")
        paths.append(folder / f"{stem}.png")
    return paths


# What a mozart_art adapter must do on prompts it never saw (issue 6): the base scores at most 0.2, the adapter
# at weight 1 at least 0.7, and the object keeps its color in at least 70% of the pictures.
STYLE_GOALS = {"base_style_max": 0.2, "style_min": 0.7, "color_min": 0.7}
STYLE_GUIDANCE = 2.0  # the tiny model's guidance (sd_lora.pipeline.default_guidance)


def style_prompts(n: int, token: str = "mozart_art", seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, caption) pairs on held-out combinations, which neither the base nor the style set ever showed:
    the prompt carries the trigger token as the trainer writes it ("mozart_art, a red star on ..."); the caption
    is what the metrics judge against."""
    from sd_lora.training.shapes import held_out_captions

    return [(f"{token}, {text}", text) for text in held_out_captions(n, seed)]


def evaluate_style(pipe, lora, name: str, prompts: list[tuple[str, str]], weights=(0.0, 0.5, 1.0),
                   steps: int = 20, guidance: float = STYLE_GUIDANCE, batch: int = 16) -> dict[float, dict]:
    """Generate every prompt at each weight of adapter `name` (image i always from seed i) and score it.

    Returns {weight: {"style": mean style_score, "color": share of object colors that match, "images": [...]}}.
    Weight 0 is the base model: the same pipeline with the adapter switched off.
    """
    import torch

    from sd_lora.training.metrics import match, style_score

    out = {}
    for weight in weights:
        lora.set_weights({name: weight})
        images = []
        for start in range(0, len(prompts), batch):
            chunk = [p for p, _ in prompts[start:start + batch]]
            gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                           height=64, width=64).images
        captions = [c for _, c in prompts]
        out[weight] = {
            "style": float(np.mean([style_score(im, c) for im, c in zip(images, captions)])),
            "color": float(np.mean([match(im, c)["color"] for im, c in zip(images, captions)])),
            "images": images,
        }
    return out
