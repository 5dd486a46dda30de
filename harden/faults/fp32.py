"""Bit flips in the float32 weights of a *float* model (`bitflip-fp32:RATE,...`).

The int8 fault models need an int8 QDQ model; this one measures the float model itself, as a
chip (or a GPU / CPU memory) holding float32 weights would see transient bit flips in them.

What it hits: the float32 initializers consumed as input 1 of Conv / ConvTranspose / Gemm /
MatMul (`harden.model.float_weight_names`: the weights a weight memory holds), in order of
first consumer. They are taken from the model as given when it has such initializers (legacy
initializer graph inputs dropped first); otherwise (weights made by Constant / ConstantOfShape
nodes) from `harden.model.prepare`'s copy (onnxsim, Constant -> initializer). Biases and
other float constants are not hit.

Drawing: every bit of every such weight (32 per weight; cell (element e, bit b) of tensor t at
offset_t + 32 e + b, bit 0 = mantissa LSB, bits 23-30 = exponent, bit 31 = sign) flips with
probability RATE: trial t of point p draws, from rng([seed, p, t]) alone, a binomial count over
all those bits and then that many distinct positions (the method of every weight model). A flip
XORs the weight's uint32 view, so `describe_trial` lists exactly (tensor, flat index, bit).

The session (`FloatWeightEvaluator`, campaign session kind "fp32"): ordinary onnxruntime
sessions of the float model, its weights constant and prepacked: K trials side by side in one
session where the graph allows (stacking.py), else one per trial (runtime.VariantSessions: the
model's bytes plus the tensors the trial hit) when convolutions do most of the work, or one
session fed each trial's weights as inputs otherwise (transformers; simulate.conv_bound). A
trial that the output bound (bounds.py) proves harmless is not run (its predictions are the
clean ones), and one it leaves uncertain on few samples runs on those alone. A
campaign scores the points against this session's own clean predictions and reports how they
compare with the model's ordinary session (`fp32.clean`).

Exponent flips make huge weights, inf or NaN: setting bit 30 (the exponent's MSB, clear in
every weight below 2 in magnitude) multiplies a weight by 2^128 (about 3.4e38), and a weight in
[1, 2) becomes inf or NaN; sums of such products overflow to inf and inf - inf is NaN, so
logits can be NaN. Predictions on NaN are defined once for every session
(`harden.data.top1`): a sample whose logits contain a NaN is predicted as class -1, a class no
label or fault-free prediction has, so it counts as wrong and, when the fault-free model got the
sample right, as an SDC-1 event. Infinite (non-NaN) logits are ordinary: argmax, ties to the
lowest index. The report gives, per fp32 point, the fraction of outputs with a NaN logit.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import onnx

from ..data import Dataset, top1
from ..errors import InputError
from ..model import drop_initializer_inputs, float_weight_names, get_initializer, initializer_map, prepare, weight_input
from ..runtime import VariantSessions, batch_size_for, fixed_batch, run_batched
from ..simulate import conv_bound, fed_session, weights_as_inputs
from ..stacking import StackedSessions, stacked_sessions, top1_of_trials
from .base import (
    Injection,
    ParamsFaultModel,
    Session,
    Tensor,
    TensorFaults,
    WeightSpace,
    check_tensor_names,
    group_cells,
    parse_rates,
    sample_positions,
    select_tensors,
)
from .bounds import OutputBound

#: The campaign session kind of float32 weight faults (harden.campaign.SESSION_KINDS).
FP32_KIND = "fp32"
#: A trial the output bound (bounds.py) leaves uncertain on at most this share of the samples
#: runs on those samples only; a stacked group's such trials run together on the union of
#: theirs when it is at most NARROW_UNION of the samples. The residual CNN at 1e-5: half of the
#: trials the bound cannot certify need every sample (an exponent flip), the other half a few
#: (a quarter of them under 9 %); a group's union of those was 29 to 44 % of the samples.
NARROW_SHARE = 0.5
NARROW_UNION = 0.6


def fp32_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The float model whose weights a trial flips, and whether `prepare` (onnxsim) made it:
    the model as given (a copy, legacy initializer inputs dropped) when it has float weight
    initializers, else `harden.model.prepare`'s simplified copy."""

    m = onnx.ModelProto()
    m.CopyFrom(model)
    drop_initializer_inputs(m)
    if float_weight_names(m):
        return m, False

    prepared, _ = prepare(m)
    return prepared, True


def float_space(model: onnx.ModelProto) -> WeightSpace:
    """The float32 weight tensors of a float model that is ready to run (see `fp32_model`), as
    a WeightSpace of float32 `Tensor`s (kind "weight"), in order of first consumer."""

    inits = initializer_map(model)
    return WeightSpace(tuple(
        Tensor(n, np.dtype(np.float32), tuple(int(d) for d in inits[n].dims), "weight") for n in float_weight_names(model)
    ))


