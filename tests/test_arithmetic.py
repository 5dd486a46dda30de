"""The chip's arithmetic on any host (harden/arithmetic.py, issue 9).

Every figure is held to an exact integer reference computed in numpy, never to the host's
fused onnxruntime kernels. The layer under test overflows int16 in most u8 x s8 product pairs,
so a harden that used onnxruntime's fused u8s8 kernels would fail these tests on x86 without
VNNI; `test_*_emulated_avx2_cpu` runs them on such a CPU (QEMU's Haswell model) so that a VNNI
development machine cannot hide it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import exact_reference as xr
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from harden.arithmetic import TOLERANCE, describe, fused_kernels_exact
from harden.data import Dataset
from harden.faultmap import read_faultmap
from harden.model import get_metadata
from harden.runtime import run_batched
from harden.pipeline import ApplyOptions, apply
from harden.report import warning_line
from harden.simulate import ChipEvaluator, Reference

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
QEMU = shutil.which("qemu-x86_64")


def _within_tolerance(got: np.ndarray, want: np.ndarray) -> None:
    d = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert d.max() <= TOLERANCE["activation_steps"], f"off by {d.max()} steps"
    assert np.mean(d > 0) <= TOLERANCE["activation_ties"], f"{np.mean(d > 0):.4%} of codes off"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chip_evaluator_equals_exact_int32_reference(seed):
    """harden's evaluator on a layer pair whose u8 x s8 pair sums overflow int16."""
    result = xr.compare(seed)
    assert result["pair_overflow_fraction"] > 0.5, "the layer must overflow int16 for the test to mean anything"
    for key in ("harden_hidden", "harden_logits"):
        assert result[key]["max_steps"] <= TOLERANCE["activation_steps"], (key, result[key])
        assert result[key]["off_fraction"] <= TOLERANCE["activation_ties"], (key, result[key])


@pytest.mark.parametrize("strategy", ["rebuild", "feed"])
def test_faulty_weights_in_a_trial_session_equal_the_reference(strategy):
    """The campaign path, both ways a trial runs (a session rebuilt with the faulty tensors, or
    the tensors fed as inputs): int8 weights pushed to extreme codes by stuck bits."""
    model, x, p = xr.build(3)
    rng = np.random.default_rng(3)
    w1 = p["w1"].copy()
    stuck = rng.random(w1.shape) < 0.2
    w1[stuck] = np.where(p["w1"][stuck] > 0, 127, -128)  # sign kept, magnitude stuck high
    w2 = p["w2"].copy()
    w2.view(np.uint8)[rng.random(w2.shape) < 0.1] ^= 0x80  # flipped sign bits
    h_ref, out_ref = xr.reference(p, x, w1, w2)
    ev = ChipEvaluator(model, Dataset({"input": x}), Reference(np.argmax(out_ref, 1), "agreement"), strategy=strategy)
    sess, feeds = ev.session_for({"w1": w1, "w2": np.ascontiguousarray(w2.T)})
    logits, hidden = run_batched(sess, ev.data, 64, ["logits", "hidden"], feeds)
    _within_tolerance(xr.to_codes(hidden, p["so1"], p["zo1"]), h_ref)
    _within_tolerance(xr.to_codes(logits, p["so2"], p["zo2"]), out_ref)
    assert ev.evaluate({"w1": w1, "w2": np.ascontiguousarray(w2.T)}) >= 1 - TOLERANCE["activation_ties"] * 10


