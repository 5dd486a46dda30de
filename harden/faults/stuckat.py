"""Random stuck-at cells in the weight memory: a simulated chip drawn fresh for every trial.

The memory holds the model's int8 weights once (one 8-bit word per weight, the size
`harden faultmap generate --for-model` picks). Every bit cell is faulty with probability `rate`
(METHODS.md's fault-rate convention); a faulty cell is stuck at 1 with probability `p_sa1`, else
at 0. A stuck cell reads `(v & ~sa0) | sa1`, so it changes the weight only when the stored bit
differs: with p_sa1 = 1/2, half the faulty cells change a bit on average, whatever the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from .base import (
    Injection,
    TensorFaults,
    WeightSpace,
    group_cells,
    parse_rates,
    sample_positions,
)


@dataclass(frozen=True)
class StuckAtParams:
    """rate: fraction of faulty bit cells, in [0, 1]; p_sa1: share of those stuck at 1."""

    rate: float
    p_sa1: float = 0.5

    def __post_init__(self) -> None:
        for field, v in (("fault rate", self.rate), ("stuck-at-1 fraction", self.p_sa1)):
            if not isinstance(v, (int, float, np.floating)) or not 0.0 <= float(v) <= 1.0:
                raise InputError(f"{field} must be in [0, 1], got {v!r}")


class StuckAt:
    """Random permanent stuck-at cells at a rate, redrawn per trial."""

    name = "stuckat"
    deterministic = False

    def __init__(self, params: StuckAtParams):
        self._params = params

    @classmethod
    def from_spec(cls, args: str) -> list[StuckAt]:
        return [cls(StuckAtParams(r)) for r in parse_rates("stuckat", args, "0.01,0.04")]

    @property
    def params(self) -> StuckAtParams:
        return self._params

    @property
    def label(self) -> str:
        return f"stuckat:{self._params.rate:g}"

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self._params)}

    def check(self, space: WeightSpace) -> None:
        if not space.weights:
            raise InputError("stuckat: the model has no int8 weights in weight memory")

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> Injection:
        tensors = space.weights
        positions = sample_positions(rng, sum(t.cells for t in tensors), float(self._params.rate))
        stuck1 = rng.random(positions.size) < self._params.p_sa1
        out = []
        for t, idx, mask, ones in group_cells(tensors, positions, stuck1):
            out.append(TensorFaults(t.name, idx, sa0=mask & ~ones, sa1=ones))
        return Injection(tuple(out), int(positions.size))
