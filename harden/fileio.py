"""Atomic output files: a temp file in the target folder, fsync, then rename.

A run that fails or is interrupted never leaves a half-written output, and an output path that
names one of the inputs is refused before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output that would overwrite an input or land in a missing folder."""
    out = Path(output)
    for inp in inputs:
        if inp is None:
            continue
        p = Path(inp)
        if p.exists() and out.exists() and os.path.samefile(p, out):
            raise InputError(f"output path {out} is the input {p}; choose another output")
        if out.resolve() == p.resolve():
            raise InputError(f"output path {out} is the input {p}; choose another output")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist")
    if out.is_dir():
        raise InputError(f"output path {out} is a folder")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
