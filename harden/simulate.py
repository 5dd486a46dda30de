"""Evaluate int8 QDQ models as a chip would read them, on onnxruntime.

Three ways to run read-back variants (`ChipEvaluator(strategy=...)`):

- "stack" (default): K variants side by side in one ordinary session (stacking.py: the weight
  layers widened K times, grouped convolutions), so K trials share one session build; a graph
  that cannot be widened (transformers) or a model too large for K copies of its weights runs
  each variant as "rebuild" does when convolutions do most of its multiply-adds (ResNet-50),
  else as "feed" does (`conv_bound`): a MatMul fed its weights loses little, and a session
  build per variant cost the ViT 3.1 to 3.7 clean passes per trial against 0.9 to 1.4 fed.
  `logits_many` takes the variants; `logits` runs one.
- "rebuild": an ordinary session per variant, its weights constant, so onnxruntime
  folds each DequantizeLinear and prepacks the weights (NCHWc convolutions). The model's bytes
  without the weight tensors are serialized once and each variant appends its tensors:
  protobuf merges a repeated field across concatenated messages, so a variant costs the
  serialization of what it changed, a session build and one prepacked pass.
- "feed": one session whose int8 weights and int32 biases are graph inputs, so a variant is just
  feeds; but onnxruntime cannot prepack input weights, and its convolutions run 2 to 4x slower.

A variant's values are the int8 weights, the int32 biases and the per-channel scales that FAQ's
sign choice may negate (`ChipEvaluator.names`): one evaluator of the plain graph then scores
every chip's hardened model (a fleet's chips differ in those values only).

All run the chip's arithmetic (unfused QDQ): the same products, summed to float32 rounding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .data import Dataset, accuracy, top1
from .faultmap import FaultMap, read_back
from .memory import MemoryMap
from .model import CONV_OPS, channel_sign_scales, get_initializer, output_positions, qdq_weights
from .runtime import VariantSessions, batch_size_for, fixed_batch, run_batched, session
from .stacking import CHANNEL_BLOCK, StackedSessions, stacked_sessions


def weights_as_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose named initializers are graph inputs instead."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, moved = [], []
    wanted = set(names)
    for t in m.graph.initializer:
        (moved if t.name in wanted else keep).append(t)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for t in moved:
        m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


STRATEGIES = ("stack", "rebuild", "feed")


def fed_session(local: threading.local, model: Callable[[], onnx.ModelProto]) -> ort.InferenceSession:
    """The calling thread's session of `model()` (built on first use in each thread, with the
    thread's onnxruntime threads: trial threads run fed trials side by side, one core each)."""
    sess = getattr(local, "session", None)
    if sess is None:
        sess = local.session = session(model())
    return sess


def conv_bound(model: onnx.ModelProto, weights: Iterable[tuple[str, str, int]]) -> bool:
    """Whether convolutions do at least half of the model's weight multiply-adds per sample
    (`weights`: each weight's consuming op type, node name and size): a weight's size times its
    op's output positions (model.output_positions; an embedding table none). Feeding the
    weights as inputs costs a convolution onnxruntime's blocked NCHWc kernels (2 to 4x), a
    MatMul little."""
    weights = list(weights)
    if not any(op == "MatMul" for op, _, _ in weights):  # no shapes needed (ResNet-50's are 100 MB)
        conv_weights = sum(size for op, _, size in weights if op in CONV_OPS)
        if conv_weights >= sum(size for op, _, size in weights if op not in CONV_OPS and op != "Gather"):
            return True  # a convolution does at least its weights' count per sample, a Gemm exactly that
    positions = output_positions(model)
    outputs = {n.name: n.output[0] for n in model.graph.node if n.output}
    conv = other = 0.0
    for op_type, node_name, size in weights:
        work = 0.0 if op_type == "Gather" else float(size) * positions.get(outputs.get(node_name, ""), 1)
        if op_type in CONV_OPS:
            conv += work
        else:
            other += work
    return conv >= other


@dataclass
class Reference:
    """What predictions are scored against: labels, or the float model's top-1 (agreement)."""

    target: np.ndarray
    kind: str  # "labels" or "agreement"


