"""Per-chip marginal cost of a fleet against a single apply (issue 5: at most 10 %).

    python bench/bench_fleet.py [--chips 100] [--jobs N]

Model and data: the bundled samples. Chips: uniform stuck-at maps at rate 0.04 (seeds 1..N).
One run measures (a) a single `harden apply` (the default pipeline, campaign included) and
(b) `apply_fleet` on N chips; the marginal cost per chip is (fleet time - shared time) / N,
where the shared time is the fleet's own chip-independent part. Writes bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from harden.faultmap import generate_uniform, write_faultmap
from harden.fleet import apply_fleet
from harden.memory import weight_count
from harden.pipeline import apply

ROOT = Path(__file__).resolve().parents[1]
S = ROOT / "samples"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args()
    n = weight_count(S / "model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        chips = Path(tmp) / "chips"
        chips.mkdir()
        for seed in range(1, args.chips + 1):
            write_faultmap(generate_uniform(n, 0.04, seed, {"chip_id": f"chip-{seed:03d}"}), chips / f"c{seed:03d}.bin")
        t0 = time.perf_counter()
        apply(S / "model.onnx", chips / "c001.bin", S / "calib.npz", Path(tmp) / "one.onnx", eval_data_path=S / "test.npz")
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = apply_fleet(S / "model.onnx", [chips], S / "calib.npz", Path(tmp) / "out", eval_data_path=S / "test.npz", jobs=args.jobs)
        fleet = time.perf_counter() - t0
    per_chip = rep["timings"]["chips"] / args.chips
    row = {
        "chips": args.chips, "jobs": rep["options"]["jobs"], "nproc": os.cpu_count(),
        "single_apply_s": round(single, 3), "fleet_s": round(fleet, 3), "fleet_shared_s": rep["timings"]["shared"],
        "marginal_per_chip_s": round(per_chip, 4), "marginal_vs_single": round(per_chip / single, 4),
        "target": 0.10, "target_met": per_chip / single <= 0.10,
        "hardened_mean": rep["fleet"]["hardened_on_chip"]["mean"], "int8_on_chip_mean": rep["fleet"]["int8_on_chip"]["mean"],
        "yield_hardened": rep["fleet"]["hardened_on_chip"]["yield"], "yield_int8": rep["fleet"]["int8_on_chip"]["yield"],
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(row, indent=1))
    out = ROOT / "bench" / "results" / "fleet.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
