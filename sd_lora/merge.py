"""Offline LoRA algebra: blend adapters into one, and fold a weighted blend into a checkpoint (a diffusers folder or
an original-SD single file). Resizing and extracting by SVD live in sd_lora.lowrank.

Every operation works on the exact update ΔW = up @ down · α/r of each module and never averages up and down
separately (kohya's merge does, which adds cross terms and applies each weight squared). The CLI and the UI both call
these functions; nothing here prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from sd_lora import checkpoint
from sd_lora.formats import ldm
from sd_lora.formats.detect import model_family
from sd_lora.targets import PARTS, normalize
from sd_lora.weights import AdapterError, AdapterWeights, LoRAModule

Item = tuple  # (AdapterWeights, weight): weight is a float, or {"unet": w, "text_encoder": w} per part

# UNet block layouts of the standard families: enough to translate LDM-named kohya keys with no model at hand.
_SD_LAYOUT = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
UNET_LAYOUTS = {"sd1": _SD_LAYOUT, "sd2": _SD_LAYOUT, "unknown": _SD_LAYOUT, "sdxl": {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "addition_embed_type": "text_time"}}


# ---- naming and blending ------------------------------------------------------------------------------------------
def part_weight(weight, part: str) -> float:
    """An item's weight for one part: a float applies everywhere, a dict names "unet" and "text_encoder"."""
    if isinstance(weight, dict):
        return float(weight.get("unet" if part == "unet" else "text_encoder", 0.0))
    return float(weight)


def diffusers_named(w: AdapterWeights, unet_config: dict | None = None) -> AdapterWeights:
    """The same adapter with LDM-named UNet modules renamed to diffusers paths, so files from different tools line
    up module by module. Without a config, the family's standard layout (SD1.5's block counts for SD1/SD2) is used.

    Two names for one module within the adapter (a dotted path and its `_`-joined form, say) are refused, as
    Adapters.load refuses them: blended or merged, that module would get its update twice, and written as kohya
    keys, one of the two would silently vanish."""
    ldm_named = w.unet_naming == "ldm"
    config = (unet_config or UNET_LAYOUTS[w.family]) if ldm_named else None
    modules, seen = {}, {}
    for name, m in w.modules.items():
        part, path = name.split(".", 1)
        if part == "unet" and ldm_named:
            try:
                path = ldm.unet_path_from_ldm(path, config)
            except (KeyError, ValueError) as e:
                raise AdapterError(f"{w.where()}: {e.args[0]}") from None
        module = (part, normalize(path))
        if module in seen:
            raise AdapterError(f"{w.where()}: {seen[module]} and {name} name the same module")
        seen[module] = name
        modules[f"{part}.{path}"] = m
    return replace(w, modules=modules, unet_naming="diffusers") if ldm_named else w


def blend_exact(items: list[Item], unet_config: dict | None = None) -> AdapterWeights:
    """Σᵢ wᵢ·ΔWᵢ as one adapter, exactly: factors concatenated along the rank axis, each wᵢ·αᵢ/rᵢ folded into its up,
    alpha = total rank (scale 1). A module one adapter lacks simply gets fewer columns."""
    if not items:
        raise AdapterError("no adapters to blend")
    named = [(diffusers_named(w, unet_config), weight) for w, weight in items]
    families = sorted({w.family for w, _ in named} - {"unknown"})
    if len(families) > 1:
        raise AdapterError(f"cannot blend adapters for different base models ({', '.join(families)})")
    groups: dict[str, list[tuple[LoRAModule, float, str]]] = {}
    for w, weight in named:
        for name, m in w.modules.items():
            s = part_weight(weight, name.split(".", 1)[0]) * m.scale
            if s != 0.0:
                groups.setdefault(name, []).append((m, s, w.where()))
    if not groups:
        raise AdapterError("every weight is 0: the blend is empty")
    modules = {name: _concat(name, pairs) for name, pairs in groups.items()}
    record = json.dumps([{"source": Path(w.source).name if w.source else "adapter", "weight": weight}
                         for w, weight in items])
    return AdapterWeights(modules, {"sd_lora.blend": record}, family=(families or ["unknown"])[0], format="kohya")


def _concat(name: str, pairs: list[tuple[LoRAModule, float, str]]) -> LoRAModule:
    conv = any(m.down.dim() == 4 for m, _, _ in pairs)
    downs, ups = [], []
    for m, s, where in pairs:
        down, up = m.down.float(), m.up.float() * s
        if conv and down.dim() == 2:  # the same 1x1 conv written as 2-D by one tool and 4-D by another
            down, up = down[:, :, None, None], up[:, :, None, None]
        if downs and (down.shape[1:] != downs[0].shape[1:] or up.shape[0] != ups[0].shape[0]):
            raise AdapterError(f"{where}: {name}: down {tuple(m.down.shape)} / up {tuple(m.up.shape)} do not match "
                               f"the other adapters' {tuple(downs[0].shape[1:])} / {ups[0].shape[0]} for this module")
        downs.append(down)
        ups.append(up)
    down = torch.cat(downs)
    return LoRAModule(down, torch.cat(ups, dim=1), float(down.shape[0]))


