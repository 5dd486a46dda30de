"""The resilience section of `apply`'s report: the same fault campaign on each pass's model.

Variants are the models before and after each pass (int8 -> +clip -> +faq = hardened). Every
variant has the same weight tensors, so trial t of point p injects the same faults into each
(`trial_rng(seed, p, t)`): the gain of a pass is a *paired* difference, trial by trial, with its
own confidence interval. A pass whose interval includes zero claims nothing (issue 3: "no pass
claims a benefit it does not deliver").
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx

from .campaign import Campaign, CampaignOptions
from .data import Dataset
from .faults import FaultModel
from .simulate import ChipEvaluator, Reference
from .stats import summarize


def measure(
    variants: Sequence[tuple[str, str | None, onnx.ModelProto]],
    data: Dataset,
    reference: Reference,
    points: Sequence[FaultModel],
    *,
    trials: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Run `points` x `trials` on every (name, pass added, model) variant; figures and ablation."""
    opts = CampaignOptions(trials=trials, seed=seed)
    per_variant: dict[str, dict[str, np.ndarray]] = {}
    figures: dict[str, dict] = {}
    for name, _, model in variants:
        campaign = Campaign(model, data, points, seed=seed, evaluator=ChipEvaluator(model, data, reference))
        result = campaign.run(opts, progress)
        per_variant[name] = {pr.model.label: pr.accuracy for pr in result.points}
        figures[name] = {
            pr.model.label: {
                "trials": pr.trials,
                "accuracy": summarize(pr.accuracy).as_dict(),
                "sdc1": summarize(pr.sdc1_events / max(campaign.n_correct, 1)).as_dict() if campaign.n_correct else None,
            }
            for pr in result.points
        }
        figures[name]["clean"] = {"trials": 1, "accuracy": {"mean": round(campaign.clean_accuracy, 6)}}
    ablation = []
    for (before, _, _), (after, added, _) in zip(variants, variants[1:]):
        for p in points:
            diff = per_variant[after][p.label] - per_variant[before][p.label]
            s = summarize(diff, bounds=None).as_dict()
            lo, hi = s["ci"] if s["ci"] else (s["mean"], s["mean"])  # one trial: exact
            ablation.append({
                "pass": added, "from": before, "to": after, "point": p.label,
                "gain": s["mean"], "ci95": [lo, hi],
                "verdict": "helps" if lo > 0 else ("hurts" if hi < 0 else "no measurable effect"),
            })
    return {
        "seed": seed,
        "trials": trials,
        "points": [p.label for p in points],
        "variants": [{"name": n, "adds": a} for n, a, _ in variants],
        "figures": figures,
        "ablation": ablation,
        "fragility": fragility(variants, points, per_variant, figures),
    }


def fragility(variants, points, per_variant: dict, figures: dict) -> list[dict]:
    """The last variant (hardened) against the first (plain int8) under each random point:
    issue 11 asks that hardening for one chip not make the model more fragile elsewhere, or
    that the report say by how much and why. `clean_gap` is the fault-free difference the
    hardened model carries everywhere (its codes are fitted to its own chip's stuck bits);
    `excess` is what the random faults add on top of it."""
    if len(variants) < 2:
        return []
    first, last = variants[0][0], variants[-1][0]
    clean_gap = figures[last]["clean"]["accuracy"]["mean"] - figures[first]["clean"]["accuracy"]["mean"]
    out = []
    for p in points:
        if getattr(p, "deterministic", False):
            continue  # a given chip: not "elsewhere"
        s = summarize(per_variant[last][p.label] - per_variant[first][p.label], bounds=None).as_dict()
        lo, hi = s["ci"] if s["ci"] else (s["mean"], s["mean"])
        out.append({"point": p.label, "difference": s["mean"], "ci95": [lo, hi], "clean_gap": round(clean_gap, 6),
                    "excess": round(s["mean"] - clean_gap, 6),
                    "verdict": "no more fragile" if hi >= 0 else "more fragile"})
    return out
