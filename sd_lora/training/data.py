"""Training data: find images and captions, normalise them, put them in aspect-ratio buckets, cache their latents
and text embeddings, make prior-preservation class images, and hand out reproducible batches.

The order of use, as the loop does it:

    records = scan_images(folder, caption=prompt, token=token)    # before any model loads: bad files, empty folder
    records = assign_buckets(records, resolution)
    latents = LatentCache(records, vae, flip=True) or LiveLatents(records, vae)
    texts = TextCache(captions, tokenizer, text_encoder)           # when the text encoder is frozen
    for keys in BucketSampler([r.bucket for r in records], batch_size, seed).iterate(start):
        params = latents.params(keys)                              # [B, 2C, h, w]: mean and log-variance
        z = sample_latents(params, vae.config, generator)

A key is (record index, flipped). Cached and live paths encode each (image, flip) on its own, so with the same RNG
they give the same latents bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sd_lora.training.config import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")  # in order of preference
CACHE_VERSION = 1  # bump when the pixels fed to the VAE change for the same file


class DatasetError(UsageError):
    """The images folder is missing, empty, or holds no usable image. The CLI exits with code 2."""


Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image. `size` is (width, height) after EXIF orientation; `bucket` is (width, height)
    of the training crop, None until assign_buckets runs."""

    path: Path
    caption: str
    size: tuple[int, int]
    bucket: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Discovery and captions


