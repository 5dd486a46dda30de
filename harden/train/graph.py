"""The ONNX graph executed as a `torch.nn.Module`, one parameter per float initializer.

`OnnxModule(model)` interprets the graph node by node with torch operations, so gradients flow
to every float initializer, and `write_back(model)` copies the (trained) values straight back
into the initializers of the same graph: no re-export, node names and structure unchanged
(DESIGN.md step 3). Not onnx2torch: we need the 1:1 initializer <-> parameter mapping, the
clip pass's ops, and nothing else.

- Parameters: every float initializer (float32, float16, bfloat16, float64), in an
  `nn.ParameterDict` under a sanitised key; `key_of` / `name_of` map ONNX names <-> keys.
  BatchNormalization's running mean and variance are parameters too (so they are written back
  like any other initializer) but with requires_grad=False: statistics are frozen, the node
  always normalises with them (inference semantics in train() and eval() alike).
- Buffers: non-float initializers and Constant nodes (shape tensors, indices, masks).
- Dropout is the identity in both modes (fine-tuning keeps inference semantics).
- Inputs: positional (in the order of the graph's real inputs) or by name; numpy arrays are
  accepted. `forward` returns the graph output (a tuple when the graph has several);
  `run(inputs, outputs=[...])` returns any intermediate tensors by name.
- `overrides[node_name] = fn(node, inputs) -> list of outputs` replaces one node's computation
  (ProAct uses it for the differentiable surrogate of a zeroing clip).

Ops: those of CNNs and MLPs and of the clip pass, plus what legacy exporters emit around them;
shape arithmetic (Shape / Gather / Concat / Reshape ...) runs on int64 tensors at run time.
Anything else is refused at construction with an InputError naming the ops.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import InputError
from . import require_torch

torch = require_torch("the torch graph runner (harden.train)")
nn = torch.nn
F = torch.nn.functional

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
}
_TORCH_DTYPE = {
    **FLOAT_TYPES,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _tensor(arr: np.ndarray) -> "torch.Tensor":
    arr = np.array(arr)  # own, writable copy (torch warns on read-only arrays)
    if arr.dtype == np.uint16:  # not a torch dtype; only shape-ish tensors could be uint16
        arr = arr.astype(np.int32)
    return torch.from_numpy(arr)


def _ints(t) -> list[int]:
    """A shape / axes / pads operand (tensor or list) as Python ints."""
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _present(inputs: list, i: int) -> bool:
    return len(inputs) > i and inputs[i] is not None


# --------------------------------------------------------------------------------------------
# op implementations: fn(inputs: list[Tensor | None], attrs: dict, ctx: _Ctx) -> Tensor | list


class _Ctx:
    def __init__(self, opset: int):
        self.opset = opset


def _sym_or_pad(x, pads: list[int], value: float = 0.0):
    """ONNX pads [b1..bn, e1..en] for the spatial dims: symmetric -> (x, pads per dim), else pad x."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * n


def _auto_pads(attrs, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    n = len(spatial)
    if mode in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * n)))
    if mode == "VALID":
        return [0] * (2 * n)
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        if mode == "SAME_UPPER":
            begin.append(small), end.append(total - small)
        else:
            begin.append(total - small), end.append(small)
    return begin + end


def _conv(inputs, a, ctx):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if _present(inputs, 2) else None
    n = x.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = _auto_pads(a, list(x.shape[2:]), kernel, strides, dil)
    x, pad = _sym_or_pad(x, pads)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return fn(x, w, b, strides, pad, dil, int(a.get("group", 1)))


def _conv_transpose(inputs, a, ctx):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if _present(inputs, 2) else None
    n = x.dim() - 2
    if "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise InputError("ConvTranspose with output_shape or auto_pad is not supported by the torch graph runner")
    pads = list(a.get("pads", [0] * (2 * n)))
    if pads[:n] != pads[n:]:
        raise InputError("ConvTranspose with asymmetric pads is not supported by the torch graph runner")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    return fn(x, w, b, list(a.get("strides", [1] * n)), pads[:n], list(a.get("output_padding", [0] * n)),
              int(a.get("group", 1)), list(a.get("dilations", [1] * n)))


