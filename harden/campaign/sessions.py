"""The side sessions a point can run on, by its fault model's `space_kind`, and the precision check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from ..data import Dataset, top1
from ..errors import InputError
from ..faults import (
    ActivationEvaluator,
    FaultModel,
    Injection,
    Session,
    WeightSpace,
)
from ..faults.fp32 import FP32_KIND, FloatWeightEvaluator
from ..faults.variability import AnalogEvaluator
from ..simulate import ChipEvaluator
from ..stacking import top1_of_trials


def _analog_session(model: onnx.ModelProto, data: Dataset):
    return AnalogEvaluator(model, data)


class WeightSession(Session):
    """The int8 weight session: the campaign's ChipEvaluator, whose graph takes the int8 weights
    and int32 biases as inputs, seen through the Session protocol like every other kind."""

    def __init__(self, evaluator: ChipEvaluator, space: WeightSpace):
        self.evaluator = evaluator
        self.space = space
        self.values = evaluator.defaults  # the clean int8 weights and int32 biases
        self.clean_logits = evaluator.logits(None)
        self.clean = top1(self.clean_logits)
        self.ops = {}
        for w in evaluator.table:
            self.ops[w.name] = (w.op_type, w.node_name)
            if w.bias:
                self.ops[w.bias] = (w.op_type, w.node_name)

    @property
    def model(self) -> onnx.ModelProto:
        """The graph with the weights as inputs (built when asked for: trials rebuild sessions)."""
        return self.evaluator.session_model

    def predictions(self, injection: Injection | None = None) -> np.ndarray:
        if injection is None or not injection.tensors:
            return self.clean
        return self.evaluator.predictions(injection.apply(self.values))

    @property
    def stack(self) -> int:  # type: ignore[override]
        return self.evaluator.stack

    @property
    def feeds_values(self) -> bool:
        return self.evaluator.feeds_values

    def predictions_many(self, injections: list[Injection | None]) -> list[np.ndarray]:
        """Each injection's top-1, `stack` trials per session (an injection that hits nothing
        keeps its slot, run clean, and gets the clean predictions)."""
        return top1_of_trials(injections, self.values, self.clean, self.evaluator.logits_many)


#: Side sessions by a fault model's `space_kind`: factory(model, data) -> a faults.Session.
#: "weights" (WeightSession) is built by the campaign itself around its ChipEvaluator.
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


