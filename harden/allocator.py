"""glibc malloc settings for a harden process, which allocates and frees large numpy arrays.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB on 64-bit),
so later large arrays come from the heap, whose freed pages stay with the process, and each
thread that allocates may get an arena of its own. A fixed trim threshold (which also stops the
threshold raising, as `MALLOC_TRIM_THRESHOLD_` does), the mmap threshold back at glibc's start
value, and two arenas: ResNet-50's `apply` peaked
at 1,715 MB against 2,233 MB with glibc's defaults (docs/results.md). Set from the CLI only, once,
before any work; a user's own `MALLOC_*` environment wins. Python has no API for this (ctypes
calls mallopt); musl and non-Linux hosts keep their allocator as it is."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
TRIM_THRESHOLD = 16 << 20
MMAP_THRESHOLD = 128 << 10  # glibc's initial value, which loading a model has raised by now
ARENA_MAX = 2


def tune_allocator() -> bool:
    """Apply the settings above to this process; False when they do not apply here."""
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt in this libc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) for option, value in
               ((M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_ARENA_MAX, ARENA_MAX)))
