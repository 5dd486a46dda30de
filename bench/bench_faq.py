"""FAQ remap throughput and compensation cost on a 25 M-weight int8 QDQ model.

    python bench/bench_faq.py            # ResNet-50 graph, 25,502,912 int8 weights (a few minutes)
    python bench/bench_faq.py --quick    # a 2.6 M-weight Gemm MLP (under 30 s)

What it measures (see bench/README.md):
  1. the model: onnx's bundled model-zoo graph light_resnet50 (opset 9), simplified with the
     pipeline's own `prepare` (onnxsim), every Conv/Gemm given its own weight tensor drawn
     LeCun-normal (the light graph's weights are ConstantOfShape fills that onnxsim dedupes),
     then quantized by harden's QuantizePass on a few random calibration images;
  2. a uniform 0.04-rate HFM1 fault map, one word per weight (written and read back);
  3. separately, best of --repeats (and the first, cold run): (a) MemoryMap.stream_masks,
     (b) the FAQ table for the patterns present, (c) faq_remap over the whole weight stream
     of float targets; weights/s for (b)+(c) ("table construction included") and (a)+(b)+(c);
     then a brute-force exactness check of the chosen codes;
  4. FAQPass on the same model: compensation + bias correction, bias correction only, plain
     FAQ; its record's timings and the total seconds;
     (the compensated run under cProfile, whose top entries are printed), and the compensated
     run again with OpenBLAS limited to one thread (threadpoolctl);
  5. `harden apply` on the bundled samples (if samples/model.onnx exists), as a subprocess;
     with --apply-model also harden.pipeline.apply on the benchmark model itself.
  --baseline REV also times harden/faq_table.py as of git revision REV on the same stream.

Prints a table and writes bench/results/faq.json (faq.quick.json with --quick). A benchmark, not
a test: figures depend on the machine and on what else runs on it (the load average is recorded).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from harden import faq_table  # noqa: E402
from harden.data import Dataset  # noqa: E402
from harden.faq_table import FAQTable, faq_remap, pattern_keys  # noqa: E402
from harden.faultmap import generate_uniform, read_back, read_faultmap, write_faultmap  # noqa: E402
from harden.model import get_initializer, initializer_map, load_model, qdq_weights  # noqa: E402
from harden.passes import PassContext  # noqa: E402
from harden.passes.faq import FAQPass, _targets, memory_map_for  # noqa: E402
from harden.passes.quantize import QuantizePass, _float_weights_by_int8  # noqa: E402
from harden.model import prepare  # noqa: E402

CACHE = HERE / ".cache"
RESULTS = HERE / "results"
RATE = 0.04
FAULT_SEED = 1
TARGET_RATE = 100e6  # weights/s, (b)+(c)
SLOW_COMPENSATION_S = 60.0  # "within seconds, not minutes": flagged in the table above this


# --------------------------------------------------------------------------------------------
# models


def _redraw_weights(model: onnx.ModelProto, seed: int) -> None:
    """Give every Conv/Gemm its own LeCun-normal weight tensor (std 1/sqrt(fan_in))."""
    rng = np.random.default_rng(seed)
    inits = initializer_map(model)
    fresh = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        if node.op_type == "Conv":
            fan_in = int(np.prod(dims[1:]))
        else:
            fan_in = dims[0] if not next((a.i for a in node.attribute if a.name == "transB"), 0) else dims[1]
        w = (rng.standard_normal(dims, dtype=np.float32) / np.float32(np.sqrt(fan_in))).astype(np.float32)
        name = f"bench_w{i}_{node.op_type}"
        fresh.append(numpy_helper.from_array(w, name))
        node.input[1] = name
    used = {x for n in model.graph.node for x in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + fresh)


def resnet50_float(log) -> tuple[onnx.ModelProto, str]:
    """light_resnet50, prepared like `harden apply` does, with per-layer LeCun weights (cached)."""
    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    if not src.exists():
        raise SystemExit(f"{src} not found (onnx {onnx.__version__}); use --model mlp")
    cached = CACHE / f"resnet50_float_onnx{onnx.__version__}.onnx"
    if cached.exists():
        model = onnx.load(str(cached))
    else:
        log(f"  simplifying {src.name} with onnxsim (once; cached in {cached.relative_to(ROOT)}) ...")
        model, _ = prepare(load_model(src))
        _redraw_weights(model, seed=0)
        CACHE.mkdir(exist_ok=True)
        onnx.save(model, str(cached))
    desc = ("ResNet-50 (onnx model-zoo graph light_resnet50.onnx, opset 9 -> 13 via harden's prepare/onnxsim; "
            "weights re-drawn LeCun-normal per layer, seed 0, because the light graph's are constant fills)")
    return model, desc


def mlp_float(widths: list[int], seed: int = 0) -> tuple[onnx.ModelProto, str]:
    """A Gemm + Relu stack (transB=1), LeCun-normal weights, small random biases."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i, (din, dout) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.standard_normal((dout, din), dtype=np.float32) / np.float32(np.sqrt(din))).astype(np.float32)
        b = (0.01 * rng.standard_normal(dout)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        y = f"fc{i}" if i == len(widths) - 2 else f"fc{i}_pre"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [y], name=f"Gemm_{i}", transB=1))
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}"], name=f"Relu_{i}"))
            y = f"relu{i}"
        x = y
    graph = helper.make_graph(
        nodes, "bench_mlp",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", widths[0]])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", widths[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    n = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return model, f"Gemm/Relu MLP {'-'.join(map(str, widths))} (onnx.helper, LeCun-normal weights, seed {seed}); {n:,} weights"


def quantized(model: onnx.ModelProto, calib: Dataset) -> tuple[onnx.ModelProto, dict[str, np.ndarray], float]:
    """harden's QuantizePass; returns the QDQ model, float weights by int8 name, seconds."""
    ctx = PassContext(calib=calib)
    t0 = time.perf_counter()
    result = QuantizePass().call(model, ctx)
    secs = time.perf_counter() - t0
    fw = ctx.float_weights or _float_weights_by_int8(model, result.model)
    return result.model, fw, secs


def calibration_data(model: onnx.ModelProto, n: int, seed: int = 0) -> Dataset:
    vi = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else n for d in vi.type.tensor_type.shape.dim]
    dims[0] = n
    x = np.random.default_rng(seed).standard_normal(dims, dtype=np.float32)
    return Dataset({vi.name: x}, None, "random normal")


# --------------------------------------------------------------------------------------------
# timing helpers


def timed(fn, repeats: int):
    """(result of the first call, first seconds, best seconds, all seconds)."""
    times, result = [], None
    for i in range(max(1, repeats)):
        t0 = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            result = r
        del r
    return result, times[0], min(times), times


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "harden"], capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty(harden/)" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_baseline(rev: str):
    """harden/faq_table.py as of git revision `rev`, as a module (for before/after figures)."""
    import types

    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:harden/faq_table.py"], capture_output=True, text=True)
    if src.returncode != 0:
        raise SystemExit(f"--baseline {rev}: {src.stderr.strip()}")
    mod = types.ModuleType(f"faq_table_{rev}")
    mod.__dict__["__package__"] = "harden"  # its relative imports resolve inside harden
    exec(compile(src.stdout, f"{rev}:harden/faq_table.py", "exec"), mod.__dict__)
    return mod