# ---- folding into models ---------------------------------------------------------------------------------------------
def _fit_shape(m: LoRAModule, shape: torch.Size, name: str) -> None:
    """ΔW must fill the weight: equal shapes, or equal up to trailing 1s (a 1x1 conv written as 2-D, or back)."""
    got = (m.up.shape[0], *m.down.shape[1:])
    squeeze = (lambda s: tuple(s[:2]) if all(d == 1 for d in s[2:]) else tuple(s))
    if tuple(got) != tuple(shape) and squeeze(got) != squeeze(shape):
        raise AdapterError(f"{name}: the LoRA update has shape {tuple(got)} but the model's weight is {tuple(shape)}")


def merge_into_pipeline(pipe, items: list[Item]) -> int:
    """Fold Σᵢ wᵢ·ΔWᵢ into the pipeline's UNet and text encoder in place, each weight summed in fp32 and cast once.
    Every module is resolved and shape-checked before the first weight changes. Returns the number of weights merged."""
    models = {p: m for p in PARTS if (m := getattr(pipe, p, None)) is not None}
    check_family(items, model_family(pipe.unet))
    blended = blend_exact(items, dict(pipe.unet.config))
    tables = {p: {normalize(n): mod for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
              for p, m in models.items()}
    plan, unmatched = [], []
    for name, m in blended.modules.items():
        part, path = name.split(".", 1)
        module = tables.get(part, {}).get(normalize(path))
        if module is None:
            unmatched.append(name)
            continue
        _fit_shape(m, module.weight.shape, name)
        plan.append((module.weight, m))
    _raise_unmatched(unmatched, len(blended.modules))
    with torch.no_grad():
        for weight, m in plan:
            if weight.dtype == torch.float32:
                add_delta(weight, m)
            else:
                weight.copy_(add_delta(weight.float(), m).to(weight.dtype))  # fp32 sum, cast once
    return len(plan)


def check_family(items: list[Item], family: str) -> None:
    """An adapter made for another base family is refused before anything is merged."""
    for w, _ in items:
        if w.family not in ("unknown", family):
            raise AdapterError(f"{w.where()}: this adapter is for {w.family} but the model is {family}")


def add_delta(weight: torch.Tensor, m: LoRAModule) -> torch.Tensor:
    """weight += ΔW in place, as one fused GEMM-accumulate (addmm_): no ΔW-sized temporary, one pass over the
    weight. `weight` must be fp32 and contiguous."""
    weight.view(weight.shape[0], -1).addmm_(m.up.float().flatten(1), m.down.float().flatten(1), alpha=m.scale)
    return weight


def _raise_unmatched(unmatched: list[str], total: int) -> None:
    if unmatched:
        raise AdapterError(f"{len(unmatched)} of {total} LoRA modules match no weight of this model, e.g. "
                           f"{', '.join(unmatched[:3])}; is an adapter made for another base model?")


def merge_checkpoint(model: str | os.PathLike, items: list[Item], out: str | os.PathLike,
                     dtype: torch.dtype | None = None, config: str | os.PathLike | None = None) -> Path:
    """Fold a blend into checkpoint `model` and write `out`: a diffusers folder, or (`.safetensors`) an original-SD
    single file. When `model` already is that kind of checkpoint (a single file, or a diffusers folder of
    .safetensors files), it is edited in its own key space, streamed: the merged weights change, every other tensor
    and the header metadata are copied byte for byte (unless `dtype` casts them all). Otherwise the model is loaded
    with load_pipeline, merged in memory and written."""
    out, src = Path(out), Path(str(model))
    if out.suffix and out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output is a folder (no suffix) or a .safetensors single file")
    if out.suffix == ".safetensors" and src.suffix == ".safetensors" and src.is_file():
        return merge_single_file(src, items, out, dtype)
    if not out.suffix and is_plain_folder(src):
        return merge_folder(src, items, out, dtype)
    from sd_lora.pipeline import load_pipeline

    dtype = dtype or checkpoint.stored_dtype(model)  # "keep the model's dtype" even where loading upcast it
    pipe = load_pipeline(model, config=config)
    merge_into_pipeline(pipe, items)
    if out.suffix:
        return checkpoint.write_single_file(pipe, out, dtype, {"sd_lora.merged": _record(items)})
    return checkpoint.write_folder(pipe, out, dtype)


def _record(items: list[Item]) -> str:
    return json.dumps([{"source": Path(w.source).name if w.source else "adapter", "weight": wt} for w, wt in items])


# ---- checkpoint files, edited in their own key space ------------------------------------------------------------
def merge_single_file(src: Path, items: list[Item], out: Path, dtype: torch.dtype | None = None) -> Path:
    """Merge into an original-SD single file in its own (LDM) key space, streaming one tensor at a time."""
    header, _ = checkpoint.read_header(src)
    unet_keys = [k[len(ldm.UNET_PREFIX):] for k in header if k.startswith(ldm.UNET_PREFIX)]
    if not unet_keys:
        raise ValueError(f"{src}: not an original-SD single-file checkpoint (no {ldm.UNET_PREFIX}* keys)")
    layout = checkpoint.unet_layout_from_ldm(unet_keys)
    check_family(items, checkpoint.single_file_family(header, layout))
    blended = blend_exact(items, layout)
    edits, unmatched = _edits(blended, list(blended.modules), header, lambda n: checkpoint.ldm_key(n, layout))
    _raise_unmatched(unmatched, len(blended.modules))
    return checkpoint.rewrite_safetensors(src, out, edits, dtype, {"sd_lora.merged": _record(items)})


# The weight files a diffusers folder keeps its UNet and text encoder in (unsharded, no variant).
FOLDER_WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}


