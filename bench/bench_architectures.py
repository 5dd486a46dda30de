"""Recovery on the architectures users deploy (issue 11), with and without sequential compensation.

    python bench/bench_architectures.py [--chips 3] [--rates 0.04,0.15] [--kinds vit,mobilenetv2,bert,residual]

Trains (or reuses, with HARDEN_ZOO_DIR) the test zoo's ViT, MobileNetV2, BERT-style and residual
digits models, calibrates on the calibration split (256 samples) and scores on the held-out test
split (341) with the chip's exact int8 arithmetic. Per rate, uniform stuck-at chips (seeds 100..)
are hardened with the defaults (sequential compensation) and with --no-sequential. Recovery =
(hardened - int8 on chip) / (int8 - int8 on chip) of the means over the chips; "gap" = int8 -
hardened, in points. Writes bench/results/architectures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import zoo  # noqa: E402

from harden.data import Dataset  # noqa: E402
from harden.faultmap import generate_uniform  # noqa: E402
from harden.model import load_model  # noqa: E402
from harden.options import ApplyOptions  # noqa: E402
from harden.pipeline import Shared, build_shared, harden_for_chip  # noqa: E402


def shared_models(kinds: str) -> Iterator[tuple[str, Shared]]:
    """(kind, the chip-independent work) for each comma-separated kind: the zoo's model (trained,
    or reused from HARDEN_ZOO_DIR), calibrated on the calibration split, scored on the test split."""
    zoo_dir = Path(os.environ.get("HARDEN_ZOO_DIR") or tempfile.mkdtemp(prefix="harden-zoo-"))
    d = zoo.digits_splits()
    for kind in kinds.split(","):
        arch = kind in zoo.ARCHITECTURES
        model = zoo.train_arch(kind, zoo_dir) if arch else zoo.train_digits_cnn(kind, zoo_dir)
        x = (lambda s: zoo.arch_inputs(kind, d["x_" + s])) if arch else (lambda s: np.array(d["x_" + s]))
        calib = Dataset({"input": x("calib")}, np.array(d["y_calib"]))
        evald = Dataset({"input": x("test")}, np.array(d["y_test"]))
        yield kind, build_shared(load_model(model), calib, evald, ApplyOptions(trials=0, clip=False), lambda s: None)


def chip_figures(shared: Shared, rate: float, opts: ApplyOptions, chips: int) -> dict:
    """Hardened with `opts` for `chips` uniform stuck-at chips (seeds 100..): the mean
    accuracies, recovery = (hardened - int8 on chip) / (int8 - int8 on chip), the gap int8 -
    hardened in points, and seconds per chip."""
    acc, t0 = [], time.perf_counter()
    for seed in range(100, 100 + chips):
        acc.append(harden_for_chip(shared, generate_uniform(shared.num_words, rate, seed), opts, host_check=False)[2]["accuracy"])
    secs = (time.perf_counter() - t0) / chips
    int8, chip, hard = (float(np.mean([a[k] for a in acc])) for k in ("int8", "int8_on_chip", "hardened_on_chip"))
    return {"chips": chips, "int8": round(int8, 4), "int8_on_chip": round(chip, 4), "hardened_on_chip": round(hard, 4),
            "recovery": round((hard - chip) / (int8 - chip), 4), "gap_points": round(100 * (int8 - hard), 2),
            "seconds_per_chip": round(secs, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=3)
    ap.add_argument("--rates", default="0.04,0.15")
    ap.add_argument("--kinds", default="vit,mobilenetv2,bert,residual")
    args = ap.parse_args()
    rows = []
    for kind, shared in shared_models(args.kinds):
        for rate in (float(r) for r in args.rates.split(",")):
            for sequential in (True, False):
                opts = ApplyOptions(trials=0, clip=False, sequential=sequential)
                row = {"model": kind, "weights": shared.num_words, "rate": rate, "sequential": sequential,
                       **chip_figures(shared, rate, opts, args.chips)}
                rows.append(row)
                print(f"{kind:12s} rate {rate:<5} {'sequential' if sequential else 'joint':10s} int8 {row['int8']:.2%} "
                      f"on chip {row['int8_on_chip']:.2%} hardened {row['hardened_on_chip']:.2%} recovery {row['recovery']:.1%} "
                      f"gap {row['gap_points']:+.2f} pts  {row['seconds_per_chip']:.1f} s/chip", flush=True)
    out = ROOT / "bench" / "results" / "architectures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
