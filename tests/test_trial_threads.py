"""Trials on threads (harden/campaign/parallel.py): the figures of one thread, the groups really
run side by side on one-thread sessions, and a point that stops early leaves no work behind."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import onnx
import pytest

from harden import runtime
from harden.campaign import Campaign, CampaignOptions, ThreadTrials, simulate
from harden.data import load_npz
from harden.errors import InputError
from harden.faults import parse_fault_spec


@pytest.fixture(scope="module")
def campaign(int8_residual, digits_test_npz):
    model = onnx.load(str(int8_residual))
    return Campaign(model, load_npz(digits_test_npz, model), parse_fault_spec("bitflip:1e-2") + parse_fault_spec("stuckat:0.04"), seed=3)


def _figures(result):
    return [(p.trials, p.stopped_early, p.accuracy.tolist(), p.sdc1_events.tolist(), p.faulty_cells.tolist(), p.nan_outputs.tolist())
            for p in result.points]


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, int | None]]:
    """(thread name, its sessions' onnxruntime threads) of every Campaign.run_trials call."""
    seen: list[tuple[str, int | None]] = []
    run_trials = Campaign.run_trials

    def spy(self, *args, **kw):
        seen.append((threading.current_thread().name, getattr(runtime._LOCAL, "threads", None)))
        return run_trials(self, *args, **kw)

    monkeypatch.setattr(Campaign, "run_trials", spy)
    return seen


def _one_then_two_threads(campaign, opts, calls, passes: int, both: bool = True) -> None:
    """The campaign on this thread, then on two trial threads: the same figures (which vary),
    and the second run's `passes` Campaign.run_trials calls all on trial threads, whose
    sessions take one onnxruntime thread (`both`: on both of them)."""
    calls.clear()
    one = campaign.run(opts, jobs=1)
    assert {name for name, _ in calls} == {threading.current_thread().name}
    calls.clear()
    two = campaign.run(opts, jobs=2)
    assert _figures(two) == _figures(one)
    assert np.std(one.points[0].accuracy) > 0
    assert len(calls) == passes and all(name.startswith("harden-trials") and threads == 1 for name, threads in calls)
    if both:
        assert len({name for name, _ in calls}) == 2


def test_threads_give_the_figures_of_one_thread(campaign, calls):
    k = campaign.stack_of(0)
    assert k > 1
    _one_then_two_threads(campaign, CampaignOptions(trials=3 * k + 1, seed=3), calls, 8)  # 4 groups a point


def test_early_stopping_on_threads_stops_at_the_same_trial(campaign):
    opts = CampaignOptions(trials=400, margin=0.02, min_trials=20, check_every=5, seed=3)
    one = campaign.run(opts, jobs=1)
    two = campaign.run(opts, jobs=2)
    assert _figures(two) == _figures(one)
    assert any(p.stopped_early and p.trials < 400 for p in one.points)


def test_a_point_out_of_time_leaves_no_trial_running(campaign, monkeypatch):
    started, finished = [], []
    run_trials = Campaign.run_trials

    def spy(self, point, a, b, planned):
        started.append(a)
        try:
            return run_trials(self, point, a, b, planned)
        finally:
            finished.append(a)

    monkeypatch.setattr(Campaign, "run_trials", spy)
    opts = CampaignOptions(trials=400, min_trials=5, check_every=5, seed=3)
    with ThreadTrials(2) as threads:
        res = campaign.run_point(0, opts, executor=threads, deadline=time.perf_counter())
        # stopped at the first check; the groups not started were cancelled, the running ones awaited
        assert res.stopped_by_budget and res.trials == 5
        assert sorted(started) == sorted(finished) and len(started) < 400 // campaign.stack_of(0, 400)
    assert not [t for t in threading.enumerate() if t.name.startswith("harden-trials")]
    assert res.trials == campaign.run_point(0, opts, jobs=1, deadline=time.perf_counter()).trials


def test_simulate_report_does_not_depend_on_jobs(int8_residual, digits_test_npz):
    def report(jobs):
        rep = simulate(int8_residual, digits_test_npz, ["bitflip:1e-3,1e-2"], options=CampaignOptions(trials=40, seed=1), jobs=jobs).report
        drop = {"seconds"}
        for p in rep["points"]:
            p.pop("seconds", None)
        return json.dumps({k: v for k, v in rep.items() if k not in drop}, sort_keys=True)

    assert report(1) == report(2)
    with pytest.raises(InputError, match="jobs"):
        ThreadTrials(0)


def test_fed_trials_run_one_per_thread_with_the_figures_of_one_thread(mlp_matmul, tabular_calib_npz, tmp_path, calls):
    """An unstackable MatMul graph (the transformer case) feeds its trials' weights to a session:
    on trial threads each thread runs whole trials on a one-thread session of its own, and the
    figures (int8 and float32 bit flips) are those of one thread on the default session."""
    from conftest import quantize_zoo_model

    q = onnx.load(str(quantize_zoo_model(mlp_matmul, tabular_calib_npz, tmp_path / "q.onnx")))
    float_model = onnx.load(str(mlp_matmul))
    for model, spec in ((q, "bitflip:1e-3"), (float_model, "bitflip-fp32:1e-3")):
        c = Campaign(model, load_npz(tabular_calib_npz, model), parse_fault_spec(spec), seed=3)
        assert c.stack_of(0) == 1 and c.fed(0)
        # a pass per trial; the pool starts its second thread only when the first is busy, and
        # this MLP's trials are too quick for that to be sure
        _one_then_two_threads(c, CampaignOptions(trials=12, seed=3), calls, 12, both=False)
