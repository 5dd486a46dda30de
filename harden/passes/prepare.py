"""The first pass: legacy clean-up, onnxsim, and the opset upgrade per-channel QDQ needs."""

from __future__ import annotations

import onnx

from ..model import prepare
from . import Pass, PassContext, PassResult


class PreparePass(Pass):
    """model.prepare as a pass: drop initializer inputs, onnxsim, Constant -> initializer, opset >= 13."""

    name = "simplify"
    requires = frozenset({"float"})
    provides = frozenset({"prepared"})

    #: The prepared graph replaces the given one, so a caller still holding the loaded model
    #: (apply) holds no second float copy (97 MB while ResNet-50's clip search runs).
    in_place = True

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        prepared, record = prepare(model)
        if prepared is not model:
            model.CopyFrom(prepared)
        return PassResult(model, True, record)

    def note(self, record: dict) -> str:
        return f"opset {record['opset_in']} -> {record['opset_out']}, {record['nodes_in']} -> {record['nodes_out']} nodes"
