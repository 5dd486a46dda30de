"""K trials in one onnxruntime session: the model's weight layers widened K times.

A campaign trial changes only weight values. Building an ordinary (prepacked) session per
trial costs a session build, about 2 ms on the samples CNN against a 4 ms inference pass, so
a trial cost 1.7 to 2.4 clean passes (bench/bench_campaign.py). This module builds one graph
that runs K read-back variants side by side on the same input batch, so that K trials share
one session build:

- the first layer that reads a variant weight takes the K variants' weights concatenated along
  its output channels, so its output holds the K trials' channels one block after another
  ("stacked": trial k owns channels [k*C, (k+1)*C) of axis 1);
- a convolution on a stacked input becomes a grouped convolution (`group` times K), each
  group reading its own trial's channels with its own trial's weights;
- a Gemm on a stacked input runs as one batched MatMul over the trials ([K, N, F] x [K, F, O],
  when its weight is transB, as a torch Linear exports it) or is split into K Gemms (one per
  trial, the original shapes), whose outputs are concatenated;
- in an int8 stack each trial's channels are padded to a multiple of CHANNEL_BLOCK (zero
  filters; the padding is dropped before any op that mixes channels), so that onnxruntime's
  blocked kernels take the grouped convolutions as they take the clean model's;
- element-wise ops, pooling, Flatten(axis=1), and the per-tensor QuantizeLinear /
  DequantizeLinear of activations act on each channel alone and pass a stacked tensor on.

A layer is only as wide as the trials already faulty there (`StackedSessions.plan`, `_widen`):
the group's trials are ordered by the first weight node where they differ from the clean
values, the layers before the first of them run once on the clean graph, and a layer runs one
block per trial faulty at or before it; a narrower input takes the clean tensor appended (a
trial with no fault upstream of a tensor has its clean value there: a Concat on the channels,
which onnxruntime keeps in its blocked layout, where a Gather made it reorder every tensor and
cost more than it saved). The output holds one block per faulty trial and one clean block that
the group's clean slots share; a group that would save less than MIN_SAVING of the
multiply-adds runs every trial from the first layer on. Sparse faults gain the most: 100
trials of bit flips on the MobileNetV2 took 0.62x the time of the all-wide graph at 1e-5, 0.86x
at 1e-4; the residual CNN 0.9x (int8, 1e-4) and 0.95x (fp32, 1e-5); a fault everywhere
(stuck-at 0.04) runs the same graph as before (bench/results, docs/results.md).

Every trial computes exactly the products and sums of its own single-trial graph, with the
same per-tensor activation scales (a fault changes weights, never quantization parameters; a
per-channel weight scale given as a variable, which FAQ's sign choice negates chip by chip,
goes with its weights: concatenated for a Conv, one per trial for a Gemm);
no trial's value enters another trial's channels (a NaN or inf in one trial stays in it).
onnxruntime may pick another kernel for a grouped convolution than for the single one, so a
trial's figures equal the single-session figures to float32 rounding (the arithmetic tolerance,
arithmetic.TOLERANCE); they are identical on the models measured in tests/test_stacking.py.
A point's trials run in groups of one width w <= K fixed by the point's trial count, trial t at
position t % w of group t // w (campaign/engine.py), so figures do not depend on how many
workers run the groups.

A graph with any other op on a stacked tensor (Reshape, Transpose, MatMul between activations,
Concat, LayerNormalization: transformers) is not stacked (`Unstackable`): its trials run one per
pass, fed to a session or on a session each (simulate.conv_bound). Written here rather than
taken from a library: neither onnxruntime nor onnx offers a batched-weights rewrite of a graph.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from .data import Dataset, top1
from .model import consumers_of, output_positions
from .runtime import initializer_bytes, run_batched, session

#: Ops that act on each channel alone (element-wise with constants, which are repeated per trial
#: where they differ by channel; pooling): a stacked input gives a stacked output.
CHANNELWISE_OPS = frozenset({
    "Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity",
    "Softplus", "Softsign", "Elu", "Selu", "Celu", "Erf", "Gelu", "Mish", "Neg", "Abs", "Sqrt", "Exp",
    "Log", "Floor", "Ceil", "Round", "Reciprocal",
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "QuantizeLinear", "DequantizeLinear", "Dropout",
    # the clip pass's masks (passes/clip.py: Greater / Less / Or, then Where)
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "And", "Or", "Xor", "Not", "Where",
})

#: Trial-samples per inference batch of a stacked session (K trials x batch rows), chosen by
#: measurement (the float residual CNN showed no difference from 256 to 4,096 within this VM's
#: noise, so no cache model is claimed). Measured with each group on one core
#: (campaign/parallel.py), 100 trials of stuck-at 0.04 against a clean pass (bench_campaign.py's
#: yardstick), medians of 6 paired rounds: MobileNetV2 128 / 256 / 512 / 1024 rows 0.99 / 0.99 /
#: 1.01 / 1.29 (another run: 0.85 at 256, 1.29 at 1024), samples CNN 1.00 / 0.89 / 0.95 / 1.04.
STACK_ROWS = 256
#: The most variants one session holds, and the most float32 weight bytes all of them may take:
#: K = min(MAX_STACK, STACK_BYTES // the model's weight bytes); ResNet-50 (100 MB) gets K = 1.
#: A session build costs in proportion to its weights (graph optimisation, prepacking) plus a
#: fixed part (and a slower first pass) that K amortises: K = 32 against 16 took trials 4 %
#: (fp32 residual CNN) to 10 % (MobileNetV2, stuck-at) less time; 64 against 32 (100 trials:
#: 2 groups of 50 against 4 of 25, campaign.engine.group_width) 11 % (samples CNN) to 18 %
#: (MobileNetV2) less, with the same figures trial for trial.
MAX_STACK = 64
STACK_BYTES = 48 << 20
#: The least share of a group's multiply-adds that running each layer only as wide as its
#: faulty trials must save (`StackedSessions.plan`), else every trial runs from the first layer
#: on: each narrower input is widened by a Concat that copies the tensor, and a few clean slots
#: (the last group of a point) are not worth a graph of their own. Measured savings and time
#: against the all-wide graph (100-200 trials, alternating rounds; this VM's noise is 5 %):
#: MobileNetV2 bit flips 1e-5 42 % saved, 0.58-0.62x the time; 1e-4 10 %, 0.86x; 1e-3 1 %
#: (all-wide); the residual CNN, float bit flips 1e-5, 14-18 %, 0.95x; samples CNN, int8 1e-4,
#: 4-7 %, 0.9x.
MIN_SAVING = 0.05
#: Widened graphs kept for profiles that are not one width throughout (sparse faults give most
#: groups a profile of their own; a full-width graph is kept whatever this says).
MAX_PARTIAL_LAYOUTS = 8

#: Per-trial channel counts of an int8 stacked graph are padded to a multiple of this (zero
#: filters, zero weights for the padding inputs; the padding channels hold zeros and are dropped
#: before any op that mixes channels). onnxruntime runs a grouped convolution in its blocked
#: NCHWc layout only when each group's channels are a multiple of the block (16 with AVX-512, 8
#: with AVX2): the MobileNetV2's 24-channel 1x1 convolutions fell back to the plain kernel on
#: this AVX-512 host, the stacked pass 23 % slower per trial than a clean one. Float stacks
#: (bitflip-fp32) stay unpadded: a NaN in a trial's channel would reach its padding through
#: zero weights (0 x NaN) and then its real channels where the unpadded graph gave inf.
CHANNEL_BLOCK = 16

_SHARED, _STACKED, _CONST = "shared", "stacked", "const"


class Unstackable(Exception):
    """The graph cannot run K trials side by side (the message says which node and why)."""


def stack_size(weight_bytes: int) -> int:
    """How many trials one stacked session holds for a model with that many weight bytes."""
    return int(max(1, min(MAX_STACK, STACK_BYTES // max(1, weight_bytes))))


class _Layout(NamedTuple):
    """One widened graph: its bytes without the variables, the variables it takes concatenated
    (`<name>__stk`) and per trial (`<name>__t<t>`), the padded per-trial shapes of the padded
    ones (with the value the padding takes), and how many blocks its output holds."""

    graph: bytes
    concat: list[str]
    per_trial: list[str]
    pads: dict[str, tuple[tuple[int, ...], float]]
    blocks: int


class StackedSessions:
    """Sessions that each run up to `k` variants of one model (values of its `names`
    initializers) side by side; `logits(variants, data, fixed)` gives each variant's first output.

    Build with `StackedSessions(model, names, k)`; raises Unstackable when the graph cannot be
    widened (see the module doc)."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str], k: int, pad_to: int = 1):
        if k < 2:
            raise Unstackable("one trial per session")
        self.k = int(k)
        self.pad_to = int(pad_to)
        self.names = list(names)
        inits = {t.name: t for t in model.graph.initializer}
        missing = [n for n in self.names if n not in inits]
        if missing:
            raise Unstackable(f"{missing[0]} is not an initializer")
        self.clean = {n: numpy_helper.to_array(inits[n]) for n in self.names}
        self._model = model
        by_node = _variables_by_node(model, self.names)
        self._node_names = [names for _, names in by_node]
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self._clean_parts: dict[tuple[str, int], bytes] = {}
        self._layout_lock = threading.Lock()  # trial threads (campaign/parallel.py) share the layouts
        self._layout(self.k)  # Unstackable here, not at the first trial
        self._node_work = _node_work(model, by_node)  # after: an unstackable graph needs no shapes

    def _layout(self, profile: int | tuple[int, ...], slots: int | None = None) -> _Layout:
        """The graph for `slots` trials (default: the profile's width) and a profile: per weight
        node (graph order), how many of them are faulty at or before it (0: none, the node keeps
        its clean weights; `_widen`). An int w: w trials, every one faulty from the first weight
        node on. A group shorter than k (the last of a point, a point of one trial) runs on a
        graph as wide as itself: every trial computes the same products in any width, and the
        width is fixed by the trial indices alone."""
        if isinstance(profile, int):
            profile = (profile,) * len(self._node_names)
        slots = max(profile, default=1) if slots is None else slots
        key = (slots, *profile)
        with self._layout_lock:
            if key not in self._layouts:
                widths = {n: b for names, b in zip(self._node_names, profile) for n in names}
                graph, concat, per_trial, pads, blocks = _widen(self._model, widths, self.pad_to, slots)
                partial = [p for p in self._layouts if len(set(p)) > 1]
                if len(set(key)) > 1 and len(partial) >= MAX_PARTIAL_LAYOUTS:
                    del self._layouts[partial[0]]  # sparse faults give each group its own profile
                self._layouts[key] = _Layout(graph.SerializeToString(), concat, per_trial, pads, blocks)
            return self._layouts[key]

    def plan(self, slots: Sequence[dict[str, np.ndarray]]) -> tuple[list[int], tuple[int, ...]]:
        """The slots in block order (by the first weight node where each differs from the clean
        values, then by slot) and the profile they need (`_layout`): how many differ at or
        before each weight node; every slot from the first node on when that saves less than
        MIN_SAVING of the multiply-adds. A variant's arrays are compared once each (by
        identity: a trial's untouched tensors are the same arrays in every slot), bit for bit."""
        verdict: dict[tuple[str, int], bool] = {}

        def differs(slot: dict[str, np.ndarray], name: str) -> bool:
            arr = slot.get(name)
            if arr is None or arr is self.clean[name]:
                return False
            key = (name, id(arr))
            if key not in verdict:
                a, c = np.ascontiguousarray(arr), self.clean[name]
                verdict[key] = a.shape != c.shape or a.dtype != c.dtype or \
                    not np.array_equal(a.reshape(-1).view(np.uint8), np.ascontiguousarray(c).reshape(-1).view(np.uint8))
            return verdict[key]

        nodes = len(self._node_names)
        first = [next((j for j, names in enumerate(self._node_names) if any(differs(s, n) for n in names)), nodes)
                 for s in slots]
        counts = np.cumsum(np.bincount(first, minlength=nodes + 1)[:nodes])
        if np.dot(len(slots) - counts, self._node_work) < MIN_SAVING * len(slots) * self._node_work.sum():
            return list(range(len(slots))), (len(slots),) * nodes  # every slot wide from the first node
        return sorted(range(len(slots)), key=lambda i: (first[i], i)), tuple(int(c) for c in counts)

    def session_for(self, variants: Sequence[dict[str, np.ndarray] | None]) -> tuple[ort.InferenceSession, list[int]]:
        """One session holding `variants` (1 to k of them; None: the clean values) and the
        output block that holds each. A variant dict may hold only the tensors it changed."""
        if not 0 < len(variants) <= self.k:
            raise ValueError(f"1 to {self.k} variants per stacked session, got {len(variants)}")
        slots = [v or {} for v in variants]
        order, profile = self.plan(slots)
        try:
            layout = self._layout(profile, len(slots))
        except Unstackable:  # a narrower prefix the full width handles (not met in the tested graphs)
            order, profile = list(range(len(slots))), (len(slots),) * len(profile)
            layout = self._layout(profile, len(slots))
        widths = {n: b for names, b in zip(self._node_names, profile) for n in names}
        blocks = [slots[i] for i in order]
        parts = [layout.graph]
        for n in layout.concat:
            pad = layout.pads.get(n)
            parts.append(initializer_bytes(f"{n}__stk", np.concatenate([_padded(s.get(n, self.clean[n]), pad) for s in blocks[:widths[n]]])))
        for n in layout.per_trial:
            for t, s in enumerate(blocks[:widths[n]]):
                parts.append(initializer_bytes(f"{n}__t{t}", s[n]) if n in s else self._clean_part(n, t))
        where = [0] * len(slots)
        for b, i in enumerate(order):
            where[i] = min(b, layout.blocks - 1)  # the clean trials: the clean block, last
        return session(b"".join(parts), shared_arena=True), where

    def _clean_part(self, name: str, t: int) -> bytes:
        """The serialized clean `<name>__t<t>` (a variant that leaves it clean reuses it)."""
        if (name, t) not in self._clean_parts:
            self._clean_parts[name, t] = initializer_bytes(f"{name}__t{t}", self.clean[name])
        return self._clean_parts[name, t]

    @staticmethod
    def batch_size(fixed: int | None, width: int) -> int:
        """Rows per batch: the model's fixed batch, else STACK_ROWS trial-samples per run."""
        return fixed or max(1, STACK_ROWS // width)

    def logits(self, variants: Sequence[dict[str, np.ndarray] | None], data: Dataset, fixed: int | None) -> list[np.ndarray]:
        """Each variant's first output on `data`, k variants per session (groups of k from the
        first: a caller that needs figures independent of how trials are shared out passes
        groups aligned to k)."""
        out: list[np.ndarray] = []
        for a in range(0, len(variants), self.k):
            chunk = variants[a:a + self.k]
            sess, where = self.session_for(chunk)
            (stacked,) = run_batched(sess, data, self.batch_size(fixed, max(where) + 1), [sess.get_outputs()[0].name])
            out += [np.ascontiguousarray(stacked[:, b]) for b in where]
        return out


def top1_of_trials(injections: Sequence, values: dict[str, np.ndarray], clean: np.ndarray,
                    logits_many: Callable[[list], list[np.ndarray]]) -> list[np.ndarray]:
    """Each injection's top-1 through a session's `logits_many` (one variant per injection, in
    its slot; an injection that is None or hits nothing runs clean and gets `clean`; when none
    hits anything, nothing runs)."""
    variants = [i.apply(values) if i is not None and i.tensors else None for i in injections]
    if all(v is None for v in variants):
        return [clean] * len(variants)
    return [top1(lg) if v is not None else clean for v, lg in zip(variants, logits_many(variants))]


def stacked_sessions(model: onnx.ModelProto, names: Sequence[str], pad_to: int = 1) -> StackedSessions | None:
    """StackedSessions for the model's `names` variables with k from `stack_size`, or None when
    k is 1 or the graph cannot be widened (its trials then take one session each). `pad_to`:
    see CHANNEL_BLOCK."""
    inits = {t.name: t for t in model.graph.initializer}
    k = stack_size(4 * sum(_size(inits[n]) for n in names if n in inits))
    if k < 2:
        return None
    try:
        return StackedSessions(model, names, k, pad_to)
    except Unstackable:
        return None


def _node_work(model: onnx.ModelProto, by_node: list[tuple[onnx.NodeProto | None, list[str]]]) -> np.ndarray:
    """Multiply-adds per sample of each weight node (`_variables_by_node`'s order): its largest
    weight's size times the node's output positions (model.output_positions; 1 where unknown)."""
    inits = {t.name: t for t in model.graph.initializer}
    positions = output_positions(model)
    return np.asarray([max(_size(inits[n]) for n in names) * (positions.get(node.output[0], 1) if node is not None and node.output else 1)
                       for node, names in by_node], np.float64)


def _variables_by_node(model: onnx.ModelProto, names: Sequence[str]) -> list[tuple[onnx.NodeProto | None, list[str]]]:
    """The variables grouped by the node that reads them (a Conv or Gemm, directly or through a
    DequantizeLinear), as (node, its variables), nodes in graph order (topological). Variables
    read otherwise go first, under None (the widening refuses them anyway)."""
    consumers = consumers_of(model)
    nodes = list(model.graph.node)
    index = {id(node): i for i, node in enumerate(nodes)}
    by_node: dict[int, list[str]] = {}
    for name in names:
        readers = consumers.get(name, [])
        reader = readers[0] if len(readers) == 1 else None
        if reader is not None and reader.op_type == "DequantizeLinear":
            after = consumers.get(reader.output[0], [])
            reader = after[0] if len(after) == 1 else None
        by_node.setdefault(index[id(reader)] if reader is not None else -1, []).append(name)
    return [(nodes[i] if i >= 0 else None, by_node[i]) for i in sorted(by_node)]


def _padded(arr: np.ndarray, pad: tuple[tuple[int, ...], float] | None) -> np.ndarray:
    """`arr` at the leading corner of an array of the padded shape, the rest `pad[1]`."""
    if pad is None or pad[0] == arr.shape:
        return arr
    out = np.full(pad[0], pad[1], arr.dtype)
    out[tuple(slice(0, n) for n in arr.shape)] = arr
    return out


def _widen(model: onnx.ModelProto, widths: dict[str, int], pad_to: int = 1, slots: int | None = None) \
        -> tuple[onnx.ModelProto, list[str], list[str], dict[str, tuple[tuple[int, ...], float]], int]:
    """The widened graph without the variable tensors' trial values, the variables it takes
    concatenated along axis 0 (as `<name>__stk`), those it takes once per trial
    (`<name>__t<t>`), the padded per-trial shapes of the concatenated variables whose channels
    are padded (with `pad_to` > 1, see CHANNEL_BLOCK), with the value the padding takes, and
    how many blocks the output holds.

    `widths`: per variable, how many trials its node runs side by side, the trials faulty at
    or before it (0: none, the node keeps its clean weights); `slots`: the trials of the group.
    The clean graph stays (its nodes run only where a stacked one reads them); each node a
    fault reaches gets a stacked twin (`<output>__s`) as wide as the widest of its weights and
    inputs, and an input narrower than that gets the clean tensor appended until it is wide
    enough (a trial that is not faulty upstream of a tensor has its clean value there): a
    Concat along the channels, which onnxruntime keeps in its blocked NCHWc layout. So the
    layers before a group's first fault run once, and a layer runs one block per trial faulty
    at or before it. The output holds one block per faulty trial, then a clean block when
    some trial of the group is clean (`StackedSessions.plan`)."""
    variables = {n for n, b in widths.items() if b > 0}
    slots = slots if slots is not None else max(widths.values(), default=1)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise Unstackable("control flow")
    if not g.output:
        raise Unstackable("no output")
    inits = {t.name: t for t in g.initializer}
    consumers = consumers_of(m)
    producer = {o: node for node in g.node for o in node.output}
    state: dict[str, str] = {i.name: _SHARED for i in g.input if i.name not in inits}  # the clean graph's tensors
    for name in inits:
        state[name] = _CONST
    weight_dq: dict[str, str] = {}  # output of a DequantizeLinear of a variable -> that variable
    for node in g.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in variables:
            weight_dq[node.output[0]] = node.input[0]
    concat: list[str] = []
    per_trial: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    taken: set[str] = set()
    pads: dict[str, tuple[tuple[int, ...], float]] = {}  # concatenated variable -> padded per-trial shape, fill
    twin: dict[str, str] = {}  # clean tensor -> its stacked twin
    blocks: dict[str, int] = {}  # stacked tensor -> how many trials it holds side by side
    chan: dict[str, tuple[int, int]] = {}  # stacked tensor with padded channels -> (channels, padded) per trial
    unpadded: dict[str, str] = {}
    widened: dict[tuple[str, int], str] = {}
    k = 0  # the blocks of the node being stacked (the helpers below read it)

    def variable_of(tensor: str) -> str | None:
        """The variable a weight input carries (directly or through its DequantizeLinear)."""
        v = weight_dq.get(tensor, tensor if tensor in variables else None)
        if v is None:
            return None
        if v in taken or len(consumers.get(v, [])) != 1 or (tensor != v and len(consumers.get(tensor, [])) != 1):
            raise Unstackable(f"{v} is read by more than one node")
        taken.add(v)
        return v

    def tiled(name: str, rows: int | None = None, fill: float = 0.0) -> str:
        """A per-channel quantization parameter repeated k times (a scalar stays itself), each
        copy padded to `rows` channels with `fill`."""
        arr = numpy_helper.to_array(inits[name])
        if arr.ndim == 0 or arr.size == 1:
            return name
        if rows is not None:
            arr = _padded(arr, ((rows,), fill))
        new = f"{name}__tile{len(new_inits)}"
        new_inits.append(numpy_helper.from_array(np.concatenate([arr] * k), new))
        return new

    def unpad(tensor: str) -> str:
        """A padded stacked tensor with its padding channels dropped (Gather along axis 1): the
        layout every op but a padded convolution or a channel-wise op expects."""
        if tensor not in chan:
            return tensor
        if tensor not in unpadded:
            c, padded = chan[tensor]
            idx = f"{tensor}__unpad_idx"
            new_inits.append(numpy_helper.from_array((np.arange(blocks[tensor])[:, None] * padded + np.arange(c)).ravel().astype(np.int64), idx))
            unpadded[tensor] = f"{tensor}__unpad"
            new_nodes.append(helper.make_node("Gather", [tensor, idx], [unpadded[tensor]], axis=1, name=unpadded[tensor]))
            blocks[unpadded[tensor]] = blocks[tensor]
        return unpadded[tensor]

    def operand(tensor: str, to: int) -> str:
        """A stacked tensor `to` blocks wide for the clean `tensor`: its twin when as wide, else
        the twin (without padding) and copies of the clean tensor (a shared one: only those)."""
        have = blocks[twin[tensor]] if tensor in twin else 0
        if have == to:
            return twin[tensor]
        if (tensor, to) not in widened:
            name = f"{tensor}__x{to}"
            parts = ([unpad(twin[tensor])] if have else []) + [tensor] * (to - have)
            new_nodes.append(helper.make_node("Concat", parts, [name], axis=1, name=name))
            blocks[name] = to
            widened[tensor, to] = name
        return widened[tensor, to]

    def weight_dims(tensor: str) -> tuple[int, ...]:
        """The shape of a Conv's weight (a variable or a constant, through its DequantizeLinear)."""
        src = weight_dq.get(tensor, tensor)
        if src not in inits:
            raise Unstackable(f"{tensor}: the weight is neither a variable nor a constant")
        return tuple(inits[src].dims)

    ranks: dict[str, int] = {}

    def channel_tiled(name: str, like: str, where: str, padded_to: int | None = None) -> str:
        """A constant broadcast against a stacked tensor (the twin of the clean `like`), repeated
        k times along the axis that meets the stacked tensor's channel axis (1), where it spans
        the channels."""
        if not ranks:  # shapes only when a graph needs them (onnx's shape inference)
            inferred = onnx.shape_inference.infer_shapes(model)
            for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
                if vi.type.tensor_type.HasField("shape"):
                    ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        if like not in ranks:
            raise Unstackable(f"{where}: the rank of {like} is unknown")
        arr = numpy_helper.to_array(inits[name])
        axis = arr.ndim - ranks[like] + 1  # numpy broadcasting aligns trailing axes
        if axis < 0 or arr.shape[axis] == 1:
            return name  # the same for every channel
        if padded_to is not None:  # padding channels take 0 (they only meet zero weights)
            shape = list(arr.shape)
            shape[axis] = padded_to
            arr = _padded(arr, (tuple(shape), 0))
        new = f"{name}__chan{len(new_inits)}"
        new_inits.append(numpy_helper.from_array(np.concatenate([arr] * k, axis=axis), new))
        return new

    def widen_axis0(node: onnx.NodeProto, j: int, padded: tuple[int, ...] | None = None) -> None:
        """Make a stacked Conv's weight (j = 1) or bias (j = 2) input hold k values along axis 0:
        the k variants of a variable (through a stacked twin of its DequantizeLinear), or k
        copies of a constant (a float model's bias), each padded with zeros to the per-trial
        shape `padded` when given (its per-channel quantization parameters too: scales with 1,
        zero points with 0)."""
        tensor = node.input[j]
        v = variable_of(tensor)
        if v is None:
            if tensor not in inits:
                raise Unstackable(f"{node.name}: input {tensor} is neither a variable nor a constant")
            arr = numpy_helper.to_array(inits[tensor])
            if padded is not None:
                arr = _padded(arr, (padded, 0))
            node.input[j] = f"{tensor}__rep{len(new_inits)}"
            new_inits.append(numpy_helper.from_array(np.concatenate([arr] * k), node.input[j]))
            return
        concat.append(v)
        if padded is not None:
            pads[v] = (padded, 0)
        if tensor == v:
            node.input[j] = f"{v}__stk"
            return
        dq = onnx.NodeProto()
        dq.CopyFrom(producer[tensor])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = numpy_helper.to_array(inits[dq.input[1]]) if dq.input[1] in inits else None
        if scale is None or (scale.size > 1 and axis != 0):
            raise Unstackable(f"{dq.name}: per-channel parameters not along axis 0")
        dq.input[0] = f"{v}__stk"
        dq.output[0] = node.input[j] = f"{tensor}__s"
        dq.name = f"{dq.name or tensor}__s"
        rows = None if padded is None else padded[0]
        for i in range(1, len(dq.input)):
            param = dq.input[i]
            fill = 1.0 if i == 1 else 0  # a padding channel's scale, zero point
            if param and param in variables:  # a per-channel scale that varies too (FAQ's sign choice)
                concat.append(variable_of(param))
                dq.input[i] = f"{param}__stk"
                if rows is not None and _size(inits[param]) > 1:
                    pads[param] = ((rows,), fill)
            elif param:
                dq.input[i] = tiled(param, rows, fill)
        new_nodes.append(dq)

    for src in g.node:
        op = src.op_type
        kinds = [state.get(i, _CONST) if i else _CONST for i in src.input]
        for o in src.output:  # the clean graph keeps every node
            state[o] = _SHARED if _SHARED in kinds else _CONST
        new_nodes.append(src)
        if src.output and src.output[0] in weight_dq:
            continue  # its stacked twin is made with its consumer's (widen_axis0)
        k = max([widths[weight_dq.get(i, i)] for i in src.input if i in variables or i in weight_dq]
                + [blocks[twin[i]] for i in src.input if i in twin], default=0)
        if k == 0:
            continue
        node = onnx.NodeProto()
        node.CopyFrom(src)
        node.name = f"{src.name or src.output[0]}__s"
        node.output[:] = [f"{o}__s" for o in src.output]
        x = _STACKED if src.input and src.input[0] in twin else kinds[0] if kinds else _CONST
        if op == "Conv":
            group = next((a for a in node.attribute if a.name == "group"), None)
            g0 = group.i if group is not None else 1
            if x == _STACKED or (x == _SHARED and g0 != 1):  # a grouped convolution reads its trials' own channels
                node.input[0], x = operand(src.input[0], k), _STACKED
            dims = weight_dims(node.input[1])
            c_out, c_in_g = dims[0], dims[1]
            in_pad = chan.get(node.input[0]) if x == _STACKED else None
            depthwise = g0 > 1 and c_in_g == 1 and c_out == g0
            shape: tuple[int, ...] = dims
            if pad_to > 1 and depthwise and in_pad is not None:
                shape = (in_pad[1], *dims[1:])
            elif pad_to > 1 and g0 == 1:
                shape = (-(-c_out // pad_to) * pad_to, in_pad[1] if in_pad else c_in_g, *dims[2:])
            elif in_pad is not None:
                node.input[0] = unpad(node.input[0])
            per_trial_group = shape[0] if depthwise else g0
            if x == _STACKED:
                if group is None:
                    node.attribute.append(helper.make_attribute("group", k))
                else:
                    group.i = k * per_trial_group
            elif x != _SHARED or g0 != 1:
                raise Unstackable(f"{node.name}: grouped convolution on an input the trials share")
            widen_axis0(node, 1, shape if shape != dims else None)
            if len(node.input) > 2 and node.input[2]:
                widen_axis0(node, 2, (shape[0],) if shape[0] != c_out else None)
            new_nodes.append(node)
            if shape[0] != c_out:
                chan[node.output[0]] = (c_out, shape[0])
        elif op == "Gemm":
            if x == _STACKED:
                node.input[0] = unpad(operand(src.input[0], k))
            if _batched_gemm_fits(node, x, inits, weight_dq, variables):
                outputs = weight_dims(node.input[1])[0]
                widen_axis0(node, 1)
                if len(node.input) > 2 and node.input[2]:
                    widen_axis0(node, 2)
                new_nodes.extend(_batched_gemm(node, x, k, outputs, new_inits))
            else:
                new_nodes.extend(_split_gemm(node, x, k, variable_of, per_trial, producer, new_inits))
        elif op in CHANNELWISE_OPS:
            for j, (i, kind) in enumerate(zip(src.input, kinds)):  # every input that is not a constant: k blocks
                if i and (i in twin or (kind == _SHARED and i not in inits)):
                    node.input[j] = operand(i, k)
            if node.input[0] == src.input[0]:
                raise Unstackable(f"{node.name} ({op}): a stacked tensor beside a constant first input")
            layouts = {chan.get(i) for i in node.input if i in blocks}
            if len(layouts) > 1:  # stacked inputs padded differently: meet without padding
                node.input[:] = [unpad(i) if i in chan else i for i in node.input]
            padded = next(iter(layouts)) if len(layouts) == 1 else None
            for j, i in enumerate(node.input[1:], 1):
                if not i or i in blocks:
                    continue
                if i not in inits:
                    raise Unstackable(f"{node.name} ({op}): a stacked input beside the non-constant {i}")
                if _size(inits[i]) != 1:  # e.g. the clip pass's per-element thresholds
                    node.input[j] = channel_tiled(i, src.input[0], node.name, padded[1] if padded else None)
            new_nodes.append(node)
            if padded is not None:
                for o in node.output:
                    chan[o] = padded
        elif op == "Flatten" and next((a.i for a in node.attribute if a.name == "axis"), 1) == 1 and x == _STACKED:
            node.input[0] = unpad(twin[src.input[0]])
            new_nodes.append(node)
        else:
            raise Unstackable(f"{src.name} ({op}) on a tensor that differs between trials")
        for o in src.output:
            twin[o] = f"{o}__s"
            blocks[twin[o]] = k
    missing = sorted(variables - taken)
    if missing:
        raise Unstackable(f"{missing[0]} is not read by a Conv or Gemm")
    out = g.output[0]
    if variables and out.name not in twin:
        raise Unstackable("the first output does not depend on the weights")
    faulty = blocks[twin[out.name]] if out.name in twin else 0
    out_blocks = max(1, min(faulty + 1, slots))  # the faulty trials, then a clean block if a trial is clean
    last = unpad(operand(out.name, out_blocks)) if faulty or out_blocks > 1 else out.name
    flat = f"{out.name}__flat"
    for node in new_nodes:  # the graph's output name goes to the reshaped stack
        node.input[:] = [flat if i == out.name else i for i in node.input]
        node.output[:] = [flat if o == out.name else o for o in node.output]
    last = flat if last == out.name else last
    new_inits.append(numpy_helper.from_array(np.array([0, out_blocks, -1], np.int64), "__stack_shape"))
    new_nodes.append(helper.make_node("Reshape", [last, "__stack_shape"], [out.name], name="__stack_reshape"))
    out_vi = onnx.ValueInfoProto()
    out_vi.name = out.name
    out_vi.type.tensor_type.elem_type = out.type.tensor_type.elem_type
    g.ClearField("output")
    g.output.append(out_vi)
    g.ClearField("value_info")  # the shapes of widened tensors changed
    g.ClearField("node")
    g.node.extend(_needed(new_nodes, out.name))
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]  # a variable's clean value where the clean graph reads it
    g.ClearField("initializer")
    g.initializer.extend(kept + [t for t in new_inits if t.name in used])
    g.ClearField("input")
    g.input.extend(i for i in model.graph.input if i.name not in inits)
    return m, concat, per_trial, pads, out_blocks


def _size(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


def _batched_gemm_fits(node: onnx.NodeProto, x: str, inits: dict, weight_dq: dict, variables: set[str]) -> bool:
    """Whether a Gemm y = x B^T + c on stacked trials runs as one batched MatMul ([K, N, F] x
    [K, F, O], `_batched_gemm`) rather than K Gemms split from the input: the split head took
    6 % of a stacked pass of the samples CNN (K Gather + Gemm nodes per run, against the clean
    graph's one Gemm); the same products and sums, onnxruntime's MatMul and Gemm share their
    SGEMM kernels. The form it takes: transB = 1 (a torch Linear: B's output
    channels along axis 0, where the trials' copies are concatenated, scales per channel
    included), no transA, alpha = beta = 1, a weight that varies (directly or through its
    DequantizeLinear), a 1-D bias that varies or is an initializer, or none, on a stacked or
    shared input. Others are split (`_split_gemm`)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if x not in (_STACKED, _SHARED) or attrs.get("transA", 0) or not attrs.get("transB", 0):
        return False
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return False
    if node.input[1] not in variables and node.input[1] not in weight_dq:
        return False
    if len(node.input) > 2 and node.input[2]:
        src = weight_dq.get(node.input[2], node.input[2])
        if src not in inits or len(inits[src].dims) != 1:
            return False
    return True


def _batched_gemm(node: onnx.NodeProto, x: str, k: int, outputs: int, new_inits: list) -> list[onnx.NodeProto]:
    """Nodes for a Gemm (`_batched_gemm_fits`) whose weight and bias inputs already hold the k
    trials' copies concatenated along axis 0 ([k*O, F], [k*O]): one MatMul over the trials."""
    name = node.name or node.output[0]

    def const(suffix: str, values: list[int]) -> str:
        new_inits.append(numpy_helper.from_array(np.array(values, np.int64), f"{name}__shape_{suffix}"))
        return f"{name}__shape_{suffix}"

    out = [helper.make_node("Reshape", [node.input[1], const("w3", [k, outputs, -1])], [f"{name}__w3"], name=f"{name}__w3"),
           helper.make_node("Transpose", [f"{name}__w3"], [f"{name}__wt"], perm=[0, 2, 1], name=f"{name}__wt")]
    xk = node.input[0]  # [N, F], shared: MatMul broadcasts it over the trials
    if x == _STACKED:  # [N, k*F] -> [k, N, F]
        out += [helper.make_node("Reshape", [xk, const("x3", [0, k, -1])], [f"{name}__x3"], name=f"{name}__x3"),
                helper.make_node("Transpose", [f"{name}__x3"], [f"{name}__xk"], perm=[1, 0, 2], name=f"{name}__xk")]
        xk = f"{name}__xk"
    y = f"{name}__yk"
    out.append(helper.make_node("MatMul", [xk, f"{name}__wt"], [y], name=y))
    if len(node.input) > 2 and node.input[2]:
        out += [helper.make_node("Reshape", [node.input[2], const("b3", [k, 1, -1])], [f"{name}__b3"], name=f"{name}__b3"),
                helper.make_node("Add", [y, f"{name}__b3"], [f"{name}__ykb"], name=f"{name}__ykb")]
        y = f"{name}__ykb"
    out += [helper.make_node("Transpose", [y], [f"{name}__yn"], perm=[1, 0, 2], name=f"{name}__yn"),
            helper.make_node("Reshape", [f"{name}__yn", const("flat", [0, -1])], [node.output[0]], name=f"{name}__flat")]
    return out


def _split_gemm(node, x, k, variable_of, per_trial, producer, new_inits) -> list[onnx.NodeProto]:
    """A Gemm on a stacked input (or a shared one, with variable weights): K Gemms of the
    original shapes, one per trial, each on its trial's columns, concatenated."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        raise Unstackable(f"{node.name}: Gemm with transA")
    name = node.name or node.output[0]
    out: list[onnx.NodeProto] = []
    if x == _STACKED:
        # [N, K*F] -> [N, K, F]; trial t's rows are Gather(axis=1, t)
        shape = f"{name}__stack_rows"
        new_inits.append(numpy_helper.from_array(np.array([0, k, -1], np.int64), shape))
        out.append(helper.make_node("Reshape", [node.input[0], shape], [f"{name}__rows3"], name=f"{name}__rows3"))
    elif x != _SHARED:
        raise Unstackable(f"{node.name}: Gemm input")
    inputs = []
    for j in (1, 2):
        t = node.input[j] if len(node.input) > j else ""
        v = variable_of(t) if t else None
        inputs.append((t, v))
    params_varying: set[str] = set()  # DequantizeLinear parameters that vary too (FAQ's sign choice)
    for tensor, v in inputs:
        if v is None:
            continue
        per_trial.append(v)
        if tensor != v:
            for p in producer[tensor].input[1:]:
                if p and variable_of(p) is not None:
                    params_varying.add(p)
                    per_trial.append(p)
    outs = []
    for t in range(k):
        if x == _STACKED:
            idx = f"{name}__trial{t}"
            new_inits.append(numpy_helper.from_array(np.array(t, np.int64), idx))
            xt = f"{name}__x{t}"
            out.append(helper.make_node("Gather", [f"{name}__rows3", idx], [xt], axis=1, name=xt))
        else:
            xt = node.input[0]
        ins = [xt]
        for tensor, v in inputs:
            if not tensor or v is None:
                ins.append(tensor)
                continue
            if tensor == v:
                ins.append(f"{v}__t{t}")
                continue
            dq = producer[tensor]
            wt = f"{tensor}__t{t}"
            params = [f"{p}__t{t}" if p in params_varying else p for p in dq.input[1:]]
            out.append(helper.make_node("DequantizeLinear", [f"{v}__t{t}", *params], [wt], name=wt,
                                        **{a.name: helper.get_attribute_value(a) for a in dq.attribute}))
            ins.append(wt)
        yt = f"{node.output[0]}__t{t}"
        outs.append(yt)
        out.append(helper.make_node("Gemm", ins, [yt], name=f"{name}__t{t}", **attrs))
    out.append(helper.make_node("Concat", outs, [node.output[0]], axis=1, name=f"{name}__concat"))
    return out


def _needed(nodes: list[onnx.NodeProto], output: str) -> list[onnx.NodeProto]:
    """The nodes `output` depends on, in their order (a widened graph computes nothing more)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = [output]
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(t for t in nodes[i].input if t)
    return [n for i, n in enumerate(nodes) if i in keep]
