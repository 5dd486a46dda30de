"""The HTML report: one self-contained page rendered from a `harden.report/1` JSON report.

`render_html(report)` takes the dict that `apply --report` or `simulate --report` writes and
returns a page with inline CSS and the plots as inline SVG (matplotlib), no JavaScript and no
external asset, so CI can attach it to a run as a single file. The page holds the inputs with
their sha256, the chip, the accuracy table, accuracy and SDC-1 against fault rate with 95 %
confidence bands, the ablation gains, the FAQ per-layer figures, a table of every point and
the pass records with their timings.

Every string from the report is HTML-escaped (paths and chip ids come from users), and the
output is byte-identical for a given report: no timestamps, matplotlib's SVG ids are salted
per figure and its metadata (date, creator) is left out.

matplotlib is an optional dependency (`pip install 'harden[report]'`); it is imported only when
a page is rendered, and its absence is an InputError (exit 2) naming the extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...fileio import read_input
from .. import REPORT_SCHEMA, pass_note, warning_line
from .markup import (
    _H,
    MAX_ROWS,
    _ci,
    _ci_text,
    _code,
    _colour,
    _fault_text,
    _fmt,
    _kv,
    _label,
    _p,
    _pct,
    _pts,
    _section,
    _table,
    _trunc,
    _value,
    _x,
)
from .plots import _Plots
from .style import _CSS, _RC, VARIANT_COLOURS

COMMANDS = ("apply", "simulate")


class MissingDependency(InputError):
    """matplotlib is not installed (exit 2: the user can fix it)."""


def require_matplotlib() -> None:
    """Raise MissingDependency unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency(
            "the HTML report needs matplotlib: install harden[report] (pip install 'harden[report]')"
        ) from None


# --- validation ------------------------------------------------------------------------------


def validate_report(report: Any, source: str = "report") -> dict:
    """Check that `report` is a harden.report/1 report this module can render; return it."""
    if not isinstance(report, dict):
        raise InputError(f"{source}: not a harden report (a JSON object is expected, got {type(report).__name__})")
    schema = report.get("schema")
    if schema is None:
        raise InputError(f"{source}: not a harden report (no \"schema\" field; expected {REPORT_SCHEMA!r})")
    if schema != REPORT_SCHEMA:
        raise InputError(f"{source}: unsupported report schema {schema!r}; this harden reads {REPORT_SCHEMA!r}")
    command = report.get("command")
    if command not in COMMANDS:
        raise InputError(f"{source}: report of command {command!r}; the HTML report renders {' and '.join(COMMANDS)} reports")
    need = {"apply": ("inputs", "passes", "results"), "simulate": ("inputs", "points", "clean")}[command]
    missing = [k for k in need if not isinstance(report.get(k), (dict, list))]
    if missing:
        raise InputError(f"{source}: incomplete {command} report (missing {', '.join(missing)})")
    if command == "apply":
        res = report["results"]
        if not isinstance(res.get("accuracy"), dict):
            raise InputError(f"{source}: incomplete apply report (missing results.accuracy)")
        rb = res.get("resilience")
        if rb is not None and not (isinstance(rb, dict) and isinstance(rb.get("figures"), dict)
                                   and isinstance(rb.get("variants"), list)):
            raise InputError(f"{source}: incomplete apply report (results.resilience lacks variants or figures)")
    return report


def load_report(path: str | Path) -> dict:
    """Read and validate a JSON report; any problem is one InputError line."""
    p = Path(path)
    try:
        text = read_input(p, "a JSON report").decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a JSON report (not UTF-8 text)") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    return validate_report(report, str(p))


# --- formatting helpers ----------------------------------------------------------------------


_KNOWN = {
    "apply": {"schema", "harden_version", "command", "inputs", "options", "passes", "results", "output", "seconds"},
    "simulate": {"schema", "harden_version", "command", "inputs", "model", "options", "points", "clean", "trial", "seconds",
                 "per_layer", "per_layer_fault", "diagnostics", "activation_faults", "gates"},
}
_KNOWN_RESULTS = {"reference", "reference_model", "samples", "accuracy", "recovery", "resilience", "arithmetic",
                  "host_onnxruntime"}


