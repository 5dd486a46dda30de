"""What the output bound saves a bitflip-fp32 point: the same point with and without it.

    python bench/bench_bound.py                      # residual digits CNN, bitflip-fp32:1e-5
    python bench/bench_bound.py --model M.onnx --data D.npz --fault bitflip-fp32:1e-6 [--trials 200] [--rounds 7]

Runs `harden.campaign.simulate` on one float model and point, alternating HARDEN_CERTIFY=1 and
=0 in one process (the machine's load hits both alike); the first round warms up and is not
counted. Checks that both give the same per-trial figures, and reports the point's seconds per
trial (its session and bound are built off the clock; the bound's set-up is printed), the
certified trials and the median of the rounds' time ratios. Writes bench/results/bound.json
(or --out). Without --model, trains the test suite's residual digits CNN (tests/zoo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from harden.campaign import CampaignOptions, simulate  # noqa: E402


def _residual(tmp: Path) -> tuple[Path, Path]:
    from bench_pytorchfi import residual_network  # the same network as the PyTorchFI bench

    return residual_network(tmp)[3:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--fault", default="bitflip-fp32:1e-5")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bound.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, data = (Path(args.model), Path(args.data)) if args.model else _residual(Path(tmp))
        times: dict[str, list[float]] = {"1": [], "0": []}
        for r in range(args.rounds + 1):
            points = {}
            for flag in ("1", "0"):
                os.environ["HARDEN_CERTIFY"] = flag
                rep = simulate(model, data, [args.fault], options=CampaignOptions(trials=args.trials, seed=0)).report
                points[flag] = (rep["points"][0], rep["fp32"]["bound"])
                if r:
                    times[flag].append(points[flag][0]["seconds"] / points[flag][0]["trials"])
            os.environ.pop("HARDEN_CERTIFY", None)
            assert points["1"][0]["per_trial"] == points["0"][0]["per_trial"]  # the bound changes the cost, never a figure
    on, off = np.array(times["1"]), np.array(times["0"])
    point, bound = points["1"]
    row = {
        "model": str(args.model or "residual digits CNN (tests/zoo.py), 341 test digits"), "fault": args.fault,
        "trials": args.trials, "rounds": args.rounds, "bound": bound,
        "certified_trials": point["certified_trials"], "accuracy": point["accuracy"]["mean"],
        "ms_per_trial_with_bound": [round(1e3 * t, 2) for t in on],
        "ms_per_trial_without_bound": [round(1e3 * t, 2) for t in off],
        "time_ratio_median": round(float(np.median(on / off)), 3),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(row, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
