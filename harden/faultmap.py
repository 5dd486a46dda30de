"""Fault maps of accelerator weight memory: the HFM1 format, CSV import, generators.

A fault map lists the *faulty words* of a chip's weight memory. Each record is an address and
two masks: `sa0` (bits stuck at 0) and `sa1` (bits stuck at 1). A word reads back as
`(stored & ~sa0) | sa1`. HFM1 (DESIGN.md, binding) is little-endian:

    offset 0   magic b"HFM1"      4   version u16 = 1    6  word_bits u16 = 8
    offset 8   num_words u64      16  num_records u64    24 meta_len u32   28 crc32 u32
    offset 32  addresses u64[n] (strictly increasing, < num_words), sa0 u8[n], sa1 u8[n],
               meta (UTF-8 JSON object, meta_len bytes)

The CRC-32 (zlib) covers every byte after the 32-byte header, and the file is exactly as long
as the header implies. `from_bytes` checks every rule before it trusts a field, and names the
file, the byte offset and the rule in one line when something is wrong.

Memory BIST tools report faults as CSV with the header `address,bit,stuck` (bit 0 = LSB,
stuck 0 or 1); `faultmap_from_csv` groups those cells into records.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .fileio import atomic_write_bytes, atomic_write_text, read_input

MAGIC = b"HFM1"
VERSION = 1
WORD_BITS = 8
HEADER = struct.Struct("<4sHHQQII")  # magic, version, word_bits, num_words, num_records, meta_len, crc32
HEADER_SIZE = HEADER.size  # 32
CSV_HEADER = "address,bit,stuck"

__all__ = [
    "FaultMap",
    "read_back",
    "to_bytes",
    "from_bytes",
    "write_faultmap",
    "read_faultmap",
    "faultmap_from_csv",
    "faultmap_to_csv",
    "generate_uniform",
]


def _popcount(masks: np.ndarray) -> int:
    return int(np.unpackbits(np.asarray(masks, dtype=np.uint8)).sum(dtype=np.int64))


def _first_record_problem(
    addresses: np.ndarray, sa0: np.ndarray, sa1: np.ndarray, num_words: int
) -> tuple[int, str, str] | None:
    """The first record that breaks a rule: (index, field 'address'|'masks', rule), or None."""
    bad_order = np.zeros(addresses.shape, dtype=bool)
    bad_order[1:] = addresses[1:] <= addresses[:-1]
    bad_addr = bad_order | (addresses >= np.uint64(num_words))
    bad_mask = ((sa0 & sa1) != 0) | ((sa0 | sa1) == 0)
    bad = np.flatnonzero(bad_addr | bad_mask)
    if bad.size == 0:
        return None
    i = int(bad[0])
    a = int(addresses[i])
    if bad_order[i]:
        prev = int(addresses[i - 1])
        if a == prev:
            what = f"duplicate address {a}"
        else:
            what = f"address {a} is not greater than the previous address {prev}"
        return i, "address", f"{what} (addresses must be strictly increasing)"
    if bad_addr[i]:
        return i, "address", f"address {a} is out of range (must be < num_words = {num_words})"
    if sa0[i] & sa1[i]:
        both = int(sa0[i] & sa1[i])
        return i, "masks", (
            f"record {i} (address {a}) has bits 0x{both:02x} stuck at both 0 and 1 (sa0 & sa1 must be 0)"
        )
    return i, "masks", f"record {i} (address {a}) has no stuck bit (sa0 | sa1 must not be 0)"


def _meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True, eq=False)
class FaultMap:
    """The stuck-at faults of one chip's weight memory (one record per faulty word)."""

    num_words: int
    addresses: np.ndarray  # uint64, strictly increasing, < num_words
    sa0: np.ndarray  # uint8 masks, bits stuck at 0
    sa1: np.ndarray  # uint8 masks, bits stuck at 1
    meta: dict = field(default_factory=dict)
    word_bits: int = WORD_BITS
    # The metadata bytes exactly as read from a file, so that re-writing a map (and its CRC)
    # reproduces the file even when another tool formatted the JSON differently.
    _raw_meta: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.word_bits != WORD_BITS:
            raise ValueError(f"word_bits must be {WORD_BITS} in HFM1 version 1, got {self.word_bits}")
        if not isinstance(self.num_words, (int, np.integer)) or not 1 <= int(self.num_words) < 2**64:
            raise ValueError(f"num_words must be an integer in [1, 2**64), got {self.num_words!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        object.__setattr__(self, "num_words", int(self.num_words))
        for name, dtype in (("addresses", np.uint64), ("sa0", np.uint8), ("sa1", np.uint8)):
            arr = np.asarray(getattr(self, name))
            if arr.ndim != 1:
                raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
            if arr.size and arr.dtype.kind not in "ui":
                raise ValueError(f"{name} must hold integers, got {arr.dtype}")
            if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
                raise ValueError(f"{name} must be in [0, {np.iinfo(dtype).max}]")
            arr = np.array(arr, dtype=dtype)  # an owned, native-order copy
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        if not self.addresses.shape == self.sa0.shape == self.sa1.shape:
            raise ValueError("addresses, sa0 and sa1 must have the same length")
        problem = _first_record_problem(self.addresses, self.sa0, self.sa1, self.num_words)
        if problem is not None:
            raise ValueError(f"record {problem[0]}: {problem[2]}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FaultMap):
            return NotImplemented
        return (
            (self.num_words, self.word_bits, self.meta) == (other.num_words, other.word_bits, other.meta)
            and np.array_equal(self.addresses, other.addresses)
            and np.array_equal(self.sa0, other.sa0)
            and np.array_equal(self.sa1, other.sa1)
        )

    @property
    def num_records(self) -> int:
        """Faulty words listed."""
        return int(self.addresses.size)

    @property
    def faulty_cells(self) -> int:
        """Faulty bit cells (each record has one or more)."""
        return _popcount(self.sa0 | self.sa1)

    @property
    def rate(self) -> float:
        """Fault rate: faulty bit cells / (num_words * word_bits)."""
        return self.faulty_cells / (self.num_words * self.word_bits)

    @property
    def crc32(self) -> int:
        """CRC-32 of the body as `to_bytes` writes it (the header's crc32 field)."""
        return zlib.crc32(_body(self))

    @property
    def chip_id(self) -> str | None:
        """meta["chip_id"], or None."""
        return self.meta.get("chip_id")

    def summary(self) -> dict[str, Any]:
        """Figures for `faultmap show` and the report (JSON-serialisable)."""
        faulty = self.sa0 | self.sa1
        per_bit = np.unpackbits(faulty[:, None], axis=1, bitorder="little").sum(axis=0, dtype=np.int64)
        return {
            "num_words": self.num_words,
            "word_bits": self.word_bits,
            "num_records": self.num_records,
            "faulty_cells": int(per_bit.sum()),
            "rate": self.rate,
            "stuck_at_0": _popcount(self.sa0),
            "stuck_at_1": _popcount(self.sa1),
            "faulty_cells_per_bit": [int(c) for c in per_bit],  # LSB first
            "crc32": self.crc32,
            "chip_id": self.chip_id,
            "meta": dict(self.meta),
        }

    def masks_at(self, addresses: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(is_faulty, sa0, sa1) for arbitrary query addresses (any shape; addresses not in
        the map get zero masks)."""
        q = np.asarray(addresses)
        if q.dtype.kind not in "ui":
            raise ValueError(f"addresses must be integers, got {q.dtype}")
        if q.dtype.kind == "i" and q.size and q.min() < 0:
            raise ValueError("addresses must not be negative")
        q = q.astype(np.uint64, copy=False)
        if self.num_records == 0:
            z = np.zeros(q.shape, dtype=np.uint8)
            return np.zeros(q.shape, dtype=bool), z, z.copy()
        idx = np.minimum(np.searchsorted(self.addresses, q), self.num_records - 1)
        hit = self.addresses[idx] == q
        zero = np.uint8(0)
        return hit, np.where(hit, self.sa0[idx], zero), np.where(hit, self.sa1[idx], zero)


def read_back(stored_u8: np.ndarray, sa0: np.ndarray, sa1: np.ndarray) -> np.ndarray:
    """What a word reads back as through its stuck cells: (stored & ~sa0) | sa1.

    uint8 in, uint8 out; int8 codes are accepted too and come back as int8 (same bits).
    """
    stored = np.asarray(stored_u8)
    if stored.dtype not in (np.uint8, np.int8):
        raise ValueError(f"stored words must be uint8 or int8, got {stored.dtype}")
    out = (stored.view(np.uint8) & ~np.asarray(sa0, dtype=np.uint8)) | np.asarray(sa1, dtype=np.uint8)
    return out.view(stored.dtype)


# --- HFM1 bytes -------------------------------------------------------------------------


def _meta_for_write(fm: FaultMap) -> bytes:
    raw = fm._raw_meta
    if raw is not None and json.loads(raw) == fm.meta:  # meta may have been mutated in place
        return raw
    return _meta_bytes(fm.meta)


def _body(fm: FaultMap) -> bytes:
    return b"".join(
        (fm.addresses.astype("<u8").tobytes(), fm.sa0.tobytes(), fm.sa1.tobytes(), _meta_for_write(fm))
    )


def to_bytes(fm: FaultMap) -> bytes:
    """The HFM1 file for `fm`."""
    body = _body(fm)
    meta_len = len(body) - 10 * fm.num_records
    header = HEADER.pack(MAGIC, VERSION, fm.word_bits, fm.num_words, fm.num_records, meta_len, zlib.crc32(body))
    return header + body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def from_bytes(data: bytes, source: str = "<bytes>") -> FaultMap:
    """Parse and fully validate an HFM1 file; InputError names source, offset and rule."""

    def fail(offset: int, rule: str) -> InputError:
        return InputError(f"{source}: offset {offset}: {rule}")

    data = bytes(data)
    size = len(data)
    if size < HEADER_SIZE:
        raise fail(size, f"file truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, word_bits, num_words, n, meta_len, crc = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise fail(0, f"bad magic {magic!r} (expected {MAGIC!r}): not an HFM1 fault map")
    if version != VERSION:
        raise fail(4, f"unsupported version {version} (this reader knows version {VERSION})")
    if word_bits != WORD_BITS:
        raise fail(6, f"word_bits is {word_bits} (version 1 requires {WORD_BITS})")
    if num_words == 0:
        raise fail(8, "num_words is 0 (a memory has at least one word)")
    if n > num_words:
        raise fail(16, f"num_records {n} exceeds num_words {num_words} (at most one record per word)")
    # Python ints: an absurd num_records is caught here, before anything is allocated.
    expected = HEADER_SIZE + n * (8 + 2 * word_bits // 8) + meta_len
    if size < expected:
        raise fail(size, f"file truncated: the header implies {expected} bytes "
                         f"({n} records, {meta_len} metadata bytes), the file has {size}")
    if size > expected:
        raise fail(expected, f"{size - expected} trailing bytes after the end implied by the header "
                             f"({n} records, {meta_len} metadata bytes)")
    actual = zlib.crc32(memoryview(data)[HEADER_SIZE:])
    if actual != crc:
        raise fail(28, f"CRC-32 mismatch: header says 0x{crc:08x}, body has 0x{actual:08x} (file corrupted)")

    off_sa0 = HEADER_SIZE + 8 * n
    off_sa1 = off_sa0 + n
    off_meta = off_sa1 + n
    addresses = np.frombuffer(data, dtype="<u8", count=n, offset=HEADER_SIZE)
    sa0 = np.frombuffer(data, dtype=np.uint8, count=n, offset=off_sa0)
    sa1 = np.frombuffer(data, dtype=np.uint8, count=n, offset=off_sa1)
    problem = _first_record_problem(addresses, sa0, sa1, num_words)
    if problem is not None:
        i, where, rule = problem
        raise fail(HEADER_SIZE + 8 * i if where == "address" else off_sa0 + i, rule)

    raw_meta = data[off_meta:]
    try:
        text = raw_meta.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(off_meta + exc.start, "metadata is not valid UTF-8") from None
    try:
        meta = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        at = off_meta + len(text[: exc.pos].encode())
        raise fail(at, f"metadata is not valid JSON ({exc.msg})") from None
    except ValueError as exc:
        raise fail(off_meta, f"metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise fail(off_meta, f"metadata must be a JSON object, got {type(meta).__name__}")

    fm = FaultMap(num_words=num_words, addresses=addresses, sa0=sa0, sa1=sa1, meta=meta, word_bits=word_bits)
    object.__setattr__(fm, "_raw_meta", raw_meta)
    return fm


def write_faultmap(fm: FaultMap, path: str | os.PathLike) -> None:
    """Write `fm` as HFM1, atomically."""
    atomic_write_bytes(path, to_bytes(fm))


def is_csv_bytes(data: bytes) -> bool:
    """Whether a map's bytes start with the CSV header (BOM and surrounding spaces allowed)."""
    return data[:64].split(b"\n", 1)[0].strip().removeprefix(b"\xef\xbb\xbf") == CSV_HEADER.encode()


def is_csv_map(path: str | os.PathLike) -> bool:
    """Whether the file is a CSV map (read once the memory size is known); anything unreadable
    is not, so that read_faultmap produces the error message."""
    try:
        with open(path, "rb") as fh:
            return is_csv_bytes(fh.read(64))
    except OSError:
        return False


def read_faultmap(path: str | os.PathLike, num_words: int | None = None) -> FaultMap:
    """Read an HFM1 file, or a CSV (`address,bit,stuck`; needs num_words), by its content."""
    return faultmap_from_bytes(read_input(path, "a fault map"), str(path), num_words)


def faultmap_from_bytes(data: bytes, source: str, num_words: int | None = None) -> FaultMap:
    """An HFM1 or CSV map from its bytes (`source` names it in errors): what a fleet's worker
    gets, so that workers need no shared file system."""
    if data.startswith(MAGIC):
        fm = from_bytes(data, source=source)
        if num_words is not None and num_words != fm.num_words:
            raise InputError(f"{source}: the map has {fm.num_words} words, but --words {num_words} was given")
        return fm
    if is_csv_bytes(data):
        if num_words is None:
            raise InputError(f"{source}: a CSV fault map does not say how big the memory is; pass --words N")
        return _parse_csv(data, num_words, None, source)
    raise InputError(
        f"{source}: offset 0: not an HFM1 fault map (bad magic {data[:4]!r}; "
        f"expected {MAGIC!r} or a CSV with the header '{CSV_HEADER}')"
    )


# --- CSV ---------------------------------------------------------------------------------

_CSV_LINE = re.compile(r"\s*-?\d+\s*,\s*-?\d+\s*,\s*-?\d+\s*")


def faultmap_from_csv(path: str | os.PathLike, num_words: int, meta: dict | None = None) -> FaultMap:
    """Read a memory-BIST CSV (`address,bit,stuck`) into a FaultMap of num_words words."""
    return _parse_csv(read_input(path, "a fault map"), num_words, meta, str(path))


def _parse_csv(data: bytes, num_words: int, meta: dict | None, source: str) -> FaultMap:
    if not isinstance(num_words, (int, np.integer)) or not 1 <= num_words < 2**63:
        raise InputError(f"{source}: the number of words must be a positive integer, got {num_words!r}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: offset {exc.start}: not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != CSV_HEADER:
        got = lines[0][:60] if lines else ""
        raise InputError(f"{source}: line 1: the header must be exactly '{CSV_HEADER}', got {got!r}")
    line_no = np.array([i + 1 for i, line in enumerate(lines) if i and line.strip()], dtype=np.int64)
    body = "\n".join(lines[i - 1] for i in line_no)
    if line_no.size:
        try:
            rows = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.int64, ndmin=2, comments=None)
        except ValueError as exc:
            raise _csv_syntax_error(lines, line_no, source, exc) from None
        if rows.shape[1] != 3:
            raise _csv_syntax_error(lines, line_no, source, ValueError(f"{rows.shape[1]} columns"))
    else:
        rows = np.empty((0, 3), dtype=np.int64)
    address, bit, stuck = rows[:, 0], rows[:, 1], rows[:, 2]

    for bad, rule in (
        ((address < 0) | (address >= num_words), f"address out of range (must be in [0, {num_words}))"),
        ((bit < 0) | (bit >= WORD_BITS), f"bit out of range (must be in [0, {WORD_BITS}), 0 = LSB)"),
        ((stuck != 0) & (stuck != 1), "stuck must be 0 or 1"),
    ):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"{source}: line {line_no[i]}: {rule}: {lines[line_no[i] - 1].strip()!r}")

    order = np.lexsort((stuck, bit, address))
    a, b, s = address[order], bit[order], stuck[order]
    same_cell = (a[1:] == a[:-1]) & (b[1:] == b[:-1])
    conflict = np.flatnonzero(same_cell & (s[1:] != s[:-1]))
    if conflict.size:  # report the conflict whose second listing comes first in the file
        la, lb = line_no[order[conflict]], line_no[order[conflict + 1]]
        j = int(np.argmin(np.maximum(la, lb)))
        c = conflict[j]
        raise InputError(
            f"{source}: line {max(la[j], lb[j])}: address {a[c]} bit {b[c]} is listed as stuck at both 0 and 1 "
            f"(also on line {min(la[j], lb[j])})"
        )
    keep = np.ones(a.shape, dtype=bool)
    keep[1:] = ~same_cell  # duplicates of the same cell with the same value merge
    a, b, s = a[keep], b[keep], s[keep]

    words, sa0, sa1 = _group_cells(a, b, s == 1)
    return FaultMap(int(num_words), words, sa0, sa1, dict(meta or {}))


def _group_cells(word: np.ndarray, bit: np.ndarray, stuck1: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct faulty cells sorted by word -> (addresses, sa0, sa1), one record per word."""
    bitval = np.left_shift(1, bit).astype(np.uint8)
    if not word.size:
        return word.astype(np.uint64), bitval, bitval.copy()
    starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
    zero = np.uint8(0)
    sa0 = np.bitwise_or.reduceat(np.where(stuck1, zero, bitval), starts)
    sa1 = np.bitwise_or.reduceat(np.where(stuck1, bitval, zero), starts)
    return word[starts].astype(np.uint64), sa0, sa1


def _csv_syntax_error(lines: list[str], line_no: np.ndarray, source: str, exc: ValueError) -> InputError:
    """Find the line numpy could not parse (error path only, so a Python loop is fine)."""
    for n in line_no:
        line = lines[n - 1]
        # strip() first: \s (and numpy) take blanks such as \x1f that int() refuses
        if not _CSV_LINE.fullmatch(line) or any(abs(int(v.strip())) >= 2**63 for v in line.split(",")):
            got = line.strip()[:60]
            return InputError(f"{source}: line {n}: expected three integers 'address,bit,stuck', got {got!r}")
    return InputError(f"{source}: cannot parse the CSV: {exc}")


def faultmap_to_csv(fm: FaultMap) -> str:
    """The map as `address,bit,stuck` CSV, one line per faulty cell (by address, then bit)."""
    rows = []
    for stuck, masks in ((0, fm.sa0), (1, fm.sa1)):
        rec, bit = np.nonzero(np.unpackbits(masks[:, None], axis=1, bitorder="little"))
        stuck_col = np.full(rec.shape, stuck, np.uint64)
        rows.append(np.stack([fm.addresses[rec], bit.astype(np.uint64), stuck_col], axis=1))
    table = np.concatenate(rows)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]
    out = io.StringIO()
    out.write(CSV_HEADER + "\n")
    np.savetxt(out, table, fmt="%d", delimiter=",")
    return out.getvalue()


def write_faultmap_csv(fm: FaultMap, path: str | os.PathLike) -> None:
    """Write `fm` as CSV, atomically (the metadata is not kept)."""
    atomic_write_text(path, faultmap_to_csv(fm))


# --- generators --------------------------------------------------------------------------


def _sample_without_replacement(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    """k distinct sorted ints in [0, population), uniformly, in O(k) memory (k <= population/2):
    draw with replacement, drop repeats, top up. Any label-symmetric procedure like this yields
    a uniform k-subset."""
    chosen = np.empty(0, dtype=np.int64)
    while chosen.size < k:
        draw = rng.integers(0, population, size=k - chosen.size, dtype=np.int64)
        merged = np.sort(np.concatenate((chosen, draw)))  # sort-based: np.unique is slow in numpy 2.4
        chosen = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]
    return chosen


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def generate_uniform(
    num_words: int, rate: float, seed: int, meta: dict | None = None, p_sa1: float = 0.5
) -> FaultMap:
    """A simulated chip: each of the num_words*8 bit cells is faulty with probability `rate`,
    independently; a faulty cell is stuck at 1 with probability p_sa1, else at 0.

    Only the faulty cells are drawn (a binomial count, then distinct positions), so a large,
    sparsely faulty memory costs memory in proportion to its faults. Deterministic per seed.
    """
    if not _is_int(num_words) or not 1 <= num_words <= 2**56:
        raise InputError(f"the number of words must be an integer in [1, 2**56], got {num_words!r}")
    if not isinstance(rate, (int, float, np.floating)) or not 0.0 <= rate <= 1.0:
        raise InputError(f"the fault rate must be in [0, 1], got {rate!r}")
    if not isinstance(p_sa1, (int, float, np.floating)) or not 0.0 <= p_sa1 <= 1.0:
        raise InputError(f"the stuck-at-1 fraction must be in [0, 1], got {p_sa1!r}")
    if not _is_int(seed) or seed < 0:
        raise InputError(f"the seed must be a non-negative integer, got {seed!r}")
    num_words, rate, seed = int(num_words), float(rate), int(seed)
    rng = np.random.default_rng(seed)
    cells = num_words * WORD_BITS
    count = int(rng.binomial(cells, rate))
    if count <= cells // 2:
        faulty = _sample_without_replacement(rng, cells, count)
    else:  # dense: draw the healthy cells instead
        mask = np.ones(cells, dtype=bool)
        mask[_sample_without_replacement(rng, cells, cells - count)] = False
        faulty = np.flatnonzero(mask)
    stuck1 = rng.random(count) < p_sa1
    words, sa0, sa1 = _group_cells(faulty // WORD_BITS, faulty % WORD_BITS, stuck1)
    full_meta = {"chip_id": f"sim-{seed}", **(meta or {}), "generator": "uniform", "rate": rate, "seed": seed}
    if p_sa1 != 0.5:
        full_meta["p_sa1"] = float(p_sa1)
    return FaultMap(num_words, words, sa0, sa1, full_meta)
