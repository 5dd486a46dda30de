"""Small HTML builders and formatters every part of the page uses (everything from the report is escaped)."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .style import _PALETTE, VARIANT_COLOURS

#: Rows shown at most in a list-like table (the JSON keeps everything).
MAX_ROWS = 500


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
