"""The FAQ lookup table: for a word's fault pattern and a desired value, the best code to store.

A word with stuck bits reads back `read(v) = (v & ~sa0) | sa1`. FAQ (METHODS.md section 1)
stores, for every weight on a faulty word, the code whose read-back value is closest to the
value the model wants. We choose against the *float* target `t = w / scale` (in code units),
not against its rounded code.

Why a half-step grid is exact: the achievable read-back values of a pattern are integers, so the
nearest one to `t` only changes at midpoints between two integers, which are multiples of 0.5.
Every `t` in one half-step bin `[k/2, (k+1)/2)` therefore has the same answer, and a table of
`patterns x 512 bins` replaces the search over 256 codes. Bin centres sit on odd multiples of
0.25, so there are never ties.

The table stores the read-back value itself: `read(read(v)) == read(v)`, so storing the value
the chip will return anyway is both optimal and self-describing.

Speed (bench/bench_faq.py): the remap and the pattern scan walk the weight stream in blocks of
`_BLOCK` weights, so every temporary stays in the CPU cache instead of allocating (and
page-faulting) several arrays the size of the model. Each block is fully vectorised; the only
Python loop is over blocks (about 100 for a 25 M-weight model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NUM_BINS = 512  # half-step bins covering code units [-128, 128)
_CODES = np.arange(256, dtype=np.uint8)
_BLOCK = 1 << 18  # weights per block: temporaries of a few MiB, cache-resident
_ABSENT = np.int32(-(1 << 30))  # flat-table offset of a pattern key with no row: any index < 0


def pattern_keys(sa0: np.ndarray, sa1: np.ndarray) -> np.ndarray:
    """One uint16 key per word: sa0 in the low byte, sa1 in the high byte."""
    return sa0.astype(np.uint16) | (sa1.astype(np.uint16) << 8)


def _blocks(n: int):
    """(start, stop) spans of at most _BLOCK elements covering range(n)."""
    return ((s, min(n, s + _BLOCK)) for s in range(0, n, _BLOCK))


def _nearest_values(uniq: np.ndarray) -> np.ndarray:
    """(patterns, NUM_BINS) int8: for each pattern key and half-step bin, the nearest achievable
    read-back value to the bin's centre.

    Per pattern, mark which of the 256 values (shifted by +128) can be read back; a running
    max / min along each row gives the nearest achievable value at or below / at or above every
    integer. A bin centre c = k + 0.25 or k + 0.75 (shifted units, k = bin // 2) lies strictly
    between k and k + 1, so its candidates are below[k] and above[k + 1]; compare distances in
    quarter units (integers), never tied.
    """
    p = len(uniq)
    sa0 = (uniq & 0xFF).astype(np.uint8)[:, None]
    sa1 = (uniq >> 8).astype(np.uint8)[:, None]
    reads = ((_CODES[None, :] & ~sa0) | sa1).view(np.int8)  # (P, 256) achievable values
    achievable = np.zeros((p, 256), dtype=bool)
    achievable[np.arange(p)[:, None], reads.astype(np.intp) + 128] = True
    pos = np.arange(256, dtype=np.int16)
    far = np.int16(1024)  # farther from any centre than any real value
    below = np.maximum.accumulate(np.where(achievable, pos, -far), axis=1)
    above = np.minimum.accumulate(np.where(achievable, pos, far)[:, ::-1], axis=1)[:, ::-1]
    above = np.concatenate([above, np.full((p, 1), far, np.int16)], axis=1)  # above[256]: none
    b = np.arange(NUM_BINS)
    k = b // 2
    lo = below[:, k].astype(np.int32)
    hi = above[:, k + 1].astype(np.int32)
    c4 = 2 * b + 1  # 4 * centre
    best = np.where(c4 - 4 * lo < 4 * hi - c4, lo, hi) - 128
    return best.astype(np.int8)


@dataclass(frozen=True)
class FAQTable:
    """Nearest achievable value for each fault pattern present, at half-step resolution.

    `row_of_key[key]` is the table row of a pattern key (-1 when absent); `values[row, bin]` is
    the int8 code to store.
    """

    row_of_key: np.ndarray  # int32, 65536
    values: np.ndarray  # int8, (patterns, NUM_BINS)
    # Derived for the gather: offset of each key's row in `_flat`, plus NUM_BINS // 2 (the bin
    # of target 0), negative when the key has no row.
    _offset: np.ndarray = field(init=False, repr=False, compare=False)
    _flat: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows = np.asarray(self.row_of_key)
        offset = np.where(rows >= 0, rows.astype(np.int32) * np.int32(NUM_BINS) + NUM_BINS // 2, _ABSENT).astype(np.int32)
        object.__setattr__(self, "_offset", offset)
        object.__setattr__(self, "_flat", np.ascontiguousarray(self.values, dtype=np.int8).ravel())

    @classmethod
    def build(cls, keys: np.ndarray) -> "FAQTable":
        """Build rows for every distinct pattern key in `keys` (uint16), vectorised."""
        keys = np.asarray(keys)
        if keys.dtype != np.uint16 and keys.size and (keys.min() < 0 or keys.max() > 0xFFFF):
            raise ValueError("pattern keys must be in [0, 65535]")
        present = np.zeros(1 << 16, dtype=bool)
        present[keys.ravel()] = True
        return cls._from_present(present)

    @classmethod
    def from_masks(cls, sa0: np.ndarray, sa1: np.ndarray) -> "FAQTable":
        """The table for every pattern on a faulty word of a stream of masks (sa0 | sa1 != 0).

        Same table as `build(pattern_keys(sa0[faulty], sa1[faulty]))`, without materialising
        the faulty positions and keys of the whole stream.
        """
        sa0 = np.asarray(sa0, dtype=np.uint8).ravel()
        sa1 = np.asarray(sa1, dtype=np.uint8).ravel()
        present = np.zeros(1 << 16, dtype=bool)
        for s, e in _blocks(sa0.size):
            a, b = sa0[s:e], sa1[s:e]
            f = np.flatnonzero((a | b) != 0)
            if f.size:
                present[_keys_at(a, b, f)] = True
        return cls._from_present(present)

    @classmethod
    def _from_present(cls, present: np.ndarray) -> "FAQTable":
        uniq = np.flatnonzero(present).astype(np.uint16)
        row_of_key = np.full(1 << 16, -1, dtype=np.int32)
        row_of_key[uniq] = np.arange(len(uniq), dtype=np.int32)
        return cls(row_of_key=row_of_key, values=_nearest_values(uniq))

    def lookup(self, targets: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Best int8 code for float `targets` (code units) on words with pattern `keys`."""
        t_all = _float_targets(targets).ravel()
        k_all = np.asarray(keys).ravel()
        out = np.empty(t_all.size, dtype=np.int8)
        for s, e in _blocks(t_all.size):
            out[s:e] = self._gather(t_all[s:e], k_all[s:e])
        return out.reshape(np.shape(targets))

    def _gather(self, t: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One block of `lookup`: t float32/float64, keys uint16 (same length)."""
        idx = self._offset.take(keys)
        if idx.size and idx.min() < 0:
            raise KeyError("pattern key not in table")
        # bin = floor(2t) + 256. 2t and its floor are exact in binary floating point; adding
        # 256 (or 128 to t) in floating point first would round targets within ~1e-5 of a
        # half-integer into the wrong bin. The + 256 lives in _offset.
        x = t * 2
        np.floor(x, out=x)
        np.clip(x, -(NUM_BINS // 2), NUM_BINS // 2 - 1, out=x)
        idx += x.astype(np.int32)
        return self._flat.take(idx)


def _keys_at(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> np.ndarray:
    """pattern_keys(a[f], b[f])."""
    k = a.take(f).astype(np.uint16)
    k |= b.take(f).astype(np.uint16) << 8
    return k


def _float_targets(targets: np.ndarray) -> np.ndarray:
    """Targets as float32, or float64 when given in float64 (no precision is thrown away)."""
    t = np.asarray(targets)
    return t if t.dtype in (np.float32, np.float64) else t.astype(np.float32)


def faq_remap(targets: np.ndarray, sa0: np.ndarray, sa1: np.ndarray, table: FAQTable | None = None) -> np.ndarray:
    """FAQ codes for weights with float targets `targets` on words with masks sa0 / sa1.

    Healthy words (no stuck bit) get the plain rounded code; faulty words get the table's
    choice. A table gather per block of weights, no loop over weights. Without `table`, one is
    built for the patterns present.
    """
    t_all = _float_targets(targets)
    shape = t_all.shape
    t_all = t_all.ravel()
    sa0 = np.asarray(sa0, dtype=np.uint8).ravel()
    sa1 = np.asarray(sa1, dtype=np.uint8).ravel()
    if not t_all.size == sa0.size == sa1.size:
        raise ValueError(f"targets ({t_all.size}), sa0 ({sa0.size}) and sa1 ({sa1.size}) must have the same size")
    if table is None:
        table = FAQTable.from_masks(sa0, sa1)
    codes = np.empty(t_all.size, dtype=np.int8)
    for s, e in _blocks(t_all.size):
        t, a, b, out = t_all[s:e], sa0[s:e], sa1[s:e], codes[s:e]
        r = np.rint(t)
        np.clip(r, -128, 127, out=r)
        np.copyto(out, r, casting="unsafe")
        f = np.flatnonzero((a | b) != 0)
        if f.size:
            out[f] = table._gather(t.take(f), _keys_at(a, b, f))
    return codes.reshape(shape)
