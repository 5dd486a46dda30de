"""The side sessions a point can run on, by its fault model's `space_kind`, and the precision check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx

from ..data import Dataset
from ..errors import InputError
from ..faults import (
    ActivationEvaluator,
    FaultModel,
)
from ..faults.fp32 import FP32_KIND, FloatWeightEvaluator
from ..faults.variability import AnalogEvaluator


def _analog_session(model: onnx.ModelProto, data: Dataset):
    return AnalogEvaluator(model, data)


#: Side sessions by a fault model's `space_kind`: factory(model, data) -> an evaluator with
#: `space` (what `sample` draws over), `clean`, `clean_logits`, `model` and
#: `predictions(injection)`; optional: `compare_fused(logits)`, `session_info()`, `ops`
#: (tensor -> (op type, node name)). "weights" is the campaign's own ChipEvaluator.
SESSION_KINDS: dict[str, Callable[[onnx.ModelProto, Dataset], object]] = {
    "activations": ActivationEvaluator,
    "analog": _analog_session,
    FP32_KIND: FloatWeightEvaluator,
}


def check_precision(points: Sequence[FaultModel], precision: str, what: str = "", model_name: str = "") -> None:
    """InputError (one line) for the first point whose precision ("int8", the default, or
    "float": `FaultModel.precision`) is not the model's: int8 fault models need an int8 QDQ
    model, float ones (bitflip-fp32) a float model."""
    where = f"{model_name}: " if model_name else ""
    for p in points:
        need = p.precision
        if need == precision:
            continue
        label = f"{what} {p.label}" if what else p.label
        if need == "int8":
            raise InputError(
                f"{where}{label} is an int8 fault model and simulate takes an int8 QDQ model for it, "
                "but this one has float weights: use bitflip-fp32:RATE,... for its float32 weights, "
                "or run harden apply first to quantize it"
            )
        raise InputError(
            f"{where}{label} flips bits of float32 weights, but this is an int8 QDQ model: give the float model "
            "(before harden apply), or use bitflip:RATE,... for its int8 weights"
        )


