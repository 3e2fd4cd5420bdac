"""Prior preservation's class images: a folder topped up to --num-class-images with images the base model draws
for --class-prompt. Image N always comes from seed + N, so an interrupted generation resumes where it stopped."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from sd_lora.atomic import atomic_write_bytes
from sd_lora.training.config import say
from sd_lora.training.data import DatasetError, ImageRecord, scan_images

try:
    import fcntl
except ImportError:  # Windows: two runs generating into one folder are not kept apart there
    fcntl = None

# What sd_lora.atomic leaves of a class image when the process is killed mid-write: `.class-00007.png.<hex>.tmp`
STALE_TEMP = re.compile(r"\.class-\d{5,}\.png\.[0-9a-f]+\.tmp")


def class_image_seed(seed: int, index: int) -> int:
    return seed + index


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def usable_class_images(folder: str | os.PathLike, prompt: str = "", warn: Callable[[str], None] | None = None,
                        exclude: Sequence[str | os.PathLike] = ()) -> list[ImageRecord]:
    """The usable images in the class folder, as scan_images finds them (the same walk, skips and `exclude`
    folders), each captioned `prompt`, sidecar or not; [] when the folder does not exist or holds none."""
    try:
        found = scan_images(folder, caption=prompt, warn=warn, exclude=exclude)
    except DatasetError:
        return []
    return [ImageRecord(r.path, prompt, r.size) for r in found]


def generate_class_images(folder: str | os.PathLike, prompt: str, num_images: int, pipe, resolution: int,
                          seed: int = 0, num_inference_steps: int = 30, guidance_scale: float = 7.5,
                          progress: Callable[[int, int], None] | None = None,
                          exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Top the folder up to `num_images` usable images by generating `class-NNNNN.png` with `pipe`.

    Image N always comes from seed `seed + N` and files are written one by one atomically, so an interrupted run
    that is started again skips what exists and ends with the same files as an uninterrupted one. A file of that
    name that is not a usable image (zero bytes, corrupt) is generated again, and the temp files of a killed run are
    removed. Files in the `exclude` folders do not count (see scan_images). Returns the files written by this call.
    """
    root = Path(folder).expanduser()
    if len(usable_class_images(root, exclude=exclude)) >= num_images:  # a full folder is only read
        return []
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with _generating(root):
        usable = {r.path for r in usable_class_images(root, exclude=exclude)}  # counted again, under the lock
        missing, index = max(0, num_images - len(usable)), 0
        while len(written) < missing:
            path = root / class_image_name(index)
            if path not in usable and not path.is_dir():
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


@contextmanager
def _generating(root: Path) -> Iterator[None]:
    """Held while generating into `root`: an exclusive flock on the folder itself (nothing is left in it), so that
    two runs sharing a class folder take turns, and the temp files of a killed run can be removed safely."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"note: another run is generating class images in {root}; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without flock: go on unlocked
                pass
        for name in os.listdir(root):
            if STALE_TEMP.fullmatch(name):
                (root / name).unlink(missing_ok=True)
        yield
    finally:
        if fd is not None:
            os.close(fd)
