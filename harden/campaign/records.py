"""A campaign's report records: per point, per trial, per layer, per side session."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..faults import (
    FaultModel,
)
from ..stats import summarize, wilson
from .options import CampaignOptions, CampaignResult, PointResult


class RecordsMixin:
    """The record builders of `Campaign` (engine.py), kept apart from the engine that runs trials."""


    def point_record(self, pr: PointResult, options: CampaignOptions) -> dict:
        m = pr.model
        n_correct = self.baseline_of(pr.index).n_correct
        acc = summarize(pr.accuracy, 0.95)
        acc_c = summarize(pr.accuracy, options.confidence)
        rec = {
            "index": pr.index,
            "label": m.label,
            "fault": _describe(m),
            "deterministic": bool(m.deterministic),
            "trials": pr.trials,
            "planned_trials": pr.planned,
            "stopped_early": pr.stopped_early,
            **({"stopped_by_budget": pr.stopped_by_budget} if options.budget is not None else {}),
            "faulty_cells": {
                "mean": round(float(pr.faulty_cells.mean()), 3),
                "min": int(pr.faulty_cells.min()),
                "max": int(pr.faulty_cells.max()),
            },
            "accuracy": _figure(acc, acc_c, m.deterministic),
        }
        if self.kind_of(m) != "weights":
            rec["session"] = self.kind_of(m)
            rec["clean_accuracy"] = round(self.baseline_of(pr.index).clean_accuracy, 6)
        if self.precision_of(m) == "float" and pr.nan_outputs is not None:
            # float32 faults can make NaN logits: those inputs count as wrong (data.top1)
            frac = pr.nan_outputs / max(1, int(self.target.size))
            rec["nan_outputs"] = {
                "mean": round(float(frac.mean()), 6),
                "max": round(float(frac.max()), 6),
                "trials_with_nan": int(np.count_nonzero(pr.nan_outputs)),
            }
        if self.precision_of(m) == "float" and pr.certified is not None:
            # trials whose flips a sound bound proves harmless: clean predictions, no inference
            rec["certified_trials"] = int(np.count_nonzero(pr.certified))
        if n_correct:
            rates = pr.sdc1_events / n_correct
            s, s_c = summarize(rates, 0.95), summarize(rates, options.confidence)
            events, opportunities = int(pr.sdc1_events.sum()), pr.trials * n_correct
            lo, hi = wilson(events, opportunities, 0.95)
            rec["sdc1"] = {
                **_figure(s, s_c, m.deterministic),
                "events": events,
                "opportunities": opportunities,
                "wilson95": [round(lo, 6), round(hi, 6)],
            }
        else:
            rec["sdc1"] = None
            rates = None
        rec["worst_trial"] = int(np.argmin(pr.accuracy))
        rec["per_trial"] = {
            "accuracy": [round(float(a), 6) for a in pr.accuracy],
            "sdc1": None if rates is None else [round(float(r), 6) for r in rates],
            "faulty_cells": [int(c) for c in pr.faulty_cells],
        }
        rec["seconds"] = round(pr.seconds, 4)
        return rec

    def trial_record(self, point: int, trial: int) -> dict:
        """One trial re-derived: its figures and every faulty cell."""
        if not 0 <= point < len(self.points):
            raise InputError(f"--show-trial: point {point} does not exist (points 0 to {len(self.points) - 1})")
        if trial < 0:
            raise InputError(f"--show-trial: trial must be >= 0, got {trial}")
        r = self.run_trial(point, trial)
        faults = [f._asdict() for f in self.describe_trial(point, trial)]
        if self.is_activation(self.points[point]):
            per_sample = {s.name: s.elements for s in self.act_space.sites}
            for f in faults:
                f["sample"], f["element"] = divmod(f["index"], per_sample[f["tensor"]])
        n_correct = self.baseline_of(point).n_correct
        return {
            "point": point,
            "label": self.points[point].label,
            "trial": trial,
            "rng": [self.seed, point, trial],
            "accuracy": round(r.accuracy, 6),
            "sdc1": round(r.sdc1_events / n_correct, 6) if n_correct else None,
            "faulty_cells": r.faulty_cells,
            **({"certified": True} if r.certified else {}),  # proven harmless: clean predictions, not run
            "faults": faults,
        }

    def per_layer_records(self, result: CampaignResult, options: CampaignOptions) -> list[dict]:
        """The per-layer points ranked by accuracy loss (rank 1 loses the most), each with the
        tensor, its op, size, accuracy (mean, std, ci95), loss = clean - mean accuracy and its
        interval, SDC-1, faulty cells per trial and loss per faulty cell."""
        if self.per_layer is None:
            return []
        by_index = {pr.index: pr for pr in result.points}
        ops = dict(self.session("weights")[0].ops)
        ops.update(self.session(self.per_layer.base.space_kind)[0].ops)  # a side session's tensors (fp32)
        sites = {s.name: s for s in self.act_space.sites} if self.is_activation(self.per_layer.base) else {}
        out = []
        for i, t in zip(self.per_layer.indices, self.per_layer.tensors):
            pr = by_index[i]
            rec = self.point_record(pr, options)
            clean = self.baseline_of(i).clean_accuracy
            acc = rec["accuracy"]
            lo, hi = acc["ci95"] if acc["ci95"] else (acc["mean"], acc["mean"])
            entry = {"index": i, "label": rec["label"], "tensor": t.name, "kind": t.kind}
            if t.kind == "activation":
                site = sites[t.name]
                entry.update(op=site.producer, node=None, elements=site.elements)
            else:
                op, node = ops.get(t.name, (None, None))
                entry.update(op=op, node=node, elements=t.size)
                if t.kind == "weight":
                    entry["weights"] = t.size
            loss = clean - acc["mean"]
            cells = rec["faulty_cells"]["mean"]
            entry.update(
                trials=rec["trials"],
                faulty_cells=cells,
                accuracy=acc,
                loss=round(loss, 6),
                loss_ci95=[round(clean - hi, 6), round(clean - lo, 6)],
                loss_per_fault=round(loss / cells, 8) if cells else None,
                sdc1=None if rec["sdc1"] is None else {k: rec["sdc1"][k] for k in ("mean", "ci95", "wilson95")},
            )
            out.append(entry)
        order = sorted(range(len(out)), key=lambda k: (-out[k]["loss"], out[k]["index"]))
        for rank, k in enumerate(order, 1):
            out[k]["rank"] = rank
        return [out[k] for k in order]

    def session_record(self, kind: str) -> dict | None:
        """How the clean outputs of side session `kind` compare with the weight session's
        (None when no point ran on it); for "activations" also its injection sites."""
        if kind not in self._sessions:
            return None
        ev, base = self._sessions[kind]
        fused = self.session("weights")[0].clean_logits
        same = fused.shape == ev.clean_logits.shape
        clean = {
            "accuracy": round(base.clean_accuracy, 6),
            "correct": base.n_correct,
            "logits_identical": bool(same and np.array_equal(fused, ev.clean_logits)),
            "max_abs_logit_difference": float(np.max(np.abs(fused.astype(np.float64) - ev.clean_logits))) if same else None,
            "predictions_identical": bool(np.array_equal(self.clean_pred, ev.clean)),
        }
        clean.update(ev.compare_fused(fused))  # the session's own comparison (e.g. analog: top-1 agreement rate)
        rec: dict = {"opset": int(next((o.version for o in ev.model.opset_import if o.domain in ("", "ai.onnx")), 0))}
        rec.update(ev.session_info())  # what the session says of itself (fp32: tensors, weights, bits, prepared)
        if kind == "activations":
            rec.update(
                sites=[
                    {"tensor": s.name, "dtype": str(s.dtype), "shape": list(s.shape), "elements": s.elements, "producer": s.producer}
                    for s in ev.sites
                ],
                skipped=list(ev.skipped),
                bits_per_sample=ev.space.bits_per_sample,
            )
        rec["clean"] = clean
        return rec

    def activation_record(self) -> dict | None:
        """The activation-fault session: sites and clean comparison (None when unused)."""
        return self.session_record("activations")



def _figure(s95, s_c, deterministic: bool) -> dict:
    """mean, std, ci95 (t-based) and the half-width at the campaign's confidence."""
    if deterministic:  # the same faults every trial: the figure is exact
        return {"mean": round(s95.mean, 6), "std": 0.0, "ci95": [round(s95.mean, 6)] * 2, "half_width": 0.0}
    d95 = s95.as_dict()
    return {"mean": d95["mean"], "std": d95["std"], "ci95": d95["ci"], "half_width": s_c.as_dict()["half_width"]}


def _describe(m: FaultModel) -> dict:
    return m.describe()


