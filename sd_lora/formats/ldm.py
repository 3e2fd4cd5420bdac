"""diffusers <-> original Stable Diffusion (LDM) names for the UNet, VAE and CLIP text encoder.

Single-file checkpoints (what A1111 and ComfyUI load) use the CompVis/LDM module tree; diffusers regroups the same
weights into down/mid/up blocks. The two trees differ only at block level (plus a few names inside a block), so the
mapping is a table of block prefixes built from the model's own config -- block counts, layers per block and which
blocks carry attention are read from the config, never assumed from SD1.5 -- and a path is translated by its longest
matching prefix. The same table serves both directions, module paths (for LoRA keys) and parameter keys alike.

UNet and VAE keys here carry no checkpoint prefix ("model.diffusion_model.", "first_stage_model."); only
`pipeline_to_single_file` / `single_file_to_parts` add and strip them. This module imports nothing of sd_lora.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
_TEXT_MODEL = "text_model."

# Names inside one block, LDM -> diffusers. None (not a table) means "the same on both sides": attention blocks.
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_DOWNSAMPLE = {"op": "conv"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

# Which diffusers block types carry a Transformer2DModel per resnet (the SD family uses only these).
_DOWN_HAS_ATTENTION = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_HAS_ATTENTION = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
# Mid block layout in diffusers names; LDM numbers the same modules middle_block.0, .1, ...
_MID_LAYOUT = {"UNetMidBlock2DCrossAttn": ("resnets.0", "attentions.0", "resnets.1"), "UNetMidBlock2D": ("resnets.0",),
               None: ()}

# Config fields the UNet layout depends on (the cache key); anything else (channels, heads) does not rename.
_UNET_LAYOUT_FIELDS = ("down_block_types", "up_block_types", "layers_per_block", "mid_block_type",
                       "addition_embed_type", "class_embed_type", "num_class_embeds")

Row = tuple  # (ldm_prefix, diffusers_prefix, inner names LDM -> diffusers, or None for identical)


def _block_type(table: dict, name: str, where: str) -> bool | tuple:
    """Look a block type up; an unknown one is an error, since guessing its layout would silently misname weights."""
    if name not in table:
        raise ValueError(f"{where} type {name!r} has no LDM layout (supported: {sorted(map(str, table))})")
    return table[name]


def _unet_rows(cfg: dict) -> list[Row]:
    """Every block of the LDM UNet with its diffusers counterpart, in LDM order, derived from the config.

    LDM numbers input blocks and output blocks consecutively (conv_in is input_blocks.0, each resnet(+attention)
    and each downsampler is one more block); an upsampler rides in the last output block of its level, after the
    attention when there is one (output_blocks.N.2) and after the resnet otherwise (output_blocks.N.1).
    """
    down, up = cfg["down_block_types"], cfg["up_block_types"]
    n = len(down)
    layers = cfg["layers_per_block"]
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * n
    rows = [("time_embed.0", "time_embedding.linear_1", None), ("time_embed.2", "time_embedding.linear_2", None),
            ("input_blocks.0.0", "conv_in", None), ("out.0", "conv_norm_out", None), ("out.2", "conv_out", None)]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's size/crop conditioning
        rows += [("label_emb.0.0", "add_embedding.linear_1", None), ("label_emb.0.2", "add_embedding.linear_2", None)]
    elif cfg.get("class_embed_type") in ("timestep", "projection"):
        rows += [("label_emb.0.0", "class_embedding.linear_1", None), ("label_emb.0.2", "class_embedding.linear_2", None)]
    elif cfg.get("num_class_embeds") is not None:  # SD2 upscaler: nn.Embedding
        rows += [("label_emb", "class_embedding", None)]

    block = 1
    for i, kind in enumerate(down):
        attention = _block_type(_DOWN_HAS_ATTENTION, kind, "down block")
        for j in range(layers[i]):
            rows.append((f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attention:
                rows.append((f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}", None))
            block += 1
        if i < n - 1:
            rows.append((f"input_blocks.{block}.0", f"down_blocks.{i}.downsamplers.0", _UNET_DOWNSAMPLE))
            block += 1

    mid = _block_type(_MID_LAYOUT, cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"), "mid block")
    for m, name in enumerate(mid):
        rows.append((f"middle_block.{m}", f"mid_block.{name}", _UNET_RESNET if name.startswith("resnets") else None))

    block = 0
    for i, kind in enumerate(up):
        attention = _block_type(_UP_HAS_ATTENTION, kind, "up block")
        for j in range(layers[n - 1 - i] + 1):  # diffusers: up block i mirrors down block n-1-i, one resnet more
            rows.append((f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if attention:
                rows.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", None))
            block += 1
        if i < n - 1:
            rows.append((f"output_blocks.{block - 1}.{2 if attention else 1}", f"up_blocks.{i}.upsamplers.0", None))
    return rows


def _vae_rows(cfg: dict) -> list[Row]:
    """Every block of the LDM VAE with its diffusers counterpart.

    The LDM decoder numbers its levels like the encoder (up.0 is the full-resolution level), while diffusers numbers
    decoder blocks in execution order, so diffusers up_blocks.i is LDM up.(n-1-i).
    """
    n, layers = len(cfg["down_block_types"]), cfg.get("layers_per_block", 2)
    rows = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in", f"{part}.conv_in", None), (f"{part}.norm_out", f"{part}.conv_norm_out", None),
                 (f"{part}.conv_out", f"{part}.conv_out", None),
                 (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
                 (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)]
        if cfg.get("mid_block_add_attention", True):
            rows.append((f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION))
    for i in range(n):
        rows += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
                 for j in range(layers)]
        if i < n - 1:
            rows.append((f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", None))
        level = n - 1 - i
        rows += [(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET)
                 for j in range(layers + 1)]
        if i < n - 1:
            rows.append((f"decoder.up.{level}.upsample", f"decoder.up_blocks.{i}.upsamplers.0", None))
    return rows


def _both_ways(rows: list[Row]) -> tuple[dict, dict]:
    """(LDM prefix -> (diffusers prefix, inner), diffusers prefix -> (LDM prefix, inverse inner))."""
    from_ldm = {ldm: (dif, inner) for ldm, dif, inner in rows}
    to_ldm = {dif: (ldm, None if inner is None else {v: k for k, v in inner.items()}) for ldm, dif, inner in rows}
    return from_ldm, to_ldm


@lru_cache(maxsize=32)
def _unet_tables(layout_json: str) -> tuple[dict, dict]:
    return _both_ways(_unet_rows(json.loads(layout_json)))


def _unet_table(unet_config: dict, direction: int) -> dict:
    """The cached prefix table for this config; direction 0 is LDM -> diffusers, 1 the inverse."""
    layout = {k: unet_config[k] for k in _UNET_LAYOUT_FIELDS if k in unet_config}
    return _unet_tables(json.dumps(layout, sort_keys=True))[direction]


def _longest_prefix(parts: list[str], table: dict):
    """(value, remaining parts) for the longest dotted prefix of `parts` in `table`; (None, parts) if none."""
    for cut in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:cut]))
        if hit is not None:
            return hit, parts[cut:]
    return None, parts


def _translate(path: str, table: dict, what: str) -> str:
    """Rename `path` by its longest block prefix in `table`, then the name inside the block."""
    hit, rest = _longest_prefix(path.split("."), table)
    if hit is None:
        raise KeyError(f"{what}: {path!r} is in no known block for this config")
    target, inner = hit
    if inner is not None and rest:
        name, rest = _longest_prefix(rest, inner)
        if name is None:
            raise KeyError(f"{what}: {path!r} names nothing with a counterpart inside block {target!r}")
        rest = [name, *rest]
    return ".".join([target, *rest])


def ldm_unet_prefixes(unet_config: dict) -> list[tuple[str, str]]:
    """Block-level (LDM prefix, diffusers prefix) pairs, e.g. ("input_blocks.1.1", "down_blocks.0.attentions.0")."""
    return [(ldm, dif) for ldm, dif, _ in _unet_rows(dict(unet_config))]


def unet_path_from_ldm(path: str, unet_config: dict) -> str:
    """LDM UNet module/parameter path (no "model.diffusion_model.") -> diffusers path; KeyError if none."""
    return _translate(path, _unet_table(unet_config, 0), "LDM UNet path")


def unet_path_to_ldm(path: str, unet_config: dict) -> str:
    """diffusers UNet module/parameter path -> LDM path (no "model.diffusion_model."); KeyError if none."""
    return _translate(path, _unet_table(unet_config, 1), "diffusers UNet path")


def unet_state_dict_to_ldm(sd: dict, unet_config: dict) -> dict:
    """diffusers UNet state dict -> LDM keys (unprefixed). Tensors are shared, not copied: shapes agree."""
    table = _unet_table(unet_config, 1)
    return {_translate(k, table, "diffusers UNet key"): v for k, v in sd.items()}


def unet_state_dict_from_ldm(sd: dict, unet_config: dict) -> dict:
    """LDM UNet state dict (unprefixed keys) -> diffusers keys. Tensors are shared, not copied."""
    table = _unet_table(unet_config, 0)
    return {_translate(k, table, "LDM UNet key"): v for k, v in sd.items()}


def _is_vae_attention_weight(diffusers_key: str) -> bool:
    """The VAE mid-attention q/k/v/out weights: Linear [C, C] in diffusers, 1x1 conv [C, C, 1, 1] in LDM."""
    parts = diffusers_key.split(".")  # group_norm.weight matches too, but it is 1-d, so callers' ndim tests skip it
    return parts[1:4] == ["mid_block", "attentions", "0"] and parts[-1] == "weight"


def vae_state_dict_to_ldm(sd: dict, vae_config: dict) -> dict:
    """diffusers AutoencoderKL state dict -> LDM VAE keys (unprefixed); attention Linears become 1x1 convs."""
    table = _both_ways(_vae_rows(vae_config))[1]
    out = {}
    for key, value in sd.items():
        if _is_vae_attention_weight(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[_translate(key, table, "diffusers VAE key")] = value
    return out


# Keys some LDM VAE files carry that no inference model has: the training discriminator/perceptual loss.
_LDM_VAE_IGNORED = ("loss.",)


def vae_state_dict_from_ldm(sd: dict, vae_config: dict) -> dict:
    """LDM VAE state dict (unprefixed keys) -> diffusers keys; 1x1 conv (or old 1-d conv) attention -> Linear."""
    table = _both_ways(_vae_rows(vae_config))[0]
    out = {}
    for key, value in sd.items():
        if key.startswith(_LDM_VAE_IGNORED):
            continue
        new = _translate(key, table, "LDM VAE key")
        if _is_vae_attention_weight(new) and value.ndim > 2:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


@lru_cache(maxsize=1)
def installed_clip_has_text_model_prefix() -> bool:
    """Whether the installed transformers' CLIPTextModel keys start with "text_model." (they stopped in 5.x).

    Asked of a 1-layer model built on the meta device, so no weights are allocated; transformers is imported
    only here, when a caller does not say which layout it wants.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                            vocab_size=8, max_position_embeddings=4)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return any(k.startswith(_TEXT_MODEL) for k in model.state_dict())


