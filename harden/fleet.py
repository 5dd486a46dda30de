"""Harden one model for a fleet of chips: the shared work once, FAQ and simulation per chip.

`apply_fleet` runs `pipeline.build_shared` once (simplify, clip, quantize, calibration and
FAQ's layer statistics), then, for every fault map, `pipeline.harden_for_chip` on a copy of the
shared int8 model, in this process, in local worker processes (`jobs`) or as Dask tasks
(`cluster`). Chips stream: each chip's model is written the moment it is done and recorded in a
journal (`<out>/.harden-fleet/`), so memory does not grow with the fleet and a rerun after a
crash or Ctrl-C resumes where it stopped. The fleet report gives every chip's figures and the
fleet's distribution, including the yield at a target accuracy.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import __version__, arithmetic
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
from .errors import InputError
from .faultmap import FaultMap, faultmap_from_bytes, is_csv_bytes
from .fileio import atomic_write_bytes, atomic_write_text, file_record, output_errors, read_input, sha256_of
from .hostcheck import fused_host_record
from .memory import get_layout, model_layout_tensors
from .passes.faq import calibration_stats
from .pipeline import (
    ApplyOptions,
    Shared,
    build_shared,
    check_outputs,
    harden_for_chip,
    load_inputs,
    read_chip,
    reference_evaluator,
)
from .report import REPORT_SCHEMA, to_json
from .report.types import ChipRecord, FleetSummary

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


def chip_names(chip_ids: Sequence[str | None], paths: Sequence[Path]) -> list[str]:
    """A file-safe name per chip: its chip_id, else the file's stem; duplicates get a suffix."""
    names, seen = [], {}
    for chip_id, path in zip(chip_ids, paths):
        raw = chip_id or path.stem
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("._") or "chip"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


# --- per-chip work, in this process or a worker ---------------------------------------------

_WORKER: dict = {}


def _init_worker(shared: Shared, opts: ApplyOptions) -> None:
    _WORKER.update(shared=shared, opts=opts, evaluator=None)


def _harden_chip(shared: Shared, opts: ApplyOptions, evaluator, fm: FaultMap) -> ChipResult:
    t0 = time.perf_counter()
    hardened, records, results = harden_for_chip(shared, fm, opts, evaluator, host_check=False)
    return hardened.SerializeToString(deterministic=True), records, results, fm.summary(), time.perf_counter() - t0


def _one_chip(path: str, num_words: int) -> ChipResult:
    """Harden the shared model for the map at `path` (a local worker: same file system)."""
    shared, opts = _WORKER["shared"], _WORKER["opts"]
    if _WORKER["evaluator"] is None:
        _WORKER["evaluator"] = reference_evaluator(shared)
    return _harden_chip(shared, opts, _WORKER["evaluator"], read_chip(path, num_words))


def _dask_chip(shared: Shared, opts: ApplyOptions, token: str, map_bytes: bytes, source: str, num_words: int) -> ChipResult:
    """A Dask task: the map arrives as bytes (no shared file system); the model leaves as bytes."""
    evaluator = worker_cached(token, lambda: reference_evaluator(shared))
    return _harden_chip(shared, opts, evaluator, faultmap_from_bytes(map_bytes, source, num_words))


ChipResult = tuple  # (model bytes, pass records, results, map summary, seconds)


def _run_inline(shared, opts, evaluator, todo, paths, num_words) -> Iterator[tuple[int, ChipResult]]:
    _init_worker(shared, opts)
    _WORKER["evaluator"] = evaluator
    for i in todo:
        yield i, _one_chip(str(paths[i]), num_words)


def _run_pool(shared, opts, todo, paths, num_words, jobs) -> Iterator[tuple[int, ChipResult]]:
    """Local worker processes; at most 2 x jobs chips in flight, results as they finish."""
    ctx = multiprocessing.get_context("spawn")  # fork would copy onnxruntime's thread pools
    with futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(shared, opts)) as pool:
        queue = iter(todo)
        running = {}
        for i in itertools.islice(queue, 2 * jobs):
            running[pool.submit(_one_chip, str(paths[i]), num_words)] = i
        while running:
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for fut in sorted(done, key=running.get):
                i = running.pop(fut)
                yield i, fut.result()
                for j in itertools.islice(queue, 1):
                    running[pool.submit(_one_chip, str(paths[j]), num_words)] = j


