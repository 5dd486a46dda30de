"""K trials in one session (harden/stacking.py): the same figures as one session per trial,
whatever the grouping, and a graph that cannot be widened falls back to one session per trial."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from harden.campaign import Campaign, CampaignOptions
from harden.campaign.executors import aligned_spans
from harden.data import load_npz, top1
from harden.faults import parse_fault_spec
from harden.faults.base import TensorFaults
from harden.faults.fp32 import FloatWeightEvaluator
from harden.model import get_initializer, qdq_weights
from harden.runtime import VariantSessions, run_batched
from harden.simulate import ChipEvaluator, Reference, conv_bound
from harden.stacking import StackedSessions, Unstackable, stacked_sessions


def _variants(values: dict[str, np.ndarray], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`count` read-back variants: some int8 weight tensors with 2 % of their codes replaced."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        v = {}
        for name, x in values.items():
            if x.dtype != np.int8 or rng.random() < 0.3:
                continue
            y = x.copy()
            hit = rng.random(y.shape) < 0.02
            y[hit] = rng.integers(-128, 128, int(hit.sum())).astype(np.int8)
            v[name] = y
        out.append(v)
    return out


@pytest.fixture(scope="module")
def int8_clipped(residual_cnn, digits_calib_npz, tmp_path_factory):
    """The residual CNN through the clip pass (Greater / Less / Or / Where masks, scalar and
    per-element thresholds) and quantization: what apply's campaigns run on."""
    from conftest import quantize_zoo_model

    return quantize_zoo_model(residual_cnn, digits_calib_npz, tmp_path_factory.mktemp("clip") / "clipped.onnx", clip=True)


@pytest.mark.parametrize("which", ["int8_plain", "int8_residual", "int8_clipped"])
def test_stacked_trials_compute_what_one_session_per_trial_computes(which, request, digits_test_npz):
    model = onnx.load(str(request.getfixturevalue(which)))
    if which == "int8_clipped":  # per-element thresholds are repeated per trial, not refused
        inits = {t.name: t for t in model.graph.initializer}
        assert any(n.op_type == "Greater" and len(inits[n.input[1]].dims) > 1 for n in model.graph.node if n.input[1] in inits)
    data = load_npz(digits_test_npz, model)
    table = qdq_weights(model)
    names = [w.name for w in table] + [w.bias for w in table if w.bias]
    values = {n: get_initializer(model, n) for n in names}
    variants = _variants(values, 6, seed=1)
    stacked = StackedSessions(model, names, 4)
    got = stacked.logits(variants, data, None)  # 6 variants: a group of 4, then one of 2 (a 2-wide graph)
    _assert_own_sessions_agree(model, names, variants, got, data)
    assert len({top1(lg).tobytes() for lg in got}) > 1  # the variants differ: the test can fail


def _assert_own_sessions_agree(model, names, variants, got, data) -> None:
    """Each variant's stacked logits against its own ordinary session's: the same products and
    sums; the arithmetic tolerance allows one sample to part."""
    single = VariantSessions(model, names)
    for v, lg in zip(variants, got):
        sess = single.session_for(v)
        (ref,) = run_batched(sess, data, 256, [sess.get_outputs()[0].name])
        assert lg.shape == ref.shape
        assert np.mean(np.abs(lg - ref) > 1e-6) <= 0.01 and (top1(lg) != top1(ref)).sum() <= 1