def _gemm(inputs, a, ctx):
    A, B = inputs[0], inputs[1]
    if a.get("transA", 0):
        A = A.transpose(0, 1)
    if a.get("transB", 0):
        B = B.transpose(0, 1)
    y = torch.matmul(A, B)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if _present(inputs, 2):
        c = inputs[2]
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _div(inputs, a, ctx):
    x, y = inputs
    if not x.is_floating_point() and not y.is_floating_point():
        return torch.div(x, y, rounding_mode="trunc")
    return x / y


def _clip(inputs, a, ctx):
    x = inputs[0]
    lo = inputs[1] if _present(inputs, 1) else a.get("min")
    hi = inputs[2] if _present(inputs, 2) else a.get("max")
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype) if isinstance(lo, torch.Tensor) else torch.tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype) if isinstance(hi, torch.Tensor) else torch.tensor(hi, dtype=x.dtype))
    return x


def _variadic(fn):
    def run(inputs, a, ctx):
        out = inputs[0]
        for t in inputs[1:]:
            out = fn(out, t)
        return out

    return run


def _cast(inputs, a, ctx):
    to = int(a["to"])
    if to not in _TORCH_DTYPE:
        raise InputError(f"Cast to ONNX type {onnx.TensorProto.DataType.Name(to)} is not supported by the torch graph runner")
    return inputs[0].to(_TORCH_DTYPE[to])


def _batchnorm(inputs, a, ctx):
    x, scale, bias, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, momentum=0.0, eps=float(a.get("epsilon", 1e-5)))


def _pool_geometry(x, a):
    n = x.dim() - 2
    kernel = list(a["kernel_shape"])
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = _auto_pads(a, list(x.shape[2:]), kernel, strides, dil)
    return n, kernel, strides, dil, pads


def _maxpool(inputs, a, ctx):
    x = inputs[0]
    n, kernel, strides, dil, pads = _pool_geometry(x, a)
    sym = pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel))
    if not sym:
        x, pad = _sym_or_pad(x, pads, value=-math.inf)
    else:
        pad = pads[:n]
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return fn(x, kernel, strides, pad, dil, ceil_mode=bool(a.get("ceil_mode", 0)))


def _avgpool(inputs, a, ctx):
    x = inputs[0]
    n, kernel, strides, dil, pads = _pool_geometry(x, a)
    if any(d != 1 for d in dil):
        raise InputError("AveragePool with dilations is not supported by the torch graph runner")
    include = bool(a.get("count_include_pad", 0))
    ceil = bool(a.get("ceil_mode", 0))
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    if pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel)):
        return fn(x, kernel, strides, pads[:n], ceil, include)
    xp, _ = _sym_or_pad(x, pads)
    if include:
        return fn(xp, kernel, strides, 0, ceil, True)
    ones, _ = _sym_or_pad(torch.ones_like(x[:1, :1]), pads)
    return fn(xp, kernel, strides, 0, ceil, True) / fn(ones, kernel, strides, 0, ceil, True)


def _global_avg(inputs, a, ctx):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max(inputs, a, ctx):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def _flatten(inputs, a, ctx):
    x = inputs[0]
    axis = int(a.get("axis", 1))
    if axis < 0:
        axis += x.dim()
    outer = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(outer, -1)


def _reshape(inputs, a, ctx):
    x = inputs[0]
    shape = _ints(inputs[1]) if _present(inputs, 1) else list(a["shape"])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _transpose(inputs, a, ctx):
    x = inputs[0]
    perm = list(a.get("perm", reversed(range(x.dim()))))
    return x.permute(perm)


