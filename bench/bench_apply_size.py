"""`harden apply` with its defaults at real size: wall time, each pass's time, peak RSS (issue 12).

    python bench/bench_apply_size.py                 # ResNet-50 and the zoo's MobileNetV2
    python bench/bench_apply_size.py --only mobilenetv2

Models:
  resnet50     the onnx model-zoo graph light_resnet50 with per-layer LeCun weights (bench_faq's
               `resnet50_float`, 25.5 M weights, 224x224, batch 1), 32 random-normal images as
               --data (no labels: scored as agreement with the float model's top-1, on the 8
               images apply holds out);
  mobilenetv2  tests/zoo.py's MobileNetV2 (depthwise, inverted residuals, ReLU6), the 1,200-image
               training split as --data (labels; 300 held out for scoring).
Each runs `python -m harden apply MODEL --faultmap CHIP --data DATA --report R` in a subprocess
(a uniform 0.04-rate chip, seed 1), with the defaults: clip search, quantize, FAQ with sequential
compensation, the resilience campaign under the default --budget. Peak RSS is the child's
ru_maxrss. Writes bench/results/apply_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_faq import calibration_data, cpu_model, resnet50_float  # noqa: E402

from harden.faultmap import generate_uniform, write_faultmap  # noqa: E402
from harden.memory import weight_count  # noqa: E402


def _inputs(name: str, tmp: Path) -> tuple[Path, Path]:
    if name == "resnet50":
        model, _ = resnet50_float(print)
        path = tmp / "resnet50.onnx"
        onnx.save(model, str(path))
        data = calibration_data(model, 32)
        np.savez(tmp / "resnet50.npz", **data.inputs)
        return path, tmp / "resnet50.npz"
    import zoo

    zoo_dir = Path(os.environ.get("HARDEN_ZOO_DIR") or tmp)
    d = zoo.digits_splits()
    path = zoo.train_arch(name, zoo_dir)
    return path, zoo.write_npz(tmp / f"{name}.npz", zoo.arch_inputs(name, d["x_train"]), d["y_train"])


def run(name: str, tmp: Path) -> dict:
    model, data = _inputs(name, tmp)
    chip = tmp / f"{name}.chip.bin"
    write_faultmap(generate_uniform(weight_count(model), 0.04, 1), chip)
    report = tmp / f"{name}.report.json"
    cmd = [sys.executable, "-m", "harden", "apply", str(model), "--faultmap", str(chip), "--data", str(data),
           "-o", str(tmp / f"{name}.hardened.onnx"), "--report", str(report), "--progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB; the largest child so far
    if proc.returncode != 0:
        raise SystemExit(f"{name}: apply failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rep = json.loads(report.read_text())
    passes = {p["pass"]: p.get("seconds") for p in rep["passes"]}
    res = rep["results"]
    row = {
        "model": name, "weights": weight_count(model), "model_mb": round(model.stat().st_size / 2**20, 1),
        "wall_seconds": round(wall, 1), "passes": passes, "peak_rss_mb": round(max(peak, before) / 1024, 1),
        # issue 12's memory target is a multiple of the model's own size
        "peak_over_model": round(max(peak, before) / 1024 / max(model.stat().st_size / 2**20, 1e-9), 1),
        "accuracy": res["accuracy"], "trials": (res.get("resilience") or {}).get("trials"),
        "budget": (res.get("resilience") or {}).get("budget"),
    }
    print(f"{name}: {wall:.1f} s, peak RSS {row['peak_rss_mb']} MB (model {row['model_mb']} MB, x{row['peak_over_model']}); "
          + ", ".join(f"{k} {v:.1f}s" for k, v in passes.items() if v is not None), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["resnet50", "mobilenetv2"])
    args = ap.parse_args()
    names = [args.only] if args.only else ["mobilenetv2", "resnet50"]
    with tempfile.TemporaryDirectory(prefix="harden-bench-") as tmp:
        rows = [run(n, Path(tmp)) for n in names]
    out = ROOT / "bench" / "results" / "apply_size.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
