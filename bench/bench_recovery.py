"""Accuracy recovered by apply on trained digits CNNs, per fault rate, FAQ alone vs full.

    python bench/bench_recovery.py [--chips 5] [--rates 0.04,0.08,0.15]

Trains (or reuses, with HARDEN_ZOO_DIR) the test suite's plain and residual digits CNNs,
generates uniform stuck-at chips, and runs harden.pipeline.apply with FAQ alone, with error
feedback on the plain model's statistics (--no-sequential) and with sequential compensation
(the default). Recovery = (hardened on chip - int8 on chip) / (int8 - int8 on chip), averaged as
mean recovered / mean lost over the chips. Writes bench/results/recovery.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zoo  # noqa: E402

from harden.faultmap import generate_uniform, write_faultmap  # noqa: E402
from harden.memory import weight_count  # noqa: E402
from harden.pipeline import ApplyOptions, apply  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=5)
    ap.add_argument("--rates", default="0.04,0.08,0.15")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    zoo_dir = Path(os.environ.get("HARDEN_ZOO_DIR") or tempfile.mkdtemp(prefix="harden-zoo-"))
    d = zoo.digits_splits()
    calib = zoo.write_npz(zoo_dir / "digits_calib.npz", d["x_calib"], d["y_calib"])
    test = zoo.write_npz(zoo_dir / "digits_test.npz", d["x_test"], d["y_test"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("plain", "residual"):
            model = zoo.train_digits_cnn(kind, zoo_dir)
            n = weight_count(model)
            for rate in rates:
                for label, comp, seq in (("faq", False, False), ("faq+feedback", True, False), ("faq+sequential", True, True)):
                    acc, secs = [], []
                    for seed in range(100, 100 + args.chips):
                        chip = Path(tmp) / f"chip{seed}.bin"
                        write_faultmap(generate_uniform(n, rate, seed), chip)
                        t0 = time.perf_counter()
                        r = apply(model, chip, calib, write=False, eval_data_path=test, options=ApplyOptions(compensation=comp, sequential=seq, trials=0, clip_percentile=100.0))
                        secs.append(time.perf_counter() - t0)
                        acc.append(r.report["results"]["accuracy"])
                    i8 = np.mean([a["int8"] for a in acc])
                    plain = np.mean([a["int8_on_chip"] for a in acc])
                    hard = np.mean([a["hardened_on_chip"] for a in acc])
                    row = dict(model=kind, weights=n, rate=rate, method=label, chips=args.chips, int8=i8,
                               int8_on_chip=plain, hardened_on_chip=hard, recovery=(hard - plain) / (i8 - plain),
                               apply_seconds=float(np.mean(secs)))
                    rows.append(row)
                    print(f"{kind:8} rate {rate:.2f} {label:13} int8 {i8:.3f}  on chip {plain:.3f}  hardened {hard:.3f}  "
                          f"recovery {100 * row['recovery']:5.1f}%  ({row['apply_seconds']:.1f}s/apply)", flush=True)
    out = ROOT / "bench" / "results" / "recovery.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"chips": args.chips, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
