"""`harden quantize`: the plain int8 model, exactly as `apply` builds it before FAQ."""

from __future__ import annotations

import sys

import click

from ..fileio import atomic_write_text, check_output_path
from ..options import ApplyOptions
from ..pipeline import quantize
from ..report import pass_note, to_json
from ._common import quiet_option, show_progress
from ._group import main
from ._training import training_fields, training_options


@main.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="Calibration data, as for apply.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="The int8 model. Default: MODEL.int8.onnx beside MODEL.")
@click.option("--eval-data", type=click.Path(dir_okay=False),
              help="As given to apply: without it, apply (and so quantize) calibrates on the part of --data it does not hold out.")
@click.option("--report", "report", type=click.Path(dir_okay=False), help="Also write the JSON record of the passes here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--clip/--no-clip", default=True, show_default=True, help="Hybrid clipped activations, as apply.")
@click.option("--clip-style", type=click.Choice(["zero", "saturate"]), default="zero", show_default=True)
@click.option("--clip-percentile", type=click.FloatRange(50, 100), default=None, help="As apply (default: chosen by the clip search).")
@click.option("--pass", "extra_passes", multiple=True, metavar="NAME[@before:P|@after:P]", help="A harden.passes plugin in the plan, as apply.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON record to stdout.")
@training_options
@quiet_option
def quantize_command(model, data, output, eval_data, report, seed, clip, clip_style, clip_percentile, extra_passes, as_json, quiet,
                     **training):
    """Quantize MODEL to int8 QDQ exactly as `harden apply` does before FAQ: the same plan
    (simplify, clip search, clip, [training], quantize) and the same calibration samples, so
    the plain int8 baseline can be simulated on its own.

    \b
    Example:
      harden quantize samples/model.onnx --data samples/calib.npz -o model.int8.onnx
      harden simulate model.int8.onnx --data samples/test.npz --fault bitflip:1e-3,1e-2
    """
    opts = ApplyOptions(clip=clip, clip_style=clip_style, clip_percentile=clip_percentile, seed=seed, trials=0,
                        passes=tuple(extra_passes), **training_fields(training))
    if report is not None:
        check_output_path(report, model, data, eval_data)
    progress = (lambda stage: click.echo(f"  ... {stage}", err=True)) if show_progress(quiet) else None  # noqa: E731
    result = quantize(model, data, output, eval_data_path=eval_data, options=opts, progress=progress)
    if report is not None:
        atomic_write_text(report, to_json(result.report))
    if as_json:
        sys.stdout.write(to_json(result.report))
    elif not quiet:
        for rec in result.report["passes"]:
            click.echo(f"  {rec['pass']:<11} {rec.get('seconds', 0):7.2f}s  {pass_note(rec)}")
        click.echo(f"wrote {result.output}")
