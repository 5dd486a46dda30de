"""`harden simulate`: fault models, campaigns and their statistics on the trained digits CNNs.

The int8 models are the zoo's digits CNNs put through harden's own preparation and
QuantizePass (what `apply` does before FAQ), calibrated on the calibration split; campaigns run
on the held-out test split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo
from click.testing import CliRunner

from harden.campaign import (
    Campaign,
    CampaignOptions,
    describe_trial,
    prepare_campaign,
    simulate,
    trial_rng,
)
from harden.cli import main
from harden.errors import InputError
from harden.faultmap import generate_uniform, write_faultmap
from harden.faults import (
    BitFlip,
    BitFlipParams,
    Injection,
    StuckAt,
    StuckAtParams,
    TensorFaults,
    WeightSpace,
    parse_fault_spec,
    register_fault_model,
)
from harden.model import set_initializer
from harden.pipeline import ApplyOptions, apply
from harden.runtime import session
from harden.simulate import ChipEvaluator
from harden.stats import leveugle_n, summarize, t_value, wilson


def _campaign(model: Path, data: Path, specs, seed=0, faultmaps=()) -> Campaign:
    campaign, _, _ = prepare_campaign(model, data, specs, faultmaps, CampaignOptions(seed=seed))
    return campaign


def _bits(values: dict[str, np.ndarray], name: str) -> np.ndarray:
    """[n, bits] 0/1 matrix of a tensor's elements (LSB first)."""
    v = np.ascontiguousarray(values[name]).reshape(-1)
    b = v.view(np.uint8).reshape(v.size, v.dtype.itemsize)  # little-endian host
    return np.unpackbits(b, axis=1, bitorder="little")


def _changed_cells(clean: dict, faulty: dict) -> set[tuple[str, int, int]]:
    out = set()
    for name in clean:
        diff = _bits(clean, name) ^ _bits(faulty, name)
        for i, b in zip(*np.nonzero(diff)):
            out.add((name, int(i), int(b)))
    return out


# --- accuracy and SDC-1 against the bit error rate -------------------------------------------


@pytest.mark.parametrize("kind,rates", [
    ("plain", (3e-3, 1e-2, 3e-2, 1e-1)),  # 19k weights and no skip path: robust at low rates
    ("residual", (1e-4, 1e-3, 1e-2, 3e-2)),
])
def test_accuracy_falls_and_sdc_rises_with_ber(request, kind, rates, digits_test_npz):
    model = request.getfixturevalue(f"int8_{kind}")
    spec = "bitflip:0," + ",".join(f"{r:g}" for r in rates)
    rep = simulate(model, digits_test_npz, [spec], options=CampaignOptions(trials=25, seed=1)).report
    clean = rep["clean"]
    assert clean["reference"] == "labels" and clean["accuracy"] > 0.95
    acc = [p["accuracy"]["mean"] for p in rep["points"]]
    sdc = [p["sdc1"]["mean"] for p in rep["points"]]
    assert acc[0] == clean["accuracy"] and sdc[0] == 0.0  # rate 0: nothing flips
    assert all(a > b for a, b in zip(acc, acc[1:])), acc
    assert all(a < b for a, b in zip(sdc, sdc[1:])), sdc
    assert acc[-1] < 0.5 and acc[1] > 0.95
    for p in rep["points"]:
        assert p["trials"] == 25
        lo, hi = p["accuracy"]["ci95"]
        assert lo <= p["accuracy"]["mean"] <= hi
        s = summarize(p["per_trial"]["accuracy"])
        assert math.isclose(s.mean, p["accuracy"]["mean"], abs_tol=1e-6)
        assert math.isclose(s.std, p["accuracy"]["std"], abs_tol=1e-6)
        lo, hi = p["sdc1"]["wilson95"]
        assert lo <= p["sdc1"]["events"] / p["sdc1"]["opportunities"] <= hi
    # The number of flipped cells follows the rate: ~ rate * 8 * weights.
    n_bits = 8 * rep["model"]["int8_weights"]
    for p, rate in zip(rep["points"][1:], rates):
        mean, sd = n_bits * rate, math.sqrt(n_bits * rate * (1 - rate) / p["trials"])
        assert abs(p["faulty_cells"]["mean"] - mean) < 5 * sd


def test_agreement_without_labels(int8_plain, digits, tmp_path):
    data = zoo.write_npz(tmp_path / "nolabels.npz", digits["x_test"])
    rep = simulate(int8_plain, data, ["bitflip:1e-3"], options=CampaignOptions(trials=5)).report
    assert rep["clean"] == {"reference": "agreement", "samples": 341, "accuracy": 1.0, "correct": 341}
    p = rep["points"][0]
    # Agreement with the fault-free model and SDC-1 over all inputs are complements.
    assert math.isclose(p["accuracy"]["mean"] + p["sdc1"]["mean"], 1.0, abs_tol=1e-6)


# --- reproducibility and the exact faults of a trial -----------------------------------------


def test_trial_is_reproducible_and_described_exactly(int8_plain, digits_test_npz):
    c = _campaign(int8_plain, digits_test_npz, ["bitflip:1e-3", "stuckat:0.02"], seed=7)
    for point in (0, 1):
        res = c.run_point(point, CampaignOptions(trials=6, seed=7))
        for trial in (0, 5):
            # Re-derived from (seed, point, trial) alone, in a fresh campaign, in any order.
            again = _campaign(int8_plain, digits_test_npz, ["bitflip:1e-3", "stuckat:0.02"], seed=7)
            r = again.run_trial(point, trial)
            assert r.accuracy == res.accuracy[trial] and r.sdc1_events == res.sdc1_events[trial]
            faulty = c.faulty_values(point, trial)
            faults = c.describe_trial(point, trial)
            assert faults and len(faults) == r.faulty_cells
            changing = {(f.tensor, f.index, f.bit) for f in faults if f.changes}
            assert changing == _changed_cells(c.values, faulty)  # exactly the cells that change
            if point == 0:
                assert all(f.kind == "flip" and f.changes for f in faults)
            else:
                assert {f.kind for f in faults} == {"sa0", "sa1"}
                assert any(not f.changes for f in faults)  # a stuck cell holding its own value
            # The Python API gives the same list from the model file alone.
            model = onnx.load(str(int8_plain))
            spec = ["bitflip:1e-3", "stuckat:0.02"][point]
            assert describe_trial(model, spec, 7, point, trial) == faults
    # A different trial or seed draws different faults.
    assert c.describe_trial(0, 0) != c.describe_trial(0, 1)
    other = _campaign(int8_plain, digits_test_npz, ["bitflip:1e-3"], seed=8)
    assert other.describe_trial(0, 0) != c.describe_trial(0, 0)


