"""Atomic writes: every file sd_lora writes goes to a temp file beside its target, is fsynced, then renamed over it.

A crash or a kill at any moment leaves either the old file or the new one, never half of one, and a failed write
removes its temp file. The temp file is created with the usual mode (0666 minus the umask, applied by the kernel):
mkstemp's 0600 would make saved adapters and checkpoints unreadable to anyone else, and reading the umask means
setting it, which races with other threads (the UI writes from several requests at once).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _create(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty file with a random hidden name beside `name`, opened for writing: (fd, path)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def make_parents(path: Path) -> list[Path]:
    """Create `path`'s missing parent folders; returns them, deepest first, for `remove_empty` after a failure."""
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Undo `make_parents`: remove the folders it made, deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: renamed over it when the block ends; on any error the temp file and
    the folders made for it are removed."""
    path = Path(path)
    created, tmp = make_parents(path), None
    try:
        fd, tmp = _create(path.parent, path.name)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        remove_empty(created)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as f:
        f.write(data)
