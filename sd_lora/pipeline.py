"""load_pipeline(model): the one way sd_lora gets a diffusers StableDiffusionPipeline.

`model` is "tiny" (the built-in offline model), a hub id, a diffusers pipeline folder, or a single-file checkpoint
(.safetensors; .ckpt only with allow_pickle). The result is always a plain diffusers pipeline: sd_lora never
subclasses it, so anything diffusers can do with it still works.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY_DIR = Path(__file__).parent / "models" / "tiny"
TINY_SEED = 0


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says which model and why."""


def tiny_dir() -> Path:
    """The tiny model's diffusers folder (configs, tokenizer and, once trained, weights)."""
    return TINY_DIR


def load_pipeline(model: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, allow_pickle: bool = False):
    """Load a Stable Diffusion pipeline from "tiny", a hub id, a diffusers folder or a single checkpoint file."""
    from diffusers import StableDiffusionPipeline

    name = str(model)
    if name == "tiny":
        pipe = _build_tiny()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            pipe = _from_folder(StableDiffusionPipeline, path)
        elif path.is_file():
            pipe = _from_single_file(StableDiffusionPipeline, path, allow_pickle)
        elif path.suffix in (".safetensors", ".ckpt", ".pt", ".bin") or name.startswith((".", "/", "~")):
            raise ModelLoadError(f"{name}: no such file or folder")
        else:
            pipe = _from_hub(StableDiffusionPipeline, name)
    pipe.set_progress_bar_config(disable=True)
    if dtype is not None or device is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def _build_tiny():
    """Build the tiny pipeline from the configs in sd_lora/models/tiny (weights from the folder when shipped)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = TINY_DIR
    # Fixed-seed init that neither depends on nor disturbs the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        _load_shipped_weights(module, folder / part)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler"))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _load_shipped_weights(module: torch.nn.Module, folder: Path) -> None:
    """Load weights shipped next to a config (diffusers or transformers file name), if any."""
    from safetensors.torch import load_file

    for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        f = folder / fname
        if f.is_file():
            state = load_file(f)
            dtype = next(module.parameters()).dtype
            module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
            return


def _from_folder(cls, path: Path):
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        return cls.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # diffusers raises many types; the user needs one message
        raise ModelLoadError(f"{path}: could not load the pipeline: {e}") from e


def _from_single_file(cls, path: Path, allow_pickle: bool):
    if path.suffix != ".safetensors" and not allow_pickle:
        raise ModelLoadError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors "
                             "or pass allow_pickle=True")
    kwargs = {}
    config = os.environ.get("SD_LORA_SINGLE_FILE_CONFIG")
    if config:
        kwargs["config"] = config
    try:
        return cls.from_single_file(str(path), safety_checker=None, requires_safety_checker=False, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"{path}: could not load the checkpoint: {e}. Offline, set "
                             "SD_LORA_SINGLE_FILE_CONFIG to a local diffusers folder of the same architecture") from e


def _from_hub(cls, name: str):
    try:
        return cls.from_pretrained(name, safety_checker=None, requires_safety_checker=False)
    except Exception as e:
        raise ModelLoadError(f"{name}: could not load the model from the Hugging Face hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}). Offline, use model 'tiny', a local "
                             "diffusers folder or a .safetensors checkpoint") from e