def test_every_session_harden_builds_goes_through_the_chip_arithmetic():
    """No onnxruntime session in the package is built around runtime.session (which sets the
    arithmetic): a new module that built its own would silently use the host's kernels."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "harden").rglob("*.py")
                 if "InferenceSession(" in p.read_text() and p.name != "runtime.py"]
    assert offenders == []


def test_fused_kernel_exactness_by_cpu():
    assert fused_kernels_exact("x86_64", ["avx2"]) is False
    assert fused_kernels_exact("x86_64", ["avx2", "avx512f", "avx512bw"]) is False
    assert fused_kernels_exact("x86_64", ["avx2", "avx512vnni"]) is True
    assert fused_kernels_exact("x86_64", ["avx2", "avx_vnni"]) is True
    assert fused_kernels_exact("aarch64", ["asimd", "asimddp"]) is True


def test_host_warning_only_when_the_accuracies_part():
    host = {"machine": "x86_64", "int8_flags": ["avx2"], "fused_int8_exact": False}
    same = {"host": host, "accuracy_chip_arithmetic": 0.9, "accuracy_onnxruntime_fused": 0.9, "differs": False}
    apart = {**same, "accuracy_onnxruntime_fused": 0.8, "differs": True}
    assert warning_line(same) is None and warning_line(None) is None
    line = warning_line(apart)
    assert "80.00%" in line and "90.00%" in line and "avx2" in line


def _independent_accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, chip=None) -> float:
    """Accuracy of `model` read back through `chip` (or fault-free), computed without harden:
    masks from the memory-map metadata, then a plain onnxruntime session with QDQ fusion off."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if chip is not None:
        mm = json.loads(get_metadata(model)["harden.memory_map"])
        assert mm["layout"] == "linear"
        sa0 = np.zeros(mm["num_words"], np.uint8)
        sa1 = np.zeros(mm["num_words"], np.uint8)
        sa0[chip.addresses.astype(np.int64)] = chip.sa0
        sa1[chip.addresses.astype(np.int64)] = chip.sa1
        inits = {t.name: t for t in model.graph.initializer}
        for slot in mm["tensors"]:
            t = inits[slot["name"]]
            w = numpy_helper.to_array(t)
            addr = (slot["offset"] + np.arange(slot["count"])) % mm["num_words"]
            read = (w.reshape(-1).view(np.uint8) & ~sa0[addr]) | sa1[addr]
            t.CopyFrom(numpy_helper.from_array(read.view(np.int8).reshape(w.shape), t.name))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.mean(np.argmax(logits, 1) == y))


def test_report_figures_equal_an_independent_evaluation(tmp_path):
    """The JSON report's held-out accuracies are the written model's, read back through the chip
    on the unfused path, within one sample; and the report names the arithmetic."""
    out = tmp_path / "h.onnx"
    apply(ROOT / "samples/model.onnx", ROOT / "samples/chip.bin", ROOT / "samples/calib.npz", out,
          eval_data_path=ROOT / "samples/test.npz", report_path=tmp_path / "r.json",
          options=ApplyOptions(trials=0, clip_percentile=100.0))
    report = json.loads((tmp_path / "r.json").read_text())
    test = np.load(ROOT / "samples/test.npz")
    x, y = test["input"], test["label"]
    chip = read_faultmap(ROOT / "samples/chip.bin", None)
    written = onnx.load(str(out))
    acc = report["results"]["accuracy"]
    one_sample = 1 / len(y) + 1e-9
    assert abs(acc["hardened_on_chip"] - _independent_accuracy(written, x, y, chip)) <= one_sample
    assert abs(acc["hardened"] - _independent_accuracy(written, x, y)) <= one_sample
    # int8 and int8 on chip: the same model before FAQ (the shared plain int8 model).
    from harden.pipeline import build_shared, load_inputs

    model, calib, evald, _ = load_inputs(ROOT / "samples/model.onnx", ROOT / "samples/calib.npz", ROOT / "samples/test.npz")
    plain = build_shared(model, calib, evald, ApplyOptions(trials=0, clip_percentile=100.0), lambda _m: None).plain
    plain.metadata_props.extend(p for p in written.metadata_props if p.key == "harden.memory_map")
    assert abs(acc["int8"] - _independent_accuracy(plain, x, y)) <= one_sample
    assert abs(acc["int8_on_chip"] - _independent_accuracy(plain, x, y, chip)) <= one_sample
    assert acc["int8"] - acc["int8_on_chip"] > 0.3
    assert report["results"]["arithmetic"]["name"] == describe()["name"] == "int32-exact"
    host = report["results"]["host_onnxruntime"]
    assert host["accuracy_chip_arithmetic"] == acc["hardened"]
    assert set(host) >= {"host", "accuracy_onnxruntime_fused", "top1_agreement", "differs"}


def _qemu(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    return subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=TESTS)


needs_qemu = pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                                reason="needs qemu-x86_64 (apt-get install qemu-user) on an x86_64 host")


