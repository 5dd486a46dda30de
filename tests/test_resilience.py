"""apply's resilience campaign and ablation: each pass's measured gain under each fault model."""

from __future__ import annotations

import pytest

import zoo
from harden.errors import InputError
from harden.faultmap import generate_uniform, write_faultmap
from harden.memory import weight_count
from harden.pipeline import ApplyOptions, apply
from harden.report import summary_table


def test_clip_pays_off_under_bias_flips_and_the_ablation_shows_it(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz):
    """Issue 3: on a trained CNN the clip pass raises mean accuracy under int32-bias bit flips at
    BER 1e-3 by >= 25 points over plain int8, for <= 0.5 points of clean accuracy."""
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(weight_count(residual_cnn), 0.04, 21), chip)
    opts = ApplyOptions(trials=60, faults=("bitflip-bias:1e-3", "bitflip:1e-2"))
    report = apply(residual_cnn, chip, digits_calib_npz, write=False, eval_data_path=digits_test_npz, options=opts).report
    res = report["results"]["resilience"]
    assert [v["name"] for v in res["variants"]] == ["int8", "int8+clip", "hardened"]
    fig = res["figures"]
    clean_cost = fig["int8"]["clean"]["accuracy"]["mean"] - fig["int8+clip"]["clean"]["accuracy"]["mean"]
    assert clean_cost <= 0.005
    clip_bias = next(a for a in res["ablation"] if a["pass"] == "clip" and a["point"] == "bitflip-bias:0.001")
    assert clip_bias["gain"] >= 0.25 and clip_bias["verdict"] == "helps"
    # The paired gain is exactly the difference of the two variants' means.
    diff = fig["int8+clip"]["bitflip-bias:0.001"]["accuracy"]["mean"] - fig["int8"]["bitflip-bias:0.001"]["accuracy"]["mean"]
    assert abs(diff - clip_bias["gain"]) < 1e-5
    # FAQ's gain on its own chip is large and exact (a deterministic point).
    faq_chip = next(a for a in res["ablation"] if a["pass"] == "faq" and a["point"].startswith("chip:"))
    assert faq_chip["gain"] > 0.3 and faq_chip["ci95"][0] == faq_chip["ci95"][1]
    # Under weight flips, clipping is no help (a flipped int8 weight is no outlier): the report
    # must not claim one.
    clip_w = next(a for a in res["ablation"] if a["pass"] == "clip" and a["point"] == "bitflip:0.01")
    assert clip_w["verdict"] != "helps" or clip_w["ci95"][0] < 0.02
    assert "measured gains: clip +" in summary_table(report)


def test_campaign_points_are_validated_before_work(tmp_path, plain_cnn, digits_calib_npz):
    import pytest

    from harden.errors import InputError

    with pytest.raises(InputError, match="unknown fault model"):
        apply(plain_cnn, tmp_path / "missing.bin", digits_calib_npz, write=False, options=ApplyOptions(faults=("nope:1",)))


def test_campaign_takes_activation_and_analog_points(tmp_path, plain_cnn, digits_calib_npz, digits_test_npz):
    """Fault models with their own sessions (activations, analog) run inside apply's campaign."""
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(weight_count(plain_cnn), 0.04, 3), chip)
    opts = ApplyOptions(trials=3, clip_percentile=100.0, faults=("bitflip-act:1e-3", "variability:0.1,0.02"))
    report = apply(plain_cnn, chip, digits_calib_npz, write=False, eval_data_path=digits_test_npz, options=opts).report
    res = report["results"]["resilience"]
    assert res["points"][1:] == ["bitflip-act:0.001", "variability:0.1,0.02"]
    for variant in ("int8", "int8+clip", "hardened"):
        for point in res["points"][1:]:
            fig = res["figures"][variant][point]
            assert fig["trials"] == 3 and 0.5 < fig["accuracy"]["mean"] <= 1.0
    chip_point = res["points"][0]
    assert res["figures"]["hardened"][chip_point]["accuracy"]["mean"] == report["results"]["accuracy"]["hardened_on_chip"]


