"""Self-tuning for analog PIM (METHODS.md section 4): per-layer output gains from a few probe inputs.

A chip's between-chip variability multiplies each layer's weights by one factor exp(theta_chip)
(faults/variability.py); training cannot remove it, but the deployed model can measure it. As
IBM aihwkit's drift compensation does, `self_tune` runs a few probe inputs (32 by default)
through the nominal model and through the chip and sets, layer by layer in forward order (so a
layer is measured with every earlier layer already tuned),

    alpha = sum |y_ref - b| / sum |y_chip - b|

on the layer's output y (the Conv / Gemm / MatMul output before its activation, bias b
removed: the bias is digital and does not vary, so only the analog product is rescaled). With
`granularity="channel"` (the default) the sums run per output channel and alpha is one number
per channel; with "layer" they run over everything (one number per layer). Both undo a pure
between-chip draw exactly; per channel also takes out part of the within-chip variation (each
channel's row of cells averages to its own gain), and removing the bias matters more than
either (docs/analog.md has the measurements).

`apply_gains` writes alpha into the int8 QDQ model without touching a weight code: the
weight DequantizeLinear's scale becomes scale * alpha (per channel), the int32 bias's scale
becomes bias_scale * alpha (onnxruntime's fused QLinearConv / QGemm read the bias with the
scale input_scale * weight_scale) and its codes become round(b / alpha), so the bias keeps its
value. The gains and the chip they were measured on are recorded in the model's metadata
`harden.tune` (JSON). The tuned model is only right for that chip: on the chip its weights
read w * alpha * exp(theta), and alpha undoes the layer's exp(theta_chip).

The simulated chip is trial `chip` of point 0 of `harden simulate --seed SEED --fault
variability:SIGMA_CHIP,SIGMA_CELL` (drawn from rng([seed, 0, chip])).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from .campaign import trial_rng
from .data import Dataset, load_npz
from .errors import InputError
from .faults.variability import (
    AnalogEvaluator,
    AnalogInjection,
    AnalogLayer,
    Variability,
    VariabilityParams,
    check_sigma,
    float_values,
)
from .fileio import check_output_path
from .model import get_initializer, get_metadata, is_qdq_int8, load_model, save_model, set_initializer, set_metadata
from .stats import summarize

TUNE_METADATA = "harden.tune"
TUNE_SCHEMA = "harden.tune/1"
GRANULARITIES = ("layer", "channel")
DEFAULT_PROBE_SAMPLES = 32

#: A measured gain outside this range means the probe saw (almost) nothing of the layer; such a
#: gain is clipped to it and the layer is listed in the record.
GAIN_RANGE = (0.05, 20.0)


@dataclass
class TuneOptions:
    """The simulated chip (sigma_chip, sigma_cell, seed, chip: trial `chip` of point 0 of a
    `simulate --seed SEED` campaign), how many probe inputs to use and the gain granularity."""

    sigma_chip: float
    sigma_cell: float = 0.0
    seed: int = 0
    chip: int = 0
    probe_samples: int = DEFAULT_PROBE_SAMPLES
    granularity: str = "channel"

    def validate(self) -> None:
        self.sigma_chip = check_sigma("--sigma-chip", self.sigma_chip)
        self.sigma_cell = check_sigma("--sigma-cell", self.sigma_cell)
        for name, v, lo in (("--seed", self.seed, 0), ("--chip", self.chip, 0), ("--probe-samples", self.probe_samples, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"--per must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")


def simulated_chip(evaluator: AnalogEvaluator, sigma_chip: float, sigma_cell: float, seed: int = 0, chip: int = 0) -> AnalogInjection:
    """Trial `chip` of point 0 of `simulate --seed SEED --fault variability:SIGMA_CHIP,SIGMA_CELL`."""

    model = Variability(VariabilityParams(sigma_chip, sigma_cell))
    model.check(evaluator.space)
    return model.sample(trial_rng(seed, 0, chip), evaluator.space)


# --- measuring the gains ----------------------------------------------------------------------


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def fold_gains(values: dict[str, np.ndarray], layers: list[AnalogLayer], gains: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float weights with each layer's gain multiplied in (along the weight's output channels)."""
    out = dict(values)
    by_name = {L.name: L for L in layers}
    for name, g in gains.items():
        w = values[name]
        g = np.asarray(g, np.float32)
        out[name] = w * (g if g.ndim == 0 else _along(g, by_name[name].weight_axis, w.ndim))
    return out


