"""Resilience gates, evaluated on a report's figures: a gate that is not met makes the CLI exit 1
(DESIGN.md); the outputs are still written first.

- `apply --min-accuracy ACC / --max-drop DROP` (`gate_results`): the hardened model's accuracy
  on the chip, and its drop below fault-free int8. The Markdown summary lists every gate with
  its threshold, its value and whether it passed.
- `simulate --min-accuracy POINT=ACC / --max-drop POINT=DROP` (`PointGate`,
  `point_gate_results`), repeatable: gates at named fault points. POINT is a point label as
  `simulate` prints it (`bitflip:0.001`, `chip:sample-chip-0042`, `bitflip-fp32:1e-06`; a
  one-point spec such as `bitflip:1e-3` is read as the label it gives) or `all` (every
  --fault / --faultmap point). The figure is the point's *mean* accuracy over its
  trials; `ACC@ci` / `DROP@ci` uses the lower bound of the point's accuracy interval at the
  campaign's --confidence instead (mean - half-width; exact for a deterministic point, none
  for a random point with one trial, which then fails the gate). DROP is measured against the
  fault-free accuracy the point is scored against (`clean.accuracy`, or the point's own
  `clean_accuracy` when it runs on a side session).

Both kinds compare the same way (`check`): accuracy >= ACC, and fault-free - accuracy <= DROP
(to 1e-9, so that a drop equal to the threshold in decimal is not failed by rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import InputError
from .faults import parse_fault_spec
from .report.types import ApplyGate

#: The gate kinds, as their options name them.
KINDS = ("min-accuracy", "max-drop")


def check(kind: str, threshold: float, accuracy: float, clean: float | None = None) -> tuple[float, bool]:
    """(value, passed) of one gate: `accuracy` itself for min-accuracy, `clean - accuracy`
    for max-drop."""
    if kind == "min-accuracy":
        return accuracy, accuracy >= threshold
    if kind == "max-drop":
        drop = clean - accuracy
        return drop, drop <= threshold + 1e-9
    raise ValueError(f"unknown gate kind {kind!r}")


def gate_results(report: dict, min_accuracy: float | None = None, max_drop: float | None = None) -> list[ApplyGate]:
    """apply's gates: one record per gate given: gate, threshold, value, passed, and the failure line."""
    acc = report["results"]["accuracy"]
    hardened = acc["hardened_on_chip"]
    gates = []
    if min_accuracy is not None:
        _, ok = check("min-accuracy", min_accuracy, hardened)
        gates.append({
            "gate": "--min-accuracy", "threshold": min_accuracy, "value": hardened, "passed": ok,
            "what": "hardened accuracy on this chip",
            "message": None if ok else
            f"gate failed: hardened accuracy on this chip {hardened:.4f} < --min-accuracy {min_accuracy}",
        })
    if max_drop is not None:
        drop, ok = check("max-drop", max_drop, hardened, acc["int8"])
        gates.append({
            "gate": "--max-drop", "threshold": max_drop, "value": round(drop, 6), "passed": ok,
            "what": "fault-free int8 minus hardened on this chip",
            "message": None if ok else
            f"gate failed: hardened accuracy on this chip {hardened:.4f} is {drop:.4f} below "
            f"fault-free int8 {acc['int8']:.4f} (--max-drop {max_drop})",
        })
    return gates


def fleet_gate_results(report: dict, min_accuracy: float | None = None, max_drop: float | None = None) -> list[dict]:
    """A fleet's gates, one record per gate given: every chip must pass it; `value` is the
    fleet's worst figure, `failing_chips` how many chips miss."""
    chips = report["chips"]
    int8 = report["fleet"]["int8"]
    gates = []
    if min_accuracy is not None:
        worst = report["fleet"]["hardened_on_chip"]["min"]
        bad = sum(c["accuracy"]["hardened_on_chip"] < min_accuracy for c in chips)
        gates.append({"gate": "--min-accuracy", "threshold": min_accuracy, "value": worst, "passed": bad == 0,
                      "what": "worst hardened accuracy over the fleet", "failing_chips": bad,
                      "message": None if bad == 0 else
                      f"gate failed: {bad} of {len(chips)} chips below --min-accuracy {min_accuracy} (worst {worst:.4f})"})
    if max_drop is not None:
        drops = [int8 - c["accuracy"]["hardened_on_chip"] for c in chips]
        bad = sum(d > max_drop for d in drops)
        gates.append({"gate": "--max-drop", "threshold": max_drop, "value": round(max(drops), 6), "passed": bad == 0,
                      "what": "largest drop below fault-free int8 over the fleet", "failing_chips": bad,
                      "message": None if bad == 0 else
                      f"gate failed: {bad} of {len(chips)} chips more than --max-drop {max_drop} below int8 {int8:.4f}"})
    return gates


# --- simulate: gates at named fault points ----------------------------------------------------


