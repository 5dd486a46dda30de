"""SAQ: resilience to int8 weight bit flips with and without the fine-tune, its cost per epoch,
and FAQ's cost against one epoch.

    python bench/bench_saq.py                  # about 2 minutes on 2 busy cores
    python bench/bench_saq.py --search         # also the settings search of docs/training.md (~6 min)
    python bench/bench_saq.py --stuckat        # only the stuck-at comparison below (~1 min)

Per model (the test zoo's residual and plain digits CNNs and the breast-cancer MLP, trained by
tests/zoo.py into bench/.cache):
  base     prepare -> clip (zero style, percentile 100) -> quantize            (no fine-tune)
  qat      the same with a 5-epoch fine-tune with fake quantization but no SAM step (control:
           is it the SAM step or just more training?)
  saq      the same with the SAQ defaults (harden apply --saq), training seeds 0, 1, 2
each int8 model then gets a campaign of 100 trials of int8 weight bit flips at BER 1e-2 and
1e-3 (harden.campaign, seed 0: the same faulty bit positions for every model) on the test split,
with the mean accuracy and its Student-t 95 % interval, and its clean accuracy.

Cost: seconds per SAQ epoch (1200 training images for the digits models), and the FAQ pass
for a chip at fault rate 0.04 on the same int8 model, both plain FAQ (table + one gather, no
statistics) and harden's default (error feedback and bias correction, which need calibration
statistics), as a fraction of one SAQ epoch.

Stuck-at chips (--stuckat), residual CNN: the same pipeline as `harden apply --clip-percentile
100 [--saq --train-data train.npz]` (harden.pipeline.build_shared: the int8 model is built once
per variant), then for each of --chips simulated chips at fault rate 0.04 (generate_uniform,
seeds 1..N, one 8-bit word per weight) the accuracy on the test split of plain int8 on the chip
(int8_on_chip), of harden's FAQ (error feedback + bias correction, hardened_on_chip) and of
plain FAQ (table only), without SAQ and with SAQ at training seeds 0, 1, 2; mean with its
Student-t 95 % interval, and the per-chip paired difference SAQ - no SAQ with its interval. Also
the campaign engine's random `stuckat:0.04` model (100 trials, seed 0: the same faulty cells for
both models, so also paired) on the two int8 models.

Writes bench/results/saq.json (saq_search.json with --search; saq_stuckat.json with --stuckat,
which runs only that comparison).
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
from harden.faultmap import generate_uniform  # noqa: E402
from harden.faults import parse_fault_spec  # noqa: E402
from harden.model import qdq_weights  # noqa: E402
from harden.passes import PassContext, run_passes  # noqa: E402
from harden.passes.clip import ClipPass  # noqa: E402
from harden.passes.faq import FAQPass  # noqa: E402
from harden.passes.quantize import QuantizePass  # noqa: E402
from harden.model import prepare
from harden.pipeline import ApplyOptions, build_shared, harden_for_chip, reference_evaluator  # noqa: E402
from harden.stats import summarize  # noqa: E402
from harden.train.saq import SAQConfig, fine_tune  # noqa: E402

RESULTS = HERE / "results"
CACHE = HERE / ".cache"

# The settings search of docs/training.md: (label, SAQConfig overrides), residual CNN.
SEARCH = [
    ("qat (no SAM)", {"sam": False}),
    *[(f"sam rho {r}", {"mode": "sam", "rho": r}) for r in (0.01, 0.05, 0.2)],
    *[(f"asam rho {r}", {"rho": r}) for r in (0.25, 0.5, 0.7, 1.0)],
    ("asam rho 0.5 lr 2e-3", {"rho": 0.5, "lr": 2e-3}),
    ("asam rho 0.5 10 epochs", {"rho": 0.5, "epochs": 10}),
    ("asam rho 0.5 kd 0.5", {"rho": 0.5, "kd": 0.5}),
    ("asam rho 0.5 constant lr", {"rho": 0.5, "schedule": "constant"}),
    *[(f"scale rho {r}", {"mode": "scale", "rho": r}) for r in (10, 30, 50, 100)],
]


def models():
    CACHE.mkdir(exist_ok=True)
    d, t = zoo.digits_splits(), zoo.tabular_splits()
    return {
        "residual": (zoo.train_digits_cnn("residual", CACHE), d),
        "plain": (zoo.train_digits_cnn("plain", CACHE), d),
        "mlp": (zoo.train_tabular_mlp(CACHE), t),
    }


def ds(d, split):
    return Dataset({"input": np.array(d[f"x_{split}"])}, np.array(d[f"y_{split}"]))


def build(src, d, cfg: SAQConfig | None):
    """clip -> [fine-tune] -> quantize; returns (int8 model, ctx, fine-tune record or None)."""
    model, _ = prepare(onnx.load(str(src)))
    ctx = PassContext(calib=ds(d, "calib"))
    model = ClipPass("zero", 100.0).call(model, ctx).model
    rec = None
    if cfg is not None:
        r = fine_tune(model, ds(d, "train"), cfg, val=ds(d, "calib"))
        model, rec = r.model, r.record
    q, _ = run_passes(model, [QuantizePass()], ctx)
    return q, ctx, rec


def resilience(q, d, trials: int) -> dict:
    out = {}
    for ber in ("1e-2", "1e-3"):
        camp = Campaign(q, ds(d, "test"), parse_fault_spec(f"bitflip:{ber}"), seed=0)
        res = camp.run(CampaignOptions(trials=trials, seed=0))
        acc = camp.point_record(res.points[0], res.options)["accuracy"]
        out["clean"] = round(camp.clean_accuracy, 6)
        out[f"ber_{ber}"] = {"mean": acc["mean"], "ci95": acc["ci95"]}
    return out


def faq_cost(q, ctx, rounds: int = 3) -> dict:
    """Best-of-rounds seconds of the FAQ pass for a chip at rate 0.04: plain and default."""
    n = sum(w.size for w in qdq_weights(q))
    fm = generate_uniform(n, 0.04, 1)
    out = {}
    for label, kw in (("faq_plain", {"compensate": False, "bias_correction": False}), ("faq_default", {})):
        best = float("inf")
        for _ in range(rounds):
            m = onnx.ModelProto()
            m.CopyFrom(q)
            fresh = PassContext(calib=ctx.calib, float_weights=ctx.float_weights)  # statistics recomputed
            t0 = time.perf_counter()
            FAQPass(fm, **kw).call(m, fresh)
            best = min(best, time.perf_counter() - t0)
        out[label] = round(best, 5)
    return out


STUCKAT_RATE = 0.04
FAQ_VARIANTS = (("int8", None), ("faq", {}), ("faq_plain", {"compensation": False, "bias_correction": False}))


def _ci(values, bounds=(0.0, 1.0)) -> dict:
    s = summarize(values, 0.95, bounds)
    return {"mean": round(s.mean, 6), "ci95": [round(s.low, 6), round(s.high, 6)]}


def shared_int8(src, d, saq_seed: int | None):
    """The chip-independent part of `harden apply --clip-percentile 100 [--saq --train-data ...]`:
    prepare -> clip -> [SAQ at the defaults, training seed saq_seed] -> quantize, and its evaluator."""
    opts = ApplyOptions(clip_percentile=100.0, saq=saq_seed is not None, seed=saq_seed or 0, trials=0)
    shared = build_shared(onnx.load(str(src)), ds(d, "calib"), ds(d, "test"), opts, lambda _m: None,
                          ds(d, "train") if saq_seed is not None else None)
    return shared, opts, reference_evaluator(shared)


def on_chips(shared, opts, evaluator, chips: int, rate: float = STUCKAT_RATE) -> dict[str, np.ndarray]:
    """Per chip (generate_uniform seeds 1..chips): plain int8, harden's FAQ and plain FAQ on it."""
    out = {k: [] for k, _ in FAQ_VARIANTS}
    for seed in range(1, chips + 1):
        fm = generate_uniform(shared.num_words, rate, seed)
        for key, over in FAQ_VARIANTS[1:]:
            _, _, res = harden_for_chip(shared, fm, ApplyOptions(**{**opts.__dict__, **over}), evaluator)
            if key == "faq":
                out["int8"].append(res["accuracy"]["int8_on_chip"])
            out[key].append(res["accuracy"]["hardened_on_chip"])
    return {k: np.array(v) for k, v in out.items()}