def _channel_sums(y: np.ndarray, axis: int) -> np.ndarray:
    axis = axis % y.ndim
    return np.abs(y.astype(np.float64)).sum(axis=tuple(i for i in range(y.ndim) if i != axis))


def measure_gains(
    evaluator: AnalogEvaluator,
    probe: Dataset,
    chip: AnalogInjection,
    granularity: str = "channel",
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Self-tuning: the gain of every layer (float32, shape () or (channels,)), in forward order,
    each measured with the earlier layers' gains applied. Also returns the layers whose gain
    was clipped to GAIN_RANGE (or left at 1 for channels the probe never reached)."""
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    layers = evaluator.layers
    names = [L.name for L in layers]
    ref = evaluator.layer_outputs(None, names, probe)
    on_chip = chip.apply(evaluator.values)
    gains: dict[str, np.ndarray] = {}
    flagged: list[str] = []
    for L in layers:
        current = fold_gains(on_chip, layers, gains)
        y = evaluator.layer_outputs(current, [L.name], probe)[L.name]
        r = ref[L.name]
        if L.bias:
            b = _along(evaluator.values[L.bias].reshape(-1), L.output_axis % r.ndim, r.ndim)
            r, y = r - b, y - b
        num, den = _channel_sums(r, L.output_axis), _channel_sums(y, L.output_axis)
        if granularity == "layer":
            num, den = np.array(num.sum()), np.array(den.sum())
        reached = den > 0
        g = np.where(reached, num / np.where(reached, den, 1.0), 1.0)
        clipped = np.clip(g, *GAIN_RANGE)
        if not reached.all() or np.any(clipped != g):
            flagged.append(L.name)
        gains[L.name] = clipped.astype(np.float32)
    return gains, flagged


# --- writing the gains into the model ----------------------------------------------------------


def _uses(model: onnx.ModelProto, name: str) -> int:
    return sum(1 for n in model.graph.node for i in n.input if i == name)


def _set_array(model: onnx.ModelProto, node: onnx.NodeProto, slot: int, value: np.ndarray, suffix: str) -> None:
    """Give input `slot` of `node` the initializer value `value`: in place when only this node
    reads it, else as a new initializer `<name><suffix>` (other readers keep the old one)."""
    name = node.input[slot]
    new = numpy_helper.from_array(value, name)
    if _uses(model, name) > 1:
        new.name = name + suffix
        node.input[slot] = new.name
        model.graph.initializer.append(new)
        return
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(new)
            return
    raise KeyError(name)


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for a in node.attribute:
        if a.name == "axis":
            a.i = axis
            return
    node.attribute.append(onnx.helper.make_attribute("axis", axis))


def _scaled_dq(model: onnx.ModelProto, node: onnx.NodeProto, gain: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Multiply the scale of DequantizeLinear `node` by `gain` (scalar or per channel along
    `axis`); a per-tensor scale becomes per-channel when the gain is. Returns the effective
    per-element multiplier to apply to values that must keep their dequantized value."""

    inits = {t.name for t in model.graph.initializer}
    scale = get_initializer(model, node.input[1]).astype(np.float32)
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
    zp = get_initializer(model, zp_name) if zp_name else None
    attr_axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % ndim if ndim else 0
    if scale.size > 1 and not (scale.size == gain.size and attr_axis == axis) and np.all(scale == scale.flat[0]) \
            and (zp is None or np.all(zp == zp.flat[0])):
        # one value along another axis (an embedding table's per-row scale, quantize.per_row_table_scales):
        # per tensor in all but shape
        scale = scale.reshape(-1)[:1].reshape(())
        if zp is not None:
            zp = zp.reshape(-1)[:1].reshape(())
            _set_array(model, node, 2, zp, "_harden_tuned")
    if gain.ndim == 0:
        new_scale = (scale * gain).astype(np.float32)
    elif scale.size == gain.size and scale.ndim == 1 and attr_axis == axis:
        new_scale = (scale * gain).astype(np.float32)
    elif scale.size == 1:
        new_scale = (scale.reshape(()) * gain).astype(np.float32)
        _set_axis(node, axis)
        if zp is not None:
            _set_array(model, node, 2, np.full(gain.shape, zp.reshape(()), zp.dtype), "_harden_tuned")
    else:
        raise InputError(f"{node.input[0]}: its scale is per channel along another axis than the output channels; "
                         "tune it with --per layer")
    _set_array(model, node, 1, new_scale, "_harden_tuned")
    return new_scale


def apply_gains(model: onnx.ModelProto, layers: list[AnalogLayer], gains: dict[str, np.ndarray], record: dict | None = None) -> onnx.ModelProto:
    """A copy of `model` with each layer's gain folded into its weight scale and its int32 bias
    (scale x alpha, codes / alpha: the bias keeps its value); `record` goes to `harden.tune`."""

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dq_of = {n.input[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    for L in layers:
        g = gains.get(L.name)
        if g is None:
            continue
        g = np.asarray(g, np.float32)
        _scaled_dq(m, dq_of[L.name], g, L.weight_axis % len(L.shape), len(L.shape))
        if L.bias:
            bdq = dq_of[L.bias]
            codes = get_initializer(m, L.bias).astype(np.float64)
            _scaled_dq(m, bdq, g, 0, 1)
            g_b = g.astype(np.float64) if g.ndim == 0 else g.astype(np.float64).reshape(codes.shape)
            lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
            set_initializer(m, L.bias, np.clip(np.rint(codes / g_b), lo, hi).astype(np.int32))
    if record is not None:
        set_metadata(m, TUNE_METADATA, json.dumps(record, sort_keys=True, separators=(",", ":")))
    return m


def gains_record(gains: dict[str, np.ndarray]) -> dict:
    """Gains as JSON: a number per layer, or a list per output channel."""
    return {k: (round(float(g), 6) if np.ndim(g) == 0 else [round(float(x), 6) for x in np.ravel(g)]) for k, g in gains.items()}


# --- the command's API -----------------------------------------------------------------------


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_tunable(model: onnx.ModelProto, path) -> None:
    if not is_qdq_int8(model):
        raise InputError(f"{path}: tune takes an int8 QDQ model, this one has float weights; run harden apply first")
    if TUNE_METADATA in get_metadata(model):
        raise InputError(f"{path}: already tuned for a chip (metadata {TUNE_METADATA}); tune the untuned model")


def tune(
    model_path: str | os.PathLike,
    probe_path: str | os.PathLike,
    output: str | os.PathLike,
    options: TuneOptions,
    eval_path: str | os.PathLike | None = None,
) -> dict:
    """Tune MODEL for one simulated chip from the first `probe_samples` inputs of PROBE, write
    the tuned model atomically to `output`, and return the record (with, given `eval_path`, the
    accuracy of the nominal, untuned and tuned model on that chip)."""

    started = time.perf_counter()
    options.validate()
    check_output_path(output, model_path, probe_path, eval_path)
    model = load_model(model_path)
    _check_tunable(model, model_path)
    probe = load_npz(probe_path, model, role="probe").take(options.probe_samples)
    test = load_npz(eval_path, model, role="evaluation data") if eval_path is not None else None
    ev = AnalogEvaluator(model, probe)
    chip = simulated_chip(ev, options.sigma_chip, options.sigma_cell, options.seed, options.chip)
    gains, flagged = measure_gains(ev, probe, chip, options.granularity)
    record = {
        "schema": TUNE_SCHEMA,
        "harden_version": __version__,
        "chip": {
            "model": "variability",
            "sigma_chip": options.sigma_chip,
            "sigma_cell": options.sigma_cell,
            "seed": options.seed,
            "chip": options.chip,
            "rng": [options.seed, 0, options.chip],
        },
        "granularity": options.granularity,
        "probe_samples": len(probe),
        "probe_sha256": _sha256(probe_path),
        "estimator": "sum|y_ref - b| / sum|y_chip - b|, layer outputs, forward order",
        "gains": gains_record(gains),
    }
    if flagged:
        record["clipped"] = flagged
    tuned = apply_gains(model, ev.layers, gains, record)
    result = {"record": record, "output": str(output)}
    if test is not None:
        result["evaluation"] = evaluate_on_chip(model, tuned, test, chip)
    save_model(tuned, output)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def evaluate_on_chip(model: onnx.ModelProto, tuned: onnx.ModelProto, data: Dataset, chip: AnalogInjection,
                     evaluator: AnalogEvaluator | None = None) -> dict:
    """Accuracy (labels, else agreement with the nominal analog model) of the nominal model, the
    untuned model on the chip and the tuned model on the same chip."""
    ev = evaluator or AnalogEvaluator(model, data)
    target = data.labels if data.labels is not None else ev.clean
    untuned = ev.predictions(chip)
    tuned_pred = ev.predictions(chip, values=float_values(tuned))
    return {
        "reference": "labels" if data.labels is not None else "agreement",
        "samples": len(data),
        "nominal": round(float(np.mean(ev.clean == target)), 6),
        "untuned_on_chip": round(float(np.mean(untuned == target)), 6),
        "tuned_on_chip": round(float(np.mean(tuned_pred == target)), 6),
    }


# --- figures: tuned vs untuned over many chips ------------------------------------------------


@dataclass
class ChipComparison:
    """Per chip: accuracy of the untuned and the tuned model on it."""

    sigma_chip: float
    sigma_cell: float
    granularity: str
    nominal: float
    untuned: np.ndarray
    tuned: np.ndarray

    def summary(self) -> dict:
        u, t = summarize(self.untuned), summarize(self.tuned)
        d = summarize(self.tuned - self.untuned, bounds=(-1.0, 1.0))
        return {
            "sigma_chip": self.sigma_chip,
            "sigma_cell": self.sigma_cell,
            "granularity": self.granularity,
            "chips": int(self.untuned.size),
            "nominal": round(self.nominal, 6),
            "untuned": u.as_dict(),
            "tuned": t.as_dict(),
            "gain": d.as_dict(),
        }


def compare_tuning(
    model: onnx.ModelProto,
    probe: Dataset,
    data: Dataset,
    sigma_chip: float,
    sigma_cell: float,
    chips: int,
    *,
    seed: int = 0,
    granularity: str = "channel",
    evaluator: AnalogEvaluator | None = None,
    probe_evaluator: AnalogEvaluator | None = None,
) -> ChipComparison:
    """Tune the model for each of `chips` simulated chips (trials 0..chips-1 of point 0 under
    `seed`) from `probe`, and score the untuned and tuned model on `data` on each chip."""
    ev = evaluator or AnalogEvaluator(model, data)
    pev = probe_evaluator or AnalogEvaluator(model, probe)
    target = data.labels if data.labels is not None else ev.clean
    untuned, tuned = np.empty(chips), np.empty(chips)
    for k in range(chips):
        chip = simulated_chip(ev, sigma_chip, sigma_cell, seed, k)
        gains, _ = measure_gains(pev, probe, chip, granularity)
        untuned[k] = np.mean(ev.predictions(chip) == target)
        tuned[k] = np.mean(ev.predictions(chip, values=fold_gains(ev.values, ev.layers, gains)) == target)
    return ChipComparison(sigma_chip, sigma_cell, granularity, float(np.mean(ev.clean == target)), untuned, tuned)


__all__ = [
    "ChipComparison", "GAIN_RANGE", "GRANULARITIES", "TUNE_METADATA", "TUNE_SCHEMA", "TuneOptions", "apply_gains",
    "compare_tuning", "evaluate_on_chip", "fold_gains", "gains_record", "measure_gains", "simulated_chip", "tune",
]
