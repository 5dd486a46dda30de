"""harden against PyTorchFI per trial: random float32 weight bit flips on the same network (issue 12).

    pip install pytorchfi==0.6.0 --no-deps        # bench only (it needs torch, no torchvision)
    python bench/bench_pytorchfi.py [--trials 200] [--ber 1e-5] [--rounds 3]

The network: the test suite's residual digits CNN (tests/zoo.py), trained here in torch and
exported to ONNX (the export folds BatchNorm into the convolutions, so the flipped weights are
not the same numbers; the cost per trial is what is compared). Data: the 341 test digits, one
batch.

- PyTorchFI 0.6.0: per trial, draw the flipped bits over every Conv2d / Linear weight (a binomial
  count at the bit error rate, then distinct positions, as harden draws them), compute the
  flipped float32 values and `declare_weight_fi(layer_num, k, dim1, dim2, dim3, value)`, which
  deep-copies the model and writes them; one forward pass; top-1 accuracy.
- harden: `harden.campaign.simulate(MODEL.onnx, DATA, ["bitflip-fp32:BER"], CampaignOptions(trials=N))`,
  what `harden simulate --fault bitflip-fp32:BER --trials N` runs, in this process: the point's
  own seconds (its session and output bound are built off the clock, like PyTorchFI's
  `fault_injection` object; the bound's set-up is recorded), with the bound (trials it proves
  harmless run no inference, harden/faults/bounds.py) and without it (HARDEN_CERTIFY=0, the same
  figures trial for trial, checked),
  after one warm-up campaign, as torch and onnxruntime are warmed up by their clean passes (a
  fresh process's first campaign pays about 0.1 s of one-off start: arenas, thread pools).
- Clean passes: torch eval forward, and an onnxruntime session of the ONNX model.

Both use the machine's defaults (torch's threads; harden's trial threads, one per core). Rounds
alternate the two; the speed-up is the median of the rounds' ratios (also the best round of
each). Prints a table; writes bench/results/pytorchfi.json.
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

from harden.campaign import CampaignOptions, simulate  # noqa: E402
from harden.runtime import session  # noqa: E402


def _best(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def residual_network(tmp: Path):
    """The test suite's residual digits CNN trained in torch (seed 0), its ONNX export and the
    341 test digits: (module, x, y, ONNX path, npz path), the files in `tmp`."""
    d = zoo.digits_splits()
    with zoo._TorchState(0):
        module = zoo._digits_module("residual")
    module, _ = zoo._train(module, d["x_train"], d["y_train"], d["x_test"], d["y_test"], seed=0,
                           epochs=zoo.DEFAULT_DIGITS_EPOCHS, lr=3e-3, floor=zoo.DIGITS_ACCURACY_FLOOR)
    module.eval()
    x, y = np.array(d["x_test"]), np.array(d["y_test"])
    onnx_path = tmp / "residual.onnx"
    zoo._export(module, x[:1], onnx_path, opset=17, dynamic_batch=True, x_check=x, meta={"name": "bench"})
    return module, x, y, onnx_path, zoo.write_npz(tmp / "test.npz", x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--ber", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each (the median ratio is reported)")
    args = ap.parse_args()
    import torch
    from pytorchfi.core import fault_injection

    with tempfile.TemporaryDirectory() as tmp:
        module, x, y, onnx_path, data = residual_network(Path(tmp))
        xt = torch.from_numpy(x)

        with torch.no_grad():
            torch_clean = _best(lambda: module(xt))
        sess = session(__import__("onnx").load(str(onnx_path)))
        ort_clean = _best(lambda: sess.run(None, {"input": x}))

        # PyTorchFI
        layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        sizes = np.array([m.weight.numel() for m in layers])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        bits = int(sizes.sum()) * 32
        pfi = fault_injection(module, batch_size=len(x), input_shape=list(x.shape[1:]),
                              layer_types=[torch.nn.Conv2d, torch.nn.Linear], use_cuda=False)

        def pytorchfi_trials() -> tuple[float, list[float]]:
            accs = []
            t0 = time.perf_counter()
            for t in range(args.trials):
                rng = np.random.default_rng([args.seed, t])
                n = int(rng.binomial(bits, args.ber))
                pos = rng.choice(bits, size=n, replace=False) if n else np.empty(0, np.int64)
                flat, bit = pos // 32, pos % 32
                layer = np.searchsorted(starts, flat, side="right") - 1
                kw = {k: [] for k in ("layer_num", "k", "dim1", "dim2", "dim3", "value")}
                for li, fi, b in zip(layer, flat, bit):
                    w = layers[li].weight
                    idx = np.unravel_index(int(fi - starts[li]), tuple(w.shape))
                    v = np.array([w.detach().numpy()[idx]], np.float32)
                    v.view(np.uint32)[0] ^= np.uint32(1 << int(b))
                    idx = tuple(int(i) for i in idx) + (None,) * (4 - len(idx))
                    for key, val in zip(("layer_num", "k", "dim1", "dim2", "dim3", "value"), (int(li), *idx, float(v[0]))):
                        kw[key].append(val)
                corrupted = pfi.declare_weight_fi(**kw) if n else module
                with torch.no_grad():
                    out = corrupted(xt).numpy()
                accs.append(float((np.nan_to_num(out, nan=-np.inf).argmax(1) == y).mean()))
            return (time.perf_counter() - t0) / args.trials, accs

        def harden_trials(certify: bool = True) -> tuple[float, dict, dict]:
            os.environ["HARDEN_CERTIFY"] = "1" if certify else "0"
            try:
                report = simulate(onnx_path, data, [f"bitflip-fp32:{args.ber!r}"],
                                  options=CampaignOptions(trials=args.trials, seed=args.seed)).report
            finally:
                os.environ.pop("HARDEN_CERTIFY", None)
            point = report["points"][0]
            return point["seconds"] / point["trials"], point, report["fp32"]

        harden_trials()  # warm-up

        # Rounds alternate the three, so that the machine's load hits them alike.
        pfi_times, harden_times, unbounded_times = [], [], []
        for _ in range(args.rounds):
            t, accs = pytorchfi_trials()
            pfi_times.append(t)
            t, point, fp32 = harden_trials()
            harden_times.append(t)
            t, unbounded, _ = harden_trials(certify=False)
            unbounded_times.append(t)
            assert unbounded["per_trial"] == point["per_trial"]  # the bound changes the cost, never a figure
        ratios = [p / h for p, h in zip(pfi_times, harden_times)]

    row = {
        "network": "residual digits CNN (tests/zoo.py), 341 test digits", "ber": args.ber, "trials": args.trials,
        "torch_clean_ms": round(1e3 * torch_clean, 2), "onnxruntime_clean_ms": round(1e3 * ort_clean, 2),
        "rounds": args.rounds,
        "pytorchfi_ms_per_trial": [round(1e3 * t, 2) for t in pfi_times], "harden_ms_per_trial": [round(1e3 * t, 2) for t in harden_times],
        "harden_speedup_per_round": [round(r, 2) for r in ratios],
        "harden_speedup": round(float(np.median(ratios)), 2),
        "harden_speedup_best_rounds": round(min(pfi_times) / min(harden_times), 2),
        "harden_certified_trials": point["certified_trials"], "harden_bound_setup_s": fp32["bound"]["seconds"],
        "harden_ms_per_trial_without_bound": [round(1e3 * t, 2) for t in unbounded_times],
        "harden_speedup_without_bound": round(float(np.median([p / h for p, h in zip(pfi_times, unbounded_times)])), 2),
        "pytorchfi_mean_accuracy": round(float(np.mean(accs)), 4), "harden_mean_accuracy": point["accuracy"]["mean"],
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(row, indent=1))
    out = ROOT / "bench" / "results" / "pytorchfi.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
