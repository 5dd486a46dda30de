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

Per-layer vulnerability (`add_per_layer`, `simulate --per-layer SPEC`): one more point per
tensor the fault model can hit, each the same model restricted to that tensor (`tensors=`);
they are ordinary points of the same campaign (indices after the `--fault` points, so
`--show-trial` re-derives them too) and are reported ranked by accuracy loss.

Activation faults (`bitflip-act`) run on a second session, the rewrite of
faults/activation.py, built only when a point needs it; those points are scored against that
session's own clean predictions. Every side session works that way (`SESSION_KINDS`, keyed by
a fault model's `space_kind`).

Float models: a campaign also runs on a float model, whose points must then be float fault
models (`precision = "float"`: `bitflip-fp32`, faults/fp32.py, on its own "fp32" session); the
weight session is then the float model's ordinary session, the fault-free reference. A point
whose precision is not the model's is refused before any work (`check_precision`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from . import __version__
from .cluster import (
    LOST_TASK_RETRIES,
    SharedData,
    cluster_address,
    connect,
    is_lost_task,
    require_distributed,
    worker_cached,
    worker_count,
)
from .data import NAN_CLASS, Dataset, load_npz
from .diagnostics import diagnose
from .errors import InputError
from .faults import (
    ActivationEvaluator,
    ActivationSpace,
    ChipFaults,
    Fault,
    FaultModel,
    Injection,
    WeightSpace,
    parse_fault_spec,
)
from .faults.fp32 import FP32_KIND, FloatWeightEvaluator, float_space, fp32_model
from .faults.variability import AnalogEvaluator
from .fileio import sha256_of
from .gates import PointGate, check_point_gates, point_gate_results
from .model import is_qdq_int8, load_model
from .report import REPORT_SCHEMA
from .simulate import ChipEvaluator, Reference, model_values
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
    nan_outputs: int = 0  # inputs whose logits hold a NaN (predicted as class -1, data.NAN_CLASS)


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
    nan_outputs: np.ndarray | None = None

    @property
    def trials(self) -> int:
        return int(self.accuracy.size)


@dataclass
class Baseline:
    """What the trials of a point are compared with: the clean predictions of the session that
    runs them, the target they are scored against, and which inputs the clean model gets right."""

    clean_pred: np.ndarray
    target: np.ndarray
    correct: np.ndarray = field(init=False)
    n_correct: int = field(init=False)
    clean_accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        self.correct = self.clean_pred == self.target
        self.n_correct = int(self.correct.sum())
        self.clean_accuracy = float(self.correct.mean()) if self.target.size else 0.0


