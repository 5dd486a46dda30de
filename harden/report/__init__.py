"""The report: versioned JSON (`harden.report/1`) and the short table `apply` prints."""

from __future__ import annotations

import json
from importlib import resources

REPORT_SCHEMA = "harden.report/1"


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of `harden.report/1`, shipped in the package
    (harden/schemas/report-1.schema.json) so a pipeline can validate what it reads."""
    return json.loads(resources.files("harden").joinpath("schemas/report-1.schema.json").read_text(encoding="utf-8"))


def to_json(report: dict) -> str:
    """Stable, human-diffable JSON (keys keep their insertion order)."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def _scored_on(report: dict) -> str:
    """Which samples the figures are scored on: --eval-data, or the part of --data held out."""
    ev = report["inputs"].get("eval_data") or {}
    return f"held-out ({ev['rule']} of --data, never fitted)" if ev.get("held_out_of") else "--eval-data"


def _pct(v: float | None) -> str:
    return "   n/a" if v is None else f"{100 * v:6.2f}%"


def summary_table(report: dict) -> str:
    """What `apply` prints: accuracies on this chip and what each pass did, in a few lines."""
    res = report["results"]
    acc = res["accuracy"]
    fm = report["inputs"]["faultmap"]
    scored = "labels" if res["reference"] == "labels" else f"top-1 agreement with the {res.get('reference_model', 'float')} model"
    lines = [
        f"chip {fm.get('chip_id') or '?'}: {fm['num_words']} words, {fm['faulty_cells']} faulty cells "
        f"(rate {fm['rate']:.4f}), {fm['num_records']} faulty words",
        f"accuracy on {res['samples']} {_scored_on(report)} samples ({scored}):",
        f"  float                    {_pct(acc['float'])}",
        f"  int8, fault-free         {_pct(acc['int8'])}",
        f"  int8 on this chip        {_pct(acc['int8_on_chip'])}",
        f"  hardened on this chip    {_pct(acc['hardened_on_chip'])}",
    ]
    if res.get("recovery") is not None:
        lines.append(f"  recovered {100 * res['recovery']:.1f}% of the accuracy plain int8 loses on this chip")
    if acc.get("hardened") is not None:
        lines.append(f"  (hardened, fault-free      {_pct(acc['hardened'])}; chip arithmetic: exact int32 accumulation)")
    warning = warning_line(res.get("host_onnxruntime"))
    if warning:
        lines.append(warning)
    res_block = res.get("resilience")
    if res_block:
        names = [v["name"] for v in res_block["variants"]]
        lines.append(f"resilience ({res_block['trials']} trials per random point; mean accuracy):")
        width = max(12, *(len(n) + 2 for n in names))
        lines.append("  " + f"{'fault point':<28}" + "".join(f"{n:>{width}}" for n in names))
        for point in ["clean", *res_block["points"]]:
            cells = "".join(f"{_pct(res_block['figures'][n][point]['accuracy']['mean']):>{width}}" for n in names)
            lines.append(f"  {point[:27]:<28}{cells}")
        helps = [f"{a['pass']} +{100 * a['gain']:.1f} pts at {a['point']}" for a in res_block["ablation"] if a["verdict"] == "helps"]
        hurts = [f"{a['pass']} {100 * a['gain']:.1f} pts at {a['point']}" for a in res_block["ablation"] if a["verdict"] == "hurts"]
        if helps:
            lines.append("  measured gains: " + "; ".join(helps))
        if hurts:
            lines.append("  measured losses: " + "; ".join(hurts))
        worse = [f for f in res_block.get("fragility", []) if f["verdict"] == "more fragile"]
        if worse:
            lines.append("  elsewhere: the hardened model is more fragile than plain int8 under "
                         + "; ".join(f"{f['point']} ({100 * f['difference']:+.1f} pts)" for f in worse)
                         + f"; {100 * worse[0]['clean_gap']:+.1f} pts of each is its fault-free difference "
                         "(its codes fit this chip's stuck bits), the rest what the faults add")
        elif res_block.get("fragility"):
            lines.append("  elsewhere: the hardened model is no more fragile than plain int8 under the random points "
                         "(paired 95% intervals)")
        cut = res_block.get("budget")
        if cut:
            lines.append(f"  --budget {cut['seconds']:g} s cut the trials from {cut['trials_asked']} to {cut['trials_run']} per random point")
        for sk in res_block.get("skipped_points", []):
            lines.append(f"  left out {sk['point']}: {sk['why']}")
    lines.append("passes:")
    for rec in report["passes"]:
        lines.append(f"  {rec['pass']:<11} {rec.get('seconds', 0):7.2f}s  {pass_note(rec)}")
    return "\n".join(lines)


