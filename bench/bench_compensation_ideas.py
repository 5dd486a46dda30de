"""Issue 11's compensation ideas, each measured against harden's default FAQ pass.

    python bench/bench_compensation_ideas.py [--chips 3] [--rates 0.04,0.15] [--kinds vit,bert] [--variants ...]

Same models, splits and chips as bench_architectures.py (calibration split, 341 held-out test
digits, exact int8 arithmetic, uniform stuck-at chips seeds 100..). The default is sequential
compensation with the sign choice (FAQPass); each other variant changes one step:

- `no-sign`: without the sign choice (`--no-sign-choice`): every channel keeps its sign.

- `gptq`: GPTQ's column-by-column error feedback with FAQ's lookup as the quantizer: every
  weight's error (rounding or stuck bits) is pushed onto the row's later columns through the
  Cholesky factor of H^-1, instead of harden's joint solve over the faulty weights alone.
- `gptq-act`: the same, columns in descending order of diag(H) (GPTQ's "act order").
- `obs+gptq`, `obs+gptq-act`: harden's joint solve first, then the column pass on its result.

The column-pass variants are patched in for the measurement only (harden does not use them;
docs/results.md has the figures). Writes bench/results/compensation_ideas.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_architectures import chip_figures, shared_models  # noqa: E402

import harden.passes.faq as faq_pass  # noqa: E402
from harden import compensate  # noqa: E402
from harden.faq_table import faq_remap  # noqa: E402
from harden.faultmap import read_back  # noqa: E402
from harden.options import ApplyOptions  # noqa: E402

VARIANTS = ("default", "no-sign", "gptq", "gptq-act", "obs+gptq", "obs+gptq-act")


def column_feedback(targets, sa0, sa1, table, hessian, act_order: bool, block: int = 128) -> np.ndarray:
    """GPTQ's lazy-batch column loop (rows vectorised) with FAQ's lookup as the quantizer."""
    w = np.array(targets, np.float64)
    d = w.shape[1]
    h = hessian.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d)
    w, h, a0, a1 = w[:, perm], h[perm][:, perm], sa0[:, perm], sa1[:, perm]
    h[np.diag_indices_from(h)] += compensate.DAMPENING * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    codes = np.empty(w.shape, np.int8)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, err = w[:, i1:i2].copy(), np.zeros((w.shape[0], i2 - i1))
        for i in range(i2 - i1):
            c = faq_remap(w1[:, i], a0[:, i1 + i], a1[:, i1 + i], table)
            codes[:, i1 + i] = c
            err[:, i] = (w1[:, i] - read_back(c, a0[:, i1 + i], a1[:, i1 + i])) / u[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(err[:, i], u[i1 + i, i1 + i : i2])
        w[:, i2:] -= err @ u[i1:i2, i2:]
    out = np.empty_like(codes)
    out[:, perm] = codes
    return out


def gptq_patch(variant: str):
    """remap_rows replaced by the column pass (after harden's joint solve for obs+...)."""
    default = compensate.remap_rows

    def remap_rows(targets, sa0, sa1, table, hessian, block=compensate.BLOCK):
        if hessian is None:
            return default(targets, sa0, sa1, table, hessian, block)
        if variant.startswith("obs+"):
            moved = np.empty(targets.shape)
            for cols in np.array_split(np.arange(targets.shape[1]), -(-targets.shape[1] // block)):
                cols = slice(int(cols[0]), int(cols[-1]) + 1)
                moved[:, cols] = compensate.error_feedback(targets[:, cols], sa0[:, cols], sa1[:, cols],
                                                           compensate.inverse_hessian(hessian[cols, cols]), table)[0]
            targets = moved
        return column_feedback(targets, sa0, sa1, table, hessian, variant.endswith("-act")), np.zeros(len(targets), np.int64)

    return mock.patch.object(faq_pass, "remap_rows", remap_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=3)
    ap.add_argument("--rates", default="0.04,0.15")
    ap.add_argument("--kinds", default="vit,bert")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    rows = []
    for kind, shared in shared_models(args.kinds):
        for rate in (float(r) for r in args.rates.split(",")):
            for variant in args.variants.split(","):
                opts = ApplyOptions(trials=0, clip=False, sign_choice=variant != "no-sign")
                patch = contextlib.nullcontext() if variant in ("default", "no-sign") else gptq_patch(variant)
                with patch:
                    row = {"model": kind, "rate": rate, "variant": variant, **chip_figures(shared, rate, opts, args.chips)}
                rows.append(row)
                print(f"{kind:12s} rate {rate:<5} {variant:13s} hardened {row['hardened_on_chip']:.2%} "
                      f"recovery {row['recovery']:.1%} gap {row['gap_points']:+.2f} pts  {row['seconds_per_chip']:.1f} s/chip",
                      flush=True)
    out = ROOT / "bench" / "results" / "compensation_ideas.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