def _concat(inputs, a, ctx):
    ts = [t for t in inputs if t is not None]
    return torch.cat(ts, dim=int(a["axis"]))


def _softmax(log: bool):
    def run(inputs, a, ctx):
        x = inputs[0]
        fn = torch.log_softmax if log else torch.softmax
        if ctx.opset >= 13:
            return fn(x, dim=int(a.get("axis", -1)))
        axis = int(a.get("axis", 1))
        if axis < 0:
            axis += x.dim()
        shape = x.shape
        flat = x.reshape(int(np.prod(shape[:axis])) if axis else 1, -1)
        return fn(flat, dim=1).reshape(shape)

    return run


def _dropout(inputs, a, ctx):
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)]


def _pad(inputs, a, ctx):
    x = inputs[0]
    if _present(inputs, 1):
        pads = _ints(inputs[1])
        value = inputs[2] if _present(inputs, 2) else None
        value = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
        axes = _ints(inputs[3]) if _present(inputs, 3) else None
    else:
        pads = list(a["pads"])
        value = float(a.get("value", 0.0))
        axes = None
    rank = x.dim()
    if axes is not None:
        axes = [ax + rank if ax < 0 else ax for ax in axes]
        full = [0] * (2 * rank)
        for i, ax in enumerate(axes):
            full[ax], full[rank + ax] = pads[i], pads[len(axes) + i]
        pads = full
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    flat: list[int] = []
    for d in reversed(range(rank)):
        flat += [pads[d], pads[rank + d]]
    while len(flat) > 2 and flat[-1] == 0 and flat[-2] == 0:
        flat = flat[:-2]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise InputError(f"Pad mode {mode!r} is not supported by the torch graph runner")
    if torch_mode == "constant":
        return F.pad(x, flat, mode="constant", value=value)
    return F.pad(x, flat, mode=torch_mode)


def _axes(inputs, a, i: int = 1):
    if _present(inputs, i):
        return _ints(inputs[i])
    return list(a["axes"]) if "axes" in a else None


def _squeeze(inputs, a, ctx):
    x = inputs[0]
    axes = _axes(inputs, a)
    if axes is None:
        return torch.squeeze(x)
    return torch.squeeze(x, dim=tuple(ax + x.dim() if ax < 0 else ax for ax in axes))


def _unsqueeze(inputs, a, ctx):
    x = inputs[0]
    axes = _axes(inputs, a)
    rank = x.dim() + len(axes)
    for ax in sorted(ax + rank if ax < 0 else ax for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _shape(inputs, a, ctx):
    shape = list(inputs[0].shape)
    start, end = a.get("start", 0), a.get("end", None)
    return torch.tensor(shape[start:end], dtype=torch.int64)


def _size(inputs, a, ctx):
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


def _gather(inputs, a, ctx):
    x, idx = inputs
    axis = int(a.get("axis", 0))
    if axis < 0:
        axis += x.dim()
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))


def _expand(inputs, a, ctx):
    """ONNX Expand broadcasts both ways (a 1 in the shape keeps the input's size), unlike
    torch's expand: broadcast against a tensor of the asked shape."""
    x, shape = inputs
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(target)


def _layer_norm(inputs, a, ctx):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if _present(inputs, 2) else None
    axis = int(a.get("axis", -1))
    if axis < 0:
        axis += x.dim()
    return torch.nn.functional.layer_norm(x, tuple(x.shape[axis:]), scale.expand(x.shape[axis:]),
                                          None if bias is None else bias.expand(x.shape[axis:]),
                                          eps=float(a.get("epsilon", 1e-5)))


def _gelu(inputs, a, ctx):
    return torch.nn.functional.gelu(inputs[0], approximate=a.get("approximate", b"none").decode()
                                    if isinstance(a.get("approximate"), bytes) else a.get("approximate", "none"))


