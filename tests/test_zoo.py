"""The test models themselves: they load, match torch, reach their accuracy floor, and the
legacy rewrites keep the outputs of their source."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import zoo


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _weight_count(path) -> int:
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    return sum(int(np.prod(inits[n.input[1]].dims)) for n in m.graph.node
               if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.input[1] in inits)


def _check_trained(path, x, y, floor):
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    logits = zoo.run_ort(path, x)
    zoo.assert_close(logits, zoo.reference_logits(path))  # onnxruntime vs torch, 1e-4 relative
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= floor, acc
    return logits


# --- data --------------------------------------------------------------------------------------

def test_digits_splits(digits):
    sizes = {k: len(v) for k, v in digits.items()}
    assert sizes == {"x_train": 1200, "y_train": 1200, "x_calib": 256, "y_calib": 256,
                     "x_test": 341, "y_test": 341}
    for part in ("train", "calib", "test"):
        x, y = digits["x_" + part], digits["y_" + part]
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
        assert not x.flags.writeable
    again = zoo.digits_splits()
    assert all(np.array_equal(again[k], digits[k]) for k in digits)


def test_tabular_splits(tabular):
    assert [len(tabular[k]) for k in ("x_train", "x_calib", "x_test")] == [329, 100, 140]
    assert tabular["x_train"].dtype == np.float32 and tabular["x_train"].shape[1] == 30
    np.testing.assert_allclose(tabular["x_train"].mean(0), 0, atol=1e-5)
    assert set(np.unique(tabular["y_test"])) == {0, 1}


def test_write_npz(tmp_path, digits):
    p = zoo.write_npz(tmp_path / "d.data", digits["x_calib"], digits["y_calib"])
    assert p == tmp_path / "d.data" and p.exists()  # no ".npz" appended
    with np.load(p, allow_pickle=False) as f:
        assert sorted(f.files) == ["input", "label"]
        assert np.array_equal(f["input"], digits["x_calib"])
        assert f["label"].dtype == np.int64
    p2 = zoo.write_npz(tmp_path / "x.npz", digits["x_test"][:5], input_name="data")
    with np.load(p2, allow_pickle=False) as f:
        assert f.files == ["data"]


def test_npz_fixtures(digits_calib_npz, digits_test_npz, tabular_calib_npz, tabular_test_npz):
    for p, n in [(digits_calib_npz, 256), (digits_test_npz, 341),
                 (tabular_calib_npz, 100), (tabular_test_npz, 140)]:
        with np.load(p, allow_pickle=False) as f:
            assert len(f["input"]) == len(f["label"]) == n


# --- trained models -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, weights", [("plain", 19088), ("residual", 9520)])
def test_digits_cnn(request, digits, kind, weights):
    path = request.getfixturevalue(f"{kind}_cnn")
    _check_trained(path, digits["x_test"], digits["y_test"], zoo.DIGITS_ACCURACY_FLOOR)
    m = onnx.load(str(path))
    assert m.opset_import[0].version == 17
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = _ops(path)
    assert ops.count("Gemm") == 1 and "BatchNormalization" not in ops
    assert ("Add" in ops and "GlobalAveragePool" in ops) == (kind == "residual")
    assert _weight_count(path) == weights
    assert path.stat().st_size < 200_000


def test_digits_cnn_cache_reuses_file(plain_cnn, zoo_dir):
    before = plain_cnn.stat().st_mtime_ns
    assert zoo.train_digits_cnn("plain", zoo_dir) == plain_cnn
    assert plain_cnn.stat().st_mtime_ns == before


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_plain_cnn_opsets(zoo_dir, digits, opset):
    path = zoo.train_digits_cnn("plain", zoo_dir, opset=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset
    _check_trained(path, digits["x_test"], digits["y_test"], zoo.DIGITS_ACCURACY_FLOOR)


def test_static_batch_export(zoo_dir, digits, plain_cnn):
    path = zoo.train_digits_cnn("plain", zoo_dir, dynamic_batch=False)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 8, 8]
    logits = _check_trained(path, digits["x_test"], digits["y_test"], zoo.DIGITS_ACCURACY_FLOOR)
    # same trained weights as the dynamic-batch export
    np.testing.assert_allclose(logits, zoo.run_ort(plain_cnn, digits["x_test"]), rtol=1e-5,
                               atol=1e-5)


def test_mlp_gemm_and_matmul(mlp, mlp_matmul, tabular):
    a = _check_trained(mlp, tabular["x_test"], tabular["y_test"], zoo.TABULAR_ACCURACY_FLOOR)
    b = _check_trained(mlp_matmul, tabular["x_test"], tabular["y_test"],
                       zoo.TABULAR_ACCURACY_FLOOR)
    assert _ops(mlp) == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert _ops(mlp_matmul).count("MatMul") == 3 and _ops(mlp_matmul).count("Add") == 3
    assert "Gemm" not in _ops(mlp_matmul)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert _weight_count(mlp) == _weight_count(mlp_matmul) == 30 * 32 + 32 * 16 + 16 * 2


# --- legacy rewrites ------------------------------------------------------------------------------

def test_legacy_initializers_as_inputs(zoo_dir, tmp_path, digits):
    src = zoo.train_digits_cnn("plain", zoo_dir, opset=11)
    out = zoo.legacy_initializers_as_inputs(src, tmp_path / "legacy_inputs.onnx")
    m = onnx.load(str(out))
    assert m.ir_version == 3
    inputs = {i.name for i in m.graph.input}
    assert {i.name for i in m.graph.initializer} <= inputs and "input" in inputs
    x = digits["x_test"]
    np.testing.assert_array_equal(zoo.run_ort(out, x, "input"), zoo.run_ort(src, x))


@pytest.mark.parametrize("source", ["plain_cnn", "residual_cnn", "mlp_matmul", "mlp"])
def test_legacy_constant_of_shape(request, tmp_path, digits, tabular, source):
    src = request.getfixturevalue(source)
    out = zoo.legacy_constant_of_shape(src, tmp_path / "legacy_cos.onnx")
    ops = _ops(out)
    assert {"Constant", "ConstantOfShape", "Reshape"} <= set(ops)
    before = {i.name for i in onnx.load(str(src)).graph.initializer}
    after = {i.name for i in onnx.load(str(out)).graph.initializer}
    assert len(before - after) == 3  # first weight + its bias, second weight
    x = (tabular if source.startswith("mlp") else digits)["x_test"]
    np.testing.assert_array_equal(zoo.run_ort(out, x), zoo.run_ort(src, x))


def test_legacy_both_rewrites_fold_back_with_onnxsim(plain_cnn, tmp_path, digits):
    onnxsim = pytest.importorskip("onnxsim")
    cos = zoo.legacy_constant_of_shape(plain_cnn, tmp_path / "cos.onnx")
    old = zoo.legacy_initializers_as_inputs(cos, tmp_path / "old.onnx", ir_version=None)
    m = onnx.load(str(old))
    # what a loader does with IR>=4 models that list initializers as inputs: drop those inputs
    names = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    simp, ok = onnxsim.simplify(m)
    assert ok
    # ConstantOfShape and Reshape fold into initializers. NB: onnxsim (0.8.1) keeps a plain
    # `Constant` node as a Constant node, so a loader must turn those into initializers itself.
    assert not {"ConstantOfShape", "Reshape"} & {n.op_type for n in simp.graph.node}
    x = digits["x_test"]
    np.testing.assert_allclose(zoo.run_ort(simp, x), zoo.run_ort(plain_cnn, x), rtol=1e-6,
                               atol=1e-6)


# --- bundled legacy model-zoo graphs ------------------------------------------------------------

@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "bvlc_alexnet", "shufflenet"])
def test_light_model_path(name):
    p = zoo.light_model_path(name)
    m = onnx.load(str(p))
    assert m.opset_import[0].version == 9 and m.ir_version == 3
    assert "ConstantOfShape" in {n.op_type for n in m.graph.node}


def test_light_model_runs():
    p = zoo.light_model_path("squeezenet")
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    out = zoo.run_ort(p, x)
    assert out.shape[0] == 1 and np.isfinite(out).all()


def test_light_model_unknown_name():
    with pytest.raises(FileNotFoundError, match="available: .*squeezenet"):
        zoo.light_model_path("no_such_model")


# --- the committed samples (made by samples/make_samples.py from this zoo) ----------------------

def test_samples_bundle():
    from pathlib import Path

    from harden.faultmap import read_faultmap

    samples = Path(__file__).resolve().parent.parent / "samples"
    model = samples / "model.onnx"
    onnx.checker.check_model(onnx.load(str(model)), full_check=True)
    assert model.stat().st_size < 1_000_000
    with np.load(samples / "calib.npz", allow_pickle=False) as f:
        assert f["input"].shape == (256, 1, 8, 8) and f["label"].shape == (256,)
    with np.load(samples / "test.npz", allow_pickle=False) as f:
        x, y = f["input"], f["label"]
    assert zoo.accuracy(model, x, y) >= zoo.DIGITS_ACCURACY_FLOOR
    fm = read_faultmap(samples / "chip.bin")
    assert fm.num_words == _weight_count(model) == 9520
    assert fm.chip_id == "sample-chip-0042"
    assert 0.035 < fm.rate < 0.045
