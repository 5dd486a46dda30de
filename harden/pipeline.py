"""`apply`: float (or int8 QDQ) model + one chip's fault map -> hardened int8 model + report.

The pass sequence of DESIGN.md:

    load -> simplify (onnxsim) -> opset >= 13 -> clip search -> clip -> [clip-train, saq /
    variability] -> quantize            (build_shared: chip independent, once per fleet)
    -> faq -> on-chip accuracy          (harden_for_chip: per chip)
    -> resilience campaign and ablation -> one atomic write of every output

Every input is read and checked before any work starts, and nothing is written until all the
work has succeeded (atomic writes), so a failure never leaves a partial output.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import onnx

from . import __version__, arithmetic
from .allocator import release_memory
from .data import Dataset, accuracy, load_npz, split_held_out, top1
from .errors import InputError
from .faultmap import FaultMap, is_csv_map, read_faultmap
from .faults import parse_fault_spec
from .faults.base import WeightSpace
from .faults.chip import ChipFaults
from .fileio import atomic_write_many, check_outputs, file_record
from .hostcheck import fused_host_record
from .memory import MemoryMap, get_layout, model_layout_tensors
from .model import get_metadata, is_qdq_int8, load_model, qdq_weights
from .options import ApplyOptions, Config
from .passes import Pass, PassContext, PassManager, Snapshot, rerun_without, resume_point, run_passes, skipped_record
from .passes.faq import FAQPass
from .plan import CLIP_PASSES, ablation_plans, plan
from .report import REPORT_SCHEMA, to_json
from .report.types import Results
from .resilience import measure
from .simulate import (
    ChipEvaluator,
    Reference,
    float_reference,
    model_values,
    read_through_chip,
)


@dataclass
class ApplyResult:
    """The hardened model (in memory) and the report (a JSON-ready dict)."""

    model: onnx.ModelProto
    report: dict
    output: Path | None = None
    report_path: Path | None = None


def default_output(model_path: str | os.PathLike) -> Path:
    """model.onnx -> model.hardened.onnx beside it."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}.hardened.onnx")


@dataclass
class Shared:
    """The chip-independent part of `apply`: done once, whatever the number of chips."""

    float_model: onnx.ModelProto | None  # the prepared float model; None when the input was already int8
    plain: onnx.ModelProto  # int8 QDQ (clipped), before FAQ
    ctx: PassContext  # calibration data, float weights, FAQ's layer statistics
    evald: Dataset
    records: list[dict]
    num_words: int  # the model's int8 weights: the size of a CSV fault map
    passes: list[Pass] = field(default_factory=list)  # the plan that ran
    snapshots: list[Snapshot] = field(default_factory=list)  # after each pass, for the ablation
    _reference: tuple | None = None

    @property
    def already_int8(self) -> bool:
        return self.float_model is None

    def reference(self) -> tuple[float | None, Reference]:
        """(float accuracy, what predictions are scored against), computed once."""
        if self._reference is None:
            acc, ref = float_reference(self.float_model or self.plain, self.evald)
            self._reference = (acc if self.float_model is not None else None, ref)
        return self._reference

    def for_workers(self) -> "Shared":
        """What a chip's worker needs: no snapshots (they serve only the ablation)."""
        return replace(self, snapshots=[])


def build_shared(model: onnx.ModelProto, calib: Dataset, evald: Dataset, opts: ApplyOptions, say: Callable[[str], None],
                 train: Dataset | None = None) -> Shared:
    """Run the chip-independent plan (plan.py): everything that does not depend on the chip."""
    cfg = opts.config()
    ctx = PassContext(calib=calib, seed=cfg.seed, progress=say)
    if is_qdq_int8(model):
        if cfg.passes:
            raise InputError("--pass runs in the plan that builds the int8 model; this model is already int8 QDQ")
        qmodel, float_model, passes, snaps = model, None, [], []
        records = [skipped_record("quantize", "model is already int8 QDQ")]
    else:
        passes = plan(cfg, train)
        # Snapshots: the prepared float model (the float reference), and with a campaign the
        # points the ablation's variants rerun from.
        keep = {"simplify"} | ({resume_point(passes, removed) for _, _, removed in ablation_plans(passes) if removed}
                               if cfg.campaign.trials > 0 else set())
        result = PassManager(passes, snapshots=keep).run(model, ctx)
        qmodel, records, snaps = result.model, result.records, result.snapshots
        float_model = next(s.model for s in snaps if s.after == "simplify")
    table = qdq_weights(qmodel)
    if not table:
        raise InputError("no int8 Conv/Gemm/MatMul/Gather weights to put in weight memory")
    return Shared(float_model, qmodel, ctx, evald, records, sum(w.size for w in table), passes, snaps)


