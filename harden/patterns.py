"""Fault-map patterns: simulated chips whose faults have a spatial structure.

Each pattern is a plugin (entry-point group `harden.faultmap_patterns`, docs/plugins.md): a
`Pattern` subclass with a `name`, a frozen `Params` dataclass and `cells(rng, num_words, rate)`,
which returns the faulty cells. Every pattern takes the target overall fault rate `rate`
(faulty bit cells / (num_words * 8), as DESIGN.md defines it) and is built so that the
*expected* rate is exactly `rate`, for every parameter choice; what differs is the variance
(tests/test_patterns.py derives it for each pattern and checks generated maps against it).

    uniform     every cell faulty with probability rate, independently (generate_uniform)
    bias        the same, with a chosen stuck-at-1 share p_sa1 (default 0.9)
    bitprofile  a rate per bit position: profile=w0,...,w7 (relative, LSB first); bit b is
                faulty with probability rate * 8 * w_b / sum(w)
    clustered   bursts: cluster centres fall on words as a Poisson process; a cluster marks
                each cell of the 2*radius+1 words around its centre (wrapping) with
                probability density; the intensity is set so that a cell is faulty with
                probability exactly rate (1 - exp(-lambda * (2*radius+1) * density) = rate)
    rows        word-line failures: memory rows of row_words words; a row fails with
                probability q = rate * 8 / popcount(bits) and then every cell of the given
                bits in that row is stuck, the whole row the same way (at 1 with p_sa1)
    columns     bit-line failures: a bit-line is one bit position across `run` words spaced
                `stride` apart (stride 1: consecutive words; stride = row width: a column
                of a row-major array); each fails with probability q = rate * 8 /
                popcount(bits), all its cells stuck the same way

`generate(name, num_words, rate, seed, params)` builds one map; the CLI is
`harden faultmap generate --pattern NAME --param k=v ...`. Deterministic per seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import plugins
from .errors import InputError
from .faultmap import WORD_BITS, FaultMap, _group_cells, _is_int, _sample_without_replacement, generate_uniform

__all__ = [
    "Bias", "BitProfile", "Clustered", "Columns", "Pattern", "Rows", "Uniform", "generate", "get_pattern",
    "pattern_names",
]


def _probability(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
        raise InputError(f"{name} must be in [0, 1], got {v!r}")


def _positive_int(name: str, v: Any, top: int = 1 << 40) -> None:
    if not _is_int(v) or not 1 <= v <= top:
        raise InputError(f"{name} must be an integer in [1, {top}], got {v!r}")


def _bit_mask(v: Any) -> None:
    if not _is_int(v) or not 1 <= v <= 0xFF:
        raise InputError(f"bits must be a mask of bit positions in [1, 0xff] (0x80 = the MSB), got {v!r}")


def bernoulli_positions(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Sorted positions in [0, n), each present with probability p independently (a binomial
    count, then distinct positions; the complement when more than half are drawn)."""
    count = int(rng.binomial(n, p)) if n else 0
    if count <= n // 2:
        return _sample_without_replacement(rng, n, count)
    keep = np.ones(n, dtype=bool)
    keep[_sample_without_replacement(rng, n, n - count)] = False
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class _NoParams:
    pass


