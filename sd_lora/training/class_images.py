"""Prior preservation's class images: a folder topped up to --num-class-images with images the base model draws
for --class-prompt. Image N always comes from seed + N, so an interrupted generation resumes where it stopped."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import torch

from sd_lora.atomic import atomic_write_bytes
from sd_lora.training.data import count_usable_images


def class_image_seed(seed: int, index: int) -> int:
    return seed + index


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def generate_class_images(folder: str | os.PathLike, prompt: str, num_images: int, pipe, resolution: int,
                          seed: int = 0, num_inference_steps: int = 30, guidance_scale: float = 7.5,
                          progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Top the folder up to `num_images` usable images by generating `class-NNNNN.png` with `pipe`.

    Image N always comes from seed `seed + N` and files are written one by one atomically, so an interrupted run
    that is started again skips what exists and ends with the same files as an uninterrupted one. Returns the
    files written by this call.
    """
    root = Path(folder).expanduser()
    have = count_usable_images(root)
    missing = max(0, num_images - have)
    written: list[Path] = []
    if not missing:
        return written
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    while len(written) < missing:
        path = root / class_image_name(index)
        if not path.exists():
            generator = torch.Generator("cpu").manual_seed(class_image_seed(seed, index))
            image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, generator=generator, output_type="pil").images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())
            written.append(path)
            if progress:
                progress(len(written), missing)
        index += 1
    return written