def quantize(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    eval_data_path: str | os.PathLike | None = None,
    options: ApplyOptions | None = None,
    progress: Callable[[str], None] | None = None,
    write: bool = True,
) -> ApplyResult:
    """The plain int8 model exactly as `apply` builds it before FAQ (the same plan, the same
    calibration samples: without `eval_data_path`, the part of --data apply fits on), so the
    baseline can be simulated without hardening for a fault-free map."""
    opts = options or ApplyOptions()
    cfg = check_training(opts)
    out_path = Path(output) if output is not None else Path(model_path).with_name(f"{Path(model_path).stem}.int8.onnx")
    if write:
        check_outputs([out_path], [model_path, data_path, eval_data_path, cfg.training.train_data])
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    model, calib, evald, eval_record = load_inputs(model_path, data_path, eval_data_path)
    train = load_npz(cfg.training.train_data, model, role="training data") if cfg.training.train_data else None
    shared = build_shared(model, calib, evald, replace(opts, trials=0), say, train)
    report = {
        "schema": REPORT_SCHEMA, "harden_version": __version__, "command": "quantize",
        "inputs": {"model": file_record(model_path), "data": {**file_record(data_path), "samples": len(calib)},
                   "eval_data": eval_record, "already_int8": shared.already_int8},
        "options": asdict(opts), "passes": shared.records,
    }
    result = ApplyResult(shared.plain, report)
    if write:
        model_bytes = shared.plain.SerializeToString(deterministic=True)
        report["output"] = {"model": str(out_path), "sha256": hashlib.sha256(model_bytes).hexdigest()}
        atomic_write_many([(out_path, model_bytes)])
        result.output = out_path
    report["seconds"] = round(time.perf_counter() - started, 3)
    return result


def harden_for_chip(shared: Shared, fm: FaultMap, opts: ApplyOptions, evaluator: ChipEvaluator | None = None,
                    host_check: bool = True) -> tuple[onnx.ModelProto, list[dict], dict]:
    """FAQ for one chip on a copy of the shared int8 model, then its accuracy on that chip.

    A fleet passes `host_check=False`: the host's fused kernels are checked once for the fleet.
    """
    model = onnx.ModelProto()
    model.CopyFrom(shared.plain)
    cfg = opts.config()
    faq = FAQPass(fm, compensate=cfg.faq.compensation, bias_correction=cfg.faq.bias_correction, calib_samples=cfg.faq.calib_samples,
                  sequential=cfg.faq.sequential, sign_choice=cfg.faq.sign_choice,
                  layout=cfg.layout)
    hardened, records = run_passes(model, [faq], shared.ctx)
    t0 = time.perf_counter()
    results = evaluate_on_chip(shared, hardened, fm, evaluator, host_check)
    records.append({"pass": "simulate", "modified": False, "seconds": round(time.perf_counter() - t0, 4)})
    return hardened, records, results


def load_inputs(model_path, data_path, eval_data_path) -> tuple[onnx.ModelProto, Dataset, Dataset, dict]:
    """The model, the data to fit on, the data to score on, and where the latter came from.

    Without `eval_data_path` a deterministic part of the data is held out (data.split_held_out):
    no figure is ever scored on samples that calibration or compensation saw.
    """
    model = load_model(model_path)
    calib = load_npz(data_path, model, role="calibration data")
    if eval_data_path:
        evald = load_npz(eval_data_path, model, role="evaluation data")
        return model, calib, evald, {**file_record(eval_data_path), "samples": len(evald)}
    calib, evald, record = split_held_out(calib)
    return model, calib, evald, record


def read_chip(path: str | os.PathLike, num_words: int | None) -> FaultMap | None:
    """An HFM1 map now; a CSV map only once `num_words` (the model's weight count) is known."""
    if is_csv_map(path):
        return None if num_words is None else read_faultmap(path, num_words)
    return read_faultmap(path, None)


