"""The report: versioned JSON (`harden.report/1`) and the short table `apply` prints."""

from __future__ import annotations

import json

REPORT_SCHEMA = "harden.report/1"


def to_json(report: dict) -> str:
    """Stable, human-diffable JSON (keys keep their insertion order)."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


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
        f"accuracy on {res['samples']} samples ({scored}):",
        f"  float                    {_pct(acc['float'])}",
        f"  int8, fault-free         {_pct(acc['int8'])}",
        f"  int8 on this chip        {_pct(acc['int8_on_chip'])}",
        f"  hardened on this chip    {_pct(acc['hardened_on_chip'])}",
    ]
    if res.get("recovery") is not None:
        lines.append(f"  recovered {100 * res['recovery']:.1f}% of the accuracy plain int8 loses on this chip")
    lines.append("passes:")
    for rec in report["passes"]:
        lines.append(f"  {rec['pass']:<9} {rec.get('seconds', 0):7.2f}s  {_pass_note(rec)}")
    return "\n".join(lines)


def _pass_note(rec: dict) -> str:
    name = rec["pass"]
    if rec.get("skipped"):
        return f"skipped: {rec['skipped']}"
    if name == "simplify":
        return f"opset {rec['opset_in']} -> {rec['opset_out']}, {rec['nodes_in']} -> {rec['nodes_out']} nodes"
    if name == "clip":
        n = len(rec.get("layers", []))
        return f"{rec['style']} style on {n} ReLUs, {rec.get('threshold_values', 0)} thresholds"
    if name == "quantize":
        return f"{rec['int8_tensors']} int8 tensors, {rec['int8_weights']} weights (per-channel, symmetric)"
    if name == "faq":
        return (
            f"{rec['on_faulty_words']} weights on faulty words, {rec['changed']} codes changed, "
            f"{rec['forced']} absorbed by error feedback, {rec['bias_corrected']} biases corrected"
        )
    return ""
