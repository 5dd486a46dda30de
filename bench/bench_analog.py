"""Self-tuning under analog PIM variability: untuned vs tuned accuracy over simulated chips.

    python bench/bench_analog.py [--chips 50] [--probe 32] [--seed 0]

Trains (or reuses, with HARDEN_ZOO_DIR) the test suite's plain and residual digits CNNs,
quantizes them with harden's QuantizePass (calibrated on the 256 calibration images), and for
each (sigma_chip, sigma_cell) draws `--chips` chips (trials 0..chips-1 of point 0 under
`--seed`, the chips of `harden tune --seed SEED --chip K`). On every chip it tunes the model
from the first `--probe` calibration images (one gain per channel, and one per layer) and scores
the untuned and the tuned model on the 341 test images. Figures: mean accuracy with Student-t
95 % intervals over the chips, and the paired gain (tuned - untuned) with its interval.
Also measures the clean gap between the analog (float-weight) session and the fused int8
session. Writes bench/results/analog.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zoo  # noqa: E402

from harden.data import load_npz  # noqa: E402
from harden.faults.variability import AnalogEvaluator  # noqa: E402
from harden.model import load_model, save_model  # noqa: E402
from harden.passes import PassContext, run_passes  # noqa: E402
from harden.passes.quantize import QuantizePass  # noqa: E402
from harden.model import prepare  # noqa: E402
from harden.simulate import ChipEvaluator, Reference  # noqa: E402
from harden.tune import compare_tuning  # noqa: E402

SIGMAS = [(0.1, 0.0), (0.2, 0.0), (0.3, 0.0), (0.1, 0.02), (0.2, 0.02), (0.3, 0.02), (0.1, 0.05), (0.2, 0.05),
          (0.3, 0.05), (0.0, 0.05)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=50)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "analog.json"))
    args = ap.parse_args()
    zoo_dir = Path(os.environ.get("HARDEN_ZOO_DIR") or tempfile.mkdtemp(prefix="harden-zoo-"))
    d = zoo.digits_splits()
    calib = zoo.write_npz(zoo_dir / "digits_calib.npz", d["x_calib"], d["y_calib"])
    test_path = zoo.write_npz(zoo_dir / "digits_test.npz", d["x_test"], d["y_test"])
    out = {"chips": args.chips, "probe": args.probe, "seed": args.seed, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("plain", "residual"):
            model = load_model(zoo.train_digits_cnn(kind, zoo_dir))
            model, _ = prepare(model)
            model, _ = run_passes(model, [QuantizePass()], PassContext(calib=load_npz(calib, model)))
            save_model(model, Path(tmp) / f"{kind}.int8.onnx")
            test = load_npz(test_path, model)
            probe = load_npz(calib, model).take(args.probe)
            ev, pev = AnalogEvaluator(model, test), AnalogEvaluator(model, probe)
            fused = ChipEvaluator(model, test, Reference(test.labels, "labels"))
            rec = {"fused_int8_accuracy": round(fused.evaluate(), 6), "analog_vs_fused": ev.compare_fused(fused.logits()),
                   "points": []}
            print(f"{kind}: fused int8 {100 * rec['fused_int8_accuracy']:.2f}%, analog session vs fused: "
                  f"{rec['analog_vs_fused']}")
            print(f"  {'sigma_chip':>10} {'sigma_cell':>10}  {'per':<7} {'untuned':>22} {'tuned':>22} {'gain':>24}")
            for sc, sl in SIGMAS:
                for gran in ("channel", "layer"):
                    t0 = time.perf_counter()
                    s = compare_tuning(model, probe, test, sc, sl, args.chips, seed=args.seed, granularity=gran,
                                       evaluator=ev, probe_evaluator=pev).summary()
                    s["seconds"] = round(time.perf_counter() - t0, 2)
                    rec["points"].append(s)

                    def f(x):
                        lo, hi = x["ci"]
                        return f"{100 * x['mean']:6.2f} [{100 * lo:6.2f},{100 * hi:6.2f}]"

                    print(f"  {sc:>10g} {sl:>10g}  {gran:<7} {f(s['untuned']):>22} {f(s['tuned']):>22} "
                          f"{100 * s['gain']['mean']:+7.2f} [{100 * s['gain']['ci'][0]:+.2f},{100 * s['gain']['ci'][1]:+.2f}]",
                          flush=True)
            out["models"][kind] = rec
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
