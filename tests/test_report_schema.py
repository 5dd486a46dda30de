"""The JSON Schema of harden.report/1 (harden/schemas/report-1.schema.json) describes every
report harden writes: apply, a fleet, quantize, simulate (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harden.campaign import CampaignOptions, simulate
from harden.fleet import apply_fleet
from harden.pipeline import ApplyOptions, apply, quantize
from harden.report import json_schema

jsonschema = pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parent.parent
S = ROOT / "samples"


@pytest.fixture(scope="module")
def validator():
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reports")
    out = {"apply": apply(S / "model.onnx", S / "chip.bin", S / "calib.npz", tmp / "h.onnx", eval_data_path=S / "test.npz",
                          options=ApplyOptions(trials=3)).report,
           "apply-held-out": apply(S / "model.onnx", S / "chip.bin", S / "calib.npz", tmp / "h2.onnx",
                                   options=ApplyOptions(trials=0, clip_percentile=100.0)).report,
           "quantize": quantize(S / "model.onnx", S / "calib.npz", tmp / "q.onnx", options=ApplyOptions(clip_percentile=100.0)).report,
           "apply-fleet": apply_fleet(S / "model.onnx", [S / "chip.bin"], S / "calib.npz", tmp / "fleet",
                                      options=ApplyOptions(trials=0, clip_percentile=100.0), jobs=1)}
    out["simulate"] = simulate(tmp / "q.onnx", S / "test.npz", ["bitflip:1e-3"], [S / "chip.bin"],
                               CampaignOptions(trials=3)).report
    return {k: json.loads(json.dumps(v)) for k, v in out.items()}


@pytest.mark.parametrize("kind", ["apply", "apply-held-out", "quantize", "apply-fleet", "simulate"])
def test_every_report_validates(validator, reports, kind):
    errors = sorted(validator.iter_errors(reports[kind]), key=lambda e: e.path)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def test_the_schema_catches_a_broken_report(validator, reports):
    bad = json.loads(json.dumps(reports["apply"]))
    bad["results"]["accuracy"]["hardened_on_chip"] = 1.7
    del bad["results"]["arithmetic"]
    messages = [e.message for e in validator.iter_errors(bad)]
    assert any("1.7" in m for m in messages) and any("arithmetic" in m for m in messages)
    bad = json.loads(json.dumps(reports["apply-fleet"]))
    bad["schema"] = "harden.report/2"
    assert not validator.is_valid(bad)


def test_the_schema_ships_with_the_package():
    import harden

    path = Path(harden.__file__).parent / "schemas" / "report-1.schema.json"
    assert path.is_file() and json.loads(path.read_text())["title"] == "harden.report/1"
    assert "schemas/*.json" in (ROOT / "pyproject.toml").read_text()