def scan_images(folder: str | os.PathLike, caption: str, token: str | None = None,
                warn: Warn | None = _stderr) -> list[ImageRecord]:
    """Every usable image under `folder`, sorted by relative path, with its caption.

    Bad files (zero-byte, unreadable, corrupt, not an image, unsupported type) are skipped with one warning line
    each and a summary line. Hidden files and folders (".name") are ignored silently: they hold editor and OS
    clutter, and our own temporary files. Raises DatasetError when nothing usable is left.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    warn = warn or (lambda message: None)
    files = _walk(root)
    image_stems = {f.with_suffix("") for f in files if f.suffix.lower() in IMAGE_EXTENSIONS}
    records, problems = [], Counter()
    for path in files:
        suffix = path.suffix.lower()
        if suffix in CAPTION_EXTENSIONS and path.with_suffix("") in image_stems:
            continue  # a sidecar
        rel = path.relative_to(root).as_posix()
        if suffix not in IMAGE_EXTENSIONS:
            problem = "not an image" if suffix in CAPTION_EXTENSIONS else "unsupported file type"
            detail = (f"a caption file with no image named {path.stem}.*" if suffix in CAPTION_EXTENSIONS
                      else f"use {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}")
        else:
            problem, detail, size = _probe(path)
            if problem is None:
                records.append(ImageRecord(path, read_caption(path, caption, token), size))
                continue
        problems[problem] += 1
        warn(f"warning: skipped {rel}: {problem} ({detail})")
    skipped = sum(problems.values())
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(problems.items()))
        warn(f"warning: skipped {skipped} of {len(records) + skipped} files ({kinds}); using {len(records)} images")
    if not records:
        listed = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(f"{root}: the folder is empty; put the training images ({listed}) in it")
        raise DatasetError(f"{root}: no usable image among {skipped} files (looked for {listed}, in any case)")
    return records


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _probe(path: Path) -> tuple[str | None, str, tuple[int, int]]:
    """(problem, detail, size): problem is None for a usable image. Decodes the whole file to catch truncation."""
    try:
        if path.stat().st_size == 0:
            return "empty file", "0 bytes", (0, 0)
        image = load_image(path)
    except UnidentifiedImageError:
        return "not an image", "its contents are not a known image format", (0, 0)
    except (PermissionError, IsADirectoryError) as e:
        return "unreadable", e.strerror or type(e).__name__, (0, 0)
    except Image.DecompressionBombError as e:
        return "image too large", _one_line(e), (0, 0)
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        return "corrupt image", _one_line(e), (0, 0)
    return None, "", image.size


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_caption(image_path: str | os.PathLike, default: str, token: str | None = None) -> str:
    """The caption for an image: its `name.txt` or `name.caption` sidecar, else `default`; the trigger token is
    prepended when the caption lacks it. Whitespace (newlines included) collapses to single spaces."""
    path = Path(image_path)
    caption = ""
    for ext in CAPTION_EXTENSIONS:
        sidecar = path.with_suffix(ext)
        if sidecar.is_file():
            caption = " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
            if caption:
                break
    return with_token(caption or " ".join(default.split()), token)


def with_token(caption: str, token: str | None) -> str:
    """Prepend the token unless the caption already holds it as a whole word (case-insensitive, as CLIP's
    tokenizer lower-cases anyway)."""
    if not token:
        return caption
    if re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", caption, flags=re.IGNORECASE):
        return caption
    return f"{token}, {caption}" if caption else token


def tag_frequency(records: Sequence[ImageRecord], root: str | os.PathLike) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {folder name: {comma-separated tag: count}}."""
    counts: dict[str, Counter] = {}
    root = Path(root)
    for record in records:
        try:
            group = record.path.parent.relative_to(root).as_posix()
        except ValueError:
            group = record.path.parent.name
        group = root.name if group == "." else group
        tags = (t.strip() for t in record.caption.split(","))
        counts.setdefault(group, Counter()).update(t for t in tags if t)
    return {group: dict(c) for group, c in counts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Image normalisation


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB, upright: EXIF orientation applied, transparency flattened onto white,
    palette, grayscale, CMYK and 16-bit images converted."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _gray_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int/float) grayscale to 8 bits by scaling, where Pillow's convert would clip at 255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:
        top = 65535.0
    return Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets


def bucket_step(resolution: int) -> int:
    """Bucket sides are multiples of 64, as for SD1.5-size training; below 256 px (small models such as the tiny
    one, 64 px) a 64-px step would leave a single bucket, so use the latent grid's 8."""
    return 64 if resolution >= 256 else 8


def make_buckets(resolution: int) -> list[tuple[int, int]]:
    """(width, height) buckets with area <= resolution², sides multiples of bucket_step, and each side between
    half and twice the resolution (so at most 4:1 for SD1.5 at 512). Sorted by aspect ratio, square included when
    the resolution is a multiple of the step."""
    step = bucket_step(resolution)
    low = max(step, (resolution // 2) // step * step)
    high = resolution * 2 // step * step
    buckets = set()
    for width in range(low, high + 1, step):
        height = min(high, resolution * resolution // width // step * step)
        if height >= low:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are equally far from
    square); ties go to the larger bucket."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def assign_buckets(records: Sequence[ImageRecord], resolution: int) -> list[ImageRecord]:
    buckets = make_buckets(resolution)
    return [replace(r, bucket=nearest_bucket(r.size, buckets)) for r in records]


def bucket_counts(records: Sequence[ImageRecord]) -> dict[tuple[int, int], int]:
    """{bucket: number of images}, for the start-of-run summary."""
    return dict(sorted(Counter(r.bucket for r in records).items()))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize so the image covers the bucket, then center-crop to it."""
    return ImageOps.fit(image, bucket, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def pixels(record: ImageRecord, flip: bool = False) -> torch.Tensor:
    """The record's training crop as a float32 tensor [3, H, W] in [-1, 1], mirrored left-right when `flip`."""
    if record.bucket is None:
        raise ValueError(f"{record.path}: no bucket; call assign_buckets first")
    image = fit_to_bucket(load_image(record.path), record.bucket)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return tensor.flip(-1) if flip else tensor


# ---------------------------------------------------------------------------------------------------------------
# Latents


Key = tuple[int, bool]  # (record index, flipped)


@torch.no_grad()
def encode_pixels(vae, pixel_batch: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution parameters (mean and log-variance concatenated on channels) for a batch of
    [-1, 1] pixels, as float32 on the CPU. Keeping the distribution, not a sample, lets every step draw a fresh
    sample the way the uncached reference does."""
    param = next(vae.parameters())
    dist = vae.encode(pixel_batch.to(param.device, param.dtype)).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1).float().cpu()


def sample_latents(params: torch.Tensor, vae_config, generator: torch.Generator | None = None,
                   sample: bool = True) -> torch.Tensor:
    """Scaled latents the UNet trains on, from encode_pixels' parameters: a draw from N(mean, exp(logvar)) (or the
    mean when sample=False), shifted and scaled by the VAE config's shift_factor and scaling_factor."""
    mean, logvar = params.chunk(2, dim=1)
    latents = mean
    if sample:
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu",
                            dtype=mean.dtype).to(mean.device)
        latents = mean + std * noise
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


class LiveLatents:
    """The uncached path: encode the batch's images on every call (each image on its own, like the cache)."""

    def __init__(self, records: Sequence[ImageRecord], vae):
        self.records, self.vae = list(records), vae

    def params(self, keys: Sequence[Key]) -> torch.Tensor:
        return torch.cat([encode_pixels(self.vae, pixels(self.records[i], flip)[None]) for i, flip in keys])


class LatentCache:
    """Latent parameters for every (image, flip), encoded once up front: in RAM, or under `cache_dir` as one
    safetensors file per image and flip, named by a hash of the file's bytes, the bucket and the VAE, so a changed
    image or model never reuses a stale entry. Files are written atomically; a killed run leaves no half file."""

    def __init__(self, records: Sequence[ImageRecord], vae, flip: bool = True,
                 cache_dir: str | os.PathLike | None = None, progress: Callable[[int, int], None] | None = None):
        self.records = list(records)
        self.flips = (False, True) if flip else (False,)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._ram: dict[Key, torch.Tensor] = {}
        self._files: dict[Key, Path] = {}
        fingerprint = vae_fingerprint(vae) if self.cache_dir is not None else ""
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        total = len(self.records) * len(self.flips)
        for n, key in enumerate((i, f) for i in range(len(self.records)) for f in self.flips):
            self._fill(key, vae, fingerprint)
            if progress:
                progress(n + 1, total)

    def _fill(self, key: Key, vae, fingerprint: str) -> None:
        index, flip = key
        record = self.records[index]
        if self.cache_dir is None:
            self._ram[key] = encode_pixels(vae, pixels(record, flip)[None])
            return
        from safetensors.torch import save_file

        path = self.cache_dir / f"{_cache_key(record, flip, fingerprint)}.safetensors"
        if not path.is_file():
            params = encode_pixels(vae, pixels(record, flip)[None])
            _atomic_write(path, lambda tmp: save_file({"params": params.contiguous()}, str(tmp)))
        self._files[key] = path

    def params(self, keys: Sequence[Key]) -> torch.Tensor:
        for i, flip in keys:
            if flip and True not in self.flips:
                raise KeyError(f"image {i}: flipped latents were not cached (flip=False)")
        return torch.cat([self._get(key) for key in keys])

    def _get(self, key: Key) -> torch.Tensor:
        if self.cache_dir is None:
            return self._ram[key]
        from safetensors.torch import load_file

        return load_file(str(self._files[key]))["params"]


def vae_fingerprint(vae) -> str:
    """A cheap identity for a VAE's weights: its config plus each tensor's name, shape, dtype, sum and first values.
    Catches a different model, a retrained one or another dtype without hashing hundreds of megabytes."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in vae.state_dict().items():
            flat = tensor.detach().reshape(-1)
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}{flat.double().sum().item():.17g}".encode())
            h.update(flat[:8].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_key(record: ImageRecord, flip: bool, fingerprint: str) -> str:
    h = hashlib.sha256(record.path.read_bytes())
    h.update(f"|{record.bucket}|{flip}|{fingerprint}|v{CACHE_VERSION}".encode())
    return h.hexdigest()[:32]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a hidden temporary file in the same folder, then rename: readers see the old file or the
    whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Text embeddings


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [B, model_max_length], padded and truncated as Stable Diffusion pipelines do."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state, the conditioning SD1.x/2.x pipelines use (with its attention mask
    only for encoders configured to want one, as diffusers does)."""
    device = next(text_encoder.parameters()).device
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (input_ids != text_encoder.config.pad_token_id).long().to(device)
    return text_encoder(input_ids.to(device), attention_mask=mask)[0]


def truncated_captions(tokenizer, captions: Sequence[str]) -> list[str]:
    """Captions longer than the tokenizer's window (their end is cut off in training)."""
    limit = tokenizer.model_max_length
    return [c for c in dict.fromkeys(captions) if len(tokenizer(c, truncation=False).input_ids) > limit]


class TextCache:
    """Embeddings of each distinct caption, computed once with a frozen text encoder (each on its own, so they equal
    a live batch-of-one encode bit for bit on CPU). Kept on the CPU."""

    def __init__(self, captions: Sequence[str], tokenizer, text_encoder):
        self._embeddings = {}
        with torch.no_grad():
            for caption in dict.fromkeys(captions):
                self._embeddings[caption] = encode_text(text_encoder, tokenize(tokenizer, [caption]))[0].cpu()

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._embeddings[c] for c in captions])

    def __len__(self) -> int:
        return len(self._embeddings)


