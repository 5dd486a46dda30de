"""Transient bit flips: every bit cell of the targeted tensors flips with probability `rate`.

`bitflip` hits the int8 weights (each code is XORed on its uint8 view, so bit 7 turns 20 into
-108, METHODS.md section 6); `bitflip-bias` hits the int32 biases the same way. Only the flipped
cells are drawn: a binomial count over all bits, then that many distinct positions.

`tensors` (a list of tensor names) restricts the flips to those tensors: the same process over
their bits alone (what `simulate --per-layer` runs, one tensor per point). Restricting to every
tensor of the target draws exactly what the unrestricted model draws, whatever the names' order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .base import (
    Injection,
    ParamsFaultModel,
    Tensor,
    TensorFaults,
    WeightSpace,
    check_tensor_names,
    group_cells,
    parse_rates,
    sample_positions,
    select_tensors,
)


@dataclass(frozen=True)
class BitFlipParams:
    """rate: bit error rate per cell, in [0, 1]; target: "weight" (int8) or "bias" (int32);
    tensors: None (every tensor of the target) or the names of the tensors to flip bits in."""

    rate: float
    target: str = "weight"
    tensors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rate, (int, float, np.floating)) or not 0.0 <= float(self.rate) <= 1.0:
            raise InputError(f"bit error rate must be in [0, 1], got {self.rate!r}")
        if self.target not in ("weight", "bias"):
            raise InputError(f"bit flip target must be 'weight' or 'bias', got {self.target!r}")
        object.__setattr__(self, "tensors", check_tensor_names(self.tensors, "bitflip"))


class BitFlip(ParamsFaultModel):
    """Independent transient bit flips at a bit error rate."""

    deterministic = False

    def __init__(self, params: BitFlipParams):
        super().__init__(params)
        self.name = "bitflip" if params.target == "weight" else "bitflip-bias"

    @classmethod
    def from_spec(cls, args: str, target: str = "weight") -> list[BitFlip]:
        name = "bitflip" if target == "weight" else "bitflip-bias"
        return [cls(BitFlipParams(r, target)) for r in parse_rates(name, args)]

    @classmethod
    def bias_from_spec(cls, args: str) -> list[BitFlip]:
        return cls.from_spec(args, "bias")

    def targets(self, space: WeightSpace) -> tuple[Tensor, ...]:
        """Every tensor this model may hit (before any restriction)."""
        return space.of_kind(self._params.target)

    def check(self, space: WeightSpace) -> None:
        if not space.of_kind(self._params.target):
            what = "int8 weights" if self._params.target == "weight" else "int32 biases"
            raise InputError(f"{self.name}: the model has no {what} to flip")
        select_tensors(self.targets(space), self._params.tensors, self.name)

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> Injection:
        tensors = select_tensors(self.targets(space), self._params.tensors, self.name)
        population = sum(t.cells for t in tensors)
        positions = sample_positions(rng, population, float(self._params.rate))
        hits = group_cells(tensors, positions)
        return Injection(tuple(TensorFaults(t.name, idx, flip=mask) for t, idx, mask, _ in hits), int(positions.size))
