"""Load, check, simplify and save ONNX models; find the int8 weight table of a QDQ model.

Everything that reads a user's model goes through `load_model`, so a malformed file is one
clear `InputError` (exit 2) and never a protobuf traceback.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError
from .fileio import atomic_path

#: Ops whose weight lives in the accelerator's weight memory (DESIGN.md): input 1 of Conv,
#: ConvTranspose, Gemm and MatMul, and the table of a Gather (an embedding, input 0) when that
#: is a 2-D float initializer. A MatMul between two activations holds no weight.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
#: The ops whose weight memory holds only their weights, not their input (no error feedback).
TABLE_OPS = ("Gather",)


def weight_input(node: onnx.NodeProto) -> str | None:
    """The name of the input holding a weight op's weight (Gather: its table), None otherwise."""
    if node.op_type not in WEIGHT_OPS:
        return None
    i = 0 if node.op_type in TABLE_OPS else 1
    return node.input[i] if len(node.input) > i and node.input[i] else None

#: Per-channel DequantizeLinear (the `axis` attribute) needs opset 13.
MIN_QDQ_OPSET = 13

#: Refuse declared dimensions above this: no real accelerator model has them, and they are a
#: classic way to make a tool allocate itself to death.
MAX_DECLARED_DIM = 1 << 31


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that escape the model's folder (absolute or `..`)."""
    base = base_dir.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        p = Path(location)
        target = (base / p).resolve()
        if p.is_absolute() or ".." in p.parts or base not in target.parents:
            raise InputError(
                f"tensor {tensor.name!r} stores its data at {location!r}, outside the model's folder; refused"
            )
        if not target.is_file():
            raise InputError(f"tensor {tensor.name!r}: external data file {location!r} not found")


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto in the main graph and its subgraphs (initializers and attributes)."""

    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from walk(attr.g)
                for g in attr.graphs:
                    yield from walk(g)

    yield from walk(model.graph)


def _check_declared_shapes(model: onnx.ModelProto) -> None:
    """Refuse absurd declared dimensions, and ConstantOfShape nodes that would make an absurd
    tensor (onnxsim would try to fold them into an initializer)."""
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and not 0 <= d.dim_value < MAX_DECLARED_DIM:
                raise InputError(f"{vi.name!r} declares an absurd dimension {d.dim_value}")
    inits = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in inits:
            continue
        t = inits[node.input[0]]
        if len(t.dims) != 1 or t.dims[0] > 64 or t.data_location == onnx.TensorProto.EXTERNAL:
            continue  # not a shape; the checker and onnxruntime say so
        try:
            shape = [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
        except Exception:  # noqa: BLE001 - a malformed tensor is the checker's to report
            continue
        count = 1
        for v in shape:
            count *= max(v, 0)
        if any(v < 0 for v in shape) or count >= MAX_DECLARED_DIM:
            raise InputError(
                f"node {node.name or node.output[0]!r} (ConstantOfShape) would make a tensor of shape {shape}; refused"
            )


def _check_references(model: onnx.ModelProto) -> None:
    """Every node input of the main graph is a graph input, an initializer or an earlier node's
    output, and the graph has at least one real input (the data is fed to it)."""
    g = model.graph
    inits = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    if not [vi for vi in g.input if vi.name not in inits]:
        raise InputError("invalid ONNX model: the graph declares no inputs (nothing to feed the data to)")
    defined = {vi.name for vi in g.input} | inits | {""}
    made = {o for node in g.node for o in node.output}
    for node in g.node:
        for name in node.input:
            if name in defined:
                continue
            who = f"node {node.name or (node.output[0] if node.output else '?')!r} ({node.op_type})"
            if name in made:
                raise InputError(f"invalid ONNX model: {who} reads {name!r} before the node that makes it "
                                 "(nodes must be in topological order)")
            raise InputError(f"invalid ONNX model: {who} reads {name!r}, which no graph input, initializer "
                             "or node defines")
        defined.update(node.output)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX model; any defect becomes one InputError line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such model file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish types, ...
        raise InputError(f"{p}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not model.graph.node:
        raise InputError(f"{p}: not a valid ONNX model (empty graph)")
    try:
        _check_external_data(model, p.parent)
        _check_declared_shapes(model)
        _check_references(model)
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from None
    try:
        onnx.load_external_data_for_model(model, str(p.parent))
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{p}: invalid ONNX model: {msg[:200]}") from None
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Serialise atomically (temp file + rename). Serialisation is deterministic for a given proto."""
    data = model.SerializeToString(deterministic=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Legacy graphs list initializers as graph inputs; treat them as constants. Returns the count."""
    inits = {t.name for t in model.graph.initializer}
    keep = [vi for vi in model.graph.input if vi.name not in inits]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
        # IR < 4 requires every initializer to be an input; 4 is the first that does not.
        model.ir_version = max(model.ir_version, 4)
    return dropped


_ONNXSIM_LOCK = threading.Lock()


def _import_onnxsim():
    """onnxsim, imported without torch: onnxsim 0.8 imports torch at import time when it is
    installed (for a PPQ bridge harden never calls), which cost a process 180 MB of resident
    memory and a second for the rest of its life (ResNet-50's apply). A torch already imported
    (a notebook, the train extra's passes) is left alone. Under a lock: fleet workers simplify
    from several threads."""
    with _ONNXSIM_LOCK:
        if "onnxsim" in sys.modules or "torch" in sys.modules:
            import onnxsim
            return onnxsim
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
        try:
            import onnxsim
        finally:
            if "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
        return onnxsim


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and clean the graph with onnxsim (folds ConstantOfShape weights, fuses BN)."""
    onnxsim = _import_onnxsim()
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        raise InputError(f"model could not be simplified: {str(exc).splitlines()[0][:200]}") from None
    if not ok:
        raise InputError("model could not be simplified: onnxsim's check failed")
    return simplified


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn tensor-valued Constant nodes into initializers (onnxsim keeps them as nodes), so a
    weight made by a Constant is a weight like any other. Returns the count."""
    keep, moved = [], 0
    for node in model.graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in attr:
            t = onnx.TensorProto()
            t.CopyFrom(attr["value"].t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return moved


def upgrade_opset(model: onnx.ModelProto, target: int = MIN_QDQ_OPSET) -> onnx.ModelProto:
    """Convert to `target` opset when older: per-channel QDQ is invalid before opset 13."""
    if opset_of(model) >= target:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, target)
    except Exception as exc:
        raise InputError(f"cannot upgrade model from opset {opset_of(model)} to {target}: {str(exc)[:200]}") from None


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name."""
    return {t.name: t for t in model.graph.initializer}


def float_weight_names(model: onnx.ModelProto) -> list[str]:
    """Float initializers that are a weight op's weight (weight_input), in order of first consumer."""
    inits = initializer_map(model)
    seen: dict[str, None] = {}
    for node in model.graph.node:
        name = weight_input(node)
        if name in inits and inits[name].data_type == onnx.TensorProto.FLOAT:
            if node.op_type in TABLE_OPS and len(inits[name].dims) != 2:
                continue  # a Gather from a vector or a cube is no embedding table
            seen.setdefault(name, None)
    return list(seen)


def output_channel_axis(op_type: str, attrs: dict, ndim: int) -> int:
    """The axis of a weight op's weight that indexes its output channels (the axis onnxruntime's
    per-channel quantizer uses): Conv 0, ConvTranspose 1, Gemm by transB, MatMul the last; a
    Gather table the last too (its columns are the looked-up vector's features)."""
    if op_type == "Conv":
        return 0
    if op_type == "ConvTranspose":
        return 1
    if op_type == "Gemm":
        return 0 if attrs.get("transB", 0) else 1
    return ndim - 1  # MatMul: [.., in, out]; Gather: [rows, features]


def float_weight_count(model: onnx.ModelProto) -> int:
    """How many float weights quantization will turn into int8 weight-memory words."""
    inits = initializer_map(model)
    return int(sum(np.prod(inits[n].dims) for n in float_weight_names(model)))


@dataclass
class QWeight:
    """One int8 weight tensor of a QDQ model and everything needed to remap it.

    `axis` is the per-channel (output channel) axis of the DequantizeLinear; the bias fields
    name the int32 bias initializer of the consuming op, when there is one.
    """

    name: str  # int8 initializer
    op_type: str  # consuming op
    node_name: str
    activation: str  # the consumer's input 0 (float, after its DequantizeLinear); "" for a Gather table
    scale: np.ndarray  # float32, one per channel (or scalar)
    axis: int
    shape: tuple[int, ...]
    attrs: dict
    bias: str | None = None  # int32 initializer
    bias_scale: np.ndarray | None = None
    scale_name: str = ""  # the DequantizeLinear's scale initializer
    bias_scale_name: str | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def qdq_weights(model: onnx.ModelProto) -> list[QWeight]:
    """The int8 weight table: DequantizeLinear(int8 initializer) -> input 1 of a weight op.

    Order is that of the first consuming node (DESIGN.md's `linear` layout order).
    """
    inits = initializer_map(model)
    dq_by_output = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    table: dict[str, QWeight] = {}
    for node in model.graph.node:
        dq = dq_by_output.get(weight_input(node) or "")
        if dq is None or dq.input[0] not in inits:
            continue
        w = inits[dq.input[0]]
        if w.data_type != onnx.TensorProto.INT8 or dq.input[0] in table:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
        if zp is not None and np.any(zp != 0):
            raise InputError(f"weight {dq.input[0]!r} has a non-zero zero point; harden expects symmetric int8 weights")
        axis = int(_attrs(dq).get("axis", 1))
        bias = bias_scale = bias_scale_name = None
        if node.op_type not in TABLE_OPS and len(node.input) > 2 and node.input[2]:
            bdq = dq_by_output.get(node.input[2])
            if bdq is not None and bdq.input[0] in inits and inits[bdq.input[0]].data_type == onnx.TensorProto.INT32:
                bias, bias_scale_name = bdq.input[0], bdq.input[1]
                bias_scale = numpy_helper.to_array(inits[bias_scale_name]).astype(np.float32)
        act = "" if node.op_type in TABLE_OPS else node.input[0]
        table[dq.input[0]] = QWeight(
            name=dq.input[0],
            op_type=node.op_type,
            node_name=node.name,
            activation=act,
            scale=scale,
            axis=axis if scale.ndim else 0,
            shape=tuple(w.dims),
            attrs=_attrs(node),
            bias=bias,
            bias_scale=bias_scale,
            scale_name=dq.input[1],
            bias_scale_name=bias_scale_name,
        )
    return list(table.values())


CONV_OPS = ("Conv", "ConvTranspose")


def output_positions(model: onnx.ModelProto) -> dict[str, int]:
    """Per node (by its first output): at how many output positions per sample each of its
    weights is used, from onnx's shape inference: a convolution's spatial output size, another
    op's rows per sample (a MatMul's tokens; 1 for a 2-D output); an unknown dimension counts 1,
    a node whose output shape is unknown is left out. A weight's size times this is its
    multiply-adds per sample."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an estimate: the callers count 1 where a shape is missing
        return {}
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in [*inferred.graph.value_info, *inferred.graph.output] if vi.type.tensor_type.HasField("shape")}
    out = {}
    for node in model.graph.node:
        if node.output and node.output[0] in dims:
            shape = dims[node.output[0]]
            positions = shape[2:] if node.op_type in CONV_OPS else shape[1:-1]
            out[node.output[0]] = int(np.prod([d for d in positions if d > 0]))
    return out


def consumers_of(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (once per input slot), in graph order."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    return consumers


def row_axis(w: QWeight) -> int:
    """The weight axis that holds its output channels (a Gemm without transB, a MatMul: 1; an
    embedding table: its rows, the vectors a lookup reads)."""
    conv_like = w.op_type in ("Conv", "ConvTranspose") or w.op_type in TABLE_OPS
    return 0 if conv_like or (w.op_type == "Gemm" and w.attrs.get("transB", 0)) else 1


def channel_sign_scales(model: onnx.ModelProto, table: list[QWeight] | None = None) -> dict[str, tuple[str, ...]]:
    """Per weight whose output channels FAQ may store negated (passes/faq.py, sign choice):
    the scale initializers a negated channel negates, its own and its int32 bias's.

    Those weights have one scale per output channel along that axis (an embedding table: per
    row, passes/quantize.per_row_table_scales), read by no other node, and a bias (if any)
    scaled per channel too. The scales then differ from chip to chip,
    so an evaluator that serves a fleet takes them as values, like the weights
    (simulate.ChipEvaluator)."""
    consumers = consumers_of(model)
    out: dict[str, tuple[str, ...]] = {}
    for w in qdq_weights(model) if table is None else table:
        if w.op_type == "ConvTranspose" or w.scale.size < 2 or w.axis != row_axis(w):
            continue
        names: tuple[str, ...] = (w.scale_name,)
        if w.bias is not None:
            if w.bias_scale is None or w.bias_scale.size != w.scale.size or not w.bias_scale_name:
                continue
            names += (w.bias_scale_name,)
        if all(len(consumers.get(n, [])) == 1 for n in names):
            out[w.name] = names
    return out


def mean_free_tables(model: onnx.ModelProto, table: list[QWeight] | None = None) -> set[str]:
    """Embedding tables (int8 weights read by Gather) whose looked-up rows reach the rest of the
    model only through Adds into a LayerNormalization over the embedding axis (BERT's token and
    position embeddings): adding one value to every element of a row changes nothing the
    normalization outputs, since it subtracts the mean. FAQ uses that freedom (passes/faq.py).
    A QuantizeLinear -> DequantizeLinear pair on the way (the QDQ graph's activations) keeps it up
    to its rounding and its calibrated range, which a shifted row can reach."""
    consumers = consumers_of(model)
    outputs = {o.name for o in model.graph.output}
    nodes = {n.name: n for n in model.graph.node if n.name}

    def normalized(tensor: str, depth: int = 0) -> bool:
        users = consumers.get(tensor, [])
        if tensor in outputs or not users or depth > 8:
            return False
        for n in users:
            if n.op_type in ("Add", "QuantizeLinear", "DequantizeLinear"):
                if (n.op_type != "Add" and n.input[0] != tensor) or not normalized(n.output[0], depth + 1):
                    return False
            elif not (n.op_type == "LayerNormalization" and n.input[0] == tensor and _attrs(n).get("axis", -1) == -1):
                return False
        return True

    out = set()
    for w in qdq_weights(model) if table is None else table:
        gather = nodes.get(w.node_name)
        if w.op_type in TABLE_OPS and gather is not None and _attrs(gather).get("axis", 0) == 0 and normalized(gather.output[0]):
            out.add(w.name)
    return out


def is_qdq_int8(model: onnx.ModelProto) -> bool:
    """True when the model already carries int8 QDQ weights (apply then goes straight to FAQ)."""
    return bool(qdq_weights(model))


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace an initializer's data in place, keeping its name and dtype."""
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            new = numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype, copy=False), name)
            model.graph.initializer[i].CopyFrom(new)
            return
    raise KeyError(name)


def get_initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer as a numpy array."""
    return numpy_helper.to_array(initializer_map(model)[name])


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set (or replace) one metadata_props entry."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """metadata_props as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Legacy clean-up, onnxsim, and the opset upgrade per-channel QDQ needs."""
    record: dict = {"opset_in": opset_of(model)}
    record["initializer_inputs_dropped"] = drop_initializer_inputs(model)
    nodes_in = len(model.graph.node)
    model = simplify(model)
    record["constants_to_initializers"] = constants_to_initializers(model)
    model = upgrade_opset(model)
    record.update(nodes_in=nodes_in, nodes_out=len(model.graph.node), opset_out=opset_of(model))
    return model, record