@dataclass(frozen=True)
class PointGate:
    """One `simulate` gate: `kind` ("min-accuracy" or "max-drop"), the point label it names (or
    "all"), its threshold, and the statistic it reads ("mean", or "ci": the interval's lower bound)."""

    kind: str
    point: str
    threshold: float
    statistic: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown gate kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.statistic not in ("mean", "ci"):
            raise InputError(f"--{self.kind}: statistic must be 'mean' or 'ci', got {self.statistic!r}")
        if not isinstance(self.point, str) or not self.point.strip():
            raise InputError(f"--{self.kind}: the point label is empty")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:  # also NaN
            raise InputError(f"--{self.kind}: threshold must be in [0, 1], got {t!r}")

    @property
    def option(self) -> str:
        return f"--{self.kind}"

    @property
    def text(self) -> str:
        """The gate as given on the command line: POINT=THRESHOLD[@ci]."""
        return f"{self.point}={self.threshold:g}" + ("@ci" if self.statistic == "ci" else "")

    def canonical(self) -> PointGate:
        """The gate with POINT written as `simulate` labels it, when POINT is a fault spec of
        one point (`bitflip:1e-3` -> `bitflip:0.001`); otherwise (a label that is no spec,
        `all`) unchanged."""
        if self.point == "all" or self.point.partition(":")[0].strip() == "chip":  # chip:ID is no file to read
            return self

        try:
            models = parse_fault_spec(self.point)
        except Exception:  # noqa: BLE001 - a convenience: a label that is no spec stays as given
            return self
        if len(models) != 1 or models[0].label == self.point:
            return self
        return replace(self, point=models[0].label)

    @classmethod
    def parse(cls, kind: str, text: str) -> PointGate:
        """`POINT=VALUE` or `POINT=VALUE@ci` (the last '=' splits: labels may hold one)."""
        what = "ACC" if kind == "min-accuracy" else "DROP"
        example = "bitflip:0.001=0.9" if kind == "min-accuracy" else "bitflip:0.001=0.05"
        point, sep, value = str(text).rpartition("=")
        point, value = point.strip(), value.strip()
        if not sep or not point or not value:
            raise InputError(f"--{kind} takes POINT={what}[@ci] (e.g. {example}, or all={example.split('=')[1]}), got {text!r}")
        statistic = "mean"
        if value.lower().endswith("@ci"):
            statistic, value = "ci", value[:-3].strip()
        try:
            threshold = float(value)
        except ValueError:
            raise InputError(f"--{kind} {text}: {value!r} is not a number (POINT={what}[@ci], e.g. {example})") from None
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"--{kind} {text}: {what} must be in [0, 1] (a fraction, not a percentage)")
        return cls(kind, point, threshold, statistic).canonical()


def check_point_gates(gates: Sequence[PointGate], labels: Sequence[str]) -> None:
    """InputError (exit 2) when a gate names no point: checked before any trial runs, against
    the labels the campaign's --fault / --faultmap points will have."""
    known = list(dict.fromkeys(labels))
    for g in gates:
        if g.point == "all":
            if not known:
                raise InputError(f"{g.option} {g.text}: there are no --fault / --faultmap points to gate")
            continue
        if g.point not in known:
            raise InputError(f"{g.option} {g.text}: no point is labelled {g.point!r} "
                             f"(points: {', '.join(known) or 'none'}; or 'all')")


def point_gate_results(report: dict, gates: Sequence[PointGate]) -> list[dict]:
    """One record per (gate, point it names), in the order given: point, index, kind,
    statistic, threshold, value, passed, and `message` (the failure line, None when passed)."""
    out = []
    clean_all = report["clean"]["accuracy"]
    confidence = (report.get("options") or {}).get("confidence", 0.95)
    for g in gates:
        for p in report["points"]:
            if g.point != "all" and p["label"] != g.point:
                continue
            acc = p["accuracy"]
            clean = p.get("clean_accuracy", clean_all)
            if g.statistic == "mean":
                figure, what = acc["mean"], "mean accuracy"
            else:
                hw = acc.get("half_width")
                figure = None if hw is None else acc["mean"] - hw
                what = f"lower {100 * confidence:g}% bound of the accuracy"
            name = f"point {p['label']} (#{p['index']})"
            if figure is None:
                value, ok = None, False
                message = (f"gate failed: {name} has no accuracy interval ({p['trials']} trial); "
                           f"{g.option} {g.text} needs --trials >= 2")
            else:
                value, ok = check(g.kind, g.threshold, figure, clean)
                if g.kind == "min-accuracy":
                    message = f"gate failed: {name}: {what} {figure:.4f} < {g.option} {g.text}"
                else:
                    message = (f"gate failed: {name}: {what} {figure:.4f} is {value:.4f} below fault-free "
                               f"{clean:.4f} ({g.option} {g.text})")
            out.append({
                "point": p["label"],
                "index": p["index"],
                "kind": g.kind,
                "statistic": g.statistic,
                "threshold": g.threshold,
                "value": None if value is None else round(value, 6),
                "passed": bool(ok),
                "message": None if ok else message,
            })
    return out


def failure_line(results: Sequence[dict]) -> str | None:
    """The one line a failed gate run prints (the first failure, and how many more), or None."""
    failed = [r for r in results if not r["passed"]]
    if not failed:
        return None
    more = len(failed) - 1
    return failed[0]["message"] + (f" (and {more} more failed gate{'s' if more > 1 else ''})" if more else "")


__all__ = ["KINDS", "PointGate", "check", "check_point_gates", "failure_line", "fleet_gate_results", "gate_results",
           "point_gate_results"]
