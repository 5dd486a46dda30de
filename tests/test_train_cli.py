"""The training options without torch: exit 2 with the install hint, nothing else affected.

No torch needed here (these tests hide it), so they run in a torch-less CI too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harden.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _apply(tmp_path, *extra):
    args = ["apply", str(SAMPLES / "model.onnx"), "--faultmap", str(SAMPLES / "chip.bin"), "--data", str(SAMPLES / "calib.npz"),
            "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json"), "-q", "--trials", "0", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture
def no_torch(monkeypatch):
    """`import torch` fails (as without the harden[train] extra); harden.train modules reload."""
    monkeypatch.setitem(sys.modules, "torch", None)
    for name in [m for m in sys.modules if m.startswith("harden.train.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("flags", [["--saq"], ["--saq", "--epochs", "2", "--rho", "0.3", "--lr", "0.01"]])
def test_saq_without_torch_exits_2_with_the_hint(tmp_path, no_torch, flags):
    r = _apply(tmp_path, *flags)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == ["error: --saq needs torch: pip install 'harden[train]'"]
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "r.json").exists()


def test_apply_without_torch_is_unaffected(tmp_path, no_torch):
    r = _apply(tmp_path)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "saq" not in [p["pass"] for p in rep["passes"]] and rep["options"]["saq"] is False


@pytest.mark.parametrize("flags,line", [
    (["--epochs", "3"], "--epochs only applies with --saq or --variability"),
    (["--lr", "0.1"], "--lr only applies with --saq or --variability"),
    (["--rho", "0.1"], "--rho only applies with --saq"),
    (["--train-data", str(SAMPLES / "calib.npz")], "--train-data only applies with --saq, --clip-train or --variability"),
    (["--clip-train", "--no-clip"], "--clip-train trains the clip pass's thresholds; it cannot be used with --no-clip"),
])
def test_training_knobs_need_a_training_step(tmp_path, flags, line):
    r = _apply(tmp_path, *flags)
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"error: {line}"]


@pytest.mark.parametrize("flags,what", [(["--clip-train"], "--clip-train"), (["--variability", "0.05,0.1"], "--variability"),
                                        (["--saq", "--variability", "0,0.1", "--clip-train"], "--saq and --clip-train and --variability")])
def test_other_training_steps_without_torch(tmp_path, no_torch, flags, what):
    r = _apply(tmp_path, *flags)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [f"error: {what} needs torch: pip install 'harden[train]'"]


@pytest.mark.parametrize("value", ["0.1", "a,b", "0.1,2", "0.1,0.2,0.3", "-0.1,0.1", "nan,0.1"])
def test_variability_value_is_checked(tmp_path, value):
    r = _apply(tmp_path, "--variability", value)
    assert r.exit_code == 2
    assert "SIGMA_CHIP,SIGMA_CELL" in r.output


def test_require_torch_message(no_torch):
    from harden.errors import InputError
    from harden.train import require_torch, torch_available

    assert not torch_available()
    with pytest.raises(InputError, match=r"^--clip-train needs torch: pip install 'harden\[train\]'$"):
        require_torch("--clip-train")