def _arithmetic_notes(res: dict) -> list[_H]:
    """What arithmetic the figures use, and whether this host's onnxruntime agrees with it."""
    parts: list[_H] = []
    ar = res.get("arithmetic")
    if isinstance(ar, dict):
        host = ar.get("host") or {}
        parts.append(_p(f"Arithmetic: {ar.get('name', '?')} ({ar.get('path', '')}): int8 products accumulated exactly "
                        f"(to float32 rounding), the same on any host. Host {host.get('machine', '?')}, int8 CPU features: "
                        f"{', '.join(host.get('int8_flags') or []) or 'none detected'}.", "note"))
    hc = res.get("host_onnxruntime")
    if isinstance(hc, dict) and hc.get("differs"):
        parts.append(_p(warning_line(hc) or "", "note"))
    elif isinstance(hc, dict):
        parts.append(_p(f"onnxruntime's own fused int8 kernels on this host give "
                        f"{_pct(hc.get('accuracy_onnxruntime_fused'))} on the written model, as the chip's arithmetic does.",
                        "note"))
    return parts


def render_html(report: dict) -> str:
    """The HTML page of an apply or simulate report (validated first; InputError if unusable)."""
    validate_report(report)
    require_matplotlib()
    import matplotlib

    with matplotlib.rc_context(_RC):
        plots = _Plots()
        if report["command"] == "apply":
            title, sub, nav, body = _apply_page(report, plots)
        else:
            title, sub, nav, body = _simulate_page(report, plots)
    known = _KNOWN[report["command"]]
    extra = {k: v for k, v in report.items() if k not in known}
    if report["command"] == "apply" and isinstance(report.get("results"), dict):
        extra.update({f"results.{k}": v for k, v in report["results"].items() if k not in _KNOWN_RESULTS})
    if extra:  # fields this page has no view for yet are still shown, as tables
        nav.append(("other", "other fields"))
        body.append(_section("other", "Other report fields", _value(extra)))
    links = "".join(f'<a href="#{_x(i)}">{_x(t)}</a>' for i, t in nav)
    footer = (f"harden {_x(report.get('harden_version', '?'))} · schema {_x(report['schema'])} · rendered from the JSON "
              "report by <code>harden report</code>; the JSON keeps every figure, including each trial.")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_x(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main><header><h1>{_x(title)}</h1><p class=sub>{_x(sub)}</p><nav>{links}</nav></header>\n"
        + "\n".join(body)
        + f"\n<footer>{footer}</footer></main></body></html>\n"
    )


def _name(path: Any) -> str:
    return Path(str(path)).name if path else "?"


def _inputs_table(inputs: dict) -> _H:
    rows = []
    for role, rec in inputs.items():
        if not isinstance(rec, dict) or not rec:
            continue
        extra = [f"{k} {_fmt(v)}" for k, v in rec.items() if k == "samples"]
        rows.append([role, _code(rec.get("path", "–")), _code(rec.get("sha256", "–")), "; ".join(extra)])
    return _table(["input", "path", "sha256", ""], rows)


def _chip_table(fm: dict) -> _H:
    rows = [("chip_id", _code(fm.get("chip_id") or "–"))]
    if "num_words" in fm:
        rows.append(("memory", f"{fm['num_words']} words × {fm.get('word_bits', 8)} bits"))
    if "num_records" in fm and fm.get("num_words"):
        rows.append(("faulty words", f"{fm['num_records']} ({100 * fm['num_records'] / fm['num_words']:.2f}% of words)"))
    if "faulty_cells" in fm:
        rate = fm.get("rate")
        rows.append(("faulty cells", f"{fm['faulty_cells']}" + (f" (rate {rate:.6g})" if rate is not None else "")))
    cells = fm.get("faulty_cells") or 0
    for key in ("stuck_at_0", "stuck_at_1"):
        if key in fm:
            share = f" ({100 * fm[key] / cells:.1f}%)" if cells else ""
            rows.append((key.replace("_", "-"), f"{fm[key]}{share}"))
    per_bit = fm.get("faulty_cells_per_bit")
    if isinstance(per_bit, list):
        rows.append(("per bit (b0 = LSB)", _table([f"b{i}" for i in range(len(per_bit))], [per_bit], num=range(len(per_bit)))))
    if isinstance(fm.get("crc32"), int):
        rows.append(("crc32", _code(f"0x{fm['crc32']:08x}")))
    if fm.get("meta"):
        rows.append(("metadata", _value(fm["meta"])))
    for key in ("path", "sha256"):
        if fm.get(key):
            rows.append((key, _code(fm[key])))
    return _kv(rows)


