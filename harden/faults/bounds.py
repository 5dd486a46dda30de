"""Sound per-sample bounds on how far changed weights move a float model's output.

Most float32 bit flips change a weight by a few parts in a million (a low mantissa bit), or
change a weight of a late layer whose effect on the logits is small; a trial made only of such
flips changes no prediction, yet finding that out costs an inference pass. `OutputBound` proves
it instead, without running the trial, for the graphs it can bound (convolutional networks:
Conv, Gemm and MatMul with constant weights, element-wise activations, residual Add / Sum,
pooling, BatchNormalization, Flatten / batch-preserving Reshape, Softmax):

- each weight layer's operator norm, the largest factor by which it can stretch a change of one
  sample's input (2-norm): a Gemm's or MatMul's weight matrix's largest singular value; a
  convolution's from its kernel's Fourier symbol on a grid as large as its padded input (a
  zero-padded, strided convolution is a restriction of the circular one on that grid, whose
  singular values are those of the kernel's per-frequency Cout x Cin matrices: Sedghi, Gupta &
  Long, "The singular values of convolutional layers", ICLR 2019), with cheaper upper bounds
  (Schur's test) where the exact one would cost too much;
- a changed weight layer W' = W + D turns the clean input a into a' and W a into W' a' =
  W a + W'(a' - a) + D a, so ||W'a' - Wa|| <= (||W|| + sum |d_f|) ||a' - a|| + sum |d_f| ||a[c_f]||:
  each changed weight d_f reads one input channel c_f (a shifted copy of it, never larger), and
  each channel's norm per sample is measured once, on the clean data;
- every other op passes the per-sample bound on with its Lipschitz constant (ReLU 1, an Add the
  sum of its inputs', global average pooling 1 / sqrt(positions), ...).

A trial is harmless when, for every sample, the bound eps on the change of the model's output
leaves the clean top-1 where it is: top-1 logit minus runner-up > sqrt(2) eps + an allowance for
float32 rounding (ROUNDING of the sample's largest logit; the bound itself is exact arithmetic).
Its predictions are then the clean ones without an inference pass (the campaign counts such
trials in its report). A graph with any other op downstream of a weight (attention, layer
normalization, a product of two activations, an embedding table) gets no bound: every trial
runs. Written here: no library bounds a whole ONNX graph's sensitivity to its weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..data import Dataset
from ..model import weight_input
from ..runtime import capture
from .base import TensorFaults

#: The float32 rounding allowed for, as a fraction of a sample's largest logit: a trial is
#: certified only where the bound leaves the clean top-1 ahead by more than this (float32 sums
#: of a few hundred products carry relative errors near 1e-5; ten times that, and more).
ROUNDING = 1e-3
#: Multiply-adds a convolution's exact operator norm (an SVD per frequency) may cost before a
#: cheaper upper bound (Schur's test per frequency, then per kernel position) stands in.
EXACT_NORM_WORK = 3e8
#: Complex entries of a convolution's per-frequency matrices held at once (16 bytes each).
SYMBOL_ENTRIES = 4e6
#: Networks with more weight layers get no bound: the bound multiplies the layers' operator
#: norms along every path, so it grows with depth until nothing certifies, and its set-up (an
#: inference pass, the norms) is then pure cost. Measured: ResNet-50 (54 layers) certified none
#: of 300 trials at 1e-8 and 1e-7 (8 and 81 flips) after 7 to 10 s of set-up; the zoo's MobileNetV2
#: (17) 42 of the 124 trials that hit a weight at 1e-6, the residual CNN (6) 61 of 200 at 1e-5.
MAX_LAYERS = 32

#: Ops that change each element alone, and their Lipschitz constants (largest slope).
_UNARY = {"Relu": 1.0, "Identity": 1.0, "Dropout": 1.0, "Tanh": 1.0, "Sigmoid": 0.25, "Softplus": 1.0,
          "Softsign": 1.0, "Neg": 1.0, "Abs": 1.0, "HardSwish": 1.5, "Gelu": 1.13, "Clip": 1.0}
#: Ops whose output keeps each sample's values (reordered, some dropped or zeros added): 1.
_SHAPE = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Pad", "Slice"}
#: Ops whose output never depends on a tensor's values.
_VALUE_FREE = {"Shape", "Size"}


@dataclass(frozen=True)
class _Step:
    """One node's rule: out's bound = factor x (the sum of its inputs' bounds), or, for a
    weight layer (`weight` set), the weight rule of the module doc."""

    out: str
    ins: tuple[str, ...]
    factor: float
    weight: str | None = None


@dataclass(frozen=True)
class _WeightUse:
    """A weight layer reading a flippable weight: its step, and how a flat index of the weight
    maps to the input channel that weight reads (`channel`)."""

    step: int
    kind: str  # "conv" (weight [Cout, Cin/g, ...]), "rows" (W[K, O]), "cols" (W[O, K])
    shape: tuple[int, ...]
    group: int
    scale: float  # Gemm's |alpha|

    def channel(self, index: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            cout, cin_g = self.shape[:2]
            size = int(np.prod(self.shape[2:], dtype=np.int64))
            co = index // (cin_g * size)
            return (co // (cout // self.group)) * cin_g + (index // size) % cin_g
        if self.kind == "rows":
            k, o = self.shape[-2:]
            return (index // o) % k
        return index % self.shape[-1]


class OutputBound:
    """Per-sample bounds on the change of a float model's first output under weight changes,
    and which trials they prove harmless. Build with `OutputBound.of(...)` (None when the graph
    is beyond it)."""

    def __init__(self, steps: list[_Step], uses: dict[str, list[_WeightUse]], norms: dict[int, np.ndarray],
                 output: str, clean_logits: np.ndarray, seconds: float):
        self.steps = steps
        self.uses = uses
        self.norms = norms
        self.output = output
        logits = np.asarray(clean_logits, np.float64)
        top2 = np.sort(logits, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        allowance = ROUNDING * np.abs(logits).max(axis=1) + 1e-6
        # a NaN or a tie (margin 0) can never be certified
        self.room = np.where(np.isfinite(margin) & np.isfinite(allowance), margin - allowance, -np.inf) / math.sqrt(2.0)
        self.seconds = seconds

    @classmethod
    def of(cls, model: onnx.ModelProto, data: Dataset, clean_logits: np.ndarray, names: Sequence[str],
           batch: int | None = None) -> "OutputBound | None":
        """The bound for `names` (float32 weight initializers) of a float model that is ready to
        run, on `data` whose clean first output is `clean_logits` ([samples, classes]); None
        when the graph holds an op it cannot bound downstream of a weight."""
        t0 = time.perf_counter()
        logits = np.asarray(clean_logits)
        if logits.ndim != 2 or logits.shape[1] < 2 or not len(model.graph.output):
            return None
        names = set(names)
        layers = sum(1 for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul") and weight_input(node) in names)
        if layers > MAX_LAYERS:
            return None
        shapes = _shapes(model)
        plan = _plan(model, names, shapes)
        if plan is None:
            return None
        steps, uses, inputs = plan
        norms = _channel_norms(model, data, inputs, batch)
        return cls(steps, uses, norms, model.graph.output[0].name, logits, time.perf_counter() - t0)

    def output_change(self, injections: Sequence, values: dict[str, np.ndarray]) -> np.ndarray:
        """[trials, samples]: a bound on ||output change||_2 of each sample under each injection
        (faults.Injection, applied to the clean `values`); inf where a changed weight is not
        finite. A trial that changes nothing gets zeros."""
        n = self.room.size
        trials = len(injections)
        hits: dict[str, list[tuple[int, object]]] = {}  # tensor -> (trial, TensorFaults), gathered per tensor
        for t, inj in enumerate(injections):
            for tf in getattr(inj, "tensors", None) or ():
                hits.setdefault(tf.name, []).append((t, tf))
        finite = np.ones(trials, bool)
        flips: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}  # step -> (trial, channel, |d|)
        for name, items in hits.items():
            index = np.concatenate([np.asarray(tf.index) for _, tf in items])
            trial = np.concatenate([np.full(len(tf.index), t) for t, tf in items])
            old = np.ascontiguousarray(values[name]).reshape(-1)[index]
            masks = {}
            for kind in ("flip", "sa0", "sa1"):  # one read for the whole group (a missing mask is a no-op)
                if any(getattr(tf, kind) is not None for _, tf in items):
                    masks[kind] = np.concatenate([getattr(tf, kind) if getattr(tf, kind) is not None
                                                  else np.zeros(len(tf.index), np.uint32) for _, tf in items])
            new = TensorFaults(name, index, **masks).read(old.view(np.uint32)).view(np.float32)
            d = np.abs(new.astype(np.float64) - old.astype(np.float64))
            bad = ~np.isfinite(d)
            if bad.any():
                finite[np.unique(trial[bad])] = False
                d[bad] = 0.0
            for use in self.uses.get(name, ()):
                flips.setdefault(use.step, []).append((trial, use.channel(index), use.scale * d))
        eps: dict[str, np.ndarray] = {}
        for i, st in enumerate(self.steps):
            parts = [eps[x] for x in st.ins if x in eps]
            out = sum(parts[1:], parts[0]) if parts else None
            if st.weight is not None and i in flips:
                t, ch, d = (np.concatenate(a) for a in zip(*flips[i]))
                norms = self.norms[i]  # [samples, channels]
                added = np.zeros((trials, n))
                np.add.at(added, t, (norms[:, ch] * d).T)  # sum_f |d_f| ||a[c_f]||
                if out is not None:
                    out = out * (st.factor + np.bincount(t, d, minlength=trials))[:, None]
                out = added if out is None else out + added
            elif out is not None:
                out = out * st.factor
            if out is not None:
                eps[st.out] = out
        bound = eps.get(self.output, np.zeros((trials, n)))
        bound[~finite] = np.inf
        return bound

    def settled(self, injections: Sequence, values: dict[str, np.ndarray]) -> np.ndarray:
        """[trials, samples]: where the bound proves the sample's top-1 unchanged (None and an
        injection that changes nothing: every sample)."""
        if not len(injections):
            return np.zeros((0, self.room.size), bool)
        with np.errstate(over="ignore", invalid="ignore"):
            return self.output_change(injections, values) < self.room

    def harmless(self, injections: Sequence, values: dict[str, np.ndarray]) -> np.ndarray:
        """Per injection: whether the bound proves that no sample's top-1 can change."""
        return np.all(self.settled(injections, values), axis=1)

    def summary(self) -> dict:
        """What a report says of the bound."""
        return {"weight_layers": len(self.norms), "seconds": round(self.seconds, 3), "rounding": ROUNDING}