def text_encoder_state_dict_to_ldm(sd: dict) -> dict:
    """CLIPTextModel state dict (either transformers layout) -> LDM keys, always "text_model.*".

    A1111, ComfyUI and diffusers' own single-file loader recognise the text encoder by
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", so the prefix is not optional.
    """
    return {(k if k.startswith(_TEXT_MODEL) else _TEXT_MODEL + k): v for k, v in sd.items()}


def text_encoder_state_dict_from_ldm(sd: dict, has_text_model_prefix: bool | None = None) -> dict:
    """LDM CLIP keys ("text_model.*", unprefixed by "cond_stage_model.transformer.") -> CLIPTextModel keys.

    has_text_model_prefix: whether the returned keys keep "text_model."; None asks the installed transformers
    (`installed_clip_has_text_model_prefix`), so the result loads into its CLIPTextModel with strict=True.
    "embeddings.position_ids" is dropped: it is always arange(n), and transformers no longer stores it.
    """
    if has_text_model_prefix is None:
        has_text_model_prefix = installed_clip_has_text_model_prefix()
    out = {}
    for key, value in sd.items():
        bare = key.removeprefix(_TEXT_MODEL)
        if bare == "embeddings.position_ids":
            continue
        out[_TEXT_MODEL + bare if has_text_model_prefix else bare] = value
    return out


