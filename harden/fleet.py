"""Harden one model for a fleet of chips: the shared work once, FAQ and simulation per chip.

`apply_fleet` runs `pipeline.build_shared` once (simplify, clip, quantize, calibration and
FAQ's layer statistics), then, for every fault map, `pipeline.harden_for_chip` on a copy of the
shared int8 model. Chips are spread over worker processes (`jobs`); each worker builds one
onnxruntime session and reuses it for all of its chips, since FAQ changes weight values, never
the graph. The fleet report gives every chip's figures and the fleet's distribution, including
the yield at a target accuracy.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__, arithmetic
from .errors import InputError
from .faultmap import FaultMap
from .fileio import atomic_write_many
from .hostcheck import fused_host_record
from .memory import get_layout, model_layout_tensors
from .passes.faq import calibration_stats
from .pipeline import (
    ApplyOptions,
    Shared,
    _file_record,
    build_shared,
    check_outputs,
    harden_for_chip,
    load_inputs,
    read_chip,
    reference_evaluator,
)
from .report import REPORT_SCHEMA, to_json

FLEET_MAP_SUFFIXES = (".bin", ".hfm", ".csv")


def expand_faultmaps(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; a folder stands for its *.bin / *.hfm / *.csv files, sorted by name."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FLEET_MAP_SUFFIXES)
            if not found:
                raise InputError(f"{p}: no fault maps (*.bin, *.hfm, *.csv) in this folder")
            out += found
        else:
            out.append(p)
    if len(set(map(os.path.realpath, out))) != len(out):
        raise InputError("the same fault map is given twice")
    return out


def chip_names(maps: Sequence[FaultMap | None], paths: Sequence[Path]) -> list[str]:
    """A file-safe name per chip: its chip_id, else the file's stem; duplicates get a suffix."""
    names, seen = [], {}
    for fm, path in zip(maps, paths):
        raw = (fm.chip_id if fm is not None and fm.chip_id else None) or path.stem
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("._") or "chip"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


# --- per-chip work, in this process or a worker ---------------------------------------------

_WORKER: dict = {}


def _init_worker(shared: Shared, opts: ApplyOptions) -> None:
    _WORKER.update(shared=shared, opts=opts, evaluator=None)


def _one_chip(path: str, num_words: int) -> tuple[bytes, dict, dict, dict, float]:
    """Harden the shared model for the map at `path`; returns serialised model and figures."""
    t0 = time.perf_counter()
    shared, opts = _WORKER["shared"], _WORKER["opts"]
    if _WORKER["evaluator"] is None:
        _WORKER["evaluator"] = reference_evaluator(shared)
    fm = read_chip(path, num_words)
    hardened, records, results = harden_for_chip(shared, fm, opts, _WORKER["evaluator"], host_check=False)
    return hardened.SerializeToString(deterministic=True), records, results, fm.summary(), time.perf_counter() - t0


