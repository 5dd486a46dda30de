"""`apply --summary-md FILE`: the run as a short Markdown page for a CI job summary.

GitHub Actions renders the Markdown a step appends to $GITHUB_STEP_SUMMARY; GitLab and others
can attach the file as an artifact. The page holds the accuracies, the recovery, the chip, the
gates and the passes with their seconds; the JSON report keeps everything else.
"""

from __future__ import annotations

from pathlib import Path

from . import pass_note


def _cell(value: object) -> str:
    """A table cell: no line breaks, pipes escaped (paths and chip ids come from users)."""
    text = " ".join(str(value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'")


def _verdict(gates: list[dict]) -> str:
    """The summary's first word on the gates."""
    if not gates:
        return "no gates given"
    return "**FAILED**" if any(not g["passed"] for g in gates) else "passed"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def summary_markdown(report: dict, gates: list[dict] | None = None) -> str:
    """The Markdown page for one `apply` report and its gate results (see harden.gates)."""
    gates = gates or []
    res = report["results"]
    acc = res["accuracy"]
    fm = report["inputs"]["faultmap"]
    model = Path(report["inputs"]["model"]["path"]).name
    chip = fm.get("chip_id") or "?"
    verdict = _verdict(gates)
    scored = "labels" if res["reference"] == "labels" else f"top-1 agreement with the {res.get('reference_model', 'float')} model"

    out = [f"### harden: `{_cell(model)}` on chip `{_cell(chip)}`", ""]
    out.append(f"Gates: {verdict}. Accuracy on {res['samples']} samples, scored against {scored}.")
    out.append("")
    out += ["| model | accuracy |", "|---|---:|"]
    for key, label in (("float", "float"), ("int8", "int8, fault-free"), ("int8_on_chip", "int8 on this chip"),
                       ("hardened_on_chip", "hardened on this chip")):
        value = _pct(acc[key])
        out.append(f"| {label} | {'**' + value + '**' if key == 'hardened_on_chip' else value} |")
    out.append("")
    if res.get("recovery") is not None:
        out.append(f"Recovered {100 * res['recovery']:.1f}% of the accuracy plain int8 loses on this chip.")
    else:
        out.append("Plain int8 loses nothing on this chip (no recovery figure).")
    out.append("")

    if gates:
        out += ["| gate | threshold | value | result |", "|---|---:|---:|---|"]
        for g in gates:
            out.append(f"| `{g['gate']}` ({_cell(g['what'])}) | {g['threshold']:g} | {g['value']:.4f} | "
                       f"{'pass' if g['passed'] else '**FAIL**'} |")
        out.append("")

    out += ["| chip | words | faulty cells | rate | faulty words | crc32 |", "|---|---:|---:|---:|---:|---|"]
    out.append(f"| `{_cell(chip)}` | {fm['num_words']} | {fm['faulty_cells']} | {fm['rate']:.4f} | "
               f"{fm['num_records']} | `0x{fm['crc32']:08x}` |")
    out.append("")

    out += ["| pass | seconds | what it did |", "|---|---:|---|"]
    for rec in report["passes"]:
        out.append(f"| {rec['pass']} | {rec.get('seconds', 0):.2f} | {_cell(pass_note(rec))} |")
    out.append("")

    tail = []
    if "output" in report:
        tail.append(f"hardened model `{_cell(report['output']['model'])}`, sha256 `{report['output']['sha256'][:16]}`")
    if "seconds" in report:
        tail.append(f"{report['seconds']:.1f} s in all")
    tail.append(f"harden {report.get('harden_version', '?')}")
    out.append("; ".join(tail) + ".")
    return "\n".join(out) + "\n"


def fleet_summary_markdown(report: dict, gates: list[dict] | None = None) -> str:
    """The Markdown page for a fleet report: the fleet's distribution, yield, gates, worst chips."""
    gates = gates or []
    fleet = report["fleet"]
    model = Path(report["inputs"]["model"]["path"]).name
    verdict = _verdict(gates)
    out = [f"### harden: `{_cell(model)}` on a fleet of {fleet['chips']} chips", "",
           f"Gates: {verdict}. Fault-free int8 {_pct(fleet['int8'])}.", "",
           "| | mean | worst | 5th percentile | median | yield at " + _pct(fleet["yield_target"]) + " |",
           "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("int8_on_chip", "plain int8 on chip"), ("hardened_on_chip", "hardened on chip")):
        d = fleet[key]
        out.append(f"| {label} | {_pct(d['mean'])} | {_pct(d['min'])} | {_pct(d['p05'])} | {_pct(d['median'])} | "
                   f"{100 * d['yield']:.1f}% |")
    out.append("")
    if gates:
        out += ["| gate | threshold | fleet value | failing chips | result |", "|---|---:|---:|---:|---|"]
        for g in gates:
            out.append(f"| `{g['gate']}` ({_cell(g['what'])}) | {g['threshold']:g} | {g['value']:.4f} | {g['failing_chips']} | "
                       f"{'pass' if g['passed'] else '**FAIL**'} |")
        out.append("")
    worst = sorted(report["chips"], key=lambda c: c["accuracy"]["hardened_on_chip"])[:5]
    out += ["| worst chips | rate | int8 on chip | hardened |", "|---|---:|---:|---:|"]
    for c in worst:
        out.append(f"| `{_cell(c['chip'])}` | {c['faultmap']['rate']:.4f} | {_pct(c['accuracy']['int8_on_chip'])} | "
                   f"{_pct(c['accuracy']['hardened_on_chip'])} |")
    out.append("")
    out.append(f"harden {report.get('harden_version', '?')}; {report.get('seconds', 0):.1f} s in all.")
    return "\n".join(out) + "\n"


def simulate_summary_markdown(report: dict) -> str:
    """The Markdown page for a `simulate` report: every point with its interval, and its gates."""
    gates = report.get("gates") or []
    model = Path(report["inputs"]["model"]["path"]).name
    verdict = _verdict(gates)
    c = report["clean"]
    out = [f"### harden simulate: `{_cell(model)}`", "",
           f"Gates: {verdict}. Fault-free accuracy {_pct(c['accuracy'])} on {c['samples']} samples.", "",
           "| point | trials | accuracy | 95% CI |", "|---|---:|---:|---|"]
    for p in report["points"]:
        a = p["accuracy"]
        ci = a.get("ci95")
        out.append(f"| `{_cell(p['label'])}` | {p['trials']} | {_pct(a['mean'])} | "
                   + (f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "exact") + " |")
    out.append("")
    if gates:
        out += ["| gate | point | threshold | value | result |", "|---|---|---:|---:|---|"]
        for g in gates:
            value = "n/a" if g["value"] is None else f"{g['value']:.4f}"
            out.append(f"| `--{g['kind']}` ({g['statistic']}) | `{_cell(g['point'])}` | {g['threshold']:g} | {value} | "
                       f"{'pass' if g['passed'] else '**FAIL**'} |")
        out.append("")
    out.append(f"harden {report.get('harden_version', '?')}; {report.get('seconds', 0):.1f} s in all.")
    return "\n".join(out) + "\n"
