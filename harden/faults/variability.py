"""Analog PIM variability (METHODS.md section 4): `variability:SIGMA_CHIP,SIGMA_CELL`.

An analog in-memory accelerator stores each weight as a conductance, written with a
fabrication-time multiplicative error. The working model (log-normal, as METHODS.md states it):

    w' = w * exp(theta_chip + theta_cell)
    theta_chip ~ N(0, sigma_chip^2)   one draw per weight tensor (layer) per chip
    theta_cell ~ N(0, sigma_cell^2)   one draw per weight (cell)

`w` is the dequantized weight (int8 code x its per-channel scale): conductances are continuous,
so the chip is simulated in float, not on the int8 grid. Biases stay nominal (added digitally
in the periphery). Note exp(theta) has median 1 and mean exp(sigma^2 / 2).

A *chip* is one draw of theta. Trial t of point p draws it from rng([seed, p, t]) alone, like
every fault model: first the L standard normals of the chip components (one per weight tensor,
in the `linear` layout order), then, when sigma_cell > 0, one standard normal per weight, tensor
by tensor (float32). So the chip component of a trial does not depend on sigma_cell, and both
components scale with their sigma (common random numbers across sigma values).

The analog session (`AnalogEvaluator`) is a rewrite of the int8 QDQ model in which the output
of every weight DequantizeLinear (and of the int32 bias DequantizeLinear of the same op) is a
float graph input of the same name and shape; activations keep their QuantizeLinear /
DequantizeLinear pairs (digital I/O at the array's edges). onnxruntime cannot fuse those
groups into QLinearConv / QGemm, so the clean outputs of this session differ slightly from the
fused int8 session's (rounding of the requantisation; `AnalogEvaluator.compare_fused` measures
it: on the zoo's digits CNNs a few logits differ by one activation step and top-1 agrees on
all 341 test inputs or all but one). A variability point is therefore always scored against
the clean predictions of the analog session itself.

`sample_variability(rng, shape, sigma_chip, sigma_cell)` draws the factor exp(theta) for one
tensor (one chip draw); training code (harden.train.variability) may reuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..data import Dataset, top1
from ..errors import InputError
from ..model import get_initializer, output_channel_axis, qdq_weights, weight_input
from ..runtime import batch_size_for, session
from .base import (
    ParamsFaultModel,
    Session,
    Tensor,
    WeightSpace,
    check_tensor_names,
    select_tensors,
    tensors_suffix,
)

#: Largest sigma accepted: exp(+-3 sigma) already spans a factor 400 at sigma = 1.
MAX_SIGMA = 1.0


# --- drawing theta ----------------------------------------------------------------------------


def check_sigma(name: str, value) -> float:
    """A sigma in [0, MAX_SIGMA] as a float; InputError otherwise (also for NaN, bool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number in [0, {MAX_SIGMA:g}], got {value!r}")
    v = float(value)
    if not (0.0 <= v <= MAX_SIGMA):  # also rejects NaN
        raise InputError(f"{name} must be in [0, {MAX_SIGMA:g}], got {value!r}")
    return v


def sample_thetas(
    rng: np.random.Generator, shapes: list[tuple[int, ...]], sigma_chip: float, sigma_cell: float
) -> list[tuple[float, np.ndarray | None]]:
    """(theta_chip, theta_cell) for each shape: one chip draw per tensor, then (sigma_cell > 0)
    one cell draw per element (float32; None when sigma_cell is 0)."""
    z_chip = rng.standard_normal(len(shapes))
    out = []
    for shape, z in zip(shapes, z_chip):
        out.append((float(sigma_chip * z), None))
    if sigma_cell > 0:
        s = np.float32(sigma_cell)
        out = [(c, rng.standard_normal(shape, dtype=np.float32) * s) for (c, _), shape in zip(out, shapes)]
    return out


def sample_variability(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_chip: float, sigma_cell: float = 0.0
) -> np.ndarray:
    """The multiplicative factor exp(theta_chip + theta_cell) of one tensor (float32, `shape`):
    one chip draw shared by the tensor, one cell draw per element."""
    sigma_chip = check_sigma("sigma_chip", sigma_chip)
    sigma_cell = check_sigma("sigma_cell", sigma_cell)
    ((chip, cell),) = sample_thetas(rng, [tuple(shape)], sigma_chip, sigma_cell)
    theta = np.full(shape, chip, np.float32) if cell is None else cell + np.float32(chip)
    return np.exp(theta, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class TensorVariation:
    """One weight tensor of one chip: its chip component and per-element cell components."""

    name: str
    chip: float
    cell: np.ndarray | None = None  # float32, the tensor's shape; None = no cell variation

    def factor(self, shape: tuple[int, ...]) -> np.ndarray:
        """exp(theta_chip + theta_cell), float32, broadcastable to `shape`."""
        if self.cell is None:
            return np.float32(math.exp(self.chip))
        return np.exp(self.cell + np.float32(self.chip), dtype=np.float32).reshape(shape)


@dataclass(frozen=True, eq=False)
class AnalogInjection:
    """One chip: the variation of every weight tensor it perturbs (none when both sigmas are 0).

    Works on *float* weights keyed by int8 weight name (`AnalogEvaluator.values`), not on the
    int8 codes of the weight campaign. `cells` counts the perturbed weights."""

    tensors: tuple[TensorVariation, ...] = ()
    count: int = 0

    @property
    def cells(self) -> int:
        return self.count

    def apply(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A new dict: the float weights of `values` times exp(theta) (others shared)."""
        out = dict(values)
        for tv in self.tensors:
            w = np.asarray(values[tv.name])
            if w.dtype.kind != "f":
                raise InputError(
                    "variability: this campaign fed int8 codes to an analog fault model; it must run on the "
                    "analog session (harden.faults.variability.AnalogEvaluator, space_kind 'analog')"
                )
            out[tv.name] = (w * tv.factor(w.shape)).astype(np.float32, copy=False)
        return out

    def faults(self, values=None) -> list:
        """No bit-level faults: every weight varies (see `describe`)."""
        return []

    def describe(self) -> list[dict]:
        """Per tensor: theta_chip, and the mean and std of theta_cell (0 when absent)."""
        out = []
        for tv in self.tensors:
            c = tv.cell
            out.append({
                "tensor": tv.name,
                "theta_chip": round(tv.chip, 6),
                "gain_chip": round(math.exp(tv.chip), 6),
                "theta_cell_mean": 0.0 if c is None else round(float(c.mean()), 6),
                "theta_cell_std": 0.0 if c is None else round(float(c.std()), 6),
            })
        return out


# --- the fault model --------------------------------------------------------------------------


@dataclass(frozen=True)
class VariabilityParams:
    """sigma_chip: std of theta_chip (one per layer per chip); sigma_cell: std of theta_cell (one
    per weight); tensors: None (every weight tensor) or the int8 weight names to perturb."""

    sigma_chip: float
    sigma_cell: float = 0.0
    tensors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_chip", check_sigma("variability: sigma_chip", self.sigma_chip))
        object.__setattr__(self, "sigma_cell", check_sigma("variability: sigma_cell", self.sigma_cell))
        object.__setattr__(self, "tensors", check_tensor_names(self.tensors, "variability"))


class Variability(ParamsFaultModel):
    """Multiplicative log-normal weight variability of analog PIM, between-chip and within-chip."""

    name = "variability"
    deterministic = False
    space_kind = "analog"
    describe_extra = {"model": "w * exp(theta_chip + theta_cell)"}

    @classmethod
    def from_spec(cls, args: str) -> list[Variability]:
        """`SIGMA_CHIP,SIGMA_CELL` (or `SIGMA_CHIP` alone: no cell component) -> one point."""
        example = "variability:0.2,0.02"
        items = [a.strip() for a in args.split(",")] if args.strip() else []
        if not 1 <= len(items) <= 2:
            raise InputError(f"fault model 'variability' takes SIGMA_CHIP[,SIGMA_CELL], e.g. {example} "
                             "(one point per spec; repeat --fault for more)")
        vals = []
        for text in items:
            try:
                vals.append(float(text))
            except ValueError:
                raise InputError(f"variability: {text!r} is not a number (e.g. {example})") from None
        return [cls(VariabilityParams(*vals))]

    @property
    def label(self) -> str:
        p = self._params
        return f"{self.name}:{p.sigma_chip:g},{p.sigma_cell:g}{tensors_suffix(p.tensors)}"

    def targets(self, space: WeightSpace) -> tuple[Tensor, ...]:
        return space.weights

    def check(self, space: WeightSpace) -> None:
        if not getattr(space, "weights", ()):
            raise InputError("variability: the model has no int8 weights to vary")
        select_tensors(space.weights, self._params.tensors, self.name)

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> AnalogInjection:
        p = self._params
        if p.sigma_chip == 0 and p.sigma_cell == 0:
            return AnalogInjection()
        # Draw for every tensor (so a restriction sees the same chip), keep the selected ones.
        thetas = sample_thetas(rng, [t.shape for t in space.weights], p.sigma_chip, p.sigma_cell)
        keep = {t.name for t in select_tensors(space.weights, p.tensors, self.name)}
        tensors = tuple(
            TensorVariation(t.name, chip, cell) for t, (chip, cell) in zip(space.weights, thetas) if t.name in keep
        )
        return AnalogInjection(tensors, sum(t.size for t in space.weights if t.name in keep))


# --- the analog session -----------------------------------------------------------------------


def _channel_axis_of_output(op_type: str) -> int:
    """The axis of a weight op's *output* that indexes its output channels (a Gather's output
    ends with the table's features)."""
    return -1 if op_type in ("MatMul", "Gather") else 1


@dataclass(frozen=True)
class AnalogLayer:
    """One weight op of the analog session: the int8 weight `name` (its identity everywhere),
    the float graph input fed with its dequantized value (`input`), the bias input (if any),
    and the op output (pre-activation) that self-tuning measures."""

    name: str
    op_type: str
    input: str
    output: str
    shape: tuple[int, ...]
    weight_axis: int  # output-channel axis of the weight
    bias: str | None = None  # int32 initializer name
    bias_input: str | None = None

    @property
    def output_axis(self) -> int:
        return _channel_axis_of_output(self.op_type)


def dequantized(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """q * scale in float32, the scale broadcast along `axis` (per channel) or scalar."""
    s = np.asarray(scale, np.float32)
    if s.ndim == 0 or s.size == 1:
        return q.astype(np.float32) * s.reshape(())
    shape = [1] * q.ndim
    shape[axis] = s.size
    return q.astype(np.float32) * s.reshape(shape)


def analog_layers(model: onnx.ModelProto) -> list[AnalogLayer]:
    """The weight ops of an int8 QDQ model, in forward order (qdq_weights' order)."""

    dq_out = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    consumers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        name = weight_input(node)  # input 1 of Conv/Gemm/MatMul, a Gather's table
        if name is not None:
            consumers.setdefault(name, node)
    out = []
    for w in qdq_weights(model):
        wi = dq_out[w.name]
        node = consumers[wi]
        bias_input = node.input[2] if w.bias and len(node.input) > 2 else None
        out.append(AnalogLayer(w.name, w.op_type, wi, node.output[0], tuple(w.shape),
                               output_channel_axis(w.op_type, w.attrs, len(w.shape)), w.bias, bias_input))
    return out


def analog_model(model: onnx.ModelProto, layers: list[AnalogLayer]) -> onnx.ModelProto:
    """A copy of `model` whose weight (and bias) DequantizeLinear outputs are float graph inputs,
    and whose layer outputs are graph outputs too (after the original outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    fed = {}
    for L in layers:
        fed[L.input] = L.shape
        if L.bias_input:
            fed[L.bias_input] = None
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in fed:
            if fed[node.output[0]] is None:  # a bias: its shape is the initializer's
                fed[node.output[0]] = tuple(inits[node.input[0]].dims)
            continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    for name, shape in fed.items():
        g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
    used = {i for n in g.node for i in n.input}
    kept_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    outputs = {o.name for o in g.output}
    for L in layers:
        if L.output not in outputs:
            g.output.append(helper.make_tensor_value_info(L.output, onnx.TensorProto.FLOAT, None))
            outputs.add(L.output)
    return m


def float_values(model: onnx.ModelProto, layers: list[AnalogLayer] | None = None) -> dict[str, np.ndarray]:
    """The dequantized float weights (key: int8 weight name) and biases (key: int32 bias name)
    of an int8 QDQ model, as the analog session takes them."""

    out: dict[str, np.ndarray] = {}
    for w in qdq_weights(model):
        out[w.name] = dequantized(get_initializer(model, w.name), w.scale, w.axis)
        if w.bias:
            out[w.bias] = dequantized(get_initializer(model, w.bias), w.bias_scale, 0)
    return out


class AnalogEvaluator(Session):
    """The analog session of one int8 QDQ model on one data set: predictions under any float
    weights (nominal, a chip's, a tuned model's), and the layer outputs self-tuning measures.

    Interface shared with the activation-fault session: `space`, `clean`, `clean_logits`,
    `predictions(injection)`. `values` holds the model's own nominal float weights and biases.
    """

    def __init__(self, model: onnx.ModelProto, data: Dataset, batch: int = 256):
        self.layers = analog_layers(model)
        if not self.layers:
            raise InputError("variability: the model has no int8 Conv/Gemm/MatMul/Gather weights (not an int8 QDQ model)")
        self.space = WeightSpace.from_model(model)
        self.model = analog_model(model, self.layers)
        self.session = session(self.model)
        self.data = data
        self.fixed = batch_size_for(model, 0)
        self.batch = self.fixed or batch
        self._output = self.session.get_outputs()[0].name
        self.values = float_values(model, self.layers)
        self.clean_logits = self.logits(None)
        self.clean = top1(self.clean_logits)

    def feeds(self, values: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Graph-input feeds from float values keyed by int8 weight / int32 bias name."""
        v = self.values if values is None else {**self.values, **values}
        out = {}
        for L in self.layers:
            out[L.input] = v[L.name]
            if L.bias_input:
                out[L.bias_input] = v[L.bias]
        return out

    def run(self, values: dict[str, np.ndarray] | None, outputs: list[str], data: Dataset | None = None) -> list[np.ndarray]:
        """The named outputs on the whole data set (or `data`), concatenated over batches."""
        data = self.data if data is None else data
        extra = self.feeds(values)
        chunks: list[list[np.ndarray]] = [[] for _ in outputs]
        for feeds in data.batches(self.batch):
            n = len(next(iter(feeds.values())))
            if self.fixed and n < self.fixed:
                feeds = {k: np.concatenate([a, np.repeat(a[-1:], self.fixed - n, axis=0)]) for k, a in feeds.items()}
            for i, o in enumerate(self.session.run(outputs, {**feeds, **extra})):
                chunks[i].append(o[:n])
        return [np.concatenate(c) for c in chunks]

    def logits(self, values: dict[str, np.ndarray] | None = None) -> np.ndarray:
        (out,) = self.run(values, [self._output])
        return out

    def layer_outputs(self, values: dict[str, np.ndarray] | None, names: list[str], data: Dataset | None = None) -> dict[str, np.ndarray]:
        """The outputs (pre-activation, bias included) of the layers named by int8 weight name."""
        by_name = {L.name: L for L in self.layers}
        outs = self.run(values, [by_name[n].output for n in names], data)
        return dict(zip(names, outs))

    def predictions(self, injection: AnalogInjection | None = None, values: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Top-1 under a chip's variation of `values` (default: the model's nominal weights)."""
        if (injection is None or not injection.tensors) and values is None:
            return self.clean
        base = self.values if values is None else {**self.values, **values}
        v = injection.apply(base) if injection is not None else base
        return top1(self.logits(v))

    def compare_fused(self, fused_logits: np.ndarray) -> dict:
        """How the clean outputs of this session differ from the fused int8 session's."""
        a, b = self.clean_logits.astype(np.float64), np.asarray(fused_logits, np.float64)
        same = a.shape == b.shape
        return {
            "logits_identical": bool(same and np.array_equal(a, b)),
            "max_abs_logit_difference": float(np.max(np.abs(a - b))) if same else None,
            "predictions_agree": float(np.mean(top1(a) == top1(b))) if same else None,
        }


__all__ = [
    "AnalogEvaluator", "AnalogInjection", "AnalogLayer", "MAX_SIGMA", "TensorVariation", "Variability",
    "VariabilityParams", "analog_layers", "analog_model", "check_sigma", "dequantized", "float_values",
    "sample_thetas", "sample_variability",
]
