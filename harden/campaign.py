"""Fault-injection campaigns on onnxruntime: points x trials on one session, with statistics.

A campaign runs each *point* (one fault model with its parameters, e.g. bit flips at 1e-3) for
a number of *trials*. Trial t of point p draws its faults from
`np.random.default_rng([seed, p, t])` alone, so any trial can be re-derived and its exact
faults listed (`describe_trial`) without re-running the others.

Speed (DESIGN.md, performance principles): one `ChipEvaluator` per model, whose session takes
the int8 weights and int32 biases as graph inputs; a trial draws only its faulty cells
(binomial count, then positions), copies only the tensors it hits, and costs one inference pass.

Figures per point: accuracy against the labels (or top-1 agreement with the fault-free int8
model when the data has none) and SDC-1, the fraction of the inputs the fault-free model gets
right whose top-1 changes under the faults; each with mean, standard deviation and a Student-t
95 % interval over the trials, and for SDC-1 also a pooled Wilson interval (sound when SDC is
rare). With a margin, a point stops as soon as the half-width of its accuracy interval (at the
requested confidence) is within the margin, checked every `check_every` trials after
`min_trials`; the cap is Leveugle's sample size for that margin (p = 0.5, unbounded
population) unless `trials` is given.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from . import __version__
from .data import Dataset, load_npz
from .errors import InputError
from .faults import (
    ChipFaults,
    Fault,
    FaultModel,
    Injection,
    WeightSpace,
    parse_fault_spec,
)
from .model import is_qdq_int8, load_model
from .report import REPORT_SCHEMA
from .simulate import ChipEvaluator, Reference
from .stats import leveugle_n, summarize, wilson

DEFAULT_TRIALS = 100


def trial_rng(seed: int, point: int, trial: int) -> np.random.Generator:
    """The generator of trial `trial` of point `point`: everything the trial draws comes from it."""
    return np.random.default_rng([seed, point, trial])


@dataclass
class CampaignOptions:
    """trials: trials per point (the cap when a margin is given; default 100 without a margin,
    Leveugle's n with one). margin / confidence: stop a point once its accuracy interval's
    half-width at `confidence` is <= margin."""

    trials: int | None = None
    margin: float | None = None
    confidence: float = 0.95
    seed: int = 0
    min_trials: int = 20
    check_every: int = 5

    def validate(self) -> None:
        def bad(msg: str) -> InputError:
            return InputError(msg)

        if self.trials is not None and (not _is_int(self.trials) or self.trials < 1):
            raise bad(f"--trials must be an integer >= 1, got {self.trials!r}")
        if self.margin is not None and not (isinstance(self.margin, (int, float)) and 0.0 < self.margin < 1.0):
            raise bad(f"--margin must be in (0, 1), got {self.margin!r}")
        if not (isinstance(self.confidence, (int, float)) and 0.0 < self.confidence < 1.0):
            raise bad(f"--confidence must be in (0, 1), got {self.confidence!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.min_trials) or self.min_trials < 2:
            raise bad(f"min_trials must be an integer >= 2, got {self.min_trials!r}")
        if not _is_int(self.check_every) or self.check_every < 1:
            raise bad(f"check_every must be an integer >= 1, got {self.check_every!r}")

    def planned_trials(self) -> int:
        """Trials per random point: --trials, else Leveugle's n for the margin, else 100."""
        if self.trials is not None:
            return int(self.trials)
        if self.margin is not None:
            return leveugle_n(self.margin, self.confidence)
        return DEFAULT_TRIALS


@dataclass
class TrialResult:
    point: int
    trial: int
    accuracy: float
    sdc1_events: int  # correct inputs whose top-1 changed
    faulty_cells: int


@dataclass
class PointResult:
    index: int
    model: FaultModel
    planned: int
    accuracy: np.ndarray
    sdc1_events: np.ndarray
    faulty_cells: np.ndarray
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def trials(self) -> int:
        return int(self.accuracy.size)


@dataclass
class CampaignResult:
    clean_accuracy: float
    reference: str
    samples: int
    correct: int
    options: CampaignOptions
    points: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0


class Campaign:
    """Points x trials of fault injection on one int8 QDQ model and one dataset."""

    def __init__(
        self,
        model: onnx.ModelProto,
        data: Dataset,
        points: Sequence[FaultModel],
        *,
        seed: int = 0,
        evaluator: ChipEvaluator | None = None,
    ):
        self.space = WeightSpace.from_model(model)
        if not self.space.weights:
            raise InputError("the model has no int8 Conv/Gemm/MatMul weights (not an int8 QDQ model)")
        self.points = list(points)
        for p in self.points:
            p.check(self.space)
        self.seed = int(seed)
        if evaluator is None:
            ref = Reference(data.labels, "labels") if data.labels is not None else Reference(np.empty(0, np.int64), "agreement")
            evaluator = ChipEvaluator(model, data, ref)
        self.evaluator = evaluator
        self.values = evaluator.defaults  # the clean int8 weights and int32 biases
        self.clean_pred = evaluator.predictions()
        if evaluator.reference.kind == "agreement" and evaluator.reference.target.size == 0:
            evaluator.reference = Reference(self.clean_pred, "agreement")
        self.target = evaluator.reference.target
        self.correct = self.clean_pred == self.target
        self.n_correct = int(self.correct.sum())
        self.clean_accuracy = float(self.correct.mean())

    # --- one trial -----------------------------------------------------------------------

    def injection(self, point: int, trial: int) -> Injection:
        """The faults of trial `trial` of point `point` (re-derived from the seed alone)."""
        return self.points[point].sample(trial_rng(self.seed, point, trial), self.space)

    def describe_trial(self, point: int, trial: int) -> list[Fault]:
        """Every faulty cell of the trial: (tensor, flat index, bit, kind, changes the value?)."""
        return self.injection(point, trial).faults(self.values)

    def faulty_values(self, point: int, trial: int) -> dict[str, np.ndarray]:
        """All int8 weights and int32 biases as the trial's faults leave them."""
        return self.injection(point, trial).apply(self.values)

    def run_trial(self, point: int, trial: int) -> TrialResult:
        inj = self.injection(point, trial)
        if inj.tensors:
            pred = self.evaluator.predictions(inj.apply(self.values))
        else:  # nothing hit: the clean predictions (the session is deterministic)
            pred = self.clean_pred
        acc = float(np.mean(pred == self.target))
        events = int(np.count_nonzero(pred[self.correct] != self.clean_pred[self.correct]))
        return TrialResult(point, trial, acc, events, inj.cells)

    # --- the campaign --------------------------------------------------------------------

    def run_point(self, point: int, options: CampaignOptions, progress: Callable[[int], None] | None = None) -> PointResult:
        model = self.points[point]
        planned = 1 if model.deterministic else options.planned_trials()
        acc = np.empty(planned)
        events = np.empty(planned, np.int64)
        cells = np.empty(planned, np.int64)
        t0 = time.perf_counter()
        n, stopped = 0, False
        for t in range(planned):
            r = self.run_trial(point, t)
            acc[t], events[t], cells[t] = r.accuracy, r.sdc1_events, r.faulty_cells
            n = t + 1
            if progress:
                progress(1)
            if options.margin is not None and n < planned and n >= options.min_trials and n % options.check_every == 0:
                h = summarize(acc[:n], options.confidence).half_width
                if h is not None and h <= options.margin:
                    stopped = True
                    break
        if progress and n < planned:
            progress(planned - n)
        return PointResult(point, model, planned, acc[:n].copy(), events[:n].copy(), cells[:n].copy(), stopped,
                           time.perf_counter() - t0)

    def run(self, options: CampaignOptions | None = None, progress: Callable[[int], None] | None = None) -> CampaignResult:
        opts = options or CampaignOptions(seed=self.seed)
        t0 = time.perf_counter()
        res = CampaignResult(self.clean_accuracy, self.evaluator.reference.kind, int(self.target.size), self.n_correct, opts)
        for p in range(len(self.points)):
            res.points.append(self.run_point(p, opts, progress))
        res.seconds = time.perf_counter() - t0
        return res

    def total_planned(self, options: CampaignOptions) -> int:
        return sum(1 if p.deterministic else options.planned_trials() for p in self.points)

    # --- reporting -----------------------------------------------------------------------

    def point_record(self, pr: PointResult, options: CampaignOptions) -> dict:
        m = pr.model
        acc = summarize(pr.accuracy, 0.95)
        acc_c = summarize(pr.accuracy, options.confidence)
        rec = {
            "index": pr.index,
            "label": m.label,
            "fault": _describe(m),
            "deterministic": bool(m.deterministic),
            "trials": pr.trials,
            "planned_trials": pr.planned,
            "stopped_early": pr.stopped_early,
            "faulty_cells": {
                "mean": round(float(pr.faulty_cells.mean()), 3),
                "min": int(pr.faulty_cells.min()),
                "max": int(pr.faulty_cells.max()),
            },
            "accuracy": _figure(acc, acc_c, m.deterministic),
        }
        if self.n_correct:
            rates = pr.sdc1_events / self.n_correct
            s, s_c = summarize(rates, 0.95), summarize(rates, options.confidence)
            events, opportunities = int(pr.sdc1_events.sum()), pr.trials * self.n_correct
            lo, hi = wilson(events, opportunities, 0.95)
            rec["sdc1"] = {
                **_figure(s, s_c, m.deterministic),
                "events": events,
                "opportunities": opportunities,
                "wilson95": [round(lo, 6), round(hi, 6)],
            }
        else:
            rec["sdc1"] = None
            rates = None
        rec["worst_trial"] = int(np.argmin(pr.accuracy))
        rec["per_trial"] = {
            "accuracy": [round(float(a), 6) for a in pr.accuracy],
            "sdc1": None if rates is None else [round(float(r), 6) for r in rates],
            "faulty_cells": [int(c) for c in pr.faulty_cells],
        }
        rec["seconds"] = round(pr.seconds, 4)
        return rec

    def trial_record(self, point: int, trial: int) -> dict:
        """One trial re-derived: its figures and every faulty cell."""
        if not 0 <= point < len(self.points):
            raise InputError(f"--show-trial: point {point} does not exist (points 0 to {len(self.points) - 1})")
        if trial < 0:
            raise InputError(f"--show-trial: trial must be >= 0, got {trial}")
        r = self.run_trial(point, trial)
        faults = self.describe_trial(point, trial)
        return {
            "point": point,
            "label": self.points[point].label,
            "trial": trial,
            "rng": [self.seed, point, trial],
            "accuracy": round(r.accuracy, 6),
            "sdc1": round(r.sdc1_events / self.n_correct, 6) if self.n_correct else None,
            "faulty_cells": r.faulty_cells,
            "faults": [f._asdict() for f in faults],
        }


def describe_trial(
    model: onnx.ModelProto | WeightSpace,
    fault: FaultModel | str,
    seed: int,
    point: int,
    trial: int,
) -> list[Fault]:
    """The exact faulty cells of trial `trial` of point `point` in a campaign run with `seed`.

    `fault` is the point's fault model (or a spec naming exactly one point, e.g.
    "bitflip:1e-3"). With a model, each fault also says whether it changes the stored value.
    """
    if isinstance(fault, str):
        models = parse_fault_spec(fault)
        if len(models) != 1:
            raise InputError(f"{fault!r} names {len(models)} points; give one")
        fault = models[0]
    if isinstance(model, WeightSpace):
        space, values = model, None
    else:
        from .simulate import model_values

        space = WeightSpace.from_model(model)
        values = model_values(model, [t.name for t in space.weights + space.biases])
    fault.check(space)
    return fault.sample(trial_rng(seed, point, trial), space).faults(values)


# --- the `simulate` command's API -----------------------------------------------------------


@dataclass
class SimulationResult:
    report: dict
    campaign: Campaign
    result: CampaignResult | None = None


def prepare_campaign(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    faults: Sequence[str] = (),
    faultmaps: Sequence[str | os.PathLike] = (),
    options: CampaignOptions | None = None,
) -> tuple[Campaign, onnx.ModelProto, Dataset]:
    """Check every input (options, fault specs, model, data) and build the campaign."""
    opts = options or CampaignOptions()
    opts.validate()
    points: list[FaultModel] = []
    for spec in faults:
        points += parse_fault_spec(spec)
    for path in faultmaps:
        points.append(ChipFaults.from_path(path))
    if not points:
        raise InputError("nothing to simulate: give --fault SPEC (e.g. bitflip:1e-4,1e-3) or --faultmap CHIP")
    model = load_model(model_path)
    if not is_qdq_int8(model):
        raise InputError(f"{model_path}: simulate takes an int8 QDQ model, this one has float weights; run harden apply first")
    data = load_npz(data_path, model, role="data")
    campaign = Campaign(model, data, points, seed=opts.seed)
    return campaign, model, data


def simulate(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    faults: Sequence[str] = (),
    faultmaps: Sequence[str | os.PathLike] = (),
    options: CampaignOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    show_trial: tuple[int, int] | None = None,
) -> SimulationResult:
    """Run a campaign (or re-derive one trial with `show_trial=(point, trial)`) and report it.

    `on_start(total_planned_trials)` is called once the inputs are checked, before any trial.
    """
    from .pipeline import sha256_of

    started = time.perf_counter()
    opts = options or CampaignOptions()
    campaign, _, data = prepare_campaign(model_path, data_path, faults, faultmaps, opts)
    space = campaign.space
    report: dict = {
        "schema": REPORT_SCHEMA,
        "harden_version": __version__,
        "command": "simulate",
        "inputs": {
            "model": {"path": str(model_path), "sha256": sha256_of(model_path)},
            "data": {"path": str(data_path), "sha256": sha256_of(data_path), "samples": len(data)},
        },
        "model": {
            "int8_tensors": len(space.weights),
            "int8_weights": space.weight_count,
            "int32_bias_tensors": len(space.biases),
            "int32_biases": sum(t.size for t in space.biases),
        },
        "options": {**asdict(opts), "planned_trials": opts.planned_trials()},
        "points": [{"index": i, "label": p.label, "fault": _describe(p)} for i, p in enumerate(campaign.points)],
        "clean": {
            "reference": campaign.evaluator.reference.kind,
            "samples": len(data),
            "accuracy": round(campaign.clean_accuracy, 6),
            "correct": campaign.n_correct,
        },
    }
    if show_trial is not None:
        report["trial"] = campaign.trial_record(*show_trial)
        report["seconds"] = round(time.perf_counter() - started, 3)
        return SimulationResult(report, campaign)
    if on_start:
        on_start(campaign.total_planned(opts))
    result = campaign.run(opts, progress)
    report["points"] = [campaign.point_record(p, opts) for p in result.points]
    report["seconds"] = round(time.perf_counter() - started, 3)
    return SimulationResult(report, campaign, result)


def _figure(s95, s_c, deterministic: bool) -> dict:
    """mean, std, ci95 (t-based) and the half-width at the campaign's confidence."""
    if deterministic:  # the same faults every trial: the figure is exact
        return {"mean": round(s95.mean, 6), "std": 0.0, "ci95": [round(s95.mean, 6)] * 2, "half_width": 0.0}
    d95 = s95.as_dict()
    return {"mean": d95["mean"], "std": d95["std"], "ci95": d95["ci"], "half_width": s_c.as_dict()["half_width"]}


def _describe(m: FaultModel) -> dict:
    describe = getattr(m, "describe", None)
    if callable(describe):
        return describe()
    params = m.params
    try:
        return {"name": m.name, **asdict(params)}
    except TypeError:
        return {"name": m.name}


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