def apply(
    model_path: str | os.PathLike,
    faultmap_path: str | os.PathLike,
    data_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    report_path: str | os.PathLike | None = None,
    eval_data_path: str | os.PathLike | None = None,
    options: ApplyOptions | None = None,
    progress: Callable[[str], None] | None = None,
    write: bool = True,
    extra_outputs: Mapping[str | os.PathLike, Callable[[dict], str]] | None = None,
) -> ApplyResult:
    """Harden `model_path` for the chip in `faultmap_path`; see the module docstring.

    `extra_outputs` maps more output paths to functions of the finished report (the CLI's
    --summary-md); they are written together with the model and the report, as one step.
    """
    opts = options or ApplyOptions()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()

    # 1. Read and check every input before any work.
    out_path = Path(output) if output is not None else default_output(model_path)
    cfg = check_training(opts)  # every option validated and resolved (options.py) before any work
    inputs = [model_path, faultmap_path, data_path, eval_data_path, cfg.training.train_data]
    if write:
        if report_path is not None and Path(report_path).resolve() == out_path.resolve():
            raise InputError(f"--report {report_path} is the same path as the output model")
        check_outputs([out_path, *([report_path] if report_path is not None else []), *(extra_outputs or {})], inputs)
    points = [m for spec in cfg.campaign.faults for m in parse_fault_spec(spec)] if cfg.campaign.trials > 0 else []
    if any(p.precision != "int8" for p in points):
        raise InputError("apply's campaign runs on the int8 models it builds: use int8 fault models "
                         "(bitflip, bitflip-bias, stuckat, bitflip-act); simulate the float model for bitflip-fp32")
    say("load")
    model, calib, evald, eval_record = load_inputs(model_path, data_path, eval_data_path)
    train = load_npz(cfg.training.train_data, model, role="training data") if cfg.training.train_data else None
    layout = get_layout(cfg.layout) if cfg.layout else None
    fm = read_chip(faultmap_path, None)  # a CSV map waits for the model's weight count
    if layout is not None and fm is not None:
        layout.check(fm.num_words)

    shared = build_shared(model, calib, evald, opts, say, train)
    del model  # the loaded graph: `shared` holds what the rest needs (97 MB of ResNet-50's peak)
    if fm is None:
        fm = read_chip(faultmap_path, shared.num_words if layout is None else layout.words_needed(model_layout_tensors(shared.plain)))
    hardened, recs, results = harden_for_chip(shared, fm, opts)
    records = shared.records + recs
    if cfg.campaign.trials > 0:
        t0 = time.perf_counter()
        points, skipped = fitting_points(points, shared.plain, explicit=cfg.campaign.explicit)
        variants = _variants(shared, hardened)
        # The estimate: the on-chip evaluation just made about five passes over the data.
        one_pass = next(r["seconds"] for r in recs if r["pass"] == "simulate") / 5
        random_points = sum(not p.deterministic for p in points)
        trials = cfg.campaign.affordable_trials(one_pass, len(variants), random_points)
        passes = len(variants) * (2 + trials * random_points)
        say(f"campaign: {len(variants)} models x {len(points) + 1} points x {trials} trials, {passes} evaluation passes, "
            f"about {passes * one_pass:.0f} s" + (f" (--budget {cfg.campaign.budget:g} s cut {cfg.campaign.trials} trials)"
                                                   if trials < cfg.campaign.trials else ""))
        release_memory()  # FAQ's and the on-chip evaluation's temporaries (harden.allocator)
        results["resilience"] = measure(variants, evald, shared.reference()[1], [ChipFaults(fm, layout=cfg.layout), *points],
                                        trials=trials, seed=cfg.seed)
        if trials < cfg.campaign.trials:
            results["resilience"]["budget"] = {"seconds": cfg.campaign.budget, "trials_asked": cfg.campaign.trials,
                                               "trials_run": trials, "one_pass_seconds": round(one_pass, 4)}
        if skipped:
            results["resilience"]["skipped_points"] = skipped
        records.append({"pass": "campaign", "modified": False, "seconds": round(time.perf_counter() - t0, 4)})

    report = {
        "schema": REPORT_SCHEMA,
        "harden_version": __version__,
        "command": "apply",
        "inputs": {
            "model": file_record(model_path),
            "faultmap": {**file_record(faultmap_path), **fm.summary()},
            "data": {**file_record(data_path), "samples": len(calib)},
            "eval_data": eval_record,
            "already_int8": shared.already_int8,
        },
        "options": asdict(opts),
        "passes": records,
        "results": results,
    }
    result = ApplyResult(hardened, report)
    if write:
        say("write")
        model_bytes = hardened.SerializeToString(deterministic=True)
        report["output"] = {"model": str(out_path), "sha256": hashlib.sha256(model_bytes).hexdigest()}
        report["seconds"] = round(time.perf_counter() - started, 3)
        files = [(out_path, model_bytes)]
        if report_path is not None:
            files.append((report_path, to_json(report).encode("utf-8")))
        files += [(path, render(report).encode("utf-8")) for path, render in (extra_outputs or {}).items()]
        atomic_write_many(files)  # all or nothing, even under Ctrl-C
        result.output = out_path
        result.report_path = Path(report_path) if report_path is not None else None
    else:
        report["seconds"] = round(time.perf_counter() - started, 3)
    return result