def test_trial_sessions_match_a_rebuilt_model(int8_plain, digits_test_npz):
    """A trial's session (the model's bytes with the faulty tensors appended, merged by protobuf)
    computes exactly what a copy of the model with those initializers set computes; the "feed"
    strategy (weights as graph inputs) agrees to the stated tolerance (one step at a tie), and
    so does a trial run beside others in a stacked session (the default)."""
    c = _campaign(int8_plain, digits_test_npz, ["bitflip:1e-2", "bitflip-bias:1e-3"], seed=3)
    assert c.evaluator.strategy == "stack" and c.evaluator.stack > 1
    data = c.evaluator.data
    stacked = c.evaluator.logits_many([c.faulty_values(p, t) for p in (0, 1) for t in (2, 5)])
    feed = ChipEvaluator(onnx.load(str(int8_plain)), data, c.evaluator.reference, strategy="feed")
    for point in (0, 1):
        faulty = c.faulty_values(point, 2)
        model = onnx.load(str(int8_plain))
        for name, v in faulty.items():
            set_initializer(model, name, v)
        rebuilt = session(model).run(None, {"input": data.inputs["input"]})[0]
        logits = c.evaluator.logits(faulty)
        assert np.array_equal(rebuilt, logits)
        assert not np.array_equal(logits, c.evaluator.logits())  # the faults took effect
        for other in (feed.logits(faulty), stacked[2 * point]):
            step = np.abs(other - logits)
            assert np.mean(step > 1e-6) <= 0.01 and (other.argmax(1) != logits.argmax(1)).sum() <= 1  # TOLERANCE


def test_bias_flips_hit_only_biases(int8_plain, digits_test_npz):
    c = _campaign(int8_plain, digits_test_npz, ["bitflip-bias:2e-3"], seed=0)
    biases = {t.name for t in c.space.biases}
    assert biases and len(c.space.biases) == len(c.space.weights)
    faults = [f for t in range(5) for f in c.describe_trial(0, t)]
    assert faults and {f.tensor for f in faults} <= biases
    assert max(f.bit for f in faults) > 7  # 32-bit cells
    faulty = c.faulty_values(0, 0)
    assert _changed_cells(c.values, faulty) == {(f.tensor, f.index, f.bit) for f in c.describe_trial(0, 0)}
    for name in c.space.weights:
        assert faulty[name.name] is c.values[name.name]  # untouched tensors are not even copied


def test_stuckat_hits_the_expected_fraction_of_cells(int8_plain, digits_test_npz):
    space = WeightSpace.from_model(onnx.load(str(int8_plain)))
    values = {n: v for n, v in _campaign(int8_plain, digits_test_npz, ["stuckat:0.04"]).values.items()}
    model = StuckAt(StuckAtParams(0.04))
    cells = 8 * space.weight_count
    trials, faulty_total, changed_total, sa1_total = 20, 0, 0, 0
    for t in range(trials):
        inj = model.sample(trial_rng(0, 0, t), space)
        faults = inj.faults(values)
        faulty_total += len(faults)
        sa1_total += sum(f.kind == "sa1" for f in faults)
        changed = _changed_cells(values, inj.apply(values))
        assert changed == {(f.tensor, f.index, f.bit) for f in faults if f.changes}
        changed_total += len(changed)
    r = 0.04
    expect, sd = trials * cells * r, math.sqrt(trials * cells * r * (1 - r))
    assert abs(faulty_total - expect) < 4 * sd, (faulty_total, expect)
    # Each faulty cell is stuck at 1 w.p. 1/2, so it changes its bit w.p. 1/2 whatever is stored.
    half_sd = math.sqrt(faulty_total / 4)
    assert abs(changed_total - faulty_total / 2) < 4 * half_sd
    assert abs(sa1_total - faulty_total / 2) < 4 * half_sd


# --- a given chip -----------------------------------------------------------------------------