def stuckat_campaign(q, d, trials: int, rate: float = STUCKAT_RATE) -> np.ndarray:
    """Per-trial accuracy under the campaign engine's random stuck-at model (seed 0)."""
    camp = Campaign(q, ds(d, "test"), parse_fault_spec(f"stuckat:{rate:g}"), seed=0)
    return camp.run(CampaignOptions(trials=trials, seed=0)).points[0].accuracy


def stuckat_comparison(chips: int, trials: int, saq_seeds=(0, 1, 2)) -> dict:
    """SAQ vs no SAQ on stuck-at chips, with and without FAQ (residual CNN); see the docstring."""
    src, d = models()["residual"]
    rows, base = [], None
    for seed in (None, *saq_seeds):
        t0 = time.perf_counter()
        shared, opts, ev = shared_int8(src, d, seed)
        acc = on_chips(shared, opts, ev, chips)
        camp = stuckat_campaign(shared.plain, d, trials)
        r = {"variant": "no SAQ" if seed is None else f"SAQ seed {seed}", "clean": round(ev.evaluate(), 6),
             **{f"chips_{k}": _ci(v) for k, v in acc.items()}, "campaign_int8": _ci(camp)}
        if seed is None:
            base = (acc, camp)
        else:
            r.update({f"gain_{k}": _ci(v - base[0][k], None) for k, v in acc.items()})
            r["gain_campaign_int8"] = _ci(camp - base[1], None)
        r["per_chip"] = {k: [round(float(a), 6) for a in v] for k, v in acc.items()}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(r)
        print(_stuckat_line(r), flush=True)
    return {"model": "residual", "rate": STUCKAT_RATE, "chips": chips, "chip_seeds": [1, chips], "campaign_trials": trials,
            "rows": rows}