def is_plain_folder(path: Path) -> bool:
    """A diffusers folder whose weights are all unsharded .safetensors: merge_folder can stream it."""
    return (path.is_dir() and (path / "model_index.json").is_file() and
            all((path / rel).is_file() for rel in FOLDER_WEIGHTS.values()) and
            not any(f.suffix in (".bin", ".pt", ".ckpt", ".pth") or f.name.endswith(".index.json")
                    for f in path.rglob("*")))


def merge_folder(src: Path, items: list[Item], out: Path, dtype: torch.dtype | None = None) -> Path:
    """Merge into a diffusers folder without loading it: the UNet and text-encoder files, variants included (hub
    snapshots often hold `diffusion_pytorch_model.fp16.safetensors` beside the fp32 file), are streamed with the blend
    added; every other file is copied (or cast, with `dtype`)."""
    config = json.loads((src / "unet" / "config.json").read_text())
    check_family(items, model_family(config))
    blended = blend_exact(items, config)
    edits, unmatched = {}, [n for n in blended.modules if n.split(".", 1)[0] not in FOLDER_WEIGHTS]
    for part, main in FOLDER_WEIGHTS.items():
        names = [n for n in blended.modules if n.split(".", 1)[0] == part]
        for rel in part_files(src, main):
            header, _ = checkpoint.read_header(src / rel)
            edits[rel], missed = _edits(blended, names, header, lambda n, h=header: _folder_key(n, h))
            unmatched += [n for n in missed if n not in unmatched]
    _raise_unmatched(unmatched, len(blended.modules))
    return checkpoint.rewrite_folder(src, out, edits, dtype, {"sd_lora.merged": _record(items)})


def part_files(src: Path, main: str) -> list[str]:
    """A component's weight files: `main` ("unet/diffusion_pytorch_model.safetensors") and its variants
    ("unet/diffusion_pytorch_model.fp16.safetensors"), as paths relative to `src`."""
    folder, name = main.split("/")
    stem = name.removesuffix(".safetensors")
    return sorted(f"{folder}/{f.name}" for f in (src / folder).glob(f"{stem}.*safetensors"))


def _folder_key(name: str, header: dict) -> str:
    """The weight's key in a diffusers/transformers file; CLIP keys carry "text_model." or not, by version."""
    key = name.split(".", 1)[1] + ".weight"
    return "text_model." + key if name.startswith("text_encoder.") and "text_model." + key in header else key


def _edits(blended: AdapterWeights, names: list[str], header: dict, key_of) -> tuple[dict, list[str]]:
    """key -> edit adding the module's ΔW (fp32 sum, cast once by the writer), after checking each key exists and
    fits; the names that match no key come back for one error. Nothing is written until every part is planned."""
    edits, unmatched = {}, []
    for name in names:
        m, key = blended.modules[name], key_of(name)
        if key not in header:
            unmatched.append(name)
            continue
        if header[key]["dtype"] not in ("F32", "F16", "BF16", "F64"):
            raise ValueError(f"{key} is stored as {header[key]['dtype']}; only float weights can be merged")
        _fit_shape(m, torch.Size(header[key]["shape"]), name)
        edits[key] = lambda t, m=m: add_delta(t.float(), m)  # read_tensor gives fresh memory: in place is safe
    return edits, unmatched
