"""Checkpoint files as merge and extract need them: safetensors streamed one tensor at a time (read the header,
copy byte ranges, write atomically), original-SD (LDM) single files read in their own key space with the UNet layout
inferred from their keys, and whole pipelines written as a diffusers folder or a single file.

Streaming matters at SD scale: a 4 GB checkpoint merged through `load_file` + `save_file` holds the whole model in
memory; here peak memory is one weight, and tensors a merge does not touch are copied as bytes, so they stay
bit-identical by construction.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from sd_lora.atomic import atomic_file, make_parents, remove_empty
from sd_lora.formats import ldm
from sd_lora.formats.detect import model_family
from sd_lora.targets import strip_text_model

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the offset where tensor data starts. A file that is not one, or that was cut
    short (a tensor's bytes run past its end), is a ValueError naming the file and the problem."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100_000_000):
            hint = " (it looks like a pickle)" if head[:2] in (b"PK", b"\x80\x02", b"\x80\x04") else ""
            detail = f"{size} bytes" if n < 0 else f"the header claims {n} bytes but the file has {size}"
            raise ValueError(f"{path}: not a safetensors file, or truncated: {detail}{hint}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)")  # noqa: TRY004 - bad input
    offsets = [info.get("data_offsets") for k, info in header.items() if k != "__metadata__" and isinstance(info, dict)]
    end = max((o[1] for o in offsets if isinstance(o, list) and len(o) == 2 and isinstance(o[1], int)), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


def stored_dtype(model: str | os.PathLike) -> torch.dtype | None:
    """The precision a diffusers folder's or a single file's UNet weights are stored in; None for anything else
    (the tiny model, a hub id). load_pipeline may upcast on the CPU: a merge still writes what it read."""
    path = Path(str(model))
    if path.is_dir():
        files = sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors"))
    else:
        files = [path] if path.suffix == ".safetensors" and path.is_file() else []
    for f in files:
        header, _ = read_header(f)
        kinds = [ST_DTYPES.get(v["dtype"]) for k, v in header.items() if k != "__metadata__"]
        floats = [k for k in kinds if k is not None and k.is_floating_point]
        if floats:
            return max(set(floats), key=floats.count)
    return None


def read_tensor(f, data_start: int, info: dict) -> torch.Tensor:
    """One tensor of an open safetensors file, read into fresh memory (a header entry gives dtype, shape, offsets)."""
    begin, end = info["data_offsets"]
    buf = bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buf) != len(buf):
        raise OSError(f"{getattr(f, 'name', 'checkpoint')}: ended early (truncated?)")
    dtype = ST_DTYPES[info["dtype"]]
    if not buf:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def unet_layout_from_ldm(keys: list[str]) -> dict:
    """The UNet block layout (all that LDM <-> diffusers names depend on), read off an LDM UNet's own keys
    (without "model.diffusion_model."), so a foreign single file needs no config to be merged in its key space."""
    blocks: dict[str, dict[int, set[str]]] = {"input_blocks": {}, "output_blocks": {}}
    for key in keys:
        head, _, rest = key.partition(".")
        if head in blocks:
            index, _, inner = rest.partition(".")
            blocks[head].setdefault(int(index), set()).add(inner)
    levels: list[list[bool]] = [[]]
    for b in sorted(blocks["input_blocks"])[1:]:  # input_blocks.0 is conv_in
        inner = blocks["input_blocks"][b]
        if any(s.startswith("0.op.") for s in inner):
            levels.append([])
        else:
            levels[-1].append(any(s.startswith("1.") for s in inner))
    layers = [len(level) for level in levels]
    n, up, b = len(levels), [], 0
    for i in range(n):
        count = layers[n - 1 - i] + 1
        attn = any(s.startswith("1.transformer_blocks.") for j in range(b, b + count)
                   for s in blocks["output_blocks"].get(j, ()))
        up.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
        b += count
    mid = ("UNetMidBlock2DCrossAttn" if any(k.startswith("middle_block.1.transformer_blocks.") for k in keys)
           else "UNetMidBlock2D")
    layout = {"down_block_types": ["CrossAttnDownBlock2D" if any(lv) else "DownBlock2D" for lv in levels],
              "up_block_types": up, "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
              "mid_block_type": mid}
    if any(k.startswith("label_emb.0.0.") for k in keys):
        layout["addition_embed_type"] = "text_time"
    return layout


def ldm_key(name: str, layout: dict) -> str | None:
    part, path = name.split(".", 1)
    if part == "unet":
        try:
            return ldm.UNET_PREFIX + ldm.unet_path_to_ldm(path, layout) + ".weight"
        except KeyError:
            return None
    if part == "text_encoder":
        return ldm.TEXT_ENCODER_PREFIX + "text_model." + strip_text_model(path) + ".weight"
    return None


def write_single_file(pipe, out: Path, dtype: torch.dtype | None, metadata: dict[str, str]) -> Path:
    """A pipeline as one original-SD checkpoint (UNet, VAE, CLIP), with its configs embedded in the header."""
    from sd_lora.pipeline import EMBEDDED_CONFIG_KEY, embedded_config

    sd = ldm.pipeline_to_single_file(pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict(),
                                     pipe.unet.config, pipe.vae.config)
    entries = []
    for key, t in sd.items():
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        entries.append((key, ST_NAMES[target], list(t.shape), t.numel() * target.itemsize,
                        tensor_writer(lambda t=t, target=target: t.detach().to(target))))
    write_safetensors(out, entries, {**metadata, EMBEDDED_CONFIG_KEY: embedded_config(pipe)})
    return out


def tensor_writer(make):
    return lambda f: f.write(make().contiguous().reshape(-1).view(torch.uint8).numpy())


def copy_range(src, dst, offset: int, size: int, chunk: int = 64 << 20) -> None:
    src.seek(offset)
    while size > 0:
        data = src.read(min(chunk, size))
        if not data:
            raise OSError("source checkpoint ended early (truncated?)")
        dst.write(data)
        size -= len(data)


def write_safetensors(path: Path, entries: list, metadata: dict[str, str]) -> None:
    """Stream a safetensors file: entries are (name, dtype code, shape, nbytes, write(f)), written in order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, code, shape, nbytes, _ in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, _, _, nbytes, write in entries:
            before = f.tell()
            write(f)
            if f.tell() - before != nbytes:
                raise RuntimeError(f"{name}: wrote {f.tell() - before} bytes, expected {nbytes}")


