"""The campaign engine: points x trials on one session per model, early stopping, per-layer points.

See the package docstring (harden/campaign/__init__.py) for what a campaign measures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..data import NAN_CLASS, Dataset
from ..errors import InputError
from ..faults import (
    ActivationEvaluator,
    ActivationSpace,
    Fault,
    FaultModel,
    Injection,
    Session,
    WeightSpace,
)
from ..simulate import ChipEvaluator, Reference
from ..stats import summarize
from .options import Baseline, CampaignOptions, CampaignResult, PerLayer, PointResult, TrialResult, trial_rng
from .parallel import ThreadTrials, TrialExecutor
from .records import RecordsMixin
from .sessions import SESSION_KINDS, WeightSession, check_precision


class Campaign(RecordsMixin):
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
        weights = WeightSession(evaluator, self.space)
        self.values = weights.values  # the clean int8 weights and int32 biases
        self.clean_pred = weights.clean
        self._self_reference = evaluator.reference.kind == "agreement" and evaluator.reference.target.size == 0
        if self._self_reference:
            evaluator.reference = Reference(self.clean_pred, "agreement")
        self.target = evaluator.reference.target
        self.correct = self.clean_pred == self.target
        self.n_correct = int(self.correct.sum())
        self.clean_accuracy = float(self.correct.mean())
        self.baseline = Baseline(self.clean_pred, self.target)
        #: every session a point ran on, by kind: (faults.Session, its clean baseline)
        self._sessions: dict[str, tuple[Session, Baseline]] = {"weights": (weights, self.baseline)}
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
        return self.session(model.space_kind)[0].space

    def baseline_of(self, point: int) -> Baseline:
        return self.session(self.points[point].space_kind)[1]

    @property
    def side_sessions(self) -> list[str]:
        """The kinds of the sessions other than the weight session that points ran on."""
        return [k for k in self._sessions if k != "weights"]

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
        return self.session(self.points[point].space_kind)[0].describe_faults(self.injection(point, trial))

    def faulty_values(self, point: int, trial: int) -> dict[str, np.ndarray]:
        """All int8 weights and int32 biases as the trial's faults leave them (faults that run
        on another session, e.g. activation faults, leave them clean)."""
        if self.kind_of(self.points[point]) != "weights":
            return dict(self.values)
        return self.injection(point, trial).apply(self.values)

    def run_trial(self, point: int, trial: int) -> TrialResult:
        return self.run_trials(point, trial, trial + 1)[0]

    def stack_of(self, point: int, planned: int | None = None) -> int:
        """How many trials of `point` one inference pass runs: the session's `stack` k, or, for
        a point of `planned` trials, the width of its groups (group_width: as few groups as k
        allows, all of one width)."""
        k = max(1, int(self.session(self.points[point].space_kind)[0].stack))
        return k if planned is None else group_width(k, planned)

    def fed(self, point: int) -> bool:
        """Whether the point's trials run one per pass, fed to a session each thread builds for
        itself (simulate.ChipEvaluator.feeds_values): trial threads can share them out."""
        return bool(getattr(self.session(self.points[point].space_kind)[0], "feeds_values", False))

    def run_trials(self, point: int, start: int, stop: int, planned: int | None = None) -> list[TrialResult]:
        """Trials [start, stop) of `point`, in order. A session that runs several trials per
        pass (stacking.py) gets them in groups of `stack_of(point, planned)` from trial 0, trial
        t at position t % width, every group that wide (slots outside [start, stop) run clean),
        so that one widened graph serves the point. The pass a trial runs in is thus fixed by
        (t, planned) alone: a trial's figures never depend on which other trials a caller
        asked for, nor on how workers shared them out. Without `planned` (one trial asked for
        alone) a group is the session's k wide."""
        ses, base = self.session(self.points[point].space_kind)
        session_k = self.stack_of(point)
        stacked = session_k > 1
        k = session_k if planned is None else group_width(session_k, planned)
        rows: list[TrialResult] = []
        a = start - start % k
        harmless = getattr(ses, "harmless", None)
        while a < stop:
            trials = range(max(a, start), min(a + k, stop))
            injections = [self.injection(point, t) for t in trials]
            # a trial the session's bound proves harmless keeps the clean predictions, unrun
            certified = harmless(injections) if harmless is not None else np.zeros(len(injections), bool)
            certified = [bool(c) and bool(i.tensors) for c, i in zip(certified, injections)]  # a trial hitting nothing is clean anyway
            run = [None if c else i for i, c in zip(injections, certified)]
            if not stacked:
                preds = [ses.predictions(i) if i is not None and i.tensors else base.clean_pred for i in run]
            else:
                lead = trials.start - a
                slots: list[Injection | None] = [None] * lead + run
                slots += [None] * (k - len(slots))
                preds = ses.predictions_many(slots)[lead:lead + len(injections)]  # a None slot: the clean top-1
            rows += [self._trial_result(point, t, i, p, base, bool(c)) for t, i, p, c in zip(trials, injections, preds, certified)]
            a += k
        return rows

    @staticmethod
    def _trial_result(point: int, trial: int, inj: Injection, pred: np.ndarray, base: Baseline,
                      certified: bool = False) -> TrialResult:
        if not inj.tensors:  # nothing hit: the clean predictions (the session is deterministic)
            pred = base.clean_pred
        # A NaN logit row is predicted as NAN_CLASS (-1, data.top1): wrong, and an SDC-1 event
        # when the fault-free prediction was right; both figures need nothing more.
        acc = float(np.mean(pred == base.target))
        events = int(np.count_nonzero(pred[base.correct] != base.clean_pred[base.correct]))
        return TrialResult(point, trial, acc, events, inj.cells, int(np.count_nonzero(pred == NAN_CLASS)), certified)

    def _rows(self, point: int, start: int, planned: int) -> Iterable[TrialResult]:
        """Trials [start, planned) in order, one pass (one group of `stack_of` trials) at a time."""
        k = self.stack_of(point, planned)
        t = start
        while t < planned:
            end = min(planned, (t // k + 1) * k)
            yield from self.run_trials(point, t, end, planned)
            t = end

    # --- the campaign --------------------------------------------------------------------

    def run_point(self, point: int, options: CampaignOptions, progress: Callable[[int], None] | None = None,
                  executor: TrialExecutor | None = None, deadline: float | None = None, jobs: int | None = None) -> PointResult:
        """The trials of one point, stopping early once the interval meets the margin.

        The stopping rule is checked at the same trial counts (every `check_every` from
        `min_trials`) whoever runs the trials, and every trial is re-derived from (seed, point,
        trial), so an executor that runs rounds of trials on other processes gives the figures
        of this sequential loop exactly (trials past the stop are computed and dropped).
        `deadline` (perf_counter time, from --budget): stop at the first check after it, with
        at least `min(min_trials, planned)` trials. Without an `executor`, the trials run on
        `jobs` threads (parallel.ThreadTrials; None: one per core, 1: this thread alone).
        """
        if executor is None and jobs != 1:
            with ThreadTrials(jobs) as threads:
                return self.run_point(point, options, progress, threads, deadline)
        model = self.points[point]
        planned = 1 if model.deterministic else options.planned_trials()
        acc = np.empty(planned)
        events = np.empty(planned, np.int64)
        cells = np.empty(planned, np.int64)
        nans = np.empty(planned, np.int64)
        certified = np.zeros(planned, bool)
        self.stack_of(point)  # the session (a side session, stacked graphs) is set-up, not trials: built off the clock
        t0 = time.perf_counter()
        n, stopped, out_of_time = 0, False, False
        floor = min(options.min_trials, planned)
        while n < planned and not stopped:
            if executor is None:
                rows: Iterable[TrialResult] = self._rows(point, n, planned)
            else:
                end = executor.round_end(n, planned, options, self.stack_of(point, planned))
                rows = executor.run(self, point, n, end, planned)
            try:
                for r in rows:
                    t = r.trial
                    acc[t], events[t], cells[t], nans[t] = r.accuracy, r.sdc1_events, r.faulty_cells, r.nan_outputs
                    certified[t] = r.certified
                    n = t + 1
                    if progress:
                        progress(1)
                    if options.margin is not None and n < planned and n >= options.min_trials and n % options.check_every == 0:
                        h = summarize(acc[:n], options.confidence).half_width
                        if h is not None and h <= options.margin:
                            stopped = True
                            break
                    if deadline is not None and n < planned and n >= floor and n % options.check_every == 0 \
                            and time.perf_counter() > deadline:
                        stopped = out_of_time = True
                        break
            finally:
                close = getattr(rows, "close", None)  # a generator: stop its work now
                if close is not None:
                    close()
        if progress and n < planned:
            progress(planned - n)
        return PointResult(point, model, planned, acc[:n].copy(), events[:n].copy(), cells[:n].copy(), stopped and not out_of_time,
                           time.perf_counter() - t0, nans[:n].copy(), out_of_time, certified[:n].copy())

    def run(self, options: CampaignOptions | None = None, progress: Callable[[int], None] | None = None,
            executor: TrialExecutor | None = None, jobs: int | None = None) -> CampaignResult:
        """Every point in turn (`executor` / `jobs` as for run_point); `options.budget` is shared
        out between the points left."""
        if executor is None and jobs != 1:
            with ThreadTrials(jobs) as threads:
                return self.run(options, progress, threads)
        opts = options or CampaignOptions(seed=self.seed)
        t0 = time.perf_counter()
        res = CampaignResult(self.clean_accuracy, self.evaluator.reference.kind, int(self.target.size), self.n_correct, opts)
        for p in range(len(self.points)):
            deadline = None
            if opts.budget is not None:  # an equal share of what is left, per point left
                left = opts.budget - (time.perf_counter() - t0)
                deadline = time.perf_counter() + max(0.0, left) / (len(self.points) - p)
            res.points.append(self.run_point(p, opts, progress, executor, deadline, jobs))
        res.seconds = time.perf_counter() - t0
        return res

    def recipe(self) -> "CampaignRecipe":
        """What another process needs to rebuild this campaign, trial for trial."""
        return CampaignRecipe(self.model.SerializeToString(), self.data, list(self.points), self.seed, self._given_reference)

    def total_planned(self, options: CampaignOptions) -> int:
        return sum(1 if p.deterministic else options.planned_trials() for p in self.points)


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


def group_width(k: int, planned: int) -> int:
    """Trials per stacked pass for a point of `planned` trials on sessions of up to `k`: the
    fewest groups, all of one width (100 trials, k = 32: 4 groups of 25, not 32 + 32 + 32 + 4,
    whose last group would need a graph of its own, widened and built for 4 trials)."""
    if k <= 1 or planned <= 1:
        return max(1, min(k, planned))
    groups = -(-planned // k)
    return -(-planned // groups)
