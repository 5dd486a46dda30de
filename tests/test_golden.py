"""Behaviour unchanged (issue 10): apply on the samples gives the golden model bytes and report,
timings and host-dependent fields aside (tests/golden.py)."""

from __future__ import annotations

import json

import golden
import pytest


@pytest.mark.parametrize("label", list(golden.cases()))
def test_apply_matches_the_golden_run(label):
    want = json.loads(golden.GOLDEN.read_text())[label]
    got = json.loads(json.dumps(golden.run(label)))
    assert got["report"] == want["report"]
    assert got["model_sha256"] == want["model_sha256"]
