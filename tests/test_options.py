"""apply's options resolve once into nested, validated configs (harden/options.py, issue 10)."""

from __future__ import annotations

import pytest

from harden.errors import InputError
from harden.options import DEFAULT_FAULTS, ApplyOptions, Config


def test_defaults_resolve_in_one_place():
    cfg = ApplyOptions().config()
    assert isinstance(cfg, Config)
    assert cfg.clip.search and cfg.clip.style == "zero" and cfg.faq.needs_stats
    assert cfg.campaign.faults == DEFAULT_FAULTS and not cfg.campaign.explicit and cfg.campaign.trials == 30
    assert (cfg.training.epochs, cfg.training.lr, cfg.training.rho, cfg.training.steps) == (5, 1e-3, 0.5, [])
    var = ApplyOptions(variability=(0.1, 0.2)).config().training
    assert (var.epochs, var.lr, var.finetune, var.steps) == (10, 5e-4, True, ["--variability"])
    explicit = ApplyOptions(faults=("bitflip:1e-2",), clip_percentile=99.9).config()
    assert explicit.campaign.explicit and explicit.campaign.faults == ("bitflip:1e-2",) and not explicit.clip.search


@pytest.mark.parametrize("kwargs, message", [
    ({"clip_style": "soft"}, "clip style"),
    ({"clip_percentile": 10.0}, "--clip-percentile"),
    ({"calib_samples": 0}, "--calib-samples"),
    ({"trials": -1}, "--trials"),
    ({"epochs": 3}, "--epochs only applies"),
    ({"saq": True, "epochs": 0}, "--epochs must be"),
    ({"saq": True, "lr": float("nan")}, "--lr must be"),
    ({"clip_train": True, "clip": False}, "--no-clip"),
    ({"seed": -2}, "--seed"),
])
def test_bad_options_are_one_clear_error(kwargs, message):
    with pytest.raises(InputError, match=message):
        ApplyOptions(**kwargs).config()
