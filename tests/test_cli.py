"""CLI contract: gates exit 1, usage errors are one `error:` line with exit 2, help has examples."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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
    # the bundled chip's loss is fully recovered: a harsher chip leaves some for --max-drop 0
    harsh = tmp_path / "harsh.bin"
    gen = CliRunner().invoke(main, ["faultmap", "generate", "--for-model", str(SAMPLES / "model.onnx"), "--rate", "0.3",
                                    "--seed", "1", "-o", str(harsh), "-q"])
    assert gen.exit_code == 0, gen.output
    drop = CliRunner().invoke(main, ["apply", str(SAMPLES / "model.onnx"), "--faultmap", str(harsh), "--data", str(SAMPLES / "calib.npz"),
                                     "--eval-data", str(SAMPLES / "test.npz"), "-o", str(tmp_path / "h.onnx"),
                                     "--report", str(tmp_path / "h.json"), "-q", "--trials", "0", "--max-drop", "0"])
    acc = json.loads((tmp_path / "h.json").read_text())["results"]["accuracy"]
    assert acc["hardened_on_chip"] < acc["int8"]
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


def test_quantize_gives_the_int8_model_apply_measures(tmp_path):
    """Issue 10: `harden quantize` is apply's plan up to quantize: simulating its output on the
    chip gives apply's own "int8" and "int8 on chip" figures."""
    root = Path(__file__).resolve().parent.parent
    s = root / "samples"
    q = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, ["quantize", str(s / "model.onnx"), "--data", str(s / "calib.npz"), "--eval-data",
                                    str(s / "test.npz"), "--clip-percentile", "100", "-o", str(q), "--quiet"])
    assert res.exit_code == 0, res.output
    rep = tmp_path / "a.json"
    res = CliRunner().invoke(main, ["apply", str(s / "model.onnx"), "--faultmap", str(s / "chip.bin"), "--data", str(s / "calib.npz"),
                                    "--eval-data", str(s / "test.npz"), "--clip-percentile", "100", "--trials", "0",
                                    "-o", str(tmp_path / "h.onnx"), "--report", str(rep), "--quiet"])
    assert res.exit_code == 0, res.output
    acc = json.loads(rep.read_text())["results"]["accuracy"]
    sim = tmp_path / "s.json"
    res = CliRunner().invoke(main, ["simulate", str(q), "--data", str(s / "test.npz"), "--faultmap", str(s / "chip.bin"),
                                    "--report", str(sim), "--quiet"])
    assert res.exit_code == 0, res.output
    srep = json.loads(sim.read_text())
    assert srep["clean"]["accuracy"] == acc["int8"]
    assert srep["points"][0]["accuracy"]["mean"] == acc["int8_on_chip"]


def test_junit_xml_and_markdown_for_simulate_and_fleets(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz):
    """Issue 10: --junit-xml (one test case per gate, failures as JUnit failures) on apply and
    simulate, and --summary-md for fleets and simulate too."""
    import xml.etree.ElementTree as ET

    from harden.faultmap import generate_uniform, write_faultmap
    from harden.memory import weight_count

    chips = tmp_path / "chips"
    chips.mkdir()
    for seed in (1, 2):
        write_faultmap(generate_uniform(weight_count(residual_cnn), 0.04, seed, {"chip_id": f"c{seed}"}), chips / f"c{seed}.bin")
    junit, md = tmp_path / "fleet.xml", tmp_path / "fleet.md"
    res = CliRunner().invoke(main, ["apply", str(residual_cnn), "--faultmap", str(chips), "--data", str(digits_calib_npz),
                                    "--eval-data", str(digits_test_npz), "--trials", "0", "--clip-percentile", "100", "--jobs", "1",
                                    "-o", str(tmp_path / "out"), "--min-accuracy", "0.999", "--max-drop", "0.5",
                                    "--junit-xml", str(junit), "--summary-md", str(md), "--quiet"])
    assert res.exit_code == 1, res.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    failed = [tc for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert len(failed) == 1 and "--min-accuracy" in failed[0].get("name")
    text = md.read_text()
    assert "fleet of 2 chips" in text and "**FAILED**" in text and "`c1`" in text

    q = tmp_path / "q.onnx"
    assert CliRunner().invoke(main, ["quantize", str(residual_cnn), "--data", str(digits_calib_npz), "--clip-percentile", "100",
                                     "-o", str(q), "--quiet"]).exit_code == 0
    junit, md = tmp_path / "sim.xml", tmp_path / "sim.md"
    res = CliRunner().invoke(main, ["simulate", str(q), "--data", str(digits_test_npz), "--fault", "bitflip:1e-3,1e-1", "--trials", "4",
                                    "--min-accuracy", "all=0.5", "--junit-xml", str(junit), "--summary-md", str(md), "--quiet"])
    assert res.exit_code == 1, res.output  # bit flips at 0.1 destroy the model
    suite = ET.parse(junit).getroot().find("testsuite")
    names = [tc.get("name") for tc in suite.iter("testcase")]
    assert names == ["--min-accuracy bitflip:0.001=0.5", "--min-accuracy bitflip:0.1=0.5"]
    assert suite.get("failures") == "1"
    assert "bitflip:0.1" in md.read_text() and "**FAIL**" in md.read_text()


def test_apply_logs_one_line_per_stage_without_a_terminal(tmp_path):
    """Issue 12: in a CI log (no terminal) `--progress` makes apply say where the time goes, one
    line per step, and estimate the campaign before it starts; without it (or with --quiet) a
    run without a terminal prints nothing on stderr."""
    s = Path(__file__).resolve().parent.parent / "samples"
    argv = [sys.executable, "-m", "harden", "apply", str(s / "model.onnx"), "--faultmap", str(s / "chip.bin"), "--data",
            str(s / "calib.npz"), "--clip-percentile", "100", "--trials", "2", "-o", str(tmp_path / "h.onnx")]
    proc = subprocess.run(argv + ["--progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    stages = [line.split("] ", 1)[1] for line in lines]
    assert [st.split(":")[0] for st in stages] == ["load", "simplify", "clip", "quantize", "faq", "campaign", "write"]
    assert all(line.startswith("harden apply: [") for line in lines)
    assert re.search(r"campaign: 3 models x 4 points x 2 trials, 24 evaluation passes, about \d+ s", proc.stderr)
    for extra in (["--progress", "--quiet"], []):
        quiet = subprocess.run(argv + extra + ["-o", str(tmp_path / "q.onnx")], capture_output=True, text=True, timeout=300)
        assert quiet.returncode == 0 and quiet.stderr == ""
