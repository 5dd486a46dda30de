"""The plots, as inline SVG from matplotlib (imported only when a page is drawn)."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

from .markup import _H, _ci, _short, _split_label, _trunc, _x
from .style import _VERDICT_COLOURS, VARIANT_COLOURS


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
