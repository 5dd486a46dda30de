"""Model-to-model passes and the manager that runs them, in the style of onnx-ir's pass
infrastructure (`onnx_ir/passes/_pass_infra.py`).

A pass is a small object: a `name`, the facts it `requires` before it runs and `provides` after
(checked by the manager, so a plugin pass placed too early fails with one clear line instead
of deep inside), whether it edits the given model `in_place`, `call(model, ctx) ->
PassResult`, and `note(record)`, its one line in the printed report. `PassManager` runs a list:
it checks facts, reports progress, times every pass and collects its record; optionally it keeps
a snapshot after each pass (the model and the context), so the ablation's variants can be the
same plan with passes removed, rerun from the last snapshot they share.

Facts are names. Those in `FACT_CHECKS` are verified against the model and context; any other
is a marker that a pass left (e.g. "clipped"), trusted once the pass that declares it ran.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from ..allocator import release_memory
from ..data import Dataset
from ..errors import InputError
from ..model import is_qdq_int8


@dataclass
class PassContext:
    """What passes share: calibration data, the seed, and facts one pass leaves for a later one.

    `quant_overrides` are onnxruntime TensorQuantOverrides (the clip pass keeps the range of a
    clipped tensor above its threshold); `float_weights` maps each int8 weight initializer to
    the float weight it was quantized from, so FAQ can aim at the float value;
    `clip_percentile` is what the clip search chose; `facts` what the passes so far provide.
    `progress` is not pickled: a context travels to worker processes without it.
    """

    calib: Dataset
    seed: int = 0
    progress: Callable[[str], Any] | None = None
    quant_overrides: dict[str, list[dict]] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    #: FAQ's calibration statistics of the int8 model, keyed by (samples, with Hessian): chip
    #: independent, so a fleet computes them once and every chip's FAQ pass reuses them.
    layer_stats: dict[tuple[int, bool], dict] = field(default_factory=dict)
    clip_percentile: float | str | None = None  # a percentile, clip.NO_CLIP or not chosen yet
    facts: set[str] = field(default_factory=set)

    def say(self, message: str) -> None:
        """A progress line (nothing when nobody listens)."""
        if self.progress is not None:
            self.progress(message)

    def snapshot(self) -> "PassContext":
        """A copy whose later changes do not reach this one (data and statistics are shared)."""
        return PassContext(self.calib, self.seed, self.progress, copy.deepcopy(self.quant_overrides), dict(self.float_weights),
                           self.layer_stats, self.clip_percentile, set(self.facts))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["progress"] = None  # a closure does not travel to another process
        return state


@dataclass
class PassResult:
    """A pass's output model and its record for the report."""

    model: onnx.ModelProto
    modified: bool
    record: dict = field(default_factory=dict)


class Pass:
    """The base of a pass (built-in or plugin): declares its needs, its effects, its note."""

    name: str = "pass"
    requires: frozenset[str] = frozenset()
    provides: frozenset[str] = frozenset()
    in_place: bool = False  # True: `call` edits the model it is given (the manager copies for snapshots)

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def note(self, record: dict) -> str:
        """Its line in the printed report, from its record alone."""
        return str(record.get("note", ""))

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


#: Facts the manager can verify, by name.
FACT_CHECKS: dict[str, Callable[[onnx.ModelProto, PassContext], bool]] = {
    "float": lambda m, ctx: not is_qdq_int8(m),
    "int8": lambda m, ctx: is_qdq_int8(m),
    "float_weights": lambda m, ctx: bool(ctx.float_weights),
    "clip_percentile": lambda m, ctx: ctx.clip_percentile is not None,
}


#: Facts a pass that provides the key makes false (a quantized model is no longer float).
FACT_EXCLUDES: dict[str, set[str]] = {"int8": {"float"}, "float": {"int8"}}


def holds(fact: str, model: onnx.ModelProto, ctx: PassContext) -> bool:
    """A verifiable fact is checked on the model and context as they are now; a marker holds
    once a pass that provides it has run."""
    check = FACT_CHECKS.get(fact)
    return check(model, ctx) if check is not None else fact in ctx.facts