def _series_apply(rb: dict) -> tuple[list[dict], list[str]]:
    series = []
    for i, v in enumerate(rb["variants"]):
        name = v.get("name", f"variant {i}")
        figs = rb["figures"].get(name, {})
        pts = {}
        for label, f in figs.items():
            if label == "clean" or not isinstance(f, dict):
                continue
            acc = f.get("accuracy") or {}
            sdc = f.get("sdc1")
            pts[label] = {
                "trials": f.get("trials"),
                "acc": {"mean": acc.get("mean"), "ci": _ci(acc)} if acc.get("mean") is not None else None,
                "sdc1": {"mean": sdc.get("mean"), "ci": _ci(sdc)} if isinstance(sdc, dict) and sdc.get("mean") is not None else None,
                "raw": f,
            }
        clean = ((figs.get("clean") or {}).get("accuracy") or {}).get("mean")
        series.append({"name": name, "adds": v.get("adds"), "colour": _colour(name, i), "clean": clean, "points": pts})
    labels = list(rb.get("points") or [])
    for s in series:
        labels += [lb for lb in s["points"] if lb not in labels]
    return series, labels


def _fig_cell(f: dict | None) -> _H:
    if not f or f.get("mean") is None:
        return _H("–")
    ci = _ci(f)
    return _H(f"{_x(_pct(f['mean']))}" + (f'<br><span class="ci">{_x(_ci_text(ci))}</span>' if ci else ""))


