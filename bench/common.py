"""Shared pieces of the benchmarks: SD1.5-architecture models built from their public configs (random weights, fixed
seed, nothing from the hub), random kohya-style adapters shaped from a model's own modules, and timing helpers.

Timings on a shared machine are noisy: every benchmark runs ours and the peer interleaved in the same process,
repeats, and reports medians of per-repetition ratios.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from sd_lora.targets import preset_paths
from sd_lora.weights import AdapterWeights, LoRAModule

# The public SD1.5 (runwayml/stable-diffusion-v1-5) UNet and CLIP-L text-encoder configs.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "act_fn": "silu",
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
}
CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def sd15_unet(seed: int = 0):
    """SD1.5-architecture UNet (~860M parameters, 3.4 GB in fp32), random weights, eval, frozen."""
    from diffusers import UNet2DConditionModel

    unet = _seeded(seed, lambda: UNet2DConditionModel(**SD15_UNET))
    return unet.eval().requires_grad_(False)


def clip_l(seed: int = 0):
    """CLIP-L text encoder (the SD1.5 one, ~123M parameters), random weights, eval, frozen."""
    from transformers import CLIPTextConfig, CLIPTextModel

    te = _seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    return te.eval().requires_grad_(False)


def sd15_pipeline(unet, text_encoder=None):
    """A real StableDiffusionPipeline around the given UNet (and text encoder), so diffusers' LoRA loaders work.

    The VAE, tokenizer and scheduler come from the built-in tiny model: the LoRA benchmarks never decode or tokenize.
    Without a text encoder, the tiny one stands in (it has another width; UNet-only adapters never touch it)."""
    from diffusers import StableDiffusionPipeline

    import sd_lora

    tiny = sd_lora.load_pipeline("tiny")
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=text_encoder or tiny.text_encoder,
                                   tokenizer=tiny.tokenizer, unet=unet, scheduler=tiny.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_adapter(models: dict, preset: str = "attn", rank: int = 16, alpha: float = 8.0, seed: int = 0,
                   up_scale: float = 0.05) -> AdapterWeights:
    """A trained-looking adapter (random down and up) on `preset`'s modules of each {part: model}."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for part, model in models.items():
        named = dict(model.named_modules())
        for path in preset_paths(model, part, preset):
            base = named[path] if path in named else named["text_model." + path]
            if isinstance(base, torch.nn.Conv2d):
                fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
                down = torch.randn(rank, base.in_channels, *base.kernel_size, generator=g)
                up = torch.randn(base.out_channels, rank, 1, 1, generator=g)
            else:
                fan_in = base.in_features
                down = torch.randn(rank, base.in_features, generator=g)
                up = torch.randn(base.out_features, rank, generator=g)
            modules[f"{part}.{path}"] = LoRAModule(down / fan_in ** 0.5, up * up_scale, alpha)
    return AdapterWeights(modules, family="sd1", format="kohya")


def clock(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs) -> float:
    return statistics.median(xs)


def model_bytes(*models) -> int:
    return sum(p.nbytes for m in models for p in m.parameters())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that relative to max |b|)."""
    d = (a.float() - b.float()).abs().max().item()
    return d, d / max(b.float().abs().max().item(), 1e-30)