def fitting_points(points: list, model: onnx.ModelProto, *, explicit: bool) -> tuple[list, list[dict]]:
    """The campaign points that apply to `model`. A default point the model has nothing for (bias
    flips in a bias-free network) is left out and recorded; an explicit one is an input error."""
    space = WeightSpace.from_model(model)
    keep, skipped = [], []
    for p in points:
        if p.space_kind != "weights":  # checked against its own session's space
            keep.append(p)
            continue
        try:
            p.check(space)
        except InputError as exc:
            if explicit:
                raise
            skipped.append({"point": p.label, "why": str(exc)})
            continue
        keep.append(p)
    return keep, skipped


def _variants(shared: Shared, hardened: onnx.ModelProto) -> list[tuple[str, str | None, onnx.ModelProto]]:
    """The model after each pass, for the ablation: int8 [-> +clip] [-> +training] -> hardened,
    each the plan with passes removed (plan.ablation_plans), rerun from the snapshots."""
    if shared.float_model is None:
        return [("int8", None, shared.plain), ("hardened", "faq", hardened)]
    # a clip pass that left the model alone (the clip search chose no clipping) is no variant
    unclipped = any(r.get("pass") == "clip" and not r.get("modified", True) for r in shared.records)
    passes = [p for p in shared.passes if not (unclipped and p.name in CLIP_PASSES)]
    variants = [(name, added, rerun_without(shared.snapshots, shared.passes, removed) if removed else shared.plain)
                for name, added, removed in ablation_plans(passes)]
    return [*variants, ("hardened", "faq", hardened)]


def reference_evaluator(shared: Shared) -> ChipEvaluator:
    """One session for the shared int8 graph, scored against labels or the float model's top-1."""
    return ChipEvaluator(shared.plain, shared.evald, shared.reference()[1])


def evaluate_on_chip(shared: Shared, hardened: onnx.ModelProto, fm: FaultMap, evaluator: ChipEvaluator | None = None,
                     host_check: bool = True) -> Results:
    """Accuracy of float, int8, plain int8 on the chip, hardened fault-free and hardened on the chip.

    Every figure uses the chip's arithmetic (arithmetic.py); `host_check` adds what this host's
    onnxruntime fused kernels make of the written model (hostcheck.py).

    Scored against labels when the data has them, else as top-1 agreement with the float
    model (or with the fault-free int8 model when the input was already int8). A fleet passes
    one `evaluator` for all its chips: FAQ changes weight values, never the graph.
    """
    float_acc = shared.reference()[0]
    ev = evaluator or reference_evaluator(shared)
    names = ev.names
    mm = MemoryMap.from_json(get_metadata(hardened)["harden.memory_map"])  # the layout FAQ used
    hardened_values = model_values(hardened, names)
    hardened_logits = ev.logits(hardened_values)
    acc = {
        "float": float_acc,
        "int8": ev.evaluate(),
        "int8_on_chip": ev.evaluate(read_through_chip(model_values(shared.plain, names), mm, fm)),
        "hardened": accuracy(top1(hardened_logits), ev.reference.target),
        "hardened_on_chip": ev.evaluate(read_through_chip(hardened_values, mm, fm)),
    }
    lost = acc["int8"] - acc["int8_on_chip"]
    recovered = acc["hardened_on_chip"] - acc["int8_on_chip"]
    out = {
        "reference": ev.reference.kind,
        "reference_model": "float" if shared.float_model is not None else "int8",
        "samples": len(shared.evald),
        "arithmetic": arithmetic.describe(),
        "accuracy": {k: (None if v is None else round(v, 6)) for k, v in acc.items()},
        "recovery": round(recovered / lost, 6) if lost > 0 else None,
    }
    if host_check:
        out["host_onnxruntime"] = fused_host_record(hardened, shared.evald, ev.reference.target, hardened_logits)
    return out


def check_training(opts: ApplyOptions) -> Config:
    """The options validated and resolved (options.py), and torch present when a training step
    asks for it (else exit 2 with the install hint)."""
    cfg = opts.config()
    t = cfg.training
    if not t.steps:
        return cfg
    from .train import require_torch

    require_torch(" and ".join(t.steps))
    if t.variability is not None:
        from .train.variability import check_sigmas

        check_sigmas(*t.variability)
    return cfg
