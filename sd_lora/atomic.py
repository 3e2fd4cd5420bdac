"""Atomic writes: every file sd_lora writes goes to a temp file beside its target, is fsynced, then renamed over it.

A crash or a kill at any moment leaves either the old file or the new one, never half of one, and a failed write
removes its temp file. The rename keeps the usual mode (0666 minus the umask): mkstemp's 0600 would make saved
adapters and checkpoints unreadable to anyone else.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())
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
