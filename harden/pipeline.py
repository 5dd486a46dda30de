"""`apply`: float (or int8 QDQ) model + one chip's fault map -> hardened int8 model + report.

The pass sequence of DESIGN.md, readable in one screen:

    load -> simplify (onnxsim) -> opset >= 13 -> clip -> quantize -> faq -> simulate -> write

Every input is read and checked before any work starts, and nothing is written until all the
work has succeeded (atomic writes), so a failure never leaves a partial output.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import onnx

from . import __version__
from .data import Dataset, load_npz
from .errors import InputError
from .faultmap import CSV_HEADER, FaultMap, read_faultmap
from .fileio import atomic_write_many, check_output_path
from .model import constants_to_initializers, drop_initializer_inputs, float_weight_count, is_qdq_int8, load_model, opset_of, qdq_weights, save_model, simplify, upgrade_opset
from .passes import PassContext, run_passes
from .passes.clip import ClipPass
from .passes.faq import FAQPass, memory_map_for
from .passes.quantize import QuantizePass
from .clip_search import search_clip
from .faults import parse_fault_spec
from .faults.chip import ChipFaults
from .report import REPORT_SCHEMA, to_json
from .resilience import DEFAULT_FAULTS, measure
from .simulate import ChipEvaluator, float_reference, model_values, read_through_chip


@dataclass
class ApplyOptions:
    """Switches and knobs of `apply`; the defaults are what `harden apply` runs."""

    clip: bool = True
    clip_style: str = "zero"
    clip_percentile: float | None = None  # None: chosen by measured resilience (clip_search.py)
    compensation: bool = True
    bias_correction: bool = True
    calib_samples: int = 256
    seed: int = 0
    trials: int = 30  # per random fault point of the resilience campaign; 0 = no campaign
    faults: tuple[str, ...] = DEFAULT_FAULTS


@dataclass
class ApplyResult:
    """The hardened model (in memory) and the report (a JSON-ready dict)."""

    model: onnx.ModelProto
    report: dict
    output: Path | None = None
    report_path: Path | None = None


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_output(model_path: str | os.PathLike) -> Path:
    """model.onnx -> model.hardened.onnx beside it."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}.hardened.onnx")


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Legacy clean-up, onnxsim, and the opset upgrade per-channel QDQ needs."""
    record: dict = {"opset_in": opset_of(model)}
    record["initializer_inputs_dropped"] = drop_initializer_inputs(model)
    nodes_in = len(model.graph.node)
    model = simplify(model)
    record["constants_to_initializers"] = constants_to_initializers(model)
    model = upgrade_opset(model)
    record.update(nodes_in=nodes_in, nodes_out=len(model.graph.node), opset_out=opset_of(model))
    return model, record


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
    if write:
        check_output_path(out_path, model_path, faultmap_path, data_path, eval_data_path)
        if report_path is not None:
            if Path(report_path).resolve() == out_path.resolve():
                raise InputError(f"--report {report_path} is the same path as the output model")
            check_output_path(report_path, model_path, faultmap_path, data_path, eval_data_path, out_path)
        taken = {out_path.resolve()} | ({Path(report_path).resolve()} if report_path is not None else set())
        for extra in extra_outputs or {}:
            if Path(extra).resolve() in taken:
                raise InputError(f"output path {extra} is also another output of this run; choose another path")
            check_output_path(extra, model_path, faultmap_path, data_path, eval_data_path)
            taken.add(Path(extra).resolve())
    points = [m for spec in opts.faults for m in parse_fault_spec(spec)] if opts.trials > 0 else []
    say("load")
    model = load_model(model_path)
    calib = load_npz(data_path, model, role="calibration data")
    evald = load_npz(eval_data_path, model, role="evaluation data") if eval_data_path else calib
    fm = None if _is_csv(faultmap_path) else read_faultmap(faultmap_path, None)

    records: list[dict] = []
    already_int8 = is_qdq_int8(model)
    float_model = None
    ctx = PassContext(calib=calib, seed=opts.seed, progress=say)
    if already_int8:
        qmodel = model
        records.append({"pass": "quantize", "modified": False, "skipped": "model is already int8 QDQ"})
    else:
        say("simplify")
        t0 = time.perf_counter()
        model, prep = prepare(model)
        records.append({"pass": "simplify", "modified": True, "seconds": round(time.perf_counter() - t0, 4), **prep})
        float_model = onnx.ModelProto()
        float_model.CopyFrom(model)
        if fm is None:  # a CSV map: sized to the model's weights, read before the real work
            fm = read_faultmap(faultmap_path, float_weight_count(model))
        percentile = opts.clip_percentile
        if opts.clip and percentile is None:
            say("clip search")
            t0 = time.perf_counter()
            choice = search_clip(float_model, calib, style=opts.clip_style, seed=opts.seed)
            records.append({"pass": "clip-search", "modified": False, "seconds": round(time.perf_counter() - t0, 4), **choice.record})
            percentile = choice.percentile
        passes = ([ClipPass(opts.clip_style, percentile)] if opts.clip else []) + [QuantizePass()]
        qmodel, recs = run_passes(model, passes, ctx)
        records += recs
    if not qdq_weights(qmodel):
        raise InputError(f"{model_path}: no int8 Conv/Gemm/MatMul weights to put in weight memory")
    if fm is None:
        num_words = sum(w.size for w in qdq_weights(qmodel))
        fm = read_faultmap(faultmap_path, num_words)

    plain = onnx.ModelProto()
    plain.CopyFrom(qmodel)
    hardened, recs = run_passes(
        qmodel, [FAQPass(fm, compensate=opts.compensation, bias_correction=opts.bias_correction, calib_samples=opts.calib_samples)], ctx
    )
    records += recs

    # 6. Simulate: baseline and hardened as this chip reads them back, in onnxruntime.
    say("simulate")
    t0 = time.perf_counter()
    results = evaluate_on_chip(float_model, plain, hardened, fm, evald)
    if opts.trials > 0:
        say("campaign")
        variants = _variants(float_model, plain, hardened, ctx, opts)
        points = [ChipFaults(fm), *points]
        _, ref = float_reference(float_model if float_model is not None else plain, evald)
        results["resilience"] = measure(variants, evald, ref, points, trials=opts.trials, seed=opts.seed)
    records.append({"pass": "simulate", "modified": False, "seconds": round(time.perf_counter() - t0, 4)})

    report = {
        "schema": REPORT_SCHEMA,
        "harden_version": __version__,
        "command": "apply",
        "inputs": {
            "model": _file_record(model_path),
            "faultmap": {**_file_record(faultmap_path), **fm.summary()},
            "data": {**_file_record(data_path), "samples": len(calib)},
            "eval_data": {**_file_record(eval_data_path), "samples": len(evald)} if eval_data_path else None,
            "already_int8": already_int8,
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


def _variants(float_model, plain, hardened, ctx: PassContext, opts: ApplyOptions) -> list[tuple[str, str | None, onnx.ModelProto]]:
    """The model after each pass, for the ablation: int8 [-> int8+clip] -> hardened."""
    if float_model is None or not opts.clip:
        return [("int8", None, plain), ("hardened", "faq", hardened)]
    bare = onnx.ModelProto()
    bare.CopyFrom(float_model)
    unclipped = QuantizePass().call(bare, PassContext(calib=ctx.calib, seed=opts.seed)).model
    return [("int8", None, unclipped), ("int8+clip", "clip", plain), ("hardened", "faq", hardened)]


def evaluate_on_chip(float_model, plain: onnx.ModelProto, hardened: onnx.ModelProto, fm: FaultMap, data: Dataset) -> dict:
    """Accuracy of float, int8, plain int8 on the chip, and hardened on the chip.

    Scored against labels when the data has them, else as top-1 agreement with the float
    model (or with the fault-free int8 model when the input was already int8).
    """
    ref_model = float_model if float_model is not None else plain
    float_acc, ref = float_reference(ref_model, data)
    ev = ChipEvaluator(plain, data, ref)
    names = ev.weight_names + ev.bias_names
    mm = memory_map_for(plain, fm.num_words)
    acc = {
        "float": float_acc if float_model is not None else None,
        "int8": ev.evaluate(),
        "int8_on_chip": ev.evaluate(read_through_chip(model_values(plain, names), mm, fm)),
        "hardened_on_chip": ev.evaluate(read_through_chip(model_values(hardened, names), mm, fm)),
    }
    lost = acc["int8"] - acc["int8_on_chip"]
    recovered = acc["hardened_on_chip"] - acc["int8_on_chip"]
    return {
        "reference": ref.kind,
        "reference_model": "float" if float_model is not None else "int8",
        "samples": len(data),
        "accuracy": {k: (None if v is None else round(v, 6)) for k, v in acc.items()},
        "recovery": round(recovered / lost, 6) if lost > 0 else None,
    }


def _is_csv(path: str | os.PathLike) -> bool:
    """A CSV map (read once the memory size is known); anything else is read and checked now."""
    try:
        with open(path, "rb") as fh:
            first_line = fh.read(64).split(b"\n", 1)[0]
    except OSError:
        return False  # let read_faultmap produce the error message
    return first_line.strip().removeprefix(b"\xef\xbb\xbf") == CSV_HEADER.encode()


def _file_record(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    return {"path": str(path), "sha256": sha256_of(path)}
