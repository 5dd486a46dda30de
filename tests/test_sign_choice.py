"""FAQ's sign choice: an output channel stored as negated codes under a negated scale.

The hardened model then carries per-chip scales, so the evaluators that serve a fleet (one
graph for every chip) take the per-channel scales as values like the weights; these tests check
that they compute what the hardened model's own graph computes, on every session strategy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from harden.arithmetic import TOLERANCE
from harden.data import load_npz, top1
from harden.faultmap import generate_uniform
from harden.model import channel_sign_scales, get_initializer, load_model, qdq_weights
from harden.passes import PassContext, run_passes
from harden.passes.faq import FAQPass
from harden.simulate import ChipEvaluator, float_reference, model_values

RATE, SEED = 0.15, 100


@pytest.fixture(scope="module")
def hardened(int8_residual, digits_calib_npz, digits_test_npz):
    """(plain int8, hardened with sign choice, its FAQ record, test data, reference)."""
    plain = load_model(int8_residual)
    calib = load_npz(digits_calib_npz, plain)
    words = sum(w.size for w in qdq_weights(plain))
    model = onnx.ModelProto()
    model.CopyFrom(plain)
    out, (record,) = run_passes(model, [FAQPass(generate_uniform(words, RATE, SEED))], PassContext(calib=calib))
    data = load_npz(digits_test_npz, plain)
    return plain, out, record, data, float_reference(plain, data)[1]


def test_negated_channels_carry_negated_scales(hardened):
    plain, out, record, _, _ = hardened
    assert record["sign_choice"] and record["negated_channels"] > 0
    signable = channel_sign_scales(plain)
    negated = 0
    for w in qdq_weights(plain):
        if w.name not in signable:
            continue
        scale = get_initializer(out, w.scale_name)
        flipped = scale < 0
        assert np.array_equal(np.abs(scale), w.scale)  # only the sign moves
        negated += int(flipped.sum())
        if w.bias is not None:  # the bias keeps bias_scale = input scale x weight scale, channel by channel
            bias_scale = get_initializer(out, w.bias_scale_name)
            assert np.array_equal(bias_scale < 0, flipped)
    assert negated == record["negated_channels"]


@pytest.mark.parametrize("strategy", ["stack", "rebuild", "feed"])
def test_shared_graph_evaluator_computes_the_hardened_graph(hardened, strategy):
    """A fleet's evaluator is built on the plain int8 graph; given the hardened model's values
    (weights, biases and the per-channel scales) it must score what the hardened graph does."""
    plain, out, _, data, ref = hardened
    own = ChipEvaluator(out, data, ref, strategy=strategy)
    shared = ChipEvaluator(plain, data, ref, strategy=strategy)
    assert shared.scale_names and set(shared.scale_names) <= set(shared.names)
    values = model_values(out, shared.names)
    agree = np.mean(top1(shared.logits(values)) == top1(own.logits()))
    assert agree >= 1 - TOLERANCE["accuracy_samples"] / len(data)
    if strategy == "stack":  # the stacked graph takes the scales per trial too
        assert shared.stack > 1
        many = shared.logits_many([values, None, values])
        assert np.array_equal(top1(many[0]), top1(many[2]))
        assert np.mean(top1(many[0]) == top1(own.logits())) >= 1 - TOLERANCE["accuracy_samples"] / len(data)
    # the scales matter: the hardened codes under the plain model's positive scales compute another model
    codes_only = {n: values[n] for n in shared.weight_names + shared.bias_names}
    assert shared.evaluate(codes_only) < own.evaluate() - 0.05


def test_onnxruntime_runs_negative_scales_with_its_default_optimisations(hardened, tmp_path):
    """The written model loads and runs on onnxruntime's own (fused, host-dependent) kernels;
    its figures are the exact path's, so only finiteness and shape are checked here."""
    _, out, _, data, _ = hardened
    path = tmp_path / "h.onnx"
    onnx.save(out, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: data.inputs[sess.get_inputs()[0].name][:16]})
    assert logits.shape[0] == 16 and np.isfinite(logits).all()


def test_no_sign_choice_keeps_positive_scales(int8_residual, digits_calib_npz):
    plain = load_model(int8_residual)
    calib = load_npz(digits_calib_npz, plain)
    fm = generate_uniform(sum(w.size for w in qdq_weights(plain)), RATE, SEED)
    out, (record,) = run_passes(plain, [FAQPass(fm, sign_choice=False)], PassContext(calib=calib))
    assert record["negated_channels"] == 0 and not record["sign_choice"]
    assert all((get_initializer(out, w.scale_name) > 0).all() for w in qdq_weights(out))