@dataclass
class Snapshot:
    """The model and the context right after pass `after` (None: before the first pass)."""

    after: str | None
    model: onnx.ModelProto
    ctx: PassContext


@dataclass
class PlanResult:
    model: onnx.ModelProto
    records: list[dict]
    snapshots: list[Snapshot] = field(default_factory=list)


class PassManager:
    """Runs passes in order: checks each one's facts, says its name, times it, records it."""

    def __init__(self, passes: Sequence[Pass], *, snapshots: bool | set[str] = False):
        """`snapshots`: keep the model and context after every pass (True), or after the named
        passes only (a set: a snapshot of a large model costs its size)."""
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        self.snapshot_after = set(names) if snapshots is True else set(snapshots or ())

    def check_plan(self, known: set[str] | None = None) -> None:
        """Every fact a pass requires is provided by an earlier pass (or already `known`)."""
        have = set(known or ())
        for p in self.passes:
            missing = set(p.requires) - have
            if missing:
                raise InputError(f"pass {p.name!r} needs {', '.join(sorted(missing))}, which no pass before it provides "
                                 f"(plan: {' -> '.join(q.name for q in self.passes)})")
            for fact in p.provides:
                have -= FACT_EXCLUDES.get(fact, set())
            have |= set(p.provides)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PlanResult:
        self.check_plan(ctx.facts | {f for f in FACT_CHECKS if holds(f, model, ctx)})
        records: list[dict] = []
        snaps = [Snapshot(None, _copy(model), ctx.snapshot())] if None in self.snapshot_after else []
        for p in self.passes:
            for fact in p.requires:
                if not holds(fact, model, ctx):
                    raise InputError(f"pass {p.name!r} needs {fact}, which the model and context do not have")
            ctx.say(p.name)
            t0 = time.perf_counter()
            result = p.call(model, ctx)
            release_memory()
            record = {"pass": p.name, "modified": result.modified, "seconds": round(time.perf_counter() - t0, 4), **result.record}
            record["note"] = p.note(record)  # the report prints it: a plugin pass describes itself too
            model = result.model
            ctx.facts |= {f for f in p.provides if f not in FACT_CHECKS}  # markers; the others are checked
            for fact in p.provides:
                if not holds(fact, model, ctx):
                    raise RuntimeError(f"pass {p.name!r} declares it provides {fact}, but it does not hold after it ran")
            records.append(record)
            if p.name in self.snapshot_after:
                snaps.append(Snapshot(p.name, _copy(model), ctx.snapshot()))
        return PlanResult(model, records, snaps)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def run_passes(model: onnx.ModelProto, passes: list[Pass], ctx: PassContext) -> tuple[onnx.ModelProto, list[dict]]:
    """Run passes in order; return the final model and one record per pass (with seconds)."""
    result = PassManager(passes).run(model, ctx)
    return result.model, result.records


def resume_point(passes: Sequence[Pass], removed: set[str]) -> str | None:
    """The pass after which a rerun without `removed` starts (None: before the first pass)."""
    names = [p.name for p in passes]
    first = min(names.index(n) for n in removed)
    return names[first - 1] if first else None


def rerun_without(snapshots: Sequence[Snapshot], passes: Sequence[Pass], removed: set[str]) -> onnx.ModelProto:
    """The plan `passes` with the passes named in `removed` left out, rerun from the snapshot
    taken just before the first removed pass (so nothing before it is computed again)."""
    names = [p.name for p in passes]
    first = min(names.index(n) for n in removed)
    start = next(s for s in snapshots if s.after == resume_point(passes, removed))
    rest = [p for p in passes[first:] if p.name not in removed]
    ctx = start.ctx.snapshot()
    ctx.progress = None  # a variant for the ablation: the user already saw these passes run
    return PassManager(rest).run(_copy(start.model), ctx).model


def skipped_record(name: str, why: str) -> dict:
    """The record of a pass the plan leaves out for a reason the report should show."""
    return {"pass": name, "modified": False, "skipped": why, "note": f"skipped: {why}"}
