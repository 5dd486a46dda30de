"""`harden simulate`: fault-injection campaigns on an int8 QDQ model (or a float model with
float32 weight faults), in onnxruntime, with optional gates at named fault points."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..campaign import CampaignOptions, simulate
from ..errors import GateFailed, InputError
from ..fileio import atomic_write_many, check_outputs
from ..gates import PointGate, failure_line
from ..report import to_json
from ..report.html import render_html, require_matplotlib
from ..report.junit import junit_xml, point_cases
from ..report.markdown import simulate_summary_markdown
from ._common import quiet_option, show_progress
from ._group import main


def _show_trial(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    p, sep, t = text.partition(":")
    try:
        if not sep:
            raise ValueError
        point, trial = int(p), int(t)
    except ValueError:
        raise InputError(f"--show-trial takes POINT:TRIAL (two integers, e.g. 0:17), got {text!r}") from None
    if point < 0 or trial < 0:
        raise InputError(f"--show-trial: POINT and TRIAL must be >= 0, got {text!r}")
    return point, trial


@main.command("simulate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="Evaluation data (.npz keyed by input name, optional 'label'; without labels: top-1 agreement with the fault-free model).")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Fault model and its points, repeatable: bitflip:RATE,... (int8 weights), bitflip-bias:RATE,... "
                   "(int32 biases), stuckat:RATE,... (random stuck-at cells), chip:MAP, bitflip-act:RATE,... "
                   "(quantized activations, per sample), variability:SIGMA_CHIP[,SIGMA_CELL] (analog); on a FLOAT model: "
                   "bitflip-fp32:RATE,... (bit flips in its float32 weights).")
@click.option("--faultmap", "faultmaps", multiple=True, type=click.Path(dir_okay=False), metavar="CHIP",
              help="A chip's fault map (HFM1 or CSV) as one more point; repeatable. Same as --fault chip:CHIP.")
@click.option("--trials", type=int, default=None, help="Trials per point [default: 100; with --margin, Leveugle's n for it]; the cap when --margin is given.")
@click.option("--margin", type=float, default=None, help="Stop a point once its accuracy interval's half-width is within this margin, e.g. 0.01.")
@click.option("--budget", type=float, default=None, metavar="SECONDS",
              help="Time for the whole campaign: each point gets an equal share of what is left and stops at the first "
                   "check after it (trial counts then depend on this machine; the report records them).")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Confidence of --margin (and of Leveugle's n).")
@click.option("--seed", type=int, default=0, show_default=True, help="Campaign seed: trial T of point P draws from rng([seed, P, T]).")
@click.option("--per-layer", "per_layer", metavar="SPEC",
              help="Per-layer vulnerability: run one fault point (e.g. bitflip:1e-2) on each tensor alone and rank the "
                   "tensors by accuracy loss.")
@click.option("--diagnostics", is_flag=True,
              help="Also measure activation sparsity per layer and the sharpness of the int8 model (loss increase "
                   "under random relative weight perturbations of size --rho).")
@click.option("--rho", type=float, default=None, help="Relative perturbation size of the sharpness diagnostic [default: 0.05].")
@click.option("--show-trial", "show_trial", metavar="POINT:TRIAL", help="Run only that trial and list its exact faults (tensor, index, bit).")
@click.option("--min-accuracy", "min_accuracy", multiple=True, metavar="POINT=ACC[@ci]",
              help="Gate, repeatable: exit 1 if the mean accuracy at point POINT (a label as printed, e.g. bitflip:0.001, "
                   "or 'all') is below ACC; ACC@ci gates the lower bound of its interval at --confidence instead.")
@click.option("--max-drop", "max_drop", multiple=True, metavar="POINT=DROP[@ci]",
              help="Gate, repeatable: exit 1 if the mean accuracy at POINT (or 'all') is more than DROP below the "
                   "fault-free accuracy; DROP@ci uses the interval's lower bound.")
@click.option("--report", "report", type=click.Path(dir_okay=False), help="Also write the JSON report here.")
@click.option("--html", "html", type=click.Path(dir_okay=False),
              help="Also write the report as a self-contained HTML page here (needs harden[report]).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout instead of the table.")
@click.option("--summary-md", type=click.Path(dir_okay=False),
              help="Write a Markdown summary (points, intervals, gates) here; append it to $GITHUB_STEP_SUMMARY for a CI job summary.")
@click.option("--junit-xml", "junit", type=click.Path(dir_okay=False),
              help="Write the gates as JUnit XML here (one test case per gate and point).")
@click.option("--cluster", envvar="HARDEN_CLUSTER", metavar="ADDRESS", default=None,
              help="Run blocks of trials on a Dask cluster: 'local' (one worker per core) or a scheduler such as "
                   "tcp://host:8786 (env HARDEN_CLUSTER; needs harden[distributed]). Same figures as without it.")
@click.option("--jobs", type=click.IntRange(1), default=None,
              help="Threads that run trials side by side, each pass on one core (default: one per core). Same figures "
                   "for any number.")
@quiet_option
def simulate_command(model, data, faults, faultmaps, trials, margin, budget, confidence, seed, per_layer, diagnostics, rho,
                     show_trial, min_accuracy, max_drop, report, html, as_json, summary_md, junit, cluster, jobs, quiet):
    """Fault-injection campaign on an int8 QDQ MODEL (or a float MODEL under bitflip-fp32),
    measured with onnxruntime.

    Every point (one fault model at one rate, or one chip) runs --trials trials; trial T of
    point P draws its faults from rng([seed, P, T]) alone, so --show-trial P:T re-derives it.
    Reports accuracy (against labels, else top-1 agreement with the fault-free model) and
    SDC-1 (top-1 changed, on the inputs the fault-free model gets right), each with mean,
    standard deviation and a 95 % confidence interval.

    --per-layer SPEC runs one fault point on each tensor alone (points numbered after the
    --fault ones) and ranks the tensors by accuracy loss. --diagnostics adds activation
    sparsity per layer and the epsilon-sharpness of the int8 model. bitflip-act flips bits in
    the quantized activations of every inference, on a rewritten session (opset 18,
    BitwiseXor between each activation QuantizeLinear and its DequantizeLinear).

    The int8 fault models need an int8 QDQ MODEL; a float model is refused for them (exit 2),
    since quantizing it here would need calibration data and choices that belong to apply.
    harden apply writes int8 QDQ models: the hardened model for a chip, or, given a fault-free
    map (harden faultmap generate --for-model MODEL --rate 0 -o none.bin), the plain int8 model.
    A float MODEL takes bitflip-fp32:RATE,... only: each bit of its float32 Conv/Gemm/MatMul
    weights flips with probability RATE (inputs whose logits turn NaN count as wrong).

    Gates (for CI): --min-accuracy POINT=ACC and --max-drop POINT=DROP, repeatable, read the
    mean accuracy of the point labelled POINT (or of every point with 'all'); add @ci to read
    the lower bound of its interval instead. A gate naming no point is exit 2 before any
    trial runs; a failed gate is exit 1 after the report is written, and the JSON report
    lists every gate under "gates".

    \b
    Examples:
      harden simulate model.int8.onnx --data test.npz --fault bitflip:1e-4,1e-3,1e-2
      harden simulate model.int8.onnx --data test.npz --fault stuckat:0.01,0.04 \\
          --faultmap chip.bin --margin 0.01 --json > campaign.json
      harden simulate model.int8.onnx --data test.npz --fault bitflip:1e-3 --show-trial 0:17
      harden simulate model.int8.onnx --data test.npz --per-layer bitflip:1e-2 --trials 50 --diagnostics
      harden simulate model.int8.onnx --data test.npz --fault bitflip-act:1e-4,1e-3
      harden simulate model.int8.onnx --data test.npz --fault bitflip:1e-3,1e-2 --faultmap chip.bin \\
          --min-accuracy bitflip:0.001=0.95 --min-accuracy chip:sample-chip-0042=0.9@ci \\
          --max-drop all=0.3 --report campaign.json
      harden simulate model.onnx --data test.npz --fault bitflip-fp32:1e-6,1e-5,1e-4 --trials 100
    """
    opts = CampaignOptions(trials=trials, margin=margin, confidence=confidence, seed=seed, budget=budget)
    opts.validate()
    if rho is not None and not diagnostics:
        raise InputError("--rho sets the sharpness diagnostic; give --diagnostics too")
    trial = _show_trial(show_trial)
    gates = [PointGate.parse("min-accuracy", g) for g in min_accuracy] + [PointGate.parse("max-drop", g) for g in max_drop]
    if gates and trial is not None:
        raise InputError("--min-accuracy / --max-drop gate a campaign's points; they do not apply to --show-trial")
    if html is not None:
        require_matplotlib()
        if report is not None and Path(html).resolve() == Path(report).resolve():
            raise InputError(f"--html {html} is the same path as --report; choose another path")
    named = [p for p in (report, html, summary_md, junit) if p is not None]
    if named:
        check_outputs(named, [model, data, *faultmaps])

    bar = None
    progress = on_start = None
    if trial is None and not as_json and show_progress(quiet):
        def on_start(total: int) -> None:
            nonlocal bar
            bar = click.progressbar(length=total, label="trials", file=sys.stderr)
            bar.__enter__()

        def progress(n: int) -> None:
            bar.update(n)

    try:
        result = simulate(model, data, faults, faultmaps, opts, per_layer=per_layer, diagnostics=diagnostics,
                          rho=0.05 if rho is None else rho,
                          progress=progress, on_start=on_start, show_trial=trial, gates=gates, cluster=cluster, jobs=jobs)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    outputs = [(report, to_json(result.report).encode("utf-8"))] if report is not None else []
    if html is not None:
        outputs.append((html, render_html(result.report).encode("utf-8")))
    if summary_md is not None:
        outputs.append((summary_md, simulate_summary_markdown(result.report).encode("utf-8")))
    if junit is not None:
        outputs.append((junit, junit_xml("harden simulate", point_cases(result.report.get("gates") or []),
                                         result.report.get("seconds")).encode("utf-8")))
    if outputs:
        atomic_write_many(outputs)  # the JSON and the page together, or neither
    if as_json:
        sys.stdout.write(to_json(result.report))
    elif not quiet:
        click.echo(trial_table(result.report) if trial is not None else campaign_table(result.report))
    failed = failure_line(result.report.get("gates") or [])
    if failed:
        raise GateFailed(failed)


def _pct(v: float | None) -> str:
    return "   n/a" if v is None else f"{100 * v:6.2f}%"


def _ci(ci: list | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def _head(rep: dict) -> list[str]:
    m, c = rep["model"], rep["clean"]
    scored = "labels" if c["reference"] == "labels" else "top-1 agreement with the fault-free model"
    if m.get("precision") == "float":
        what = f"float model: {m['float_weights']} float32 weights in {m['float_weight_tensors']} tensors"
    else:
        what = (f"int8 model: {m['int8_weights']} weights in {m['int8_tensors']} tensors, "
                f"{m['int32_biases']} int32 biases in {m['int32_bias_tensors']} tensors")
    return [
        what,
        f"fault-free: accuracy {_pct(c['accuracy']).strip()} on {c['samples']} samples ({scored}); "
        f"{c['correct']} correct",
    ]


def campaign_table(rep: dict) -> str:
    """What `simulate` prints: one line per point with its figures and 95 % intervals, then the
    per-layer ranking and the diagnostics when asked for."""
    lines = _head(rep)
    o = rep["options"]
    lines.append(f"seed {o['seed']}" + (f", margin {o['margin']:g} at {o['confidence']:g}" if o["margin"] else ""))
    if rep["points"]:
        w = max([len("point")] + [len(p["label"]) for p in rep["points"]])
        lines.append(f"  {'#':>2} {'point':<{w}} {'trials':>6}  {'accuracy':>8} {'95% CI':<16} {'SDC-1':>8} {'95% CI':<16}")
        for p in rep["points"]:
            a, s = p["accuracy"], p["sdc1"]
            trials = f"{p['trials']}" + ("*" if p["stopped_early"] else "+" if p.get("stopped_by_budget") else "")
            lines.append(
                f"  {p['index']:>2} {p['label']:<{w}} {trials:>6}  {_pct(a['mean'])} {_ci(a['ci95']):<16} "
                f"{_pct(s['mean'] if s else None)} {_ci(s['ci95'] if s else None):<16}"
            )
        if any(p["stopped_early"] for p in rep["points"]):
            lines.append("  * stopped early: the margin was met")
        if any(p.get("stopped_by_budget") for p in rep["points"]):
            lines.append(f"  + stopped by --budget {o['budget']:g} s: the interval is what that time bought")
    act = rep.get("activation_faults")
    if act:
        c = act["clean"]
        same = "identical to" if c["logits_identical"] else ("same top-1 as" if c["predictions_identical"] else "DIFFERENT from")
        lines.append(f"activation faults: {len(act['sites'])} quantized tensors, {act['bits_per_sample']} bits per sample; "
                     f"clean outputs of the rewritten session {same} the weight session's")
    if any("nan_outputs" in p for p in rep["points"]):
        nan = ", ".join(f"{p['label']} {100 * p['nan_outputs']['mean']:.2f}%" for p in rep["points"] if "nan_outputs" in p)
        lines.append(f"inputs with a NaN logit (counted wrong): {nan}")
    if any(p.get("certified_trials") for p in rep["points"]):
        cert = ", ".join(f"{p['label']} {p['certified_trials']} of {p['trials']}" for p in rep["points"] if "certified_trials" in p)
        lines.append(f"trials proven harmless by the output bound (clean predictions, not run): {cert}")
    if rep.get("gates"):
        lines += gates_table(rep["gates"])
    if rep.get("per_layer") is not None:
        lines += per_layer_table(rep)
    if rep.get("diagnostics"):
        lines += diagnostics_table(rep["diagnostics"])
    lines.append(f"{rep['seconds']:.2f}s; list the faults of any trial with --show-trial POINT:TRIAL")
    return "\n".join(lines)


def gates_table(gates: list[dict]) -> list[str]:
    bad = sum(not g["passed"] for g in gates)
    lines = [f"gates: {len(gates) - bad} passed, {bad} failed"]
    for g in gates:
        fig = "mean accuracy" if g["statistic"] == "mean" else "accuracy interval's lower bound"
        if g["kind"] == "max-drop":
            fig = "drop of the " + fig
        value = "n/a" if g["value"] is None else f"{100 * g['value']:.2f}%"
        limit = f"{g['threshold']:g}" + ("@ci" if g["statistic"] == "ci" else "")
        lines.append(f"  {'pass' if g['passed'] else 'FAIL'}  {g['point']} (#{g['index']}) --{g['kind']} {limit}: {fig} {value}")
    return lines


def per_layer_table(rep: dict) -> list[str]:
    f = rep["per_layer_fault"]
    rows = rep["per_layer"]
    trials = sorted({r["trials"] for r in rows})
    n = str(trials[0]) if len(trials) == 1 else f"{trials[0]}-{trials[-1]}"
    each = "trial" if n == "1" else "trials"
    lines = [f"per-layer vulnerability: {f['label']} on one tensor at a time, {n} {each} each "
             f"(points {f['points'][0]}-{f['points'][-1]}); rank 1 loses the most accuracy:" if rows else
             f"per-layer vulnerability: {f['label']}: no tensor to restrict it to"]
    if not rows:
        return lines
    w = min(44, max(len("tensor"), *(len(r["tensor"]) for r in rows)))
    ow = max(len("op"), *(len(r["op"] or "?") for r in rows))
    lines.append(f"  {'rank':>4} {'tensor':<{w}} {'op':<{ow}} {'size':>8}  {'accuracy':>8} {'95% CI':<16} {'loss':>7} {'95% CI':<16}")
    for r in rows:
        name = r["tensor"] if len(r["tensor"]) <= w else "..." + r["tensor"][-(w - 3):]
        lo, hi = r["loss_ci95"]
        lines.append(
            f"  {r['rank']:>4} {name:<{w}} {(r['op'] or '?'):<{ow}} {r['elements']:>8}  {_pct(r['accuracy']['mean'])} "
            f"{_ci(r['accuracy']['ci95']):<16} {100 * r['loss']:6.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]"
        )
    return lines


def diagnostics_table(d: dict) -> list[str]:
    lines = [f"diagnostics on {d['samples']} samples:"]
    recs = d["activation_sparsity"]
    if recs:
        lines.append("  activation sparsity (fraction of exact zeros):")
        w = min(48, max(len("tensor"), *(len(r["tensor"]) for r in recs)))
        for r in recs:
            name = r["tensor"] if len(r["tensor"]) <= w else "..." + r["tensor"][-(w - 3):]
            role = f"input of {r['op']}" if r["kind"] == "input" else f"{r['op']} output"
            lines.append(f"    {name:<{w}} {role:<18} {100 * r['sparsity']:6.2f}%")
        s = d["sparsity"]
        if s["mean"] is not None:
            lines.append(f"    weight-op inputs: mean {100 * s['mean']:.2f}% over {s['layers']} layers, "
                         f"{100 * s['overall']:.2f}% of all their values")
    sh = d["sharpness"]
    what = "cross-entropy" if sh["loss"] == "cross_entropy" else "KL to the clean softmax"
    lines.append(
        f"  sharpness (rho {sh['rho']:g}, {sh['samples']} perturbations of the int8 codes, {100 * sh['codes_changed']:.1f}% "
        f"of codes changed): {what} {sh['loss_clean']:.4f} -> {sh['loss_perturbed_mean']:.4f}, "
        f"increase {sh['increase']:+.4f} [{sh['ci'][0]:+.4f}, {sh['ci'][1]:+.4f}]"
    )
    return lines


def trial_table(rep: dict) -> str:
    t = rep["trial"]
    lines = _head(rep)
    sdc = "n/a" if t["sdc1"] is None else f"{100 * t['sdc1']:.2f}%"
    lines.append(
        f"point {t['point']} ({t['label']}), trial {t['trial']} (rng {t['rng']}): accuracy {100 * t['accuracy']:.2f}%, "
        f"SDC-1 {sdc}, {t['faulty_cells']} faulty cells"
        + ("; proven harmless by the output bound (clean predictions, not run)" if t.get("certified") else "")
    )
    act = bool(t["faults"]) and "sample" in t["faults"][0]
    where = f"{'sample':>7} {'element':>8}" if act else f"{'index':>8}"
    lines.append(f"  {'tensor':<40} {where} {'bit':>3}  kind changes")
    for f in t["faults"]:
        ch = "" if f["changes"] is None else ("yes" if f["changes"] else "no")
        at = f"{f['sample']:>7} {f['element']:>8}" if act else f"{f['index']:>8}"
        lines.append(f"  {f['tensor']:<40} {at} {f['bit']:>3}  {f['kind']:<4} {ch}")
    return "\n".join(lines)


__all__ = ["campaign_table", "diagnostics_table", "gates_table", "per_layer_table", "simulate_command", "trial_table"]