# --- the plan: one rule per node downstream of a weight ---------------------------------------


def _plan(model: onnx.ModelProto, names: set[str], shapes: dict[str, "_Dims"]) -> tuple[list[_Step], dict[str, list[_WeightUse]], dict[int, tuple[str, str]]] | None:
    """The steps, the weight uses by weight name, and per weight step (its input, the reduction
    its channel norms need); None when a node downstream of a weight has no rule."""
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                consts[node.output[0]] = value
    steps: list[_Step] = []
    uses: dict[str, list[_WeightUse]] = {}
    inputs: dict[int, tuple[str, str]] = {}
    moved: set[str] = set()  # tensors a weight change can move
    for node in g.node:
        w = weight_input(node)
        slot = 1 if node.op_type in ("Conv", "Gemm", "MatMul") else None
        if any(x in names and i != slot for i, x in enumerate(node.input)):
            return None  # a flippable weight read as data too: its change would go unbounded
        data_in = [x for x in node.input if x in moved]
        if node.op_type in ("Conv", "Gemm", "MatMul") and w in consts and node.input[0] not in consts:
            if w in moved or any(x in moved for x in node.input[2:]):
                return None
            rule = _weight_rule(node, _array(consts[w]), shapes.get(node.input[0]))
            if rule is None:
                if w in names or data_in:
                    return None
                continue
            norm, kind, reduce, group, scale = rule
            steps.append(_Step(node.output[0], (node.input[0],) if data_in else (), norm, w))
            if w in names:
                uses.setdefault(w, []).append(_WeightUse(len(steps) - 1, kind, tuple(consts[w].dims), group, scale))
                inputs[len(steps) - 1] = (node.input[0], reduce)
            moved.add(node.output[0])
            continue
        if w in names:
            return None  # a flippable weight read by an op without a weight rule (an embedding table)
        if not data_in or node.op_type in _VALUE_FREE:
            continue
        factor = _factor(node, data_in, consts, shapes)
        if factor is None or len(node.output) != 1:
            return None
        steps.append(_Step(node.output[0], tuple(data_in), factor))
        moved.add(node.output[0])
    return steps, uses, inputs


