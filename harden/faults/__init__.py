"""Fault models for simulation campaigns, behind one small interface (`FaultModel`).

Each model is a class with its parameters in a dataclass (as aihwkit's noise models):

    bitflip        transient bit flips in the int8 weights at a bit error rate  (BitFlip)
    bitflip-bias   the same in the int32 biases                                  (BitFlip)
    stuckat        random stuck-at cells in the weight memory at a rate          (StuckAt)
    chip           the stuck-at faults of a given chip's fault map               (ChipFaults)
    bitflip-act    transient bit flips in the quantized activations, per sample  (ActivationBitFlip)
    variability    analog PIM conductance variability, w * exp(theta_chip + theta_cell)  (Variability)
    bitflip-fp32   transient bit flips in the float32 weights of a *float* model  (FP32BitFlip)

A fault model runs on int8 QDQ models unless it says `precision = "float"` (bitflip-fp32);
a campaign refuses a point whose precision is not the model's.

Every built-in model takes `tensors` (a list of tensor names) to restrict its faults to those
tensors, e.g. `BitFlip(BitFlipParams(1e-2, tensors=("conv1_quantized",)))`; `restricted(names)`
makes that copy of a model and `targets(space)` lists what it may hit (`simulate --per-layer`).

A spec string names a model and its arguments, one campaign point per rate:
`bitflip:1e-4,1e-3` -> two points; `stuckat:0.01`; `chip:chip.bin`.

Names resolve first through `register_fault_model` (in-process registrations: a name and a
parser from the argument text to a list of FaultModel objects), then through the entry-point
group `harden.fault_models` (harden/plugins.py), where the built-ins above are registered too
(pyproject.toml): an entry point names a class with `from_spec(args)` or the parser itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .. import plugins
from ..errors import InputError
from .activation import (
    ActBitFlipParams,
    ActivationBitFlip,
    ActivationEvaluator,
    ActivationSpace,
)
from .base import (
    Fault,
    FaultModel,
    Injection,
    Session,
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
    "ActBitFlipParams", "ActivationBitFlip", "ActivationEvaluator", "ActivationSpace", "BitFlip", "BitFlipParams", "ChipFaults", "ChipParams",
    "FP32BitFlip", "FP32BitFlipParams", "Fault", "FaultModel", "FloatWeightEvaluator", "Injection", "Session", "StuckAt",
    "StuckAtParams", "Tensor", "TensorFaults", "WeightSpace", "fault_model_names", "parse_fault_spec",
    "parse_rates", "register_fault_model", "sample_positions", "spec_parser",
]

SpecParser = Callable[[str], Sequence[FaultModel]]

# In-process registrations; they take precedence over entry points of the same name.
_REGISTRY: dict[str, SpecParser] = {}


def register_fault_model(name: str, parser: SpecParser, *, replace: bool = False) -> None:
    """Make `name:ARGS` specs build fault models with `parser(ARGS)`."""
    if not name or ":" in name or "," in name or name != name.strip():
        raise ValueError(f"invalid fault model name {name!r}")
    if name in fault_model_names() and not replace:
        raise ValueError(f"fault model {name!r} is already registered")
    _REGISTRY[name] = parser


def fault_model_names() -> list[str]:
    """Registered names and the names of the `harden.fault_models` entry points."""
    return sorted(set(_REGISTRY) | set(plugins.names(plugins.FAULT_MODELS)))


def spec_parser(name: str) -> SpecParser:
    """The parser of fault model `name` (InputError if nobody registered it)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    obj = plugins.load(plugins.FAULT_MODELS, name)
    parser = getattr(obj, "from_spec", obj)
    if not callable(parser):
        raise InputError(f"fault model {name!r}: its entry point names {obj!r}, neither a class with from_spec nor a function")
    return parser


def parse_fault_spec(spec: str) -> list[FaultModel]:
    """`NAME:ARGS` -> one FaultModel per campaign point; InputError on anything unknown or bad."""
    name, _, args = spec.partition(":")
    name = name.strip()
    if name not in _REGISTRY and name not in plugins.entry_points(plugins.FAULT_MODELS):
        raise InputError(f"unknown fault model {name!r} in {spec!r} (known: {', '.join(fault_model_names())})")
    models = list(spec_parser(name)(args))
    if not models:
        raise InputError(f"fault spec {spec!r} gives no campaign point")
    for m in models:
        if not isinstance(m, FaultModel):
            raise InputError(f"fault model {name!r} gives a {type(m).__name__}, which does not subclass "
                             "harden.faults.FaultModel (the protocol and its defaults, docs/plugins.md)")
    return models
register_fault_model("bitflip-act", ActivationBitFlip.from_spec)

from .variability import Variability  # noqa: E402 (analog PIM, section 4)

register_fault_model("variability", Variability.from_spec)

from .fp32 import FloatWeightEvaluator, FP32BitFlip, FP32BitFlipParams  # noqa: E402 (float models)

register_fault_model("bitflip-fp32", FP32BitFlip.from_spec)
