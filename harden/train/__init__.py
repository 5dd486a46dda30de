"""Training-based hardening (the optional `harden[train]` extra): everything that needs torch.

    graph.py        the ONNX graph executed as a torch.nn.Module, 1:1 initializer <-> parameter
    saq.py          sharpness-aware, quantization-aware fine-tuning (SAQ, METHODS.md section 3)
    proact.py       progressive training of clipped-activation thresholds (ProAct, section 2)
    variability.py  fine-tuning under multiplicative log-normal weight noise (section 4)

The rest of harden never imports torch: the pipeline and the CLI import these modules lazily,
after `require_torch()` has checked that torch is there. This file itself imports no torch, so
`require_torch` can always be called.
"""

from __future__ import annotations

from ..errors import InputError

INSTALL_HINT = "pip install 'harden[train]'"


def require_torch(what: str = "this feature"):
    """Return the torch module, or raise InputError (exit 2) naming `what` and the install line."""
    try:
        import torch
    except ImportError:
        raise InputError(f"{what} needs torch: {INSTALL_HINT}") from None
    return torch


def torch_available() -> bool:
    """True when torch can be imported (no error raised)."""
    try:
        require_torch()
    except InputError:
        return False
    return True