def test_default_points_fit_a_bias_free_network(tmp_path, zoo_dir, tabular_calib_npz, tabular_test_npz):
    """Issue 11: a MatMul network has no int32 biases; apply's default campaign leaves the bias
    flips out (and says so) instead of failing, while an explicit bias point is still exit 2."""
    model = zoo.train_tabular_mlp(zoo_dir, use_matmul=True)
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(weight_count(model), 0.04, 1), chip)
    res = apply(model, chip, tabular_calib_npz, tmp_path / "h.onnx", eval_data_path=tabular_test_npz,
                options=ApplyOptions(trials=3, clip_percentile=100.0))
    rb = res.report["results"]["resilience"]
    assert [s["point"] for s in rb["skipped_points"]] == ["bitflip-bias:0.001"]
    assert "bitflip:0.001" in rb["points"] and not any(p.startswith("bitflip-bias") for p in rb["points"])
    with pytest.raises(InputError, match="no int32 biases"):
        apply(model, chip, tabular_calib_npz, tmp_path / "h2.onnx", eval_data_path=tabular_test_npz,
              options=ApplyOptions(trials=3, clip_percentile=100.0, faults=("bitflip-bias:1e-3",)))
    assert not (tmp_path / "h2.onnx").exists()


def test_clip_search_skips_the_campaign_of_a_candidate_that_loses_clean_accuracy(residual_cnn, digits_calib_npz):
    """Issue 12: a candidate whose clean accuracy already misses the tolerance cannot be chosen,
    so the search runs no fault campaign for it (and still chooses as before)."""
    from harden.clip_search import search_clip
    from harden.data import load_npz
    from harden.model import load_model, prepare

    model = prepare(load_model(residual_cnn))[0]
    choice = search_clip(model, load_npz(digits_calib_npz, model), percentiles=(100.0, 50.0), trials=3)
    first, harsh = choice.record["candidates"][1:]
    assert first["auc"] is not None and first["acceptable"]
    assert harsh["auc"] is None and not harsh["acceptable"] and "no campaign" in harsh["skipped"]
    assert choice.percentile == 100.0


def test_clip_pass_says_which_activations_it_leaves_alone():
    """Issue 11: the clip pass clips ReLUs; a ReLU6 (Clip), GELU or SiLU keeps its quantization
    range, and the record and note say so instead of staying silent."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from harden.data import Dataset
    from harden.passes import PassContext
    from harden.passes.clip import ClipPass

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Clip", ["h"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Sigmoid", ["r"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = Dataset({"x": np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)})
    rec = ClipPass().call(model, PassContext(calib=data)).record
    assert rec["left_alone"] == {"Clip": 1, "Sigmoid": 1} and "ReLU only" in rec["left_alone_why"]
    assert ClipPass().note(rec).endswith("left alone: Clip x1, Sigmoid x1")


def test_apply_budget_cuts_trials_alike_for_every_variant(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz):
    """Issue 12: apply's --budget turns into a trial count before the campaign, the same for every
    model compared (so the ablation stays paired), and the report says what it cut."""
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(weight_count(residual_cnn), 0.04, 3), chip)
    res = apply(residual_cnn, chip, digits_calib_npz, tmp_path / "h.onnx", eval_data_path=digits_test_npz,
                options=ApplyOptions(trials=40, budget=0.01, clip_percentile=100.0))
    rb = res.report["results"]["resilience"]
    assert rb["budget"]["trials_asked"] == 40 and rb["budget"]["trials_run"] == 2 == rb["trials"]
    for variant in rb["figures"].values():
        assert all(f["trials"] in (1, 2) for f in variant.values())
    assert all("gain" in a for a in rb["ablation"])
    assert "--budget 0.01 s cut the trials from 40 to 2" in summary_table(res.report)
    roomy = apply(residual_cnn, chip, digits_calib_npz, tmp_path / "h2.onnx", eval_data_path=digits_test_npz,
                  options=ApplyOptions(trials=4, clip_percentile=100.0)).report["results"]["resilience"]
    assert "budget" not in roomy and roomy["trials"] == 4