# --- the fault model --------------------------------------------------------------------------


@dataclass(frozen=True)
class FP32BitFlipParams:
    """rate: probability that each bit of a float32 weight flips, in [0, 1]; tensors: None
    (every float weight) or the names of the weight initializers to flip bits in."""

    rate: float
    tensors: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float, np.floating)) or not 0.0 <= float(self.rate) <= 1.0:
            raise InputError(f"bitflip-fp32: bit error rate must be in [0, 1], got {self.rate!r}")
        object.__setattr__(self, "tensors", check_tensor_names(self.tensors, "bitflip-fp32"))


class FP32BitFlip(ParamsFaultModel):
    """Independent transient bit flips in the float32 weights of a float model."""

    name = "bitflip-fp32"
    deterministic = False
    space_kind = FP32_KIND
    precision = "float"  # runs on float models only (the campaign refuses it on an int8 one)
    describe_extra = {"bits": "float32 (sign 31, exponent 23-30, mantissa 0-22)"}

    @classmethod
    def from_spec(cls, args: str) -> list[FP32BitFlip]:
        return [cls(FP32BitFlipParams(r)) for r in parse_rates("bitflip-fp32", args, "1e-6,1e-5")]

    def targets(self, space: WeightSpace) -> tuple[Tensor, ...]:
        return space.weights

    def check(self, space: WeightSpace) -> None:
        if not space.weights:
            raise InputError("bitflip-fp32: the model has no float32 Conv/ConvTranspose/Gemm/MatMul weights to flip")
        if any(np.dtype(t.dtype) != np.float32 for t in space.weights):
            raise InputError("bitflip-fp32 flips float32 weights; this space holds int8 codes (an int8 QDQ model)")
        select_tensors(space.weights, self._params.tensors, self.name)

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> Injection:
        tensors = select_tensors(space.weights, self._params.tensors, self.name)
        population = sum(t.cells for t in tensors)
        positions = sample_positions(rng, population, float(self._params.rate))
        hits = group_cells(tensors, positions)
        return Injection(tuple(TensorFaults(t.name, idx, flip=mask) for t, idx, mask, _ in hits), int(positions.size))


# --- the session ------------------------------------------------------------------------------