def _run_dask(client, shared, opts, todo, paths, num_words, token) -> Iterator[tuple[int, ChipResult]]:
    """Chips as Dask tasks: the shared work is sent to every worker once, each map is read here
    only when its task is submitted, at most 2 x workers in flight. A worker that dies costs
    only its tasks: the scheduler reruns them elsewhere, and a task it drops with the worker is
    submitted again (cluster.is_lost_task), so every chip comes back exactly once."""
    from distributed import as_completed  # the optional extra: only imported when --cluster is used

    data = SharedData(client, shared)
    limit = 2 * worker_count(client)
    queue = iter(todo)
    run = uuid.uuid4().hex[:12]  # task keys unique to this run: a scheduler may outlive many runs
    tries: dict[int, int] = {}

    def submit(i):
        tries[i] = tries.get(i, -1) + 1
        blob = read_input(paths[i], "a fault map")
        fut = client.submit(_dask_chip, data.refresh(), opts, token, blob, str(paths[i]), num_words,
                            key=f"harden-chip-{run}-{i}-{tries[i]}", pure=False, retries=2)
        index[fut.key] = i
        pending.add(fut)

    index: dict[str, int] = {}
    pending = as_completed()
    for i in itertools.islice(queue, limit):
        submit(i)
    for fut in pending:
        if fut.key not in index:  # as_completed may hand a recomputed future over twice
            continue
        i = index.pop(fut.key)
        try:
            result = fut.result()
        except Exception as exc:
            if not is_lost_task(exc) or tries[i] >= LOST_TASK_RETRIES:
                raise
            submit(i)
            continue
        del fut  # the client drops the key once no future refers to it
        yield i, result
        for j in itertools.islice(queue, 1):
            submit(j)


# --- the journal: chips recorded as they finish, so a rerun resumes -----------------------------

JOURNAL_DIR = ".harden-fleet"


