"""harden.train.graph: the ONNX graph as a torch module, checked against onnxruntime on every
model the test suite uses, plus write-back and the unsupported-op error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

import zoo  # noqa: E402
from harden.data import Dataset  # noqa: E402
from harden.errors import InputError  # noqa: E402
from harden.passes import PassContext  # noqa: E402
from harden.passes.clip import ClipPass  # noqa: E402
from harden.model import load_model, prepare  # noqa: E402
from harden.train.graph import OnnxModule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _clipped(src: Path, style: str, calib: np.ndarray) -> onnx.ModelProto:
    model, _ = prepare(onnx.load(str(src)))
    ctx = PassContext(calib=Dataset({model.graph.input[0].name: np.array(calib)}))
    return ClipPass(style).call(model, ctx).model


def _digits(d):
    return zoo.digits_splits()["x_test"]


def _tabular(d):
    return zoo.tabular_splits()["x_test"]


# name -> (builder(zoo_dir) -> ModelProto, test inputs)
CASES = {
    **{f"plain-op{o}": (lambda d, o=o: zoo.train_digits_cnn("plain", d, opset=o), _digits) for o in (11, 13, 14, 15, 16, 17)},
    "residual-op17": (lambda d: zoo.train_digits_cnn("residual", d), _digits),
    "residual-op12": (lambda d: zoo.train_digits_cnn("residual", d, opset=12), _digits),
    "plain-static-batch": (lambda d: zoo.train_digits_cnn("plain", d, dynamic_batch=False), _digits),
    "mlp-gemm": (lambda d: zoo.train_tabular_mlp(d), _tabular),
    "mlp-matmul": (lambda d: zoo.train_tabular_mlp(d, use_matmul=True), _tabular),
    "plain-with-batchnorm-node": (lambda d: zoo.with_batchnorm_node(zoo.train_digits_cnn("plain", d), d / "train_graph_bn.onnx"), _digits),
    "legacy-initializers-as-inputs": (
        lambda d: zoo.legacy_initializers_as_inputs(zoo.train_digits_cnn("plain", d, opset=11), d / "train_graph_li.onnx"), _digits),
    "legacy-constant-of-shape": (
        lambda d: zoo.legacy_constant_of_shape(zoo.train_digits_cnn("residual", d), d / "train_graph_cos.onnx"), _digits),
    "legacy-constant-of-shape-mlp": (
        lambda d: zoo.legacy_constant_of_shape(zoo.train_tabular_mlp(d, use_matmul=True), d / "train_graph_cos_mlp.onnx"), _tabular),
    "samples-model": (lambda d: ROOT / "samples" / "model.onnx", _digits),
}


def _load(build, zoo_dir) -> onnx.ModelProto:
    return onnx.load(str(build(zoo_dir)))


def _torch_out(module: OnnxModule, x: np.ndarray) -> np.ndarray:
    """Run in chunks of the model's fixed batch when it has one."""
    with torch.no_grad():
        try:
            return module(torch.from_numpy(np.array(x))).numpy()
        except RuntimeError:
            return np.concatenate([module(torch.from_numpy(np.array(x[i : i + 1]))).numpy() for i in range(len(x))])


