"""Resilience gates (`apply --min-accuracy / --max-drop`): evaluated on the report's figures.

A gate that is not met makes the CLI exit 1 (DESIGN.md); the outputs are still written, and the
Markdown summary lists every gate with its threshold, its value and whether it passed.
"""

from __future__ import annotations


def gate_results(report: dict, min_accuracy: float | None = None, max_drop: float | None = None) -> list[dict]:
    """One record per gate given: gate, threshold, value, passed, and the failure line."""
    acc = report["results"]["accuracy"]
    hardened = acc["hardened_on_chip"]
    gates = []
    if min_accuracy is not None:
        ok = hardened >= min_accuracy
        gates.append({
            "gate": "--min-accuracy", "threshold": min_accuracy, "value": hardened, "passed": ok,
            "what": "hardened accuracy on this chip",
            "message": None if ok else
            f"gate failed: hardened accuracy on this chip {hardened:.4f} < --min-accuracy {min_accuracy}",
        })
    if max_drop is not None:
        drop = acc["int8"] - hardened
        ok = drop <= max_drop
        gates.append({
            "gate": "--max-drop", "threshold": max_drop, "value": round(drop, 6), "passed": ok,
            "what": "fault-free int8 minus hardened on this chip",
            "message": None if ok else
            f"gate failed: hardened accuracy on this chip {hardened:.4f} is {drop:.4f} below "
            f"fault-free int8 {acc['int8']:.4f} (--max-drop {max_drop})",
        })
    return gates