# --------------------------------------------------------------------------------------------
# exactness


def brute_force_check(targets: np.ndarray, sa0: np.ndarray, sa1: np.ndarray, codes: np.ndarray, n: int, seed: int) -> dict:
    """For sampled stream positions plus adversarial targets on every one of the 6561 patterns:
    the code's read-back value is the nearest achievable one (min over all 256 codes), and a
    healthy word gets clip(rint(target))."""
    rng = np.random.default_rng(seed)
    faulty = np.flatnonzero((sa0 | sa1) != 0)
    healthy = np.flatnonzero((sa0 | sa1) == 0)
    pick_f = rng.choice(faulty, size=min(n, faulty.size), replace=False) if faulty.size else faulty
    pick_h = rng.choice(healthy, size=min(n // 4, healthy.size), replace=False) if healthy.size else healthy

    # adversarial: every valid pattern x targets on and near half-integers, and out of range
    keys = np.arange(1 << 16, dtype=np.uint16)
    keys = keys[((keys & 0xFF) & (keys >> 8)) == 0]
    keys = keys[keys != 0]
    extra_t = np.concatenate([
        np.arange(-129.0, 129.0, 0.5),  # exact half-integers and integers
        np.nextafter(np.arange(-128.5, 128.0, 1.0, dtype=np.float32), np.float32(np.inf)),
        np.nextafter(np.arange(-128.5, 128.0, 1.0, dtype=np.float32), np.float32(-np.inf)),
        [-1e6, 1e6, -200.3, 200.3],
    ]).astype(np.float32)
    adv_keys = rng.choice(keys, size=extra_t.size * 40)
    adv_t = np.tile(extra_t, 40)
    adv_s0 = (adv_keys & 0xFF).astype(np.uint8)
    adv_s1 = (adv_keys >> 8).astype(np.uint8)
    adv_codes = faq_remap(adv_t, adv_s0, adv_s1)

    def check(t, s0, s1, c) -> int:
        t64 = t.astype(np.float64)
        bad = 0
        for s in range(0, t.size, 1 << 14):  # blocks of (16384 x 256) candidates
            sl = slice(s, s + (1 << 14))
            allreads = read_back(np.arange(256, dtype=np.uint8)[None, :].repeat(t64[sl].size, 0),
                                 s0[sl, None], s1[sl, None]).view(np.int8).astype(np.float64)
            best = np.abs(allreads - t64[sl, None]).min(axis=1)
            got = np.abs(read_back(c[sl], s0[sl], s1[sl]).astype(np.float64) - t64[sl])
            bad += int(np.count_nonzero(got != best))
        return bad

    # float64 targets (compensation hands faq_remap float64): a hair off half-integers, and tiny
    near = np.arange(-128.5, 128.0, 1.0)
    t64 = np.concatenate([near - 1e-12, near + 1e-12, near - 1e-9, near + 1e-9, [-1e-300, 1e-300, -0.0, 0.0]])
    k64 = rng.choice(keys, size=t64.size * 40)
    t64 = np.tile(t64, 40)
    s0_64, s1_64 = (k64 & 0xFF).astype(np.uint8), (k64 >> 8).astype(np.uint8)
    codes64 = faq_remap(t64, s0_64, s1_64)

    bad_f = check(targets[pick_f], sa0[pick_f], sa1[pick_f], codes[pick_f])
    bad_adv = check(adv_t, adv_s0, adv_s1, adv_codes) + check(t64, s0_64, s1_64, codes64)
    want_h = np.clip(np.rint(targets[pick_h]), -128, 127).astype(np.int8)
    bad_h = int(np.count_nonzero(codes[pick_h] != want_h))
    checked = int(pick_f.size + adv_t.size + t64.size + pick_h.size)
    return {
        "checked": checked,
        "faulty_sampled": int(pick_f.size),
        "adversarial": int(adv_t.size + t64.size),
        "healthy_sampled": int(pick_h.size),
        "mismatches": bad_f + bad_adv + bad_h,
        "ok": bad_f + bad_adv + bad_h == 0,
    }


# --------------------------------------------------------------------------------------------
# the benchmark


def stream_targets(qmodel: onnx.ModelProto, float_weights: dict[str, np.ndarray], mm) -> np.ndarray:
    """Float targets (w / scale, code units) of every weight, in stream order."""
    out = np.empty(mm.total, np.float32)
    for w in qdq_weights(qmodel):
        slot = mm.slot(w.name)
        plain = get_initializer(qmodel, w.name)
        out[slot.offset : slot.offset + slot.count] = _targets(w, plain, float_weights.get(w.name)).ravel()
    return out


def bench_remap(qmodel, float_weights, fm, repeats: int, check_n: int, baseline, log) -> dict:
    mm = memory_map_for(qmodel, fm.num_words)
    n = mm.total
    targets = stream_targets(qmodel, float_weights, mm)

    (sa0, sa1), a_first, a_best, _ = timed(lambda: mm.stream_masks(fm), repeats)

    def table_as_pass():  # what FAQPass.call does today
        f = np.flatnonzero((sa0 | sa1) != 0)
        return FAQTable.build(pattern_keys(sa0[f], sa1[f]))

    table, b_first, b_best, _ = timed(table_as_pass, repeats)
    table2, bm_first, bm_best, _ = timed(lambda: FAQTable.from_masks(sa0, sa1), repeats)
    assert np.array_equal(table.values, table2.values) and np.array_equal(table.row_of_key, table2.row_of_key)
    del table2
    codes, c_first, c_best, _ = timed(lambda: faq_remap(targets, sa0, sa1, table), repeats)
    _, cb_first, cb_best, _ = timed(lambda: faq_remap(targets, sa0, sa1), repeats)

    faulty = int(np.count_nonzero((sa0 | sa1) != 0))
    res = {
        "weights": n,
        "faulty_words_under_weights": faulty,
        "faulty_fraction": round(faulty / n, 5),
        "patterns": int(table.values.shape[0]),
        "repeats": repeats,
        "a_stream_masks": {"first_s": a_first, "best_s": a_best},
        "b_table_as_faqpass": {"first_s": b_first, "best_s": b_best,
                               "what": "flatnonzero + pattern_keys + FAQTable.build (FAQPass.call today)"},
        "b_table_from_masks": {"first_s": bm_first, "best_s": bm_best, "what": "FAQTable.from_masks(sa0, sa1)"},
        "c_remap": {"first_s": c_first, "best_s": c_best, "what": "faq_remap(targets, sa0, sa1, table)"},
        "bc_remap_building_table": {"first_s": cb_first, "best_s": cb_best, "what": "faq_remap(targets, sa0, sa1) (table=None)"},
    }
    bc = b_best + c_best
    abc = a_best + bc
    res["rate_bc_weights_per_s"] = n / bc
    res["rate_abc_weights_per_s"] = n / abc
    res["rate_bc_cold_weights_per_s"] = n / (b_first + c_first)
    res["rate_abc_cold_weights_per_s"] = n / (a_first + b_first + c_first)
    res["target_weights_per_s"] = TARGET_RATE
    res["target_met"] = res["rate_bc_weights_per_s"] >= TARGET_RATE

    log("  exactness: brute force over all 256 codes ...")
    t0 = time.perf_counter()
    res["exactness"] = brute_force_check(targets, sa0, sa1, codes, check_n, seed=7)
    res["exactness"]["seconds"] = time.perf_counter() - t0

    if baseline is not None:
        log(f"  baseline faq_table from git {baseline.__name__.split('_')[-1]} ...")

        def base_table():
            f = np.flatnonzero((sa0 | sa1) != 0)
            return baseline.FAQTable.build(baseline.pattern_keys(sa0[f], sa1[f]))

        btab, bb_first, bb_best, _ = timed(base_table, repeats)
        bcodes, bc_first, bc_best, _ = timed(lambda: baseline.faq_remap(targets, sa0, sa1, btab), repeats)
        diff = np.flatnonzero(bcodes != codes)
        worse = 0
        if diff.size:  # which of the two is nearer where they differ
            d_new = np.abs(read_back(codes[diff], sa0[diff], sa1[diff]).astype(np.float64) - targets[diff])
            d_old = np.abs(read_back(bcodes[diff], sa0[diff], sa1[diff]).astype(np.float64) - targets[diff])
            worse = int(np.count_nonzero(d_old > d_new))
        res["baseline"] = {
            "rev": baseline.__name__.split("_")[-1],
            "codes_differ": int(diff.size),
            "baseline_farther_where_differ": worse,
            "b_table": {"first_s": bb_first, "best_s": bb_best},
            "c_remap": {"first_s": bc_first, "best_s": bc_best},
            "rate_bc_weights_per_s": n / (bb_best + bc_best),
            "rate_bc_cold_weights_per_s": n / (bb_first + bc_first),
            "same_codes": bool(np.array_equal(bcodes, codes)),
        }
    return res


def bench_faqpass(qmodel, float_weights, fm, calib: Dataset, configs, profile: bool, log) -> list[dict]:
    out = []
    for label, comp, bias, blas_threads in configs:
        model = onnx.ModelProto()
        model.CopyFrom(qmodel)
        ctx = PassContext(calib=calib, float_weights=dict(float_weights))
        p = FAQPass(fm, compensate=comp, bias_correction=bias, calib_samples=len(calib))
        log(f"  FAQPass {label} ...")
        prof = cProfile.Profile() if (profile and comp and blas_threads is None) else None
        with _blas_limit(blas_threads):
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            rec = p.call(model, ctx).record
            if prof:
                prof.disable()
            total = time.perf_counter() - t0
        row = {
            "config": label,
            "compensation": comp,
            "bias_correction": bias,
            "calib_samples": len(calib),
            "blas_threads": blas_threads,
            "total_s": total,
            "timings": rec["timings"],
            "forced": rec["forced"],
            "changed": rec["changed"],
            "on_faulty_words": rec["on_faulty_words"],
            "table_patterns": rec["table_patterns"],
            "profiled": prof is not None,
        }
        if prof is not None:
            s = io.StringIO()
            st = pstats.Stats(prof, stream=s).sort_stats("tottime")
            st.print_stats(15)
            row["profile_top_tottime"] = _profile_rows(st, 15)
            row["profile_text"] = s.getvalue()
        out.append(row)
        del model
    return out


def _blas_limit(threads: int | None):
    """threadpoolctl's limit on BLAS threads (OpenBLAS), or a no-op."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _profile_rows(st: pstats.Stats, n: int) -> list[dict]:
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]:
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)})
    return rows


def bench_apply_samples(log) -> dict | None:
    s = ROOT / "samples"
    if not (s / "model.onnx").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        cmd = [sys.executable, "-m", "harden", "apply", str(s / "model.onnx"), "--faultmap", str(s / "chip.bin"),
               "--data", str(s / "calib.npz"), "-o", str(Path(tmp) / "m.onnx"), "--report", str(Path(tmp) / "r.json"), "-q"]
        if (s / "test.npz").exists():
            cmd[cmd.index("-o"):cmd.index("-o")] = ["--eval-data", str(s / "test.npz")]
        log("  harden apply samples/model.onnx ...")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"command": " ".join(cmd), "rc": proc.returncode, "stderr": proc.stderr[-2000:]}
        rep = json.loads((Path(tmp) / "r.json").read_text())
    faq = next((p for p in rep["passes"] if p["pass"] == "faq"), {})
    return {
        "command": "python -m harden apply samples/model.onnx --faultmap samples/chip.bin --data samples/calib.npz "
                   "--eval-data samples/test.npz -o <tmp> --report <tmp> -q",
        "wall_s": wall,
        "report_seconds": rep.get("seconds"),
        "weights": rep["inputs"]["faultmap"]["num_words"],
        "passes": {p["pass"]: p.get("seconds") for p in rep["passes"]},
        "faq_timings": faq.get("timings"),
        "accuracy": rep["results"]["accuracy"],
        "recovery": rep["results"].get("recovery"),
    }


def bench_apply_big(fmodel_path: Path, calib: Dataset, fm, log) -> dict:
    """harden.pipeline.apply (in process, write=False) on the benchmark's float model."""
    from harden.pipeline import ApplyOptions, apply

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-apply-big-") as tmp:
        data = Path(tmp) / "calib.npz"
        np.savez(data, **calib.inputs)
        fmp = Path(tmp) / "chip.bin"
        write_faultmap(fm, fmp)
        for comp in (True, False):
            log(f"  harden apply on the benchmark model, compensation {'on' if comp else 'off'} ...")
            t0 = time.perf_counter()
            res = apply(fmodel_path, fmp, data, options=ApplyOptions(compensation=comp, calib_samples=len(calib)), write=False)
            wall = time.perf_counter() - t0
            out["compensation_on" if comp else "compensation_off"] = {
                "wall_s": wall,
                "passes": {p["pass"]: p.get("seconds") for p in res.report["passes"]},
                "faq_timings": next(p for p in res.report["passes"] if p["pass"] == "faq")["timings"],
            }
    return out


# --------------------------------------------------------------------------------------------
# output


def fmt_s(x: float) -> str:
    return f"{x * 1e3:9.1f} ms" if x < 10 else f"{x:9.2f} s "


def print_report(r: dict) -> None:
    m, rm = r["model"], r["remap"]
    print()
    print(f"harden FAQ benchmark  {r['date']}  nproc={r['machine']['nproc']}  {r['machine']['cpu']}")
    print(f"load average before / after: {r['machine']['loadavg_before']} / {r['machine']['loadavg_after']}")
    print(f"model: {m['description']}")
    print(f"       {m['int8_tensors']} int8 tensors, {m['weights']:,} weights; quantized in {m['quantize_s']:.1f} s "
          f"on {m['calib_samples']} random calibration samples")
    fmr = r["faultmap"]
    print(f"fault map: uniform rate {fmr['rate']} (measured {fmr['measured_rate']:.5f}), seed {fmr['seed']}, "
          f"{fmr['num_words']:,} words, {fmr['num_records']:,} faulty words; "
          f"{rm['faulty_words_under_weights']:,} weights on faulty words ({rm['faulty_fraction']:.1%}), "
          f"{rm['patterns']} patterns")
    print()
    print(f"{'step':58s} {'first (cold)':>13s} {'best of ' + str(rm['repeats']):>13s}")
    rows = [
        ("(a) MemoryMap.stream_masks", rm["a_stream_masks"]),
        ("(b) table as FAQPass builds it (nonzero+keys+build)", rm["b_table_as_faqpass"]),
        ("(b') FAQTable.from_masks", rm["b_table_from_masks"]),
        ("(c) faq_remap over all weights, table given", rm["c_remap"]),
        ("(b)+(c) in one call: faq_remap(table=None)", rm["bc_remap_building_table"]),
    ]
    for name, d in rows:
        print(f"{name:58s} {fmt_s(d['first_s']):>13s} {fmt_s(d['best_s']):>13s}")
    n = rm["weights"]
    print()
    print(f"(b)+(c) table construction included: {rm['rate_bc_weights_per_s'] / 1e6:8.1f} M weights/s best, "
          f"{rm['rate_bc_cold_weights_per_s'] / 1e6:8.1f} M/s cold   (target >= {TARGET_RATE / 1e6:.0f} M/s: "
          f"{'met' if rm['target_met'] else 'NOT met'})")
    print(f"(a)+(b)+(c):                          {rm['rate_abc_weights_per_s'] / 1e6:8.1f} M weights/s best, "
          f"{rm['rate_abc_cold_weights_per_s'] / 1e6:8.1f} M/s cold   ({n:,} weights)")
    if "baseline" in rm:
        b = rm["baseline"]
        print(f"baseline faq_table @ {b['rev']}: (b) {fmt_s(b['b_table']['best_s']).strip()}  (c) {fmt_s(b['c_remap']['best_s']).strip()}"
              f"  -> {b['rate_bc_weights_per_s'] / 1e6:.1f} M/s best, {b['rate_bc_cold_weights_per_s'] / 1e6:.1f} M/s cold; "
              f"same codes: {b['same_codes']} ({b['codes_differ']:,} differ; the baseline's is farther from the target "
              f"at {b['baseline_farther_where_differ']:,} of them)")
    ex = rm["exactness"]
    print(f"exactness (brute force, min over 256 codes): {ex['checked']:,} weights checked "
          f"({ex['faulty_sampled']:,} faulty, {ex['adversarial']:,} adversarial, {ex['healthy_sampled']:,} healthy): "
          f"{'OK' if ex['ok'] else str(ex['mismatches']) + ' MISMATCHES'}")
    if r.get("faqpass"):
        print()
        print(f"FAQPass on the same model ({r['faqpass'][0]['calib_samples']} calibration samples):")
        print(f"  {'config':34s} {'table':>9s} {'calib stats':>12s} {'remap':>9s} {'total':>9s} {'forced':>10s}")
        for row in r["faqpass"]:
            t = row["timings"]
            flag = "  (> %.0f s)" % SLOW_COMPENSATION_S if row["total_s"] > SLOW_COMPENSATION_S else ""
            print(f"  {row['config']:34s} {t['table']:8.2f}s {t['calibration_stats']:11.2f}s {t['remap']:8.2f}s "
                  f"{row['total_s']:8.2f}s {row['forced']:10,}{flag}")
        for row in r["faqpass"]:
            if row.get("profile_top_tottime"):
                print(f"  cProfile of '{row['config']}' (top by own time):")
                for p in row["profile_top_tottime"][:10]:
                    print(f"    {p['tottime_s']:8.2f}s own {p['cumtime_s']:8.2f}s cum {p['calls']:7d}x  {p['function']}")
    big = r.get("apply_model")
    if big:
        print()
        for k, v in big.items():
            print(f"harden apply (pipeline.apply, write=False) on the benchmark model, {k.replace('_', ' ')}: "
                  f"{v['wall_s']:.1f} s; passes {v['passes']}")
    ap = r.get("apply_samples")
    if ap:
        print()
        if "wall_s" in ap:
            print(f"harden apply on samples/ ({ap['weights']:,} weights): {ap['wall_s']:.2f} s wall "
                  f"(report: {ap['report_seconds']} s; passes {ap['passes']})")
        else:
            print(f"harden apply on samples/ failed (rc {ap['rc']}): {ap['stderr'][-300:]}")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2.6 M-weight MLP, fewer repeats (< 30 s)")
    ap.add_argument("--model", choices=["resnet50", "mlp"], help="default: resnet50 (mlp with --quick)")
    ap.add_argument("--repeats", type=int, help="timing repeats (default 5, 3 with --quick)")
    ap.add_argument("--calib", type=int, help="calibration samples (default 4 for resnet50, 64 for mlp)")
    ap.add_argument("--check", type=int, help="faulty weights checked by brute force (default 200000, 50000 quick)")
    ap.add_argument("--no-faqpass", action="store_true", help="skip the FAQPass timings")
    ap.add_argument("--no-apply", action="store_true", help="skip harden apply on samples/")
    ap.add_argument("--apply-model", action="store_true",
                    help="also time harden apply (in process) on the benchmark model, compensation on and off")
    ap.add_argument("--no-blas1", action="store_true",
                    help="skip the second compensated run with BLAS limited to one thread (threadpoolctl)")
    ap.add_argument("--no-profile", action="store_true", help="do not run the compensated FAQPass under cProfile")
    ap.add_argument("--baseline", metavar="REV", help="also time harden/faq_table.py as of this git revision")
    ap.add_argument("--out", type=Path, help="JSON output (default bench/results/faq.json, faq.quick.json with --quick)")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    quick = args.quick
    kind = args.model or ("mlp" if quick else "resnet50")
    repeats = args.repeats or (3 if quick else 5)
    check_n = args.check or (50_000 if quick else 200_000)
    out_path = args.out or RESULTS / ("faq.quick.json" if quick else "faq.json")
    started = time.perf_counter()
    load_before = loadavg()
    baseline = load_baseline(args.baseline) if args.baseline else None

    log(f"model: {kind}")
    t0 = time.perf_counter()
    fmodel_path = None
    if kind == "resnet50":
        fmodel, desc = resnet50_float(log)
        fmodel_path = CACHE / f"resnet50_float_onnx{onnx.__version__}.onnx"
        ncal = args.calib or 4
    else:
        widths = [1024, 1024, 1024, 512, 10] if quick else [4096, 4096, 2048, 10]
        fmodel, desc = mlp_float(widths)
        ncal = args.calib or 64
    build_s = time.perf_counter() - t0
    calib = calibration_data(fmodel, ncal)
    log(f"  quantizing with QuantizePass on {ncal} random samples ...")
    if args.apply_model and fmodel_path is None:
        CACHE.mkdir(exist_ok=True)
        fmodel_path = CACHE / "mlp_float.onnx"
        onnx.save(fmodel, str(fmodel_path))
    qmodel, float_weights, quant_s = quantized(fmodel, calib)
    del fmodel
    weights = qdq_weights(qmodel)
    n = sum(w.size for w in weights)

    log(f"fault map: uniform {RATE}, {n:,} words ...")
    t0 = time.perf_counter()
    fm = generate_uniform(n, RATE, FAULT_SEED, {"chip_id": "bench"})
    gen_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-fm-") as tmp:
        write_faultmap(fm, Path(tmp) / "chip.bin")
        t0 = time.perf_counter()
        fm = read_faultmap(Path(tmp) / "chip.bin")
        read_s = time.perf_counter() - t0
        hfm1_bytes = (Path(tmp) / "chip.bin").stat().st_size

    log("remap timings ...")
    remap = bench_remap(qmodel, float_weights, fm, repeats, check_n, baseline, log)

    faqpass = None
    if not args.no_faqpass:
        configs = [
            ("compensation + bias correction", True, True, None),
            ("  same, BLAS limited to 1 thread", True, True, 1),
            ("bias correction only", False, True, None),
            ("plain FAQ (no calibration)", False, False, None),
        ]
        if args.no_blas1:
            configs.pop(1)
        # The compensated run is timed under cProfile (its time is in a few large numpy calls,
        # so the profiler's overhead is negligible) unless --no-profile.
        faqpass = bench_faqpass(qmodel, float_weights, fm, calib, configs, not args.no_profile, log)

    apply_big = bench_apply_big(fmodel_path, calib, fm, log) if args.apply_model else None
    apply_rec = None if args.no_apply else bench_apply_samples(log)

    result = {
        "benchmark": "faq",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "command": "python bench/bench_faq.py" + (" --quick" if quick else "") + (f" --model {args.model}" if args.model else ""),
        "machine": {
            "nproc": os.cpu_count(),
            "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu": cpu_model(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "git": git_rev(),
            "faq_table_block": getattr(faq_table, "_BLOCK", None),
        },
        "model": {
            "kind": kind,
            "description": desc,
            "int8_tensors": len(weights),
            "weights": n,
            "float_build_s": build_s,
            "quantize_s": quant_s,
            "calib_samples": ncal,
        },
        "faultmap": {
            "generator": "harden.faultmap.generate_uniform",
            "rate": RATE,
            "seed": FAULT_SEED,
            "num_words": fm.num_words,
            "num_records": fm.num_records,
            "measured_rate": fm.rate,
            "generate_s": gen_s,
            "hfm1_bytes": hfm1_bytes,
            "read_hfm1_s": read_s,
        },
        "remap": remap,
        "faqpass": faqpass,
        "apply_model": apply_big,
        "apply_samples": apply_rec,
        "seconds": None,
    }
    result["seconds"] = time.perf_counter() - started
    print_report(result)
    for row in faqpass or []:
        if row.get("profile_text"):
            print(f"cProfile, {row['config']}:\n{row['profile_text']}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}  ({result['seconds']:.1f} s in all)")
    ok = remap["exactness"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