def apply_fleet(
    model_path: str | os.PathLike,
    faultmap_paths: Sequence[str | os.PathLike],
    data_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    report_path: str | os.PathLike | None = None,
    eval_data_path: str | os.PathLike | None = None,
    options: ApplyOptions | None = None,
    jobs: int | None = None,
    yield_at: float | None = None,
    progress: Callable[[str], None] | None = None,
    on_chip: Callable[[str], None] | None = None,
    write: bool = True,
) -> dict:
    """Harden `model_path` for every chip; write `<output_dir>/<chip>.onnx`; return the report."""
    opts = options or ApplyOptions()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    paths = expand_faultmaps(faultmap_paths)
    out_dir = Path(output_dir) if output_dir is not None else Path(model_path).with_name(f"{Path(model_path).stem}.hardened")
    maps = [read_chip(p, None) for p in paths]  # every HFM1 map checked before any work
    layout = get_layout(opts.layout) if opts.layout else None
    for fm in maps:
        if layout is not None and fm is not None:
            layout.check(fm.num_words)
    names = chip_names(maps, paths)
    outputs = [out_dir / f"{n}.onnx" for n in names]
    if write:
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"output folder {out_dir} is a file")
        out_dir.mkdir(parents=True, exist_ok=True)
        check_outputs([*outputs, *([report_path] if report_path else [])], [model_path, data_path, eval_data_path, *paths])

    say("load")
    model, calib, evald, eval_record = load_inputs(model_path, data_path, eval_data_path)
    shared = build_shared(model, calib, evald, opts, say)
    # FAQ's calibration statistics are chip independent: collect them here, once.
    t0 = time.perf_counter()
    shared_evaluator = reference_evaluator(shared)
    if opts.compensation or opts.bias_correction:
        calibration_stats(shared.plain, shared.ctx, opts.calib_samples, opts.compensation)
    shared.ctx.progress = None  # workers receive the context; a closure does not travel
    shared.records.append({"pass": "shared-stats", "modified": False, "seconds": round(time.perf_counter() - t0, 4)})

    csv_words = shared.num_words if layout is None else layout.words_needed(model_layout_tensors(shared.plain))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(paths)))
    say(f"{len(paths)} chips on {jobs} worker(s)")
    chips = []
    t_chips = time.perf_counter()
    if jobs == 1:
        _init_worker(shared, opts)
        _WORKER["evaluator"] = shared_evaluator
        results_iter = (_one_chip(str(p), csv_words) for p in paths)
        results = []
        for r in results_iter:
            results.append(r)
            if on_chip:
                on_chip(names[len(results) - 1])
    else:
        ctx = multiprocessing.get_context("spawn")  # fork would copy onnxruntime's thread pools
        with futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(shared, opts)) as pool:
            pending = [pool.submit(_one_chip, str(p), csv_words) for p in paths]
            results = []
            for name, fut in zip(names, pending):
                results.append(fut.result())
                if on_chip:
                    on_chip(name)
    chip_seconds = time.perf_counter() - t_chips

    files = []
    for name, path, out, (model_bytes, records, res, fm_summary, secs) in zip(names, paths, outputs, results):
        chips.append({
            "chip": name,
            "faultmap": {"path": str(path), "chip_id": fm_summary["chip_id"], "rate": fm_summary["rate"],
                         "faulty_cells": fm_summary["faulty_cells"], "num_words": fm_summary["num_words"], "crc32": fm_summary["crc32"]},
            "accuracy": res["accuracy"],
            "recovery": res["recovery"],
            "output": str(out),
            "seconds": round(secs, 4),
            "faq": next((r for r in records if r["pass"] == "faq"), {}).get("timings"),
        })
        files.append((out, model_bytes))
    report = {
        "schema": REPORT_SCHEMA,
        "harden_version": __version__,
        "command": "apply-fleet",
        "inputs": {
            "model": _file_record(model_path),
            "data": {**_file_record(data_path), "samples": len(calib)},
            "eval_data": eval_record,
            "faultmaps": len(paths),
            "already_int8": shared.already_int8,
        },
        "options": {**asdict(opts), "jobs": jobs},
        "passes": shared.records,
        "arithmetic": arithmetic.describe(),
        "host_onnxruntime": fused_host_record(shared.plain, evald, shared_evaluator.reference.target, shared_evaluator.logits()),
        "chips": chips,
        "fleet": fleet_summary(chips, yield_at),
        "timings": {"shared": round(t_chips - started, 3), "chips": round(chip_seconds, 3),
                    "per_chip": round(chip_seconds / len(paths), 4)},
    }
    report["seconds"] = round(time.perf_counter() - started, 3)
    if write:
        if report_path:
            files.append((Path(report_path), to_json(report).encode("utf-8")))
        atomic_write_many(files)
    return report


def fleet_summary(chips: list[dict], yield_at: float | None) -> dict:
    """Distribution of plain and hardened accuracy over the fleet, and the yield at a target.

    The default target is the fault-free int8 accuracy minus 2 points.
    """
    int8 = chips[0]["accuracy"]["int8"]
    target = yield_at if yield_at is not None else round(int8 - 0.02, 6)

    def dist(key: str) -> dict:
        a = np.array([c["accuracy"][key] for c in chips], dtype=np.float64)
        return {
            "mean": round(float(a.mean()), 6), "min": round(float(a.min()), 6),
            "p05": round(float(np.percentile(a, 5)), 6), "median": round(float(np.median(a)), 6),
            "max": round(float(a.max()), 6), "yield": round(float(np.mean(a >= target)), 6),
        }

    return {"chips": len(chips), "int8": int8, "yield_target": target,
            "int8_on_chip": dist("int8_on_chip"), "hardened_on_chip": dist("hardened_on_chip")}