def _weight_rule(node: onnx.NodeProto, w: np.ndarray, in_shape: list[int] | None):
    """(operator norm, channel kind, channel-norm reduction, group, |alpha|) of a weight layer,
    None when it is not one this module bounds."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    w = w.astype(np.float64)
    if node.op_type == "Conv":
        group = int(a.get("group", 1))
        spatial = None if in_shape is None or len(in_shape) != w.ndim else in_shape[2:]
        pads = list(a.get("pads", [0] * (2 * (w.ndim - 2))))
        dil = list(a.get("dilations", [1] * (w.ndim - 2)))
        return conv_operator_norm(w, group, spatial, pads, dil), "conv", "channels", group, 1.0
    if node.op_type == "Gemm":
        if a.get("transA", 0) or w.ndim != 2:
            return None
        scale = abs(float(a.get("alpha", 1.0)))
        kind = "cols" if a.get("transB", 0) else "rows"
        return scale * _spectral(w), kind, "elements", 1, scale
    # MatMul: x [N, ..., K] @ W [..., K, O]
    if w.ndim < 2 or in_shape is None or len(in_shape) < 2:
        return None
    if w.ndim > 2 and len(in_shape) < w.ndim:
        return None
    mats = w.reshape(-1, *w.shape[-2:])
    return max(_spectral(m) for m in mats), "rows", "features", 1, 1.0


def _factor(node: onnx.NodeProto, data_in: list[str], consts: dict, shapes: dict) -> float | None:
    """The Lipschitz factor of a node that is not a weight layer (None: not bounded here)."""
    op = node.op_type
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    if op in _UNARY and node.input[0] in data_in:
        return _UNARY[op]
    if op == "LeakyRelu":
        return max(1.0, abs(float(a.get("alpha", 0.01))))
    if op in ("Elu", "Celu"):
        return max(1.0, abs(float(a.get("alpha", 1.0))))
    if op == "HardSigmoid":
        return abs(float(a.get("alpha", 0.2)))
    if op in ("Add", "Sub", "Sum"):
        return 1.0
    if op == "Mean":
        return 1.0 / len(node.input)
    if op in ("Mul", "Div"):
        if len(data_in) != 1 or node.input[0] not in data_in and op == "Div":
            return None  # a product of two moved tensors, or something divided by one
        other = node.input[1] if node.input[0] in data_in else node.input[0]
        if other not in consts:
            return None
        c = np.abs(_array(consts[other]).astype(np.float64))
        if not c.size or not np.all(np.isfinite(c)):
            return None
        if op == "Div":
            return float(1.0 / c.min()) if c.min() > 0 else None
        return float(c.max())
    if op == "BatchNormalization":
        try:
            scale, var = (_array(consts[node.input[i]]).astype(np.float64) for i in (1, 4))
        except KeyError:
            return None
        return float(np.max(np.abs(scale) / np.sqrt(var + float(a.get("epsilon", 1e-5)))))
    if op in ("Softmax", "GlobalMaxPool"):
        return 1.0 if _batch_kept(node, a) else None
    if op in _SHAPE:
        return 1.0 if _keeps_samples(node, a, consts, shapes) else None
    if op == "Concat":
        rank = len(shapes.get(node.output[0]) or [])
        axis = int(a.get("axis", 0))
        return 1.0 if rank and axis % rank != 0 else None  # sqrt(sum eps^2) <= sum eps
    if op == "GlobalAveragePool":
        shape = shapes.get(node.input[0])
        positions = int(np.prod(shape[2:])) if shape and all(d > 0 for d in shape[2:]) else 1
        return 1.0 / math.sqrt(positions)
    if op in ("MaxPool", "AveragePool"):
        k = list(a.get("kernel_shape", []))
        s = list(a.get("strides", [1] * len(k)))
        d = list(a.get("dilations", [1] * len(k)))
        if not k or any(x != 1 for x in d):
            return None
        # each input sits in at most prod(ceil(k / s)) windows; a window's max or mean moves by
        # at most the largest change in it
        return math.sqrt(float(np.prod([math.ceil(kk / ss) for kk, ss in zip(k, s)])))
    return None


def _batch_kept(node: onnx.NodeProto, a: dict) -> bool:
    return node.op_type != "Softmax" or int(a.get("axis", -1)) != 0


def _keeps_samples(node: onnx.NodeProto, a: dict, consts: dict, shapes: dict) -> bool:
    """Whether a reshaping op leaves axis 0 (the samples) alone."""
    op = node.op_type
    if op == "Flatten":
        return int(a.get("axis", 1)) >= 1
    if op == "Transpose":
        perm = list(a.get("perm", []))
        return bool(perm) and perm[0] == 0
    if op in ("Squeeze", "Unsqueeze"):
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in consts:
            axes = _array(consts[node.input[1]]).tolist()
        return axes is not None and 0 not in list(axes) and (op == "Unsqueeze" or -len(shapes.get(node.input[0]) or [0]) not in list(axes))
    if op == "Pad":
        mode = a.get("mode", b"constant")
        return mode in (b"constant", "constant") and _first_dim_kept(node, shapes)
    if op == "Slice":
        axes = _array(consts[node.input[3]]).tolist() if len(node.input) > 3 and node.input[3] in consts else None
        return axes is not None and 0 not in axes and _first_dim_kept(node, shapes)
    return _first_dim_kept(node, shapes)  # Reshape: the samples stay on axis 0, as many


def _first_dim_kept(node: onnx.NodeProto, shapes: dict) -> bool:
    src, dst = shapes.get(node.input[0], "?"), shapes.get(node.output[0], "?")
    return isinstance(src, _Dims) and isinstance(dst, _Dims) and src.first == dst.first


class _Dims(list):
    """A tensor's inferred dims (0 where unknown) and its first dim's value or symbol."""

    first: object = None


def _shapes(model: onnx.ModelProto) -> dict[str, _Dims]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read gets no bound where shapes matter
        return {}
    out: dict[str, _Dims] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = _Dims(d.dim_value for d in t.shape.dim)
        if t.shape.dim:
            d0 = t.shape.dim[0]
            dims.first = d0.dim_value if d0.HasField("dim_value") else (d0.dim_param or None)
        out[vi.name] = dims
    return out


def _array(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)


# --- operator norms ---------------------------------------------------------------------------


def _spectral(m: np.ndarray) -> float:
    """The largest singular value of a matrix (float64; 1e-9 relative added for LAPACK's error)."""
    m = np.asarray(m, np.float64)
    if m.size == 0:
        return 0.0
    if min(m.shape[-2:]) == 1:
        return float(np.sqrt(np.sum(m * np.conj(m)).real)) * (1 + 1e-9)
    return float(np.linalg.norm(m, 2)) * (1 + 1e-9)


def conv_operator_norm(w: np.ndarray, group: int, spatial: Sequence[int] | None, pads: Sequence[int],
                       dilations: Sequence[int]) -> float:
    """An upper bound on the operator norm (2 -> 2, one sample) of an ONNX convolution with
    kernel `w` [Cout, Cin/group, *k] on inputs of `spatial` size (None: unknown).

    Exact for the circular convolution on a grid as large as the padded input (the largest
    singular value over frequencies of the kernel's Fourier symbol), which bounds the padded,
    strided one; where that costs more than EXACT_NORM_WORK, Schur's test per frequency
    (sqrt of the largest row sum times the largest column sum of |symbol|); where the symbol
    would not fit in SYMBOL_ENTRIES, or the input size is unknown, the sum over kernel positions
    of each position's matrix norm bound (a shift never stretches)."""
    w = np.asarray(w, np.float64)
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    blocks = w.reshape(group, cout // group, cin_g, *k)  # group g maps its inputs to its outputs
    if all(kk == 1 for kk in k):
        mats = blocks.reshape(group, cout // group, cin_g)
        if group * (cout // group) * cin_g * min(cout // group, cin_g) > EXACT_NORM_WORK:
            return _schur(mats)
        return max(_spectral(m) for m in mats)
    eff = [(kk - 1) * d + 1 for kk, d in zip(k, dilations)]
    known = spatial is not None and all(int(s) > 0 for s in spatial)
    if known:
        half = len(pads) // 2
        grid = [int(s) + max(e - 1, int(pads[i]) + int(pads[i + half]) if len(pads) == 2 * len(k) else e - 1)
                for i, (s, e) in enumerate(zip(spatial, eff))]
        freqs = int(np.prod(grid[:-1])) * (grid[-1] // 2 + 1)
        if 2 * freqs * cout * cin_g <= SYMBOL_ENTRIES:
            embedded = np.zeros((*blocks.shape[:3], *grid))
            index = tuple(slice(0, e, d) for e, d in zip(eff, dilations))
            embedded[(Ellipsis, *index)] = blocks
            symbol = np.fft.rfftn(embedded, axes=tuple(range(3, 3 + len(k))))
            mats = np.moveaxis(symbol.reshape(*blocks.shape[:3], -1), -1, 0)  # [freq, group, out, in]
            if freqs * group * (cout // group) * cin_g * min(cout // group, cin_g) <= EXACT_NORM_WORK:
                if min(cout // group, cin_g) == 1:
                    return float(np.sqrt((np.abs(mats) ** 2).sum(axis=(-2, -1))).max()) * (1 + 1e-9)
                return float(np.linalg.norm(mats, 2, axis=(-2, -1)).max()) * (1 + 1e-9)
            return _schur(mats)
    per_position = np.moveaxis(blocks.reshape(*blocks.shape[:3], -1), -1, 0)  # [positions, group, out, in]
    return float(sum(_schur(p) for p in per_position))


def _schur(mats: np.ndarray) -> float:
    """Schur's test, the largest over [..., out, in] matrices: ||M|| <= sqrt(max row sum x max
    column sum of |M|)."""
    mag = np.abs(mats)
    return float(np.sqrt(mag.sum(-1).max(-1) * mag.sum(-2).max(-1)).max()) * (1 + 1e-9)


# --- the clean channel norms ------------------------------------------------------------------


def _channel_norms(model: onnx.ModelProto, data: Dataset, inputs: dict[int, tuple[str, str]],
                   batch: int | None) -> dict[int, np.ndarray]:
    """Per weight step: [samples, channels], each sample's 2-norm of each input channel of the
    layer on the clean model (a convolution's channel over its positions, a MatMul's feature
    over its rows, a Gemm input's element): one clean pass (runtime.capture), reduced batch by
    batch in float64."""
    tensors = sorted({tensor for tensor, _ in inputs.values()})
    fed = [t for t in tensors if t in data.inputs]  # a graph input: the data itself
    parts: dict[tuple[str, str], list[np.ndarray]] = {(t, r): [] for t, r in inputs.values()}

    def reduce(arrays: dict[str, np.ndarray]) -> None:
        for (tensor, how), out in parts.items():
            a = np.asarray(arrays[tensor], np.float64)
            if how == "elements" or a.ndim == 2:
                out.append(np.abs(a))
            else:
                axes = tuple(range(2, a.ndim)) if how == "channels" else tuple(range(1, a.ndim - 1))
                out.append(np.sqrt(np.square(a).sum(axis=axes)))

    captured = [t for t in tensors if t not in fed]
    if captured:
        rows = 0

        def on_batch(arrays: dict[str, np.ndarray]) -> None:
            nonlocal rows
            n = len(next(iter(arrays.values())))
            reduce({**arrays, **{t: data.inputs[t][rows:rows + n] for t in fed}})
            rows += n

        capture(model, data, captured, on_batch, batch_size=batch or 64)
    else:
        reduce({t: data.inputs[t] for t in fed})
    norms = {key: np.concatenate(out) for key, out in parts.items()}
    return {step: norms[tensor, how] for step, (tensor, how) in inputs.items()}


__all__ = ["OutputBound", "conv_operator_norm", "ROUNDING"]
