"""The options of `apply`, as one dataclass a notebook, the CLI and a fleet share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApplyOptions:
    """Switches and knobs of `apply`; the defaults are what `harden apply` runs."""

    clip: bool = True
    clip_style: str = "zero"
    clip_percentile: float | None = None  # None: chosen by measured resilience (clip_search.py)
    compensation: bool = True
    bias_correction: bool = True
    calib_samples: int = 256
    seed: int = 0
    trials: int = 30  # per random fault point of the resilience campaign; 0 = no campaign
    faults: tuple[str, ...] | None = None  # None: DEFAULT_FAULTS, less the points the model has nothing for
    layout: str | None = None  # memory layout plugin, e.g. "tiled:rows=128,cols=128"; None = linear
    passes: tuple[str, ...] = ()  # harden.passes plugins placed in the plan: NAME[@before:P|@after:P]
    # training (needs torch, `pip install 'harden[train]'`; harden/train/, docs/training.md)
    saq: bool = False  # sharpness-aware quantization-aware fine-tune between clip and quantize
    clip_train: bool = False  # ProAct: train the clip thresholds, last layer first
    variability: tuple[float, float] | None = None  # (sigma_chip, sigma_cell): noise-aware fine-tune
    train_data: str | None = None  # .npz for the training steps (default: the calibration data)
    epochs: int | None = None  # None: 5 (--saq), 10 (with --variability)
    rho: float | None = None  # None: 0.5
    lr: float | None = None  # None: 1e-3 (--saq), 5e-4 (with --variability)
