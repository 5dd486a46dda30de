"""Model diagnostics (harden/diagnostics.py): activation sparsity and epsilon-sharpness on the
zoo's trained digits CNNs, quantized by harden's own passes (plain, and with clipped ReLUs)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo
from onnx import helper

from harden.data import load_npz
from harden.diagnostics import (
    activation_sparsity,
    diagnose,
    perturb_codes,
    sharpness,
    sparsity_sites,
)
from harden.errors import InputError
from harden.model import qdq_weights
from harden.simulate import ChipEvaluator, Reference

from conftest import quantize_zoo_model


@pytest.fixture(scope="module")
def int8_clipped(tmp_path_factory, residual_cnn, digits_calib_npz) -> Path:
    return quantize_zoo_model(residual_cnn, digits_calib_npz, tmp_path_factory.mktemp("diag") / "clipped.int8.onnx", clip=True)


def _captured(model_path: Path, x: np.ndarray, names: list[str], elem_types: dict[str, int]) -> dict[str, np.ndarray]:
    """The named tensors on x, from a plain onnxruntime session (no harden code involved)."""
    m = onnx.load(str(model_path))
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, elem_types.get(n, onnx.TensorProto.FLOAT), None))
    sess = zoo.ort_session(m)
    return dict(zip(names, sess.run(names, {"input": x})))


@pytest.mark.parametrize("which", ["int8_plain", "int8_clipped"])
def test_sparsity_is_the_fraction_of_exact_zeros(request, which, digits, digits_test_npz):
    path = request.getfixturevalue(which)
    recs = activation_sparsity(path, digits_test_npz)
    model = onnx.load(str(path))
    weights = qdq_weights(model)
    inputs = [r for r in recs if r["kind"] == "input"]
    # One record per weight op (its input 0), in graph order, plus the ReLU / clip outputs.
    assert [r["weight"] for r in inputs] == [w.name for w in weights]
    assert [r["tensor"] for r in inputs] == [w.activation for w in weights]
    kinds = {r["kind"] for r in recs}
    assert kinds == ({"input", "clip"} if which == "int8_clipped" else {"input"})
    x = digits["x_test"]
    acts = _captured(path, x, [r["tensor"] for r in recs], {})
    for r in recs:
        a = acts[r["tensor"]]
        assert 0.0 <= r["sparsity"] <= 1.0
        assert r["elements"] == a.size and r["zeros"] == int(np.sum(a == 0))
        assert math.isclose(r["sparsity"], float(np.mean(a == 0)), abs_tol=1e-6)
    # A zero after DequantizeLinear is a quantized code equal to the zero point: count those.
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [dq[r["tensor"]] for r in inputs]
    codes = _captured(path, x, [n.input[0] for n in nodes], {n.input[0]: inits[n.input[2]].data_type for n in nodes})
    for r, node in zip(inputs, nodes):
        zp = onnx.numpy_helper.to_array(inits[node.input[2]])
        assert r["zeros"] == int(np.sum(codes[node.input[0]] == zp))
    # ReLU-fed layers are sparse; the first (the image) has the digits' blank background.
    assert max(r["sparsity"] for r in inputs) > 0.2
    assert sparsity_sites(onnx.load(str(path))) == [{k: v for k, v in r.items() if k not in ("elements", "zeros", "sparsity")} for r in recs]


def test_sharpness_grows_with_rho(int8_plain, int8_residual, digits_test_npz):
    rhos = (0.05, 0.1, 0.2)
    res = [sharpness(int8_plain, digits_test_npz, rho=r, samples=8, seed=1) for r in rhos]
    for r in res:
        assert r["loss"] == "cross_entropy" and r["samples"] == 8 and len(r["per_sample"]) == 8
        assert r["increase"] >= 0.0 and r["ci"][0] <= r["increase"] <= r["ci"][1]
        assert math.isclose(r["increase"], r["loss_perturbed_mean"] - r["loss_clean"], abs_tol=2e-6)
        assert 0.0 < r["codes_changed"] < 1.0
    assert len({r["loss_clean"] for r in res}) == 1
    inc = [r["increase"] for r in res]
    assert inc[0] < inc[1] < inc[2], inc
    assert res[-1]["ci"][0] > 0  # clearly sharper than noise at rho = 0.2
    changed = [r["codes_changed"] for r in res]
    assert changed == sorted(changed)
    # The small residual CNN, which bit flips hurt at far lower rates (test_simulate), is sharper.
    res_resid = sharpness(int8_residual, digits_test_npz, rho=0.1, samples=8, seed=1)
    assert res_resid["increase"] > 3 * res[1]["increase"] and res_resid["ci"][0] > 0
    # Deterministic, and the same with a shared evaluator (one session for the campaign too).
    model = onnx.load(str(int8_plain))
    data = load_npz(digits_test_npz, model)
    ev = ChipEvaluator(model, data, Reference(data.labels, "labels"))
    again = sharpness(model, data, rho=0.1, samples=8, seed=1, evaluator=ev)
    assert again == res[1]
    assert sharpness(model, data, rho=0.1, samples=8, seed=2, evaluator=ev)["per_sample"] != again["per_sample"]


def test_sharpness_without_labels_is_kl_to_clean(int8_plain, digits, tmp_path):
    data = zoo.write_npz(tmp_path / "nolabels.npz", digits["x_test"][:128])
    r = sharpness(int8_plain, data, rho=0.1, samples=4)
    assert r["loss"] == "kl_to_clean" and r["loss_clean"] == 0.0
    assert all(v >= 0 for v in r["per_sample"]) and r["increase"] > 0


def test_perturbation_is_multiplicative_and_clipped():
    w = np.array([0, 1, -5, 100, 127, -127], np.int8)
    out = perturb_codes({"w": w}, ["w"], 0.5, np.random.default_rng(0))["w"]
    z = np.random.default_rng(0).standard_normal(w.shape)
    expect = np.clip(np.rint(w * (1 + 0.5 * z)), -128, 127).astype(np.int8)
    assert out.dtype == np.int8 and np.array_equal(out, expect) and out[0] == 0
    big = perturb_codes({"w": np.full(1000, 120, np.int8)}, ["w"], 5.0, np.random.default_rng(1))["w"]
    assert big.min() == -128 and big.max() == 127


def test_diagnose_and_bad_input(int8_plain, plain_cnn, digits_test_npz):
    d = diagnose(int8_plain, digits_test_npz, rho=0.05, samples=3)
    assert d["samples"] == 341 and d["sparsity"]["layers"] == len(d["activation_sparsity"])
    assert 0 < d["sparsity"]["mean"] < 1 and 0 < d["sparsity"]["overall"] < 1
    with pytest.raises(InputError, match="rho"):
        sharpness(int8_plain, digits_test_npz, rho=0.0)
    with pytest.raises(InputError, match="samples"):
        sharpness(int8_plain, digits_test_npz, samples=1)
    with pytest.raises(InputError, match="not an int8 QDQ model"):
        sharpness(plain_cnn, digits_test_npz)
