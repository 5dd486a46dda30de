"""The output bound (harden/faults/bounds.py): sound on real convolutions and real trials, and the
trials it certifies give the figures running them gives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harden.campaign import CampaignOptions, simulate
from harden.campaign.options import trial_rng
from harden.data import Dataset, load_npz
from harden.faults import bounds
from harden.faults.base import Injection, TensorFaults
from harden.faults.bounds import OutputBound, conv_operator_norm
from harden.faults.fp32 import FloatWeightEvaluator, FP32BitFlip, FP32BitFlipParams
from harden.runtime import session


def _conv_matrix(w: np.ndarray, spatial: tuple[int, int], group: int, strides, pads, dilations) -> np.ndarray:
    """The dense matrix of an ONNX convolution (onnxruntime applied to every basis input)."""
    cin = w.shape[1] * group
    n = cin * spatial[0] * spatial[1]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, cin, *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group, strides=strides, pads=pads, dilations=dilations)
    g = helper.make_graph([node], "conv", [x], [y], [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    basis = np.eye(n, dtype=np.float32).reshape(n, cin, *spatial)
    out = session(m).run(None, {"x": basis})[0]
    return out.reshape(n, -1).T.astype(np.float64)


CONVS = [  # (cout, cin/group, kernel, spatial, group, strides, pads, dilations)
    (6, 3, (3, 3), (6, 6), 1, [1, 1], [1, 1, 1, 1], [1, 1]),
    (4, 4, (3, 3), (5, 7), 1, [2, 2], [1, 0, 1, 2], [1, 1]),
    (4, 2, (3, 3), (7, 7), 2, [1, 1], [2, 2, 2, 2], [2, 2]),
    (5, 1, (3, 3), (6, 6), 5, [1, 1], [1, 1, 1, 1], [1, 1]),  # depthwise
    (3, 5, (1, 1), (4, 4), 1, [1, 1], [0, 0, 0, 0], [1, 1]),
    (3, 2, (2, 3), (5, 5), 1, [1, 1], [0, 0, 0, 0], [1, 1]),
]


@pytest.mark.parametrize("cfg", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
def test_conv_operator_norm_bounds_the_true_norm(cfg, monkeypatch):
    cout, cin_g, k, spatial, group, strides, pads, dil = cfg
    w = np.random.default_rng(len(k) + cout).normal(size=(cout, cin_g, *k))
    true = np.linalg.norm(_conv_matrix(w, spatial, group, strides, pads, dil), 2)
    exact = conv_operator_norm(w, group, spatial, pads, dil)
    assert true <= exact * (1 + 1e-5)
    assert exact <= 1.6 * true  # tight: the circular symbol on the padded grid
    # the cheaper bounds stand in when the exact one would cost too much, and still bound it
    monkeypatch.setattr(bounds, "EXACT_NORM_WORK", 0)
    schur = conv_operator_norm(w, group, spatial, pads, dil)
    monkeypatch.setattr(bounds, "SYMBOL_ENTRIES", 0)
    positions = conv_operator_norm(w, group, spatial, pads, dil)
    unknown = conv_operator_norm(w, group, None, pads, dil)
    assert exact <= schur * (1 + 1e-9) and true <= positions * (1 + 1e-5) and positions == unknown


@pytest.fixture(scope="module")
def residual_float(residual_cnn, digits_test_npz):
    model = onnx.load(str(residual_cnn))
    return FloatWeightEvaluator(model, load_npz(digits_test_npz, model), certify=True)


def _trials(ev: FloatWeightEvaluator, rate: float, n: int, seed: int = 0) -> list[Injection]:
    fm = FP32BitFlip(FP32BitFlipParams(rate))
    return [fm.sample(trial_rng(seed, 0, t), ev.space) for t in range(n)]


def _changes(ev: FloatWeightEvaluator) -> list[Injection]:
    """Large changes of single weights in every layer (sign, halving, x16) and of several at once."""
    rng = np.random.default_rng(3)
    out = []
    for name, v in ev.values.items():
        u = np.ascontiguousarray(v).reshape(-1).view(np.uint32)
        idx = np.sort(rng.choice(u.size, 3, replace=False))
        for mask in (1 << 31, 1 << 23, 1 << 25):
            out.append(Injection((TensorFaults(name, idx[:1], flip=np.array([mask], np.uint32)),)))
        out.append(Injection((TensorFaults(name, idx, flip=np.full(3, 1 << 31, np.uint32)),)))
    names = list(ev.values)
    out.append(Injection(tuple(TensorFaults(n, np.array([0]), flip=np.array([1 << 22], np.uint32)) for n in names)))
    return out


def test_the_bound_holds_on_real_trials(residual_float):
    ev = residual_float
    assert ev.bound is not None and ev.session_info()["bound"]["weight_layers"] == len(ev.values)
    injections = _trials(ev, 1e-4, 40) + _trials(ev, 1e-5, 40) + _changes(ev)
    bound = ev.bound.output_change(injections, ev.values)
    clean = ev.clean_logits.astype(np.float64)
    scale = np.abs(clean).max()
    ratios = []
    for inj, b in zip(injections, bound):
        if not inj.tensors:
            continue
        actual = np.linalg.norm(ev.logits(inj.apply(ev.values)).astype(np.float64) - clean, axis=1)
        ok = np.isfinite(actual) & np.isfinite(b)
        # sound up to float32 rounding of the two passes (far below bounds.ROUNDING)
        assert np.all(actual[ok] <= b[ok] + 1e-5 * scale), (inj, float(np.max(actual[ok] - b[ok])))
        big = ok & (actual > 1e-3)
        ratios += list(b[big] / actual[big])
        if not np.all(np.isfinite(b)):  # only a non-finite changed weight makes it infinite
            assert any(not np.all(np.isfinite(inj.apply(ev.values)[tf.name])) for tf in inj.tensors)
    assert len(ratios) > 100 and np.median(ratios) < 200  # not vacuous


def test_certified_trials_are_harmless_and_only_those(residual_float):
    ev = residual_float
    injections = _trials(ev, 1e-5, 120)
    harmless = ev.harmless(injections)
    assert 0.15 < harmless.mean() < 0.9  # some, not all: a bound that certifies nothing does nothing
    assert not ev.harmless(_trials(ev, 1e-3, 20)).any()
    for inj, h in zip(injections, harmless):
        if h and inj.tensors:
            assert np.array_equal(ev.predictions(inj), ev.clean)
    # trials left uncertain on a few samples run on those alone: the same predictions
    need = ~ev.bound.settled(injections, ev.values)
    share = need.mean(axis=1)
    assert ((share > 0) & (share <= 0.5)).sum() >= 10  # the narrow pass runs here
    plain = FloatWeightEvaluator(ev._work, ev.data, certify=False)
    for a in range(0, 120, ev.stack):
        got, want = ev.predictions_many(injections[a:a + ev.stack]), plain.predictions_many(injections[a:a + ev.stack])
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    for t in np.flatnonzero((share > 0) & (share <= 0.5))[:5]:
        assert np.array_equal(ev.predictions(injections[t]), plain.predictions(injections[t]))
    # a changed weight that is not finite is never harmless, however small the rest
    name = next(iter(ev.values))
    u = int(np.ascontiguousarray(ev.values[name]).reshape(-1).view(np.uint32)[0])
    nan = Injection((TensorFaults(name, np.array([0]), flip=np.array([u ^ 0x7FC00000], np.uint32)),))  # -> quiet NaN
    faulty = nan.apply(ev.values)[name].reshape(-1)[0]
    assert not np.isfinite(faulty) and not ev.harmless([nan])[0]


def test_a_campaign_with_the_bound_gives_the_figures_of_one_without(residual_cnn, digits_test_npz, monkeypatch):
    opts = CampaignOptions(trials=64, seed=2)
    spec = ["bitflip-fp32:1e-5,3e-5"]
    with_bound = simulate(residual_cnn, digits_test_npz, spec, options=opts).report
    monkeypatch.setenv("HARDEN_CERTIFY", "0")
    without = simulate(residual_cnn, digits_test_npz, spec, options=opts).report
    for a, b in zip(with_bound["points"], without["points"]):
        assert a["per_trial"] == b["per_trial"] and a["sdc1"] == b["sdc1"] and a["nan_outputs"] == b["nan_outputs"]
        assert b["certified_trials"] == 0
    assert with_bound["points"][0]["certified_trials"] > 10
    monkeypatch.delenv("HARDEN_CERTIFY")
    shown = [simulate(residual_cnn, digits_test_npz, spec, options=opts, show_trial=(0, t)).report["trial"] for t in range(8)]
    assert any(r.get("certified") for r in shown) and not all(r.get("certified") for r in shown)
    assert all(r["accuracy"] == with_bound["points"][0]["per_trial"]["accuracy"][r["trial"]] for r in shown)
    assert with_bound["fp32"]["bound"]["weight_layers"] == 6 and without["fp32"]["bound"] is None


def _graph(nodes, inits, shape=(None, 4)) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_graphs_beyond_the_bound_get_none():
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(4, 4)), rng.normal(size=(3, 4))
    data = Dataset({"x": rng.normal(size=(4, 4)).astype(np.float32)}, np.zeros(4, np.int64))  # 4 rows: w1 adds

    def bound_of(nodes, inits):
        m = _graph(nodes, inits)
        logits = session(m).run(None, {"x": data.inputs["x"]})[0]
        return OutputBound.of(m, data, logits, list(inits))

    mlp = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
           helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    ok = bound_of(mlp, {"w1": w1, "w2": w2})
    assert ok is not None and [s.factor for s in ok.steps if s.weight] == pytest.approx(
        [np.linalg.norm(w1, 2), np.linalg.norm(w2, 2)], rel=1e-6)
    # a product of two moved tensors (attention-like) has no Lipschitz constant
    square = [mlp[0], helper.make_node("Mul", ["h", "h"], ["r"]), mlp[2]]
    assert bound_of(square, {"w1": w1, "w2": w2}) is None
    # a weight also read as data would move outside the weight rule
    reused = [mlp[0], helper.make_node("Relu", ["h"], ["r0"]), helper.make_node("Add", ["r0", "w1"], ["r"]), mlp[2]]
    assert bound_of(reused, {"w1": w1, "w2": w2}) is None
    layer_norm = [mlp[0], helper.make_node("LayerNormalization", ["h", "s"], ["r"]), mlp[2]]
    assert bound_of(layer_norm, {"w1": w1, "w2": w2, "s": np.ones(4)}) is None


def test_the_weight_rule_is_tight_where_the_network_is_a_product():
    """y = W2 (w1 x) with every change aligned: the bound equals the true change up to the
    norm of W2, so each term of the rule (the changed weight's own norm added too) is needed."""
    w1, w2 = np.array([[2.0]]), np.array([[3.0], [-1.0]])
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1)]
    m = _graph(nodes, {"w1": w1, "w2": w2}, shape=(None, 1))
    x = np.array([[1.0], [2.0], [-0.5]], np.float32)
    data = Dataset({"x": x}, np.zeros(3, np.int64))
    values = {"w1": w1.astype(np.float32), "w2": w2.astype(np.float32)}
    bound = OutputBound.of(m, data, session(m).run(None, {"x": x})[0], ["w1", "w2"])
    # w1: 2 -> 3 (mantissa bit 22), w2[0]: 3 -> 4 (bits 22 and 23)
    both = Injection((TensorFaults("w1", np.array([0]), flip=np.array([1 << 22], np.uint32)),
                      TensorFaults("w2", np.array([0]), flip=np.array([3 << 22], np.uint32))))
    faulty = both.apply(values)
    assert faulty["w1"][0, 0] == 3.0 and faulty["w2"][0, 0] == 4.0
    actual = np.linalg.norm(x @ faulty["w1"].T @ faulty["w2"].T - x @ w1.T @ w2.T, axis=1)  # sqrt(37) |x|
    eps = bound.output_change([both], values)[0]
    assert np.all(actual <= eps) and np.allclose(eps, (np.sqrt(10) + 1 + 2) * np.abs(x[:, 0]))
