"""Variability-aware fine-tuning (harden.train.variability, `apply --variability`)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

import zoo  # noqa: E402
from harden.campaign import Campaign, CampaignOptions  # noqa: E402
from harden.cli import main  # noqa: E402
from harden.faults import parse_fault_spec  # noqa: E402
from harden.passes import PassContext, run_passes  # noqa: E402
from harden.passes.clip import ClipPass  # noqa: E402
from harden.passes.quantize import QuantizePass  # noqa: E402
from harden.model import prepare  # noqa: E402
from harden.train.saq import SAQConfig, fine_tune  # noqa: E402
from harden.train.variability import lognormal_noise  # noqa: E402


pytestmark = pytest.mark.usefixtures("torch_one_thread")




def test_noise_is_lognormal():
    noise = lognormal_noise(0.05, 0.15)
    gen = torch.Generator().manual_seed(0)
    w = torch.ones(200, 200)
    chips = []
    for _ in range(200):
        logs = torch.log(noise(w, gen))
        chips.append(float(logs.mean()))
        assert float(logs.std()) == pytest.approx(0.15, rel=0.05)
    assert np.std(chips) == pytest.approx(0.05, rel=0.2) and abs(np.mean(chips)) < 0.02
    assert torch.equal(lognormal_noise(0, 0)(w, gen), w)


def test_variability_aware_beats_plain_under_analog_variability(residual_cnn, digits):
    """The issue's claim: under simulated analog variability (sigma_chip 0.05, sigma_cell 0.15,
    100 chips) the variability-aware model is more accurate (non-overlapping 95 % CIs)."""
    out = {}
    for aware in (False, True):
        model, _ = prepare(onnx.load(str(residual_cnn)))
        ctx = PassContext(calib=zoo.digits_dataset(digits, "calib"))
        model = ClipPass("zero", 100.0).call(model, ctx).model
        if aware:
            r = fine_tune(model, zoo.digits_dataset(digits, "train"), SAQConfig(epochs=10, lr=5e-4, sam=False), val=ctx.calib,
                          noise=lognormal_noise(0.05, 0.15))
            model = r.model
            assert r.record["kept_epoch"] >= 5
        q, _ = run_passes(model, [QuantizePass()], ctx)
        camp = Campaign(q, zoo.digits_dataset(digits, "test"), parse_fault_spec("variability:0.05,0.15"), seed=0)
        res = camp.run(CampaignOptions(trials=100, seed=0))
        out[aware] = (camp.clean_accuracy, camp.point_record(res.points[0], res.options)["accuracy"])
    (c0, a0), (c1, a1) = out[False], out[True]
    assert a1["mean"] > a0["mean"] and a1["ci95"][0] > a0["ci95"][1], (a0, a1)
    assert c1 >= c0 - 0.01


def test_apply_variability_cli(tmp_path, residual_cnn, digits, digits_calib_npz):
    train = zoo.write_npz(tmp_path / "train.npz", digits["x_train"][:256], digits["y_train"][:256])
    chip = tmp_path / "chip.bin"
    assert CliRunner().invoke(main, ["faultmap", "generate", "--for-model", str(residual_cnn), "--rate", "0.01", "--seed", "1", "-o", str(chip)]).exit_code == 0
    args = ["apply", str(residual_cnn), "--faultmap", str(chip), "--data", str(digits_calib_npz), "-o", str(tmp_path / "m.onnx"),
            "--report", str(tmp_path / "r.json"), "--trials", "0", "--clip-percentile", "100", "--variability", "0.05,0.15",
            "--train-data", str(train), "--epochs", "2", "--clip-train"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    names = [p["pass"] for p in rep["passes"]]
    assert names.index("clip") < names.index("clip-train") < names.index("variability") < names.index("quantize")
    var = rep["passes"][names.index("variability")]
    assert var["variability"] == {"sigma_chip": 0.05, "sigma_cell": 0.15}
    assert var["config"]["sam"] is False and var["config"]["lr"] == 5e-4 and len(var["epochs"]) == 2
    assert rep["options"]["variability"] == [0.05, 0.15]