@dataclass
class PerLayer:
    """The per-layer points of a campaign: `base` restricted to each of `tensors` in turn."""

    base: FaultModel
    indices: list[int]
    tensors: list  # faults.Tensor, in the space's order


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
        #: "int8" (an int8 QDQ model) or "float" (no int8 weights: only float fault models run)
        self.precision = "int8" if self.space.weights else "float"
        self.points = list(points)
        check_precision(self.points, self.precision)
        self.model = model
        self.data = data
        self.seed = int(seed)
        self.per_layer: PerLayer | None = None
        if evaluator is None:
            ref = Reference(data.labels, "labels") if data.labels is not None else Reference(np.empty(0, np.int64), "agreement")
            evaluator = ChipEvaluator(model, data, ref)
        self.evaluator = evaluator
        self._given_reference = Reference(evaluator.reference.target.copy(), evaluator.reference.kind)
        self.values = evaluator.defaults  # the clean int8 weights and int32 biases
        self.clean_pred = evaluator.predictions()
        self._self_reference = evaluator.reference.kind == "agreement" and evaluator.reference.target.size == 0
        if self._self_reference:
            evaluator.reference = Reference(self.clean_pred, "agreement")
        self.target = evaluator.reference.target
        self.correct = self.clean_pred == self.target
        self.n_correct = int(self.correct.sum())
        self.clean_accuracy = float(self.correct.mean())
        self.baseline = Baseline(self.clean_pred, self.target)
        self._sessions: dict[str, tuple[object, Baseline]] = {}
        for p in self.points:
            p.check(self.space_of(p))

    # --- the spaces and sessions a point runs on -------------------------------------------

    @staticmethod
    def kind_of(model: FaultModel) -> str:
        """The session a fault model runs on: "weights" (the default) or a SESSION_KINDS key."""
        return model.space_kind

    @classmethod
    def is_activation(cls, model: FaultModel) -> bool:
        return cls.kind_of(model) == "activations"

    @classmethod
    def is_analog(cls, model: FaultModel) -> bool:
        return cls.kind_of(model) == "analog"

    @staticmethod
    def precision_of(model: FaultModel) -> str:
        """The model precision a fault model needs: "int8" (the default) or "float"."""
        return model.precision

    def session(self, kind: str):
        """The side session of `kind` (built on first use) and its clean baseline. Labels (or a
        given reference) stay the target; a self-made agreement reference becomes that
        session's own clean predictions."""
        if kind not in self._sessions:
            factory = SESSION_KINDS.get(kind)
            if factory is None:
                raise InputError(f"no session for fault models of space_kind {kind!r} (known: weights, {', '.join(SESSION_KINDS)})")
            ev = factory(self.model, self.data)
            target = ev.clean if self._self_reference else self.target
            self._sessions[kind] = (ev, Baseline(ev.clean, target))
        return self._sessions[kind]

    @property
    def activations(self) -> ActivationEvaluator:
        """The activation-fault session (built on first use)."""
        return self.session("activations")[0]

    @property
    def act_space(self) -> ActivationSpace:
        return self.activations.space

    def space_of(self, model: FaultModel):
        kind = self.kind_of(model)
        return self.space if kind == "weights" else self.session(kind)[0].space

    def baseline_of(self, point: int) -> Baseline:
        kind = self.kind_of(self.points[point])
        return self.baseline if kind == "weights" else self.session(kind)[1]

    # --- per-layer vulnerability -------------------------------------------------------------

    def add_per_layer(self, base: FaultModel) -> PerLayer:
        """Append one point per tensor `base` can hit, each `base` restricted to that tensor."""
        if self.per_layer is not None:
            raise InputError("the campaign already has per-layer points")
        if not base.restrictable:
            raise InputError(f"--per-layer: fault model {base.name!r} cannot be restricted to one tensor")
        if base.restriction is not None:
            raise InputError("--per-layer takes an unrestricted fault model (it restricts it to each tensor in turn)")
        check_precision([base], self.precision, "--per-layer")
        space = self.space_of(base)
        base.check(space)
        tensors = list(base.targets(space))
        start = len(self.points)
        for t in tensors:
            m = base.restricted((t.name,))
            m.check(space)
            self.points.append(m)
        self.per_layer = PerLayer(base, list(range(start, len(self.points))), tensors)
        return self.per_layer

    @property
    def main_points(self) -> int:
        """How many points come before the per-layer ones."""
        return self.per_layer.indices[0] if self.per_layer and self.per_layer.indices else len(self.points)

    # --- one trial -----------------------------------------------------------------------

    def injection(self, point: int, trial: int) -> Injection:
        """The faults of trial `trial` of point `point` (re-derived from the seed alone)."""
        model = self.points[point]
        return model.sample(trial_rng(self.seed, point, trial), self.space_of(model))

    def describe_trial(self, point: int, trial: int) -> list[Fault]:
        """Every faulty cell of the trial: (tensor, flat index, bit, kind, changes the value?).
        For activation faults the index is flat over [samples, ...] of the quantized tensor."""
        inj = self.injection(point, trial)
        if self.kind_of(self.points[point]) != "weights":
            return [f._replace(changes=True) if f.kind == "flip" else f for f in inj.faults(None)]
        return inj.faults(self.values)

    def faulty_values(self, point: int, trial: int) -> dict[str, np.ndarray]:
        """All int8 weights and int32 biases as the trial's faults leave them (faults that run
        on another session, e.g. activation faults, leave them clean)."""
        if self.kind_of(self.points[point]) != "weights":
            return dict(self.values)
        return self.injection(point, trial).apply(self.values)

    def run_trial(self, point: int, trial: int) -> TrialResult:
        inj = self.injection(point, trial)
        base = self.baseline_of(point)
        kind = self.kind_of(self.points[point])
        if not inj.tensors:  # nothing hit: the clean predictions (the session is deterministic)
            pred = base.clean_pred
        elif kind != "weights":
            pred = self.session(kind)[0].predictions(inj)
        else:
            pred = self.evaluator.predictions(inj.apply(self.values))
        # A NaN logit row is predicted as NAN_CLASS (-1, data.top1): wrong, and an SDC-1 event
        # when the fault-free prediction was right; both figures need nothing more.
        acc = float(np.mean(pred == base.target))
        events = int(np.count_nonzero(pred[base.correct] != base.clean_pred[base.correct]))
        return TrialResult(point, trial, acc, events, inj.cells, int(np.count_nonzero(pred == NAN_CLASS)))

    # --- the campaign --------------------------------------------------------------------

    def run_point(self, point: int, options: CampaignOptions, progress: Callable[[int], None] | None = None,
                  executor: "TrialExecutor | None" = None) -> PointResult:
        """The trials of one point, stopping early once the interval meets the margin.

        The stopping rule is checked at the same trial counts (every `check_every` from
        `min_trials`) whoever runs the trials, and every trial is re-derived from (seed, point,
        trial), so an executor that runs rounds of trials on other processes gives the figures
        of this sequential loop exactly (trials past the stop are computed and dropped).
        """
        model = self.points[point]
        planned = 1 if model.deterministic else options.planned_trials()
        acc = np.empty(planned)
        events = np.empty(planned, np.int64)
        cells = np.empty(planned, np.int64)
        nans = np.empty(planned, np.int64)
        t0 = time.perf_counter()
        n, stopped = 0, False
        while n < planned and not stopped:
            if executor is None:
                rows: Iterable[TrialResult] = (self.run_trial(point, t) for t in range(n, planned))
            else:
                rows = executor.run(self, point, n, executor.round_end(n, planned, options))
            for r in rows:
                t = r.trial
                acc[t], events[t], cells[t], nans[t] = r.accuracy, r.sdc1_events, r.faulty_cells, r.nan_outputs
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
                           time.perf_counter() - t0, nans[:n].copy())

    def run(self, options: CampaignOptions | None = None, progress: Callable[[int], None] | None = None,
            executor: "TrialExecutor | None" = None) -> CampaignResult:
        opts = options or CampaignOptions(seed=self.seed)
        t0 = time.perf_counter()
        res = CampaignResult(self.clean_accuracy, self.evaluator.reference.kind, int(self.target.size), self.n_correct, opts)
        for p in range(len(self.points)):
            res.points.append(self.run_point(p, opts, progress, executor))
        res.seconds = time.perf_counter() - t0
        return res

    def recipe(self) -> "CampaignRecipe":
        """What another process needs to rebuild this campaign, trial for trial."""
        return CampaignRecipe(self.model.SerializeToString(), self.data, list(self.points), self.seed, self._given_reference)

    def total_planned(self, options: CampaignOptions) -> int:
        return sum(1 if p.deterministic else options.planned_trials() for p in self.points)

    # --- reporting -----------------------------------------------------------------------

    def point_record(self, pr: PointResult, options: CampaignOptions) -> dict:
        m = pr.model
        n_correct = self.baseline_of(pr.index).n_correct
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
        if self.kind_of(m) != "weights":
            rec["session"] = self.kind_of(m)
            rec["clean_accuracy"] = round(self.baseline_of(pr.index).clean_accuracy, 6)
        if self.precision_of(m) == "float" and pr.nan_outputs is not None:
            # float32 faults can make NaN logits: those inputs count as wrong (data.top1)
            frac = pr.nan_outputs / max(1, int(self.target.size))
            rec["nan_outputs"] = {
                "mean": round(float(frac.mean()), 6),
                "max": round(float(frac.max()), 6),
                "trials_with_nan": int(np.count_nonzero(pr.nan_outputs)),
            }
        if n_correct:
            rates = pr.sdc1_events / n_correct
            s, s_c = summarize(rates, 0.95), summarize(rates, options.confidence)
            events, opportunities = int(pr.sdc1_events.sum()), pr.trials * n_correct
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
        faults = [f._asdict() for f in self.describe_trial(point, trial)]
        if self.is_activation(self.points[point]):
            per_sample = {s.name: s.elements for s in self.act_space.sites}
            for f in faults:
                f["sample"], f["element"] = divmod(f["index"], per_sample[f["tensor"]])
        n_correct = self.baseline_of(point).n_correct
        return {
            "point": point,
            "label": self.points[point].label,
            "trial": trial,
            "rng": [self.seed, point, trial],
            "accuracy": round(r.accuracy, 6),
            "sdc1": round(r.sdc1_events / n_correct, 6) if n_correct else None,
            "faulty_cells": r.faulty_cells,
            "faults": faults,
        }

    def per_layer_records(self, result: CampaignResult, options: CampaignOptions) -> list[dict]:
        """The per-layer points ranked by accuracy loss (rank 1 loses the most), each with the
        tensor, its op, size, accuracy (mean, std, ci95), loss = clean - mean accuracy and its
        interval, SDC-1, faulty cells per trial and loss per faulty cell."""
        if self.per_layer is None:
            return []
        by_index = {pr.index: pr for pr in result.points}
        ops = {}
        for w in self.evaluator.table:
            ops[w.name] = (w.op_type, w.node_name)
            if w.bias:
                ops[w.bias] = (w.op_type, w.node_name)
        kind = self.kind_of(self.per_layer.base)
        if kind != "weights":  # a side session may know its tensors' ops (fp32: `ops`)
            ops.update(getattr(self.session(kind)[0], "ops", None) or {})
        sites = {s.name: s for s in self.act_space.sites} if self.is_activation(self.per_layer.base) else {}
        out = []
        for i, t in zip(self.per_layer.indices, self.per_layer.tensors):
            pr = by_index[i]
            rec = self.point_record(pr, options)
            clean = self.baseline_of(i).clean_accuracy
            acc = rec["accuracy"]
            lo, hi = acc["ci95"] if acc["ci95"] else (acc["mean"], acc["mean"])
            entry = {"index": i, "label": rec["label"], "tensor": t.name, "kind": t.kind}
            if t.kind == "activation":
                site = sites[t.name]
                entry.update(op=site.producer, node=None, elements=site.elements)
            else:
                op, node = ops.get(t.name, (None, None))
                entry.update(op=op, node=node, elements=t.size)
                if t.kind == "weight":
                    entry["weights"] = t.size
            loss = clean - acc["mean"]
            cells = rec["faulty_cells"]["mean"]
            entry.update(
                trials=rec["trials"],
                faulty_cells=cells,
                accuracy=acc,
                loss=round(loss, 6),
                loss_ci95=[round(clean - hi, 6), round(clean - lo, 6)],
                loss_per_fault=round(loss / cells, 8) if cells else None,
                sdc1=None if rec["sdc1"] is None else {k: rec["sdc1"][k] for k in ("mean", "ci95", "wilson95")},
            )
            out.append(entry)
        order = sorted(range(len(out)), key=lambda k: (-out[k]["loss"], out[k]["index"]))
        for rank, k in enumerate(order, 1):
            out[k]["rank"] = rank
        return [out[k] for k in order]

    def session_record(self, kind: str) -> dict | None:
        """How the clean outputs of side session `kind` compare with the weight session's
        (None when no point ran on it); for "activations" also its injection sites."""
        if kind not in self._sessions:
            return None
        ev, base = self._sessions[kind]
        fused = self.evaluator.logits(None)
        same = fused.shape == ev.clean_logits.shape
        clean = {
            "accuracy": round(base.clean_accuracy, 6),
            "correct": base.n_correct,
            "logits_identical": bool(same and np.array_equal(fused, ev.clean_logits)),
            "max_abs_logit_difference": float(np.max(np.abs(fused.astype(np.float64) - ev.clean_logits))) if same else None,
            "predictions_identical": bool(np.array_equal(self.clean_pred, ev.clean)),
        }
        compare = getattr(ev, "compare_fused", None)
        if callable(compare):  # the session's own comparison (e.g. analog: top-1 agreement rate)
            clean.update(compare(fused))
        rec: dict = {"opset": int(next((o.version for o in ev.model.opset_import if o.domain in ("", "ai.onnx")), 0))}
        info = getattr(ev, "session_info", None)
        if callable(info):  # what the session says of itself (fp32: tensors, weights, bits, prepared)
            rec.update(info())
        if kind == "activations":
            rec.update(
                sites=[
                    {"tensor": s.name, "dtype": str(s.dtype), "shape": list(s.shape), "elements": s.elements, "producer": s.producer}
                    for s in ev.sites
                ],
                skipped=list(ev.skipped),
                bits_per_sample=ev.space.bits_per_sample,
            )
        rec["clean"] = clean
        return rec

    def activation_record(self) -> dict | None:
        """The activation-fault session: sites and clean comparison (None when unused)."""
        return self.session_record("activations")


