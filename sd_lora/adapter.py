"""read_adapter / save_adapter: safetensors I/O for AdapterWeights, with validation, metadata and atomic writes."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from sd_lora.atomic import atomic_write_bytes
from sd_lora.checkpoint import read_header
from sd_lora.formats import detect
from sd_lora.weights import AdapterError, AdapterWeights, LoRAModule

__all__ = ["AdapterError", "AdapterWeights", "LoRAModule", "atomic_write_bytes", "read_adapter", "save_adapter"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ARCH = {"sd1": ("sd_v1", "stable-diffusion-v1/lora", 512), "sd2": ("sd_v2", "stable-diffusion-v2-768-v/lora", 768),
         "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", 1024)}
# SD2.x-base (epsilon, 512 px) and SD2.x-768-v (v-prediction) share every weight shape, so only a stated
# modelspec.prediction_type tells them apart; these are the values kohya's sai_model_spec.py and model_util.py write.
_SD2_BY_PREDICTION = {"epsilon": ("sd_v2", "stable-diffusion-v2-512/lora", 512),
                      "v": ("sd_v2_v", "stable-diffusion-v2-768-v/lora", 768)}


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> AdapterWeights:
    """Read and validate a LoRA file in any supported format. Raises AdapterError naming the file and the problem."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise AdapterError(f"{where}: is a folder, not a LoRA file; give the .safetensors file inside it")
    if not path.is_file():
        raise AdapterError(f"{where}: no such file")
    tensors, metadata = _load_tensors(path, allow_pickle)
    keys = list(tensors)
    fmt = detect.detect_format(keys, metadata, where)
    # Only a bare PEFT file relies on the adapter_config.json beside it: a diffusers file ("unet.", "text_encoder.")
    # keeps its alphas in its own header, or has none, and must not take an unrelated config in the same folder.
    peft_config = _peft_config_beside(path) if fmt == "diffusers" and detect.FORMATS[fmt].is_bare_peft(keys) else None
    weights = detect.FORMATS[fmt].read(tensors, metadata, source=where, **({"peft_config": peft_config}
                                                                         if peft_config else {}))
    weights.validate()
    weights.family = detect.detect_family(weights)
    return weights


def _load_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    where = str(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterError(f"{where}: pickle files ({path.suffix}) can run code when loaded and are refused; "
                               "convert it to .safetensors, or pass allow_pickle=True if you trust its source")
        return _load_pickle(path), {}
    try:
        header, _ = read_header(path)  # a clear message for what is not safetensors, or is cut short
    except ValueError as e:
        raise AdapterError(str(e)) from None
    metadata = header.get("__metadata__")
    metadata = metadata if isinstance(metadata, dict) else {}
    try:
        tensors = st_load_file(str(path))  # memory-mapped: no extra copy of the file's bytes
    except SafetensorError as e:
        raise AdapterError(f"{where}: not a valid safetensors file: {e}") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises anything on a foreign pickle; one message for all)
        raise AdapterError(f"{path}: could not read it as a weights-only pickle: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterError(f"{path}: the pickle does not hold a flat dict of tensors")
    return obj


def _peft_config_beside(path: Path) -> dict | None:
    cfg = path.parent / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg}: not a JSON object (a PEFT LoRA config is one)")
    return config


def save_adapter(weights: AdapterWeights, path: str | os.PathLike, format: str = "kohya",
                 dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None) -> Path:
    """Write `weights` atomically. kohya files get ss_* and modelspec.* metadata and a sshs_model_hash."""
    path = Path(path)
    weights.validate()
    if format == "kohya":
        tensors = detect.FORMATS["kohya"].write(weights, dtype)
        stated = {**weights.metadata, **(metadata or {})}
        header = standard_metadata(weights, path, stated.get("modelspec.prediction_type"))
    elif format == "diffusers":
        tensors, header = detect.FORMATS["diffusers"].write(weights, dtype)
    else:
        raise ValueError(f"unknown format {format!r}: use 'kohya' or 'diffusers'")
    for key, tensor in tensors.items():  # finite in fp32 (validate), but beyond fp16's range it becomes Inf
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum(dtype=torch.float64)):
            raise AdapterError(f"{path}: {key}: values beyond the range of {str(dtype).removeprefix('torch.')} "
                               "became Inf; save with dtype=torch.float32")
    header.update({k: str(v) for k, v in (metadata or {}).items()})
    data = st_save(tensors, header)
    if format == "kohya":  # the hash covers the tensor bytes only, so it can go into the header afterwards
        header["sshs_model_hash"] = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()
        data = st_save(tensors, header)
    atomic_write_bytes(path, data)
    return path


def standard_metadata(weights: AdapterWeights, path: Path, prediction_type: str | None = None) -> dict[str, str]:
    """What A1111/ComfyUI and model sites read: base family, network settings, a ModelSpec title and date.
    `prediction_type` (ModelSpec's "epsilon" or "v") picks SD2's architecture; without one, SD2 means 768-v."""
    family = weights.family if weights.family in _ARCH else "sd1"
    ss_version, arch, resolution = _ARCH[family]
    if family == "sd2" and prediction_type in _SD2_BY_PREDICTION:
        ss_version, arch, resolution = _SD2_BY_PREDICTION[prediction_type]
    ranks = sorted(weights.ranks)
    alphas = sorted({m.alpha_value for m in weights.modules.values()})
    # modelspec.date in UTC with its offset: a date without one is read as the reader's local time (JavaScript's Date
    # in model browsers, Python's fromisoformat)
    md = {
        "ss_base_model_version": ss_version, "ss_v2": str(family == "sd2"), "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1] if ranks else 0), "ss_network_alpha": str(alphas[-1] if alphas else 0),
        "ss_output_name": path.stem, "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers", "modelspec.title": path.stem,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    # Carry the adapter's own descriptive metadata (title, trigger phrase, training settings), never stale facts
    # about its shape, format, file name or date, which are recomputed above.
    keep = {k: v for k, v in weights.metadata.items() if k.startswith(("ss_", "modelspec.")) and k not in md
            or k == "modelspec.title"}
    keep.pop("sshs_model_hash", None)
    keep.pop("sshs_legacy_hash", None)
    md.update(keep)
    return md
