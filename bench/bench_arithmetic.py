"""The cost of the chip's arithmetic (QDQ unfused) against onnxruntime's fused int8 path.

    python bench/bench_arithmetic.py              # samples model + ResNet-50 (about 3 min)
    python bench/bench_arithmetic.py --quick      # samples model only (about 30 s)

For each model, interleaved over rounds (best round kept), one clean pass over the data on:
  const-fused   an ordinary session, default options (fused QLinearConv / QGemm: host dependent)
  const-exact   an ordinary session in harden's arithmetic (session.disable_quant_qdq=1)
  feed-fused    the campaign's session (int8 weights and int32 biases fed as inputs), fused
  feed-exact    the campaign's session in harden's arithmetic (what every harden figure uses)
and, on the samples model, `harden apply` end to end (default options) both ways. The ratios
exact / fused are the cost of being right on any host. Writes bench/results/arithmetic.json.
A benchmark, not a test: figures depend on the machine and its load (both recorded).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from bench_faq import calibration_data, cpu_model, git_rev, loadavg, quantized, resnet50_float  # noqa: E402

from harden import arithmetic  # noqa: E402
from harden.data import Dataset, load_npz  # noqa: E402
from harden.model import load_model  # noqa: E402
from harden.model import prepare  # noqa: E402
from harden.pipeline import ApplyOptions, apply  # noqa: E402
from harden.runtime import batch_size_for, run_batched, session  # noqa: E402
from harden.simulate import weights_as_inputs  # noqa: E402
from harden.model import get_initializer, qdq_weights  # noqa: E402

RESULTS = HERE / "results"


class fused_path:
    """Within this block harden's sessions use onnxruntime's fused kernels (for comparison only)."""

    def __enter__(self):
        self.saved = dict(arithmetic.EXACT_SESSION_CONFIG)
        arithmetic.EXACT_SESSION_CONFIG.clear()

    def __exit__(self, *exc):
        arithmetic.EXACT_SESSION_CONFIG.update(self.saved)


def _sessions(qmodel: onnx.ModelProto):
    names = [w.name for w in qdq_weights(qmodel)] + [w.bias for w in qdq_weights(qmodel) if w.bias]
    feeds = {n: get_initializer(qmodel, n) for n in names}
    fed = weights_as_inputs(qmodel, names)
    out = {}
    for label, model, extra in (("const", qmodel, None), ("feed", fed, feeds)):
        out[f"{label}-exact"] = (session(model), extra)
        with fused_path():
            out[f"{label}-fused"] = (session(model), extra)
    return out


def bench_passes(qmodel: onnx.ModelProto, data: Dataset, batch: int, rounds: int) -> dict:
    sessions = _sessions(qmodel)
    best = {k: float("inf") for k in sessions}
    for _ in range(rounds):
        for key, (sess, extra) in sessions.items():
            t0 = time.perf_counter()
            run_batched(sess, data, batch, [sess.get_outputs()[0].name], extra)
            best[key] = min(best[key], time.perf_counter() - t0)
    row = {k: round(v * 1000, 2) for k, v in best.items()}
    row["const exact/fused"] = round(best["const-exact"] / best["const-fused"], 2)
    row["feed exact/fused"] = round(best["feed-exact"] / best["feed-fused"], 2)
    row["feed-exact/const-exact"] = round(best["feed-exact"] / best["const-exact"], 2)
    return row


def bench_apply_samples() -> dict:
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("exact", "fused", "exact2"):
            def run():
                t0 = time.perf_counter()
                res = apply(ROOT / "samples/model.onnx", ROOT / "samples/chip.bin", ROOT / "samples/calib.npz",
                            Path(tmp) / f"{label}.onnx", eval_data_path=ROOT / "samples/test.npz", options=ApplyOptions())
                return time.perf_counter() - t0, res.report["results"]["accuracy"]
            if label == "fused":
                with fused_path():
                    times[label] = run()
            else:
                times[label] = run()
    exact = min(times["exact"][0], times["exact2"][0])
    return {"exact_s": round(exact, 2), "fused_s": round(times["fused"][0], 2),
            "exact/fused": round(exact / times["fused"][0], 2),
            "accuracy_exact": times["exact"][1], "accuracy_fused_this_host": times["fused"][1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the samples model only")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    m = load_model(ROOT / "samples/model.onnx")
    calib = load_npz(ROOT / "samples/calib.npz", m, role="calibration data")
    test = load_npz(ROOT / "samples/test.npz", m, role="evaluation data")
    q, _, _ = quantized(prepare(m)[0], calib)
    log("samples model ...")
    rows.append({"model": "samples residual digits CNN (9,520 weights), 341 images 8x8, batch 256",
                 **bench_passes(q, test, 256, args.rounds)})
    if not args.quick:
        log("ResNet-50 ...")
        fmodel, desc = resnet50_float(log)
        data = calibration_data(fmodel, 8)
        q50, _, _ = quantized(fmodel, calibration_data(fmodel, 4, seed=1))
        rows.append({"model": desc.split(" (")[0] + " (25.5 M weights), 8 images 224x224, batch 1 (fixed)",
                     **bench_passes(q50, data, batch_size_for(q50, 8), max(2, args.rounds // 2))})
    log("apply on the samples, both ways ...")
    apply_row = bench_apply_samples()
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "host": arithmetic.host_features(), "loadavg": loadavg(), "git": git_rev(),
        "passes_ms": rows, "apply_samples": apply_row,
    }
    keys = ["const-fused", "const-exact", "feed-fused", "feed-exact", "const exact/fused", "feed exact/fused"]
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    print(f"apply on the samples (defaults): exact {apply_row['exact_s']} s, fused {apply_row['fused_s']} s, "
          f"ratio {apply_row['exact/fused']}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("arithmetic.quick.json" if args.quick else "arithmetic.json")).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
