"""A blend written out of the app: one kohya LoRA file that A1111, ComfyUI and diffusers load as it is (its card in
the modelspec metadata, beside it the `<name>.json` sidecar and `<name>.preview.png` front ends read), or the base
model with the blend folded in (an original-SD single file, or a diffusers folder zipped for download).

The engine hands over the blend as sd_lora.merge items, taken from its controller under the pipeline's lock; nothing
here touches the pipeline. `files_lock` is held from picking a free name until the last file is written, so two
requests under one name never write one file.
"""

from __future__ import annotations

import json
import re
import threading
import zipfile
from pathlib import Path

from PIL import Image

import sd_lora
from sd_lora import lowrank, merge
from sd_lora.atomic import atomic_file, atomic_write_bytes
from ui import catalog, params

Items = list[tuple[sd_lora.AdapterWeights, dict[str, float]]]  # (adapter, {"unet": w, "text_encoder": w})

_SIDECAR_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # A1111's "sd version" sidecar values


def write_lora(items: Items, weights: params.Weights, unet_config: dict, folder: Path, name: str, family: str,
               files_lock: threading.Lock, rank: int | None = None, card: dict[str, str] | None = None,
               thumbnail: str | None = None) -> tuple[Path, list[str]]:
    """The blend `items` (the user's `weights`) as one kohya LoRA file in `folder`, under `name` or the next free
    name: exact (ranks concatenated) when `rank` is None, else SVD to `rank`. Returns the file and notes."""
    blended = merge.blend_exact(items, unet_config)
    notes = [f"exact blend of {len(items)} adapter(s): rank {'/'.join(map(str, sorted(blended.ranks)))}"]
    if rank:
        blended, report = lowrank.resize(blended, rank=int(rank))
        notes.append(f"SVD to rank {int(rank)}: {report.summary()}")
    with files_lock:  # two exports under one name must not write one file
        path = _free_path(folder, name.strip() or "blend", ".safetensors")
        thumbnail = thumbnail if thumbnail and Path(thumbnail).is_file() else None
        card = {k: v.strip() for k, v in (card or {}).items() if v and v.strip()}
        card.setdefault("description", "Blend of " + params.lora_tags(weights))
        _save_with_card(blended, path, card, thumbnail, family)
    notes.append(f"wrote {path}")
    return path, notes


def _save_with_card(blended: sd_lora.AdapterWeights, path: Path, card: dict[str, str], thumbnail: str | None,
                    family: str) -> None:
    """`card` (title, author, trigger, license, description) goes into the modelspec metadata and the sidecar."""
    md = {"ss_output_name": path.stem, "modelspec.title": card.get("title", path.stem)}
    md |= {f"modelspec.{key}": card[key] for key in ("author", "license", "description") if key in card}
    if "trigger" in card:
        md["modelspec.trigger_phrase"] = card["trigger"]
    if thumbnail:
        md["modelspec.thumbnail"] = catalog.thumbnail_data_uri(thumbnail)
    sd_lora.save_adapter(blended, path, metadata=md)
    # The sidecars A1111 and this app read, so the file shows its card wherever it is copied to.
    sidecar = {"description": card["description"], "activation text": card.get("trigger", ""),
               "preferred weight": 1.0, "sd version": _SIDECAR_VERSIONS.get(family, "Unknown")}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
    if thumbnail:
        with Image.open(thumbnail) as im, atomic_file(path.with_suffix(".preview.png")) as f:
            im.convert("RGB").save(f, format="PNG")


def write_checkpoint(items: Items, model: str, folder: Path, files_lock: threading.Lock,
                     single_file: bool = True) -> tuple[Path, list[str]]:
    """Checkpoint `model` with the blend `items` folded in, in `folder`: an original-SD single .safetensors file
    (what A1111 and ComfyUI load), or a diffusers folder and a .zip of it. Returns the file to offer and notes."""
    stem = "tiny" if model == "tiny" else Path(model.rstrip("/")).stem
    tags = "+".join(Path(w.source).stem if w.source else "lora" for w, _ in items)[:60]
    with files_lock:  # two merges under one name must not write one file
        path = _free_path(folder, f"{stem}-{tags}", ".safetensors" if single_file else "")
        merge.merge_checkpoint(model, items, path)
        notes = [f"merged {len(items)} adapter(s) into {path}"]
        if single_file:
            return path, notes
        archive = path.parent / f"{path.name}.zip"
        with atomic_file(archive) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:  # weights don't compress
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    z.write(f, Path(path.name) / f.relative_to(path))
    notes.append(f"zipped for download: {archive}")
    return archive, notes


def _free_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem+suffix`, or `stem-2`, `stem-3`...: the first name neither a file nor a merge's zip holds.
    Call with `files_lock` held until the file is written."""
    stem = re.sub(r"[^\w.+\-]+", "_", stem).strip("._") or "out"
    path, i = folder / f"{stem}{suffix}", 2
    while path.exists() or (path.parent / f"{path.name}.zip").exists():
        path, i = folder / f"{stem}-{i}{suffix}", i + 1
    folder.mkdir(parents=True, exist_ok=True)
    return path
