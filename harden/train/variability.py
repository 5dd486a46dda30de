"""Variability-aware fine-tuning for analog in-memory computing (METHODS.md section 4).

Analog weights are conductances with fabrication variability; the working model is
multiplicative log-normal noise `w' = w * exp(theta_chip + theta_cell)`, theta_chip ~
N(0, sigma_chip^2) shared by one weight tensor (a layer's array), theta_cell ~ N(0, sigma_cell^2)
per weight. Joint variability- and quantization-aware training draws that noise afresh on every
forward pass of the fine-tune (after fake quantization, so it acts on the int8 weights the chip
will hold), so the weights settle where such noise costs little. With `--saq` as well, the
noise is drawn inside SAQ's two passes too.

The evaluation side, which needs no torch, is harden/analog.py (onnxruntime).
"""

from __future__ import annotations

from ..errors import InputError
from . import require_torch

torch = require_torch("--variability")


def check_sigmas(sigma_chip: float, sigma_cell: float) -> None:
    for name, s in (("SIGMA_CHIP", sigma_chip), ("SIGMA_CELL", sigma_cell)):
        if not (0 <= s <= 1):  # the simulator's bound (harden/faults/variability.py)
            raise InputError(f"--variability: {name} must be in [0, 1], got {s!r}")


def lognormal_noise(sigma_chip: float, sigma_cell: float):
    """noise(w, gen) -> w * exp(theta_chip + theta_cell), drawn from `gen` (a torch.Generator)."""
    check_sigmas(sigma_chip, sigma_cell)

    def noise(w: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
        theta = torch.randn(w.shape, generator=gen, dtype=w.dtype) * sigma_cell
        theta = theta + torch.randn((), generator=gen, dtype=w.dtype) * sigma_chip
        return w * torch.exp(theta)

    return noise