@needs_qemu
def test_exact_on_an_emulated_avx2_cpu():
    """On an AVX2-only CPU (no VNNI) the host's fused kernels saturate, and harden does not."""
    proc = _qemu("exact_reference.py", "0", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "avx2" in result["host"]["int8_flags"] and result["host"]["fused_int8_exact"] is False
    # The emulation is real: the fused u8s8 kernels saturate there ...
    assert result["fused_logits"]["max_steps"] > 5 and result["fused_hidden"]["off_fraction"] > 0.5
    # ... and harden's figures are the integer reference's.
    assert result["harden_hidden"]["max_steps"] <= TOLERANCE["activation_steps"]
    assert result["harden_logits"]["off_fraction"] <= TOLERANCE["activation_ties"]


@needs_qemu
@pytest.mark.slow
def test_sample_figures_identical_on_an_emulated_avx2_cpu(tmp_path):
    """README command 1's figures (no campaign) are the same on an AVX2-only CPU as here,
    and the same model bytes come out."""
    args = ["-m", "harden", "apply", str(ROOT / "samples/model.onnx"), "--faultmap", str(ROOT / "samples/chip.bin"),
            "--data", str(ROOT / "samples/calib.npz"), "--eval-data", str(ROOT / "samples/test.npz"),
            "--trials", "0", "--clip-percentile", "100", "--quiet"]
    emulated = _qemu(*args, "-o", str(tmp_path / "avx2.onnx"), "--report", str(tmp_path / "avx2.json"), timeout=900)
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    native = subprocess.run([sys.executable, *args, "-o", str(tmp_path / "here.onnx"), "--report", str(tmp_path / "here.json")],
                            capture_output=True, text=True, timeout=300)
    assert native.returncode == 0, native.stderr
    a = json.loads((tmp_path / "avx2.json").read_text())["results"]
    b = json.loads((tmp_path / "here.json").read_text())["results"]
    n = a["samples"]
    for key, value in b["accuracy"].items():
        assert abs(a["accuracy"][key] - value) * n <= TOLERANCE["accuracy_samples"] + 1e-9, key
    assert (tmp_path / "avx2.onnx").read_bytes() == (tmp_path / "here.onnx").read_bytes()
    assert a["host_onnxruntime"]["host"]["int8_flags"] == ["avx2"]


def test_without_eval_data_figures_are_on_held_out_samples(tmp_path):
    """Issue 11: no --eval-data -> every 4th sample of --data is held out of calibration and
    compensation, the figures are scored on exactly those, and the report says so."""
    out = tmp_path / "h.onnx"
    res = apply(ROOT / "samples/model.onnx", ROOT / "samples/chip.bin", ROOT / "samples/test.npz", out,
                options=ApplyOptions(trials=0, clip_percentile=100.0))
    data = np.load(ROOT / "samples/test.npz")
    held = np.arange(len(data["label"])) % 4 == 3
    ev = res.report["inputs"]["eval_data"]
    assert ev["held_out_of"] == "data" and ev["samples"] == held.sum() == res.report["results"]["samples"]
    assert res.report["inputs"]["data"]["samples"] == (~held).sum()
    chip = read_faultmap(ROOT / "samples/chip.bin", None)
    x, y = data["input"][held], data["label"][held]
    acc = res.report["results"]["accuracy"]
    assert abs(acc["hardened_on_chip"] - _independent_accuracy(onnx.load(str(out)), x, y, chip)) <= 1 / len(y) + 1e-9
    from harden.report import summary_table

    assert "held-out" in summary_table(res.report)


@needs_qemu
@pytest.mark.slow
def test_stacked_campaign_figures_on_an_emulated_avx2_cpu(tmp_path):
    """Stacked trials (grouped convolutions, K trials per session) give every trial the figures
    of this host on an AVX2-only CPU, whose NCHWc blocks are 8 channels wide instead of 16."""
    q = tmp_path / "q.onnx"
    quant = subprocess.run([sys.executable, "-m", "harden", "quantize", str(ROOT / "samples/model.onnx"), "--data",
                            str(ROOT / "samples/calib.npz"), "-o", str(q), "--quiet"], capture_output=True, text=True, timeout=300)
    assert quant.returncode == 0, quant.stderr[-2000:]
    args = ["-m", "harden", "simulate", str(q), "--data", str(ROOT / "samples/test.npz"), "--fault", "bitflip:1e-2",
            "--trials", "20", "--json"]
    emulated = _qemu(*args, timeout=900)
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    native = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert native.returncode == 0, native.stderr[-2000:]
    a, b = (json.loads(p.stdout)["points"][0]["per_trial"]["accuracy"] for p in (emulated, native))
    n = json.loads(native.stdout)["clean"]["samples"]
    assert len(a) == len(b) == 20 and len(set(b)) > 1
    assert max(abs(x - y) for x, y in zip(a, b)) * n <= TOLERANCE["accuracy_samples"] + 1e-6