@pytest.mark.parametrize("which", ["int8_residual", "int8_clipped"])
def test_layers_before_a_trials_first_fault_run_once(which, request, digits_test_npz):
    """Sparse faults: each trial changes one tensor, at different depths, beside clean slots.
    The layers before a group's first faulty one run on the clean graph, a layer runs one block
    per trial faulty at or before it (the rest take the clean tensor: residual branches of
    different widths meet), the clean slots share one block; every trial still computes what
    its own session does."""
    model = onnx.load(str(request.getfixturevalue(which)))
    data = load_npz(digits_test_npz, model)
    table = qdq_weights(model)
    names = [w.name for w in table] + [w.bias for w in table if w.bias]
    values = {n: get_initializer(model, n) for n in names}
    stacked = StackedSessions(model, names, 6)
    layers = stacked._node_names
    rng = np.random.default_rng(3)

    def hit(layer: int) -> dict[str, np.ndarray]:
        name = layers[layer][0]  # the node's int8 weight
        y = values[name].copy()
        flat = y.reshape(-1)
        flat[rng.integers(0, flat.size, max(1, flat.size // 50))] ^= np.int8(-128)  # sign bits
        return {name: y}

    variants = [None, hit(len(layers) - 1), hit(2), None, hit(1), {**values}]  # the last: every tensor, clean values
    order, profile = stacked.plan([v or {} for v in variants])
    assert profile[0] == 0 and profile[1] == 1 and profile[-1] == 3  # three faulty trials, from the second layer on
    assert order[:3] == [4, 2, 1]
    got = stacked.logits(variants, data, None)
    _assert_own_sessions_agree(model, names, variants, got, data)
    assert np.array_equal(got[0], got[3]) and np.array_equal(got[0], got[5])  # one clean block
    assert len({top1(lg).tobytes() for lg in got}) == 4  # the faulty trials differ: the test can fail


@pytest.mark.parametrize("head", ["gemm", "conv"])
def test_padded_channels_change_nothing_a_trial_computes(head):
    """Channels padded per trial (stacking.CHANNEL_BLOCK) through a grouped and a depthwise
    convolution, dropped before a Flatten / Gemm head or at a convolutional output: every
    variant's logits equal its own session's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {"w1": rng.normal(size=(12, 1, 3, 3)), "b1": rng.normal(size=12), "w2": rng.normal(size=(12, 1, 3, 3)),
         "w3": rng.normal(size=(20, 12, 1, 1)), "w4": rng.normal(size=(20 * 8 * 8, 10)) / 30, "w5": rng.normal(size=(3, 20, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=12),  # depthwise
             helper.make_node("Conv", ["c2", "w3"], ["c3"]),
             helper.make_node("Clip", ["c3", "lo", "hi"], ["r3"])]
    if head == "gemm":
        nodes += [helper.make_node("Flatten", ["r3"], ["f"]), helper.make_node("Gemm", ["f", "w4"], ["y"])]
        del w["w5"]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    else:
        nodes += [helper.make_node("Conv", ["r3", "w5"], ["y"])]
        del w["w4"]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in w.items()]
    inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    graph = helper.make_graph(nodes, "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    from harden.data import Dataset

    data = Dataset({"x": rng.normal(size=(40, 1, 8, 8)).astype(np.float32)})
    names = sorted(w)
    values = {n: v.astype(np.float32) for n, v in w.items()}
    variants = [{n: (v * rng.choice([1.0, -1.0, 2.0], size=v.shape)).astype(np.float32) for n, v in values.items()} for _ in range(3)]
    stacked = StackedSessions(model, names, 3, pad_to=16)
    assert {n: shape for n, (shape, _) in stacked._layout(3).pads.items()}["w3"] == (32, 16, 1, 1)
    got = stacked.logits(variants, data, None)
    single = VariantSessions(model, names)
    for v, lg in zip(variants, got):
        sess = single.session_for(v)
        (ref,) = run_batched(sess, data, 64, [sess.get_outputs()[0].name])
        assert lg.reshape(ref.shape).shape == ref.shape
        # the same products; onnxruntime's grouped kernels may sum them in another order
        np.testing.assert_allclose(lg.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)
    # sparse: the first faulty layer is the depthwise one (its shared input copied per trial),
    # or the last (the head's rank-2 input widened with the clean one), beside a clean slot
    late = [n for n in names if n in ("w4", "w5")][0]
    sparse = [{"w2": variants[0]["w2"]}, None, {late: variants[1][late]}]
    order, profile = stacked.plan([v or {} for v in sparse])
    assert order == [0, 2, 1] and profile[:2] == (0, 1) and profile[-1] == 2
    for v, lg in zip(sparse, stacked.logits(sparse, data, None)):
        sess = single.session_for(v)
        (ref,) = run_batched(sess, data, 64, [sess.get_outputs()[0].name])
        np.testing.assert_allclose(lg.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)


def test_a_graph_that_cannot_be_widened_feeds_its_trials_to_one_session(mlp_matmul, tabular_calib_npz, int8_residual, tmp_path):
    """MatMul weights (the transformer case) are not stacked: the evaluator says stack 1, and as
    its work is MatMuls (simulate.conv_bound) a trial's weights are fed to one session instead
    of a session built per trial, with the rebuilt sessions' figures; a campaign still runs."""
    from conftest import quantize_zoo_model

    q = onnx.load(str(quantize_zoo_model(mlp_matmul, tabular_calib_npz, tmp_path / "q.onnx")))
    table = qdq_weights(q)
    names = [w.name for w in table] + [w.bias for w in table if w.bias]
    assert any(w.op_type == "MatMul" for w in table)
    with pytest.raises(Unstackable, match="MatMul"):
        StackedSessions(q, names, 4)
    assert stacked_sessions(q, names) is None
    data = load_npz(tabular_calib_npz, q)
    ev = ChipEvaluator(q, data, Reference(data.labels, "labels"))
    assert ev.stack == 1 and ev.feeds_values
    assert conv_bound(q, [(w.op_type, w.node_name, w.size) for w in table]) is False
    r = onnx.load(str(int8_residual))
    assert conv_bound(r, [(w.op_type, w.node_name, w.size) for w in qdq_weights(r)]) is True
    c = Campaign(q, data, parse_fault_spec("bitflip:1e-3"), evaluator=ev)
    res = c.run_point(0, CampaignOptions(trials=6))
    assert res.accuracy.size == 6 and np.std(res.accuracy) > 0
    rebuilt = ChipEvaluator(q, data, Reference(data.labels, "labels"), strategy="rebuild")
    assert not rebuilt.feeds_values
    ref = Campaign(q, data, parse_fault_spec("bitflip:1e-3"), evaluator=rebuilt).run_point(0, CampaignOptions(trials=6))
    assert np.max(np.abs(ref.accuracy - res.accuracy)) <= 1 / len(data) + 1e-12


def test_campaign_figures_do_not_depend_on_how_trials_are_grouped(int8_residual, digits_test_npz):
    """Trial t always runs at position t % K of its group: a whole point, trials asked for in
    odd blocks (as Dask workers do) and single trials give the same figures, and they agree
    with one session per trial to the arithmetic tolerance."""
    model = onnx.load(str(int8_residual))
    data = load_npz(digits_test_npz, model)
    points = parse_fault_spec("bitflip:1e-2")
    c = Campaign(model, data, points, seed=5)
    k = c.stack_of(0)
    assert k > 1
    planned = 2 * k + 3
    whole = c.run_point(0, CampaignOptions(trials=planned, seed=5)).accuracy
    blocks = [r.accuracy for a, b in ((0, 5), (5, k + 2), (k + 2, planned)) for r in c.run_trials(0, a, b, planned)]
    assert np.array_equal(whole, blocks)
    assert c.stack_of(0, planned) == -(-planned // 3) < k  # 3 groups of one width, not k + k + 3
    assert c.run_trial(0, k + 1).accuracy == whole[k + 1]  # alone, in a k-wide group: the same products
    rebuilt = Campaign(model, data, points, seed=5,
                       evaluator=ChipEvaluator(model, data, Reference(data.labels, "labels"), strategy="rebuild"))
    assert rebuilt.stack_of(0) == 1
    ref = rebuilt.run_point(0, CampaignOptions(trials=2 * k + 3, seed=5)).accuracy
    assert np.max(np.abs(ref - whole)) <= 1 / len(data) + 1e-12
    assert np.std(whole) > 0  # the trials differ


def test_a_point_runs_on_one_widened_graph(int8_residual, digits_test_npz):
    """The trials of a point are shared out in groups of one width (group_width), the last one
    padded with clean slots: one widened graph per point, however many trials it plans (at this
    fault rate every trial is faulty from the first layer on; a few clean slots save less than
    stacking.MIN_SAVING, so they run all-wide too)."""
    from harden.campaign.engine import group_width

    assert [group_width(32, n) for n in (1, 5, 32, 33, 100, 130)] == [1, 5, 32, 17, 25, 26]
    assert [group_width(1, n) for n in (1, 100)] == [1, 1]
    model = onnx.load(str(int8_residual))
    data = load_npz(digits_test_npz, model)
    c = Campaign(model, data, parse_fault_spec("bitflip:1e-2"), seed=5)
    k = c.stack_of(0)
    planned = 2 * k + 5
    c.run_point(0, CampaignOptions(trials=planned, seed=5))
    width = c.stack_of(0, planned)
    assert planned - 2 * width < width  # the last group has clean slots
    layouts = set(c.evaluator.stacked._layouts)  # (trials, faulty ones at each weight node...)
    assert all(len(set(key)) == 1 for key in layouts)
    # the k-wide layout is widened when the sessions are set up (to refuse an unstackable graph early)
    assert {key[0] for key in layouts} - {k} == {width}


def test_aligned_spans_never_split_a_group():
    for start, stop, blocks, k in [(0, 100, 4, 16), (10, 45, 4, 16), (3, 5, 4, 1), (0, 7, 8, 16), (17, 18, 3, 16)]:
        spans = aligned_spans(start, stop, blocks, k)
        assert spans[0][0] == start and spans[-1][1] == stop and len(spans) <= blocks
        assert all(a < b for a, b in spans) and all(b == a2 for (_, b), (a2, _) in zip(spans, spans[1:]))
        assert all(b % k == 0 for _, b in spans[:-1])


def test_a_nan_in_one_float_trial_stays_in_that_trial(plain_cnn, digits_test_npz):
    """bitflip-fp32 makes inf and NaN weights: in a stacked session they must not reach the
    other trials' channels."""
    model = onnx.load(str(plain_cnn))
    data = load_npz(digits_test_npz, model)
    ev = FloatWeightEvaluator(model, data)
    assert ev.stack > 1
    first = next(iter(ev.values))
    poisoned = ev.values[first].copy()
    poisoned.reshape(-1)[::7] = np.nan
    logits = ev.stacked.logits([None, {first: poisoned}, None], ev.data, None)
    # the same graph (the same profile: one trial faulty from the same layer), a finite fault
    finite = ev.stacked.logits([None, {first: 1.5 * ev.values[first]}, None], ev.data, None)
    assert np.isnan(logits[1]).any() and not np.isnan(finite[1]).any()
    assert np.array_equal(logits[0], finite[0]) and np.array_equal(logits[2], finite[2])
    assert (top1(finite[0]) != ev.clean).sum() <= 1  # and what one session computes, to the tolerance


def test_a_group_that_hits_nothing_runs_nothing():
    """A stacked group whose trials hit nothing (low rates; or every trial proven harmless by
    the float output bound) gets the clean predictions without a pass."""
    from harden.faults.base import Injection
    from harden.stacking import top1_of_trials

    clean = np.array([3, 1, 4])
    runs = []
    out = top1_of_trials([None, Injection(()), None], {}, clean, lambda variants: runs.append(variants) or [])
    assert runs == [] and all(o is clean for o in out)
    w = {"w": np.ones(4, np.float32)}
    hit = Injection((TensorFaults("w", np.array([1]), flip=np.array([1 << 31], np.uint32)),))
    out = top1_of_trials([None, hit], w, clean, lambda variants: runs.append(variants) or [np.zeros((3, 5))] * 2)
    assert len(runs) == 1 and runs[0][0] is None and runs[0][1]["w"][1] == -1.0 and out[0] is clean
