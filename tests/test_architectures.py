"""The models users bring (issue 11): a ViT, a MobileNetV2 and a BERT-style classifier built from
torch.nn's own classes, trained on the digits by tests/zoo.py, through apply, simulate and fleets,
and recovered on held-out data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import zoo
from harden.cli import main
from harden.data import Dataset
from harden.faultmap import generate_uniform, write_faultmap
from harden.memory import weight_count
from harden.model import load_model, mean_free_tables, qdq_weights
from harden.options import ApplyOptions
from harden.pipeline import build_shared, harden_for_chip

KINDS = zoo.ARCHITECTURES

#: Recovery = (hardened - int8 on chip) / (int8 - int8 on chip), mean of 3 chips (seeds 100-102),
#: scored on the held-out test split. Measured (docs/results.md): 0.04: ViT 99.2 %, MobileNetV2
#: 100.2 %, BERT 102.0 %; 0.15: 98.0 %, 98.9 %, 88.4 % (the BERT over 6 chips, seeds 100-105:
#: 86.8 %; its embedding tables take faults no input statistics can feed back).
RECOVERY_FLOOR = {0.04: {"vit": 0.95, "mobilenetv2": 0.95, "bert": 0.95},
                  0.15: {"vit": 0.95, "mobilenetv2": 0.95, "bert": 0.85}}
#: Fault-free hardened accuracy at most this far below plain int8 at 0.04 (stuck-at FAQ codes
#: agree with the stuck bits, so "fault-free" and "on its chip" read the same codes). Measured:
#: ViT 0.20, MobileNetV2 -0.10, BERT -0.98 points; the issue asks 0.5. The BERT's figure moves
#: by chip (-1.8 to +2.6 points): over 12 chips (seeds 100-111) -0.10 points.
FAULT_FREE_GAP = {"vit": 0.005, "mobilenetv2": 0.005, "bert": 0.005}


@pytest.fixture(scope="module")
def arch(zoo_dir, digits):
    """kind -> (model path, calib npz, test npz): models trained once per session."""
    out = {}
    for kind in KINDS:
        model = zoo.train_arch(kind, zoo_dir)
        calib = zoo.write_npz(zoo_dir / f"{kind}_calib.npz", zoo.arch_inputs(kind, digits["x_calib"]), digits["y_calib"])
        test = zoo.write_npz(zoo_dir / f"{kind}_test.npz", zoo.arch_inputs(kind, digits["x_test"]), digits["y_test"])
        out[kind] = (model, calib, test)
    return out


def _ops(model) -> dict[str, list[onnx.NodeProto]]:
    by: dict[str, list] = {}
    for n in onnx.load(str(model)).graph.node:
        by.setdefault(n.op_type, []).append(n)
    return by


@pytest.mark.parametrize("kind", KINDS)
def test_architecture_graphs(arch, digits, kind):
    """Each model has the ops of its kind, matches torch, and reaches its accuracy floor."""
    model = arch[kind][0]
    m = onnx.load(str(model))
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name for t in m.graph.initializer}
    ops = _ops(model)
    if kind == "vit":
        assert {"LayerNormalization", "Erf", "Softmax", "Conv", "Expand"} <= set(ops)
        # attention: MatMuls whose two inputs are both activations (no weight memory)
        assert any(n.input[0] not in inits and n.input[1] not in inits for n in ops["MatMul"])
    elif kind == "mobilenetv2":
        assert any(a.name == "group" and a.i > 1 for n in ops["Conv"] for a in n.attribute)  # depthwise
        assert len(ops["Clip"]) >= 10  # ReLU6
    else:
        assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert sum(n.input[0] in inits for n in ops["Gather"]) >= 1  # token embedding from an initializer
        assert {"LayerNormalization", "Softmax"} <= set(ops)
    x = zoo.arch_inputs(kind, digits["x_test"])
    logits = zoo.run_ort(model, x)
    zoo.assert_close(logits, zoo.reference_logits(model))
    assert float((logits.argmax(1) == digits["y_test"]).mean()) >= zoo.ARCH_FLOORS[kind]


def _shared(model, calib_npz, test_npz):
    with np.load(calib_npz) as c, np.load(test_npz) as t:
        calib = Dataset({"input": c["input"]}, c["label"])
        evald = Dataset({"input": t["input"]}, t["label"])
    opts = ApplyOptions(trials=0, clip=False)
    return build_shared(load_model(model), calib, evald, opts, lambda s: None), opts


def test_weight_memory_holds_embedding_tables(arch):
    """BERT's token and position tables are symmetric int8 weight memory (Gather reads them);
    the attention MatMuls between activations are not weight memory."""
    shared, _ = _shared(*arch["bert"])
    table = {w.name: w for w in qdq_weights(shared.plain)}
    gathers = [w for w in table.values() if w.op_type == "Gather"]
    assert {w.shape for w in gathers} == {(18, 32), (65, 32)}
    for w in gathers:
        assert w.activation == "" and w.bias is None
        assert onnx.numpy_helper.to_array(next(t for t in shared.plain.graph.initializer if t.name == w.name)).dtype == np.int8
    float_model = onnx.load(str(arch["bert"][0]))
    assert weight_count(arch["bert"][0]) == sum(w.size for w in table.values()) == shared.num_words
    # every weight-memory tensor is an initializer of the float model (no activation x activation MatMul)
    assert len(table) == 11 and len(float_model.graph.initializer) > 11


@pytest.mark.parametrize("kind", KINDS)
def test_recovery_on_held_out_data(arch, kind):
    """Issue 11's floors, mean of 3 chips, on the test split that calibration never saw."""
    shared, opts = _shared(*arch[kind])
    for rate in (0.04, 0.15):
        acc = []
        for seed in (100, 101, 102):
            _, _, res = harden_for_chip(shared, generate_uniform(shared.num_words, rate, seed), opts, host_check=False)
            acc.append(res["accuracy"])
            assert res["accuracy"]["hardened"] == res["accuracy"]["hardened_on_chip"]  # FAQ codes agree with stuck bits
        int8, chip, hard = (float(np.mean([a[k] for a in acc])) for k in ("int8", "int8_on_chip", "hardened_on_chip"))
        recovery = (hard - chip) / (int8 - chip)
        assert recovery >= RECOVERY_FLOOR[rate][kind], (kind, rate, recovery)
        if rate == 0.04:
            assert int8 - hard <= FAULT_FREE_GAP[kind], (kind, int8 - hard)