def pass_note(rec: dict) -> str:
    """A pass record's line in a report: the note its pass wrote (passes/__init__.py: each pass
    describes itself), or for a report written before passes did, the note rebuilt here."""
    if rec.get("note") is not None:
        return rec["note"]
    return _legacy_note(rec)


def _legacy_note(rec: dict) -> str:
    name = rec["pass"]
    if rec.get("skipped"):
        return f"skipped: {rec['skipped']}"
    if name == "simplify":
        return f"opset {rec['opset_in']} -> {rec['opset_out']}, {rec['nodes_in']} -> {rec['nodes_out']} nodes"
    if name == "clip":
        n = sum(1 for layer in rec.get("layers", []) if layer.get("relu"))
        guard = " + output guard" if rec.get("output_guard") else ""
        return f"{rec['style']} style on {n} ReLUs{guard}, {rec.get('threshold_values', 0)} thresholds"
    if name == "clip-search":
        return f"threshold percentile {rec['chosen_percentile']} chosen by {rec['fault']} ({len(rec['candidates']) - 1} candidates)"
    if name == "quantize":
        return f"{rec['int8_tensors']} int8 tensors, {rec['int8_weights']} weights (per-channel, symmetric)"
    if name == "faq":
        return (
            f"{rec['on_faulty_words']} weights on faulty words, {rec['changed']} codes changed, "
            f"{rec['forced']} absorbed by error feedback, {rec['bias_corrected']} biases corrected"
        )
    return rec.get("note", "")  # a pass may describe itself (the training passes do)


def fleet_table(report: dict) -> str:
    """What a fleet `apply` prints: one line per chip, then the fleet's distribution and yield."""
    fleet = report["fleet"]
    lines = [f"{'chip':<24}{'rate':>8}{'int8 on chip':>14}{'hardened':>10}{'recovered':>11}"]
    for c in report["chips"]:
        rec = "n/a" if c["recovery"] is None else f"{100 * c['recovery']:.1f}%"
        lines.append(f"{c['chip'][:23]:<24}{c['faultmap']['rate']:>8.4f}{_pct(c['accuracy']['int8_on_chip']):>14}"
                     f"{_pct(c['accuracy']['hardened_on_chip']):>10}{rec:>11}")
    h, p = fleet["hardened_on_chip"], fleet["int8_on_chip"]
    lines += [
        f"fleet of {fleet['chips']} chips, fault-free int8 {_pct(fleet['int8']).strip()}:",
        f"  int8 on chip: mean {_pct(p['mean']).strip()}, worst {_pct(p['min']).strip()}; "
        f"hardened: mean {_pct(h['mean']).strip()}, worst {_pct(h['min']).strip()}",
        f"  yield at {_pct(fleet['yield_target']).strip()}: {100 * p['yield']:.1f}% of chips as plain int8, "
        f"{100 * h['yield']:.1f}% hardened",
        f"  shared work {report['timings']['shared']:.2f}s, then {report['timings']['per_chip']:.3f}s per chip",
    ]
    return "\n".join(lines)


def warning_line(record: dict | None) -> str | None:
    """The one-line warning `apply` prints when this host's onnxruntime parts from the chip."""
    if not record or not record.get("differs"):
        return None
    flags = ", ".join(record["host"]["int8_flags"]) or "unknown CPU flags"
    return (f"warning: onnxruntime's fused int8 kernels on this host ({record['host']['machine']}: {flags}) run the "
            f"written model at {100 * record['accuracy_onnxruntime_fused']:.2f}% where the chip's arithmetic gives "
            f"{100 * record['accuracy_chip_arithmetic']:.2f}%; deploy on CPUs with VNNI or with "
            f"session option session.disable_quant_qdq=1 (docs/arithmetic.md)")
