"""Random stuck-at cells in the weight memory: a simulated chip drawn fresh for every trial.

The memory holds the model's int8 weights once (one 8-bit word per weight, the size
`harden faultmap generate --for-model` picks). Every bit cell is faulty with probability `rate`
(METHODS.md's fault-rate convention); a faulty cell is stuck at 1 with probability `p_sa1`, else
at 0. A stuck cell reads `(v & ~sa0) | sa1`, so it changes the weight only when the stored bit
differs: with p_sa1 = 1/2, half the faulty cells change a bit on average, whatever the weights.
`tensors` restricts the faulty cells to the named weight tensors (as for `bitflip`).
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
class StuckAtParams:
    """rate: fraction of faulty bit cells, in [0, 1]; p_sa1: share of those stuck at 1;
    tensors: None (every int8 weight tensor) or the names of the tensors with faulty cells."""

    rate: float
    p_sa1: float = 0.5
    tensors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field, v in (("fault rate", self.rate), ("stuck-at-1 fraction", self.p_sa1)):
            if not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
                raise InputError(f"{field} must be in [0, 1], got {v!r}")
        object.__setattr__(self, "tensors", check_tensor_names(self.tensors, "stuckat"))


class StuckAt(ParamsFaultModel):
    """Random permanent stuck-at cells at a rate, redrawn per trial."""

    name = "stuckat"
    deterministic = False

    @classmethod
    def from_spec(cls, args: str) -> list[StuckAt]:
        return [cls(StuckAtParams(r)) for r in parse_rates("stuckat", args, "0.01,0.04")]

    def targets(self, space: WeightSpace) -> tuple[Tensor, ...]:
        return space.weights

    def check(self, space: WeightSpace) -> None:
        if not space.weights:
            raise InputError("stuckat: the model has no int8 weights in weight memory")
        select_tensors(space.weights, self._params.tensors, self.name)

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> Injection:
        tensors = select_tensors(space.weights, self._params.tensors, self.name)
        positions = sample_positions(rng, sum(t.cells for t in tensors), float(self._params.rate))
        stuck1 = rng.random(positions.size) < self._params.p_sa1
        out = []
        for t, idx, mask, ones in group_cells(tensors, positions, stuck1):
            out.append(TensorFaults(t.name, idx, sa0=mask & ~ones, sa1=ones))
        return Injection(tuple(out), int(positions.size))