def test_sequential_compensation_is_what_recovers(arch):
    """The layer-by-layer compensation is the gain, not luck: on the ViT at 0.15, compensating
    every layer on the plain model's inputs recovers far less (on this chip, measured 83.0 %
    against 94.4 % hardened accuracy; 3 chips: 71 % against 98 % recovery)."""
    shared, _ = _shared(*arch["vit"])
    fm = generate_uniform(shared.num_words, 0.15, 100)
    got = {}
    for sequential in (False, True):
        _, _, res = harden_for_chip(shared, fm, ApplyOptions(trials=0, clip=False, sequential=sequential), host_check=False)
        got[sequential] = res["accuracy"]["hardened_on_chip"]
    assert got[True] > got[False] + 0.08, got


def test_sign_choice_is_what_lifts_mobilenetv2_at_high_rates(arch):
    """Storing a channel negated where its stuck sign bits fit that better (FAQPass sign_choice)
    is measured, not assumed: on the MobileNetV2 at 0.15 (3 chips) it scored 96.19 % against
    93.16 % without."""
    shared, _ = _shared(*arch["mobilenetv2"])
    got = {}
    for sign_choice in (False, True):
        acc = []
        for seed in (100, 101, 102):
            fm = generate_uniform(shared.num_words, 0.15, seed)
            opts = ApplyOptions(trials=0, clip=False, sign_choice=sign_choice)
            acc.append(harden_for_chip(shared, fm, opts, host_check=False)[2]["accuracy"]["hardened_on_chip"])
        got[sign_choice] = float(np.mean(acc))
    assert got[True] > got[False] + 0.015, got


@pytest.mark.parametrize("kind", KINDS)
def test_apply_defaults_cli(tmp_path, arch, kind):
    """`harden apply` with its defaults (clip search, campaign points fitted to the model,
    held-out scoring) succeeds on each architecture; only the trial count is cut for time."""
    model, calib, _ = arch[kind]
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(weight_count(model), 0.04, 1), chip)
    out, report = tmp_path / "h.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["apply", str(model), "--faultmap", str(chip), "--data", str(calib), "-o", str(out),
                                  "--report", str(report), "--trials", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["inputs"]["eval_data"]["held_out_of"] == "data"
    acc = rep["results"]["accuracy"]
    assert acc["hardened_on_chip"] > acc["int8_on_chip"]
    clip_search = next(p for p in rep["passes"] if p["pass"] == "clip-search")
    assert clip_search["chosen_percentile"] == "none"  # every threshold cost these models clean accuracy
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.parametrize("kind,opset", [("mobilenetv2", 13), ("vit", 14), ("vit", 16)])
def test_apply_on_older_opsets(tmp_path, digits, zoo_dir, kind, opset):
    """The models exported at older opsets go through apply: the ViT at 14 and 16 (below 17
    torch decomposes LayerNormalization; torch's attention needs 14), the MobileNetV2 at 13."""
    model = zoo.train_arch(kind, zoo_dir, opset=opset)
    assert onnx.load(str(model)).opset_import[0].version == opset
    if kind == "vit":
        assert "LayerNormalization" not in _ops(model)
    calib = zoo.write_npz(tmp_path / "calib.npz", digits["x_calib"], digits["y_calib"])
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(weight_count(model), 0.04, 1), chip)
    r = CliRunner().invoke(main, ["apply", str(model), "--faultmap", str(chip), "--data", str(calib), "-o",
                                  str(tmp_path / "h.onnx"), "--trials", "0", "--no-clip", "--json"])
    assert r.exit_code == 0, r.output
    acc = json.loads(r.output)["results"]["accuracy"]
    assert acc["hardened_on_chip"] > acc["int8_on_chip"]


