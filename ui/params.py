"""A1111-style "parameters" text: what every generated PNG carries so it can be reproduced, here or in A1111.

    a violin <lora:mozart:0.8> <lora:ink:unet=0.5:te=0.2>
    Negative prompt: blurry
    Steps: 20, Sampler: PNDM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny, Lora hashes: "mozart: 1a2b3c4d5e6f"

A1111 reads `<lora:name:w>` as both weights and `<lora:name:unet=u:te=t>` as separate ones; we write the short form
whenever the two are equal. The same text is also parsed back (a prompt with tags, or a whole PNG's parameters).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_lora.atomic import atomic_file

Weights = dict[str, dict[str, float]]  # name -> {"unet": w, "text_encoder": w}

_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def number(x: float) -> str:
    """0.15000000000000002 -> '0.15', 1.0 -> '1'."""
    return f"{round(float(x), 4):g}"


def lora_tag(name: str, unet: float, te: float) -> str:
    if number(unet) == number(te):
        return f"<lora:{name}:{number(unet)}>"
    return f"<lora:{name}:unet={number(unet)}:te={number(te)}>"


def lora_tags(weights: Weights) -> str:
    return " ".join(lora_tag(n, w["unet"], w["text_encoder"]) for n, w in weights.items()
                    if w["unet"] != 0 or w["text_encoder"] != 0)


def extract_tags(prompt: str) -> tuple[str, Weights]:
    """Split `<lora:...>` tags off a prompt (as A1111 users type them): (prompt without tags, weights)."""
    found: Weights = {}
    for m in _TAG.finditer(prompt):
        args = [a for a in m.group(2).split(":") if a]
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        try:
            # A1111: the first number is the text encoder's, the second the UNet's (default: the same).
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"cannot read the weights in {m.group(0)!r}: use <lora:name:0.8>") from None
        if not (math.isfinite(te) and math.isfinite(unet)):  # "nan" and "inf" parse as floats
            raise ValueError(f"the weights in {m.group(0)!r} must be finite numbers")
        found[m.group(1).strip()] = {"unet": unet, "text_encoder": te}
    clean = re.sub(r"\s{2,}", " ", _TAG.sub("", prompt)).strip(" ,")
    return clean, found


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ",:\n\"") else text


def infotext(prompt: str, negative: str, weights: Weights, settings: dict[str, object]) -> str:
    """The "parameters" text: prompt with lora tags, negative prompt, then `Key: value` pairs in A1111's order."""
    tags = lora_tags(weights)
    lines = [f"{prompt} {tags}".strip()]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in settings.items() if v not in (None, "")))
    return "\n".join(lines)


def parse(text: str) -> dict[str, object]:
    """Parse a "parameters" text back: {"prompt", "negative_prompt", "weights", and each `Key: value`}."""
    lines = text.strip().split("\n")
    settings: dict[str, object] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        for key, value in _PARAM.findall(lines.pop()):
            settings[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    clean, weights = extract_tags("\n".join(prompt))
    return {"prompt": clean, "negative_prompt": "\n".join(negative), "weights": weights, **settings}


def save_png(image: Image.Image, path: Path, parameters: str, extra: dict | None = None) -> Path:
    """Write a PNG with the A1111 "parameters" text chunk (and our own JSON, exact floats included)."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    if extra is not None:
        info.add_text("sd-lora", json.dumps(extra, sort_keys=True))
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_png(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG ("parameters", "sd-lora", ...)."""
    with Image.open(path) as im:
        return dict(getattr(im, "text", {}) or {})