class Journal:
    """One JSON record per finished chip in `<out>/.harden-fleet/`, written atomically after the
    chip's model. A record counts on a rerun only when its key (the run's inputs and options and
    this map's hash) matches and the model file beside it still has the recorded hash."""

    def __init__(self, out_dir: Path, run_key: str, write: bool):
        self.dir = out_dir / JOURNAL_DIR
        self.run_key = run_key
        self.write = write
        if write:
            with output_errors(self.dir):
                self.dir.mkdir(exist_ok=True)

    def key(self, map_sha: str) -> str:
        return hashlib.sha256(f"{self.run_key}:{map_sha}".encode()).hexdigest()

    def load(self, name: str, map_sha: str, output: Path) -> dict | None:
        """The chip's record when it is complete and matches; else None (the chip runs again)."""
        path = self.dir / f"{name}.json"
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            if rec.get("key") != self.key(map_sha):
                return None
            if sha256_of(output) != rec["output_sha256"]:
                return None
            return rec["chip"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record(self, name: str, map_sha: str, model_bytes: bytes, output: Path, chip: dict) -> None:
        """Write the chip's model, then its record (each atomically: a crash between the two
        leaves a model without a record, which a rerun simply redoes)."""
        if not self.write:
            return
        atomic_write_bytes(output, model_bytes)
        rec = {"key": self.key(map_sha), "output_sha256": hashlib.sha256(model_bytes).hexdigest(), "chip": chip}
        atomic_write_text(self.dir / f"{name}.json", json.dumps(rec, indent=1) + "\n")


def _run_key(inputs: dict, opts: ApplyOptions) -> str:
    """What a chip's result depends on besides its map: the inputs' hashes (from the report's
    input records, so each file is hashed once), the options, the version."""
    doc = {"model": inputs["model"]["sha256"], "data": inputs["data"]["sha256"],
           "eval": inputs["eval_data"].get("sha256"), "options": asdict(opts), "version": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _chip_record(name: str, path: Path, out: Path, result: ChipResult) -> ChipRecord:
    _, records, res, fm_summary, secs = result
    return {
        "chip": name,
        "faultmap": {"path": str(path), "chip_id": fm_summary["chip_id"], "rate": fm_summary["rate"],
                     "faulty_cells": fm_summary["faulty_cells"], "num_words": fm_summary["num_words"], "crc32": fm_summary["crc32"]},
        "accuracy": res["accuracy"],
        "recovery": res["recovery"],
        "output": str(out),
        "seconds": round(secs, 4),
        "faq": next((r for r in records if r["pass"] == "faq"), {}).get("timings"),
    }


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
    cluster: str | None = None,
) -> dict:
    """Harden `model_path` for every chip; write `<output_dir>/<chip>.onnx`; return the report.

    Streamed: maps are checked up front without being kept, each chip's model is written as
    soon as it is done, so memory stays at a few models and maps whatever the fleet's size.
    Resumable: a rerun of the same inputs skips the chips already written (`Journal`), and its
    report equals an uninterrupted run's apart from timings. `cluster`: a Dask address
    ('local', 'tcp://host:8786'; cluster.py), else local worker processes (`jobs`).
    """
    opts = options or ApplyOptions()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    address = cluster_address(cluster)
    if address is not None:
        require_distributed()
    paths = expand_faultmaps(faultmap_paths)
    out_dir = Path(output_dir) if output_dir is not None else Path(model_path).with_name(f"{Path(model_path).stem}.hardened")
    cfg = opts.config()
    layout = get_layout(cfg.layout) if cfg.layout else None
    chip_ids, map_shas = [], []
    for p in paths:  # every HFM1 map checked before any work (read once: checked and hashed), none kept
        blob = read_input(p, "a fault map")
        map_shas.append(hashlib.sha256(blob).hexdigest())
        fm = None if is_csv_bytes(blob) else faultmap_from_bytes(blob, str(p))  # a CSV map waits for the model's size
        if layout is not None and fm is not None:
            layout.check(fm.num_words)
        chip_ids.append(None if fm is None else fm.chip_id)
    names = chip_names(chip_ids, paths)
    outputs = [out_dir / f"{n}.onnx" for n in names]
    if write:
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"output folder {out_dir} is a file")
        with output_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
        check_outputs([*outputs, *([report_path] if report_path else [])], [model_path, data_path, eval_data_path, *paths])

    say("load")
    model, calib, evald, eval_record = load_inputs(model_path, data_path, eval_data_path)
    shared = build_shared(model, calib, evald, opts, say)
    del model  # `shared` holds what the chips need
    # FAQ's calibration statistics are chip independent: collect them here, once.
    t0 = time.perf_counter()
    shared_evaluator = reference_evaluator(shared)
    if cfg.faq.shared_stats:
        calibration_stats(shared.plain, shared.ctx, cfg.faq.calib_samples, cfg.faq.compensation)
    shared.ctx.progress = None  # each chip is reported by on_chip, not pass by pass
    shared.records.append({"pass": "shared-stats", "modified": False, "seconds": round(time.perf_counter() - t0, 4)})

    inputs = {"model": file_record(model_path), "data": {**file_record(data_path), "samples": len(calib)},
              "eval_data": eval_record, "faultmaps": len(paths), "already_int8": shared.already_int8}
    run_key = _run_key(inputs, opts)
    journal = Journal(out_dir, run_key, write)
    chips: list[dict | None] = [journal.load(n, m, o) if write else None for n, m, o in zip(names, map_shas, outputs)]
    todo = [i for i, c in enumerate(chips) if c is None]
    if len(todo) < len(paths):
        say(f"resuming: {len(paths) - len(todo)} of {len(paths)} chips already done")

    csv_words = shared.num_words if layout is None else layout.words_needed(model_layout_tensors(shared.plain))
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(paths)))
    t_chips = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if address is not None:
            client = stack.enter_context(connect(address))
            say(f"{len(todo)} chips on the Dask cluster {address}")
            stream = _run_dask(client, shared.for_workers(), opts, todo, paths, csv_words, run_key)
        elif jobs == 1 or len(todo) <= 1:
            say(f"{len(todo)} chips in this process")
            stream = _run_inline(shared, opts, shared_evaluator, todo, paths, csv_words)
        else:
            say(f"{len(todo)} chips on {jobs} worker(s)")
            stream = _run_pool(shared.for_workers(), opts, todo, paths, csv_words, jobs)
        for i, result in stream:
            chips[i] = _chip_record(names[i], paths[i], outputs[i], result)
            journal.record(names[i], map_shas[i], result[0], outputs[i], chips[i])
            if on_chip:
                on_chip(names[i])
    chip_seconds = time.perf_counter() - t_chips
    done = [c for c in chips if c is not None]

    report = {
        "schema": REPORT_SCHEMA,
        "harden_version": __version__,
        "command": "apply-fleet",
        "inputs": inputs,
        "options": {**asdict(opts), "jobs": jobs},
        "passes": shared.records,
        "arithmetic": arithmetic.describe(),
        "host_onnxruntime": fused_host_record(shared.plain, evald, shared_evaluator.reference.target, shared_evaluator.logits()),
        "chips": done,
        "fleet": fleet_summary(done, yield_at),
        "timings": {"shared": round(t_chips - started, 3), "chips": round(chip_seconds, 3),
                    "per_chip": round(chip_seconds / max(len(todo), 1), 4), "resumed_chips": len(paths) - len(todo)},
    }
    if address is not None:
        report["cluster"] = {"address": address}
    report["seconds"] = round(time.perf_counter() - started, 3)
    if write and report_path:
        atomic_write_text(report_path, to_json(report))
    return report


def fleet_summary(chips: list[ChipRecord], yield_at: float | None) -> FleetSummary:
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
