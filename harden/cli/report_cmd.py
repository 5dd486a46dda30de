"""`harden report`: a JSON report (apply or simulate) as one self-contained HTML page."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import InputError
from ..fileio import atomic_write_text, check_output_path
from ..report.html import load_report, render_html, require_matplotlib
from ._common import echo, quiet_option
from ._group import main


@main.command("report")
@click.argument("report_path", metavar="REPORT.json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="HTML page to write, replacing the file. Default: REPORT.html beside REPORT.json.")
@quiet_option
def report_command(report_path: str, output: str | None, quiet: bool) -> None:
    """Render REPORT.json (written by apply --report or simulate --report) as one HTML page.

    The page is self-contained: inline CSS, the plots as inline SVG, no JavaScript and no
    external file, so a CI job can attach it as an artifact. It shows the inputs with their
    sha256, the chip, the accuracy table, accuracy and SDC-1 against the fault rate with 95 %
    confidence bands, the ablation gains, the FAQ per-layer figures, every point and the passes
    with their timings. Needs matplotlib: pip install 'harden[report]'.

    \b
    Example:
      harden apply samples/model.onnx --faultmap samples/chip.bin --data samples/calib.npz \\
          --eval-data samples/test.npz -o model.hardened.onnx --report report.json
      harden report report.json -o report.html
    """
    out = Path(output) if output is not None else Path(report_path).with_suffix(".html")
    check_output_path(out, report_path)
    report = load_report(report_path)
    require_matplotlib()
    try:
        page = render_html(report)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        if os.environ.get("HARDEN_DEBUG"):
            raise
        raise InputError(f"{report_path}: a field of the report has an unexpected shape "
                         f"({type(exc).__name__}: {exc}); was it edited by hand?") from None
    atomic_write_text(out, page)
    echo(f"wrote {out} ({len(page.encode('utf-8')) / 1024:.0f} KiB, {page.count('<svg')} plots)", quiet)
