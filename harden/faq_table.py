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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


NUM_BINS = 512  # half-step bins covering code units [-128, 128)
_CODES = np.arange(256, dtype=np.uint8)


def pattern_keys(sa0: np.ndarray, sa1: np.ndarray) -> np.ndarray:
    """One uint16 key per word: sa0 in the low byte, sa1 in the high byte."""
    return sa0.astype(np.uint16) | (sa1.astype(np.uint16) << 8)


@dataclass(frozen=True)
class FAQTable:
    """Nearest achievable value for each fault pattern present, at half-step resolution.

    `row_of_key[key]` is the table row of a pattern key (-1 when absent); `values[row, bin]` is
    the int8 code to store.
    """

    row_of_key: np.ndarray  # int32, 65536
    values: np.ndarray  # int8, (patterns, NUM_BINS)

    @classmethod
    def build(cls, keys: np.ndarray) -> "FAQTable":
        """Build rows for every distinct pattern key in `keys` (uint16), vectorised."""
        present = np.bincount(keys, minlength=1 << 16) > 0
        uniq = np.flatnonzero(present).astype(np.uint16)
        row_of_key = np.full(1 << 16, -1, dtype=np.int32)
        row_of_key[uniq] = np.arange(len(uniq), dtype=np.int32)
        sa0 = (uniq & 0xFF).astype(np.uint8)[:, None]
        sa1 = (uniq >> 8).astype(np.uint8)[:, None]
        reads = ((_CODES[None, :] & ~sa0) | sa1).view(np.int8).astype(np.int64)  # (P, 256)
        sorted_vals = np.sort(reads, axis=1)
        p = len(uniq)
        # One searchsorted over all rows: shift row r's values by r * 512 (values + 128 < 512).
        offsets = (np.arange(p, dtype=np.int64) * NUM_BINS)[:, None]
        flat = (sorted_vals + 128 + offsets).ravel()
        centres = (np.arange(NUM_BINS) + 0.5) / 2.0  # in shifted units (value + 128)
        queries = (centres[None, :] + offsets).ravel()
        hi = np.searchsorted(flat, queries)
        row_start = np.repeat(np.arange(p, dtype=np.int64) * 256, NUM_BINS)
        hi = np.clip(hi, row_start, row_start + 255)
        lo = np.clip(hi - 1, row_start, row_start + 255)
        take_lo = np.abs(flat[lo] - queries) < np.abs(flat[hi] - queries)
        best = np.where(take_lo, flat[lo], flat[hi]) - 128 - np.repeat(offsets.ravel(), NUM_BINS)
        return cls(row_of_key=row_of_key, values=best.astype(np.int8).reshape(p, NUM_BINS))

    def lookup(self, targets: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Best int8 code for float `targets` (code units) on words with pattern `keys`."""
        bins = np.floor((np.asarray(targets, dtype=np.float32) + np.float32(128.0)) * np.float32(2.0))
        bins = np.clip(bins, 0, NUM_BINS - 1).astype(np.int64)
        rows = self.row_of_key[keys]
        if rows.size and rows.min() < 0:
            raise KeyError("pattern key not in table")
        return self.values.ravel()[rows.astype(np.int64) * NUM_BINS + bins]


def faq_remap(targets: np.ndarray, sa0: np.ndarray, sa1: np.ndarray, table: FAQTable | None = None) -> np.ndarray:
    """FAQ codes for weights with float targets `targets` on words with masks sa0 / sa1.

    Healthy words (no stuck bit) get the plain rounded code; faulty words get the table's
    choice. One gather, no loop over weights.
    """
    targets = np.asarray(targets, dtype=np.float32)
    codes = np.clip(np.rint(targets), -128, 127).astype(np.int8)
    faulty = np.flatnonzero((sa0 | sa1) != 0)
    if faulty.size:
        keys = pattern_keys(sa0[faulty], sa1[faulty])
        table = table or FAQTable.build(keys)
        codes[faulty] = table.lookup(targets[faulty], keys)
    return codes
