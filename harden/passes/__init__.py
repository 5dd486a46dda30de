"""Model-to-model passes, in the style of onnx-ir's pass infrastructure.

A pass is a small object with a `name` and `call(model, ctx) -> PassResult`. It does one thing,
can be switched off by leaving it out of the list, and returns a record of what it did (counts,
thresholds) that goes into the report. `run_passes` times each one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from ..data import Dataset


@dataclass
class PassContext:
    """What passes share: calibration data, the seed, and facts one pass leaves for a later one.

    `quant_overrides` are onnxruntime TensorQuantOverrides (the clip pass keeps the range of a
    clipped tensor above its threshold); `float_weights` maps each int8 weight initializer to
    the float weight it was quantized from, so FAQ can aim at the float value.
    """

    calib: Dataset
    seed: int = 0
    progress: Callable[[str], Any] | None = None
    quant_overrides: dict[str, list[dict]] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    #: FAQ's calibration statistics of the int8 model, keyed by (samples, with Hessian): chip
    #: independent, so a fleet computes them once and every chip's FAQ pass reuses them.
    layer_stats: dict[tuple[int, bool], dict] = field(default_factory=dict)


@dataclass
class PassResult:
    """A pass's output model and its record for the report."""

    model: onnx.ModelProto
    modified: bool
    record: dict = field(default_factory=dict)


class Pass(Protocol):
    name: str

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult: ...


def run_passes(model: onnx.ModelProto, passes: list[Pass], ctx: PassContext) -> tuple[onnx.ModelProto, list[dict]]:
    """Run passes in order; return the final model and one record per pass (with seconds)."""
    records = []
    for p in passes:
        if ctx.progress:
            ctx.progress(p.name)
        t0 = time.perf_counter()
        result = p.call(model, ctx)
        records.append({"pass": p.name, "modified": result.modified, "seconds": round(time.perf_counter() - t0, 4), **result.record})
        model = result.model
    return model, records
