"""diffusers and PEFT formats.

Keys: "<part>.<module path>.<pair suffix>", part in unet / text_encoder / text_encoder_2. Pair suffixes seen in the
wild, all read: PEFT's "lora_A.weight"/"lora_B.weight" (what diffusers' save_lora_weights writes today), the older
"lora.down.weight"/"lora.up.weight", "lora_linear_layer.down/up.weight" and the attention-processor era's
"processor.to_q_lora.down.weight". Bare PEFT files have no part prefix (optionally "base_model.model.").

Alpha is not in the keys. diffusers stores the PEFT config as JSON in the header ("lora_adapter_metadata", keys
"unet.r", "unet.lora_alpha", "unet.alpha_pattern", ...); PEFT folders keep it in adapter_config.json. Without either,
alpha = r. We write r/lora_alpha plus exact per-module rank_pattern/alpha_pattern so differing alphas survive.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import torch

from sd_lora.targets import PARTS, strip_text_model
from sd_lora.weights import AdapterError, AdapterWeights, LoRAModule

# pair suffix -> role
_PAIRS = {
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
}
# attention-processor era names: "<attn>.processor.to_q_lora" -> "<attn>.to_q"
_PROCESSOR = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
# Keys of that era (diffusers 0.14-0.2x): "<attn>.processor.to_q_lora.down.weight" in the UNet and
# "<attn>.to_q_lora.down.weight" in the text encoder, whose projections are named q_proj ... out_proj.
_OLD_KEY = re.compile(r"(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PEFT_PREFIX = "base_model.model."
METADATA_KEY = "lora_adapter_metadata"


def matches(keys: list[str], metadata: dict[str, str]) -> bool:
    return any(k.endswith(tuple(_PAIRS)) for k in keys)


def is_bare_peft(keys: list[str]) -> bool:
    """Keys without a part prefix: what PEFT's save_pretrained writes, with its config in adapter_config.json."""
    return not any(k.removeprefix(_PEFT_PREFIX).split(".", 1)[0] in PARTS for k in keys)


def _split(key: str) -> tuple[str, str, str] | None:
    """key -> (part, module path, role) or None."""
    old = _OLD_KEY.fullmatch(key)
    if old:
        path, projection, role = old[1], old[2], old[3]
    else:
        for suffix, role in _PAIRS.items():
            if key.endswith("." + suffix):
                path = key[: -len(suffix) - 1]
                break
        else:
            return None
    path = path.removeprefix(_PEFT_PREFIX)
    head, _, rest = path.partition(".")
    if head in PARTS:
        part, path = head, rest
    else:  # bare PEFT file: CLIP paths say which model they belong to
        part = "text_encoder" if path.startswith(("text_model.", "encoder.layers.")) else "unet"
    if old:
        path = f"{path}.{_PROCESSOR[projection + '_lora'] if part == 'unet' else _OLD_TEXT[projection]}"
    elif ".processor." in path:
        attn, _, proc = path.rpartition(".processor.")
        path = f"{attn}.{_PROCESSOR.get(proc, proc)}"
    if part != "unet":
        path = strip_text_model(path)
    return part, path, role


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the path or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", path) or re.fullmatch(rf"(.*\.)?({key})", "text_model." + path):
            return value
    return default


def _alpha(config: dict, path: str, tensor_rank: int) -> float | None:
    """Alpha in our convention (scale = alpha / tensor rank) from a PEFT config, or None without one."""
    if not config or "lora_alpha" not in config:
        return None
    try:
        r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", tensor_rank))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config["lora_alpha"])
    except (AttributeError, TypeError, re.error) as e:  # patterns that are not {regex: number}
        raise AdapterError(f"the LoRA config's rank_pattern/alpha_pattern cannot be read: {e}") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (r, alpha)) \
            or r <= 0:
        raise AdapterError(f"the LoRA config gives {path} r={r!r}, lora_alpha={alpha!r}; expected a positive r and "
                           "a finite lora_alpha")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scale * tensor_rank


def part_configs(metadata: dict[str, str], peft_config: dict | None = None) -> dict[str, dict]:
    """Per-part PEFT configs from diffusers' header JSON, or one bare PEFT config applied to every part."""
    if peft_config is not None:
        return {p: peft_config for p in PARTS}
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{METADATA_KEY} in the header is not valid JSON: {e}") from e
    if not isinstance(flat, dict):
        raise AdapterError(f"{METADATA_KEY} in the header is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, field = key.partition(".")
        configs.setdefault(part, {})[field] = value
    return configs


def read(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str | None = None,
         peft_config: dict | None = None) -> AdapterWeights:
    where = source or "adapter"
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        split = _split(key)
        if split is None:
            raise AdapterError(f"{where}: unexpected key {key!r} in a diffusers/PEFT LoRA file")
        part, path, role = split
        pair = pairs.setdefault((part, path), {})
        if role in pair:  # e.g. "text_model." and bare CLIP keys, or two naming eras, for one module
            raise AdapterError(f"{where}: two keys name the {role} of module {part}.{path} (one of them: {key!r})")
        pair[role] = t
    try:
        configs = part_configs(metadata, peft_config)
        if not all(isinstance(c, dict) for c in configs.values()):  # adapter_config.json holding a list, say
            raise AdapterError("the LoRA config is not a JSON object")
        modules = {}
        for (part, path), p in pairs.items():
            if "down" not in p or "up" not in p:
                raise AdapterError(f"module {part}.{path} has only one half of its LoRA pair "
                                   f"(missing {'down/lora_A' if 'down' not in p else 'up/lora_B'})")
            modules[f"{part}.{path}"] = LoRAModule(p["down"], p["up"],
                                                   _alpha(configs.get(part, {}), path, p["down"].shape[0]))
    except AdapterError as e:
        raise AdapterError(f"{where}: {e}") from None
    fmt = "diffusers" if any(k.split(".", 1)[0] in PARTS for k in tensors) else "peft"
    return AdapterWeights(modules, dict(metadata), format=fmt, source=source)


def write(weights: AdapterWeights, dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors in diffusers' current (PEFT) naming, and the header JSON that carries every module's exact alpha."""
    tensors, by_part = {}, {}
    for name, m in weights.modules.items():
        part, path = name.split(".", 1)
        tensors[f"{part}.{path}.lora_A.weight"] = m.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{part}.{path}.lora_B.weight"] = m.up.detach().to("cpu", dtype).contiguous()
        by_part.setdefault(part, {})[path] = m
    flat: dict[str, object] = {}
    for part, mods in by_part.items():
        r = Counter(m.rank for m in mods.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha_value for m in mods.values()).most_common(1)[0][0]
        config = {
            "r": r, "lora_alpha": alpha, "target_modules": sorted(mods), "use_rslora": False, "use_dora": False,
            "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False,
            "rank_pattern": {re.escape(p): m.rank for p, m in mods.items() if m.rank != r},
            "alpha_pattern": {re.escape(p): m.alpha_value for p, m in mods.items() if m.alpha_value != alpha},
        }
        flat.update({f"{part}.{k}": v for k, v in config.items()})
    return tensors, {METADATA_KEY: json.dumps(flat, sort_keys=True)}
