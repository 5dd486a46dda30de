"""`harden apply`: the main job."""

from __future__ import annotations

import sys

import click

from ..errors import GateFailed
from ..gates import gate_results
from ..pipeline import ApplyOptions, apply
from ..report import summary_table, to_json
from . import main
from ._common import quiet_option, show_progress


@main.command("apply")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--faultmap", "faultmap", required=True, type=click.Path(dir_okay=False), help="The chip's fault map (HFM1, or CSV address,bit,stuck).")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="Calibration data (.npz keyed by input name, optional 'label').")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Hardened model path. Default: MODEL.hardened.onnx beside MODEL.")
@click.option("--report", "report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--eval-data", type=click.Path(dir_okay=False), help="Held-out data for the accuracy figures (default: --data).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for everything random.")
@click.option("--clip/--no-clip", default=True, show_default=True, help="Hybrid clipped activations.")
@click.option("--clip-style", type=click.Choice(["zero", "saturate"]), default="zero", show_default=True)
@click.option("--clip-percentile", type=click.FloatRange(50, 100), default=None, help="Clip threshold = this percentile of calibration activations. Default: chosen among 100, 99.99, 99.9 by a short bias-flip campaign on the calibration data.")
@click.option("--compensation/--no-compensation", default=True, show_default=True, help="Error feedback of unfixable faults onto healthy weights.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True)
@click.option("--calib-samples", type=click.IntRange(1), default=256, show_default=True, help="Samples used for the compensation statistics.")
@click.option("--trials", type=click.IntRange(0), default=30, show_default=True, help="Trials per random fault point of the resilience campaign (0: no campaign).")
@click.option("--fault", "faults", multiple=True, metavar="SPEC", help="Random fault points for the campaign, e.g. bitflip:1e-3,1e-2 (repeatable). Default: bitflip:1e-3,1e-2 and bitflip-bias:1e-3.")
@click.option("--min-accuracy", type=click.FloatRange(0, 1), help="Gate: exit 1 if hardened accuracy on this chip is below this.")
@click.option("--max-drop", type=click.FloatRange(0, 1), help="Gate: exit 1 if hardened-on-chip accuracy is more than this below fault-free int8.")
@click.option("--summary-md", type=click.Path(dir_okay=False),
              help="Write a Markdown summary (accuracies, chip, gates, passes) here, replacing the file; "
                   "append it to $GITHUB_STEP_SUMMARY for a CI job summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout instead of the table.")
@quiet_option
def apply_command(model, faultmap, data, output, report, eval_data, seed, clip, clip_style, clip_percentile,
                  compensation, bias_correction, calib_samples, trials, faults, min_accuracy, max_drop, summary_md, as_json, quiet):
    """Harden MODEL for the chip whose faults are in --faultmap.

    Simplifies the model, clips its activations, quantizes it to int8 (QDQ), remaps every weight
    on a faulty word with fault-aware quantization plus error feedback and bias correction,
    then measures plain and hardened int8 as this chip would read them back.

    \b
    Example:
      harden apply samples/model.onnx --faultmap samples/chip.bin \\
          --data samples/calib.npz --eval-data samples/test.npz \\
          -o model.hardened.onnx --report report.json --min-accuracy 0.95

    The outputs are written even when a gate fails (exit 1), so a pipeline can keep the report.
    """
    opts = ApplyOptions(
        clip=clip,
        clip_style=clip_style,
        clip_percentile=clip_percentile,
        compensation=compensation,
        bias_correction=bias_correction,
        calib_samples=calib_samples,
        seed=seed,
        trials=trials,
        **({"faults": tuple(faults)} if faults else {}),
    )
    progress = None
    if show_progress(quiet):
        progress = lambda stage: click.echo(f"  ... {stage}", err=True)  # noqa: E731
    extra = None
    if summary_md is not None:
        from ..summary_md import summary_markdown

        extra = {summary_md: lambda rep: summary_markdown(rep, gate_results(rep, min_accuracy, max_drop))}
    result = apply(model, faultmap, data, output, report_path=report, eval_data_path=eval_data, options=opts,
                   progress=progress, extra_outputs=extra)
    if as_json:
        sys.stdout.write(to_json(result.report))
    elif not quiet:
        click.echo(summary_table(result.report))
        written = [str(result.output)] + [str(p) for p in (result.report_path, summary_md) if p is not None]
        click.echo(f"wrote {', '.join(written[:-1])} and {written[-1]}" if len(written) > 1 else f"wrote {written[0]}")
    check_gates(result.report, min_accuracy, max_drop)


def check_gates(report: dict, min_accuracy: float | None, max_drop: float | None) -> None:
    """Raise GateFailed (exit 1) with one line when a resilience gate is not met."""
    for gate in gate_results(report, min_accuracy, max_drop):
        if not gate["passed"]:
            raise GateFailed(gate["message"])
