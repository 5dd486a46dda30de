"""Choose clip thresholds by measured resilience, not by the calibration maximum alone.

FT-ClipAct style (issue 3): for each candidate threshold percentile, clip + quantize the model
and run a short int32-bias bit-flip campaign (the fault model where clipping matters) on the
calibration data; keep the candidate with the largest area under accuracy-versus-fault-rate
whose clean accuracy stays within `tolerance` of the unclipped int8 model, preferring the
highest percentile unless a lower one gains at least `min_gain`. Every candidate sees the same
faults (same seed), so the comparison is paired.

No clipping (`NO_CLIP`) is a candidate too, and the default one: clipping must earn its place by
gaining at least `min_gain` of area over the unclipped model without losing clean accuracy.
Measured (issue 11): on a small ViT, a MobileNetV2 and a BERT (GELU / ReLU6 models, whose
few ReLUs and logits guard the pass clips) every threshold lost 1.5 to 5 points of clean
accuracy, so the search now leaves those models unclipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .allocator import release_memory
from .campaign import Campaign, CampaignOptions
from .data import Dataset
from .faults import parse_fault_spec
from .model import float_weight_count
from .passes import Pass, PassContext, PassResult
from .passes.clip import NO_CLIP, ClipPass, calibrate_thresholds
from .passes.quantize import QuantizePass
from .simulate import ChipEvaluator, Reference

#: Samples that rank the candidates (evenly spaced over the calibration data): each candidate is
#: quantized and run through a campaign on them. Measured on the zoo's MobileNetV2 with 900
#: calibration samples: the search took 19.1 s on all of them (issue 12).
RANK_SAMPLES = 256
PERCENTILES = (100.0, 99.99, 99.9)
RATES = (1e-4, 1e-3)


#: Above this many weights the search runs fewer trials per candidate (each trial is a pass of
#: the whole model): ResNet-50 (25.5 M) runs 4, which took its search from 118 s to 72 s.
TRIAL_WEIGHTS = 2_000_000


def trials_for(trials: int, num_weights: int) -> int:
    """Trials per candidate and rate: `trials` up to TRIAL_WEIGHTS weights, then fewer (at least
    4), by model size alone so the choice stays deterministic."""
    return max(min(4, trials), min(trials, int(trials * TRIAL_WEIGHTS / max(num_weights, 1))))


@dataclass
class ClipChoice:
    """The chosen percentile (or NO_CLIP) and what every candidate measured."""

    percentile: float | str
    record: dict


def _quantized(float_model: onnx.ModelProto, calib: Dataset, seed: int, clip: ClipPass | None) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(float_model)
    ctx = PassContext(calib=calib, seed=seed)
    if clip is not None:
        m = clip.call(m, ctx).model
    quantized = QuantizePass().call(m, ctx).model
    release_memory()  # onnxruntime's quantizer leaves hundreds of MB freed but kept (harden.allocator)
    return quantized


def search_clip(
    float_model: onnx.ModelProto,
    calib: Dataset,
    *,
    style: str = "zero",
    percentiles: tuple[float, ...] = PERCENTILES,
    rates: tuple[float, ...] = RATES,
    trials: int = 20,
    tolerance: float = 0.005,
    min_gain: float = 0.01,
    seed: int = 0,
) -> ClipChoice:
    """Measure each candidate percentile; return the most resilient acceptable one."""
    if len(calib) > RANK_SAMPLES:
        calib = calib.subset(np.linspace(0, len(calib) - 1, RANK_SAMPLES).round().astype(np.int64))
    trials = trials_for(trials, float_weight_count(float_model))
    points = parse_fault_spec("bitflip-bias:" + ",".join(repr(r) for r in rates))
    opts = CampaignOptions(trials=trials, seed=seed)
    base_model = _quantized(float_model, calib, seed, None)
    if calib.labels is not None:
        reference = Reference(calib.labels, "labels")
    else:  # without labels: agreement with the unclipped int8 model
        probe = ChipEvaluator(base_model, calib, Reference(np.zeros(len(calib), np.int64), "agreement"))
        reference = Reference(probe.predictions(), "agreement")
    x = np.log10(np.asarray(rates))

    def measure(model: onnx.ModelProto, floor: float | None = None) -> tuple[float, float | None]:
        """(clean accuracy, area under accuracy vs rate); no campaign for a candidate whose
        clean accuracy is already below `floor`: it cannot be chosen, so its area is not needed."""
        camp = Campaign(model, calib, points, seed=seed, evaluator=ChipEvaluator(model, calib, reference))
        if floor is not None and camp.clean_accuracy < floor:
            return camp.clean_accuracy, None
        means = [float(p.accuracy.mean()) for p in camp.run(opts).points]
        # Area under accuracy vs log10(rate), normalised to the rate span: a mean accuracy.
        auc = float(np.trapezoid(means, x) / (x[-1] - x[0])) if len(rates) > 1 else means[0]
        return camp.clean_accuracy, auc

    base_clean, base_auc = measure(base_model)
    rows = [{"percentile": None, "clean": round(base_clean, 6), "auc": round(base_auc, 6)}]
    # one capture of the float model's activations serves every candidate's thresholds
    probe = ClipPass(style)
    guarded = probe.guarded_output(float_model) if probe.output_guard else None
    release_memory()  # the base candidate's sessions
    thresholds = calibrate_thresholds(float_model, calib.take(probe.calib_samples), percentiles, guarded)
    for p in percentiles:
        clip = ClipPass(style, p, thresholds=thresholds.pop(p))
        clean, auc = measure(_quantized(float_model, calib, seed, clip), base_clean - tolerance)
        release_memory()
        ok = clean >= base_clean - tolerance
        row = {"percentile": p, "clean": round(clean, 6), "auc": None if auc is None else round(auc, 6), "acceptable": ok}
        if auc is None:
            row["skipped"] = "loses clean accuracy: no campaign"
        rows.append(row)
    # Lower thresholds cost clean accuracy on unseen data, so a lower percentile must earn its
    # place: take the highest percentile within `min_gain` of the best acceptable area.
    acceptable = [r for r in rows[1:] if r["acceptable"]]
    top = max((r["auc"] for r in acceptable), default=None)
    if top is None or top < base_auc + min_gain:
        best: float | str = NO_CLIP
        why = ("every threshold loses clean accuracy" if top is None
               else f"no threshold gains {min_gain:.0%} of accuracy over the unclipped model")
    else:
        best = max(r["percentile"] for r in acceptable if r["auc"] >= top - min_gain)
        why = None
    return ClipChoice(best, {
        **({"unclipped_because": why} if why else {}),
        "fault": f"bitflip-bias at {list(rates)}", "trials": trials, "samples": len(calib), "tolerance": tolerance, "min_gain": min_gain,
        "candidates": rows, "chosen_percentile": best,
    })


class ClipSearchPass(Pass):
    """The search as a pass: leaves the model alone and the chosen percentile in the context,
    for the clip pass after it (`ClipPass(percentile=None)`)."""

    name = "clip-search"
    requires = frozenset({"float"})
    provides = frozenset({"clip_percentile"})

    def __init__(self, style: str = "zero"):
        self.style = style

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        choice = search_clip(model, ctx.calib, style=self.style, seed=ctx.seed)
        ctx.clip_percentile = choice.percentile
        return PassResult(model, False, choice.record)

    def note(self, record: dict) -> str:
        if record["chosen_percentile"] == NO_CLIP:
            return f"no clipping: {record['unclipped_because']} ({len(record['candidates']) - 1} candidates)"
        return f"threshold percentile {record['chosen_percentile']} chosen by {record['fault']} ({len(record['candidates']) - 1} candidates)"
