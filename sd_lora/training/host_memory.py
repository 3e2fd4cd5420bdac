"""Host-memory allocator settings for training on the CPU.

glibc serves an allocation above its mmap threshold (128 KiB at start, rising to at most 32 MiB) with a fresh mmap()
and gives it back to the kernel on free. A training step allocates and frees hundreds of activation and gradient
buffers of 1-100 MB, so every step faults all of them in again and the kernel zeroes every page: for the SD1.5 UNet at
a 32x32 latent that was about a fifth of a CPU step on the development machine (bench/RESULTS.md, train_step).
Raising the mmap and trim thresholds keeps freed memory in the heap, where the next step reuses it. The peak is the
same buffers, so peak memory barely moves; what changes is that the process keeps its peak until it exits.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # allocations up to 1 GiB come from the heap (mallopt takes an int)
TRIM_THRESHOLD = (1 << 31) - 1  # and freed memory stays there for the next step


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl has mallopt but no malloc_trim)
        return None
    return libc


def keep_freed_memory() -> bool:
    """Keep freed memory in the heap for reuse (see the module docstring). Process-wide, and only where the C library
    is glibc; returns whether it took effect."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Hand the heap's free memory back to the kernel (after training, so a long-lived process shrinks again)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