@dataclass
class CampaignRecipe:
    """A campaign as data (model bytes, data, every point, seed, reference): sent to a worker
    once, it rebuilds the same Campaign there (`build`)."""

    model: bytes
    data: Dataset
    points: list
    seed: int
    reference: Reference

    def build(self) -> "Campaign":
        model = onnx.load_model_from_string(self.model)
        ev = ChipEvaluator(model, self.data, Reference(self.reference.target.copy(), self.reference.kind))
        return Campaign(model, self.data, self.points, seed=self.seed, evaluator=ev)


class TrialExecutor:
    """Runs blocks of trials somewhere else; `run` returns them in trial order."""

    def round_end(self, start: int, planned: int, options: CampaignOptions) -> int:
        """Where the next round stops: all planned trials without a margin, else a few
        stopping checkpoints' worth, so that early stopping wastes at most one round."""
        if options.margin is None:
            return planned
        step = options.check_every
        size = max(self.parallelism * 2, options.min_trials - start, step)
        size = -(-size // step) * step
        return min(planned, start + size)

    parallelism: int = 1

    def run(self, campaign: "Campaign", point: int, start: int, stop: int) -> list[TrialResult]:
        raise NotImplementedError


class DaskTrials(TrialExecutor):
    """Trials as Dask tasks: (point, block of trials) per task, the recipe sent once. A block
    whose worker was lost is submitted again (cluster.is_lost_task): trials are re-derivable,
    so the figures do not change."""

    def __init__(self, client, campaign: "Campaign"):
        self.client = client
        self.parallelism = worker_count(client)
        self.token = hashlib.sha256(campaign.model.SerializeToString() + repr((campaign.seed, [p.label for p in campaign.points])).encode()).hexdigest()
        self.recipe = SharedData(client, campaign.recipe())
        self.run_id = uuid.uuid4().hex[:12]  # task keys unique to this run

    def _submit(self, point: int, a: int, b: int, attempt: int):
        return self.client.submit(_trial_block, self.recipe.refresh(), self.token, point, a, b, pure=False, retries=2,
                                  key=f"harden-trials-{self.run_id}-{point}-{a}-{b}-{attempt}")

    def run(self, campaign: "Campaign", point: int, start: int, stop: int) -> list[TrialResult]:
        blocks = max(1, min(stop - start, 2 * self.parallelism))
        edges = np.linspace(start, stop, blocks + 1).round().astype(int)
        spans = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        futs = [self._submit(point, a, b, 0) for a, b in spans]
        rows: list[TrialResult] = []
        for (a, b), fut in zip(spans, futs):
            for attempt in range(1, LOST_TASK_RETRIES + 2):
                try:
                    rows += fut.result()
                    break
                except Exception as exc:
                    if not is_lost_task(exc) or attempt > LOST_TASK_RETRIES:
                        raise
                    fut = self._submit(point, a, b, attempt)
        return rows


def _trial_block(recipe: CampaignRecipe, token: str, point: int, start: int, stop: int) -> list[TrialResult]:
    """A Dask task: trials [start, stop) of `point` on this worker's copy of the campaign."""
    campaign = worker_cached(token, recipe.build)
    return [campaign.run_trial(point, t) for t in range(start, stop)]


def _analog_session(model: onnx.ModelProto, data: Dataset):
    return AnalogEvaluator(model, data)


#: Side sessions by a fault model's `space_kind`: factory(model, data) -> an evaluator with
#: `space` (what `sample` draws over), `clean`, `clean_logits`, `model` and
#: `predictions(injection)`; optional: `compare_fused(logits)`, `session_info()`, `ops`
#: (tensor -> (op type, node name)). "weights" is the campaign's own ChipEvaluator.
SESSION_KINDS: dict[str, Callable[[onnx.ModelProto, Dataset], object]] = {
    "activations": ActivationEvaluator,
    "analog": _analog_session,
    FP32_KIND: FloatWeightEvaluator,
}


def check_precision(points: Sequence[FaultModel], precision: str, what: str = "", model_name: str = "") -> None:
    """InputError (one line) for the first point whose precision ("int8", the default, or
    "float": `FaultModel.precision`) is not the model's: int8 fault models need an int8 QDQ
    model, float ones (bitflip-fp32) a float model."""
    where = f"{model_name}: " if model_name else ""
    for p in points:
        need = p.precision
        if need == precision:
            continue
        label = f"{what} {p.label}" if what else p.label
        if need == "int8":
            raise InputError(
                f"{where}{label} is an int8 fault model and simulate takes an int8 QDQ model for it, "
                "but this one has float weights: use bitflip-fp32:RATE,... for its float32 weights, "
                "or run harden apply first to quantize it"
            )
        raise InputError(
            f"{where}{label} flips bits of float32 weights, but this is an int8 QDQ model: give the float model "
            "(before harden apply), or use bitflip:RATE,... for its int8 weights"
        )


def describe_trial(
    model: onnx.ModelProto | WeightSpace | ActivationSpace,
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
    if isinstance(model, ActivationSpace) or fault.space_kind == "activations":
        if not isinstance(model, ActivationSpace):
            raise InputError(f"{fault.label}: activation faults are drawn over a data set; pass the campaign's act_space")
        fault.check(model)
        faults = fault.sample(trial_rng(seed, point, trial), model).faults(None)
        return [f._replace(changes=True) if f.kind == "flip" else f for f in faults]
    if fault.space_kind == FP32_KIND:
        space = model if isinstance(model, WeightSpace) else float_space(fp32_model(model)[0])
        fault.check(space)
        return [f._replace(changes=True) for f in fault.sample(trial_rng(seed, point, trial), space).faults(None)]
    if isinstance(model, WeightSpace):
        space, values = model, None
    else:
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


def _per_layer_model(per_layer: str | FaultModel | None) -> FaultModel | None:
    if per_layer is None or not isinstance(per_layer, str):
        return per_layer
    models = parse_fault_spec(per_layer)
    if len(models) != 1:
        raise InputError(f"--per-layer takes one fault point (e.g. bitflip:1e-2); {per_layer!r} gives {len(models)}")
    return models[0]


def _check_diagnostics(rho: float, samples: int) -> None:
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and 0.0 < rho < 10.0):
        raise InputError(f"--rho must be in (0, 10), got {rho!r}")
    if not _is_int(samples) or samples < 2:
        raise InputError(f"sharpness samples must be an integer >= 2, got {samples!r}")


def prepare_campaign(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    faults: Sequence[str] = (),
    faultmaps: Sequence[str | os.PathLike] = (),
    options: CampaignOptions | None = None,
    *,
    per_layer: str | FaultModel | None = None,
    allow_empty: bool = False,
    gates: Sequence[PointGate] = (),
    int8_only: str | None = None,
) -> tuple[Campaign, onnx.ModelProto, Dataset]:
    """Check every input (options, fault specs, gates, model, data) and build the campaign.

    `per_layer`: a fault spec naming one point (or a FaultModel), appended as one point per
    tensor it can hit. `allow_empty`: no point at all is fine (diagnostics only). `gates`: each
    must name a point label (or "all"), checked before the model is even loaded. `int8_only`:
    the name of a requested measurement that needs an int8 QDQ model (e.g. "--diagnostics").
    Every point must suit the model's precision (int8 QDQ, or float for bitflip-fp32)."""
    opts = options or CampaignOptions()
    opts.validate()
    points: list[FaultModel] = []
    for spec in faults:
        points += parse_fault_spec(spec)
    for path in faultmaps:
        points.append(ChipFaults.from_path(path))
    base = _per_layer_model(per_layer)
    if not points and base is None and not allow_empty:
        raise InputError("nothing to simulate: give --fault SPEC (e.g. bitflip:1e-4,1e-3), --faultmap CHIP, "
                         "--per-layer SPEC or --diagnostics")
    check_point_gates(gates, [p.label for p in points])
    model = load_model(model_path)
    precision = "int8" if is_qdq_int8(model) else "float"
    if precision == "float" and (int8_only or not (points or base)):
        what = int8_only or "simulate"
        raise InputError(f"{model_path}: {what} takes an int8 QDQ model, this one has float weights; run harden apply "
                         "first (a float model takes bitflip-fp32:RATE,... only)")
    check_precision(points, precision, model_name=str(model_path))
    if base is not None:
        check_precision([base], precision, "--per-layer", str(model_path))
    data = load_npz(data_path, model, role="data")
    campaign = Campaign(model, data, points, seed=opts.seed)
    if base is not None:
        campaign.add_per_layer(base)
    return campaign, model, data


def simulate(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    faults: Sequence[str] = (),
    faultmaps: Sequence[str | os.PathLike] = (),
    options: CampaignOptions | None = None,
    *,
    per_layer: str | FaultModel | None = None,
    diagnostics: bool = False,
    rho: float = 0.05,
    sharpness_samples: int = 10,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    show_trial: tuple[int, int] | None = None,
    gates: Sequence[PointGate] = (),
    cluster: str | None = None,
) -> SimulationResult:
    """Run a campaign (or re-derive one trial with `show_trial=(point, trial)`) and report it.

    `per_layer`: one fault point (spec or FaultModel) run on each tensor alone; the report's
    `per_layer` ranks the tensors by accuracy loss. `diagnostics`: add activation sparsity and
    epsilon-sharpness at `rho` over `sharpness_samples` perturbations (seeded by the campaign
    seed). `gates`: `harden.gates.PointGate`s at named points, checked against the point labels
    before any work and evaluated into the report's `gates` (this function never raises for a
    failed gate; the CLI exits 1). `on_start(total_planned_trials)` is called once the inputs
    are checked, before any trial. The model is int8 QDQ, or float with float fault models
    only (bitflip-fp32). `cluster`: a Dask address ('local', 'tcp://host:8786', else
    $HARDEN_CLUSTER; cluster.py): blocks of trials run on its workers, with the same figures.
    """
    started = time.perf_counter()
    address = cluster_address(cluster)
    if address is not None:
        require_distributed()
    opts = options or CampaignOptions()
    if diagnostics:
        _check_diagnostics(rho, sharpness_samples)
    gates = [g.canonical() for g in gates]
    if gates and show_trial is not None:
        raise InputError("--min-accuracy / --max-drop gate a campaign's points; they do not apply to --show-trial")
    campaign, model, data = prepare_campaign(model_path, data_path, faults, faultmaps, opts,
                                             per_layer=per_layer, allow_empty=diagnostics, gates=gates,
                                             int8_only="--diagnostics" if diagnostics else None)
    space = campaign.space
    n_main = campaign.main_points
    model_rec: dict = {
        "precision": campaign.precision,
        "int8_tensors": len(space.weights),
        "int8_weights": space.weight_count,
        "int32_bias_tensors": len(space.biases),
        "int32_biases": sum(t.size for t in space.biases),
    }
    if campaign.precision == "float":
        fspace = campaign.session(FP32_KIND)[0].space
        model_rec.update(float_weight_tensors=len(fspace.weights), float_weights=fspace.weight_count)
    report: dict = {
        "schema": REPORT_SCHEMA,
        "harden_version": __version__,
        "command": "simulate",
        "inputs": {
            "model": {"path": str(model_path), "sha256": sha256_of(model_path)},
            "data": {"path": str(data_path), "sha256": sha256_of(data_path), "samples": len(data)},
        },
        "model": model_rec,
        "options": {**asdict(opts), "planned_trials": opts.planned_trials()},
        "points": [{"index": i, "label": p.label, "fault": _describe(p)} for i, p in enumerate(campaign.points[:n_main])],
        "clean": {
            "reference": campaign.evaluator.reference.kind,
            "samples": len(data),
            "accuracy": round(campaign.clean_accuracy, 6),
            "correct": campaign.n_correct,
        },
    }
    pl = campaign.per_layer
    if pl is not None:
        report["per_layer_fault"] = {
            "label": pl.base.label,
            "fault": _describe(pl.base),
            "tensors": len(pl.indices),
            "points": [pl.indices[0], pl.indices[-1]] if pl.indices else [],
        }
    if show_trial is not None:
        report["trial"] = campaign.trial_record(*show_trial)
        report["seconds"] = round(time.perf_counter() - started, 3)
        return SimulationResult(report, campaign)
    if on_start:
        on_start(campaign.total_planned(opts))
    with contextlib.ExitStack() as stack:
        executor = None
        if address is not None:
            executor = DaskTrials(stack.enter_context(connect(address)), campaign)
            report["cluster"] = {"address": address}
        result = campaign.run(opts, progress, executor)
    report["points"] = [campaign.point_record(p, opts) for p in result.points[:n_main]]
    if gates:
        report["gates"] = point_gate_results(report, gates)
    if pl is not None:
        report["per_layer"] = campaign.per_layer_records(result, opts)
    for kind in campaign._sessions:
        key = "activation_faults" if kind == "activations" else kind
        report[key] = campaign.session_record(kind)
    if diagnostics:
        t0 = time.perf_counter()
        report["diagnostics"] = diagnose(model, data, rho=rho, samples=sharpness_samples, seed=opts.seed,
                                         evaluator=campaign.evaluator)
        report["diagnostics"]["seconds"] = round(time.perf_counter() - t0, 3)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return SimulationResult(report, campaign, result)


def _figure(s95, s_c, deterministic: bool) -> dict:
    """mean, std, ci95 (t-based) and the half-width at the campaign's confidence."""
    if deterministic:  # the same faults every trial: the figure is exact
        return {"mean": round(s95.mean, 6), "std": 0.0, "ci95": [round(s95.mean, 6)] * 2, "half_width": 0.0}
    d95 = s95.as_dict()
    return {"mean": d95["mean"], "std": d95["std"], "ci95": d95["ci"], "half_width": s_c.as_dict()["half_width"]}


def _describe(m: FaultModel) -> dict:
    return m.describe()


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
