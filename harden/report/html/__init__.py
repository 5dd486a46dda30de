"""The self-contained HTML page of a report: `page.py` (the sections), `plots.py` (matplotlib SVG),
`markup.py` (escaping HTML builders), `style.py` (colours, CSS)."""

from __future__ import annotations

from .page import COMMANDS, MissingDependency, load_report, render_html, require_matplotlib, validate_report

__all__ = ["COMMANDS", "MissingDependency", "load_report", "render_html", "require_matplotlib", "validate_report"]
