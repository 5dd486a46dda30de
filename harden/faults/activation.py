"""Transient bit flips in the quantized activations (`bitflip-act:RATE`).

Every QuantizeLinear of an activation (not of a weight) writes a uint8/int8 tensor that its
DequantizeLinear reads back: on an accelerator, a buffer in activation memory. The activation-
fault session is a rewrite of the model that puts a `BitwiseXor(q, mask)` between each such
QuantizeLinear and its readers, with `mask` a graph input of the tensor's dtype and shape.
BitwiseXor needs opset 18, so the rewritten copy is converted to opset 18 when older (the model
itself is not touched). Zero masks leave the tensor as it is.

Measured with onnxruntime 1.32 on the zoo's digits CNNs and the bundled sample (plain int8 and
hardened): ORT still fuses the QDQ groups around the Xor (QLinearConv, QLinearAdd, QGemm, ...
read the Xor's output), and with zero masks the logits are bit-identical to the fused session
of the unmodified model, so the clean figures agree. A campaign still scores activation points
against the clean predictions of the rewritten session itself (`ActivationEvaluator.clean`),
and the report says whether they matched the weight session's.

Faults are per sample (transient, in every inference): trial t of point p draws, from
rng([seed, p, t]) alone, a binomial count over every activation bit of the whole evaluation set
(samples x elements x 8 per site) and then that many distinct positions, like the weight
models. Cell (sample n, element e, bit b) of a site is element n * E + e of its [samples, ...]
tensor. `tensors` restricts the flips to the named sites (QuantizeLinear output names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..data import Dataset, top1
from ..errors import InputError
from ..model import opset_of, upgrade_opset
from ..runtime import batch_size_for, session
from .base import (
    Injection,
    ParamsFaultModel,
    Session,
    Tensor,
    TensorFaults,
    check_tensor_names,
    group_cells,
    parse_rates,
    sample_positions,
    select_tensors,
)

#: BitwiseXor appeared in opset 18.
XOR_OPSET = 18

_NP = {TensorProto.UINT8: np.dtype(np.uint8), TensorProto.INT8: np.dtype(np.int8)}


@dataclass(frozen=True)
class Site:
    """One quantized activation: the QuantizeLinear output `name` (dtype uint8/int8), its
    per-sample `shape`, the op that produced the quantized float tensor, and the mask input
    that the rewritten session XORs into it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    producer: str
    mask: str

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class ActivationSpace:
    """The activation tensors of one evaluation set: one `Tensor` per site, shaped
    [samples, *per-sample shape], kind "activation"."""

    tensors: tuple[Tensor, ...]
    samples: int
    sites: tuple[Site, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, sites: tuple[Site, ...], samples: int) -> ActivationSpace:
        tensors = tuple(Tensor(s.name, s.dtype, (samples, *s.shape), "activation") for s in sites)
        return cls(tensors, samples, tuple(sites))

    @property
    def weights(self) -> tuple[Tensor, ...]:  # so code written for a WeightSpace sees no weights
        return ()

    @property
    def biases(self) -> tuple[Tensor, ...]:
        return ()

    @property
    def bits_per_sample(self) -> int:
        return sum(s.elements * 8 for s in self.sites)

    def site(self, name: str) -> Site:
        return next(s for s in self.sites if s.name == name)


# --- the graph rewrite ------------------------------------------------------------------------


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes of activations (input not an initializer, output not a graph output)."""
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    return [
        n for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.output[0] not in outputs
    ]


def _q_dtype(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """The element type a QuantizeLinear writes: its zero point's, else uint8."""
    if len(node.input) > 2 and node.input[2]:
        for t in model.graph.initializer:
            if t.name == node.input[2]:
                return t.data_type
        for n in model.graph.node:  # a Constant zero point
            if n.op_type == "Constant" and n.output[0] == node.input[2]:
                return n.attribute[0].t.data_type
    return TensorProto.UINT8


def probe_sites(model: onnx.ModelProto, data: Dataset) -> tuple[list[Site], list[str]]:
    """The injectable activations with their per-sample shapes, measured on the first samples.
    Also returns the quantized tensors left out (no sample axis first, or not 8-bit)."""

    qs = activation_quantizers(model)
    if not qs:
        return [], []
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kinds = {}
    for q in qs:
        kinds[q.output[0]] = _q_dtype(model, q)
        m.graph.output.append(helper.make_tensor_value_info(q.output[0], kinds[q.output[0]], None))
    fixed = batch_size_for(model, 0)
    b = fixed if fixed else min(2, len(data))
    feeds = next(data.batches(b))
    n = len(next(iter(feeds.values())))
    if n < b:
        feeds = {k: np.concatenate([v, np.repeat(v[-1:], b - n, axis=0)]) for k, v in feeds.items()}
    sess = session(m, optimize=False)
    outs = sess.run([q.output[0] for q in qs], feeds)
    sites, skipped = [], []
    for q, out in zip(qs, outs):
        name = q.output[0]
        if kinds[name] not in _NP or out.ndim == 0 or out.shape[0] != b:
            skipped.append(name)
            continue
        sites.append(Site(name, _NP[kinds[name]], tuple(int(d) for d in out.shape[1:]),
                          producers.get(q.input[0], "input"), f"{name}_harden_act_mask"))
    return sites, skipped