def rewrite_safetensors(src: Path, out: Path, edits: dict, dtype: torch.dtype | None = None,
                        metadata: dict[str, str] | None = None) -> Path:
    """Stream `src` to `out` one tensor at a time. A tensor named in `edits` is read and replaced by edit(tensor)
    (cast back to its stored dtype, or to `dtype`); with `dtype`, other float tensors are cast; everything else is
    copied as raw bytes, so it stays bit-identical. Plain reads, not mmap: untouched data never counts as memory."""
    header, start = read_header(src)
    kept = dict(header.pop("__metadata__", None) or {})
    with open(src, "rb") as raw:
        entries = [_entry(key, info, edits.get(key), raw, start, dtype)
                   for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]
        write_safetensors(out, entries, {**kept, **(metadata or {})})
    return out


def _entry(key: str, info: dict, edit, raw, start: int, dtype: torch.dtype | None) -> tuple:
    stored = ST_DTYPES.get(info["dtype"])
    cast = dtype if dtype is not None and stored is not None and stored.is_floating_point else None
    if edit is None and cast in (None, stored):
        begin, end = info["data_offsets"]
        return key, info["dtype"], info["shape"], end - begin, lambda f: copy_range(raw, f, start + begin, end - begin)
    target = cast or stored

    def tensor():
        t = read_tensor(raw, start, info)
        return (t if edit is None else edit(t)).to(target)
    return key, ST_NAMES[target], info["shape"], math.prod(info["shape"]) * target.itemsize, tensor_writer(tensor)


