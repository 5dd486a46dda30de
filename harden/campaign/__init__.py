"""Fault-injection campaigns on onnxruntime: points x trials on one session, with statistics.

A campaign runs each *point* (one fault model with its parameters, e.g. bit flips at 1e-3) for
a number of *trials*. Trial t of point p draws its faults from
`np.random.default_rng([seed, p, t])` alone, so any trial can be re-derived and its exact
faults listed (`describe_trial`) without re-running the others.

Speed (DESIGN.md, performance principles): one `ChipEvaluator` per model, whose session takes
the int8 weights and int32 biases as graph inputs; a trial draws only its faulty cells
(binomial count, then positions), copies only the tensors it hits, and costs one inference pass.

Figures per point: accuracy against the labels (or top-1 agreement with the fault-free int8
model when the data has none) and SDC-1, the fraction of the inputs the fault-free model gets
right whose top-1 changes under the faults; each with mean, standard deviation and a Student-t
95 % interval over the trials, and for SDC-1 also a pooled Wilson interval (sound when SDC is
rare). With a margin, a point stops as soon as the half-width of its accuracy interval (at the
requested confidence) is within the margin, checked every `check_every` trials after
`min_trials`; the cap is Leveugle's sample size for that margin (p = 0.5, unbounded
population) unless `trials` is given.

Per-layer vulnerability (`add_per_layer`, `simulate --per-layer SPEC`): one more point per
tensor the fault model can hit, each the same model restricted to that tensor (`tensors=`);
they are ordinary points of the same campaign (indices after the `--fault` points, so
`--show-trial` re-derives them too) and are reported ranked by accuracy loss.

Activation faults (`bitflip-act`) run on a second session, the rewrite of
faults/activation.py, built only when a point needs it; those points are scored against that
session's own clean predictions. Every side session works that way (`SESSION_KINDS`, keyed by
a fault model's `space_kind`).

Float models: a campaign also runs on a float model, whose points must then be float fault
models (`precision = "float"`: `bitflip-fp32`, faults/fp32.py, on its own "fp32" session); the
weight session is then the float model's ordinary session, the fault-free reference. A point
whose precision is not the model's is refused before any work (`check_precision`).

The package in parts: `options.py` (options, results, the trial generator), `engine.py` (the
Campaign and its trials, early stopping, the recipe another process rebuilds it from), `sessions.py` (side sessions by
`space_kind`), `records.py` (the report's records), `parallel.py` (the executor protocol, trials on threads), `executors.py` (trials on Dask), `api.py`
(`prepare_campaign` / `simulate`).
"""

from __future__ import annotations

from .api import SimulationResult, describe_trial, prepare_campaign, simulate
from .engine import Campaign, CampaignRecipe
from .parallel import ThreadTrials, TrialExecutor, default_jobs
from .executors import DaskTrials
from .options import DEFAULT_TRIALS, Baseline, CampaignOptions, CampaignResult, PerLayer, PointResult, TrialResult, trial_rng
from .sessions import SESSION_KINDS, check_precision

__all__ = [
    "DEFAULT_TRIALS", "Baseline", "Campaign", "CampaignOptions", "CampaignRecipe", "CampaignResult", "DaskTrials", "PerLayer",
    "PointResult", "SESSION_KINDS", "SimulationResult", "ThreadTrials", "TrialExecutor", "TrialResult", "check_precision", "describe_trial",
    "default_jobs", "prepare_campaign", "simulate", "trial_rng",
]
