"""`harden tune`: self-tuning of an int8 QDQ model for one (simulated) analog PIM chip."""

from __future__ import annotations

import sys

import click

from ..fileio import atomic_write_text, check_output_path
from ..report import to_json
from ..tune import DEFAULT_PROBE_SAMPLES, GRANULARITIES, TuneOptions, tune
from ._common import quiet_option
from ._group import main


@main.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="Probe inputs (.npz keyed by input name; labels not needed); the first --probe-samples are used.")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the tuned model (never over an input).")
@click.option("--sigma-chip", "sigma_chip", required=True, type=float,
              help="Between-chip variability: std of theta_chip (one draw per layer per chip), e.g. 0.2.")
@click.option("--sigma-cell", "sigma_cell", default=0.0, show_default=True, type=float,
              help="Within-chip variability: std of theta_cell (one draw per weight).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the simulated chip: the chip of `harden simulate --seed SEED --fault variability:...`.")
@click.option("--chip", "chip", type=int, default=0, show_default=True,
              help="Which chip: trial CHIP of point 0 of that campaign (draws from rng([seed, 0, chip])).")
@click.option("--probe-samples", "probe_samples", type=int, default=DEFAULT_PROBE_SAMPLES, show_default=True,
              help="How many probe inputs to measure the gains with.")
@click.option("--per", "granularity", type=click.Choice(GRANULARITIES), default="channel", show_default=True,
              help="One gain per output channel, or one per layer.")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
              help="Also score the nominal, untuned and tuned model on this chip with this data (.npz).")
@click.option("--report", "report", type=click.Path(dir_okay=False), help="Also write the JSON record here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON record to stdout instead of the summary.")
@quiet_option
def tune_command(model, data, output, sigma_chip, sigma_cell, seed, chip, probe_samples, granularity, eval_data,
                 report, as_json, quiet):
    """Self-tune an int8 QDQ MODEL for one simulated analog PIM chip (METHODS.md section 4).

    The chip multiplies every weight by exp(theta_chip + theta_cell), theta_chip ~ N(0,
    sigma_chip^2) once per layer, theta_cell ~ N(0, sigma_cell^2) per weight. A few probe
    inputs run through the nominal model and through the chip; layer by layer, in forward
    order, the gain alpha = sum|y_ref - b| / sum|y_chip - b| of the layer's output (bias b
    removed) is folded into the layer's weight scale (and its int32 bias, which keeps its
    value). The gains and the chip are recorded in the metadata `harden.tune`.

    \b
    Examples:
      harden tune model.int8.onnx --data calib.npz --sigma-chip 0.2 --sigma-cell 0.02 \\
          --seed 0 --chip 3 -o model.chip3.onnx
      harden tune model.int8.onnx --data calib.npz --sigma-chip 0.3 --eval test.npz -o tuned.onnx
    """

    opts = TuneOptions(sigma_chip, sigma_cell, seed, chip, probe_samples, granularity)
    opts.validate()
    if report is not None:
        check_output_path(report, model, data, eval_data, output)
    result = tune(model, data, output, opts, eval_data)
    if report is not None:
        atomic_write_text(report, to_json(result))
    if as_json:
        sys.stdout.write(to_json(result))
    elif not quiet:
        click.echo(summary(result))


def summary(result: dict) -> str:
    rec = result["record"]
    c = rec["chip"]
    lines = [
        f"chip: variability sigma_chip {c['sigma_chip']:g}, sigma_cell {c['sigma_cell']:g}, rng {c['rng']}; "
        f"{rec['probe_samples']} probe inputs, one gain per {rec['granularity']}",
    ]
    for name, g in rec["gains"].items():
        if isinstance(g, list):
            lines.append(f"  {name:<40} gain {min(g):.4f} .. {max(g):.4f} ({len(g)} channels)")
        else:
            lines.append(f"  {name:<40} gain {g:.4f}")
    if rec.get("clipped"):
        lines.append(f"  clipped or unreached: {', '.join(rec['clipped'])}")
    ev = result.get("evaluation")
    if ev:
        scored = "labels" if ev["reference"] == "labels" else "agreement with the nominal model"
        lines.append(f"accuracy on {ev['samples']} samples ({scored}): nominal {100 * ev['nominal']:.2f}%, "
                     f"untuned on this chip {100 * ev['untuned_on_chip']:.2f}%, tuned {100 * ev['tuned_on_chip']:.2f}%")
    lines.append(f"wrote {result['output']} ({result['seconds']:.2f}s)")
    return "\n".join(lines)


__all__ = ["summary", "tune_command"]
