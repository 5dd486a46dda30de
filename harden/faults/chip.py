"""A given chip: the stuck-at faults of its fault map, read through a memory layout (`linear`
unless `layout` names another, e.g. "tiled:rows=128,cols=128": harden.memory.get_layout).

Deterministic: every trial reads the same faults, so one trial measures the chip exactly, and
the result is the `int8_on_chip` figure of `harden apply` for the same model, map and data
(weight k of the stream at address k mod num_words, read as `(v & ~sa0) | sa1`).
`tensors` keeps only the chip's faults under the named weight tensors (the per-layer faults of
`simulate --per-layer chip:MAP` add up exactly to the whole chip's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..faultmap import FaultMap, is_csv_map, read_faultmap
from ..memory import get_layout
from .base import (
    FaultModel,
    Injection,
    Tensor,
    TensorFaults,
    WeightSpace,
    check_tensor_names,
    describe_params,
    select_tensors,
    tensors_suffix,
)


@dataclass(frozen=True)
class ChipParams:
    """path: the fault map file (HFM1, or CSV `address,bit,stuck` sized to the model)."""

    path: str
    chip_id: str | None = None
    crc32: int | None = None
    num_words: int | None = None
    faulty_cells: int | None = None
    tensors: tuple[str, ...] | None = None
    layout: str = "linear"


class ChipFaults(FaultModel):
    """The faults of one chip's fault map."""

    name = "chip"
    deterministic = True

    def __init__(self, faultmap: FaultMap | None = None, path: str | os.PathLike | None = None, tensors=None, layout=None):
        if faultmap is None and path is None:
            raise ValueError("give a fault map or its path")
        self.faultmap = faultmap
        self.path = None if path is None else str(path)
        self.layout = None if layout is None else get_layout(layout)  # None: linear
        self.tensors = check_tensor_names(tensors, "chip")
        self._cache: dict[WeightSpace, Injection] = {}

    @classmethod
    def from_spec(cls, args: str) -> list[ChipFaults]:
        path = args.strip()
        if not path:
            raise InputError("fault model 'chip' needs a fault map file, e.g. chip:chip.bin")
        return [cls.from_path(path)]

    @classmethod
    def from_path(cls, path: str | os.PathLike, layout=None) -> ChipFaults:
        """Read an HFM1 map now (and check it fits `layout`); a CSV map is read by `check`,
        once the memory size is known."""
        if is_csv_map(path):
            return cls(None, path, layout=layout)
        out = cls(read_faultmap(path), path, layout=layout)
        if out.layout is not None:
            out.layout.check(out.faultmap.num_words)
        return out

    @property
    def params(self) -> ChipParams:
        fm = self.faultmap
        if fm is None:
            return ChipParams(self.path or "", tensors=self.tensors, layout=self._layout_spec)
        return ChipParams(
            self.path or "<memory>", fm.chip_id, fm.crc32, fm.num_words, fm.faulty_cells, self.tensors, self._layout_spec
        )

    @property
    def _layout_spec(self) -> str:
        return "linear" if self.layout is None else self.layout.spec

    @property
    def label(self) -> str:
        fm = self.faultmap
        ident = (fm.chip_id if fm is not None else None) or (os.path.basename(self.path) if self.path else "?")
        return f"chip:{ident}{tensors_suffix(self.tensors)}"

    def describe(self) -> dict:
        d = describe_params(self.name, self.params)
        if self.layout is None:
            del d["layout"]  # linear, the default
        if self.faultmap is not None:
            d["rate"] = self.faultmap.rate
        return d

    def targets(self, space: WeightSpace) -> tuple[Tensor, ...]:
        return space.weights

    @property
    def restriction(self) -> tuple[str, ...] | None:
        return self.tensors

    def restricted(self, names) -> ChipFaults:
        """The chip's faults under the named tensors only (the map and the whole chip's
        injection are shared, not re-read)."""
        out = ChipFaults(self.faultmap, self.path, names, self.layout)
        out._cache = self._cache
        return out

    def check(self, space: WeightSpace) -> None:
        if not space.weights:
            raise InputError("chip: the model has no int8 weights in weight memory")
        select_tensors(space.weights, self.tensors, self.name)
        if self.faultmap is None:
            self.faultmap = read_faultmap(self.path, space.memory_words(self.layout))
        if self.layout is not None:
            self.layout.check(self.faultmap.num_words)

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> Injection:
        if space not in self._cache:  # the whole chip's faults, shared with restricted copies
            self.check(space)
            self._cache[space] = chip_injection(self.faultmap, space, self.layout)
        inj = self._cache[space]
        if self.tensors is None:
            return inj
        keep = set(self.tensors)
        return Injection(tuple(tf for tf in inj.tensors if tf.name in keep))


def chip_injection(fm: FaultMap, space: WeightSpace, layout=None) -> Injection:
    """The faults the chip puts under each weight of `layout` (None: linear)."""
    mm = space.memory_map(fm.num_words, layout)
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


