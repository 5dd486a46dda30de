"""Analog PIM variability (`variability` fault model) and self-tuning (`harden tune`).

The int8 models are the zoo's digits CNNs put through harden's preparation and QuantizePass,
calibrated on the calibration split; figures are measured on the held-out test split and the
probe inputs are the first 32 calibration images.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from harden.campaign import trial_rng
from harden.cli import main
from harden.data import Dataset, load_npz
from harden.errors import InputError
from harden.faults import WeightSpace, parse_fault_spec
from harden.faults.variability import (
    AnalogEvaluator,
    Variability,
    VariabilityParams,
    float_values,
    sample_variability,
)
from harden.model import get_initializer, get_metadata, load_model, qdq_weights
from harden.runtime import session
from harden.simulate import ChipEvaluator, Reference
from harden.tune import (
    TUNE_METADATA,
    TuneOptions,
    apply_gains,
    compare_tuning,
    fold_gains,
    measure_gains,
    simulated_chip,
    tune,
)


@pytest.fixture(scope="module")
def residual_setup(int8_residual, digits_test_npz, digits_calib_npz):
    model = load_model(int8_residual)
    test = load_npz(digits_test_npz, model)
    probe = load_npz(digits_calib_npz, model).take(32)
    return model, test, probe, AnalogEvaluator(model, test), AnalogEvaluator(model, probe)


def _acc(pred, data: Dataset) -> float:
    return float(np.mean(pred == data.labels))


# --- the analog session and the fault model ---------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_sigma_zero_reproduces_clean(request, kind, digits_test_npz):
    model = load_model(request.getfixturevalue(f"int8_{kind}"))
    test = load_npz(digits_test_npz, model)
    ev = AnalogEvaluator(model, test)
    fused = ChipEvaluator(model, test, Reference(test.labels, "labels"))
    # The float-weight session vs the fused int8 session: a few requantisation steps apart,
    # the same top-1 on (almost) every input and the same accuracy.
    cmp = ev.compare_fused(fused.logits())
    assert cmp["predictions_agree"] >= 0.997, cmp
    assert cmp["max_abs_logit_difference"] < 0.25, cmp
    assert abs(_acc(ev.clean, test) - fused.evaluate()) <= 1 / len(test)
    # sigma 0: nothing varies, the clean predictions exactly.
    inj = Variability(VariabilityParams(0.0, 0.0)).sample(trial_rng(0, 0, 0), ev.space)
    assert not inj.tensors and inj.cells == 0
    assert np.array_equal(ev.predictions(inj), ev.clean)
    # Nominal weights fed explicitly: bit-identical logits to the clean run.
    assert np.array_equal(ev.logits(dict(ev.values)), ev.clean_logits)


def test_accuracy_falls_with_sigma(residual_setup):
    _, test, _, ev, _ = residual_setup
    def mean_acc(sc, sl, trials=12):
        m = Variability(VariabilityParams(sc, sl))
        return np.mean([_acc(ev.predictions(m.sample(trial_rng(0, 0, t), ev.space)), test) for t in range(trials)])

    chip = [mean_acc(s, 0.0) for s in (0.0, 0.1, 0.2, 0.3)]
    assert all(a > b for a, b in zip(chip, chip[1:])), chip
    assert chip[-1] < chip[0] - 0.1
    cell = [mean_acc(0.0, s) for s in (0.0, 0.05, 0.15)]
    assert all(a > b for a, b in zip(cell, cell[1:])), cell


def test_draws_are_deterministic_per_seed(residual_setup):
    _, _, _, ev, _ = residual_setup
    space = ev.space
    m = Variability(VariabilityParams(0.2, 0.03))
    a = m.sample(trial_rng(5, 1, 7), space)
    b = m.sample(trial_rng(5, 1, 7), space)
    c = m.sample(trial_rng(5, 1, 8), space)
    assert [t.chip for t in a.tensors] == [t.chip for t in b.tensors]
    assert all(np.array_equal(x.cell, y.cell) for x, y in zip(a.tensors, b.tensors))
    assert [t.chip for t in a.tensors] != [t.chip for t in c.tensors]
    assert a.cells == space.weight_count == sum(t.cell.size for t in a.tensors)
    # The chip component does not depend on sigma_cell, and scales with sigma_chip.
    no_cell = Variability(VariabilityParams(0.2, 0.0)).sample(trial_rng(5, 1, 7), space)
    half = Variability(VariabilityParams(0.1, 0.0)).sample(trial_rng(5, 1, 7), space)
    assert [t.chip for t in no_cell.tensors] == [t.chip for t in a.tensors]
    assert np.allclose([2 * t.chip for t in half.tensors], [t.chip for t in a.tensors])
    assert all(t.cell is None for t in no_cell.tensors)
    # Restricting to one tensor keeps that tensor's draw; restricting to all draws the same.
    name = space.weights[2].name
    one = m.restricted((name,)).sample(trial_rng(5, 1, 7), space)
    assert [t.name for t in one.tensors] == [name] and one.tensors[0].chip == a.tensors[2].chip
    every = m.restricted(tuple(reversed([t.name for t in space.weights]))).sample(trial_rng(5, 1, 7), space)
    assert [t.chip for t in every.tensors] == [t.chip for t in a.tensors]
    # Same predictions for the same trial.
    assert np.array_equal(ev.predictions(a), ev.predictions(b))
    # The helper for training code: one chip draw per call, log-normal factors.
    f = sample_variability(np.random.default_rng(0), (64, 128), 0.0, 0.1)
    assert f.shape == (64, 128) and f.dtype == np.float32
    assert abs(np.log(f).std() - 0.1) < 0.005 and abs(np.log(f).mean()) < 0.005
    g = sample_variability(np.random.default_rng(0), (3, 4), 0.3, 0.0)
    assert np.all(g == g.flat[0]) and g.flat[0] != 1.0


def test_fault_spec_parsing():
    (m,) = parse_fault_spec("variability:0.2,0.02")
    assert (m.params.sigma_chip, m.params.sigma_cell, m.label) == (0.2, 0.02, "variability:0.2,0.02")
    (m,) = parse_fault_spec("variability:0.1")
    assert m.params.sigma_cell == 0.0 and m.space_kind == "analog" and not m.deterministic
    for bad in ("variability:", "variability:-0.1", "variability:0.1,-1", "variability:abc", "variability:0.1,0.2,0.3",
                "variability:nan", "variability:5"):
        with pytest.raises(InputError):
            parse_fault_spec(bad)


# --- self-tuning ----------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_tune_improves_accuracy_under_between_chip_variability(residual_setup, granularity):
    model, test, probe, ev, pev = residual_setup
    c = compare_tuning(model, probe, test, 0.2, 0.02, 8, seed=0, granularity=granularity, evaluator=ev, probe_evaluator=pev)
    s = c.summary()
    assert s["tuned"]["mean"] > s["untuned"]["mean"] + 0.03, s
    assert s["tuned"]["mean"] >= s["nominal"] - 0.01, s  # the chip component is undone
    assert np.all(c.tuned >= c.untuned - 1 / len(test)), (c.tuned, c.untuned)


def test_tune_restores_the_nominal_model_without_cell_variability(residual_setup):
    model, test, probe, ev, pev = residual_setup
    chip = simulated_chip(ev, 0.3, 0.0, seed=0, chip=3)
    gains, clipped = measure_gains(pev, probe, chip, "layer")
    assert not clipped
    # Each gain undoes its layer's exp(theta_chip).
    want = {t.name: np.exp(-t.chip) for t in chip.tensors}
    for name, g in gains.items():
        assert abs(float(g) / want[name] - 1) < 1e-3, (name, float(g), want[name])
    on_chip = ev.predictions(chip, values=fold_gains(ev.values, ev.layers, gains))
    assert np.mean(on_chip == ev.clean) >= 0.997
    assert _acc(ev.predictions(chip), test) < _acc(ev.clean, test) - 0.2  # this chip hurts untuned


def test_gains_written_into_the_model(residual_setup):
    model, test, probe, ev, pev = residual_setup
    chip = simulated_chip(ev, 0.2, 0.05, seed=1, chip=0)
    gains, _ = measure_gains(pev, probe, chip, "channel")
    tuned = apply_gains(model, ev.layers, gains, {"x": 1})
    # Codes untouched; scales carry the gains; biases keep their value.
    for w in qdq_weights(model):
        assert np.array_equal(get_initializer(model, w.name), get_initializer(tuned, w.name))
    fv, want = float_values(tuned), fold_gains(ev.values, ev.layers, gains)
    for L in ev.layers:
        np.testing.assert_allclose(fv[L.name], want[L.name], rtol=1e-5, atol=1e-7)
        if L.bias:
            step = np.abs(float_values(model)[L.bias] - fv[L.bias]).max()
            assert step <= np.max(qdq_weights(tuned)[ev.layers.index(L)].bias_scale) / 2 + 1e-7
    # onnxruntime's fused int8 session reads the tuned file as the analog session does.
    fused = ChipEvaluator(tuned, test, Reference(test.labels, "labels"))
    tuned_ev = AnalogEvaluator(tuned, test)
    assert np.mean(fused.predictions() == tuned_ev.clean) >= 0.997
    assert get_metadata(tuned)[TUNE_METADATA] == '{"x":1}'


def test_per_tensor_scale_becomes_per_channel(tmp_path):
    """A Gemm with per-tensor weight and bias scales takes per-channel gains: the DequantizeLinear
    nodes become per-channel (axis 0, zero points widened) and onnxruntime runs the result."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (3, 4)).astype(np.int8)
    b = rng.integers(-500, 500, 3).astype(np.int32)
    xs, ws = 0.02, 0.01
    inits = [
        numpy_helper.from_array(np.array(xs, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.array(ws, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"), numpy_helper.from_array(b, "b_q"),
        numpy_helper.from_array(np.array(xs * ws, np.float32), "bs"), numpy_helper.from_array(np.array(0, np.int32), "bz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "ws", "wz"], ["wd"]),
        helper.make_node("DequantizeLinear", ["b_q", "bs", "bz"], ["bd"]),
        helper.make_node("Gemm", ["xd", "wd", "bd"], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    x = rng.uniform(0, 1, (16, 4)).astype(np.float32)
    data = Dataset({"x": x})
    ev = AnalogEvaluator(model, data)
    gains = {"w_q": np.array([0.5, 1.0, 2.0], np.float32)}
    tuned = apply_gains(model, ev.layers, gains)
    onnx.checker.check_model(tuned)
    (y0,) = session(model).run(None, {"x": x})
    (y1,) = session(tuned).run(None, {"x": x})
    bias = b.astype(np.float32) * np.float32(xs * ws)
    np.testing.assert_allclose(y1 - bias, (y0 - bias) * gains["w_q"], rtol=1e-4, atol=1e-5)
    q = qdq_weights(tuned)[0]
    np.testing.assert_allclose(q.scale, ws * gains["w_q"], rtol=1e-6)
    np.testing.assert_allclose(q.bias_scale, xs * ws * gains["w_q"], rtol=1e-6)


# --- the command ----------------------------------------------------------------------------


def test_tune_command_writes_a_tuned_model(tmp_path, int8_residual, digits_calib_npz, digits_test_npz):
    out = tmp_path / "tuned.onnx"
    before = int8_residual.read_bytes()
    r = CliRunner().invoke(main, ["tune", str(int8_residual), "--data", str(digits_calib_npz), "--sigma-chip", "0.3",
                                  "--sigma-cell", "0.02", "--seed", "0", "--chip", "3", "--eval", str(digits_test_npz),
                                  "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    ev = res["evaluation"]
    assert ev["tuned_on_chip"] > ev["untuned_on_chip"] + 0.1 and ev["tuned_on_chip"] >= ev["nominal"] - 0.01
    tuned = load_model(out)
    rec = json.loads(get_metadata(tuned)[TUNE_METADATA])
    assert rec == res["record"]
    assert rec["chip"]["rng"] == [0, 0, 3] and rec["probe_samples"] == 32 and rec["granularity"] == "channel"
    assert set(rec["gains"]) == {w.name for w in qdq_weights(tuned)}
    assert int8_residual.read_bytes() == before
    # The same chip as trial 3 of point 0 of `simulate --seed 0 --fault variability:0.3,0.02`.
    model = load_model(int8_residual)
    test = load_npz(digits_test_npz, model)
    ev2 = AnalogEvaluator(model, test)
    inj = Variability(VariabilityParams(0.3, 0.02)).sample(trial_rng(0, 0, 3), ev2.space)
    assert round(_acc(ev2.predictions(inj), test), 6) == ev["untuned_on_chip"]
    # Deterministic output.
    out2 = tmp_path / "tuned2.onnx"
    tune(int8_residual, digits_calib_npz, out2, TuneOptions(0.3, 0.02, 0, 3), digits_test_npz)
    assert out2.read_bytes() == out.read_bytes()


def test_tune_bad_input_exits_2(tmp_path, int8_residual, residual_cnn, digits_calib_npz):
    tuned = tmp_path / "t.onnx"
    base = ["tune", str(int8_residual), "--data", str(digits_calib_npz), "-o", str(tuned)]
    cases = [
        (base + ["--sigma-chip", "-0.1"], "--sigma-chip must be in"),
        (base + ["--sigma-chip", "0.1", "--sigma-cell", "nan"], "--sigma-cell must be in"),
        (base + ["--sigma-chip", "0.1", "--probe-samples", "0"], "--probe-samples"),
        (base + ["--sigma-chip", "0.1", "--chip", "-1"], "--chip"),
        (base + ["--sigma-chip", "0.1", "--per", "row"], "--per"),
        (["tune", str(residual_cnn), "--data", str(digits_calib_npz), "-o", str(tuned), "--sigma-chip", "0.1"], "int8 QDQ"),
        (["tune", str(int8_residual), "--data", str(tmp_path / "none.npz"), "-o", str(tuned), "--sigma-chip", "0.1"], "no such"),
        (["tune", str(int8_residual), "--data", str(digits_calib_npz), "-o", str(int8_residual), "--sigma-chip", "0.1"], "is the input"),
        (["tune", str(int8_residual), "--data", str(digits_calib_npz), "--sigma-chip", "0.1"], "Missing option '-o'"),
    ]
    for args, fragment in cases:
        r = CliRunner().invoke(main, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2, (args, r.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (args, r.output)
    assert not tuned.exists()
    # A tuned model is refused (its gains would be taken for the nominal model).
    ok = CliRunner().invoke(main, base + ["--sigma-chip", "0.1", "-q"])
    assert ok.exit_code == 0 and ok.output == ""
    again = CliRunner().invoke(main, ["tune", str(tuned), "--data", str(digits_calib_npz), "-o", str(tmp_path / "u.onnx"),
                                      "--sigma-chip", "0.1"])
    assert again.exit_code == 2 and "already tuned" in again.output


def test_simulate_bad_variability_spec_exits_2(int8_residual, digits_test_npz):
    for spec in ("variability:-0.2", "variability:x", "variability:0.1,0.1,0.1"):
        r = CliRunner().invoke(main, ["simulate", str(int8_residual), "--data", str(digits_test_npz), "--fault", spec])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "variability" in lines[0], r.output


def test_simulate_runs_variability_points(int8_residual, digits_test_npz):
    r = CliRunner().invoke(main, ["simulate", str(int8_residual), "--data", str(digits_test_npz), "--fault",
                                  "variability:0,0", "--fault", "variability:0.3", "--trials", "6", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    p0, p1 = rep["points"]
    assert p0["session"] == p1["session"] == "analog"
    assert p0["accuracy"]["mean"] == p0["clean_accuracy"] and p0["sdc1"]["mean"] == 0.0
    assert p1["accuracy"]["mean"] < p0["accuracy"]["mean"] - 0.05
    assert rep["analog"]["clean"]["predictions_agree"] >= 0.997
    # Point 1, trial t: the chip of `harden tune --seed 0 --chip t` drawn for point 1.
    model = load_model(int8_residual)
    test = load_npz(digits_test_npz, model)
    ev = AnalogEvaluator(model, test)
    inj = Variability(VariabilityParams(0.3)).sample(trial_rng(0, 1, 2), WeightSpace.from_model(model))
    assert round(_acc(ev.predictions(inj), test), 6) == p1["per_trial"]["accuracy"][2]
