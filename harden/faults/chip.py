"""A given chip: the stuck-at faults of its fault map, read through the `linear` memory layout.

Deterministic: every trial reads the same faults, so one trial measures the chip exactly, and
the result is the `int8_on_chip` figure of `harden apply` for the same model, map and data
(weight k of the stream at address k mod num_words, read as `(v & ~sa0) | sa1`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..faultmap import CSV_HEADER, FaultMap, read_faultmap
from .base import Injection, TensorFaults, WeightSpace


@dataclass(frozen=True)
class ChipParams:
    """path: the fault map file (HFM1, or CSV `address,bit,stuck` sized to the model)."""

    path: str
    chip_id: str | None = None
    crc32: int | None = None
    num_words: int | None = None
    faulty_cells: int | None = None


class ChipFaults:
    """The faults of one chip's fault map."""

    name = "chip"
    deterministic = True

    def __init__(self, faultmap: FaultMap | None = None, path: str | os.PathLike | None = None):
        if faultmap is None and path is None:
            raise ValueError("give a fault map or its path")
        self.faultmap = faultmap
        self.path = None if path is None else str(path)
        self._cache: dict[WeightSpace, Injection] = {}

    @classmethod
    def from_spec(cls, args: str) -> list[ChipFaults]:
        path = args.strip()
        if not path:
            raise InputError("fault model 'chip' needs a fault map file, e.g. chip:chip.bin")
        return [cls.from_path(path)]

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> ChipFaults:
        """Read an HFM1 map now; a CSV map is read by `check`, once the memory size is known."""
        if _is_csv(path):
            return cls(None, path)
        return cls(read_faultmap(path), path)

    @property
    def params(self) -> ChipParams:
        fm = self.faultmap
        if fm is None:
            return ChipParams(self.path or "")
        return ChipParams(self.path or "<memory>", fm.chip_id, fm.crc32, fm.num_words, fm.faulty_cells)

    @property
    def label(self) -> str:
        fm = self.faultmap
        ident = (fm.chip_id if fm is not None else None) or (os.path.basename(self.path) if self.path else "?")
        return f"chip:{ident}"

    def describe(self) -> dict:
        from dataclasses import asdict

        d = {"name": self.name, **asdict(self.params)}
        if self.faultmap is not None:
            d["rate"] = self.faultmap.rate
        return d

    def check(self, space: WeightSpace) -> None:
        if not space.weights:
            raise InputError("chip: the model has no int8 weights in weight memory")
        if self.faultmap is None:
            self.faultmap = read_faultmap(self.path, space.weight_count)

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> Injection:
        if space not in self._cache:
            self.check(space)
            self._cache[space] = chip_injection(self.faultmap, space)
        return self._cache[space]


def chip_injection(fm: FaultMap, space: WeightSpace) -> Injection:
    """The faults the chip puts under each weight of the linear layout."""
    mm = space.memory_map(fm.num_words)
    sa0, sa1 = mm.stream_masks(fm)
    hit = np.flatnonzero((sa0 | sa1) != 0)
    out = []
    for slot in mm.tensors:
        lo, hi = np.searchsorted(hit, [slot.offset, slot.offset + slot.count])
        if lo == hi:
            continue
        k = hit[lo:hi]
        s0, s1 = sa0[k], sa1[k]
        out.append(TensorFaults(slot.name, k - slot.offset, sa0=s0 if s0.any() else None, sa1=s1 if s1.any() else None))
    return Injection(tuple(out))


def _is_csv(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as fh:
            first = fh.read(64).split(b"\n", 1)[0]
    except OSError:
        return False  # read_faultmap produces the error message
    return first.strip().removeprefix(b"\xef\xbb\xbf") == CSV_HEADER.encode()