def _apply_page(rep: dict, plots: _Plots) -> tuple[str, str, list, list]:
    inputs, res = rep["inputs"], rep["results"]
    fm = inputs.get("faultmap") or {}
    acc = res["accuracy"]
    chip = fm.get("chip_id") or _name(fm.get("path"))
    title = f"harden apply: {_name((inputs.get('model') or {}).get('path'))} on chip {chip}"
    scored = ("labels" if res.get("reference") == "labels"
              else f"top-1 agreement with the {res.get('reference_model', 'float')} model")
    sub = (f"harden {rep.get('harden_version', '?')} · {res.get('samples', '?')} evaluation samples scored against {scored}"
           + (f" · {rep['seconds']:.1f} s" if isinstance(rep.get("seconds"), (int, float)) else ""))
    nav = [("summary", "summary"), ("inputs", "inputs and chip"), ("accuracy", "accuracy")]
    body: list[str] = []

    # headline
    rec = res.get("recovery")
    cards = [("hardened on this chip", _pct(acc.get("hardened_on_chip")), "good"),
             ("plain int8 on this chip", _pct(acc.get("int8_on_chip")), "bad"),
             ("int8, fault-free", _pct(acc.get("int8")), ""),
             ("loss recovered", "–" if rec is None else f"{100 * rec:.1f}%", "good" if rec else "")]
    card_html = "".join(f'<div class="card {c}"><div class="v">{_x(v)}</div><div class="k">{_x(k)}</div></div>'
                        for k, v, c in cards)
    body.append(_section("summary", "Summary", f'<div class="cards">{card_html}</div>'))

    # inputs and chip
    parts = [_inputs_table({k: v for k, v in inputs.items() if isinstance(v, dict)})]
    if inputs.get("already_int8"):
        parts.append(_p("The input model was already int8 QDQ: quantization was skipped.", "note"))
    out = rep.get("output")
    if isinstance(out, dict):
        parts.append(_kv([("hardened model", _code(out.get("model"))), ("sha256", _code(out.get("sha256")))]))
    parts += [_H("<h3>Chip</h3>"), _chip_table(fm)]
    body.append(_section("inputs", "Inputs and chip", *parts))

    # accuracy table + bars
    rows = [[label, _pct(acc.get(key))] for key, label in (
        ("float", "float"), ("int8", "int8, fault-free"), ("int8_on_chip", "int8 on this chip"),
        ("hardened", "hardened, fault-free"), ("hardened_on_chip", "hardened on this chip")) if key in acc]
    rows.append(["recovery", "–" if rec is None else f"{100 * rec:.1f}% of the loss of plain int8"])
    parts = [_table(["model", "accuracy"], rows, num=[1])]
    if rec is None:
        parts.append(_p("Plain int8 loses nothing on this chip, so there is no recovery figure.", "note"))
    parts += _arithmetic_notes(res)
    if any(acc.get(k) is not None for k in ("float", "int8", "int8_on_chip", "hardened_on_chip")):
        parts.append(plots.accuracy_bars(acc))
    body.append(_section("accuracy", "Accuracy on this chip", *parts))

    rb = res.get("resilience")
    if rb:
        series, labels = _series_apply(rb)
        nav += [("resilience", "resilience"), ("sdc", "SDC-1"), ("points", "every point"), ("ablation", "ablation"),
                ("fragility", "elsewhere")]
        names = ", ".join(f"{s['name']}" + (f" (+{s['adds']})" if s["adds"] else "") for s in series)
        parts = [_p(f"The same fault campaign on the model after each pass ({names}): {rb.get('trials', '?')} trials per "
                    f"random point, seed {rb.get('seed', '?')}; trial t of every variant gets the same faults.")]
        parts += [_p(f"Left out {sk.get('point')}: {sk.get('why')}", "note") for sk in rb.get("skipped_points") or []]
        cut = rb.get("budget")
        if isinstance(cut, dict):
            parts.append(_p(f"--budget {cut.get('seconds')} s cut the trials from {cut.get('trials_asked')} to "
                            f"{cut.get('trials_run')} per random point (the same for every model compared).", "note"))
        fig = plots.against_rate(series, labels, "acc", "accuracy")
        if fig:
            parts.append(fig)
        body.append(_section("resilience", "Resilience: accuracy against fault rate", *parts))
        fig = plots.against_rate(series, labels, "sdc1", "SDC-1")
        body.append(_section("sdc", "SDC-1: top-1 changes on the inputs the fault-free model gets right",
                             fig or _p("No SDC-1 figures in this report.", "note")))
        # every point
        head = ["point", "trials"] + [f"{s['name']} {m}" for s in series for m in ("accuracy", "SDC-1")]
        rows = [["fault-free", 1] + [c for s in series for c in (_pct(s["clean"]), "–")]]
        for label in labels:
            trials = next((s["points"][label]["trials"] for s in series if label in s["points"]), None)
            row: list[Any] = [_label(label), trials]
            for s in series:
                raw = s["points"].get(label, {}).get("raw") or {}
                row += [_fig_cell(raw.get("accuracy")), _fig_cell(raw.get("sdc1"))]
            rows.append(row)
        body.append(_section("points", "Every point", _table(head, rows, num=range(1, len(head)), cls="wide"),
                             _p("Mean over the trials with its 95 % confidence interval in brackets (percent). "
                                "A point with one trial (a chip's fixed faults) is exact.", "note")))
        # ablation
        ab = [a for a in rb.get("ablation") or [] if isinstance(a, dict) and a.get("gain") is not None]
        if ab:
            rows = []
            for a in ab:
                v = a.get("verdict", "")
                cls = {"helps": "helps", "hurts": "hurts"}.get(v, "none")
                rows.append([a.get("pass"), f"{a.get('from')} → {a.get('to')}", _label(a.get("point")), _pts(a["gain"]),
                             _ci_text(a.get("ci95")) or "–",
                             _H(f'<span class="badge {cls}">{_x(v)}</span>')])
            body.append(_section("ablation", "Ablation: what each pass buys", plots.ablation(ab),
                                 _table(["pass", "variants", "point", "gain (pts)", "95% CI (pts)", "verdict"], rows,
                                        num=[3, 4])))
        else:
            body.append(_section("ablation", "Ablation: what each pass buys", _p("No ablation rows.", "note")))
        frag = [f for f in rb.get("fragility") or [] if isinstance(f, dict) and f.get("difference") is not None]
        if not frag:
            body.append(_section("fragility", "Elsewhere: hardened against plain int8 under random faults",
                                 _p("No random fault point in this campaign.", "note")))
        else:
            rows = [[_label(f.get("point")), _pts(f["difference"]), _ci_text(f.get("ci95")) or "–", _pts(f.get("clean_gap", 0.0)),
                     _pts(f.get("excess", 0.0)),
                     _H(f'<span class="badge {"hurts" if f.get("verdict") == "more fragile" else "none"}">{_x(f.get("verdict", ""))}</span>')]
                    for f in frag]
            body.append(_section("fragility", "Elsewhere: hardened against plain int8 under random faults",
                                 _table(["point", "difference (pts)", "95% CI (pts)", "of it fault-free (pts)", "added by the faults (pts)",
                                         "verdict"], rows, num=[1, 2, 3, 4]),
                                 _p("The hardened model's codes fit its own chip's stuck bits; under other faults it carries its "
                                    "fault-free difference from plain int8, and the faults may add to it.", "note")))
    else:
        body.append(_section("resilience", "Resilience", _p("No resilience campaign in this report (apply --trials 0).", "note")))
        nav.append(("resilience", "resilience"))

    passes = [p for p in rep.get("passes") or [] if isinstance(p, dict)]
    faq = next((p for p in passes if p.get("pass") == "faq" and isinstance(p.get("layers"), list) and p["layers"]), None)
    if faq:
        nav.append(("faq", "FAQ layers"))
        layers = [ly for ly in faq["layers"] if isinstance(ly, dict)]
        rows = [[i, _code(ly.get("tensor")), ly.get("op"), ly.get("weights"), ly.get("on_faulty_words"), ly.get("changed"),
                 ly.get("forced"), ly.get("bias_corrected"), ly.get("rms_error_plain"), ly.get("rms_error_faq")]
                for i, ly in enumerate(layers[:MAX_ROWS])]
        body.append(_section(
            "faq", "FAQ per layer", plots.faq_layers(layers),
            _table(["#", "tensor", "op", "weights", "on faulty words", "changed", "forced", "bias corrected",
                    "RMS error plain", "RMS error FAQ"], rows, num=[0, 3, 4, 5, 6, 8, 9])))
    nav.append(("passes", "passes"))
    body.append(_passes_section(passes, plots))
    nav.append(("options", "options"))
    body.append(_section("options", "Options", _value(rep.get("options") or {})))
    return title, sub, nav, body


