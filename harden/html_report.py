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

import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError
from .fileio import read_input
from .hostcheck import warning_line
from .report import REPORT_SCHEMA, pass_note

COMMANDS = ("apply", "simulate")

#: Colours of the variants apply measures (and of simulate's one model).
VARIANT_COLOURS = {"int8": "#d95f02", "int8+clip": "#7570b3", "hardened": "#1b9e77", "model": "#1f77b4"}
_PALETTE = ("#1f77b4", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
_VERDICT_COLOURS = {"helps": "#1b9e77", "hurts": "#d62728", "no measurable effect": "#9e9e9e"}

#: Rows shown at most in a list-like table (the JSON keeps everything).
MAX_ROWS = 500

_RC = {
    "svg.fonttype": "path",  # glyphs as paths: the page looks the same without the fonts installed
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 100,
}


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


class _H(str):
    """Trusted HTML (built here from escaped parts); everything else is escaped by `_x`."""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _x(v: Any) -> str:
    """A value as HTML: trusted fragments as they are, anything else formatted and escaped."""
    return v if isinstance(v, _H) else html.escape(_fmt(v), quote=True)


def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _ci_text(ci: Sequence[float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def _pts(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.2f}"


def _code(v: Any) -> _H:
    return _H(f"<code>{_x(v)}</code>")


def _label(v: Any) -> _H:
    """A fault point's label in a table cell: monospace, kept on one line."""
    return _H(f'<code class="label">{_x(v)}</code>')


def _fault_text(fault: Any) -> str:
    """A fault model's parameters on one line: 'rate 0.001, target weight'."""
    if not isinstance(fault, dict):
        return _fmt(fault)
    return ", ".join(f"{k} {f'0x{v:08x}' if k == 'crc32' and isinstance(v, int) else _fmt(v)}"
                     for k, v in fault.items() if k != "name")


def _table(head: Sequence[Any], rows: Iterable[Sequence[Any]], *, num: Iterable[int] = (), cls: str = "") -> _H:
    """A table; `num` lists the columns to right-align (numbers)."""
    num = set(num)
    out = [f'<div class="scroll"><table class="{_x(cls)}"><thead><tr>']
    out += [f'<th{" class=num" if i in num else ""}>{_x(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td{" class=num" if i in num else ""}>{_x(c)}</td>' for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table></div>")
    return _H("".join(out))


def _kv(rows: Iterable[tuple[Any, Any]]) -> _H:
    return _H('<table class="kv"><tbody>' + "".join(f"<tr><th>{_x(k)}</th><td>{_x(v)}</td></tr>" for k, v in rows)
              + "</tbody></table>")


def _value(v: Any) -> _H:
    """Any JSON value as HTML: objects as key/value tables, lists of objects as tables."""
    if isinstance(v, dict):
        return _kv((k, _value(x)) for k, x in v.items()) if v else _H("{}")
    if isinstance(v, list):
        if v and all(isinstance(r, dict) for r in v):
            cols: list[str] = []
            for r in v:
                cols += [k for k in r if k not in cols]
            rows = [[_value(r.get(c)) if isinstance(r.get(c), (dict, list)) else r.get(c) for c in cols] for r in v[:MAX_ROWS]]
            numeric = [i for i, c in enumerate(cols) if all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                                                            for r in v if r.get(c) is not None)]
            more = f'<p class="note">{len(v) - MAX_ROWS} more rows in the JSON report.</p>' if len(v) > MAX_ROWS else ""
            return _H(_table(cols, rows, num=numeric) + more)
        shown = ", ".join(_x(x) for x in v[:32])
        return _H(shown + (f", … ({len(v)} in all)" if len(v) > 32 else ""))
    return _H(_x(v))


def _section(ident: str, title: str, *body: str) -> _H:
    return _H(f'<section id="{_x(ident)}"><h2>{_x(title)}</h2>' + "".join(body) + "</section>")


def _p(text: str, cls: str = "") -> _H:
    return _H(f'<p{f" class={cls}" if cls else ""}>{_x(text)}</p>')


def _ci(fig: dict | None) -> list | None:
    """The 95 % interval of a figure: `ci95` (simulate) or `ci` (apply's resilience)."""
    if not isinstance(fig, dict):
        return None
    ci = fig.get("ci95", fig.get("ci"))
    return ci if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci else None


_RATE_LABEL = re.compile(r"^(?P<name>[^:]+):(?P<rate>[0-9.]+(?:[eE][-+]?[0-9]+)?)(?P<suffix>@.*)?$", re.DOTALL)


def _split_label(label: str) -> tuple[str, float | None]:
    """'bitflip:0.001' -> ('bitflip', 0.001), 'bitflip:0.01@conv1' -> ('bitflip@conv1', 0.01);
    a point without one rate (a chip, variability:0.1,0.05) -> (label, None)."""
    m = _RATE_LABEL.match(str(label))
    if m:
        try:
            rate = float(m["rate"])
        except ValueError:
            rate = -1.0
        if math.isfinite(rate) and rate > 0:
            return m["name"] + (m["suffix"] or ""), rate
    return str(label), None


def _colour(name: str, index: int) -> str:
    return VARIANT_COLOURS.get(name) or _PALETTE[index % len(_PALETTE)]


def _trunc(text: Any, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _short(text: str, n: int = 32) -> str:
    """A label for a plot: at most n characters, and '$' escaped so matplotlib never reads a chip
    id or tensor name as mathtext (the tick labels of the log axes need mathtext on)."""
    return _trunc(text, n).replace("$", r"\$")


# --- plots -----------------------------------------------------------------------------------


class _Plots:
    """Makes the figures and turns each into an inline <svg> with its own salted ids."""

    def __init__(self) -> None:
        import matplotlib
        from matplotlib.figure import Figure

        self._mpl = matplotlib
        self._Figure = Figure
        self.count = 0

    def figure(self, w: float, h: float):
        return self._Figure(figsize=(w, h), layout="constrained")

    def svg(self, fig, title: str, caption: str = "") -> _H:
        self.count += 1
        n = self.count
        buf = io.StringIO()
        with self._mpl.rc_context({"svg.hashsalt": f"harden-report-{n}"}):
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
        svg = buf.getvalue()
        svg = svg[svg.index("<svg"):]
        svg = re.sub(r"<!--.*?-->", "", svg, flags=re.DOTALL)
        svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.DOTALL)
        head_end = svg.index(">")
        head = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg[:head_end])
        head = re.sub(r'\s+version="[^"]*"', "", head)
        svg = f'{head} role="img" aria-label="{_x(title)}"{svg[head_end:]}'
        # ids unique in the page: matplotlib's glyph ids (e.g. DejaVuSans-31) repeat across figures
        ids = set(re.findall(r'\sid="([^"]+)"', svg))
        prefix = f"f{n}-"
        svg = re.sub(r'(\sid=")([^"]+)"', lambda m: f'{m.group(1)}{prefix}{m.group(2)}"', svg)
        svg = re.sub(r'(href="#|url\(#)([^")]+)',
                     lambda m: m.group(1) + (prefix + m.group(2) if m.group(2) in ids else m.group(2)), svg)
        svg = re.sub(r">\s+<", "><", svg).strip()
        cap = f"<figcaption>{_x(caption)}</figcaption>" if caption else ""
        return _H(f'<figure class="plot" id="plot-{n}">{svg}{cap}</figure>')

    # one plot per figure kind ----------------------------------------------------------------

    def accuracy_bars(self, acc: dict) -> _H:
        rows = [(label, acc.get(key), colour) for key, label, colour in (
            ("float", "float", "#9e9e9e"), ("int8", "int8, fault-free", "#fdb863"),
            ("int8_on_chip", "int8 on this chip", VARIANT_COLOURS["int8"]),
            ("hardened_on_chip", "hardened on this chip", VARIANT_COLOURS["hardened"]))]
        rows = [r for r in rows if r[1] is not None]
        fig = self.figure(8, 0.45 * len(rows) + 0.8)
        ax = fig.add_subplot()
        y = list(range(len(rows)))[::-1]
        ax.barh(y, [r[1] for r in rows], color=[r[2] for r in rows], height=0.6)
        for yi, (_, v, _) in zip(y, rows):
            ax.text(min(v, 1.0) + 0.01, yi, f"{100 * v:.2f}%", va="center")
        ax.set_yticks(y, [r[0] for r in rows])
        ax.set_xlim(0, 1.12)
        ax.xaxis.set_major_formatter(self._mpl.ticker.PercentFormatter(1.0))
        ax.set_xlabel("accuracy")
        ax.grid(axis="y", visible=False)
        return self.svg(fig, "accuracy on this chip", "Accuracy of each model as this chip reads its weights back.")

    def against_rate(self, series: list[dict], labels: Sequence[str], metric: str, what: str) -> _H | None:
        """Mean and 95 % band of `metric` ('acc' or 'sdc1') against the fault rate, one panel per
        fault family on a log axis; points without a rate (a chip) in a last, categorical panel."""
        families: dict[str, list[tuple[float, str]]] = {}
        fixed: list[str] = []
        for label in labels:
            fam, rate = _split_label(label)
            if rate is None:
                fixed.append(label)
            else:
                families.setdefault(fam, []).append((rate, label))
        if not any(s["points"].get(lb, {}).get(metric) for s in series for lb in labels):
            return None
        panels = [*families.items()] + ([("", [])] if fixed else [])
        ncols = len(panels) if len(panels) <= 4 else 3
        nrows = math.ceil(len(panels) / ncols)
        fig = self.figure(min(3.6 * ncols + 0.6, 11.5), 2.9 * nrows + 0.5)
        # the y range: 0 to 100 %, wider where an interval runs past it (few trials, t quantiles)
        ends = [e for s in series for lb in labels for f in [s["points"].get(lb, {}).get(metric)] if f
                for e in (f["ci"] or (f["mean"], f["mean"]))]
        ylim = (min([0.0, *ends]) - (0.02 if min([0.0, *ends]) < 0 else 0), max([1.05, *(e + 0.02 for e in ends)]))
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        nv = len(series)
        pct = self._mpl.ticker.PercentFormatter(1.0)
        for ax, (fam, pts) in zip(axes, panels):
            if pts:
                pts = sorted(pts)
                for k, s in enumerate(series):
                    shift = 10 ** (0.04 * (k - (nv - 1) / 2))  # dodge so the error bars do not overlap
                    xs, ms, lo, hi = [], [], [], []
                    for rate, label in pts:
                        f = s["points"].get(label, {}).get(metric)
                        if not f:
                            continue
                        ci = f["ci"] or (f["mean"], f["mean"])
                        xs.append(rate * shift)
                        ms.append(f["mean"])
                        lo.append(ci[0])
                        hi.append(ci[1])
                    if not xs:
                        continue
                    ax.fill_between(xs, lo, hi, color=s["colour"], alpha=0.15, linewidth=0)
                    ax.errorbar(xs, ms, yerr=[[m - a for m, a in zip(ms, lo)], [b - m for m, b in zip(ms, hi)]],
                                color=s["colour"], marker="o", markersize=4, capsize=3, linewidth=1.5, label=_short(s["name"]))
                    if metric == "acc" and s.get("clean") is not None:
                        ax.axhline(s["clean"], color=s["colour"], linestyle=":", linewidth=1)
                ax.set_xscale("log")
                rates = [r for r, _ in pts]
                ax.set_xlim(min(rates) / 10 ** 0.35, max(rates) * 10 ** 0.35)
                ax.set_xticks(rates, [f"{r:g}" for r in rates], rotation=30 if len(rates) > 4 else 0)
                ax.xaxis.set_minor_locator(self._mpl.ticker.NullLocator())
                ax.set_title(_short(fam))
                ax.set_xlabel("fault rate (per bit)")
            else:
                width = 0.8 / nv
                for k, s in enumerate(series):
                    for j, label in enumerate(fixed):
                        f = s["points"].get(label, {}).get(metric)
                        if not f:
                            continue
                        x = j + (k - (nv - 1) / 2) * width
                        ax.bar(x, f["mean"], width=width * 0.9, color=s["colour"], alpha=0.85)
                        if f["ci"]:
                            ax.errorbar(x, f["mean"], yerr=[[f["mean"] - f["ci"][0]], [f["ci"][1] - f["mean"]]],
                                        color="#333333", capsize=3, linewidth=1)
                        ax.text(x, f["mean"] + 0.02, f"{100 * f['mean']:.1f}%", ha="center", fontsize=7)
                ax.set_xticks(range(len(fixed)), [_short(lb, 24) for lb in fixed])
                ax.set_xlim(-0.6, len(fixed) - 0.4)
                one = all((s["points"].get(lb) or {}).get("trials") in (1, None) for s in series for lb in fixed)
                ax.set_title("fixed faults (one trial)" if one else "other points")
                ax.grid(axis="x", visible=False)
            ax.set_ylim(*ylim)
            ax.yaxis.set_major_formatter(pct)
            ax.set_ylabel(what)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        handles, names = [], []
        for ax in axes[: len(panels)]:
            for h, n in zip(*ax.get_legend_handles_labels()):  # labels already escaped
                if n not in names:
                    handles.append(h)
                    names.append(n)
        if metric == "acc" and any(s.get("clean") is not None for s in series):
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], color="#555555", linestyle=":", linewidth=1))
            names.append("fault-free")
        if len(names) > 1 or series[0]["name"] != "model":
            fig.legend(handles, names, loc="outside lower center", ncols=len(names))
        caption = (f"{what[0].upper() + what[1:]} against the fault rate: mean over the trials, 95 % confidence "
                   "interval as error bars and band" + ("; dotted: fault-free." if metric == "acc" else "."))
        return self.svg(fig, f"{what} against fault rate", caption)

    def ablation(self, rows: list[dict]) -> _H:
        fig = self.figure(9, 0.32 * len(rows) + 1.1)
        ax = fig.add_subplot()
        y = list(range(len(rows)))[::-1]
        gains = [r["gain"] for r in rows]
        lo = [r["gain"] - (r.get("ci95") or [r["gain"]] * 2)[0] for r in rows]
        hi = [(r.get("ci95") or [r["gain"]] * 2)[1] - r["gain"] for r in rows]
        colours = [_VERDICT_COLOURS.get(r.get("verdict"), "#9e9e9e") for r in rows]
        ax.barh(y, gains, color=colours, height=0.6)
        ax.errorbar(gains, y, xerr=[lo, hi], fmt="none", ecolor="#333333", capsize=3, linewidth=1)
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_yticks(y, [_short(f"{r['pass']} @ {_trunc(r['point'], 28)}", 40) for r in rows])
        ax.xaxis.set_major_formatter(self._mpl.ticker.FuncFormatter(lambda v, _: f"{100 * v:+.0f}"))
        ax.set_xlabel("accuracy gain of the pass (percentage points), paired over the trials")
        ax.grid(axis="y", visible=False)
        from matplotlib.patches import Patch

        fig.legend([Patch(color=c) for c in _VERDICT_COLOURS.values()], list(_VERDICT_COLOURS),
                   loc="outside lower center", ncols=len(_VERDICT_COLOURS))
        return self.svg(fig, "ablation: gain of each pass", "Gain of each pass at each fault point with its 95 % "
                        "confidence interval (paired differences, trial by trial). A pass helps only when its whole "
                        "interval is above zero.")

    def faq_layers(self, layers: list[dict]) -> _H:
        n = len(layers)
        fig = self.figure(max(8.0, min(0.55 * n + 3, 11.5)), 5.2 if n <= 30 else 4.6)
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        x = list(range(n))
        faulty = [ly.get("on_faulty_words", 0) for ly in layers]
        forced = [ly.get("forced", 0) for ly in layers]
        ax1.bar(x, faulty, color="#fdb863", label="weights on faulty words")
        ax1.bar(x, forced, color="#b35806", width=0.5, label="of those, absorbed by error feedback")
        ax1.set_ylabel("weights")
        ax1.legend(loc="upper left")
        ax1.grid(axis="x", visible=False)
        w = 0.4
        ax2.bar([i - w / 2 for i in x], [ly.get("rms_error_plain") or 0 for ly in layers], width=w,
                color=VARIANT_COLOURS["int8"], label="plain int8")
        ax2.bar([i + w / 2 for i in x], [ly.get("rms_error_faq") or 0 for ly in layers], width=w,
                color=VARIANT_COLOURS["hardened"], label="FAQ")
        ax2.set_ylabel("RMS error (int8 codes)")
        ax2.legend(loc="upper left")
        ax2.grid(axis="x", visible=False)
        if n <= 30:
            ax2.set_xticks(x, [_short(ly.get("tensor", "?"), 22) for ly in layers], rotation=30, ha="right")
        else:
            ax2.set_xlabel("layer (index in the table below)")
        return self.svg(fig, "FAQ per layer", "Per weight tensor: weights on faulty words (top) and the RMS error "
                        "of the weights as this chip reads them back, plain int8 against FAQ (bottom).")

    def trials_spread(self, points: list[dict], clean: float | None) -> _H:
        """simulate: per-trial accuracy of every point (box, trials, mean with its 95 % interval)."""
        import numpy as np

        n = len(points)
        fig = self.figure(9, 0.42 * n + 1.2)
        ax = fig.add_subplot()
        y = list(range(n))[::-1]
        rng = np.random.default_rng(0)  # jitter: fixed, so the page is deterministic
        for yi, p in zip(y, points):
            acc = (p.get("per_trial") or {}).get("accuracy") or [p["accuracy"]["mean"]]
            if len(acc) > 1:
                ax.boxplot([acc], positions=[yi], orientation="horizontal", widths=0.5, showfliers=False,
                           medianprops={"color": "#555555"}, boxprops={"color": "#999999"},
                           whiskerprops={"color": "#999999"}, capprops={"color": "#999999"})
            ax.scatter(acc, yi + rng.uniform(-0.18, 0.18, len(acc)), s=6, color="#1f77b4", alpha=0.35, linewidths=0)
            a = p["accuracy"]
            ci = _ci(a)
            ax.errorbar([a["mean"]], [yi], xerr=None if not ci else [[a["mean"] - ci[0]], [ci[1] - a["mean"]]],
                        fmt="D", color="#d62728", markersize=5, capsize=4, linewidth=1.5)
        if clean is not None:
            ax.axvline(clean, color="#333333", linestyle=":", linewidth=1)
        ax.set_yticks(y, [_short(p["label"], 30) for p in points])
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xlim(0, 1.02)
        ax.xaxis.set_major_formatter(self._mpl.ticker.PercentFormatter(1.0))
        ax.set_xlabel("accuracy per trial")
        ax.grid(axis="y", visible=False)
        return self.svg(fig, "per-trial accuracy of every point", "Accuracy of every trial (dots), its spread "
                        "(box: quartiles), the mean with its 95 % confidence interval (red); dotted: fault-free.")

    def per_layer(self, rows: list[dict]) -> _H:
        """simulate --per-layer: accuracy loss of each tensor (ranked) with its 95 % interval."""
        shown = rows[:40]
        fig = self.figure(9, 0.3 * len(shown) + 1.1)
        ax = fig.add_subplot()
        y = list(range(len(shown)))[::-1]
        loss = [r["loss"] for r in shown]
        cis = [r.get("loss_ci95") or [r["loss"]] * 2 for r in shown]
        ax.barh(y, loss, color="#e6550d", height=0.6)
        ax.errorbar(loss, y, xerr=[[v - c[0] for v, c in zip(loss, cis)], [c[1] - v for v, c in zip(loss, cis)]],
                    fmt="none", ecolor="#333333", capsize=3, linewidth=1)
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_yticks(y, [_short(f"{r.get('rank')}. {r.get('tensor')}", 40) for r in shown])
        ax.xaxis.set_major_formatter(self._mpl.ticker.FuncFormatter(lambda v, _: f"{100 * v:.0f}"))
        ax.set_xlabel("accuracy loss (percentage points)")
        ax.grid(axis="y", visible=False)
        more = f" The {len(rows) - len(shown)} least vulnerable tensors are in the table only." if len(rows) > len(shown) else ""
        return self.svg(fig, "per-layer vulnerability", "Accuracy lost when the fault point hits only this tensor, "
                        "with its 95 % confidence interval." + more)

    def timings(self, passes: list[dict]) -> _H | None:
        rows = [(r.get("pass", "?"), r["seconds"]) for r in passes if isinstance(r.get("seconds"), (int, float))]
        if not rows:
            return None
        fig = self.figure(8, 0.3 * len(rows) + 0.9)
        ax = fig.add_subplot()
        y = list(range(len(rows)))[::-1]
        ax.barh(y, [s for _, s in rows], color="#80b1d3", height=0.6)
        top = max(s for _, s in rows) or 1.0
        for yi, (_, s) in zip(y, rows):
            ax.text(s + 0.01 * top, yi, f"{s:.2f} s", va="center")
        ax.set_xlim(0, top * 1.15)
        ax.set_yticks(y, [_short(n) for n, _ in rows])
        ax.set_xlabel("seconds")
        ax.grid(axis="y", visible=False)
        return self.svg(fig, "pass timings", "Wall time of each pass.")


