"""Training data: find images and captions, and normalise them. Aspect-ratio buckets and the batch order live in
buckets.py, latent and text-embedding caches in caches.py, prior-preservation class images in class_images.py.

The order of use, as the loop does it:

    records = scan_images(folder, caption=prompt, token=token)    # before any model loads: bad files, empty folder
    records = assign_buckets(records, resolution)
    latents = LatentCache(records, vae, flip=True) or LiveLatents(records, vae)
    texts = TextCache(captions, tokenizer, text_encoder)           # when the text encoder is frozen
    for keys in BucketSampler([r.bucket for r in records], batch_size, seed).iterate(start):
        params = latents.params(keys)                              # [B, 2C, h, w]: mean and log-variance
        z = sample_latents(params, vae.config, generator)

A key is (record index, flipped). Cached and live paths encode each (image, flip) on its own, so with the same RNG
they give the same latents bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sd_lora.training.config import UsageError, one_line, say, valid_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")  # in order of preference


class DatasetError(UsageError):
    """The images folder is missing, empty, or holds no usable image. The CLI exits with code 2."""


Warn = Callable[[str], None]


@dataclass(frozen=True)
class ImageRecord:
    """One usable training image. `size` is (width, height) after EXIF orientation; `bucket` is (width, height)
    of the training crop, None until assign_buckets runs; `sidecar` is the caption file the caption came from, None
    when it is the default prompt."""

    path: Path
    caption: str
    size: tuple[int, int]
    bucket: tuple[int, int] | None = None
    sidecar: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# Discovery and captions


def scan_images(folder: str | os.PathLike, caption: str, token: str | None = None, warn: Warn | None = say,
                *, exclude: Sequence[str | os.PathLike] = ()) -> list[ImageRecord]:
    """Every usable image under `folder`, sorted by relative path, with its caption (see read_caption). Symlinked
    files and folders count as if they were there, but links to `folder` or to a folder holding it are not
    followed; each real folder is read once (see _walk).

    Bad files (zero-byte, unreadable, corrupt, not an image, unsupported type, an unreadable caption) are skipped
    with one warning line each and a summary line. Hidden files and folders (".name") are ignored silently: they hold
    editor and OS clutter, and our own temporary files. So are the contents of the `exclude` folders (the run's
    output, cache and class-image folders), inside `folder` or reached through a link: their previews, samples and
    checkpoints are not training data. Excluding `folder` itself or a folder that holds it changes nothing. A
    caption that is not UTF-8 is used with its bad bytes as U+FFFD, and one warning line.
    Raises DatasetError when nothing usable is left.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    warn = warn or (lambda message: None)
    files = _walk(root, exclude)
    images = {f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS}
    owners = images | {f.with_suffix("") for f in images}  # a sidecar is name.txt or name.png.txt
    sidecars = _sidecars(files)
    records, problems = [], Counter()
    for path in files:
        suffix = path.suffix.lower()
        if suffix in CAPTION_EXTENSIONS and path.with_suffix("") in owners:
            continue  # a sidecar
        if suffix not in IMAGE_EXTENSIONS and path.is_symlink() and not path.exists():  # to a file or a folder
            problem, detail = "unreadable", "a broken symlink"
        elif suffix not in IMAGE_EXTENSIONS:
            problem = "not an image" if suffix in CAPTION_EXTENSIONS else "unsupported file type"
            detail = (f"a caption file with no image named {path.stem}.*" if suffix in CAPTION_EXTENSIONS
                      else f"use {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}")
        else:
            problem, detail, size = _probe(path)
            if problem is None:
                try:
                    text, sidecar = _caption(sidecars(path), caption, token, warn, root)
                    records.append(ImageRecord(path, text, size, sidecar=sidecar))
                    continue
                except OSError as e:  # training it under the default prompt instead would be silently wrong
                    problem, detail = "unreadable caption", f"{Path(e.filename).name}: {e.strerror}"
        problems[problem] += 1
        warn(f"warning: skipped {path.relative_to(root).as_posix()}: {problem} ({detail})")
    skipped = sum(problems.values())
    if skipped:
        kinds, used = ", ".join(f"{n} {kind}" for kind, n in sorted(problems.items())), len(records)
        warn(f"warning: skipped {skipped} of {used + skipped} files ({kinds}); "
             f"using {used} image{'s' * (used != 1)}")
    if not records:
        listed = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(f"{root}: the folder is empty; put the training images ({listed}) in it")
        raise DatasetError(f"{root}: no usable image among {skipped} files (looked for {listed}, in any case)")
    return records


