"""Fault models for simulation campaigns, behind one small interface (`FaultModel`).

Each model is a class with its parameters in a dataclass (as aihwkit's noise models):

    bitflip        transient bit flips in the int8 weights at a bit error rate  (BitFlip)
    bitflip-bias   the same in the int32 biases                                  (BitFlip)
    stuckat        random stuck-at cells in the weight memory at a rate          (StuckAt)
    chip           the stuck-at faults of a given chip's fault map               (ChipFaults)

A spec string names a model and its arguments, one campaign point per rate:
`bitflip:1e-4,1e-3` -> two points; `stuckat:0.01`; `chip:chip.bin`. `register_fault_model`
adds a model (a later plugin entry point will call it): it takes the name and a parser from the
argument text to a list of FaultModel objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import InputError
from .base import (
    Fault,
    FaultModel,
    Injection,
    Tensor,
    TensorFaults,
    WeightSpace,
    parse_rates,
    sample_positions,
)
from .bitflip import BitFlip, BitFlipParams
from .chip import ChipFaults, ChipParams
from .stuckat import StuckAt, StuckAtParams

__all__ = [
    "BitFlip", "BitFlipParams", "ChipFaults", "ChipParams", "Fault", "FaultModel", "Injection", "StuckAt",
    "StuckAtParams", "Tensor", "TensorFaults", "WeightSpace", "fault_model_names", "parse_fault_spec",
    "parse_rates", "register_fault_model", "sample_positions",
]

SpecParser = Callable[[str], Sequence[FaultModel]]

_REGISTRY: dict[str, SpecParser] = {}


def register_fault_model(name: str, parser: SpecParser, *, replace: bool = False) -> None:
    """Make `name:ARGS` specs build fault models with `parser(ARGS)`."""
    if not name or ":" in name or "," in name or name != name.strip():
        raise ValueError(f"invalid fault model name {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"fault model {name!r} is already registered")
    _REGISTRY[name] = parser


def fault_model_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_fault_spec(spec: str) -> list[FaultModel]:
    """`NAME:ARGS` -> one FaultModel per campaign point; InputError on anything unknown or bad."""
    name, _, args = spec.partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise InputError(f"unknown fault model {name!r} in {spec!r} (known: {', '.join(fault_model_names())})")
    models = list(_REGISTRY[name](args))
    if not models:
        raise InputError(f"fault spec {spec!r} gives no campaign point")
    return models


register_fault_model("bitflip", BitFlip.from_spec)
register_fault_model("bitflip-bias", BitFlip.bias_from_spec)
register_fault_model("stuckat", StuckAt.from_spec)
register_fault_model("chip", ChipFaults.from_spec)
