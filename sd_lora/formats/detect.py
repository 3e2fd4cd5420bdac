"""Which format a file is in, and which base model family it was made for, from its keys, shapes and metadata."""

from __future__ import annotations

from sd_lora.formats import diffusers, kohya
from sd_lora.weights import AdapterError, AdapterWeights

FORMATS = {"kohya": kohya, "diffusers": diffusers}

_DORA = "DoRA (weight-decomposed LoRA)"  # LyCORIS/kohya files carry "dora_scale", PEFT ones a magnitude vector
# LyCORIS network types we recognise but do not load yet: key suffix (after the module stem) -> name users know.
_UNSUPPORTED = {
    "hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "lora_mid.": "LoCon with Tucker decomposition (LyCORIS)",
    "diff": "full-weight diff (LyCORIS)", "oft_": "OFT (LyCORIS)", "w_norm": "DyLoRA/GLoRA (LyCORIS)",
    "on_input": "IA3 (LyCORIS)", "dora_scale": _DORA,
}
# PEFT's DoRA (use_dora=True) keeps each module's magnitude beside lora_A/lora_B; diffusers writes the same key.
_PEFT_DORA = "lora_magnitude_vector"

# modelspec architectures and kohya ss_base_model_version values -> family
_FAMILY_TAGS = {"stable-diffusion-v1": "sd1", "stable-diffusion-v2": "sd2", "stable-diffusion-xl": "sdxl",
                "sd_v1": "sd1", "sd_v2": "sd2", "sdxl": "sdxl", "sd_xl": "sdxl"}
# width of the cross-attention context, i.e. the text encoder's output -> family
_CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def unsupported_type(keys: list[str]) -> str | None:
    for key in keys:
        stem, _, suffix = key.partition(".")
        if stem.startswith("lora_"):
            for head, name in _UNSUPPORTED.items():
                if suffix.startswith(head):
                    return name
        if _PEFT_DORA in key.split("."):  # "<path>.lora_magnitude_vector", or "....lora_magnitude_vector.weight"
            return _DORA
    return None


def detect_format(keys: list[str], metadata: dict[str, str], where: str) -> str:
    kind = unsupported_type(keys)
    if kind:
        raise AdapterError(f"{where}: this is a {kind} network, which sd_lora does not load yet (LoRA and LoCon only)")
    for name, module in FORMATS.items():
        if module.matches(keys, metadata):
            return name
    sample = ", ".join(repr(k) for k in keys[:3])
    raise AdapterError(f"{where}: not a LoRA file: no kohya, diffusers or PEFT LoRA keys (first keys: {sample})")


def detect_family(weights: AdapterWeights) -> str:
    """Metadata first (what A1111 trusts), then the shapes of the keys."""
    md = weights.metadata
    tags = [md.get("modelspec.architecture", ""), md.get("ss_base_model_version", "")]
    for tag in tags:
        for prefix, family in _FAMILY_TAGS.items():
            if tag.startswith(prefix):
                return family
    if md.get("ss_v2") == "True":
        return "sd2"
    if "text_encoder_2" in weights.parts():
        return "sdxl"
    for name, m in weights.modules.items():
        if name.startswith("unet.") and name.endswith("attn2.to_k") and m.down.dim() == 2:
            return _CONTEXT_DIMS.get(int(m.down.shape[1]), "unknown")
    for name, m in weights.modules.items():
        if name.startswith("text_encoder.") and name.endswith("self_attn.q_proj"):
            return {768: "sd1", 1024: "sd2"}.get(int(m.down.shape[1]), "unknown")
    return "unknown"


def model_family(unet) -> str:
    """Family of a UNet from its config (a loaded UNet, or its config as a dict). Small SD1.x-architecture models
    (like "tiny") count as sd1."""
    config = unet if isinstance(unet, dict) else dict(getattr(unet, "config", None) or {})
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    dim = config.get("cross_attention_dim")
    if isinstance(dim, (list, tuple)):
        dim = dim[0]
    return "sd2" if dim == 1024 else "sd1"