def _constant_of_shape(inputs, a, ctx):
    shape = _ints(inputs[0])
    value = a.get("value")
    arr = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return torch.full(shape, _tensor(arr).reshape(-1)[0].item(), dtype=_tensor(arr).dtype)


def _slice(inputs, a, ctx):
    x = inputs[0]
    if _present(inputs, 1):
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if _present(inputs, 3) else list(range(len(starts)))
        steps = _ints(inputs[4]) if _present(inputs, 4) else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if ax < 0:
            ax += x.dim()
        rng = range(*slice(s, e, st).indices(x.shape[ax]))
        if st == 1:
            x = x.narrow(ax, rng.start, len(rng))
        else:
            x = torch.index_select(x, ax, torch.tensor(list(rng), dtype=torch.int64))
    return x


def _reduce(fn_name: str):
    def run(inputs, a, ctx):
        x = inputs[0]
        axes = _axes(inputs, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        dims = tuple(ax + x.dim() if ax < 0 else ax for ax in axes)
        if fn_name == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if fn_name == "sum":
            return x.sum(dim=dims, keepdim=keep)
        if fn_name == "max":
            return x.amax(dim=dims, keepdim=keep)
        return x.amin(dim=dims, keepdim=keep)

    return run


def _split(inputs, a, ctx):
    x = inputs[0]
    axis = int(a.get("axis", 0))
    if _present(inputs, 1):
        sizes = _ints(inputs[1])
    elif "split" in a:
        sizes = list(a["split"])
    else:
        parts = int(a.get("num_outputs", ctx.n_outputs))
        size = -(-x.shape[axis] // parts)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    return list(torch.split(x, sizes, dim=axis))


def _lrn(inputs, a, ctx):
    return F.local_response_norm(inputs[0], int(a["size"]), float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)),
                                 float(a.get("bias", 1.0)))


def _leaky_relu(inputs, a, ctx):
    return F.leaky_relu(inputs[0], float(a.get("alpha", 0.01)))


def _hard_sigmoid(inputs, a, ctx):
    return torch.clamp(inputs[0] * float(a.get("alpha", 0.2)) + float(a.get("beta", 0.5)), 0.0, 1.0)


def _unary(fn):
    return lambda inputs, a, ctx: fn(inputs[0])


def _binary(fn):
    return lambda inputs, a, ctx: fn(inputs[0], inputs[1])


def _mean(inputs, a, ctx):
    return _variadic(torch.add)(inputs, a, ctx) / len(inputs)


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Min": _variadic(torch.minimum),
    "Max": _variadic(torch.maximum),
    "Relu": _unary(torch.relu),
    "LeakyRelu": _leaky_relu,
    "Sigmoid": _unary(torch.sigmoid),
    "HardSigmoid": _hard_sigmoid,
    "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Erf": _unary(torch.erf),
    "Clip": _clip,
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "Equal": _binary(torch.eq),
    "Not": _unary(torch.logical_not),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Where": lambda inputs, a, ctx: torch.where(inputs[0], inputs[1], inputs[2]),
    "Cast": _cast,
    "BatchNormalization": _batchnorm,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": _global_avg,
    "GlobalMaxPool": _global_max,
    "LRN": _lrn,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Softmax": _softmax(False),
    "LogSoftmax": _softmax(True),
    "Identity": _unary(lambda x: x),
    "Dropout": _dropout,
    "Pad": _pad,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Size": _size,
    "Gather": _gather,
    "Expand": _expand,
    "LayerNormalization": _layer_norm,
    "Gelu": _gelu,
    "HardSwish": _unary(torch.nn.functional.hardswish),
    "ConstantOfShape": _constant_of_shape,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
}

SUPPORTED_OPS = tuple(sorted(OPS) + ["Constant"])