def _passes_section(passes: list[dict], plots: _Plots) -> _H:
    rows = []
    for r in passes:
        try:
            note = pass_note(r)
        except (KeyError, TypeError, ValueError):
            note = ""
        if not note:
            note = {"simulate": "accuracy on this chip (see above)",
                    "campaign": "the resilience campaign on each variant (see above)"}.get(r.get("pass"), "")
        t = r.get("timings")
        split = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in t.items() if isinstance(v, (int, float))) \
            if isinstance(t, dict) else ""
        name = _H(f'<span class="nw">{_x(r.get("pass"))}</span>')
        rows.append([name, r.get("modified"), "–" if r.get("seconds") is None else f"{r['seconds']:.3f}", split, note])
    parts: list[str] = [_table(["pass", "modified", "seconds", "of which (s)", "what it did"], rows, num=[2])]
    fig = plots.timings(passes)
    if fig:
        parts.append(fig)
    for r in passes:
        detail = {k: v for k, v in r.items() if k not in ("pass",)}
        parts.append(f"<details><summary>{_x(r.get('pass'))}: full record</summary>{_value(detail)}</details>")
    return _section("passes", "Passes", *parts)


def _simulate_page(rep: dict, plots: _Plots) -> tuple[str, str, list, list]:
    inputs, clean = rep["inputs"], rep["clean"]
    model = rep.get("model") or {}
    title = f"harden simulate: {_name((inputs.get('model') or {}).get('path'))}"
    scored = "labels" if clean.get("reference") == "labels" else "top-1 agreement with the fault-free model"
    sub = (f"harden {rep.get('harden_version', '?')} · {clean.get('samples', '?')} samples scored against {scored}"
           + (f" · {rep['seconds']:.1f} s" if isinstance(rep.get("seconds"), (int, float)) else ""))
    nav = [("summary", "summary"), ("inputs", "inputs")]
    body: list[str] = []
    points = [p for p in rep["points"] if isinstance(p, dict)]
    measured = [p for p in points if isinstance(p.get("accuracy"), dict) and p["accuracy"].get("mean") is not None]

    is_float = model.get("precision") == "float"
    cards = [("fault-free accuracy", _pct(clean.get("accuracy")), ""),
             ("float32 weights", _fmt(model.get("float_weights")), "") if is_float else
             ("int8 weights", _fmt(model.get("int8_weights")), ""),
             ("fault points", str(len(points)), "")]
    gates = [g for g in rep.get("gates") or [] if isinstance(g, dict)]
    if gates:
        failed = sum(not g.get("passed") for g in gates)
        cards.append(("gates", f"{len(gates) - failed} / {len(gates)} passed", "bad" if failed else ""))
    if measured:
        worst = min(measured, key=lambda p: p["accuracy"]["mean"])
        cards.append((f"worst point ({_trunc(worst['label'], 30)})", _pct(worst["accuracy"]["mean"]), "bad"))
    card_html = "".join(f'<div class="card {c}"><div class="v">{_x(v)}</div><div class="k">{_x(k)}</div></div>'
                        for k, v, c in cards)
    body.append(_section("summary", "Summary", f'<div class="cards">{card_html}</div>'))

    parts = [_inputs_table({k: v for k, v in inputs.items() if isinstance(v, dict)})]
    facts = []
    if model and is_float:
        facts += [("float32 weights", f"{model.get('float_weights')} in {model.get('float_weight_tensors')} tensors")]
    elif model:
        facts += [("int8 weights", f"{model.get('int8_weights')} in {model.get('int8_tensors')} tensors"),
                  ("int32 biases", f"{model.get('int32_biases')} in {model.get('int32_bias_tensors')} tensors")]
    facts += [("fault-free accuracy", f"{_pct(clean.get('accuracy'))} ({clean.get('reference')})"),
              ("correct inputs", f"{clean.get('correct')} (the SDC-1 opportunities of one trial)")]
    parts.append(_kv(facts))
    chips = [p.get("fault") for p in points if isinstance(p.get("fault"), dict) and p["fault"].get("name") == "chip"]
    for c in chips:
        parts += [_H(f"<h3>Chip {_x(c.get('chip_id') or _name(c.get('path')))}</h3>"), _chip_table(c)]
    body.append(_section("inputs", "Inputs", *parts))

    if measured:
        series = [{"name": "model", "adds": None, "colour": VARIANT_COLOURS["model"], "clean": clean.get("accuracy"),
                   "points": {p["label"]: {
                       "trials": p.get("trials"),
                       "acc": {"mean": p["accuracy"]["mean"], "ci": _ci(p["accuracy"])},
                       "sdc1": ({"mean": p["sdc1"]["mean"], "ci": _ci(p["sdc1"])}
                                if isinstance(p.get("sdc1"), dict) and p["sdc1"].get("mean") is not None else None),
                   } for p in measured}}]
        labels = [p["label"] for p in measured]
        nav += [("resilience", "accuracy"), ("sdc", "SDC-1"), ("points", "every point")]
        o = rep.get("options") or {}
        stop = (f"; a point stops once its {100 * o.get('confidence', 0.95):g} % half-width is within {o['margin']:g}"
                if o.get("margin") else "")
        parts = [_p(f"{o.get('planned_trials', '?')} trials per random point, seed {o.get('seed', '?')}{stop}.")]
        fig = plots.against_rate(series, labels, "acc", "accuracy")
        if fig:
            parts.append(fig)
        parts.append(plots.trials_spread(measured, clean.get("accuracy")))
        body.append(_section("resilience", "Accuracy under faults", *parts))
        fig = plots.against_rate(series, labels, "sdc1", "SDC-1")
        body.append(_section("sdc", "SDC-1: top-1 changes on the inputs the fault-free model gets right",
                             fig or _p("No SDC-1 figures (the fault-free model gets no input right).", "note")))
        rows = []
        for p in measured:
            a, s = p["accuracy"], p.get("sdc1") or {}
            fc = p.get("faulty_cells") or {}
            trials = f"{p.get('trials')}" + ("*" if p.get("stopped_early") else "")
            rows.append([p.get("index"), _label(p["label"]), trials,
                         f"{_fmt(fc.get('mean'))} [{_fmt(fc.get('min'))}–{_fmt(fc.get('max'))}]" if fc else "–",
                         _fig_cell(a), _pct(a.get("std")), _pct(a.get("half_width")),
                         _fig_cell(s), _ci_text(s.get("wilson95")) or "–",
                         f"{s['events']} / {s['opportunities']}" if "events" in s else "–",
                         p.get("worst_trial"), "–" if p.get("seconds") is None else f"{p['seconds']:.2f}"])
        head = ["#", "point", "trials", "faulty cells [min–max]", "accuracy [95% CI]", "std", "half-width",
                "SDC-1 [95% CI]", "SDC-1 Wilson 95%", "SDC-1 events", "worst trial", "seconds"]
        notes = ("Figures in percent; the half-width is at the campaign's confidence; SDC-1 events: top-1 changes / "
                 "(trials × correct inputs), with their pooled Wilson interval.")
        if any(p.get("stopped_early") for p in measured):
            notes += " * stopped early: the margin was met."
        faults = _table(["#", "point", "fault model", "parameters"],
                        [[p.get("index"), _label(p["label"]), (p.get("fault") or {}).get("name") if isinstance(p.get("fault"), dict)
                          else "–", _fault_text(p.get("fault"))] for p in points])
        body.append(_section("points", "Every point", _table(head, rows, num=range(2, 12), cls="wide"),
                             _p(notes, "note"), _H("<h3>Fault models</h3>"), faults))
    if gates:
        nav.append(("gates", "gates"))
        rows = [[("pass" if g.get("passed") else _H("<b>FAIL</b>")), _label(g.get("point")), g.get("index"),
                 f"--{g.get('kind')}", "mean" if g.get("statistic") == "mean" else "interval's lower bound",
                 _fmt(g.get("threshold")), "–" if g.get("value") is None else _fmt(g["value"])] for g in gates]
        body.append(_section("gates", "Gates", _table(["result", "point", "#", "gate", "figure", "threshold", "value"], rows,
                                                      num=[2, 5, 6]),
                             _p("min-accuracy reads the point's accuracy, max-drop the fault-free accuracy minus it.", "note")))
    trial = rep.get("trial")
    if isinstance(trial, dict):
        nav.append(("trial", "trial"))
        faults = trial.get("faults") or []
        head = _kv([("point", f"{trial.get('point')} ({trial.get('label')})"), ("trial", trial.get("trial")),
                    ("rng", _code(trial.get("rng"))), ("accuracy", _pct(trial.get("accuracy"))),
                    ("SDC-1", _pct(trial.get("sdc1"))), ("faulty cells", trial.get("faulty_cells"))])
        body.append(_section("trial", "One trial, re-derived", head, _value(faults) if faults else _p("No faulty cell.")))
    per_layer = [r for r in rep.get("per_layer") or [] if isinstance(r, dict) and r.get("loss") is not None]
    if per_layer or rep.get("per_layer_fault"):
        nav.append(("per-layer", "per layer"))
        body.append(_per_layer_section(rep, per_layer, plots))
    if isinstance(rep.get("diagnostics"), dict):
        nav.append(("diagnostics", "diagnostics"))
        body.append(_diagnostics_section(rep["diagnostics"]))
    if isinstance(rep.get("activation_faults"), dict):
        nav.append(("activation-faults", "activation faults"))
        body.append(_section("activation-faults", "Activation-fault session", _value(rep["activation_faults"])))
    if rep.get("options"):
        nav.append(("options", "options"))
        body.append(_section("options", "Options", _value(rep["options"])))
    return title, sub, nav, body


