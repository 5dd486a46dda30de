"""glibc malloc settings for a harden process, which allocates and frees large numpy arrays.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB on 64-bit),
so later large arrays come from the heap, whose freed pages stay with the process, and each
thread that allocates may get an arena of its own. A fixed trim threshold (which also stops the
threshold raising, as `MALLOC_TRIM_THRESHOLD_` does), the mmap threshold back at glibc's start
value, and two arenas: ResNet-50's `apply` peaked at 1,776 MB against 2,285 MB with glibc's
defaults, but took 152 s against 122 s (every large temporary array is mapped and unmapped
again; an mmap threshold of 4 MB kept the time, 134 s, and not the memory, 2,181 MB;
docs/results.md). So it is opt-in: `HARDEN_LOW_MEMORY=1`, read by the CLI once before any work;
a user's own `MALLOC_*` environment wins. Since FAQ's low-rank statistics (harden.lowrank) and
`release_memory` below (always on) it gains little: 1,324 against 1,383 MB at 146 against 124 s.
Python has no API for this (ctypes calls mallopt); musl and non-Linux hosts keep their
allocator as it is."""

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
ENV = "HARDEN_LOW_MEMORY"


def tune_allocator(force: bool = False) -> bool:
    """Apply the settings above to this process when `HARDEN_LOW_MEMORY=1` (or `force`); False
    when they are not asked for or do not apply here."""
    if not (force or os.environ.get(ENV) == "1"):
        return False
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt in this libc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(option, value) for option, value in
               ((M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_ARENA_MAX, ARENA_MAX)))


_TRIM = None


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc `malloc_trim`; a no-op elsewhere).

    Called between a run's large steps (after each pass, each clip-search candidate, each FAQ
    stage, before apply's campaign): onnxruntime's quantizer and session builds leave hundreds of MB freed but kept by
    the allocator (ResNet-50's clip search: 1,299 MB resident, 603 MB of it live), which the
    next step's large arrays, mapped afresh, do not reuse. Peak of ResNet-50's apply 1,445 ->
    1,357 MB, resident at the end 1,196 -> 855 MB (docs/results.md); a call costs milliseconds."""
    global _TRIM
    if _TRIM is None:
        try:
            trim = ctypes.CDLL(None).malloc_trim
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            _TRIM = trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)