def test_chip_reproduces_apply_int8_on_chip(int8_residual, digits_calib_npz, digits_test_npz, tmp_path):
    space = WeightSpace.from_model(onnx.load(str(int8_residual)))
    results = []
    for words, seed in ((space.weight_count, 4), (space.weight_count // 3, 5)):  # the second reuses words
        chip = tmp_path / f"chip{seed}.bin"
        write_faultmap(generate_uniform(words, 0.03, seed), chip)
        applied = apply(int8_residual, chip, digits_calib_npz, eval_data_path=digits_test_npz,
                        options=ApplyOptions(compensation=False), write=False).report
        assert applied["inputs"]["already_int8"]
        rep = simulate(int8_residual, digits_test_npz, faultmaps=[chip], options=CampaignOptions(trials=50)).report
        (p,) = rep["points"]
        assert p["deterministic"] and p["trials"] == 1 and p["label"] == f"chip:sim-{seed}"
        assert p["accuracy"]["mean"] == applied["results"]["accuracy"]["int8_on_chip"]
        assert rep["clean"]["accuracy"] == applied["results"]["accuracy"]["int8"]
        results.append(p["accuracy"]["mean"])
    assert min(results) < rep["clean"]["accuracy"] - 0.02  # the chips do hurt


def test_chip_csv_and_spec_forms_agree(int8_plain, digits_test_npz, tmp_path):
    from harden.faultmap import write_faultmap_csv

    space = WeightSpace.from_model(onnx.load(str(int8_plain)))
    fm = generate_uniform(space.weight_count, 0.02, 9)
    write_faultmap(fm, tmp_path / "c.bin")
    write_faultmap_csv(fm, tmp_path / "c.csv")
    rep = simulate(int8_plain, digits_test_npz, [f"chip:{tmp_path / 'c.bin'}"], [tmp_path / "c.csv"]).report
    a, b = (p["accuracy"]["mean"] for p in rep["points"])
    assert a == b


# --- statistics, early stopping, determinism --------------------------------------------------


def test_statistics_helpers():
    assert leveugle_n(0.05) == 385 and leveugle_n(0.01) == 9604
    n_formula = 10000 / (1 + 0.05**2 * 9999 / (1.959964**2 * 0.25))
    assert leveugle_n(0.05, population=10000) == math.ceil(n_formula)
    assert leveugle_n(0.5, population=3) <= 3
    assert abs(t_value(0.95, 9) - 2.262157) < 1e-6 and abs(t_value(0.95, 1) - 12.706205) < 1e-5
    assert abs(t_value(0.99, 1000) - 2.580755) < 1e-6
    lo, hi = wilson(0, 100)
    assert lo == 0.0 and abs(hi - 0.036993) < 1e-6
    lo, hi = wilson(5, 100)
    assert abs(lo - 0.021544) < 1e-6 and abs(hi - 0.111750) < 1e-6
    s = summarize([0.5, 0.7, 0.6])
    assert math.isclose(s.mean, 0.6) and math.isclose(s.std, 0.1)
    assert math.isclose(s.half_width, t_value(0.95, 2) * 0.1 / math.sqrt(3))
    assert summarize([0.4]).low is None


def test_early_stopping(int8_plain, digits_test_npz):
    loose = simulate(int8_plain, digits_test_npz, ["bitflip:1e-3"], options=CampaignOptions(margin=0.05)).report
    (p,) = loose["points"]
    assert p["planned_trials"] == leveugle_n(0.05) == loose["options"]["planned_trials"]
    assert p["stopped_early"] and 20 <= p["trials"] < p["planned_trials"] and p["trials"] % 5 == 0
    assert p["accuracy"]["half_width"] <= 0.05
    # A margin that cannot be met in the allowed trials runs them all.
    tight = simulate(int8_plain, digits_test_npz, ["bitflip:1e-2"], options=CampaignOptions(margin=1e-4, trials=30)).report
    (q,) = tight["points"]
    assert not q["stopped_early"] and q["trials"] == q["planned_trials"] == 30
    # Stopping early changes nothing about the trials that ran.
    fixed = simulate(int8_plain, digits_test_npz, ["bitflip:1e-3"], options=CampaignOptions(trials=p["trials"])).report
    assert fixed["points"][0]["per_trial"] == p["per_trial"]


def _strip_timing(x):
    if isinstance(x, dict):
        return {k: _strip_timing(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_strip_timing(v) for v in x]
    return x


def test_cli_json_is_deterministic(int8_plain, digits_test_npz, tmp_path):
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(WeightSpace.from_model(onnx.load(str(int8_plain))).weight_count, 0.02, 1), chip)
    argv = ["simulate", str(int8_plain), "--data", str(digits_test_npz), "--fault", "bitflip:1e-3,1e-2",
            "--fault", "stuckat:0.01", "--faultmap", str(chip), "--trials", "15", "--seed", "5", "--json"]
    runs = [CliRunner().invoke(main, argv) for _ in range(2)]
    for r in runs:
        assert r.exit_code == 0, (r.output, r.exception)
    a, b = (json.loads(r.stdout) for r in runs)
    assert a["schema"] == "harden.report/1" and a["command"] == "simulate"
    assert [p["label"] for p in a["points"]] == ["bitflip:0.001", "bitflip:0.01", "stuckat:0.01", "chip:sim-1"]
    for p in a["points"]:
        assert {"trials", "accuracy", "sdc1", "per_trial", "worst_trial"} <= set(p)
        assert {"mean", "std", "ci95"} <= set(p["accuracy"]) and {"mean", "ci95", "wilson95"} <= set(p["sdc1"])
    assert "seconds" in a and _strip_timing(a) == _strip_timing(b)
    c = json.loads(CliRunner().invoke(main, argv[:-3] + ["--seed", "6", "--json"]).stdout)
    assert c["points"][0]["per_trial"] != a["points"][0]["per_trial"]

    # --show-trial names the exact faults of the worst trial, with the figures the campaign saw.
    p = a["points"][1]
    w = p["worst_trial"]
    r = CliRunner().invoke(main, argv[:-1] + ["--show-trial", f"1:{w}", "--json"])
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)["trial"]
    assert t["rng"] == [5, 1, w] and t["accuracy"] == p["per_trial"]["accuracy"][w]
    assert len(t["faults"]) == t["faulty_cells"] == p["per_trial"]["faulty_cells"][w]
    assert set(t["faults"][0]) == {"tensor", "index", "bit", "kind", "changes"}
    table = CliRunner().invoke(main, argv[:-1] + ["--show-trial", "0:0"])
    assert table.exit_code == 0 and "flip" in table.stdout and "trial 0" in table.stdout


def test_cli_table(int8_plain, digits_test_npz, tmp_path):
    out = tmp_path / "rep.json"
    r = CliRunner().invoke(main, ["simulate", str(int8_plain), "--data", str(digits_test_npz),
                                  "--fault", "bitflip:1e-4,1e-3", "--margin", "0.05", "--report", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "bitflip:0.0001" in r.stdout and "SDC-1" in r.stdout and "stopped early" in r.stdout
    assert r.stderr == ""  # no progress bar without a terminal
    assert json.loads(out.read_text())["command"] == "simulate"


# --- fault models as plugins ------------------------------------------------------------------


def test_registry_takes_new_models(monkeypatch, int8_plain, digits_test_npz):
    from harden import faults

    class MSBStuck(faults.FaultModel):
        """Bit 7 of the first k weights of every tensor stuck at 1."""

        name, deterministic = "msb", True

        def __init__(self, k):
            self.k = k

        label = property(lambda self: f"msb:{self.k}")
        params = property(lambda self: {"k": self.k})

        def check(self, space):
            pass

        def sample(self, rng, space):
            return Injection(tuple(
                TensorFaults(t.name, np.arange(self.k), sa1=np.full(self.k, 0x80, np.uint8)) for t in space.weights
            ))

    monkeypatch.setattr(faults, "_REGISTRY", dict(faults._REGISTRY))
    register_fault_model("msb", lambda args: [MSBStuck(int(a)) for a in args.split(",")])
    with pytest.raises(ValueError):
        register_fault_model("msb", lambda args: [])
    assert [m.label for m in parse_fault_spec("msb:1,2")] == ["msb:1", "msb:2"]
    rep = simulate(int8_plain, digits_test_npz, ["msb:0,4"]).report
    assert [p["trials"] for p in rep["points"]] == [1, 1]
    assert rep["points"][0]["accuracy"]["mean"] == rep["clean"]["accuracy"]
    assert rep["points"][1]["faulty_cells"]["mean"] == 4 * rep["model"]["int8_tensors"]


def test_spec_parsing():
    models = parse_fault_spec("bitflip:1e-4, 1e-3")
    assert [m.params for m in models] == [BitFlipParams(1e-4), BitFlipParams(1e-3)]
    assert isinstance(parse_fault_spec("bitflip-bias:0.5")[0], BitFlip)
    assert parse_fault_spec("bitflip-bias:0.5")[0].params.target == "bias"
    assert parse_fault_spec("stuckat:0,1")[1].params == StuckAtParams(1.0)
    for bad in ("bitflop:1e-3", "bitflip", "bitflip:", "bitflip:2", "bitflip:-1e-3", "bitflip:nan", "stuckat:x", "chip:"):
        with pytest.raises(InputError):
            parse_fault_spec(bad)


# --- bad input: exit 2, one line --------------------------------------------------------------


BAD = {
    "unknown-fault": (["--fault", "bitflop:1e-3"], "unknown fault model 'bitflop'"),
    "rate-above-1": (["--fault", "bitflip:1.5"], r"outside \[0, 1\]"),
    "rate-negative": (["--fault", "stuckat:-0.1"], r"outside \[0, 1\]"),
    "rate-nan": (["--fault", "bitflip:nan"], r"outside \[0, 1\]"),
    "rate-not-a-number": (["--fault", "bitflip:1e-3,abc"], "not a number"),
    "no-rates": (["--fault", "bitflip"], "needs one or more rates"),
    "trials-0": (["--fault", "bitflip:1e-3", "--trials", "0"], "--trials must be"),
    "margin-0": (["--fault", "bitflip:1e-3", "--margin", "0"], "--margin must be"),
    "margin-1.5": (["--fault", "bitflip:1e-3", "--margin", "1.5"], "--margin must be"),
    "confidence-1": (["--fault", "bitflip:1e-3", "--margin", "0.01", "--confidence", "1"], "--confidence must be"),
    "seed-negative": (["--fault", "bitflip:1e-3", "--seed", "-1"], "--seed must be"),
    "nothing-to-simulate": ([], "nothing to simulate"),
    "faultmap-missing": (["--faultmap", "{tmp}/nope.bin"], "no such file"),
    "faultmap-corrupt": (["--faultmap", "{tmp}/bad.bin"], "bad magic"),
    "show-trial-syntax": (["--fault", "bitflip:1e-3", "--show-trial", "x"], "POINT:TRIAL"),
    "show-trial-no-point": (["--fault", "bitflip:1e-3", "--show-trial", "3:0"], "point 3 does not exist"),
    "data-shape": (["--fault", "bitflip:1e-3", "--data", "{tmp}/wrong.npz"], "has shape"),
    "data-missing": (["--fault", "bitflip:1e-3", "--data", "{tmp}/none.npz"], "no such data file"),
    "model-float": (["--fault", "bitflip:1e-3", "--model", "{float}"], "simulate takes an int8 QDQ model.*run harden apply first"),
    "model-missing": (["--fault", "bitflip:1e-3", "--model", "{tmp}/none.onnx"], "no such model file"),
    "report-over-input": (["--fault", "bitflip:1e-3", "--report", "{data}"], "is the input"),
    "per-layer-two-points": (["--per-layer", "bitflip:1e-3,1e-2"], "takes one fault point"),
    "per-layer-unknown": (["--per-layer", "bitflop:1e-3"], "unknown fault model"),
    "rho-without-diagnostics": (["--fault", "bitflip:1e-3", "--rho", "0.1"], "give --diagnostics too"),
    "rho-0": (["--diagnostics", "--rho", "0"], r"--rho must be in \(0, 10\)"),
    "act-rate-above-1": (["--fault", "bitflip-act:2"], r"outside \[0, 1\]"),
    # precision: int8 fault models need an int8 QDQ model, bitflip-fp32 a float one
    "fp32-on-int8": (["--fault", "bitflip-fp32:1e-6"], "bitflip-fp32:1e-06 flips bits of float32 weights, but this is an int8 QDQ model"),
    "float-with-chip": (["--model", "{float}", "--fault", "bitflip-fp32:1e-6", "--faultmap", "{tmp}/none.bin"],
                        "chip:none.*is an int8 fault model.*use bitflip-fp32"),
    "float-with-act": (["--model", "{float}", "--fault", "bitflip-act:1e-3"], "bitflip-act:0.001 is an int8 fault model"),
    "float-per-layer-int8": (["--model", "{float}", "--per-layer", "stuckat:0.01"], "--per-layer stuckat:0.01 is an int8 fault model"),
    "float-diagnostics": (["--model", "{float}", "--fault", "bitflip-fp32:1e-6", "--diagnostics"],
                          "--diagnostics takes an int8 QDQ model"),
    "fp32-rate-bad": (["--model", "{float}", "--fault", "bitflip-fp32:1e-6,x"], "not a number"),
    # gates at named points
    "gate-unknown-point": (["--fault", "bitflip:1e-3", "--min-accuracy", "bitflip:0.01=0.9"],
                           r"no point is labelled 'bitflip:0.01' \(points: bitflip:0.001; or 'all'\)"),
    "gate-no-equals": (["--fault", "bitflip:1e-3", "--max-drop", "0.05"], r"--max-drop takes POINT=DROP\[@ci\]"),
    "gate-percent": (["--fault", "bitflip:1e-3", "--min-accuracy", "all=95"], r"must be in \[0, 1\]"),
    "gate-not-a-number": (["--fault", "bitflip:1e-3", "--min-accuracy", "all=high@ci"], "'high' is not a number"),
    "gate-all-no-points": (["--per-layer", "bitflip:1e-3", "--min-accuracy", "all=0.5"], "no --fault / --faultmap points"),
    "gate-show-trial": (["--fault", "bitflip:1e-3", "--min-accuracy", "all=0.5", "--show-trial", "0:0"],
                        "do not apply to --show-trial"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_exits_2_with_one_line(case, int8_plain, plain_cnn, digits_test_npz, tmp_path):
    args, fragment = BAD[case]
    (tmp_path / "bad.bin").write_bytes(b"NOPE" + bytes(40))
    write_faultmap(generate_uniform(100, 0.0, 0, {"chip_id": "none"}), tmp_path / "none.bin")
    zoo.write_npz(tmp_path / "wrong.npz", np.zeros((4, 1, 9, 9), np.float32))
    subst = {"{tmp}": str(tmp_path), "{float}": str(plain_cnn), "{data}": str(digits_test_npz)}

    def fill(a):
        for k, v in subst.items():
            a = a.replace(k, v)
        return a

    args = [fill(a) for a in args]
    model, data = str(int8_plain), str(digits_test_npz)
    if "--model" in args:
        i = args.index("--model")
        model = args[i + 1]
        del args[i:i + 2]
    if "--data" in args:
        i = args.index("--data")
        data = args[i + 1]
        del args[i:i + 2]
    r = CliRunner().invoke(main, ["simulate", model, "--data", data, *args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    import re

    assert re.search(fragment, lines[0]), lines[0]


# --- faults restricted to some tensors, and per-layer vulnerability ---------------------------


def _all_models(space):
    names_w = [t.name for t in space.weights]
    names_b = [t.name for t in space.biases]
    return [
        (BitFlip(BitFlipParams(1e-2)), names_w),
        (BitFlip(BitFlipParams(1e-2, "bias")), names_b),
        (StuckAt(StuckAtParams(0.02)), names_w),
    ]


def test_restricting_to_every_tensor_is_the_unrestricted_model(int8_residual, digits_test_npz):
    c = _campaign(int8_residual, digits_test_npz, ["bitflip:1e-2", "bitflip-act:1e-3"], seed=4)
    act_names = [t.name for t in c.act_space.tensors]
    cases = _all_models(c.space) + [(c.points[1], act_names)]
    for model, names in cases:
        space = c.space_of(model)
        whole = model.restricted(list(reversed(names)))  # any order: the space's order is used
        assert whole.label != model.label and whole.params.tensors == tuple(reversed(names))
        for t in range(4):
            a = model.sample(trial_rng(4, 0, t), space).faults(None)
            b = whole.sample(trial_rng(4, 0, t), space).faults(None)
            assert a and a == b
    # In a campaign: the same point index draws the same trials, so the figures are equal.
    full = [p.restricted([t.name for t in p.targets(c.space_of(p))]) for p in c.points]
    other = Campaign(c.model, c.data, full, seed=4)
    opts = CampaignOptions(trials=4, seed=4)
    for point in (0, 1):
        assert np.array_equal(c.run_point(point, opts).accuracy, other.run_point(point, opts).accuracy)


def test_restricted_faults_stay_in_their_tensors_and_add_up(int8_residual, digits_test_npz, tmp_path):
    c = _campaign(int8_residual, digits_test_npz, ["bitflip:1e-2"], seed=2)
    space, rate, trials = c.space, 1e-2, 40
    per_layer_mean = 0.0
    for t in space.weights:
        model = BitFlip(BitFlipParams(rate, tensors=(t.name,)))
        counts = []
        for k in range(trials):
            faults = model.sample(trial_rng(2, 0, k), space).faults(None)
            assert {f.tensor for f in faults} <= {t.name}
            counts.append(len(faults))
        per_layer_mean += np.mean(counts)
        sd = math.sqrt(t.cells * rate * (1 - rate) / trials)
        assert abs(np.mean(counts) - t.cells * rate) < 5 * sd + 1e-9
    # The faults of the per-layer points add up to the unrestricted point's (in expectation).
    whole = [len(c.describe_trial(0, k)) for k in range(trials)]
    sd = math.sqrt(8 * space.weight_count * rate * (1 - rate) * 2 / trials)
    assert abs(per_layer_mean - np.mean(whole)) < 5 * sd

    # A chip's per-layer faults add up *exactly* to the whole chip's.
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(space.weight_count, 0.03, 6), chip)
    rep = simulate(int8_residual, digits_test_npz, faultmaps=[chip], per_layer=f"chip:{chip}").report
    cc = rep["points"][0]["faulty_cells"]["mean"]
    assert sum(e["faulty_cells"] for e in rep["per_layer"]) == cc > 0
    cmp = _campaign(int8_residual, digits_test_npz, [f"chip:{chip}"])
    cmp.add_per_layer(cmp.points[0])
    union = sorted(f for p in cmp.per_layer.indices for f in cmp.describe_trial(p, 0))
    assert union == sorted(cmp.describe_trial(0, 0))
    assert all(e["trials"] == 1 and e["accuracy"]["std"] == 0.0 for e in rep["per_layer"])


def test_per_layer_ranks_layers_by_accuracy_loss(int8_residual, digits_test_npz):
    rep = simulate(int8_residual, digits_test_npz, ["bitflip:1e-2"], options=CampaignOptions(trials=12, seed=3),
                   per_layer="bitflip:1e-2").report
    clean = rep["clean"]["accuracy"]
    pl = rep["per_layer"]
    space = WeightSpace.from_model(onnx.load(str(int8_residual)))
    assert [p["label"] for p in rep["points"]] == ["bitflip:0.01"]  # per-layer points are reported apart
    assert sorted(e["tensor"] for e in pl) == sorted(t.name for t in space.weights)
    assert [e["rank"] for e in pl] == list(range(1, len(pl) + 1))
    assert [e["loss"] for e in pl] == sorted((e["loss"] for e in pl), reverse=True)
    assert rep["per_layer_fault"]["label"] == "bitflip:0.01" and rep["per_layer_fault"]["tensors"] == len(pl)
    assert sorted(e["index"] for e in pl) == list(range(1, 1 + len(pl)))
    sizes = {t.name: t.size for t in space.weights}
    for e in pl:
        assert e["kind"] == "weight" and e["op"] in ("Conv", "Gemm") and e["weights"] == sizes[e["tensor"]]
        assert e["label"] == f"bitflip:0.01@{e['tensor']}" and e["trials"] == 12
        assert math.isclose(e["loss"], clean - e["accuracy"]["mean"], abs_tol=2e-6)
        lo, hi = e["accuracy"]["ci95"]
        assert lo <= e["accuracy"]["mean"] <= hi
        assert math.isclose(e["loss_ci95"][0], clean - hi, abs_tol=2e-6)
    # Faults everywhere hurt at least as much as faults in any one layer.
    whole = rep["points"][0]["accuracy"]["mean"]
    assert whole < min(e["accuracy"]["mean"] for e in pl)
    assert pl[0]["loss"] > 0.05 > pl[-1]["loss"]  # some layers matter much more than others
    # A per-layer trial is re-derived like any other: only its tensor is hit.
    top = pl[0]
    t = simulate(int8_residual, digits_test_npz, ["bitflip:1e-2"], options=CampaignOptions(seed=3),
                 per_layer="bitflip:1e-2", show_trial=(top["index"], 0)).report["trial"]
    assert {f["tensor"] for f in t["faults"]} == {top["tensor"]}
    # Python: the same figures from a campaign built by hand.
    c = _campaign(int8_residual, digits_test_npz, ["bitflip:1e-2"], seed=3)
    c.add_per_layer(BitFlip(BitFlipParams(1e-2)))
    r = c.run_point(top["index"], CampaignOptions(trials=12, seed=3))
    assert round(float(r.accuracy.mean()), 6) == top["accuracy"]["mean"]


def test_tensor_restriction_errors(int8_plain, digits_test_npz):
    c = _campaign(int8_plain, digits_test_npz, ["bitflip:1e-3"])
    with pytest.raises(InputError, match="no such tensor 'nope'"):
        BitFlip(BitFlipParams(1e-3, tensors=("nope",))).check(c.space)
    with pytest.raises(InputError, match="no such tensor"):  # a bias is not a weight
        StuckAt(StuckAtParams(0.1, tensors=(c.space.biases[0].name,))).check(c.space)
    for bad in ((), ("a", "a"), (3,)):
        with pytest.raises(InputError):
            BitFlipParams(1e-3, tensors=bad)
    with pytest.raises(InputError, match="unrestricted"):
        c.add_per_layer(BitFlip(BitFlipParams(1e-3, tensors=(c.space.weights[0].name,))))
    assert BitFlipParams(1e-3, tensors=["x"]).tensors == ("x",)


# --- bit flips in the quantized activations ---------------------------------------------------


def test_activation_flips_lower_accuracy_with_the_rate(int8_plain, digits_test_npz):
    rates = (1e-3, 1e-2, 3e-2)
    spec = "bitflip-act:0," + ",".join(f"{r:g}" for r in rates)
    rep = simulate(int8_plain, digits_test_npz, [spec], options=CampaignOptions(trials=8, seed=2)).report
    act = rep["activation_faults"]
    # The rewrite keeps ORT's QDQ fusion: clean outputs are bit-identical to the weight session's.
    assert act["opset"] == 18 and act["clean"]["logits_identical"] and act["clean"]["predictions_identical"]
    assert act["clean"]["accuracy"] == rep["clean"]["accuracy"]
    assert all(s["dtype"] in ("uint8", "int8") for s in act["sites"]) and len(act["sites"]) >= 4
    acc = [p["accuracy"]["mean"] for p in rep["points"]]
    assert acc[0] == rep["clean"]["accuracy"] and rep["points"][0]["sdc1"]["mean"] == 0.0
    assert np.all(np.diff(acc) < 0), acc
    assert acc[-1] < acc[0] - 0.05
    bits = act["bits_per_sample"] * rep["clean"]["samples"]
    for p, r in zip(rep["points"][1:], rates):
        assert p["session"] == "activations"
        assert abs(p["faulty_cells"]["mean"] - bits * r) < 5 * math.sqrt(bits * r / p["trials"])


def test_activation_faults_are_per_sample_and_reproducible(int8_plain, digits_test_npz):
    from harden.campaign import describe_trial as describe

    c = _campaign(int8_plain, digits_test_npz, ["bitflip-act:1e-3"], seed=9)
    act = c.activations
    act.batch = 64  # several batches, so masks are cut at batch boundaries
    faults = c.describe_trial(0, 1)
    assert faults == _campaign(int8_plain, digits_test_npz, ["bitflip-act:1e-3"], seed=9).describe_trial(0, 1)
    assert faults == describe(c.act_space, c.points[0], 9, 0, 1)
    assert faults != c.describe_trial(0, 2) and all(f.kind == "flip" and f.changes for f in faults)
    # The masks fed batch by batch are exactly the trial's faults, sample by sample.
    inj = c.injection(0, 1)
    dense = inj.apply({t.name: np.zeros(t.shape, t.dtype) for t in c.act_space.tensors})
    n = len(c.data)
    for start in range(0, n, 64):
        k = min(64, n - start)
        for s, m in ((s, act.masks(inj, start, k)[s.mask]) for s in act.sites):
            assert np.array_equal(m, dense[s.name][start:start + k])
    assert sum(int(np.unpackbits(d.view(np.uint8)).sum()) for d in dense.values()) == len(faults) == inj.cells
    # A fault in sample k's input changes sample k's output and no other.
    site = act.sites[0]
    k = 100
    e = site.elements
    flip = Injection((TensorFaults(site.name, np.arange(k * e, (k + 1) * e), flip=np.full(e, 0x80, np.uint8)),))
    diff = np.flatnonzero(np.any(act.logits(flip) != act.clean_logits, axis=1))
    assert diff.tolist() == [k]
    # Same seed, same campaign figures; the trial's figures match the campaign's.
    opts = CampaignOptions(trials=4, seed=9)
    a = c.run_point(0, opts).accuracy
    assert np.array_equal(a, _campaign(int8_plain, digits_test_npz, ["bitflip-act:1e-3"], seed=9).run_point(0, opts).accuracy)
    assert c.run_trial(0, 1).accuracy == a[1]


def test_activation_faults_without_labels_and_on_the_cli(int8_plain, digits, digits_test_npz, tmp_path):
    data = zoo.write_npz(tmp_path / "nolabels.npz", digits["x_test"])
    rep = simulate(int8_plain, data, ["bitflip-act:1e-2"], options=CampaignOptions(trials=3)).report
    p = rep["points"][0]
    assert rep["clean"]["reference"] == "agreement" and p["clean_accuracy"] == 1.0
    assert math.isclose(p["accuracy"]["mean"] + p["sdc1"]["mean"], 1.0, abs_tol=1e-6)
    argv = ["simulate", str(int8_plain), "--data", str(digits_test_npz), "--fault", "bitflip-act:1e-3", "--trials", "3",
            "--per-layer", "bitflip-act:1e-2"]
    r = CliRunner().invoke(main, argv + ["--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    j = json.loads(r.stdout)
    assert [e["kind"] for e in j["per_layer"]] == ["activation"] * len(j["activation_faults"]["sites"])
    assert all(e["label"].startswith("bitflip-act:0.01@") for e in j["per_layer"])
    t = CliRunner().invoke(main, argv + ["--show-trial", "0:0"])
    assert t.exit_code == 0 and "sample" in t.stdout and "flip" in t.stdout
    table = CliRunner().invoke(main, argv)
    assert "activation faults:" in table.stdout and "identical" in table.stdout and "per-layer" in table.stdout


def test_cli_per_layer_and_diagnostics(int8_plain, digits_test_npz):
    argv = ["simulate", str(int8_plain), "--data", str(digits_test_npz), "--per-layer", "stuckat:0.02",
            "--trials", "4", "--diagnostics", "--rho", "0.1"]
    runs = [CliRunner().invoke(main, argv + ["--json"]) for _ in range(2)]
    for r in runs:
        assert r.exit_code == 0, (r.output, r.exception)
    a, b = (json.loads(r.stdout) for r in runs)
    assert _strip_timing(a) == _strip_timing(b)
    assert a["points"] == [] and len(a["per_layer"]) == a["model"]["int8_tensors"]
    assert {"tensor", "op", "weights", "accuracy", "loss", "rank"} <= set(a["per_layer"][0])
    d = a["diagnostics"]
    assert d["sharpness"]["rho"] == 0.1 and d["sharpness"]["samples"] == 10
    assert {r["kind"] for r in d["activation_sparsity"]} == {"input"}
    table = CliRunner().invoke(main, argv)
    assert table.exit_code == 0
    for text in ("per-layer vulnerability", "rank", "activation sparsity", "sharpness (rho 0.1"):
        assert text in table.stdout
    only = CliRunner().invoke(main, ["simulate", str(int8_plain), "--data", str(digits_test_npz), "--diagnostics", "--json"])
    assert only.exit_code == 0 and json.loads(only.stdout)["diagnostics"]["sharpness"]["rho"] == 0.05


# --- bit flips in the float32 weights of a float model (bitflip-fp32) -------------------------


def _u32(values: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.ascontiguousarray(values[name], np.float32).reshape(-1).view(np.uint32)


def test_fp32_rate_zero_reproduces_the_clean_predictions(plain_cnn, digits_test_npz):
    from harden.data import top1

    c = _campaign(plain_cnn, digits_test_npz, ["bitflip-fp32:0"], seed=3)
    assert c.precision == "float" and c.kind_of(c.points[0]) == "fp32"
    ev, base = c.session("fp32")
    # The session with the weights as graph inputs predicts what the float model itself does.
    model = onnx.load(str(plain_cnn))
    ref = session(model).run(None, {"input": c.data.inputs["input"]})[0]
    assert np.array_equal(ev.clean, top1(ref)) and np.array_equal(ev.clean, c.clean_pred)
    np.testing.assert_allclose(ev.clean_logits, ref, rtol=1e-5, atol=1e-5)
    consumers = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [t.name for t in ev.space.weights] == consumers  # every weight, in order of first consumer
    assert all(t.dtype == np.float32 and t.bits == 32 for t in ev.space.weights)
    res = c.run_point(0, CampaignOptions(trials=5, seed=3))
    assert np.all(res.faulty_cells == 0) and np.all(res.sdc1_events == 0)
    assert np.all(res.accuracy == c.clean_accuracy)
    assert np.array_equal(c.session("fp32")[0].predictions(c.injection(0, 4)), c.clean_pred)


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_fp32_flips_lower_accuracy_with_the_rate(request, kind, digits_test_npz):
    model = request.getfixturevalue(f"{kind}_cnn")
    rates = (1e-5, 1e-4, 1e-3)
    rep = simulate(model, digits_test_npz, ["bitflip-fp32:0," + ",".join(f"{r:g}" for r in rates)],
                   options=CampaignOptions(trials=20, seed=1)).report
    assert rep["model"]["precision"] == "float" and rep["model"]["int8_weights"] == 0
    f = rep["fp32"]
    assert f["clean"]["predictions_identical"] and f["clean"]["accuracy"] == rep["clean"]["accuracy"] > 0.95
    assert f["prepared"] is False and f["weights"] == rep["model"]["float_weights"] and f["bits"] == 32 * f["weights"]
    acc = [p["accuracy"]["mean"] for p in rep["points"]]
    sdc = [p["sdc1"]["mean"] for p in rep["points"]]
    assert acc[0] == rep["clean"]["accuracy"] and sdc[0] == 0.0
    assert acc[0] >= acc[1] > acc[2] > acc[3] and acc[3] < 0.5, acc
    assert sdc[1] < sdc[2] < sdc[3], sdc
    for p, r in zip(rep["points"][1:], rates):
        assert p["session"] == "fp32" and p["label"] == f"bitflip-fp32:{r:g}"
        n = f["bits"] * r
        assert abs(p["faulty_cells"]["mean"] - n) < 5 * math.sqrt(n / p["trials"])
        assert 0.0 <= p["nan_outputs"]["mean"] <= p["nan_outputs"]["max"] <= 1.0
    # NaN logits count as wrong: a trial's accuracy is at most 1 - its NaN fraction.
    c = _campaign(model, digits_test_npz, ["bitflip-fp32:1e-2"], seed=1)
    r = c.run_trial(0, 0)
    assert r.nan_outputs > 0 and r.accuracy <= 1 - r.nan_outputs / len(c.data)


def test_nan_logits_are_a_class_of_their_own():
    from harden.data import NAN_CLASS, top1

    logits = np.array([[0.0, 2.0, 1.0], [np.nan, 5.0, 1.0], [1.0, np.inf, 2.0], [-np.inf] * 3, [np.inf, np.nan, 0.0]],
                      np.float32)
    assert top1(logits).tolist() == [1, NAN_CLASS, 1, 0, NAN_CLASS]
    assert top1(np.array([[1, 3], [2, 0]], np.int32)).tolist() == [1, 0]


def test_fp32_trials_are_deterministic_and_flip_exactly_the_listed_bits(residual_cnn, digits_test_npz):
    c = _campaign(residual_cnn, digits_test_npz, ["bitflip-fp32:1e-5", "bitflip-fp32:1e-4"], seed=4)
    opts = CampaignOptions(trials=6, seed=4)
    a = [c.run_point(p, opts) for p in (0, 1)]
    again = _campaign(residual_cnn, digits_test_npz, ["bitflip-fp32:1e-5", "bitflip-fp32:1e-4"], seed=4)
    b = [again.run_point(p, opts) for p in (1, 0)][::-1]  # another campaign, other order
    for x, y in zip(a, b):
        assert np.array_equal(x.accuracy, y.accuracy) and np.array_equal(x.faulty_cells, y.faulty_cells)
        assert np.array_equal(x.sdc1_events, y.sdc1_events)
    other = _campaign(residual_cnn, digits_test_npz, ["bitflip-fp32:1e-4"], seed=5)
    assert other.describe_trial(0, 0) != c.describe_trial(1, 0)

    ev = c.session("fp32")[0]
    model = onnx.load(str(residual_cnn))
    for trial in range(6):
        faults = c.describe_trial(1, trial)
        assert len(faults) == a[1].faulty_cells[trial] and all(f.kind == "flip" and f.changes for f in faults)
        assert faults == describe_trial(model, "bitflip-fp32:1e-4", 4, 1, trial)  # from the model file alone
        listed = {(f.tensor, f.index, f.bit) for f in faults}
        assert len(listed) == len(faults)
        faulty = c.injection(1, trial).apply(ev.values)
        changed = set()
        for name in ev.values:
            diff = _u32(ev.values, name) ^ _u32(faulty, name)
            for i in np.flatnonzero(diff):
                changed |= {(name, int(i), int(bit)) for bit in range(32) if (int(diff[i]) >> bit) & 1}
        assert changed == listed
    # The weights fed to the session are the model's own, and a trial without exponent flips
    # predicts what the model rebuilt with the faulty weights predicts.
    for name, v in ev.values.items():
        assert np.array_equal(v, numpy_helper_to_array(model, name))
    trial = next(t for t in range(50) if c.describe_trial(0, t) and all(f.bit < 23 for f in c.describe_trial(0, t)))
    faulty = c.injection(0, trial).apply(ev.values)
    for name, v in faulty.items():
        set_initializer(model, name, v)
    rebuilt = session(model).run(None, {"input": c.data.inputs["input"]})[0]
    np.testing.assert_allclose(ev.logits(faulty), rebuilt, rtol=1e-4, atol=1e-4)


def numpy_helper_to_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_fp32_on_the_cli_per_layer_and_show_trial(plain_cnn, digits_test_npz):
    argv = ["simulate", str(plain_cnn), "--data", str(digits_test_npz), "--fault", "bitflip-fp32:1e-4", "--trials", "4",
            "--per-layer", "bitflip-fp32:1e-3"]
    r = CliRunner().invoke(main, argv + ["--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    j = json.loads(r.stdout)
    assert [p["label"] for p in j["points"]] == ["bitflip-fp32:0.0001"]
    assert len(j["per_layer"]) == j["fp32"]["tensors"] and {e["op"] for e in j["per_layer"]} == {"Conv", "Gemm"}
    table = CliRunner().invoke(main, argv)
    assert table.exit_code == 0 and "float model:" in table.stdout and "NaN" in table.stdout
    t = CliRunner().invoke(main, argv[:6] + ["--show-trial", "0:1", "--json"])
    assert t.exit_code == 0
    rec = json.loads(t.stdout)["trial"]
    assert len(rec["faults"]) == rec["faulty_cells"] > 0 and all(0 <= f["bit"] < 32 for f in rec["faults"])


# --- gates at named fault points --------------------------------------------------------------


def test_gates_at_named_points(int8_plain, digits_test_npz, tmp_path):
    chip = tmp_path / "chip.bin"
    write_faultmap(generate_uniform(WeightSpace.from_model(onnx.load(str(int8_plain))).weight_count, 0.02, 1), chip)
    base = ["simulate", str(int8_plain), "--data", str(digits_test_npz), "--fault", "bitflip:1e-3,3e-2",
            "--faultmap", str(chip), "--trials", "10", "--seed", "2"]
    free = CliRunner().invoke(main, base + ["--json"])
    assert free.exit_code == 0 and "gates" not in json.loads(free.stdout)
    rep = json.loads(free.stdout)
    pts = {p["label"]: p for p in rep["points"]}
    clean = rep["clean"]["accuracy"]
    hi = pts["bitflip:0.03"]["accuracy"]
    lo_ci = hi["mean"] - hi["half_width"]

    # Passing gates: exit 0, every gate in the report, 'all' expands to every point.
    ok = ["--min-accuracy", "bitflip:0.001=0.5", "--min-accuracy", "chip:sim-1=0.1@ci", "--max-drop", "all=0.99",
          "--min-accuracy", f"bitflip:3e-2={lo_ci - 0.001:.6f}@ci"]
    out = tmp_path / "ok.json"
    r = CliRunner().invoke(main, base + ok + ["--report", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "gates: 6 passed, 0 failed" in r.stdout
    gates = json.loads(out.read_text())["gates"]
    assert [(g["point"], g["kind"], g["statistic"]) for g in gates] == [  # --min-accuracy ones first, as given
        ("bitflip:0.001", "min-accuracy", "mean"), ("chip:sim-1", "min-accuracy", "ci"),
        ("bitflip:0.03", "min-accuracy", "ci"),  # 3e-2 is read as the label it gives
        ("bitflip:0.001", "max-drop", "mean"), ("bitflip:0.03", "max-drop", "mean"), ("chip:sim-1", "max-drop", "mean"),
    ]
    by = {(g["point"], g["kind"], g["statistic"]): g for g in gates}
    assert by[("bitflip:0.001", "min-accuracy", "mean")]["value"] == pts["bitflip:0.001"]["accuracy"]["mean"]
    assert by[("chip:sim-1", "min-accuracy", "ci")]["value"] == pts["chip:sim-1"]["accuracy"]["mean"]  # exact: 1 trial
    assert math.isclose(by[("bitflip:0.03", "min-accuracy", "ci")]["value"], lo_ci, abs_tol=1e-6)
    assert math.isclose(by[("bitflip:0.03", "max-drop", "mean")]["value"], clean - hi["mean"], abs_tol=1e-6)
    assert all(g["passed"] and g["message"] is None and {"point", "kind", "threshold", "value", "passed"} <= set(g)
               for g in gates)

    # A failed gate: exit 1, one error line naming the point, its figure and the threshold; the
    # report and the page are written first, and --json still prints the report.
    bad = ["--max-drop", "bitflip:0.03=0.0001", "--min-accuracy", "bitflip:0.001=0.5"]
    out, html = tmp_path / "bad.json", tmp_path / "bad.html"
    pytest.importorskip("matplotlib")
    r = CliRunner().invoke(main, base + bad + ["--report", str(out), "--html", str(html), "--json"])
    assert r.exit_code == 1, (r.output, r.exception)
    lines = r.stderr.splitlines()
    assert lines == [f"error: gate failed: point bitflip:0.03 (#1): mean accuracy {hi['mean']:.4f} is "
                     f"{clean - hi['mean']:.4f} below fault-free {clean:.4f} (--max-drop bitflip:0.03=0.0001)"]
    j = json.loads(r.stdout)
    assert j == json.loads(out.read_text()) and "Gates" in html.read_text()
    assert [(g["kind"], g["passed"]) for g in j["gates"]] == [("min-accuracy", True), ("max-drop", False)]
    assert j["gates"][1]["value"] == round(clean - hi["mean"], 6) and j["gates"][1]["threshold"] == 0.0001
    # Several failures: still one line, with the count of the others.
    r = CliRunner().invoke(main, base + ["--min-accuracy", "all=1", "-q"])
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: gate failed: point bitflip:0.001 (#0): mean accuracy") and "(and 2 more failed gates)" in r.stderr


def test_gates_on_a_float_model_and_from_python(residual_cnn, digits_test_npz):
    from harden.gates import PointGate, failure_line

    gates = [PointGate.parse("min-accuracy", "bitflip-fp32:1e-5=0.5"), PointGate("max-drop", "all", 0.001, "ci")]
    assert gates[0].point == "bitflip-fp32:1e-05"  # a one-point spec is read as the label it gives
    rep = simulate(residual_cnn, digits_test_npz, ["bitflip-fp32:0,1e-5"], options=CampaignOptions(trials=8),
                   gates=gates).report
    g = rep["gates"]
    assert [(x["point"], x["passed"]) for x in g][:2] == [("bitflip-fp32:1e-05", True), ("bitflip-fp32:0", True)]
    assert g[2]["point"] == "bitflip-fp32:1e-05" and g[2]["value"] > 0.001 and not g[2]["passed"]
    assert failure_line(g).startswith("gate failed: point bitflip-fp32:1e-05 (#1): lower 95% bound of the accuracy")
    with pytest.raises(InputError, match="no point is labelled"):
        simulate(residual_cnn, digits_test_npz, ["bitflip-fp32:0"], gates=[PointGate("min-accuracy", "bitflip:0.001", 0.5)])


def test_a_fault_model_must_subclass_the_base(monkeypatch):
    """The protocol lives in faults.FaultModel (issue 10): a duck-typed model is refused, once,
    clearly, instead of failing deep inside a campaign."""
    from harden import faults

    class Duck:
        name, deterministic = "duck", True

    monkeypatch.setattr(faults, "_REGISTRY", dict(faults._REGISTRY))
    register_fault_model("duck", lambda args: [Duck()])
    with pytest.raises(InputError, match="does not subclass harden.faults.FaultModel"):
        faults.parse_fault_spec("duck:1")
    base = faults.FaultModel()
    assert (base.space_kind, base.precision, base.deterministic, base.restrictable) == ("weights", "int8", False, False)
    assert faults.BitFlip.from_spec("1e-3")[0].restrictable


def test_budget_bounds_the_campaign_and_the_report_says_so(int8_plain, digits_test_npz):
    """Issue 12: --budget SECONDS shares the time over the points; each stops at a check once
    its share is spent (never below min_trials), and the report and table say which did."""
    import time

    from harden.cli.simulate_cmd import campaign_table

    opts = CampaignOptions(trials=100_000, budget=2.0, seed=1)
    t0 = time.perf_counter()
    res = simulate(int8_plain, digits_test_npz, ["bitflip:1e-3,1e-2"], options=opts)
    assert time.perf_counter() - t0 < 2.0 + 15  # the budget plus building the sessions, on a loaded machine
    points = res.report["points"]
    assert all(p["stopped_by_budget"] and opts.min_trials <= p["trials"] < 100_000 for p in points)
    assert all(p["trials"] % opts.check_every == 0 for p in points)
    assert "stopped by --budget 2 s" in campaign_table(res.report)
    with pytest.raises(InputError, match="--budget"):
        CampaignOptions(budget=-1).validate()
