"""`harden apply`: the main job."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import GateFailed, InputError
from ..fileio import atomic_write_many, check_outputs
from ..fleet import apply_fleet
from ..gates import failure_line, fleet_gate_results, gate_results
from ..pipeline import ApplyOptions, apply
from ..report import fleet_table, summary_table, to_json
from ..report.html import render_html, require_matplotlib
from ..report.junit import apply_cases, junit_xml
from ..report.markdown import fleet_summary_markdown, summary_markdown
from ._common import progress_option, quiet_option, stage_printer
from ._group import main
from ._training import training_fields, training_options


@main.command("apply")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--faultmap", "faultmaps", required=True, multiple=True, type=click.Path(),
              help="The chip's fault map (HFM1, or CSV address,bit,stuck). Repeat it, or give a folder, to harden for a fleet: "
                   "-o is then a folder that gets one model per chip.")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="Calibration data (.npz keyed by input name, optional 'label').")
@click.option("-o", "--output", type=click.Path(), help="Hardened model path (a folder for a fleet). Default: MODEL.hardened.onnx (MODEL.hardened/) beside MODEL.")
@click.option("--report", "report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--eval-data", type=click.Path(dir_okay=False), help="Held-out data for the accuracy figures (default: every 4th sample of --data, held out of all fitting).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for everything random.")
@click.option("--clip/--no-clip", default=True, show_default=True, help="Hybrid clipped activations.")
@click.option("--clip-style", type=click.Choice(["zero", "saturate"]), default="zero", show_default=True)
@click.option("--clip-percentile", type=click.FloatRange(50, 100), default=None, help="Clip threshold = this percentile of calibration activations. Default: chosen among 100, 99.99, 99.9 by a short bias-flip campaign on the calibration data.")
@click.option("--compensation/--no-compensation", default=True, show_default=True, help="Error feedback of unfixable faults onto healthy weights.")
@click.option("--sequential/--no-sequential", default=True, show_default=True,
              help="Compensate layer by layer, each on the inputs the layers already hardened produce, so it also absorbs "
                   "their error (GPTQ's sequential mode; two calibration passes per layer). --no-sequential: every layer on "
                   "the plain int8 model's inputs, one pass for all.")
@click.option("--sign-choice/--no-sign-choice", default=True, show_default=True,
              help="Store an output channel's codes negated, with a negated per-channel scale, where that reads back "
                   "closer through the chip's stuck bits (a stuck sign bit then fits the channel's weights). "
                   "--no-sign-choice for a toolchain that needs positive scales.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True)
@click.option("--calib-samples", type=click.IntRange(1), default=256, show_default=True, help="Samples used for the compensation statistics.")
@click.option("--trials", type=click.IntRange(0), default=30, show_default=True, help="Trials per random fault point of the resilience campaign (0: no campaign).")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True, metavar="SECONDS",
              help="Time for the resilience campaign: fewer trials (the same for every model compared) when the planned ones "
                   "would not fit; the report says so.")
@click.option("--fault", "faults", multiple=True, metavar="SPEC", help="Random fault points for the campaign, e.g. bitflip:1e-3,1e-2 (repeatable). Default: bitflip:1e-3,1e-2 and, where the model has int32 biases, bitflip-bias:1e-3.")
@click.option("--min-accuracy", type=click.FloatRange(0, 1), help="Gate: exit 1 if hardened accuracy on this chip is below this.")
@click.option("--max-drop", type=click.FloatRange(0, 1), help="Gate: exit 1 if hardened-on-chip accuracy is more than this below fault-free int8.")
@click.option("--summary-md", type=click.Path(dir_okay=False),
              help="Write a Markdown summary (accuracies, chip, gates, passes) here, replacing the file; "
                   "append it to $GITHUB_STEP_SUMMARY for a CI job summary.")
@click.option("--pass", "extra_passes", multiple=True, metavar="NAME[@before:P|@after:P]",
              help="Place a harden.passes plugin in the plan (default: after quantize), e.g. --pass mypass@after:clip (repeatable).")
@click.option("--junit-xml", "junit", type=click.Path(dir_okay=False),
              help="Write the gates as JUnit XML here (one test case per gate; GitLab and Jenkins read it natively).")
@click.option("--layout", metavar="NAME[:K=V,...]", help="Memory layout plugin (default linear), e.g. tiled:rows=128,cols=128.")
@click.option("--html", "html", type=click.Path(dir_okay=False), help="Also write the self-contained HTML report here (needs harden[report]).")
@click.option("--jobs", type=click.IntRange(1), default=None, help="Fleet: worker processes for the per-chip work (default: one per core).")
@click.option("--cluster", envvar="HARDEN_CLUSTER", metavar="ADDRESS", default=None,
              help="Fleet: run the chips on a Dask cluster: 'local' (one worker per core) or a scheduler such as "
                   "tcp://host:8786 (env HARDEN_CLUSTER; needs harden[distributed]).")
@click.option("--yield-at", type=click.FloatRange(0, 1), default=None, help="Fleet: report the share of chips at or above this accuracy (default: fault-free int8 - 0.02).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout instead of the table.")
@training_options
@progress_option
@quiet_option
def apply_command(model, faultmaps, data, output, report, eval_data, seed, clip, clip_style, clip_percentile,
                  compensation, sequential, sign_choice, bias_correction, calib_samples, trials, budget, faults, min_accuracy, max_drop, summary_md, extra_passes, junit, layout, html, jobs, cluster, yield_at, as_json,
                  progress_lines, quiet, **training):
    """Harden MODEL for the chip whose faults are in --faultmap.

    Simplifies the model, clips its activations, quantizes it to int8 (QDQ), remaps every weight
    on a faulty word with fault-aware quantization plus error feedback and bias correction,
    then measures plain and hardened int8 as this chip would read them back.

    \b
    Example:
      harden apply samples/model.onnx --faultmap samples/chip.bin \\
          --data samples/calib.npz --eval-data samples/test.npz \\
          -o model.hardened.onnx --report report.json --min-accuracy 0.95
      harden apply samples/model.onnx --faultmap chips/ --data samples/calib.npz \
          -o hardened/ --report fleet.json --min-accuracy 0.9     # a fleet

    The outputs are written even when a gate fails (exit 1), so a pipeline can keep the report.
    """
    opts = ApplyOptions(
        clip=clip,
        clip_style=clip_style,
        clip_percentile=clip_percentile,
        compensation=compensation,
        sequential=sequential,
        sign_choice=sign_choice,
        bias_correction=bias_correction,
        calib_samples=calib_samples,
        seed=seed,
        trials=trials,
        budget=budget,
        layout=layout,
        passes=tuple(extra_passes),
        **({"faults": tuple(faults)} if faults else {}),
        **training_fields(training),
    )
    progress = stage_printer(quiet or as_json, "apply", progress_lines)
    if len(faultmaps) > 1 or Path(faultmaps[0]).is_dir():
        _apply_fleet(model, faultmaps, data, output, report, eval_data, opts, jobs, cluster, yield_at, summary_md, html, min_accuracy, max_drop,
                     as_json, quiet, progress, junit)
        return
    faultmap = faultmaps[0]
    extra = {}
    if summary_md is not None:
        extra[summary_md] = lambda rep: summary_markdown(rep, gate_results(rep, min_accuracy, max_drop))
    if html is not None:
        require_matplotlib()
        extra[html] = render_html
    if junit is not None:
        extra[junit] = lambda rep: junit_xml("harden apply", apply_cases(gate_results(rep, min_accuracy, max_drop)), rep.get("seconds"))
    result = apply(model, faultmap, data, output, report_path=report, eval_data_path=eval_data, options=opts,
                   progress=progress, extra_outputs=extra)
    if as_json:
        sys.stdout.write(to_json(result.report))
    elif not quiet:
        click.echo(summary_table(result.report))
        written = [str(result.output)] + [str(p) for p in (result.report_path, summary_md, html, junit) if p is not None]
        click.echo(f"wrote {', '.join(written[:-1])} and {written[-1]}" if len(written) > 1 else f"wrote {written[0]}")
    check_gates(result.report, min_accuracy, max_drop)


def check_gates(report: dict, min_accuracy: float | None, max_drop: float | None) -> None:
    """Raise GateFailed (exit 1) with one line when a resilience gate is not met."""
    for gate in gate_results(report, min_accuracy, max_drop):
        if not gate["passed"]:
            raise GateFailed(gate["message"])


def _apply_fleet(model, faultmaps, data, output, report, eval_data, opts, jobs, cluster, yield_at, summary_md, html, min_accuracy, max_drop,
                 as_json, quiet, progress, junit=None) -> None:
    """Fleet mode: one model per chip in the -o folder, one report for the fleet; the Markdown
    summary and the JUnit gates cover the whole fleet (every chip must pass a gate)."""
    if html is not None:
        raise InputError("--html is drawn for one chip; for a fleet use --report, --summary-md and the fleet table")
    extra_outputs = [p for p in (summary_md, junit) if p is not None]
    if extra_outputs:
        check_outputs(extra_outputs, [model, data, eval_data, *faultmaps])
    on_chip = (lambda name: click.echo(f"  ... {name} done", err=True)) if progress else None
    rep = apply_fleet(model, faultmaps, data, output, report_path=report, eval_data_path=eval_data, options=opts,
                      jobs=jobs, yield_at=yield_at, progress=progress, on_chip=on_chip, cluster=cluster)
    gates = fleet_gate_results(rep, min_accuracy, max_drop)
    files = []
    if summary_md is not None:
        files.append((summary_md, fleet_summary_markdown(rep, gates).encode("utf-8")))
    if junit is not None:
        files.append((junit, junit_xml("harden apply fleet", apply_cases(gates), rep.get("seconds")).encode("utf-8")))
    if files:
        atomic_write_many(files)
    if as_json:
        sys.stdout.write(to_json(rep))
    elif not quiet:
        click.echo(fleet_table(rep))
    failed = failure_line(gates)
    if failed:
        raise GateFailed(failed)