def _sanitise(name: str, taken: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
    if key[0].isdigit():
        key = "_" + key
    base, i = key, 1
    while key in taken:
        key = f"{base}_{i}"
        i += 1
    taken.add(key)
    return key


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types (domain-qualified outside the default domain) the runner cannot execute."""
    bad = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            bad.add(f"{node.domain}.{node.op_type}")
        elif node.op_type not in OPS and node.op_type != "Constant":
            bad.add(node.op_type)
    return sorted(bad)


class OnnxModule(nn.Module):
    """An ONNX graph as a torch module; see the module docstring."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        bad = unsupported_ops(model)
        if bad:
            raise InputError(
                f"the torch graph runner (harden.train) does not support op(s) {', '.join(bad)}; "
                f"supported: {', '.join(SUPPORTED_OPS)}"
            )
        g = model.graph
        self.opset = _opset(model)
        self._ctx = _Ctx(self.opset)
        self.params = nn.ParameterDict()
        self.consts = nn.Module()  # buffers: non-float initializers and Constant outputs
        self.key_of: dict[str, str] = {}
        self.name_of: dict[str, str] = {}
        self._const_key: dict[str, str] = {}
        self._float_dtype: dict[str, int] = {}
        taken: set[str] = set()
        frozen = {n for node in g.node if node.op_type == "BatchNormalization" for n in node.input[3:5]}
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            key = _sanitise(t.name, taken)
            if t.data_type in FLOAT_TYPES:
                tensor = _tensor(arr).to(FLOAT_TYPES[t.data_type])
                self.params[key] = nn.Parameter(tensor, requires_grad=t.name not in frozen)
                self.key_of[t.name], self.name_of[key] = key, t.name
                self._float_dtype[t.name] = t.data_type
            else:
                self.consts.register_buffer(key, _tensor(arr))
                self._const_key[t.name] = key
        self.frozen = frozenset(n for n in frozen if n in self.key_of)
        self._nodes: list[tuple[onnx.NodeProto, dict]] = []
        for i, node in enumerate(g.node):
            a = _attrs(node)
            if node.op_type == "Constant":
                self._add_constant(node, a, taken)
                continue
            self._nodes.append((node, a))
        inits = {t.name for t in g.initializer}
        self.input_names = [vi.name for vi in g.input if vi.name not in inits]
        self.output_names = [vi.name for vi in g.output]
        self.overrides: dict[str, Callable] = {}
        self.node_names = [n.name for n, _ in self._nodes]

    def _add_constant(self, node, a, taken) -> None:
        if "value" in a:
            arr = numpy_helper.to_array(a["value"])
        elif "value_float" in a:
            arr = np.array(a["value_float"], np.float32)
        elif "value_floats" in a:
            arr = np.array(a["value_floats"], np.float32)
        elif "value_int" in a:
            arr = np.array(a["value_int"], np.int64)
        elif "value_ints" in a:
            arr = np.array(a["value_ints"], np.int64)
        else:
            raise InputError(f"Constant node {node.name or node.output[0]!r}: only tensor, float(s) and int(s) values are supported")
        key = _sanitise(node.output[0], taken)
        self.consts.register_buffer(key, _tensor(arr))
        self._const_key[node.output[0]] = key

    # ---- parameters <-> ONNX names --------------------------------------------------------

    def parameter(self, onnx_name: str) -> "nn.Parameter":
        """The parameter behind a float initializer."""
        return self.params[self.key_of[onnx_name]]

    def onnx_parameters(self) -> dict[str, "nn.Parameter"]:
        """Float initializer name -> parameter (graph order)."""
        return {name: self.params[key] for name, key in self.key_of.items()}

    def weight_names(self) -> list[str]:
        """Float initializers used as input 1 of Conv / ConvTranspose / Gemm / MatMul (graph order)."""
        seen: dict[str, None] = {}
        for node, _ in self._nodes:
            if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in self.key_of:
                seen.setdefault(node.input[1], None)
        return list(seen)

    def weight_nodes(self) -> dict[str, tuple[onnx.NodeProto, dict]]:
        """Weight initializer name -> (first consuming node, its attributes)."""
        out: dict[str, tuple[onnx.NodeProto, dict]] = {}
        for node, a in self._nodes:
            if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in self.key_of:
                out.setdefault(node.input[1], (node, a))
        return out

    def state_numpy(self) -> dict[str, np.ndarray]:
        """Every float initializer's current value as numpy (a copy)."""
        return {name: p.detach().cpu().numpy().copy() for name, p in self.onnx_parameters().items()}

    def load_numpy(self, values: dict[str, np.ndarray]) -> None:
        """Set parameters from numpy arrays keyed by ONNX name."""
        with torch.no_grad():
            for name, v in values.items():
                p = self.parameter(name)
                p.copy_(torch.from_numpy(np.asarray(v)).to(p.dtype))

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` whose float initializers hold this module's parameter values.

        Only initializer values change (same names, dims, data types; nodes untouched). Every
        parameter must have an initializer of the same name and shape in `model`.
        """
        out = onnx.ModelProto()
        out.CopyFrom(model)
        by_name = {t.name: t for t in out.graph.initializer}
        for name, p in self.onnx_parameters().items():
            t = by_name.get(name)
            if t is None:
                raise InputError(f"write_back: the model has no initializer {name!r}")
            arr = p.detach().cpu()
            if tuple(t.dims) != tuple(arr.shape):
                raise InputError(f"write_back: initializer {name!r} has shape {tuple(t.dims)}, the parameter {tuple(arr.shape)}")
            if arr.dtype == torch.bfloat16:
                arr = arr.float()
            np_arr = arr.numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), copy=False)
            if t.data_type == onnx.TensorProto.BFLOAT16:
                raise InputError(f"write_back: bfloat16 initializer {name!r} is not supported")
            new = numpy_helper.from_array(np.ascontiguousarray(np_arr), name)
            t.ClearField("float_data")
            t.ClearField("double_data")
            t.ClearField("int32_data")
            t.raw_data = new.raw_data
        return out

    # ---- execution ------------------------------------------------------------------------

    def _feeds(self, args, kwargs) -> dict[str, "torch.Tensor"]:
        if len(args) > len(self.input_names):
            raise TypeError(f"the graph has {len(self.input_names)} input(s), got {len(args)} positional")
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TypeError(f"missing graph input(s) {missing}")
        return {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))) for k, v in feeds.items()}

    def run(
        self,
        inputs: dict[str, Any],
        outputs: list[str] | None = None,
        values: dict[str, "torch.Tensor"] | None = None,
    ) -> dict[str, "torch.Tensor"]:
        """Execute the graph; return the named tensors (default: the graph outputs).

        `values` stands in for initializers by ONNX name for this run only (fine-tuning feeds
        fake-quantized or perturbed weights this way; gradients flow through them).
        """
        env: dict[str, Any] = {"": None}
        for name, key in self.key_of.items():
            env[name] = self.params[key]
        for name, key in self._const_key.items():
            env[name] = getattr(self.consts, key)
        if values:
            env.update(values)
        env.update(self._feeds((), inputs))
        wanted = list(outputs or self.output_names)
        for node, a in self._nodes:
            args = [env[i] if i else None for i in node.input]
            fn = self.overrides.get(node.name)
            if fn is not None:
                result = fn(node, args)
            else:
                self._ctx.n_outputs = len(node.output)
                result = OPS[node.op_type](args, a, self._ctx)
            if isinstance(result, torch.Tensor):
                result = [result]
            for name, value in zip(node.output, result):
                if name:
                    env[name] = value
        missing = [n for n in wanted if n not in env]
        if missing:
            raise KeyError(f"tensor(s) {missing} are not computed by the graph")
        return {n: env[n] for n in wanted}

    def forward(self, *args, **kwargs):
        feeds = self._feeds(args, kwargs)
        out = self.run(feeds)
        values = [out[n] for n in self.output_names]
        return values[0] if len(values) == 1 else tuple(values)