# --- the page --------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1d2329;--muted:#5b6670;--line:#dde2e6;--bg:#ffffff;--head:#f4f6f8;--accent:#1b9e77}
*{box-sizing:border-box}
body{margin:0;background:#eef1f4;color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:var(--bg);min-height:100vh}
header h1{margin:0 0 4px;font-size:24px}
header .sub{color:var(--muted);margin:0 0 12px}
h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:20px 0 8px}
nav{margin:10px 0 6px;font-size:13px}
nav a{color:#2a6496;text-decoration:none;margin-right:14px;white-space:nowrap}
nav a:hover{text-decoration:underline}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0 4px}
.card{flex:1 1 170px;border:1px solid var(--line);border-radius:6px;padding:10px 14px;background:var(--head)}
.card .v{font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}
.card .k{color:var(--muted);font-size:12px}
.card.good .v{color:#13795b}.card.bad .v{color:#b3401b}
.scroll{overflow-x:auto;margin:6px 0 12px}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:var(--head);font-weight:600;position:sticky;top:0}
tbody tr:nth-child(even) td{background:#fafbfc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.num{white-space:nowrap}
table.kv tbody tr td{background:none}
table.kv th{background:none;font-weight:600;color:var(--muted);white-space:nowrap;padding-right:18px}
table.kv table.kv th,table.kv table.kv td{border:none;padding:1px 8px 1px 0}
code{font:12px/1.3 ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;overflow-wrap:anywhere}
td code.label{white-space:nowrap;overflow-wrap:normal}
table.wide{font-size:12.5px}table.wide th,table.wide td{padding:4px 7px}
figure.plot{margin:12px 0 20px;text-align:center}
figure.plot svg{max-width:100%;height:auto}
figcaption{color:var(--muted);font-size:12.5px;margin-top:4px;text-align:left}
.note{color:var(--muted);font-size:12.5px}
.ci{color:var(--muted);font-size:11.5px}
.nw{white-space:nowrap}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;color:#fff;white-space:nowrap}
.helps{background:#1b9e77}.hurts{background:#d62728}.none{background:#9e9e9e}
details{margin:6px 0;border:1px solid var(--line);border-radius:5px;padding:4px 10px}
details>summary{cursor:pointer;font-weight:600}
footer{margin-top:40px;color:var(--muted);font-size:12px;border-top:1px solid var(--line);padding-top:8px}
@media print{body{background:#fff}main{max-width:none;padding:0}nav{display:none}details{border:none}}
"""


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
        nav += [("resilience", "resilience"), ("sdc", "SDC-1"), ("points", "every point"), ("ablation", "ablation")]
        names = ", ".join(f"{s['name']}" + (f" (+{s['adds']})" if s["adds"] else "") for s in series)
        parts = [_p(f"The same fault campaign on the model after each pass ({names}): {rb.get('trials', '?')} trials per "
                    f"random point, seed {rb.get('seed', '?')}; trial t of every variant gets the same faults.")]
        parts += [_p(f"Left out {sk.get('point')}: {sk.get('why')}", "note") for sk in rb.get("skipped_points") or []]
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
