"""Which modules get LoRA, and how module paths are named in files. Data tables, not str.replace chains.

Canonical names, used everywhere inside sd_lora: "<part>.<module path>", where part is "unet", "text_encoder" or
"text_encoder_2" and the path is the diffusers UNet path or the CLIP path *without* "text_model." (transformers >= 5
names CLIP modules "encoder.layers.0.self_attn.q_proj"; older versions put them under "text_model."). Files that carry
"text_model" (kohya, original SD checkpoints) are converted at the format boundary.

Resolution against a live model goes through `module_table`, built from the model's own module names (as ComfyUI
does): a name resolves when its `_`-joined form equals a module's. That makes kohya's lossy `.` -> `_` naming exact.
"""

from __future__ import annotations

import functools
import re

from torch import nn

PARTS = ("unet", "text_encoder", "text_encoder_2")

_ATTN = r"to_q|to_k|to_v|to_out\.0"
_TE_ATTN = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)"

# preset -> part -> regex on the canonical module path (full match).
PRESETS: dict[str, dict[str, str]] = {
    "cross-attn": {"unet": rf".*\.attn2\.({_ATTN})", "text_encoder": rf".*\.{_TE_ATTN}"},
    "attn": {"unet": rf".*\.attn[12]\.({_ATTN})", "text_encoder": rf".*\.{_TE_ATTN}"},
    # kohya's default set: every Linear and 1x1 conv of the Transformer2DModel blocks, plus CLIP attention and MLP.
    "full": {
        "unet": rf".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.({_ATTN})|ff\.net\.(0\.proj|2)))",
        "text_encoder": rf".*\.({_TE_ATTN}|mlp\.(fc1|fc2))",
    },
}

# kohya key prefixes. SDXL's two text encoders are te1/te2; SD1/SD2 use te.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}

# Names inside SD/SDXL/CLIP module paths that themselves contain "_". kohya joins path parts with "_", so splitting a
# key back into a path needs to know these. Longest match wins.
_ATOMS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_in", "conv_out", "conv_shortcut", "conv_norm_out", "time_emb_proj", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb", "layer_norm1", "layer_norm2", "final_layer_norm", "token_embedding",
    "position_embedding", "text_projection", "norm_out",
}
_MAX_ATOM = max(a.count("_") + 1 for a in _ATOMS)


def is_target_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def strip_text_model(path: str) -> str:
    return path.removeprefix("text_model.")


def preset_paths(model: nn.Module, part: str, preset: str) -> list[str]:
    """Canonical paths (without the part prefix) of `model`'s modules that `preset` targets."""
    return select([name for name, m in model.named_modules() if is_target_module(m)], part, preset)


def select(paths: list[str], part: str, preset: str) -> list[str]:
    """The canonical forms of those `paths` (Linear/Conv2d module paths of one part) that `preset` targets."""
    if preset not in PRESETS:
        raise ValueError(f"unknown target preset {preset!r}: choose one of {', '.join(PRESETS)}")
    pattern = PRESETS[preset].get("text_encoder" if part.startswith("text_encoder") else part)
    if pattern is None:
        return []
    rx = re.compile(pattern)
    return [strip_text_model(p) for p in paths if rx.fullmatch(strip_text_model(p))]


def normalize(path: str) -> str:
    """The form under which a path and a kohya stem compare equal."""
    return strip_text_model(path).replace(".", "_")


def module_table(model: nn.Module) -> dict[str, str]:
    """normalized path -> real module path, for every Linear/Conv2d of `model` (real path may keep text_model.)."""
    return {normalize(name): name for name, m in model.named_modules() if is_target_module(m)}


@functools.lru_cache(maxsize=8192)
def stem_to_path(stem: str) -> str:
    """kohya stem (no prefix) -> dotted path, e.g. "down_blocks_0_attentions_0_proj_in" -> "down_blocks.0.attentions.0.proj_in"."""
    tokens = stem.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for n in range(min(_MAX_ATOM, len(tokens) - i), 0, -1):
            cand = "_".join(tokens[i:i + n])
            if n == 1 or cand in _ATOMS:
                parts.append(cand)
                i += n
                break
    return ".".join(parts)


def kohya_stem(part: str, path: str) -> str:
    """Canonical part + path -> kohya key stem with prefix. Text-encoder stems always carry text_model (A1111 needs it)."""
    if part == "unet":
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[part]
    return prefix + "text_model_" + strip_text_model(path).replace(".", "_")


def split_kohya_key(key: str) -> tuple[str, str, str] | None:
    """"lora_unet_x_y.lora_down.weight" -> ("unet", "x.y", "lora_down.weight"), or None if not a kohya key."""
    stem, _, suffix = key.partition(".")
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix):
            path = stem_to_path(stem[len(prefix):])
            part = KOHYA_PREFIXES[prefix]
            return part, strip_text_model(path) if part != "unet" else path, suffix
    return None