class FloatWeightEvaluator(Session):
    """The float model on one data set: predictions under any weight values (a trial's faulty
    copies), each on an ordinary session of the model with those values (VariantSessions).

    Interface of a campaign side session: `space`, `clean`, `clean_logits`, `model`,
    `predictions(injection)`; also `values` (the clean weights), `ops` (tensor -> (op type,
    node name) of its first consumer) and `session_info()` for the report."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, batch: int = 256, certify: bool | None = None):
        work, self.prepared = fp32_model(model)
        self.space = float_space(work)
        if not self.space.weights:
            raise InputError("bitflip-fp32: the model has no float32 Conv/ConvTranspose/Gemm/MatMul weights to flip")
        names = [t.name for t in self.space.weights]
        self.values = {n: np.ascontiguousarray(get_initializer(work, n), dtype=np.float32) for n in names}
        self.ops: dict[str, tuple[str, str]] = {}
        for node in work.graph.node:
            name = weight_input(node)
            if name in self.values:
                self.ops.setdefault(name, (node.op_type, node.name))
        self._work, self._names, self._model = work, names, None
        self._variants = VariantSessions(work, names)  # trials on prepacked sessions (runtime.py)
        self._stacked: StackedSessions | None | bool = False  # several trials per session (built on first use)
        self.session = self._variants.session
        self.data = data
        self.batch = batch_size_for(work, batch)
        self._output = self.session.get_outputs()[0].name
        self._fed = threading.local()  # each thread's weights-as-inputs session, when values are fed
        self._feeds: bool | None = None
        self.clean_logits = self.logits(None)
        self.clean = top1(self.clean_logits)
        # trials the bound proves harmless run no inference (bounds.py); off: HARDEN_CERTIFY=0
        if certify is None:
            certify = os.environ.get("HARDEN_CERTIFY", "1") != "0"
        self.bound = None
        if certify:
            try:
                self.bound = OutputBound.of(work, data, self.clean_logits, names, self.batch)
            except InputError:  # onnxruntime cannot run the norms' graph: every trial runs
                self.bound = None

    @property
    def model(self) -> onnx.ModelProto:
        """The float model with its weights as graph inputs (for whoever feeds values)."""
        if self._model is None:
            self._model = weights_as_inputs(self._work, self._names)
        return self._model

    @property
    def feeds_values(self) -> bool:
        """Whether values run as feeds of one session (`model`) rather than a session each: a
        graph that cannot be stacked whose multiply-adds are not mostly convolutions'
        (simulate.conv_bound, as the int8 evaluator decides)."""
        if self._feeds is None:
            work = ((op, node, self.values[n].size) for n, (op, node) in self.ops.items())
            self._feeds = self.stacked is None and not conv_bound(self._work, work)
        return self._feeds

    def logits(self, values: dict[str, np.ndarray] | None = None, data: Dataset | None = None) -> np.ndarray:
        """The first output with `values` in place of the clean weights, on `data` (default: the
        evaluator's data)."""
        data = self.data if data is None else data
        if self.feeds_values:  # the clean logits too: a trial is compared with its own session's
            sess = fed_session(self._fed, lambda: self.model)
            (out,) = run_batched(sess, data, self.batch, [self._output], {**self.values, **(values or {})})
            return out
        (out,) = run_batched(self._variants.session_for(values), data, self.batch, [self._output])
        return out

    def harmless(self, injections: list[Injection]) -> np.ndarray:
        """Per injection: whether its flips provably change no prediction (bounds.OutputBound;
        all False without a bound). Such a trial's predictions are the clean ones."""
        if self.bound is None:
            return np.zeros(len(injections), bool)
        return self.bound.harmless(injections, self.values)

    def _unsettled(self, injections: list[Injection | None]) -> np.ndarray | None:
        """[trials, samples]: where the bound cannot prove a trial's top-1 unchanged (None
        without a bound)."""
        if self.bound is None:
            return None
        return ~self.bound.settled(injections, self.values)

    def predictions(self, injection: Injection | None = None) -> np.ndarray:
        """Top-1 with the trial's flips applied (NaN logits -> class -1, see the module doc); a
        trial the bound leaves uncertain on few samples runs on those alone (NARROW_SHARE)."""
        if injection is None or not injection.tensors:
            return self.clean
        need = self._unsettled([injection])
        if need is not None and need[0].mean() <= NARROW_SHARE:
            rows = np.flatnonzero(need[0])
            pred = self.clean.copy()
            if rows.size:
                pred[rows] = top1(self.logits(injection.apply(self.values), self.data.subset(rows)))
            return pred
        return top1(self.logits(injection.apply(self.values)))

    @property
    def stacked(self) -> StackedSessions | None:
        if self._stacked is False:
            self._stacked = stacked_sessions(self._work, self._names)
        return self._stacked  # type: ignore[return-value]

    @property
    def stack(self) -> int:  # type: ignore[override]
        return self.stacked.k if self.stacked is not None else 1

    def logits_many(self, variants: list[dict[str, np.ndarray] | None]) -> list[np.ndarray]:
        """`logits(v)` for each variant, `stack` variants per session (stacking.py; a NaN or inf
        in one trial's weights stays in that trial's channels)."""
        if self.stacked is None:
            return [self.logits(v) for v in variants]
        return self.stacked.logits(variants, self.data, fixed_batch(self._work))

    def predictions_many(self, injections: list[Injection | None]) -> list[np.ndarray]:
        """Each injection's top-1, `stack` trials per session. Trials the bound leaves uncertain
        on at most NARROW_SHARE of the samples run in a second pass of the stacked session on
        the union of those samples, when it is at most NARROW_UNION of them (their other
        samples keep the clean top-1, proven); the rest run on every sample."""
        need = self._unsettled(injections) if self.stacked is not None else None
        if need is None:
            return top1_of_trials(injections, self.values, self.clean, self.logits_many)
        share = need.mean(axis=1)
        narrow = (share > 0) & (share <= NARROW_SHARE)
        rows = np.flatnonzero(need[narrow].any(axis=0))
        if not narrow.any() or rows.size > NARROW_UNION * self.clean.size:
            return top1_of_trials(injections, self.values, self.clean, self.logits_many)
        wide = [None if n else i for i, n in zip(injections, narrow)]  # a narrow trial's slot runs clean here
        preds = top1_of_trials(wide, self.values, self.clean, self.logits_many)
        few = [i if n else None for i, n in zip(injections, narrow)]
        sub = self.data.subset(rows)
        on_rows = top1_of_trials(few, self.values, self.clean[rows],
                                 lambda variants: self.stacked.logits(variants, sub, fixed_batch(self._work)))
        for t in np.flatnonzero(narrow):
            preds[t] = self.clean.copy()
            preds[t][rows] = on_rows[t]
        return preds

    def session_info(self) -> dict:
        """What the report records of this session."""
        return {
            "tensors": len(self.space.weights),
            "weights": sum(t.size for t in self.space.weights),
            "bits": sum(t.cells for t in self.space.weights),
            "prepared": self.prepared,
            "bound": self.bound.summary() if self.bound is not None else None,
        }


__all__ = ["FP32_KIND", "FP32BitFlip", "FP32BitFlipParams", "FloatWeightEvaluator", "float_space", "fp32_model"]
