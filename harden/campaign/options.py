"""A campaign's options, its per-trial and per-point results, and the generator of every trial."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..faults import (
    FaultModel,
)
from ..stats import leveugle_n

DEFAULT_TRIALS = 100


def trial_rng(seed: int, point: int, trial: int) -> np.random.Generator:
    """The generator of trial `trial` of point `point`: everything the trial draws comes from it."""
    return np.random.default_rng([seed, point, trial])


@dataclass
class CampaignOptions:
    """trials: trials per point (the cap when a margin is given; default 100 without a margin,
    Leveugle's n with one). margin / confidence: stop a point once its accuracy interval's
    half-width at `confidence` is <= margin."""

    trials: int | None = None
    margin: float | None = None
    confidence: float = 0.95
    seed: int = 0
    min_trials: int = 20
    check_every: int = 5
    #: seconds for the whole campaign (None: no limit); each point gets an equal share of what
    #: is left and stops at the first check after its share is spent. The trial counts then
    #: depend on this machine's speed: the report records them (rerun with --trials to repeat).
    budget: float | None = None

    def validate(self) -> None:
        def bad(msg: str) -> InputError:
            return InputError(msg)

        if self.trials is not None and (not _is_int(self.trials) or self.trials < 1):
            raise bad(f"--trials must be an integer >= 1, got {self.trials!r}")
        if self.margin is not None and not (isinstance(self.margin, (int, float)) and 0.0 < self.margin < 1.0):
            raise bad(f"--margin must be in (0, 1), got {self.margin!r}")
        if not (isinstance(self.confidence, (int, float)) and 0.0 < self.confidence < 1.0):
            raise bad(f"--confidence must be in (0, 1), got {self.confidence!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not _is_int(self.min_trials) or self.min_trials < 2:
            raise bad(f"min_trials must be an integer >= 2, got {self.min_trials!r}")
        if not _is_int(self.check_every) or self.check_every < 1:
            raise bad(f"check_every must be an integer >= 1, got {self.check_every!r}")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and 0 < self.budget < 1e9):
            raise bad(f"--budget must be a number of seconds > 0, got {self.budget!r}")

    def planned_trials(self) -> int:
        """Trials per random point: --trials, else Leveugle's n for the margin, else 100."""
        if self.trials is not None:
            return int(self.trials)
        if self.margin is not None:
            return leveugle_n(self.margin, self.confidence)
        return DEFAULT_TRIALS


@dataclass
class TrialResult:
    point: int
    trial: int
    accuracy: float
    sdc1_events: int  # correct inputs whose top-1 changed
    faulty_cells: int
    nan_outputs: int = 0  # inputs whose logits hold a NaN (predicted as class -1, data.NAN_CLASS)
    certified: bool = False  # proven harmless by the session's bound (faults/bounds.py): clean predictions, not run


@dataclass
class PointResult:
    index: int
    model: FaultModel
    planned: int
    accuracy: np.ndarray
    sdc1_events: np.ndarray
    faulty_cells: np.ndarray
    stopped_early: bool = False
    seconds: float = 0.0  # the trials' time: the point's session is built before its clock starts
    nan_outputs: np.ndarray | None = None
    stopped_by_budget: bool = False
    certified: np.ndarray | None = None  # per trial: proven harmless without inference (faults/bounds.py)

    @property
    def trials(self) -> int:
        return int(self.accuracy.size)


@dataclass
class Baseline:
    """What the trials of a point are compared with: the clean predictions of the session that
    runs them, the target they are scored against, and which inputs the clean model gets right."""

    clean_pred: np.ndarray
    target: np.ndarray
    correct: np.ndarray = field(init=False)
    n_correct: int = field(init=False)
    clean_accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        self.correct = self.clean_pred == self.target
        self.n_correct = int(self.correct.sum())
        self.clean_accuracy = float(self.correct.mean()) if self.target.size else 0.0


@dataclass
class PerLayer:
    """The per-layer points of a campaign: `base` restricted to each of `tensors` in turn."""

    base: FaultModel
    indices: list[int]
    tensors: list  # faults.Tensor, in the space's order


@dataclass
class CampaignResult:
    clean_accuracy: float
    reference: str
    samples: int
    correct: int
    options: CampaignOptions
    points: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

