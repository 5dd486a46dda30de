"""The `simulate` API: check every input, build the campaign, run it, and write its report."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import onnx

from .. import __version__
from ..cluster import (
    cluster_address,
    connect,
    require_distributed,
)
from ..data import Dataset, load_npz
from ..diagnostics import diagnose
from ..errors import InputError
from ..faults import (
    ActivationSpace,
    ChipFaults,
    Fault,
    FaultModel,
    WeightSpace,
    parse_fault_spec,
)
from ..faults.fp32 import FP32_KIND, float_space, fp32_model
from ..fileio import sha256_of
from ..gates import PointGate, check_point_gates, point_gate_results
from ..model import is_qdq_int8, load_model
from ..report import REPORT_SCHEMA
from ..simulate import model_values
from .engine import Campaign
from .executors import DaskTrials
from .options import CampaignOptions, CampaignResult, _is_int, trial_rng
from .records import _describe
from .sessions import check_precision


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
    jobs: int | None = None,
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
    `jobs`: without a cluster, the threads that run trials side by side (None: one per core;
    parallel.ThreadTrials), with the same figures.
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
        result = campaign.run(opts, progress, executor, jobs)
    report["points"] = [campaign.point_record(p, opts) for p in result.points[:n_main]]
    if gates:
        report["gates"] = point_gate_results(report, gates)
    if pl is not None:
        report["per_layer"] = campaign.per_layer_records(result, opts)
    for kind in campaign.side_sessions:
        key = "activation_faults" if kind == "activations" else kind
        report[key] = campaign.session_record(kind)
    if diagnostics:
        t0 = time.perf_counter()
        report["diagnostics"] = diagnose(model, data, rho=rho, samples=sharpness_samples, seed=opts.seed,
                                         evaluator=campaign.evaluator)
        report["diagnostics"]["seconds"] = round(time.perf_counter() - t0, 3)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return SimulationResult(report, campaign, result)


