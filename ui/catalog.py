"""The adapter library: `.safetensors` files in the adapter folders, checked by sd_lora's reader, with the sidecars
front ends share (`<name>.json`: "description", "activation text", "preferred weight", "sd version";
`<name>.preview.png`), turned into what one card in the app shows.

Nothing here touches a pipeline; ui/engine.py loads the usable entries.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import sd_lora
from sd_lora.atomic import make_parents, remove_empty

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "unknown base"}
_SIDECAR_FAMILIES = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl"}  # A1111's "sd version" values
WEIGHT_RANGE = (-2.0, 2.0)
MAX_PREVIEW_PIXELS = 4096 * 4096
UPLOAD_PREFIX = ".upload-"  # store_upload's hidden temp files: `.upload-<uuid>.safetensors`
STALE_UPLOAD_S = 3600.0  # a temp file not written to for an hour belongs to no running upload


@dataclass
class Entry:
    """One adapter file as the app shows it. `error` set means listed but disabled, with that reason."""

    name: str
    path: Path
    family: str = "unknown"
    title: str = ""
    trigger: str = ""
    description: str = ""
    weight: float = 1.0  # the sidecar's "preferred weight", else 1.0
    ranks: list[int] = field(default_factory=list)
    modules: dict[str, int] = field(default_factory=dict)
    preview: Image.Image | None = None  # the sidecar preview, else the file's modelspec.thumbnail
    short_hash: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None

    def rank_text(self) -> str:
        if not self.ranks:
            return "?"
        return str(self.ranks[0]) if len(self.ranks) == 1 else f"{self.ranks[0]}–{self.ranks[-1]}"

    def card(self) -> str:
        """Markdown for the card: title, family, rank, description; or the reason it is disabled."""
        head = f"**{self.title or self.name}**"
        if self.title and self.title != self.name:
            head += f" · `{self.name}`"
        facts = [FAMILY_NAMES.get(self.family, self.family)]
        if self.ranks:
            facts.append(f"rank {self.rank_text()}")
        if self.modules:
            facts.append(" + ".join(f"{self.modules[p]} {name}" for p, name in _PART_NAMES.items()
                                    if self.modules.get(p)) + " modules")
        lines = [head, " · ".join(facts)]
        if self.error:
            lines.append(f"⚠️ **Disabled:** {self.error}")
        elif self.description:
            lines.append(self.description[:300])
        return "  \n".join(lines)

    def as_dict(self) -> dict:
        """What /adapters returns for this adapter."""
        return {"name": self.name, "file": self.path.name, "title": self.title, "family": self.family,
                "ranks": self.ranks, "modules": self.modules, "trigger_words": self.trigger,
                "description": self.description, "preferred_weight": self.weight, "hash": self.short_hash,
                "usable": self.usable, "error": self.error, "metadata": _public_metadata(self.metadata)}


_PART_NAMES = {"unet": "UNet", "text_encoder": "text-encoder", "text_encoder_2": "text-encoder-2"}


def scan(folders: list[Path]) -> list[Path]:
    """The `.safetensors` files directly inside `folders`, sorted by name within each folder. Hidden names are
    skipped: they are uploads still being written (and macOS's `._name` resource files)."""
    found = []
    for folder in folders:
        if folder.is_dir():
            found.extend(sorted(p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith(".")))
    return found


def describe(path: Path, name: str, model_family: str) -> tuple[Entry, sd_lora.AdapterWeights | None]:
    """Read `path` with sd_lora's reader (never unpickling) and its sidecars. Reader errors become `error`;
    the weights come back too, so loading them does not read the file again."""
    entry = Entry(name=name, path=path, title=name)
    sidecar = _read_sidecar(path, entry)
    try:
        weights = sd_lora.read_adapter(path)
    except sd_lora.AdapterError as e:
        entry.error = str(e).replace(str(path), path.name)
        return entry, None
    md = weights.metadata
    entry.metadata = md
    entry.family = _SIDECAR_FAMILIES.get(str(sidecar.get("sd version", "")), weights.family)
    entry.ranks = sorted(weights.ranks)
    entry.modules = {p: weights.count(p) for p in weights.parts()}
    entry.title = md.get("modelspec.title") or md.get("ss_output_name") or name
    entry.trigger = str(sidecar.get("activation text") or md.get("modelspec.trigger_phrase") or "").strip()
    entry.description = str(sidecar.get("description") or md.get("modelspec.description") or "").strip()
    entry.short_hash = (md.get("sshs_model_hash") or _tensor_hash(path))[:12]
    if entry.preview is None and md.get("modelspec.thumbnail"):
        entry.preview = _small_image(image_from_data_uri(md["modelspec.thumbnail"]))
    if entry.family not in ("unknown", model_family):
        entry.error = (f"made for {FAMILY_NAMES.get(entry.family, entry.family)}, but the loaded model is "
                       f"{FAMILY_NAMES.get(model_family, model_family)}")
    return entry, weights


def _read_sidecar(path: Path, entry: Entry) -> dict:
    preview = path.with_suffix(".preview.png")
    if preview.is_file():
        entry.preview = _small_image(preview)
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}  # a broken sidecar must not hide the adapter: the defaults apply
    if not isinstance(data, dict):
        return {}
    try:
        weight = float(data.get("preferred weight") or 0)
    except (TypeError, ValueError):
        weight = 0.0
    if weight and math.isfinite(weight):  # A1111 writes 0 for "not set"; NaN would reach the slider as null
        entry.weight = min(max(weight, WEIGHT_RANGE[0]), WEIGHT_RANGE[1])
    return data


