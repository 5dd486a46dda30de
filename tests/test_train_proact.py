"""ProAct threshold training (harden.train.proact, the clip-train pass, `apply --clip-train`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")

import zoo  # noqa: E402
from harden.passes import PassContext  # noqa: E402
from harden.passes.clip import ClipPass  # noqa: E402
from harden.passes.proact import ProActPass  # noqa: E402
from harden.model import prepare  # noqa: E402
from harden.train.graph import OnnxModule  # noqa: E402
from harden.train.proact import ProActConfig, find_clips, train_thresholds  # noqa: E402


pytestmark = pytest.mark.usefixtures("torch_one_thread")




def _clipped(src, d, style="zero"):
    model, _ = prepare(onnx.load(str(src)))
    ctx = PassContext(calib=zoo.digits_dataset(d, "calib"))
    return model, ClipPass(style, 100.0).call(onnx.load_from_string(model.SerializeToString()), ctx).model, ctx


@pytest.mark.parametrize("style", ["zero", "saturate"])
def test_find_clips_and_the_teacher_is_the_unclipped_model(residual_cnn, digits, style):
    bare, clipped, _ = _clipped(residual_cnn, digits, style)
    layers, bypass = find_clips(clipped)
    relus = [n.name for n in bare.graph.node if n.op_type == "Relu"]
    assert [l.relu for l in layers] == relus and all(l.style == style for l in layers)
    assert len(bypass) == len(relus) + (style == "zero")  # + the output guard's Where
    m = OnnxModule(clipped)
    m.overrides = {n: (lambda node, i: [i[2] if node.op_type == "Where" else i[0]]) for n in bypass}
    x = np.array(digits["x_test"]) * 3.0  # far outside calibration: the clips would fire
    with torch.no_grad():
        got = m(torch.from_numpy(x)).numpy()
    zoo.assert_close(got, zoo.run_ort(bare, x))


def test_thresholds_train_within_tolerance(residual_cnn, digits):
    _, clipped, ctx = _clipped(residual_cnn, digits)
    cfg = ProActConfig(epochs=1)
    r = train_thresholds(clipped, zoo.digits_dataset(digits, "train").take(512), zoo.digits_dataset(digits, "calib"), cfg)
    rec = r.record
    assert [l["granularity"] for l in rec["layers"]] == ["element"] + ["layer"] * 4  # last layer first
    assert rec["val_accuracy_end"] >= rec["val_accuracy_start"] - cfg.tolerance - 1e-9
    assert rec["accepted"] == len(r.thresholds) >= 1
    before = {t.name: numpy_helper.to_array(t) for t in clipped.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == set(r.thresholds) and all(n.endswith("_harden_T") for n in changed)
    assert [n.SerializeToString() for n in r.model.graph.node] == [n.SerializeToString() for n in clipped.graph.node]
    for n in changed:  # the default weight decay pushes thresholds down
        assert after[n].mean() < before[n].mean()


def test_pass_rescales_quantization_ranges(mlp, tabular):
    _, clipped, ctx = _clipped(mlp, tabular)
    layers, _ = find_clips(clipped)
    before = {k: [dict(o) for o in v] for k, v in ctx.quant_overrides.items()}
    res = ProActPass(ProActConfig(epochs=1, tolerance=1.0), zoo.digits_dataset(tabular, "train")).call(clipped, ctx)
    assert res.record["accepted"] == len(layers)
    for layer in layers:
        new_t = numpy_helper.to_array(next(t for t in res.model.graph.initializer if t.name == layer.threshold))
        old_t = numpy_helper.to_array(next(t for t in clipped.graph.initializer if t.name == layer.threshold))
        f = float(new_t.max() / old_t.max())
        for tensor in (layer.relu_input, layer.pre):
            assert float(ctx.quant_overrides[tensor][0]["rmax"]) == pytest.approx(float(before[tensor][0]["rmax"]) * f, rel=1e-5)


def test_no_clips_is_a_clear_error(mlp, tabular):
    from harden.errors import InputError

    model, _ = prepare(onnx.load(str(mlp)))
    with pytest.raises(InputError, match="clipped ReLUs"):
        train_thresholds(model, zoo.digits_dataset(tabular, "train"), zoo.digits_dataset(tabular, "calib"))