def pipeline_to_single_file(unet_sd: dict, vae_sd: dict, te_sd: dict, unet_config: dict, vae_config: dict) -> dict:
    """diffusers component state dicts -> one LDM checkpoint dict, as A1111/ComfyUI/from_single_file read it."""
    out = {UNET_PREFIX + k: v for k, v in unet_state_dict_to_ldm(unet_sd, unet_config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_state_dict_to_ldm(vae_sd, vae_config).items()})
    out.update({TEXT_ENCODER_PREFIX + k: v for k, v in text_encoder_state_dict_to_ldm(te_sd).items()})
    return out


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def single_file_to_parts(sd: dict, unet_config: dict, vae_config: dict,
                         has_text_model_prefix: bool | None = None) -> tuple[dict, dict, dict]:
    """One LDM checkpoint dict -> (unet_sd, vae_sd, te_sd) in diffusers/transformers keys.

    Keys outside the three model prefixes (EMA copies, scheduler buffers such as alphas_cumprod) are ignored.
    A part the file lacks comes back empty (e.g. a file without a VAE). has_text_model_prefix: as in
    `text_encoder_state_dict_from_ldm`. SD2's OpenCLIP text encoder ("cond_stage_model.model.") is not supported.
    """
    unet = _strip(sd, UNET_PREFIX)
    if not unet:
        raise ValueError(f"not an LDM single-file checkpoint: no {UNET_PREFIX!r} keys")
    if not any(k.startswith(TEXT_ENCODER_PREFIX) for k in sd) and any(k.startswith("cond_stage_model.model.")
                                                                       for k in sd):
        raise ValueError("OpenCLIP text encoder (SD2.x, 'cond_stage_model.model.*') is not supported here")
    return (unet_state_dict_from_ldm(unet, unet_config),
            vae_state_dict_from_ldm(_strip(sd, VAE_PREFIX), vae_config),
            text_encoder_state_dict_from_ldm(_strip(sd, TEXT_ENCODER_PREFIX), has_text_model_prefix))