def _per_layer_section(rep: dict, rows: list[dict], plots: _Plots) -> _H:
    f = rep.get("per_layer_fault") or {}
    parts: list[str] = [_p(f"{f.get('label', 'one fault point')} on one tensor at a time ({f.get('tensors', len(rows))} "
                           "tensors), ranked by accuracy loss: rank 1 loses the most.")]
    if rows:
        parts.append(plots.per_layer(rows))
        table = []
        for r in rows[:MAX_ROWS]:
            lci = r.get("loss_ci95")
            table.append([r.get("rank"), _label(r.get("tensor")), r.get("kind"), r.get("op"), r.get("elements"), r.get("trials"),
                          r.get("faulty_cells"), _fig_cell(r.get("accuracy")),
                          _H(_x(_pct(r["loss"])) + (f'<br><span class="ci">{_x(_ci_text(lci))}</span>' if lci else "")),
                          r.get("loss_per_fault"), _fig_cell(r.get("sdc1"))])
        parts.append(_table(["rank", "tensor", "kind", "op", "elements", "trials", "faulty cells", "accuracy [95% CI]",
                             "loss [95% CI]", "loss per faulty cell", "SDC-1 [95% CI]"], table,
                            num=[0, 4, 5, 6, 7, 8, 9, 10], cls="wide"))
    return _section("per-layer", "Per-layer vulnerability", *parts)


