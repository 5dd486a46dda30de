"""Second moments kept as their picked rows (harden.lowrank): the same compensation as the dense
d x d sums, to float64 rounding, without ever forming a d x d matrix."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from harden import layer_stats
from harden.compensate import absorbing_targets
from harden.data import load_npz
from harden.faultmap import generate_uniform
from harden.layer_stats import _Gram
from harden.lowrank import LowRank, LowRankGroups
from harden.memory import MemoryMap
from harden.model import get_metadata, load_model, qdq_weights
from harden.passes import PassContext, run_passes
from harden.passes.faq import FAQPass
from harden.runtime import capture
from harden.simulate import ChipEvaluator, float_reference, model_values, read_through_chip


def _dense(m: LowRank) -> np.ndarray:
    return m.scale * (m.left.T @ m.right)


def test_low_rank_operations_are_the_dense_ones():
    rng = np.random.default_rng(0)
    n, d = 30, 80
    x = rng.normal(size=(n, d))
    x[:, 7] = 0.0  # a dead input: absorbing_targets puts 1 on its diagonal
    r = x + 0.2 * rng.normal(size=(n, d))
    r[:, 7] = 0.0
    h, c = LowRank(x, x, 3.0) / 41.0, LowRank(r, x, 3.0) / 41.0
    hd, cd = _dense(h), _dense(c)
    t = rng.normal(size=(5, d))
    np.testing.assert_allclose(h.diagonal(), np.diag(hd), rtol=1e-12)
    np.testing.assert_allclose(h[3:40, 3:40], hd[3:40, 3:40], rtol=1e-12)
    np.testing.assert_allclose(t @ c, t @ cd, rtol=1e-10, atol=1e-12)
    diag = 0.5 + rng.random(d)
    np.testing.assert_allclose(h.solve_right(t, diag), t @ np.linalg.inv(hd + np.diag(diag)), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(absorbing_targets(t, h, c), absorbing_targets(t, hd.copy(), cd.copy()), rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def residual_rows(int8_residual, digits_calib_npz):
    """A real layer's unfolded input rows in batches: (QWeight, [cols per batch])."""
    model = load_model(int8_residual)
    calib = load_npz(digits_calib_npz, model).take(96)
    w = max((w for w in qdq_weights(model) if layer_stats.supported(w)), key=lambda w: w.size)
    batches = []
    capture(model, calib, [w.activation], lambda acts: batches.append(layer_stats.unfold(w, acts[w.activation].astype(np.float64))),
            batch_size=32)
    return w, batches


def test_gram_hands_over_factors_only_below_d_rows(residual_rows):
    """Fewer picked rows than the layer is wide: factors equal to the multiplied-out sums;
    as many as d: dense sums, as before."""
    w, batches = residual_rows
    d = batches[0].shape[2]
    few = max(1, (d - 1) // len(batches))  # rows per batch that never reach d in all
    sparse, full = _Gram(), _Gram()
    for cols in batches:
        pick = layer_stats.evenly_spaced(cols, few)
        ref = pick * 1.1 + 0.01
        sparse.add(w.name, pick, cols.shape[1] / pick.shape[1], ref)
        full.add(w.name, pick, cols.shape[1] / pick.shape[1], ref)
    full._flush(w.name)  # multiplied out now: the dense path on the same rows
    xx, rx = sparse.pop(w.name)
    dense_xx, dense_rx = full.pop(w.name)
    assert isinstance(xx, LowRankGroups) and isinstance(dense_xx, np.ndarray)
    for g in range(len(xx)):
        np.testing.assert_allclose(_dense(xx[g]), dense_xx[g], rtol=1e-9, atol=1e-12 * np.abs(dense_xx).max())
        np.testing.assert_allclose(_dense(rx[g]), dense_rx[g], rtol=1e-9, atol=1e-12 * np.abs(dense_rx).max())
    many = _Gram()
    for cols in batches:
        many.add(w.name, cols, 1.0)
    assert isinstance(many.pop(w.name)[0], np.ndarray)


@pytest.mark.parametrize("sequential", [True, False])
def test_faq_on_factors_hardens_as_the_dense_sums_do(int8_residual, digits_calib_npz, digits_test_npz, monkeypatch, sequential):
    """FAQ (sequential: paired statistics; else the plain model's own) on a real int8 CNN with
    every layer's statistics kept as factors (never multiplied out) against the dense sums: the
    same layer errors and accuracy on the chip."""
    plain = load_model(int8_residual)
    calib = load_npz(digits_calib_npz, plain).take(48)  # the factors hold every row (a Woodbury solve of that size): fewer keep it quick
    fm = generate_uniform(sum(w.size for w in qdq_weights(plain)), 0.1, 5)

    def harden() -> tuple[onnx.ModelProto, dict]:
        model = onnx.ModelProto()
        model.CopyFrom(plain)
        out, (record,) = run_passes(model, [FAQPass(fm, sequential=sequential)], PassContext(calib=calib))
        return out, record

    dense, dense_rec = harden()
    factored_pops = []
    original_pop = _Gram.pop

    def pop(self, name):
        out = original_pop(self, name)
        factored_pops.append(isinstance(out[0], LowRankGroups))
        return out

    monkeypatch.setattr(_Gram, "_flush", lambda self, name: None)  # rows are never multiplied out...
    monkeypatch.setattr(_Gram, "pop", pop)  # ...so every pop hands over factors
    factored, factored_rec = harden()
    assert factored_pops and all(factored_pops)
    # FAQ's codes are discrete choices: rounding moves a few (the first layer: 124 changed codes
    # against 123), and sequential compensation carries that to the layers after it
    for i, (a, b) in enumerate(zip(dense_rec["layers"], factored_rec["layers"])):
        assert b["rms_error_faq"] == pytest.approx(a["rms_error_faq"], rel=0.01 if i == 0 else 0.05), a["tensor"]
    data = load_npz(digits_test_npz, plain)
    ev = ChipEvaluator(plain, data, float_reference(plain, data)[1])
    mm = MemoryMap.from_json(get_metadata(dense)["harden.memory_map"])
    acc = [ev.evaluate(read_through_chip(model_values(m, ev.names), mm, fm)) for m in (plain, dense, factored)]
    assert acc[1] > acc[0] + 0.05 and abs(acc[1] - acc[2]) <= 0.01, acc
