"""Caches of what the frozen models compute from the training data: the VAE's latent distribution of every
(image, flip), in RAM or on disk, and the frozen text encoder's embedding of every caption. The uncached paths
(LiveLatents, encode_text) compute exactly the same tensors, so caching on or off gives the same first-step loss.

A key is (record index, flipped), as in buckets.py's BucketSampler.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sd_lora.atomic import atomic_write_bytes
from sd_lora.training.buckets import Key, pixels
from sd_lora.training.config import one_line, say
from sd_lora.training.data import ImageRecord

CACHE_VERSION = 1  # bump when the pixels fed to the VAE change for the same file

# ---------------------------------------------------------------------------------------------------------------
# Latents


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
    image or model never reuses a stale entry. Files are written atomically; a killed run leaves no half file.

    A file that cannot be read (truncated, garbage, wrong shape, gone) is only a cache miss: its image is encoded
    again, the file rewritten, and one warning line printed. Existing files are read once here, so with several
    processes (main first, as the loop does) the main one repairs them before the others read them; one that turns
    bad later is repaired when training reads it."""

    def __init__(self, records: Sequence[ImageRecord], vae, flip: bool = True,
                 cache_dir: str | os.PathLike | None = None, progress: Callable[[int, int], None] | None = None):
        self.records, self.vae = list(records), vae
        self.flips = (False, True) if flip else (False,)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._ram: dict[Key, torch.Tensor] = {}
        self._files: dict[Key, Path] = {}
        fingerprint = vae_fingerprint(vae) if self.cache_dir is not None else ""
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        total = len(self.records) * len(self.flips)
        for n, key in enumerate((i, f) for i in range(len(self.records)) for f in self.flips):
            self._fill(key, fingerprint)
            if progress:
                progress(n + 1, total)

    def _fill(self, key: Key, fingerprint: str) -> None:
        if self.cache_dir is None:
            self._ram[key] = self._encode(key)
            return
        path = self.cache_dir / f"{_cache_key(self.records[key[0]], key[1], fingerprint)}.safetensors"
        self._files[key] = path
        if path.is_file():
            self._get(key)  # checks it, and encodes it again if it cannot be read
        else:
            self._write(key)

    def _encode(self, key: Key) -> torch.Tensor:
        index, flip = key
        return encode_pixels(self.vae, pixels(self.records[index], flip)[None])

    def _write(self, key: Key) -> torch.Tensor:
        """Encode one image and flip and write its file, atomically, through bytes (see _read)."""
        from safetensors.torch import save

        params = self._encode(key)
        atomic_write_bytes(self._files[key], save({"params": params.contiguous()}))
        return params

    def params(self, keys: Sequence[Key]) -> torch.Tensor:
        for i, flip in keys:
            if flip and True not in self.flips:
                raise KeyError(f"image {i}: flipped latents were not cached (flip=False)")
        return torch.cat([self._get(key) for key in keys])

    def _get(self, key: Key) -> torch.Tensor:
        if self.cache_dir is None:
            return self._ram[key]
        path, shape = self._files[key], self._shape(key)
        try:
            return _read(path, shape)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError: a cache miss, not a failed run
            say(f"warning: {path}: unreadable latent cache file ({one_line(e)}); encoded again")
            return self._write(key)

    def _shape(self, key: Key) -> tuple[int, ...]:
        """What encode_pixels gives for the key's image: [1, 2 * latent channels, height / f, width / f]."""
        width, height = self.records[key[0]].bucket
        config = self.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        return 1, 2 * config.latent_channels, height // factor, width // factor


def _read(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """The parameters a cache file holds; ValueError unless they are float32 of `shape`. Read as bytes, as _write
    writes: safetensors' own file functions need UTF-8 paths."""
    from safetensors.torch import load

    params = load(path.read_bytes()).get("params")
    if params is None or params.dtype != torch.float32 or tuple(params.shape) != shape:
        found = "no params" if params is None else f"{params.dtype} {tuple(params.shape)}"
        raise ValueError(f"holds {found}, not torch.float32 {shape}")
    return params


def vae_fingerprint(vae) -> str:
    """A cheap identity for a VAE's weights: its class and config plus each tensor's name, shape, dtype, sum and
    first values. Catches a different model, a retrained one or another dtype without hashing hundreds of megabytes.

    The config's "_" keys are left out: they are bookkeeping, not what the weights compute, and they differ where
    the weights do not. `_use_default_values` is listed in an order that follows Python's per-process string hash
    seed (PYTHONHASHSEED), which gave every run and process its own fingerprint, so the cache was never reused
    (sorting lists instead would merge configs whose order matters, like block_out_channels); `_name_or_path`
    changes with where the same weights were loaded from, `_diffusers_version` with every upgrade. The class,
    which `_class_name` names, is taken from the object instead."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps([type(vae).__name__, config], sort_keys=True, default=str).encode())
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