def rewrite_for_activation_faults(model: onnx.ModelProto, sites: list[Site]) -> onnx.ModelProto:
    """A copy of `model` (opset >= 18) where each site is read through BitwiseXor(site, mask)."""

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if opset_of(m) < XOR_OPSET:
        m = upgrade_opset(m, XOR_OPSET)
    by_name = {s.name: s for s in sites}
    fixed = batch_size_for(model, 0)
    g = m.graph
    renamed = {s.name: f"{s.name}_harden_act_xor" for s in sites}
    nodes = []
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        nodes.append(node)
        if node.op_type == "QuantizeLinear" and node.output[0] in by_name:
            s = by_name[node.output[0]]
            nodes.append(helper.make_node("BitwiseXor", [s.name, s.mask], [renamed[s.name]], name=f"{s.name}_harden_act_xor"))
            dt = TensorProto.UINT8 if s.dtype == np.uint8 else TensorProto.INT8
            g.input.append(helper.make_tensor_value_info(s.mask, dt, [fixed or "harden_batch", *s.shape]))
    del g.node[:]
    g.node.extend(nodes)
    return m


class ActivationEvaluator(Session):
    """Predictions of the activation-fault session under the sparse masks of an `Injection`.

    Built once per model and data set; each call costs one inference pass. Masks are built a
    batch at a time from the injection's sorted positions, so memory stays at one batch of
    activations whatever the data set size.
    """

    def __init__(self, model: onnx.ModelProto, data: Dataset, batch: int = 256):
        sites, self.skipped = probe_sites(model, data)
        if not sites:
            raise InputError("bitflip-act: the model has no quantized activations (no QuantizeLinear of an activation)")
        self.sites = tuple(sites)
        self.model = rewrite_for_activation_faults(model, sites)
        self.session = session(self.model)
        self.data = data
        self.fixed = batch_size_for(model, 0)
        self.batch = self.fixed or batch
        self.space = ActivationSpace.of(self.sites, len(data))
        self._zeros: dict[tuple[str, int], np.ndarray] = {}
        self._output = self.session.get_outputs()[0].name
        self.clean_logits = self.logits(None)
        self.clean = top1(self.clean_logits)

    def _zero(self, site: Site, n: int) -> np.ndarray:
        key = (site.name, n)
        if key not in self._zeros:
            z = np.zeros((n, *site.shape), site.dtype)
            z.setflags(write=False)
            self._zeros[key] = z
        return self._zeros[key]

    def masks(self, injection: Injection | None, start: int, n: int, padded: int | None = None) -> dict[str, np.ndarray]:
        """The mask feeds of samples [start, start + n) (rows past n, if padded, are zero)."""
        rows = padded or n
        hits = {tf.name: tf for tf in injection.tensors} if injection is not None else {}
        out = {}
        for s in self.sites:
            tf = hits.get(s.name)
            if tf is None:
                out[s.mask] = self._zero(s, rows)
                continue
            e = s.elements
            lo, hi = np.searchsorted(tf.index, [start * e, (start + n) * e])
            if lo == hi:
                out[s.mask] = self._zero(s, rows)
                continue
            m = np.zeros((rows, *s.shape), s.dtype)
            m.reshape(-1).view(np.uint8)[tf.index[lo:hi] - start * e] = tf.flip[lo:hi]
            out[s.mask] = m
        return out

    def logits(self, injection: Injection | None = None) -> np.ndarray:
        chunks = []
        start = 0
        for feeds in self.data.batches(self.batch):
            n = len(next(iter(feeds.values())))
            rows = self.fixed if (self.fixed and n < self.fixed) else n
            if rows != n:
                feeds = {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)]) for k, v in feeds.items()}
            feeds.update(self.masks(injection, start, n, rows))
            (out,) = self.session.run([self._output], feeds)
            chunks.append(out[:n])
            start += n
        return np.concatenate(chunks)

    def predictions(self, injection: Injection | None = None) -> np.ndarray:
        if injection is None or not injection.tensors:
            return self.clean
        return top1(self.logits(injection))


# --- the fault model --------------------------------------------------------------------------


@dataclass(frozen=True)
class ActBitFlipParams:
    """rate: bit error rate per activation bit, in [0, 1]; tensors: None (every quantized
    activation) or the QuantizeLinear output names to flip bits in."""

    rate: float
    tensors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rate, (int, float, np.floating)) or not 0.0 <= float(self.rate) <= 1.0:
            raise InputError(f"bit error rate must be in [0, 1], got {self.rate!r}")
        object.__setattr__(self, "tensors", check_tensor_names(self.tensors, "bitflip-act"))


class ActivationBitFlip(ParamsFaultModel):
    """Independent transient bit flips in the quantized activations, per sample."""

    name = "bitflip-act"
    deterministic = False
    space_kind = "activations"

    @classmethod
    def from_spec(cls, args: str) -> list[ActivationBitFlip]:
        return [cls(ActBitFlipParams(r)) for r in parse_rates("bitflip-act", args, "1e-5,1e-4")]

    def targets(self, space: ActivationSpace) -> tuple[Tensor, ...]:
        return space.tensors

    def check(self, space) -> None:
        if not isinstance(space, ActivationSpace):
            raise InputError("bitflip-act: needs the activation space of a data set (run it in a Campaign)")
        if not space.tensors:
            raise InputError("bitflip-act: the model has no quantized activations to flip")
        select_tensors(space.tensors, self._params.tensors, self.name)

    def sample(self, rng: np.random.Generator, space: ActivationSpace) -> Injection:
        tensors = select_tensors(space.tensors, self._params.tensors, self.name)
        population = sum(t.cells for t in tensors)
        positions = sample_positions(rng, population, float(self._params.rate))
        hits = group_cells(tensors, positions)
        return Injection(tuple(TensorFaults(t.name, idx, flip=mask) for t, idx, mask, _ in hits), int(positions.size))