class ChipEvaluator:
    """Top-1 accuracy of one QDQ graph under any int8 weight / int32 bias values.

    Built once per model structure; `evaluate(weights, biases)` costs one inference pass.
    """

    def __init__(self, model: onnx.ModelProto, data: Dataset, reference: Reference, *, strategy: str = "stack"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.table = qdq_weights(model)
        self.weight_names = [w.name for w in self.table]
        self.bias_names = [w.bias for w in self.table if w.bias]
        # FAQ's sign choice negates per-channel scales chip by chip: values like the weights
        self.scale_names = [n for names in channel_sign_scales(model, self.table).values() for n in names]
        self.names = names = self.weight_names + self.bias_names + self.scale_names
        self.defaults = {n: get_initializer(model, n) for n in names}
        self.strategy = strategy
        self._model = model
        self._session_model: onnx.ModelProto | None = None
        self._variants = VariantSessions(model, names) if strategy != "feed" else None
        self._stacked: StackedSessions | None | bool = False if strategy == "stack" else None  # False: not built yet
        self.session = self._variants.session if self._variants else session(self.session_model)
        self.data = data
        self.reference = reference
        self.batch = batch_size_for(model, 256)
        self._clean: np.ndarray | None = None
        self._fed = threading.local()  # each thread's weights-as-inputs session, when variants are fed
        self._feeds: bool | None = None if strategy == "stack" else strategy == "feed"

    def logits(self, values: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The first output (logits) on the whole data set with the given weights/biases.

        The fault-free logits (no `values`) are computed once and shared, read-only: a fleet asks
        for them once per chip, a campaign and the host check once more."""
        if not values and self._clean is not None:
            return self._clean
        sess, feeds = self.session_for(values)
        (logits,) = run_batched(sess, self.data, self.batch, [sess.get_outputs()[0].name], feeds)
        if not values:
            logits.setflags(write=False)
            self._clean = logits
        return logits

    @property
    def stacked(self) -> StackedSessions | None:
        """The stacked sessions of the "stack" strategy (built on first use), None when the
        strategy is another or the graph runs one variant per session."""
        if self._stacked is False:
            self._stacked = stacked_sessions(self._model, self.names, CHANNEL_BLOCK)
        return self._stacked  # type: ignore[return-value]

    @property
    def stack(self) -> int:
        """How many variants one session runs (1 unless stacked): callers that share trials
        out keep groups aligned to it, so that a trial always runs in the same group."""
        return self.stacked.k if self.stacked is not None else 1

    def logits_many(self, variants: list[dict[str, np.ndarray] | None]) -> list[np.ndarray]:
        """`logits(v)` for each variant, `stack` variants per session (groups of `stack` from
        the first)."""
        if self.stacked is None or len(variants) < 2:
            return [self.logits(v) for v in variants]
        return self.stacked.logits(variants, self.data, fixed_batch(self._model))

    @property
    def feeds_values(self) -> bool:
        """Whether a variant runs as feeds of one session: the feed strategy, or the stack
        strategy on a graph it cannot widen whose multiply-adds are not mostly convolutions'
        (`conv_bound`; decided by the model alone, so the figures never depend on timing)."""
        if self._feeds is None:
            self._feeds = self.stacked is None and not conv_bound(self._model, ((w.op_type, w.node_name, w.size) for w in self.table))
        return self._feeds

    def session_for(self, values: dict[str, np.ndarray] | None = None) -> tuple[ort.InferenceSession, dict | None]:
        """The session that runs the model with `values` in place of its weights / biases, and
        the feeds it needs besides the data (the values themselves when they are fed)."""
        if self._variants is None:
            return self.session, {**self.defaults, **(values or {})}
        if self.feeds_values:
            return fed_session(self._fed, lambda: self.session_model), {**self.defaults, **(values or {})}
        return self._variants.session_for(values), None

    @property
    def session_model(self) -> onnx.ModelProto:
        """The model with the int8 weights and int32 biases as graph inputs (the feed strategy's
        graph; workers and side sessions that feed values use it)."""
        if self._session_model is None:
            self._session_model = weights_as_inputs(self._model, self.names)
        return self._session_model

    def predictions(self, values: dict[str, np.ndarray] | None = None) -> np.ndarray:
        return top1(self.logits(values))

    def evaluate(self, values: dict[str, np.ndarray] | None = None) -> float:
        """Accuracy (or agreement) with the given weights/biases (defaults: the model's own)."""
        return accuracy(self.predictions(values), self.reference.target)


def model_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The named initializers of a model (weights and biases to feed an evaluator)."""
    return {n: get_initializer(model, n) for n in names}


def read_through_chip(values: dict[str, np.ndarray], memory_map: MemoryMap, faultmap: FaultMap) -> dict[str, np.ndarray]:
    """The int8 weights as the chip returns them: read(v) = (v & ~sa0) | sa1 at each address."""
    sa0, sa1 = memory_map.stream_masks(faultmap)
    out = dict(values)
    for slot in memory_map.tensors:
        v = values[slot.name]
        sl = slice(slot.offset, slot.offset + slot.count)
        out[slot.name] = read_back(v.ravel(), sa0[sl], sa1[sl]).reshape(v.shape)
    return out


def float_reference(model: onnx.ModelProto, data: Dataset) -> tuple[float | None, Reference]:
    """Run the float model; score against labels when present, else against itself."""
    sess = session(model)
    (logits,) = run_batched(sess, data, batch_size_for(model, 256), [sess.get_outputs()[0].name])
    pred = top1(logits)
    if data.labels is not None:
        return accuracy(pred, data.labels), Reference(data.labels, "labels")
    return 1.0, Reference(pred, "agreement")
