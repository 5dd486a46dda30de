"""The training options of `harden apply` (torch-based steps; harden/train/, docs/training.md).

Declared here so that apply_cmd.py only forwards them: `@training_options` adds the click
options, and `training_fields(kwargs)` turns them into ApplyOptions fields. Nothing here
imports torch: the pipeline checks for it (exit 2 with the install hint) when a step needs it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import click

TRAINING_PARAMS = ("saq", "clip_train", "variability", "train_data", "epochs", "rho", "lr")


def _sigmas(ctx, param, value):
    """SIGMA_CHIP,SIGMA_CELL -> (float, float)."""
    if value is None:
        return None
    parts = value.split(",")
    try:
        sig = tuple(float(p) for p in parts)
    except ValueError:
        sig = ()
    if len(sig) != 2 or not all(math.isfinite(s) and 0 <= s <= 1 for s in sig):
        raise click.BadParameter(f"expected SIGMA_CHIP,SIGMA_CELL, two numbers in [0, 1] (e.g. 0.05,0.15), got {value!r}")
    return sig


def training_options(func: Callable) -> Callable:
    """Add --saq, --clip-train, --variability, --train-data, --epochs, --rho, --lr to a command."""
    options = [
        click.option("--saq", is_flag=True,
                     help="Sharpness-aware, quantization-aware fine-tune of the weights before quantizing "
                          "(needs torch: pip install 'harden[train]')."),
        click.option("--clip-train", is_flag=True,
                     help="Train the clip thresholds (ProAct: last layer first, teacher = the unclipped model; "
                          "needs torch)."),
        click.option("--variability", metavar="SIGMA_CHIP,SIGMA_CELL", callback=_sigmas,
                     help="Fine-tune under multiplicative log-normal weight noise w*exp(N(0,chip^2)+N(0,cell^2)), "
                          "for analog in-memory chips (needs torch; with --saq, inside SAQ)."),
        click.option("--train-data", type=click.Path(dir_okay=False),
                     help="Training data for the steps above (.npz like --data, with 'label'; default: --data)."),
        click.option("--epochs", type=click.IntRange(1), default=None,
                     help="Fine-tuning epochs. Default: 5 (--saq), 10 (with --variability)."),
        click.option("--rho", type=click.FloatRange(0), default=None,
                     help="SAQ's perturbation radius, relative to the weights (adaptive SAM). Default: 0.5."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
                     help="Fine-tuning learning rate (SGD, momentum 0.9, cosine schedule). "
                          "Default: 1e-3 (--saq), 5e-4 (with --variability)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def training_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ApplyOptions fields among a command's keyword arguments."""
    return {k: kwargs[k] for k in TRAINING_PARAMS if k in kwargs}
