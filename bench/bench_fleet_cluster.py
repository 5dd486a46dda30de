"""A fleet on a local Dask cluster: per-chip marginal cost and the driver's peak memory.

    python bench/bench_fleet_cluster.py                 # 100 and 1,000 chips (about 3 min)
    python bench/bench_fleet_cluster.py --sizes 50 200

Model and data: the bundled samples. Chips: uniform stuck-at maps at rate 0.04. One run:
  1. a single `harden apply` with its defaults (campaign included): the unit of cost;
  2. for each fleet size, in a fresh driver process, `apply_fleet(..., cluster="local")` (a
     LocalCluster, one single-threaded worker per core): the chips' phase time / chips is the
     marginal cost per chip; the driver's peak RSS (getrusage) must not grow with the size.
Targets (issue 13): marginal per chip <= 2 % of a single apply; driver peak memory flat
(largest / smallest size <= 1.25). Writes bench/results/fleet_cluster.json; exits 1 on a miss.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
S = ROOT / "samples"
sys.path.insert(0, str(HERE))

from bench_faq import cpu_model, git_rev, loadavg  # noqa: E402

from harden.faultmap import generate_uniform, write_faultmap  # noqa: E402
from harden.memory import weight_count  # noqa: E402
from harden.pipeline import apply  # noqa: E402


def run_fleet(maps: Path, n: int, out: Path) -> dict:
    """In this (fresh) process: the fleet of the first n maps on a local cluster."""
    from harden.fleet import apply_fleet

    paths = sorted(maps.iterdir())[:n]
    t0 = time.perf_counter()
    rep = apply_fleet(S / "model.onnx", paths, S / "calib.npz", out, eval_data_path=S / "test.npz", cluster="local")
    return {"chips": n, "seconds": round(time.perf_counter() - t0, 3), "shared_s": rep["timings"]["shared"],
            "chips_s": rep["timings"]["chips"], "per_chip_s": round(rep["timings"]["chips"] / n, 5),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "hardened_mean": rep["fleet"]["hardened_on_chip"]["mean"], "written": len(list(out.glob("*.onnx")))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--run", type=int, help=argparse.SUPPRESS)  # internal: one fleet in this process
    ap.add_argument("--maps", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:
        print(json.dumps(run_fleet(args.maps, args.run, args.out)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        maps = Path(tmp) / "maps"
        maps.mkdir()
        words = weight_count(S / "model.onnx")
        for seed in range(1, max(args.sizes) + 1):
            write_faultmap(generate_uniform(words, 0.04, seed, {"chip_id": f"chip-{seed:04d}"}), maps / f"c{seed:04d}.bin")
        t0 = time.perf_counter()
        apply(S / "model.onnx", maps / "c0001.bin", S / "calib.npz", Path(tmp) / "one.onnx", eval_data_path=S / "test.npz")
        single = time.perf_counter() - t0
        rows = []
        for n in args.sizes:
            out = Path(tmp) / f"out{n}"
            proc = subprocess.run([sys.executable, __file__, "--run", str(n), "--maps", str(maps), "--out", str(out)],
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["marginal_vs_single"] = round(row["per_chip_s"] / single, 4)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    rss = [r["driver_peak_rss_mb"] for r in rows]
    result = {
        "cpu": cpu_model(), "nproc": os.cpu_count(), "loadavg": loadavg(), "git": git_rev(),
        "single_apply_s": round(single, 3), "fleets": rows,
        "targets": {"marginal_vs_single": 0.02, "rss_growth": 1.25},
        "rss_growth": round(max(rss) / min(rss), 3),
    }
    ok = all(r["marginal_vs_single"] <= 0.02 for r in rows) and result["rss_growth"] <= 1.25
    result["targets_met"] = ok
    print("| chips | fleet s | shared s | per chip s | per chip / single apply | driver peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chips']} | {r['seconds']} | {r['shared_s']} | {r['per_chip_s']} | {100 * r['marginal_vs_single']:.2f} % "
              f"| {r['driver_peak_rss_mb']} |")
    print(f"single apply {single:.2f} s; driver peak RSS growth {result['rss_growth']}x; targets met: {ok}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "fleet_cluster.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
