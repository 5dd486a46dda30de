"""ProAct thresholds vs calibrated ones, and variability-aware vs plain fine-tuning.

    python bench/bench_train.py                 # both, about 3 minutes on 2 busy cores
    python bench/bench_train.py --only proact   # or --only variability

ProAct (results/proact.json): the residual and plain digits CNNs (tests/zoo.py, in bench/.cache),
clip pass (zero style) with thresholds calibrated at percentiles 100 / 99.99 / 99.9 (the
candidates of harden's clip search), and the percentile-100 thresholds after ProAct (defaults
of --clip-train, training seeds 0 and 1); each quantized by onnxruntime, then 300 trials each
of int8 weight bit flips at BER 1e-2 and 1e-3 and int32 bias bit flips at BER 1e-3 (campaign
seed 0), mean accuracy with Student-t 95 % intervals, and the clean int8 accuracy.

Variability (results/variability.json): the residual CNN, clip pass, then no fine-tune / a plain
fine-tune (no noise) / the variability-aware fine-tune at the --variability defaults (10 epochs,
lr 5e-4) with training sigmas equal to the simulated ones / the same with --saq; 100 simulated
analog chips (`variability:SIGMA_CHIP,SIGMA_CELL`, harden/faults/variability.py, onnxruntime)
at (0.05, 0.15) and (0.1, 0.3).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import zoo  # noqa: E402
from harden.campaign import Campaign, CampaignOptions  # noqa: E402
from harden.data import Dataset  # noqa: E402
from harden.faults import parse_fault_spec  # noqa: E402
from harden.passes import PassContext, run_passes  # noqa: E402
from harden.passes.clip import ClipPass  # noqa: E402
from harden.passes.proact import ProActPass  # noqa: E402
from harden.passes.quantize import QuantizePass  # noqa: E402
from harden.model import prepare  # noqa: E402
from harden.train.proact import ProActConfig  # noqa: E402
from harden.train.saq import SAQConfig, fine_tune  # noqa: E402
from harden.train.variability import lognormal_noise  # noqa: E402

RESULTS = HERE / "results"
CACHE = HERE / ".cache"


def ds(d, split):
    return Dataset({"input": np.array(d[f"x_{split}"])}, np.array(d[f"y_{split}"]))


def campaign(q, d, spec: str, trials: int) -> dict:
    camp = Campaign(q, ds(d, "test"), parse_fault_spec(spec), seed=0)
    res = camp.run(CampaignOptions(trials=trials, seed=0))
    a = camp.point_record(res.points[0], res.options)["accuracy"]
    return {"clean": round(camp.clean_accuracy, 6), "mean": a["mean"], "ci95": a["ci95"]}


def fmt(r: dict) -> str:
    return f"{100 * r['mean']:5.1f} [{100 * r['ci95'][0]:5.1f}, {100 * r['ci95'][1]:5.1f}]"


def proact(trials: int) -> list[dict]:
    d = zoo.digits_splits()
    rows = []
    for kind in ("residual", "plain"):
        src = zoo.train_digits_cnn(kind, CACHE)
        variants = [(f"calibrated p{p}", p, None) for p in (100.0, 99.99, 99.9)] + [(f"proact seed {s}", 100.0, s) for s in (0, 1)]
        for label, pct, seed in variants:
            model, _ = prepare(onnx.load(str(src)))
            ctx = PassContext(calib=ds(d, "calib"))
            model = ClipPass("zero", pct).call(model, ctx).model
            extra = {}
            if seed is not None:
                res = ProActPass(ProActConfig(seed=seed), ds(d, "train")).call(model, ctx)
                model = res.model
                extra = {"threshold_ratio": [l["ratio"] for l in res.record["layers"]], "accepted": res.record["accepted"],
                         "seconds": res.record["seconds"]}
            q, _ = run_passes(model, [QuantizePass()], ctx)
            r = {"model": kind, "variant": label, **extra}
            for spec in ("bitflip:1e-2", "bitflip:1e-3", "bitflip-bias:1e-3"):
                r[spec] = campaign(q, d, spec, trials)
            r["clean"] = r["bitflip:1e-2"]["clean"]
            rows.append(r)
            print(f"{kind:9s} {label:16s} clean {100 * r['clean']:6.2f}  w 1e-2 {fmt(r['bitflip:1e-2'])}  w 1e-3 {fmt(r['bitflip:1e-3'])}"
                  f"  bias 1e-3 {fmt(r['bitflip-bias:1e-3'])}  {extra.get('threshold_ratio', '')}", flush=True)
    return rows


def variability(trials: int) -> list[dict]:
    d = zoo.digits_splits()
    src = zoo.train_digits_cnn("residual", CACHE)
    rows = []
    for sim in ((0.05, 0.15), (0.1, 0.3)):
        variants = [("no fine-tune", None, None), ("plain fine-tune", SAQConfig(epochs=10, lr=5e-4, sam=False), None),
                    ("variability-aware", SAQConfig(epochs=10, lr=5e-4, sam=False), sim),
                    ("variability-aware seed 1", SAQConfig(epochs=10, lr=5e-4, sam=False, seed=1), sim),
                    ("variability-aware + saq", SAQConfig(epochs=10, lr=5e-4), sim)]
        for label, cfg, train_sigma in variants:
            model, _ = prepare(onnx.load(str(src)))
            ctx = PassContext(calib=ds(d, "calib"))
            model = ClipPass("zero", 100.0).call(model, ctx).model
            extra = {}
            if cfg is not None:
                r = fine_tune(model, ds(d, "train"), cfg, val=ctx.calib, noise=lognormal_noise(*train_sigma) if train_sigma else None)
                model = r.model
                extra = {"kept_epoch": r.record["kept_epoch"], "seconds_per_epoch": r.record["seconds_per_epoch"]}
            q, _ = run_passes(model, [QuantizePass()], ctx)
            res = campaign(q, d, f"variability:{sim[0]},{sim[1]}", trials)
            row = {"simulated": list(sim), "variant": label, "trained_sigma": list(train_sigma) if train_sigma else None, **res, **extra}
            rows.append(row)
            print(f"sim {sim}  {label:26s} clean {100 * res['clean']:6.2f}  analog {fmt(res)}  {extra}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["proact", "variability"])
    ap.add_argument("--trials", type=int, default=None, help="default: 300 (proact), 100 (variability)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    CACHE.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    for what, fn, trials in (("proact", proact, 300), ("variability", variability, 100)):
        if args.only and args.only != what:
            continue
        t0 = time.perf_counter()
        rows = fn(args.trials or trials)
        meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
                            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": 1},
                "trials": args.trials or trials, "seconds": round(time.perf_counter() - t0, 1)}
        (RESULTS / f"{what}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
