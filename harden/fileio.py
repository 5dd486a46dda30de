"""Atomic output files: a temp file in the target folder, fsync, then rename.

A run that fails or is interrupted never leaves a half-written output, and an output path that
names one of the inputs is refused before any work starts. A command with several outputs (model,
report, summary) writes them all to temp files first and then renames them with SIGINT and
SIGTERM held back (`atomic_write_many`), so an interrupt leaves either all of them or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError, OutputError


def read_input(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of an input file; a missing, folder or unreadable path is one InputError line."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not {what}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


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
    """Write `data` to `path` atomically (OutputError when the environment refuses)."""
    with output_errors(path), atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def deferred_signals(signums: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT / SIGTERM back for the duration of the block, then deliver them.

    Used around the renames that publish a command's outputs, so that Ctrl-C (or a CI runner
    cancelling the job) cannot land between two renames. Signal handlers can only be set from
    the main thread; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in signums:
        previous[signum] = signal.signal(signum, lambda num, _frame: pending.append(num))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)  # SIGINT -> KeyboardInterrupt under Python's default handler


@contextlib.contextmanager
def output_errors(path: str | os.PathLike) -> Iterator[None]:
    """An OSError while writing `path` (disk full, permission, read-only) becomes OutputError."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def atomic_write_many(items: Iterable[tuple[str | os.PathLike, bytes]]) -> None:
    """Write several files as one step: every temp file first, then all the renames.

    A failure or an interrupt before the renames leaves none of the targets touched and no temp
    file behind; the renames themselves run with SIGINT and SIGTERM deferred. A failing write
    (disk full, permission) is an OutputError naming the file.
    """
    items = list(items)
    with output_errors(", ".join(str(p) for p, _ in items[:3]) + (" ..." if len(items) > 3 else "")):
        _atomic_write_many(items)


def _atomic_write_many(items: list[tuple[str | os.PathLike, bytes]]) -> None:
    pending: list[tuple[Path, Path]] = []
    try:
        for path, data in items:
            target = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
            tmp_path = Path(tmp)
            pending.append((tmp_path, target))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())
        with deferred_signals():
            while pending:
                tmp_path, target = pending[0]
                os.replace(tmp_path, target)
                pending.pop(0)
    finally:
        for tmp_path, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()


def sha256_of(path: str | os.PathLike) -> str:
    """The file's SHA-256, read in 1 MiB blocks (reports record every input by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike | None) -> dict:
    """`{path, sha256}` of an input file, the way reports name their inputs ({} for none)."""
    if path is None:
        return {}
    return {"path": str(path), "sha256": sha256_of(path)}


def check_outputs(outputs: list[str | os.PathLike], inputs: list[str | os.PathLike | None]) -> None:
    """Every output must be new to this run: not an input, not another output, in a real folder.

    Linear in outputs + inputs (a fleet has thousands of each): inputs are resolved and stat'ed
    once; an output that already exists is also matched by (device, inode), which catches a
    hard link or another spelling of the same file."""
    real_inputs = [Path(p) for p in inputs if p is not None]
    resolved_inputs = {p.resolve(): p for p in real_inputs}
    inode_inputs = {(st.st_dev, st.st_ino): p for p in real_inputs if (st := _stat(p)) is not None}
    taken: set[Path] = set()
    for out in outputs:
        resolved = Path(out).resolve()
        if resolved in taken:
            raise InputError(f"output path {out} is also another output of this run; choose another path")
        st = _stat(Path(out))
        same = resolved_inputs.get(resolved) or (inode_inputs.get((st.st_dev, st.st_ino)) if st is not None else None)
        if same is not None:
            raise InputError(f"output path {out} is the input {same}; choose another output")
        check_output_path(out)  # the folder exists, the output is not a folder
        taken.add(resolved)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None