def _matches_ort(model: onnx.ModelProto, x: np.ndarray) -> None:
    ref = zoo.run_ort(model, np.array(x))
    got = _torch_out(OnnxModule(model), x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    zoo.assert_close(got, ref, rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_onnxruntime(zoo_dir, name):
    build, data = CASES[name]
    _matches_ort(_load(build, zoo_dir), data(zoo_dir))


@pytest.mark.parametrize("name", ["legacy-initializers-as-inputs", "legacy-constant-of-shape", "plain-op11", "plain-with-batchnorm-node"])
def test_matches_onnxruntime_after_prepare(zoo_dir, name):
    """The graph apply trains on: legacy clean-up + onnxsim + opset upgrade (harden.pipeline.prepare)."""
    build, data = CASES[name]
    model, _ = prepare(_load(build, zoo_dir))
    _matches_ort(model, data(zoo_dir))


@pytest.mark.parametrize("kind,opset", [("vit", 17), ("vit", 14), ("mobilenetv2", 17), ("bert", 17)])
def test_matches_onnxruntime_on_the_architectures(zoo_dir, digits, kind, opset):
    """The training graph runs the ViT (LayerNormalization, Erf, Softmax, Expand, attention
    MatMuls; at opset 14 LayerNorm decomposed), the MobileNetV2 (depthwise Conv, Clip) and the
    BERT (Gather from embedding tables, int64 token ids) as apply prepares them."""
    model, _ = prepare(load_model(zoo.train_arch(kind, zoo_dir, opset=opset)))
    x = zoo.arch_inputs(kind, digits["x_test"][:64])
    ref = zoo.run_ort(model, np.array(x))
    got = _torch_out(OnnxModule(model), x)
    zoo.assert_close(got, ref, rtol=1e-4)


@pytest.mark.parametrize("style", ["zero", "saturate"])
@pytest.mark.parametrize("kind", ["plain", "residual", "mlp"])
def test_matches_onnxruntime_clipped(zoo_dir, digits, tabular, style, kind):
    """The clip pass's graphs (Relu + Greater/Less/Or/Where or Min, output guard)."""
    src = zoo.train_tabular_mlp(zoo_dir) if kind == "mlp" else zoo.train_digits_cnn(kind, zoo_dir)
    data = tabular if kind == "mlp" else digits
    model = _clipped(src, style, data["x_calib"])
    ops = {n.op_type for n in model.graph.node}
    assert ("Where" in ops) if style == "zero" else ("Min" in ops)
    _matches_ort(model, data["x_test"])
    # inputs beyond the calibration range actually hit the clip; still the same outputs
    _matches_ort(model, np.array(data["x_test"]) * 3.0)


@pytest.mark.parametrize("prepared", [False, True])
def test_light_model_zoo_graph(prepared):
    """onnx's opset-9 model-zoo squeezenet (ConstantOfShape weights), raw and as apply prepares it."""
    model = onnx.load(str(zoo.light_model_path("squeezenet")))
    if prepared:
        model, _ = prepare(model)
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    _matches_ort(model, x)


def test_parameters_are_the_float_initializers(plain_cnn):
    model = onnx.load(str(plain_cnn))
    m = OnnxModule(model)
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert list(m.onnx_parameters()) == floats
    assert {m.name_of[m.key_of[n]] for n in floats} == set(floats)
    assert all("." not in k for k in m.params.keys())
    for t in model.graph.initializer:
        np.testing.assert_array_equal(m.parameter(t.name).detach().numpy(), numpy_helper.to_array(t))
    assert m.weight_names() == [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]


def test_gradients_reach_every_trainable_parameter(zoo_dir, digits):
    model = _load(CASES["plain-with-batchnorm-node"][0], zoo_dir)
    m = OnnxModule(model)
    x = torch.from_numpy(np.array(digits["x_train"][:32]))
    y = torch.from_numpy(np.array(digits["y_train"][:32]))
    m.train()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    for name, p in m.onnx_parameters().items():
        if name in ("bn_mean", "bn_var"):
            assert not p.requires_grad and p.grad is None, "BatchNorm statistics are frozen"
        else:
            assert p.requires_grad and p.grad is not None and torch.any(p.grad != 0), name
    # BatchNorm normalises with the stored statistics in train() and eval() alike
    with torch.no_grad():
        a = m(x)
        m.eval()
        b = m(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_write_back_round_trips_exactly(zoo_dir):
    for name in ("residual-op17", "legacy-initializers-as-inputs", "plain-with-batchnorm-node"):
        model = _load(CASES[name][0], zoo_dir)
        out = OnnxModule(model).write_back(model)
        assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
        assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
        for a, b in zip(model.graph.initializer, out.graph.initializer):
            assert a.data_type == b.data_type and list(a.dims) == list(b.dims)
            x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
        assert list(out.graph.input) == list(model.graph.input) and list(out.graph.output) == list(model.graph.output)


def test_write_back_carries_trained_values(plain_cnn, digits):
    """Change every parameter, write back: onnxruntime on the new graph == the module."""
    model = onnx.load(str(plain_cnn))
    before = model.SerializeToString()
    m = OnnxModule(model)
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(torch.from_numpy(rng.uniform(0.9, 1.1, p.shape).astype(np.float32)))
    new = m.write_back(model)
    assert model.SerializeToString() == before, "write_back returns a copy; the input proto is untouched"
    assert new.SerializeToString() != before
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    onnx.checker.check_model(new)
    x = np.array(digits["x_test"])
    zoo.assert_close(zoo.run_ort(new, x), _torch_out(m, x))
    again = OnnxModule(new)
    for name, p in m.onnx_parameters().items():
        assert torch.equal(again.parameter(name), p.detach())


def test_write_back_refuses_another_graph(plain_cnn, mlp):
    m = OnnxModule(onnx.load(str(plain_cnn)))
    with pytest.raises(InputError, match="no initializer"):
        m.write_back(onnx.load(str(mlp)))


def test_unsupported_op_is_named():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Hardmax", ["r"], ["h"]),
             helper.make_node("Einsum", ["h", "h"], ["y"], equation="ij,ij->ij")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError) as err:
        OnnxModule(model)
    msg = str(err.value)
    assert "Einsum" in msg and "Hardmax" in msg and "Relu" not in msg.split("supported:")[0]


def test_inputs_by_name_and_numpy(mlp, tabular):
    model = onnx.load(str(mlp))
    m = OnnxModule(model)
    x = np.array(tabular["x_test"][:5])
    with torch.no_grad():
        a = m(torch.from_numpy(x))
        b = m(input=x)
        c = m.run({"input": x})["logits"]
    assert torch.equal(a, b) and torch.equal(a, c)
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    with torch.no_grad():
        assert m.run({"input": x}, [relu])[relu].shape == (5, 32)
    with pytest.raises(TypeError, match="missing"):
        m()


def test_core_imports_without_torch(monkeypatch):
    """harden (not harden.train) never imports torch; harden.train.graph says how to get it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import harden, harden.pipeline, harden.cli, harden.passes.clip, harden.passes.quantize, harden.passes.faq\n"
        "from harden.train import require_torch, torch_available\n"
        "assert not torch_available()\n"
        "try:\n"
        "    import harden.train.graph\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("InputError") and "pip install 'harden[train]'" in out