def fingerprint(folder: str | os.PathLike, *, exclude: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
    """What a run trains on, cheaply, to tell a moved images folder from a changed one: {relative path of each
    image file: "<size in bytes>", or "<size> <digest of its caption>" when a sidecar gives it one}. The files and
    sidecars are those scan_images finds (same walk, same exclusions, same choice of sidecar, caption as read), but
    nothing is decoded, so a file it would skip as corrupt counts too, and an image replaced by another of the very
    same byte size goes unnoticed. No modification times: copying a folder changes them. Paths are relative, with
    "/", and keep bytes that are not UTF-8 (as surrogates): the same on every process and machine. {} when the
    folder does not exist."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return {}
    files = _walk(root, exclude)
    sidecars = _sidecars(files)
    found = {}
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            entry = str(path.stat().st_size)
        except OSError:  # a broken link: scan_images skips it
            entry = "unreadable"
        try:
            caption, sidecar = _caption(sidecars(path), "", None)
            if sidecar is not None:
                entry += " " + hashlib.sha256(caption.encode()).hexdigest()[:16]
        except OSError:
            entry += " unreadable caption"
        found[path.relative_to(root).as_posix()] = entry
    return found


def _walk(root: Path, skip: Collection[str | os.PathLike] = ()) -> list[Path]:
    """Files under root, sorted by relative path, as seen under root; hidden files and folders left out, and every
    folder that is a `skip` folder or lies under one, by resolved path (skipping root or an ancestor skips nothing).
    Links to folders are followed, but not to root or an ancestor (`..` or `~` would pull in every sibling folder),
    and each real folder is read once: through its own path when root holds it without a link, else through the
    first link the walk meets (top-down, by name). Links to files, and broken links, are listed as files."""
    top = root.resolve()
    out = {s for s in (Path(f).expanduser().resolve() for f in skip) if s != top and s not in top.parents}
    claimed: dict[Path, Path | None] = {**dict.fromkeys(top.parents), top: root}  # None: never read

    def keep(folder: Path, follow: bool) -> bool:
        real = folder.resolve()
        return ((follow or not folder.is_symlink()) and not out.intersection((real, *real.parents))
                and claimed.setdefault(real, folder) == folder)

    def walk(follow: bool) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=follow):
            dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and keep(Path(dirpath) / d, follow)]
            found += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
        return found

    walk(follow=False)  # claims the folders reached without crossing a link
    return sorted(walk(follow=True), key=lambda p: p.relative_to(root).as_posix())


def _probe(path: Path) -> tuple[str | None, str, tuple[int, int]]:
    """(problem, detail, size): problem is None for a usable image. Decodes the whole file to catch truncation."""
    try:
        if path.stat().st_size == 0:
            return "empty file", "0 bytes", (0, 0)
        image = load_image(path)
    except UnidentifiedImageError:
        return "not an image", "its contents are not a known image format", (0, 0)
    except (PermissionError, IsADirectoryError, FileNotFoundError) as e:
        broken = path.is_symlink() and not path.exists()
        return "unreadable", "a broken symlink" if broken else e.strerror or type(e).__name__, (0, 0)
    except Image.DecompressionBombError as e:
        return "image too large", one_line(e), (0, 0)
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        return "corrupt image", one_line(e), (0, 0)
    return None, "", image.size


def read_caption(image_path: str | os.PathLike, default: str, token: str | None = None,
                 warn: Warn | None = None) -> str:
    """The caption for an image: its sidecar, else `default`; the trigger token is prepended when the caption lacks
    it. A sidecar is `name.txt` or `name.caption`, or, as some captioning tools write, the full image name plus one
    of these (`name.png.txt`); the extension in any case (`name.TXT`). Whitespace (newlines included) collapses to
    single spaces, and a leading byte-order mark (as Notepad writes) is dropped. Bytes that are not UTF-8 become
    U+FFFD, with one warning line through `warn` (none by default). A sidecar that cannot be read raises OSError
    with its path as `filename`."""
    path = Path(image_path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        names = []
    candidates = [path.parent / n for n in names if Path(n).stem in (path.stem, path.name)
                  and Path(n).suffix.lower() in CAPTION_EXTENSIONS]
    return _caption(candidates, default, token, warn)[0]


def _sidecars(files: Sequence[Path]) -> Callable[[Path], list[Path]]:
    """image path -> the caption files among `files` that may be its sidecar: name.txt and name.png.txt (any case of
    .txt or .caption); _caption picks one."""
    found: dict[Path, list[Path]] = {}
    for f in files:
        if f.suffix.lower() in CAPTION_EXTENSIONS:
            found.setdefault(f.with_suffix(""), []).append(f)
    return lambda image: found.get(image.with_suffix(""), []) + found.get(image, [])


def _caption(candidates: Sequence[Path], default: str, token: str | None, warn: Warn | None = None,
             root: Path | None = None) -> tuple[str, Path | None]:
    """read_caption given the image's sidecars, and the sidecar used (None for the default): the first non-empty one
    in preference order (name.txt, then name.png.txt; within each, .txt before .caption; among case variants of
    one extension, the lower-case one, then the others sorted by name). Warnings name the sidecar relative to
    `root`."""
    for sidecar in sorted(candidates, key=_sidecar_rank):
        if sidecar.is_file():
            try:
                text = sidecar.read_bytes().decode("utf-8-sig", errors="surrogateescape")
            except OSError as e:
                raise OSError(e.errno, e.strerror or type(e).__name__, str(sidecar)) from e
            bad = sum("\udc80" <= c <= "\udcff" for c in text)  # one lone surrogate per byte that is not UTF-8
            if bad and warn:
                name = sidecar.relative_to(root).as_posix() if root else str(sidecar)
                warn(f"warning: {name}: not UTF-8; {bad} byte{'s' * (bad > 1)} replaced with U+FFFD "
                     "(save it as UTF-8)")
            caption = " ".join(valid_text(text).split())
            if caption:
                return with_token(caption, token), sidecar
    return with_token(" ".join(default.split()), token), None


def _sidecar_rank(sidecar: Path) -> tuple[int, int, bool, str]:
    """For one image's sidecars, the shorter stem is name.txt's, which goes before name.png.txt."""
    suffix = sidecar.suffix
    return len(sidecar.stem), CAPTION_EXTENSIONS.index(suffix.lower()), suffix != suffix.lower(), sidecar.name


def with_token(caption: str, token: str | None) -> str:
    """Prepend the token unless the caption already holds it as a whole word (case-insensitive, as CLIP's
    tokenizer lower-cases anyway)."""
    if not token:
        return caption
    if re.search(rf"(?<![\w]){re.escape(token)}(?![\w])", caption, flags=re.IGNORECASE):
        return caption
    return f"{token}, {caption}" if caption else token


def tag_frequency(records: Sequence[ImageRecord], root: str | os.PathLike) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: {folder name: {comma-separated tag: count}}."""
    counts: dict[str, Counter] = {}
    root = Path(root)
    for record in records:
        try:
            group = record.path.parent.relative_to(root).as_posix()
        except ValueError:
            group = record.path.parent.name
        group = root.name if group == "." else group
        tags = (t.strip() for t in record.caption.split(","))
        counts.setdefault(group, Counter()).update(t for t in tags if t)
    return {group: dict(c) for group, c in counts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Image normalisation


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB, upright: EXIF orientation applied, transparency flattened onto white,
    palette, grayscale, CMYK and 16-bit images converted."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _gray_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int/float) grayscale to 8 bits by scaling, where Pillow's convert would clip at 255."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:
        top = 65535.0
    return Image.fromarray(np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8), mode="L")