def _tensor_hash(path: Path) -> str:
    """A1111's Lora hash: sha256 of the bytes after the safetensors header (what `sshs_model_hash` stores)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _public_metadata(md: dict[str, str]) -> dict[str, str]:
    """Metadata for the API, minus the bulky or private parts (thumbnail bytes, captions)."""
    hidden = ("modelspec.thumbnail", "ss_tag_frequency", "ss_dataset_dirs")
    return {k: (v if len(v) <= 2000 else v[:2000] + "…") for k, v in md.items() if k not in hidden}


def unique_name(stem: str, taken: set[str]) -> str:
    """An adapter name usable in `<lora:name:w>` tags: no ':' '<' '>' and not already taken."""
    base = re.sub(r"[:<>\s]+", "_", stem).strip("_") or "adapter"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def store_upload(upload: Path, folder: Path, original_name: str, max_bytes: int) -> Path:
    """Check an uploaded file (suffix, size, sd_lora's reader) and copy it into `folder` under a free name.

    The bytes go to a hidden temp file inside `folder` first (`scan` skips hidden names), are fsynced and checked,
    and only then take their final name, by a hard link that fails when the name is taken. So a rescan never lists
    half a file (Gradio's temp folder may be on another filesystem, where a move is a copy), and two uploads under
    one name never overwrite each other. A temp file left by an app killed mid-copy goes at the next start
    (`remove_stale_uploads`)."""
    name = Path(original_name).name
    if Path(name).suffix.lower() != ".safetensors":
        raise sd_lora.AdapterError(f"{name}: only .safetensors adapters can be uploaded (pickle files such as "
                                   ".ckpt/.pt can run code when loaded)")
    size = upload.stat().st_size
    if size > max_bytes:
        raise sd_lora.AdapterError(f"{name}: {size / 2**20:.0f} MB is over the {max_bytes / 2**20:.0f} MB limit")
    stem = re.sub(r"[^\w.\-]+", "_", Path(name).stem).strip("._") or "adapter"
    created = make_parents(folder / name)
    # A .safetensors suffix whatever the upload's temp name is, so it is only ever parsed as safetensors. os.open
    # applies the umask to 0666 itself (reading the umask means setting it, which races with other threads).
    tmp = folder / f"{UPLOAD_PREFIX}{uuid.uuid4().hex}.safetensors"
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f, upload.open("rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        try:
            sd_lora.read_adapter(tmp)
        except sd_lora.AdapterError as e:
            raise sd_lora.AdapterError(str(e).replace(str(tmp), name)) from None
        target = _claim(tmp, folder, stem)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_empty(created)
        raise
    tmp.unlink(missing_ok=True)  # the file lives on under its final name
    return target


def _claim(tmp: Path, folder: Path, stem: str) -> Path:
    """Give the complete file `tmp` the first free name of `stem.safetensors`, `stem-2.safetensors`...; a name
    another upload claimed a moment earlier is never overwritten."""
    target, i = folder / f"{stem}.safetensors", 2
    while True:
        try:
            os.link(tmp, target)  # one atomic step that fails when the name exists, even for another process
            return target
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links (FAT, exFAT): exclusive within this app only
            with _CLAIM_LOCK:
                if not target.exists():
                    os.replace(tmp, target)
                    return target
        target, i = folder / f"{stem}-{i}.safetensors", i + 1


_CLAIM_LOCK = threading.Lock()


def remove_stale_uploads(folders: list[Path], max_age: float = STALE_UPLOAD_S) -> list[Path]:
    """Delete `store_upload`'s temp files that no upload will finish: the app was killed mid-copy, and scans skip
    hidden names, so they would stay forever. Only those not written to for `max_age` seconds go: a younger one may
    be another app's upload into the same folder, still being copied (each write renews its mtime, and the copy
    never takes the source's times). Returns the files removed."""
    cutoff, removed = time.time() - max_age, []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.glob(f"{UPLOAD_PREFIX}*.safetensors"):
            try:
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:  # never a link, nor what it points to
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone meanwhile, or not ours to delete: a leftover must not stop the app starting
                pass
    return removed


def thumbnail_data_uri(image_path: str | Path, size: int = 256) -> str:
    """A small PNG of `image_path` as a data URI, for `modelspec.thumbnail`."""
    with Image.open(image_path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _small_image(source: Path | Image.Image | None, size: int = 192) -> Image.Image | None:
    """Open and shrink a preview now, so the app never serves files from the adapter folder for it."""
    if source is None:
        return None
    try:
        im = _open_image(source) if isinstance(source, Path) else source
        im = im.convert("RGB")
    except Exception:  # noqa: BLE001 - a preview PIL cannot decode only costs the preview, never the app
        return None
    im.thumbnail((size, size))
    return im


def image_from_data_uri(uri: str) -> Image.Image | None:
    try:
        head, data = uri.split(",", 1)
        if not head.startswith("data:image/") or ";base64" not in head:
            return None
        im = _open_image(io.BytesIO(base64.b64decode(data)))
        im.load()
        return im
    except Exception:  # noqa: BLE001 - a bad thumbnail (bad base64, not an image, a bomb) only costs the preview
        return None


def _open_image(source) -> Image.Image:
    """Image.open, refusing pictures far larger than any preview before decoding them: an adapter's thumbnail or
    preview comes from whoever shared the file, and a decompression bomb must not take the app down."""
    im = Image.open(source)
    if im.width * im.height > MAX_PREVIEW_PIXELS:
        raise ValueError(f"a {im.width}x{im.height} preview is larger than any preview needs")
    return im