class Pattern:
    """A fault-map generator. Subclasses set `name`, `Params`, and implement `cells`."""

    name: str = ""
    Params: type = _NoParams

    def __init__(self, params: Any = None, **kwargs: Any):
        if params is None:
            params = plugins.coerce_params(self.Params, kwargs, f"pattern {self.name}")
        elif kwargs:
            raise TypeError("give params or keyword arguments, not both")
        self.params = params

    @classmethod
    def from_params(cls, given: dict | None = None) -> "Pattern":
        return cls(plugins.coerce_params(cls.Params, given, f"pattern {cls.name}"))

    @property
    def params_dict(self) -> dict:
        return plugins.params_dict(self.params)

    def max_rate(self) -> float:
        """The highest overall rate this pattern's parameters allow."""
        return 1.0

    def check(self, num_words: int, rate: float) -> None:
        """InputError when this pattern cannot make a map of that size and rate."""
        if rate > self.max_rate():
            raise InputError(
                f"pattern {self.name}: rate {rate:g} is above the {self.max_rate():g} its parameters allow"
            )

    def cells(self, rng: np.random.Generator, num_words: int, rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(word, bit, stuck_at_1) of the faulty cells (int64, int64, bool); a cell listed twice
        is kept once."""
        raise NotImplementedError

    def generate(self, num_words: int, rate: float, seed: int, meta: dict | None = None) -> FaultMap:
        num_words, rate, seed = _check_common(num_words, rate, seed)
        self.check(num_words, rate)
        rng = np.random.default_rng(seed)
        word, bit, stuck1 = self.cells(rng, num_words, rate)
        word = np.asarray(word, dtype=np.int64)
        bit = np.asarray(bit, dtype=np.int64)
        stuck1 = np.asarray(stuck1, dtype=bool)
        order = np.lexsort((bit, word))
        word, bit, stuck1 = word[order], bit[order], stuck1[order]
        if word.size:
            keep = np.concatenate(([True], (word[1:] != word[:-1]) | (bit[1:] != bit[:-1])))
            word, bit, stuck1 = word[keep], bit[keep], stuck1[keep]
        words, sa0, sa1 = _group_cells(word, bit, stuck1)
        full_meta = {
            "chip_id": f"sim-{seed}",
            **(meta or {}),
            "generator": self.name,
            "rate": rate,
            "seed": seed,
            "params": self.params_dict,
        }
        return FaultMap(num_words, words, sa0, sa1, full_meta)


def _check_common(num_words: Any, rate: Any, seed: Any) -> tuple[int, float, int]:
    if not _is_int(num_words) or not 1 <= num_words <= 2**56:
        raise InputError(f"the number of words must be an integer in [1, 2**56], got {num_words!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0.0 <= rate <= 1.0:
        raise InputError(f"the fault rate must be in [0, 1], got {rate!r}")
    if not _is_int(seed) or seed < 0:
        raise InputError(f"the seed must be a non-negative integer, got {seed!r}")
    return int(num_words), float(rate), int(seed)


def _stuck(rng: np.random.Generator, n: int, p_sa1: float) -> np.ndarray:
    return rng.random(n) < p_sa1


# --- uniform and bias --------------------------------------------------------------------------


@dataclass(frozen=True)
class UniformParams:
    """p_sa1: share of faulty cells stuck at 1."""

    p_sa1: float = 0.5

    def __post_init__(self) -> None:
        _probability("p_sa1", self.p_sa1)


class Uniform(Pattern):
    """Independent cells (harden.faultmap.generate_uniform; the same map for the same seed)."""

    name = "uniform"
    Params = UniformParams

    def generate(self, num_words: int, rate: float, seed: int, meta: dict | None = None) -> FaultMap:
        return generate_uniform(num_words, rate, seed, meta=meta, p_sa1=self.params.p_sa1)


@dataclass(frozen=True)
class BiasParams:
    """p_sa1: share of faulty cells stuck at 1 (0: all stuck at 0, 1: all stuck at 1)."""

    p_sa1: float = 0.9

    def __post_init__(self) -> None:
        _probability("p_sa1", self.p_sa1)


class Bias(Pattern):
    """Independent cells with a chosen stuck-at polarity bias."""

    name = "bias"
    Params = BiasParams

    def generate(self, num_words: int, rate: float, seed: int, meta: dict | None = None) -> FaultMap:
        fm = generate_uniform(num_words, rate, seed, meta=meta, p_sa1=self.params.p_sa1)
        new_meta = {**fm.meta, "generator": self.name, "params": self.params_dict}
        new_meta.pop("p_sa1", None)
        return dataclasses.replace(fm, meta=new_meta)


# --- per-bit profile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BitProfileParams:
    """profile: 8 relative weights, LSB first (bit b's rate is rate * 8 * w_b / sum(w));
    p_sa1: share of faulty cells stuck at 1."""

    profile: tuple[float, ...]
    p_sa1: float = 0.5

    def __post_init__(self) -> None:
        prof = tuple(self.profile)
        if len(prof) != WORD_BITS:
            raise InputError(f"profile needs {WORD_BITS} weights (LSB first), got {len(prof)}")
        if not all(isinstance(w, (int, float, np.floating)) and math.isfinite(w) and w >= 0 for w in prof):
            raise InputError(f"profile weights must be finite and >= 0, got {prof!r}")
        if sum(prof) <= 0:
            raise InputError("profile weights must not all be 0")
        object.__setattr__(self, "profile", tuple(float(w) for w in prof))
        _probability("p_sa1", self.p_sa1)


class BitProfile(Pattern):
    """A fault rate per bit position (e.g. sense amplifiers of some bits weaker than others)."""

    name = "bitprofile"
    Params = BitProfileParams

    def bit_rates(self, rate: float) -> np.ndarray:
        w = np.asarray(self.params.profile, dtype=np.float64)
        return rate * WORD_BITS * w / w.sum()

    def max_rate(self) -> float:
        w = np.asarray(self.params.profile, dtype=np.float64)
        return float(w.sum() / (WORD_BITS * w.max()))

    def check(self, num_words: int, rate: float) -> None:
        if np.any(self.bit_rates(rate) > 1.0 + 1e-12):
            raise InputError(
                f"pattern bitprofile: rate {rate:g} would need a bit rate above 1 with profile "
                f"{','.join(f'{w:g}' for w in self.params.profile)} (at most {self.max_rate():g})"
            )

    def cells(self, rng, num_words, rate):
        words, bits = [], []
        for b, r in enumerate(np.minimum(self.bit_rates(rate), 1.0)):
            w = bernoulli_positions(rng, num_words, float(r))
            words.append(w)
            bits.append(np.full(w.size, b, np.int64))
        word = np.concatenate(words)
        return word, np.concatenate(bits), _stuck(rng, word.size, self.params.p_sa1)


# --- clustered bursts --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusteredParams:
    """radius: words on each side of a cluster's centre (footprint 2*radius+1 words);
    density: probability that a cluster marks each cell of its footprint; p_sa1: share of
    faulty cells stuck at 1."""

    radius: int = 2
    density: float = 0.5
    p_sa1: float = 0.5

    def __post_init__(self) -> None:
        if not _is_int(self.radius) or not 0 <= self.radius <= 1 << 20:
            raise InputError(f"radius must be an integer in [0, 1048576], got {self.radius!r}")
        _probability("density", self.density)
        if self.density <= 0:
            raise InputError("density must be above 0")
        _probability("p_sa1", self.p_sa1)


class Clustered(Pattern):
    """Bursts of faulty cells around random centres (spatially correlated defects)."""

    name = "clustered"
    Params = ClusteredParams
    _CHUNK_CELLS = 1 << 22  # footprint cells drawn per chunk (bounded memory)

    @property
    def footprint(self) -> int:
        return 2 * self.params.radius + 1

    def intensity(self, rate: float) -> float:
        """Clusters per word: 1 - exp(-lambda * footprint * density) = rate."""
        return -math.log1p(-rate) / (self.footprint * self.params.density)

    def check(self, num_words: int, rate: float) -> None:
        if num_words < self.footprint:
            raise InputError(
                f"pattern clustered: a cluster spans {self.footprint} words (radius {self.params.radius}) "
                f"but the memory has only {num_words}"
            )

    def cells(self, rng, num_words, rate):
        if rate >= 1.0:  # infinite intensity: every cell
            cells = np.arange(num_words * WORD_BITS, dtype=np.int64)
            return cells // WORD_BITS, cells % WORD_BITS, _stuck(rng, cells.size, self.params.p_sa1)
        if rate <= 0.0:
            e = np.empty(0, np.int64)
            return e, e, np.empty(0, bool)
        n_clusters = int(rng.poisson(self.intensity(rate) * num_words))
        centres = rng.integers(0, num_words, size=n_clusters, dtype=np.int64)
        span = self.footprint * WORD_BITS
        offsets = np.arange(span, dtype=np.int64)  # cell j of a footprint: word j // 8 - radius, bit j % 8
        per_chunk = max(1, self._CHUNK_CELLS // span)
        words, bits = [], []
        for lo in range(0, n_clusters, per_chunk):
            c = centres[lo : lo + per_chunk]
            marked = rng.random((c.size, span)) < self.params.density
            ci, j = np.nonzero(marked)
            words.append((c[ci] + j // WORD_BITS - self.params.radius) % num_words)
            bits.append(offsets[j] % WORD_BITS)
        word = np.concatenate(words) if words else np.empty(0, np.int64)
        bit = np.concatenate(bits) if bits else np.empty(0, np.int64)
        return word, bit, _stuck(rng, word.size, self.params.p_sa1)


# --- word-lines and bit-lines ------------------------------------------------------------------


def _popcount8(mask: int) -> int:
    return bin(int(mask) & 0xFF).count("1")


def _mask_bits(mask: int) -> np.ndarray:
    return np.array([b for b in range(WORD_BITS) if mask >> b & 1], dtype=np.int64)


@dataclass(frozen=True)
class RowsParams:
    """row_words: words per memory row (word-line); bits: mask of the bit positions a failing
    row takes down (0xff: all); p_sa1: probability that a failing row is stuck at 1 (else 0)."""

    row_words: int = 64
    bits: int = 0xFF
    p_sa1: float = 0.5

    def __post_init__(self) -> None:
        _positive_int("row_words", self.row_words)
        _bit_mask(self.bits)
        _probability("p_sa1", self.p_sa1)


class Rows(Pattern):
    """Whole word-lines: every cell of the chosen bits in a failing row is stuck."""

    name = "rows"
    Params = RowsParams

    def line_rate(self, rate: float) -> float:
        return rate * WORD_BITS / _popcount8(self.params.bits)

    def max_rate(self) -> float:
        return _popcount8(self.params.bits) / WORD_BITS

    def cells(self, rng, num_words, rate):
        rw = self.params.row_words
        n_rows = -(-num_words // rw)
        failing = bernoulli_positions(rng, n_rows, min(1.0, self.line_rate(rate)))
        stuck_row = _stuck(rng, failing.size, self.params.p_sa1)
        bitlist = _mask_bits(self.params.bits)
        word = (failing[:, None] * rw + np.arange(rw, dtype=np.int64)[None, :]).ravel()
        row_of = np.repeat(np.arange(failing.size), rw)
        inside = word < num_words
        word, row_of = word[inside], row_of[inside]
        nb = bitlist.size
        return np.repeat(word, nb), np.tile(bitlist, word.size), np.repeat(stuck_row[row_of], nb)


@dataclass(frozen=True)
class ColumnsParams:
    """run: words on one bit-line; stride: address step between them (1: consecutive words;
    the row width in words: a column of a row-major array); bits: mask of the bit positions
    whose bit-lines can fail; p_sa1: probability that a failing bit-line is stuck at 1."""

    run: int = 256
    stride: int = 1
    bits: int = 0xFF
    p_sa1: float = 0.5

    def __post_init__(self) -> None:
        _positive_int("run", self.run)
        _positive_int("stride", self.stride)
        _bit_mask(self.bits)
        _probability("p_sa1", self.p_sa1)


class Columns(Pattern):
    """Bit-lines: one bit position stuck across a run of words.

    The address space is cut into blocks of stride * run words; block t holds `stride`
    bit-lines per bit: line (t, k, b) is bit b of words t*stride*run + k + i*stride, i < run.
    Every cell belongs to exactly one line, so a line failing with probability q gives the
    overall rate q * popcount(bits) / 8.
    """

    name = "columns"
    Params = ColumnsParams

    def line_rate(self, rate: float) -> float:
        return rate * WORD_BITS / _popcount8(self.params.bits)

    def max_rate(self) -> float:
        return _popcount8(self.params.bits) / WORD_BITS

    def cells(self, rng, num_words, rate):
        run, stride = self.params.run, self.params.stride
        bitlist = _mask_bits(self.params.bits)
        block = stride * run
        n_blocks = -(-num_words // block)
        n_lines = n_blocks * stride * bitlist.size
        failing = bernoulli_positions(rng, n_lines, min(1.0, self.line_rate(rate)))
        stuck_line = _stuck(rng, failing.size, self.params.p_sa1)
        rest, bi = np.divmod(failing, bitlist.size)
        t, k = np.divmod(rest, stride)
        word = (t * block + k)[:, None] + np.arange(run, dtype=np.int64)[None, :] * stride
        line_of = np.repeat(np.arange(failing.size), run)
        word = word.ravel()
        inside = word < num_words
        word, line_of = word[inside], line_of[inside]
        return word, bitlist[bi][line_of], stuck_line[line_of]


# --- registry ----------------------------------------------------------------------------------


def pattern_names() -> list[str]:
    """Names of the installed patterns (entry-point group harden.faultmap_patterns)."""
    return plugins.names(plugins.PATTERNS)


def get_pattern(name: str, params: dict | None = None) -> Pattern:
    """The pattern `name` with params (text or typed values); InputError for an unknown name."""
    cls = plugins.load(plugins.PATTERNS, name)
    if not (isinstance(cls, type) and issubclass(cls, Pattern)):
        raise InputError(f"fault-map pattern {name!r} is not a harden.patterns.Pattern subclass ({cls!r})")
    return cls.from_params(params)


def generate(name: str, num_words: int, rate: float, seed: int, params: dict | None = None,
             meta: dict | None = None) -> FaultMap:
    """A simulated chip of num_words words from pattern `name` at overall cell rate `rate`."""
    return get_pattern(name, params).generate(num_words, rate, seed, meta=meta)