def _fmt(x: dict) -> str:
    return f"{100 * x['mean']:5.1f} [{100 * x['ci95'][0]:5.1f}, {100 * x['ci95'][1]:5.1f}]"


def _stuckat_line(r: dict) -> str:
    line = (f"{r['variant']:11s} clean {100 * r['clean']:6.2f}  chips: int8 {_fmt(r['chips_int8'])}  faq {_fmt(r['chips_faq'])}  "
            f"plain faq {_fmt(r['chips_faq_plain'])}  campaign int8 {_fmt(r['campaign_int8'])}")
    if "gain_int8" in r:
        line += (f"\n{'':11s} gain (SAQ - no SAQ, paired): int8 {_fmt(r['gain_int8'])}  faq {_fmt(r['gain_faq'])}  "
                 f"plain faq {_fmt(r['gain_faq_plain'])}  campaign {_fmt(r['gain_campaign_int8'])}")
    return line


def _meta(args, started) -> dict:
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": 1},
        "trials": args.trials,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--search", action="store_true", help="also run the settings search (residual CNN)")
    ap.add_argument("--stuckat", action="store_true", help="only the stuck-at comparison (SAQ x FAQ on stuck-at chips)")
    ap.add_argument("--chips", type=int, default=100, help="simulated stuck-at chips for --stuckat (seeds 1..N)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.stuckat:
        res = stuckat_comparison(args.chips, args.trials)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "saq_stuckat.json").write_text(json.dumps({**_meta(args, started), "defaults": SAQConfig().__dict__, **res}, indent=1) + "\n")
        return 0
    rows, table = [], []
    for name, (src, d) in models().items():
        variants = [("base", None), ("qat", SAQConfig(sam=False))] + [(f"saq seed {s}", SAQConfig(seed=s)) for s in (0, 1, 2)]
        base_q = base_ctx = None
        for label, cfg in variants:
            q, ctx, rec = build(src, d, cfg)
            if cfg is None:
                base_q, base_ctx = q, ctx
            r = {"model": name, "variant": label, **resilience(q, d, args.trials)}
            if rec is not None:
                r["seconds_per_epoch"] = rec["seconds_per_epoch"]
                r["kept_epoch"] = rec["kept_epoch"]
            rows.append(r)
            print(_line(r), flush=True)
        cost = faq_cost(base_q, base_ctx)
        epoch = float(np.median([r["seconds_per_epoch"] for r in rows if r["model"] == name and "seconds_per_epoch" in r]))
        table.append({"model": name, "train_samples": len(d["x_train"]), "seconds_per_saq_epoch": round(epoch, 4), **cost,
                      "faq_plain_fraction_of_epoch": round(cost["faq_plain"] / epoch, 4),
                      "faq_default_fraction_of_epoch": round(cost["faq_default"] / epoch, 4)})
        print(f"  cost: {table[-1]}", flush=True)
    search = None
    if args.search:
        src, d = models()["residual"]
        search = []
        for label, over in SEARCH:
            for seed in (0, 1):
                q, _, rec = build(src, d, SAQConfig(**{**over, "seed": seed}))
                r = {"setting": label, "seed": seed, **over, **resilience(q, d, args.trials), "kept_epoch": rec["kept_epoch"]}
                search.append(r)
                print(f"  {label:28s} seed {seed}: clean {100 * r['clean']:.2f}  ber 1e-2 {100 * r['ber_1e-2']['mean']:.1f} "
                      f"[{100 * r['ber_1e-2']['ci95'][0]:.1f}, {100 * r['ber_1e-2']['ci95'][1]:.1f}]  kept epoch {r['kept_epoch']}", flush=True)
    meta = _meta(args, started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "saq.json").write_text(json.dumps({**meta, "defaults": SAQConfig().__dict__, "rows": rows, "cost": table}, indent=1) + "\n")
    if search is not None:
        (RESULTS / "saq_search.json").write_text(json.dumps({**meta, "search": search}, indent=1) + "\n")
    return 0


def _line(r: dict) -> str:
    e2, e3 = r["ber_1e-2"], r["ber_1e-3"]
    spe = f"  {r['seconds_per_epoch']:.2f} s/epoch" if "seconds_per_epoch" in r else ""
    return (f"{r['model']:9s} {r['variant']:11s} clean {100 * r['clean']:6.2f}  ber 1e-2 {100 * e2['mean']:5.1f} "
            f"[{100 * e2['ci95'][0]:5.1f}, {100 * e2['ci95'][1]:5.1f}]  ber 1e-3 {100 * e3['mean']:5.1f} "
            f"[{100 * e3['ci95'][0]:5.1f}, {100 * e3['ci95'][1]:5.1f}]{spe}")


if __name__ == "__main__":
    sys.exit(main())
