"""CLI contract: gates exit 1, usage errors are one `error:` line with exit 2, help has examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harden.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _apply(tmp_path, *extra):
    args = ["apply", str(SAMPLES / "model.onnx"), "--faultmap", str(SAMPLES / "chip.bin"), "--data", str(SAMPLES / "calib.npz"),
            "--eval-data", str(SAMPLES / "test.npz"), "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "r.json"), "-q", "--trials", "0", *extra]
    return CliRunner().invoke(main, args)


def test_gates(tmp_path):
    ok = _apply(tmp_path, "--min-accuracy", "0.9", "--max-drop", "0.05")
    assert ok.exit_code == 0, ok.output
    hardened = json.loads((tmp_path / "r.json").read_text())["results"]["accuracy"]["hardened_on_chip"]
    assert hardened >= 0.9
    failed = _apply(tmp_path, "--min-accuracy", str(min(1.0, hardened + 0.005)))
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines() == [f"error: gate failed: hardened accuracy on this chip {hardened:.4f} < --min-accuracy {min(1.0, hardened + 0.005)}"]
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "r.json").exists()
    int8 = json.loads((tmp_path / "r.json").read_text())["results"]["accuracy"]["int8"]
    assert hardened < int8  # on the bundled chip a little accuracy is still lost
    drop = _apply(tmp_path, "--max-drop", "0")
    assert drop.exit_code == 1 and "--max-drop 0" in drop.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["apply", "m.onnx"], "Missing option '--faultmap'"),
        (["apply"], "Missing argument 'MODEL'"),
        (["nonsense"], "No such command 'nonsense'"),
        (["apply", "m.onnx", "--faultmap", "c", "--data", "d", "--clip-percentile", "5"], "--clip-percentile"),
    ],
)
def test_usage_errors_are_one_line(args, fragment):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


@pytest.mark.parametrize("cmd", [["apply"], ["faultmap", "generate"], ["faultmap", "show"], ["faultmap", "convert"]])
def test_help_has_an_example(cmd):
    r = CliRunner().invoke(main, [*cmd, "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "harden " in r.output