# ---------------------------------------------------------------------------------------------------------------
# Prior preservation


def class_image_seed(seed: int, index: int) -> int:
    return seed + index


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def count_usable_images(folder: str | os.PathLike) -> int:
    """How many usable images a folder holds (0 when it does not exist). Silent; scan_images reports problems."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return 0
    return sum(1 for f in _walk(root) if f.suffix.lower() in IMAGE_EXTENSIONS and _probe(f)[0] is None)


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
            _atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
            written.append(path)
            if progress:
                progress(len(written), missing)
        index += 1
    return written


# ---------------------------------------------------------------------------------------------------------------
# Batches


class BucketSampler:
    """Batches of keys (index, flipped), every batch from one bucket. Epoch e's order is a pure function of
    (seed, e), independent of torch's global RNG, so a resumed run can jump to any batch with iterate(start).

    With several processes, process `rank` of `world_size` takes global batches rank, rank + world_size, ...
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int = 0, flip: bool = True,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(bucket, []).append(index)
        self.batch_size, self.seed, self.flip, self.shuffle = batch_size, seed, flip, shuffle
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Global batches per epoch (all processes together)."""
        return sum(math.ceil(len(g) / self.batch_size) for g in self.groups.values())

    def epoch(self, number: int) -> list[list[Key]]:
        rng = random.Random(f"sd-lora:{self.seed}:{number}")
        batches = []
        for bucket in sorted(self.groups):
            indices = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batches.append([(i, self.flip and rng.random() < 0.5) for i in chunk])
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def iterate(self, start: int = 0) -> Iterator[list[Key]]:
        """This process's batches forever, after skipping the first `start` of them (a resumed run passes the
        number of batches it has already trained on)."""
        per_epoch, cached = len(self), (None, None)
        position = start * self.world_size + self.rank
        while True:
            epoch, offset = divmod(position, per_epoch)
            if cached[0] != epoch:
                cached = (epoch, self.epoch(epoch))
            yield cached[1][offset]
            position += self.world_size