def rewrite_folder(src: Path, out: Path, edits: dict[str, dict], dtype: torch.dtype | None = None,
                   metadata: dict[str, str] | None = None) -> Path:
    """A diffusers folder rewritten without loading its models: every .safetensors file streamed through
    `rewrite_safetensors` (edits keyed by the file's relative path, `metadata` added where there are edits), every
    other file copied; then swapped in like `write_folder`."""
    def build(tmp: Path) -> None:
        for f in sorted(src.rglob("*")):
            rel, target = f.relative_to(src).as_posix(), tmp / f.relative_to(src)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif f.suffix == ".safetensors":
                rewrite_safetensors(f, target, edits.get(rel, {}), dtype, metadata if rel in edits else None)
            else:
                shutil.copy2(f, target)
    return _replace_folder(out, build)


def write_folder(pipe, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A pipeline written with save_pretrained into a temp folder beside `out`, then swapped in."""
    if dtype is not None:
        pipe.to(dtype=dtype)  # the merged fp32 weights are cast here, once
    return _replace_folder(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def _replace_folder(out: Path, build) -> Path:
    """Build a folder beside `out`, fsync it, then rename it into place. An existing `out` is replaced only when it is
    a diffusers pipeline folder (never some other folder of the user's); a failure leaves `out` as it was."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model_index.json").is_file())):
        raise ValueError(f"{out}: exists and is not a diffusers pipeline folder; refusing to replace it")
    created, tmp = make_parents(out), None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        build(tmp)
        for f in tmp.rglob("*"):  # on disk before the rename, as atomic_file does for single files
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = out.with_name(tmp.name + ".old") if out.exists() else None
        if old:
            out.rename(old)
        tmp.rename(out)
        if old:
            shutil.rmtree(old)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise
    return out


def checkpoint_weights(model: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[dict, str]:
    """(canonical module name -> weight or loader, family) for the UNet and text encoder of `model`. Single files
    are read lazily in their own key space; anything else goes through load_pipeline."""
    path = Path(str(model))
    if path.suffix == ".safetensors" and path.is_file():
        return _single_file_weights(path)
    from sd_lora.pipeline import load_pipeline

    pipe = load_pipeline(model, config=config)
    weights = {}
    for part in ("unet", "text_encoder"):
        for name, mod in getattr(pipe, part).named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                weights[f"{part}.{strip_text_model(name)}"] = mod.weight.detach()
    return weights, model_family(pipe.unet)


def _single_file_weights(path: Path) -> tuple[dict, str]:
    from safetensors import safe_open

    header, _ = read_header(path)
    unet_keys = [k[len(ldm.UNET_PREFIX):] for k in header if k.startswith(ldm.UNET_PREFIX)]
    if not unet_keys:
        raise ValueError(f"{path}: not an original-SD single-file checkpoint (no {ldm.UNET_PREFIX}* keys)")
    layout = unet_layout_from_ldm(unet_keys)
    handle = safe_open(str(path), "pt")  # kept open by the loaders below
    weights, te = {}, ldm.TEXT_ENCODER_PREFIX + "text_model."
    for key, info in header.items():
        if not key.endswith(".weight") or len(info.get("shape", ())) not in (2, 4):
            continue
        if key.startswith(ldm.UNET_PREFIX):
            try:
                name = "unet." + ldm.unet_path_from_ldm(key[len(ldm.UNET_PREFIX):-len(".weight")], layout)
            except KeyError:
                continue
        elif key.startswith(te):
            name = "text_encoder." + key[len(te):-len(".weight")]
        else:
            continue
        weights[name] = lambda key=key: handle.get_tensor(key)
    return weights, single_file_family(header, layout)


def single_file_family(header: dict, layout: dict) -> str:
    """sd1, sd2 or sdxl for an original-SD single file, from its UNet layout and cross-attention width."""
    context = next((info["shape"][1] for k, info in header.items() if k.endswith("attn2.to_k.weight")), None)
    return "sdxl" if layout.get("addition_embed_type") else "sd2" if context == 1024 else "sd1"
