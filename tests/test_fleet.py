"""Fleets: shared work once, one hardened model per chip, the fleet's distribution and yield."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from harden.cli import main
from harden.faultmap import generate_uniform, write_faultmap
from harden.fleet import apply_fleet, expand_faultmaps
from harden.memory import weight_count
from harden.model import get_metadata
from harden.pipeline import ApplyOptions, apply

OPTS = ApplyOptions(trials=0, clip_percentile=100.0)


@pytest.fixture()
def chips(tmp_path, residual_cnn):
    folder = tmp_path / "chips"
    folder.mkdir()
    n = weight_count(residual_cnn)
    for seed, rate in ((1, 0.02), (2, 0.04), (3, 0.08)):
        write_faultmap(generate_uniform(n, rate, seed, {"chip_id": f"lot7/chip {seed}"}), folder / f"m{seed}.bin")
    return folder


@pytest.mark.parametrize("jobs", [1, 2])
def test_fleet_matches_single_chip_applies(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz, chips, jobs):
    out = tmp_path / f"out{jobs}"
    rep = apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz, options=OPTS, jobs=jobs)
    assert [c["chip"] for c in rep["chips"]] == ["lot7_chip_1", "lot7_chip_2", "lot7_chip_3"]
    for c, path in zip(rep["chips"], expand_faultmaps([chips])):
        single = apply(residual_cnn, path, digits_calib_npz, tmp_path / "single.onnx", eval_data_path=digits_test_npz, options=OPTS)
        assert c["accuracy"] == single.report["results"]["accuracy"]
        # The fleet's model for this chip is byte-identical to hardening it alone.
        assert (out / f"{c['chip']}.onnx").read_bytes() == (tmp_path / "single.onnx").read_bytes()
    fleet = rep["fleet"]
    assert fleet["chips"] == 3 and fleet["hardened_on_chip"]["mean"] > fleet["int8_on_chip"]["mean"] + 0.3
    assert fleet["hardened_on_chip"]["yield"] >= fleet["int8_on_chip"]["yield"]
    names = [p["pass"] for p in rep["passes"]]
    assert names.count("quantize") == 1 and "shared-stats" in names


def test_fleet_cli_gate_and_outputs(tmp_path, residual_cnn, digits_calib_npz, chips):
    out, report = tmp_path / "hardened", tmp_path / "fleet.json"
    args = ["apply", str(residual_cnn), "--faultmap", str(chips / "m1.bin"), "--faultmap", str(chips / "m3.bin"),
            "--data", str(digits_calib_npz), "-o", str(out), "--report", str(report), "--trials", "0",
            "--clip-percentile", "100", "--jobs", "1"]
    r = CliRunner().invoke(main, [*args, "--min-accuracy", "0.5"])
    assert r.exit_code == 0, r.output
    assert "yield at" in r.output and "lot7_chip_3" in r.output
    rep = json.loads(report.read_text())
    assert rep["command"] == "apply-fleet" and len(rep["chips"]) == 2
    for c in rep["chips"]:
        meta = get_metadata(onnx.load(c["output"]))
        assert json.loads(meta["harden.faultmap"])["chip_id"].startswith("lot7/chip")
    # FAQ alone (no compensation) leaves chips below 100 %: the gate fails them
    r = CliRunner().invoke(main, [*args, "--no-compensation", "--no-bias-correction", "--min-accuracy", "1.0"])
    assert r.exit_code == 1 and "chips below --min-accuracy" in r.output, r.output


def test_fleet_bad_inputs(tmp_path, residual_cnn, digits_calib_npz, chips):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["apply", str(residual_cnn), "--faultmap", str(empty), "--data", str(digits_calib_npz)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "no fault maps" in r.output
    bad = chips / "zz.bin"
    bad.write_bytes(b"HFM1 broken")
    r = CliRunner().invoke(main, ["apply", str(residual_cnn), "--faultmap", str(chips), "--data", str(digits_calib_npz),
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "zz.bin" in r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