def _diagnostics_section(d: dict) -> _H:
    parts: list[str] = []
    sh = d.get("sharpness")
    if isinstance(sh, dict):
        ci = sh.get("ci")
        perturbation = (f"rho {_fmt(sh.get('rho'))}: {_fmt(sh.get('samples'))} random relative perturbations of the "
                        f"weights (seed {_fmt(sh.get('seed'))})")
        loss = f"{sh.get('loss')}: {_fmt(sh.get('loss_clean'))} clean, {_fmt(sh.get('loss_perturbed_mean'))} perturbed (mean)"
        rows = [("perturbation", perturbation),
                ("loss", loss),
                ("increase", f"{_fmt(sh.get('increase'))}" + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
                 + (f" at {_fmt(sh.get('confidence'))}" if sh.get("confidence") else "")),
                ("int8 codes changed", _pct(sh.get("codes_changed"), 1))]
        parts += [_H("<h3>Sharpness</h3>"), _kv(rows)]
    sp = d.get("sparsity")
    recs = d.get("activation_sparsity")
    if isinstance(recs, list) and recs:
        parts.append(_H("<h3>Activation sparsity</h3>"))
        if isinstance(sp, dict) and sp.get("mean") is not None:
            parts.append(_p(f"Inputs of the weight ops: mean {_pct(sp['mean'])} over {sp.get('layers')} layers, "
                            f"{_pct(sp.get('overall'))} of all their values are exact zeros."))
        parts.append(_table(["tensor", "kind", "op", "node", "elements", "zeros", "sparsity"],
                            [[_label(r.get("tensor")), r.get("kind"), r.get("op"), r.get("node"), r.get("elements"),
                              r.get("zeros"), _pct(r.get("sparsity"))] for r in recs[:MAX_ROWS] if isinstance(r, dict)],
                            num=[4, 5, 6], cls="wide"))
    rest = {k: v for k, v in d.items() if k not in ("sharpness", "sparsity", "activation_sparsity")}
    if rest:
        parts.append(_value(rest))
    return _section("diagnostics", "Diagnostics", *parts)


__all__ = ["MissingDependency", "load_report", "render_html", "require_matplotlib", "validate_report"]