def test_simulate_and_fleet_on_bert(tmp_path, arch):
    """simulate runs campaigns on the hardened BERT (its int8 Gather tables flip too) and a
    fleet of two chips hardens it chip by chip."""
    model, calib, test = arch["bert"]
    chips = tmp_path / "chips"
    chips.mkdir()
    for seed in (1, 2):
        write_faultmap(generate_uniform(weight_count(model), 0.04, seed), chips / f"c{seed}.bin")
    out = tmp_path / "fleet"
    r = CliRunner().invoke(main, ["apply", str(model), "--faultmap", str(chips), "--data", str(calib), "--eval-data", str(test),
                                  "-o", str(out), "--trials", "0", "--no-clip", "--report", str(tmp_path / "fleet.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "fleet.json").read_text())
    assert len(rep["chips"]) == 2
    hardened = rep["chips"][0]["output"]
    r = CliRunner().invoke(main, ["simulate", hardened, "--data", str(test), "--fault", "bitflip:0.001,0.01",
                                  "--trials", "3", "--json"])
    assert r.exit_code == 0, r.output
    points = json.loads(r.output)["points"]
    means = [p["accuracy"]["mean"] for p in points]
    assert means[0] > means[1]  # more flips, less accuracy: the faults reach the model


def test_saq_fine_tune_on_bert(tmp_path, arch):
    """The training graph (harden/train/graph.py) runs the BERT: Gather from embedding tables,
    LayerNormalization, Erf, Softmax, Expand; one SAQ epoch inside apply."""
    pytest.importorskip("torch")
    model, calib, test = arch["bert"]
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(weight_count(model), 0.04, 1), chip)
    r = CliRunner().invoke(main, ["apply", str(model), "--faultmap", str(chip), "--data", str(calib), "--eval-data", str(test),
                                  "-o", str(tmp_path / "h.onnx"), "--saq", "--epochs", "1", "--trials", "0", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    saq = next(p for p in rep["passes"] if p["pass"] == "saq")
    assert len(saq["epochs"]) == 1
    acc = rep["results"]["accuracy"]
    assert acc["hardened_on_chip"] > acc["int8_on_chip"] + 0.2


def test_analog_variability_and_tune_on_bert(tmp_path, arch):
    """The analog session and self-tuning treat an embedding table like any weight: its output
    channels are the looked-up features (the last axis), so tune measures a gain per feature."""
    model, calib, test = arch["bert"]
    int8 = tmp_path / "int8.onnx"
    r = CliRunner().invoke(main, ["quantize", str(model), "--data", str(calib), "-o", str(int8), "--no-clip"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["simulate", str(int8), "--data", str(test), "--fault", "variability:0.05", "--trials", "2", "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["tune", str(int8), "--data", str(calib), "-o", str(tmp_path / "tuned.onnx"), "--sigma-chip", "0.1"])
    assert r.exit_code == 0, r.output
    assert "tok.weight_quantized" in r.output and "(32 channels)" in r.output


def test_bert_tables_rows_move_freely_under_the_layernorm(arch, monkeypatch):
    """The BERT's token and position tables reach the model only through an Add into a
    LayerNormalization, so FAQ may shift a table row by one value (model.mean_free_tables):
    on one chip at 0.15 rows move, and the hardened model scores higher than without
    (before the tables' sign choice, 3 chips: 86.9 % against 82.0 % recovery; 6 chips 82.0 %
    against 80.6 %)."""
    import harden.passes.faq as faq_pass

    shared, opts = _shared(*arch["bert"])
    assert mean_free_tables(shared.plain) == {w.name for w in qdq_weights(shared.plain) if w.op_type == "Gather"}
    fm = generate_uniform(shared.num_words, 0.15, 100)
    _, records, res = harden_for_chip(shared, fm, opts, host_check=False)
    faq = next(r for r in records if r["pass"] == "faq")
    assert faq["shifted_rows"] > 0
    monkeypatch.setattr(faq_pass, "mean_free_tables", lambda model, table=None: set())
    _, _, unshifted = harden_for_chip(shared, fm, opts, host_check=False)
    assert res["accuracy"]["hardened_on_chip"] > unshifted["accuracy"]["hardened_on_chip"], (res, unshifted)


def test_bert_table_rows_stored_negated(arch, monkeypatch):
    """An embedding table's DequantizeLinear holds its scale once per row (quantize's
    per_row_table_scales, the same arithmetic), so FAQ may store a row negated under a negated
    scale. On one chip at 0.15: rows are negated, only the signs of their scales move, a fleet's
    evaluator of the plain graph scores what the hardened graph does, and the hardened model
    scores higher than without the choice (3 chips 88.4 % against 86.9 % recovery at 0.15)."""
    import harden.passes.faq as faq_pass
    from harden.arithmetic import TOLERANCE
    from harden.data import top1
    from harden.model import channel_sign_scales, get_initializer
    from harden.simulate import ChipEvaluator, model_values

    shared, opts = _shared(*arch["bert"])
    tables = [w for w in qdq_weights(shared.plain) if w.op_type == "Gather"]
    assert all(w.scale.shape == (w.shape[0],) and w.axis == 0 for w in tables)
    signable = channel_sign_scales(shared.plain)
    assert {w.name for w in tables} <= set(signable)
    fm = generate_uniform(shared.num_words, 0.15, 100)
    out, records, res = harden_for_chip(shared, fm, opts, host_check=False)
    faq = next(r for r in records if r["pass"] == "faq")
    negated_rows = 0
    for w in tables:
        scale = get_initializer(out, w.scale_name)
        assert np.array_equal(np.abs(scale), w.scale)
        negated_rows += int((scale < 0).sum())
    assert negated_rows > 0 and faq["negated_channels"] >= negated_rows
    data, ref = shared.evald, shared.reference()[1]
    for strategy in ("rebuild", "feed"):
        own = ChipEvaluator(out, data, ref, strategy=strategy)
        fleet = ChipEvaluator(shared.plain, data, ref, strategy=strategy)
        agree = np.mean(top1(fleet.logits(model_values(out, fleet.names))) == top1(own.logits()))
        assert agree >= 1 - TOLERANCE["accuracy_samples"] / len(data), strategy
    no_tables = {n: v for n, v in signable.items() if n not in {w.name for w in tables}}
    monkeypatch.setattr(faq_pass, "channel_sign_scales", lambda model, table=None: no_tables)
    _, _, unsigned = harden_for_chip(shared, fm, opts, host_check=False)
    assert res["accuracy"]["hardened_on_chip"] > unsigned["accuracy"]["hardened_on_chip"], (res, unsigned)


def test_mobilenetv2_trials_stack_with_padded_channels(arch):
    """The MobileNetV2's 24-channel layers are padded to 32 channels per trial in a stacked
    session (stacking.CHANNEL_BLOCK: onnxruntime's blocked kernels need whole blocks per group);
    the padding changes nothing a trial computes: a fleet's stacked evaluator of the plain graph,
    given a hardened chip's values (negated per-channel scales included), scores what the
    hardened graph's own session does."""
    from harden.arithmetic import TOLERANCE
    from harden.data import top1
    from harden.simulate import ChipEvaluator, model_values
    from harden.stacking import CHANNEL_BLOCK

    shared, opts = _shared(*arch["mobilenetv2"])
    out, _, _ = harden_for_chip(shared, generate_uniform(shared.num_words, 0.04, 100), opts, host_check=False)
    data, ref = shared.evald, shared.reference()[1]
    fleet = ChipEvaluator(shared.plain, data, ref)  # the default strategy: stacked
    stacked = fleet.stacked
    assert stacked is not None and stacked.k > 1
    values = model_values(out, fleet.names)
    got = fleet.logits_many([values, None, values])
    graph = onnx.load_from_string(stacked._layout(3).graph)
    inits = {t.name for t in graph.graph.initializer}
    pads = stacked._layout(3).pads
    assert pads and all(shape[0] % CHANNEL_BLOCK == 0 for shape, _ in pads.values())
    assert any(w.shape[0] % CHANNEL_BLOCK for w in qdq_weights(shared.plain) if w.op_type == "Conv")  # some were not
    own = top1(ChipEvaluator(out, data, ref, strategy="rebuild").logits())
    for logits in (got[0], got[2]):
        assert np.mean(top1(logits) == own) >= 1 - TOLERANCE["accuracy_samples"] / len(data)
    assert np.array_equal(top1(got[1]), top1(fleet.logits(None)))
    assert "__stk" not in " ".join(inits)  # the variables come with each session, not in the graph
