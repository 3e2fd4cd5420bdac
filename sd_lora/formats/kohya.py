"""kohya / A1111 / ComfyUI format: "lora_unet_<path with _>.lora_down.weight", ".lora_up.weight", ".alpha".

The format people share, and the one we write by default: text-encoder keys carry "text_model", every module gets a
float32 alpha, and ss_* / modelspec.* metadata tell A1111 which base model it is for.
"""

from __future__ import annotations

import torch

from sd_lora.targets import KOHYA_PREFIXES, kohya_stem, split_kohya_key
from sd_lora.weights import AdapterError, AdapterWeights, LoRAModule

_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# kohya's UNet keys in original-SD names start with one of these; the model config translates them at load time.
_LDM_HEADS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")


def matches(keys: list[str], metadata: dict[str, str]) -> bool:
    return any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys)


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str | None = None) -> AdapterWeights:
    where = source or "adapter"
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        split = split_kohya_key(key)
        if split is None or split[2] not in _SUFFIXES:
            raise AdapterError(f"{where}: unexpected key {key!r} in a kohya LoRA file")
        part, path, suffix = split
        module, role = parts.setdefault(f"{part}.{path}", {}), _SUFFIXES[suffix]
        if role in module:  # e.g. lora_te_ and lora_te1_ keys for one module: which would win is arbitrary
            raise AdapterError(f"{where}: two keys name the {role} of module {part}.{path} (one of them: {key!r})")
        module[role] = t
    modules = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "lora_down" if "down" not in p else "lora_up"
            raise AdapterError(f"{where}: module {name} has no {missing}.weight (a down/up pair is incomplete)")
        alpha = None
        if "alpha" in p:
            if p["alpha"].numel() != 1:  # kohya writes a 0-d tensor; a 1-element one is read alike
                raise AdapterError(f"{where}: module {name}: alpha must be one number, got a tensor of shape "
                                   f"{tuple(p['alpha'].shape)}")
            alpha = float(p["alpha"].float().item())
        modules[name] = LoRAModule(p["down"], p["up"], alpha)
    unet_paths = [n[len("unet."):] for n in modules if n.startswith("unet.")]
    ldm_named = [p for p in unet_paths if p.startswith(_LDM_HEADS)]
    if ldm_named and len(ldm_named) < len(unet_paths):  # half the file would match no module of any model
        other = next(p for p in unet_paths if not p.startswith(_LDM_HEADS))
        raise AdapterError(f"{where}: its UNet keys mix the original SD (LDM) naming, e.g. {ldm_named[0]}, with "
                           f"diffusers naming, e.g. {other}; a LoRA file uses one of them")
    naming = "ldm" if ldm_named else "diffusers"
    return AdapterWeights(modules, dict(metadata), format="kohya", unet_naming=naming, source=source)


def write(weights: AdapterWeights, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Tensors in kohya naming. Alpha is always written, as float32, so scales survive every loader."""
    out, written = {}, {}
    for name, m in weights.modules.items():
        part, path = name.split(".", 1)
        if part == "unet" and weights.unet_naming != "diffusers":
            raise AdapterError(f"{weights.where()}: convert LDM-named UNet keys to diffusers names before writing")
        stem = kohya_stem(part, path)
        if stem in written:  # "a.b.c" and "a.b_c": one set of keys would overwrite the other
            raise AdapterError(f"{weights.where()}: {written[stem]} and {name} name the same module ({stem})")
        written[stem] = name
        out[f"{stem}.lora_down.weight"] = m.down.detach().to("cpu", dtype).contiguous()
        out[f"{stem}.lora_up.weight"] = m.up.detach().to("cpu", dtype).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(m.alpha_value, dtype=torch.float32)
    return out
