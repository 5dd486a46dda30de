"""Static int8 QDQ quantization with onnxruntime.quantization.

Per-channel symmetric int8 weights (DESIGN.md step 4), uint8 activations calibrated (MinMax) on
the calibration data. We use onnxruntime's quantizer rather than our own: it is the reference
for what onnxruntime will fuse into QLinearConv / QGemm, which is what we then simulate.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import Dataset
from ..errors import InputError
from ..model import TABLE_OPS, WEIGHT_OPS, float_weight_names, initializer_map, qdq_weights, weight_input
from ..runtime import batch_size_for, fixed_batch
from . import Pass, PassContext, PassResult


class _Reader:
    """onnxruntime CalibrationDataReader over a Dataset (consumed once, as ORT expects)."""

    def __init__(self, data: Dataset, batch_size: int, fixed: bool):
        self._it = iter(list(data.batches(batch_size)))
        self._batch, self._fixed = batch_size, fixed

    def get_next(self):
        feeds = next(self._it, None)
        if feeds is not None and self._fixed:
            n = len(next(iter(feeds.values())))
            if n < self._batch:
                feeds = {k: np.concatenate([v, np.repeat(v[-1:], self._batch - n, axis=0)]) for k, v in feeds.items()}
        return feeds


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (quantization keeps names, we map weights through them)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


class QuantizePass(Pass):
    """Float model -> int8 QDQ model; leaves float weights in ctx for FAQ."""

    name = "quantize"
    requires = frozenset({"float"})
    provides = frozenset({"int8", "float_weights"})

    def __init__(self, calibrate_method: str = "minmax"):
        self.calibrate_method = calibrate_method

    def note(self, record: dict) -> str:
        return f"{record['int8_tensors']} int8 tensors, {record['int8_weights']} weights (per-channel, symmetric)"

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not float_weight_names(model):
            raise InputError("the model has no Conv, ConvTranspose, Gemm, MatMul or embedding (Gather) weights to quantize")
        name_nodes(model)
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        reader = _Reader(ctx.calib, batch_size_for(model, 64), fixed_batch(model) is not None)
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer logs pre-processing advice at WARNING
        try:
            with tempfile.TemporaryDirectory(prefix="harden-q-") as tmp:
                out, src = Path(tmp) / "q.onnx", Path(tmp) / "float.onnx"
                # A path, not the proto: quantize_static moves a proto's weights to external data.
                onnx.save(model, str(src))
                quantize_static(
                    src,
                    out,
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=methods[self.calibrate_method],
                    op_types_to_quantize=None,
                    extra_options={
                        "WeightSymmetric": True,
                        "ActivationSymmetric": False,
                        "TensorQuantOverrides": {**_table_overrides(model), **ctx.quant_overrides},
                    },
                )
                qmodel = onnx.load(str(out))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"quantization failed: {str(exc).splitlines()[0][:200]}") from None
        finally:
            root.setLevel(level)
        ctx.float_weights.update(_float_weights_by_int8(model, qmodel))
        per_row_table_scales(qmodel)
        table = qdq_weights(qmodel)
        if not table:
            raise InputError("quantization produced no int8 weights (no quantizable Conv/Gemm/MatMul/Gather)")
        return PassResult(
            qmodel,
            True,
            {
                "int8_tensors": len(table),
                "int8_weights": int(sum(w.size for w in table)),
                "activation_type": "uint8",
                "calibration": self.calibrate_method,
                "calibration_samples": len(ctx.calib),
            },
        )


def _table_overrides(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Embedding tables (Gather from a 2-D float initializer) as symmetric int8, like every other
    weight in weight memory: onnxruntime's quantizer would otherwise make them per-tensor
    asymmetric uint8. Per tensor: the Gather's output is quantized with the table's scale in
    onnxruntime's QDQ graph (per_row_table_scales then gives the table's own DequantizeLinear
    that scale once per row)."""
    from onnxruntime.quantization import QuantType

    tables = {weight_input(n) for n in model.graph.node if n.op_type in TABLE_OPS}
    return {name: [{"quant_type": QuantType.QInt8, "symmetric": True}] for name in float_weight_names(model) if name in tables}


def per_row_table_scales(model: onnx.ModelProto) -> int:
    """Give each int8 embedding table's DequantizeLinear its per-tensor scale once per row
    (axis 0), as its own initializers: the same arithmetic (every row's scale is the tensor's,
    and the Gather's output keeps its own QuantizeLinear), but a row's scale can then be
    negated alone, which FAQ's sign choice does for a row whose stuck sign bits disagree with
    its weights. Returns how many tables changed."""
    inits = initializer_map(model)
    dq_of = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    replaced: set[str] = set()  # the per-tensor parameters the tables' DequantizeLinears read before
    changed = 0
    for w in qdq_weights(model):
        if w.op_type not in TABLE_OPS or w.scale.size != 1 or len(w.shape) != 2:
            continue
        dq = dq_of[w.name]
        rows = w.shape[0]
        new = [numpy_helper.from_array(np.full(rows, w.scale.reshape(()), np.float32), f"{w.name}_row_scale")]
        if len(dq.input) > 2 and dq.input[2]:
            zp_dtype = numpy_helper.to_array(inits[dq.input[2]]).dtype
            new.append(numpy_helper.from_array(np.zeros(rows, zp_dtype), f"{w.name}_row_zero_point"))
        for slot, tensor in enumerate(new, 1):
            replaced.add(dq.input[slot])
            dq.input[slot] = tensor.name
        model.graph.initializer.extend(new)
        for a in list(dq.attribute):
            if a.name == "axis":
                dq.attribute.remove(a)
        dq.attribute.append(onnx.helper.make_attribute("axis", 0))
        changed += 1
    still_used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name in replaced and t.name not in still_used]:
        model.graph.initializer.remove(t)
    return changed


def _float_weights_by_int8(fmodel: onnx.ModelProto, qmodel: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Map each int8 weight initializer to its float original, through the consuming node's name."""
    finits = initializer_map(fmodel)
    fnodes = {n.name: n for n in fmodel.graph.node if n.op_type in WEIGHT_OPS}
    out = {}
    for w in qdq_weights(qmodel):
        node = fnodes.get(w.node_name)
        name = weight_input(node) if node is not None else None
        if name in finits:
            arr = numpy_helper.to_array(finits[name])
            if arr.shape == w.shape:
                out[w.name] = arr.astype(np.float32)
    return out
