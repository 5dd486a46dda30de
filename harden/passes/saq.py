"""SAQ: sharpness-aware, quantization-aware fine-tuning of the float weights (needs torch).

Also the variability-aware fine-tune (`--variability`, pass name "variability"): the same
loop with multiplicative log-normal weight noise and, without --saq, no SAM step.

The pass between clip and quantize (DESIGN.md step 3): it fine-tunes the weights of the
(clipped) float graph with per-channel int8 fake quantization and an adaptive SAM perturbation
at the quantized weights (harden/train/saq.py), writes the new values into the same graph
(same initializers, same nodes), and leaves the rest to the quantize and FAQ passes. torch is
imported only when the pass runs.
"""

from __future__ import annotations

import onnx

from ..data import Dataset
from . import Pass, PassContext, PassResult


def _bar(done: int, total: int, width: int = 20) -> str:
    full = width * done // max(total, 1)
    return "[" + "#" * full + "-" * (width - full) + "]"


class SAQPass(Pass):
    """Fine-tune on `train` (default: the calibration data); validate on the calibration data."""

    name = "saq"
    requires = frozenset({"float"})
    provides = frozenset({"trained"})

    def __init__(self, config=None, train: Dataset | None = None, noise=None, label: str = "--saq", name: str = "saq",
                 variability: tuple[float, float] | None = None):
        self.config, self.train, self.noise, self.label = config, train, noise, label
        self.name, self.variability = name, variability

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from ..train import require_torch

        require_torch(self.label)
        from ..train.saq import SAQConfig, fine_tune

        cfg = self.config or SAQConfig(seed=ctx.seed)
        train = self.train if self.train is not None else ctx.calib

        def on_epoch(rec, total):
            if ctx.progress:
                acc = "" if rec.val_accuracy is None else f", int8 accuracy {rec.val_accuracy:.4f}"
                ctx.progress(f"{self.name} epoch {rec.epoch}/{total} {_bar(rec.epoch, total)} loss {rec.loss:.4f}{acc}, {rec.seconds:.2f} s")

        result = fine_tune(model, train, cfg, val=ctx.calib, noise=self.noise, on_epoch=on_epoch)
        record = dict(result.record)
        record["train_data"] = "train data" if self.train is not None else "calibration data"
        record["variability"] = None if self.variability is None else {"sigma_chip": self.variability[0], "sigma_cell": self.variability[1]}
        record["note"] = note(record)
        return PassResult(result.model, True, record)


def note(rec: dict) -> str:
    """The pass's line in the printed summary."""
    cfg = rec["config"]
    what = f"rho {cfg['rho']} ({cfg['mode']})" if cfg["sam"] and cfg["rho"] > 0 else "no SAM step"
    if rec.get("variability"):
        what += f", log-normal weight noise sigma_chip {rec['variability']['sigma_chip']}, sigma_cell {rec['variability']['sigma_cell']}"
    line = (f"{len(rec['epochs'])} epochs on {rec['train_samples']} samples ({rec['train_data']}), "
            f"{rec['seconds_per_epoch']:.2f} s/epoch, {what}")
    if rec.get("val_accuracy_start") is not None and rec["epochs"]:
        kept = rec["kept_epoch"]
        end = rec["epochs"][kept - 1]["val_accuracy"] if kept else rec["val_accuracy_start"]
        line += f"; int8 accuracy on calibration data {100 * rec['val_accuracy_start']:.2f}% -> {100 * end:.2f}%"
        if kept != len(rec["epochs"]):
            line += f" (kept epoch {kept}: later ones lost more than {100 * cfg['tolerance']:.1f} pts)"
    return line
