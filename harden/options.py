"""The options of `apply`: a flat `ApplyOptions` to write (the CLI, a notebook, a fleet), resolved
once into nested, validated, frozen configs (`Config`: clip, faq, campaign, training, layout),
which is what the code reads. Every "None means the default" is resolved here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InputError

#: apply's default random-fault points: int8 weight flips and int32 bias flips.
DEFAULT_FAULTS = ("bitflip:1e-3,1e-2", "bitflip-bias:1e-3")
CLIP_STYLES = ("zero", "saturate")


@dataclass(frozen=True)
class ClipConfig:
    """Hybrid clipped activations: on or off, zero or saturate, and the threshold percentile
    (None: chosen by the clip search on measured resilience)."""

    enabled: bool = True
    style: str = "zero"
    percentile: float | None = None

    def __post_init__(self) -> None:
        if self.style not in CLIP_STYLES:
            raise InputError(f"clip style must be one of {', '.join(CLIP_STYLES)}, got {self.style!r}")
        if self.percentile is not None and not (_number(self.percentile) and 50 <= self.percentile <= 100):
            raise InputError(f"--clip-percentile must be in [50, 100], got {self.percentile!r}")

    @property
    def search(self) -> bool:
        return self.enabled and self.percentile is None


@dataclass(frozen=True)
class FAQConfig:
    """Fault-aware quantization: error feedback, bias correction, the samples their statistics
    use, whether compensation runs layer by layer on the hardened prefix (`sequential`), and
    whether an output channel may be stored negated with a negated scale (`sign_choice`)."""

    compensation: bool = True
    bias_correction: bool = True
    calib_samples: int = 256
    sequential: bool = True
    sign_choice: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.calib_samples, int) and self.calib_samples >= 1):
            raise InputError(f"--calib-samples must be an integer >= 1, got {self.calib_samples!r}")

    @property
    def needs_stats(self) -> bool:
        return self.compensation or self.bias_correction

    @property
    def shared_stats(self) -> bool:
        """Whether the statistics are chip independent (computed once for a fleet): not when
        each layer's come from the chip's own hardened prefix."""
        return self.needs_stats and not (self.sequential and self.compensation)


@dataclass(frozen=True)
class CampaignConfig:
    """apply's resilience campaign: trials per random point (0: none) and its fault points;
    `explicit` says the user named the points (a default point that cannot apply is left out,
    an explicit one is an error)."""

    trials: int = 30
    faults: tuple[str, ...] = DEFAULT_FAULTS
    explicit: bool = False
    budget: float | None = 30.0  # seconds; the trials are cut (for every variant alike) to fit

    def __post_init__(self) -> None:
        if not (isinstance(self.trials, int) and self.trials >= 0):
            raise InputError(f"--trials must be an integer >= 0, got {self.trials!r}")
        if self.budget is not None and not (_number(self.budget) and self.budget > 0):
            raise InputError(f"--budget must be a number of seconds > 0, got {self.budget!r}")

    def affordable_trials(self, one_pass: float, variants: int, random_points: int) -> int:
        """Trials per random point that fit the budget, from the time of one evaluation pass:
        the same count for every variant, so the ablation stays paired (at least 2)."""
        if self.budget is None or not random_points or one_pass <= 0:
            return self.trials
        fit = int((self.budget / one_pass - 2 * variants) // (variants * random_points))
        return max(min(2, self.trials), min(self.trials, fit))


@dataclass(frozen=True)
class TrainingConfig:
    """The torch steps between clip and quantize, with their defaults resolved: epochs 5 (--saq)
    or 10 (--variability), lr 1e-3 or 5e-4, rho 0.5."""

    saq: bool = False
    clip_train: bool = False
    variability: tuple[float, float] | None = None
    train_data: str | None = None
    epochs: int = 5
    rho: float = 0.5
    lr: float = 1e-3

    @property
    def finetune(self) -> bool:
        return self.saq or self.variability is not None

    @property
    def steps(self) -> list[str]:
        return training_steps(self.saq, self.clip_train, self.variability)


@dataclass(frozen=True)
class Config:
    """Everything `apply` reads, nested by concern."""

    seed: int = 0
    clip: ClipConfig = field(default_factory=ClipConfig)
    faq: FAQConfig = field(default_factory=FAQConfig)
    campaign: CampaignConfig = field(default_factory=CampaignConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    layout: str | None = None  # a memory layout plugin spec, e.g. "tiled:rows=128,cols=128"; None: linear
    passes: tuple[str, ...] = ()  # harden.passes plugins in the plan: NAME[@before:P|@after:P]


@dataclass
class ApplyOptions:
    """Switches and knobs of `apply`, flat as the CLI's flags; the defaults are what `harden
    apply` runs. `config()` validates them and resolves every default (a `Config`)."""

    clip: bool = True
    clip_style: str = "zero"
    clip_percentile: float | None = None  # None: chosen by measured resilience (clip_search.py)
    compensation: bool = True
    bias_correction: bool = True
    calib_samples: int = 256
    sequential: bool = True  # compensation layer by layer on the hardened prefix (compensate.absorbing_targets)
    sign_choice: bool = True  # per output channel, negated codes with a negated scale where they read back closer
    seed: int = 0
    trials: int = 30  # per random fault point of the resilience campaign; 0 = no campaign
    budget: float | None = 30.0  # seconds for that campaign: fewer trials when they would not fit; None: no limit
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

    def config(self) -> Config:
        """The nested configs, validated (InputError names the flag)."""
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise InputError(f"--seed must be a non-negative integer, got {self.seed!r}")
        steps = training_steps(self.saq, self.clip_train, self.variability)
        finetune = self.saq or self.variability is not None
        for flag, value, ok, needs in (("--train-data", self.train_data, bool(steps), "--saq, --clip-train or --variability"),
                                       ("--epochs", self.epochs, finetune, "--saq or --variability"),
                                       ("--lr", self.lr, finetune, "--saq or --variability"),
                                       ("--rho", self.rho, self.saq, "--saq")):
            if value is not None and not ok:
                raise InputError(f"{flag} only applies with {needs}")
        if self.clip_train and not self.clip:
            raise InputError("--clip-train trains the clip pass's thresholds; it cannot be used with --no-clip")
        if self.epochs is not None and not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"--epochs must be an integer >= 1, got {self.epochs!r}")
        if self.rho is not None and not (_number(self.rho) and self.rho >= 0):
            raise InputError(f"--rho must be >= 0, got {self.rho!r}")
        if self.lr is not None and not (_number(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be > 0, got {self.lr!r}")
        var = self.variability
        training = TrainingConfig(
            saq=self.saq, clip_train=self.clip_train and self.clip, variability=None if var is None else (float(var[0]), float(var[1])),
            train_data=self.train_data, epochs=self.epochs or (10 if var else 5), rho=0.5 if self.rho is None else self.rho,
            lr=self.lr or (5e-4 if var else 1e-3))
        return Config(
            seed=self.seed,
            clip=ClipConfig(self.clip, self.clip_style, self.clip_percentile),
            faq=FAQConfig(self.compensation, self.bias_correction, self.calib_samples, self.sequential, self.sign_choice),
            campaign=CampaignConfig(self.trials, tuple(self.faults) if self.faults is not None else DEFAULT_FAULTS,
                                    self.faults is not None, self.budget),
            training=training, layout=self.layout, passes=tuple(self.passes))


def training_steps(saq: bool, clip_train: bool, variability: object) -> list[str]:
    """The training flags that are on, in the order the plan runs them."""
    return [f for f, on in (("--saq", saq), ("--clip-train", clip_train), ("--variability", variability is not None)) if on]


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
