"""Fleets and campaigns beyond one machine (issue 13): Dask, streamed, resumable.

Each cluster is real: a `dask scheduler` on 127.0.0.1 and two single-threaded `dask worker`
processes (no nanny, so a killed worker stays dead), started by the fixture and stopped after.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harden.campaign import CampaignOptions, simulate
from harden.errors import InputError, OutputError
from harden.faultmap import generate_uniform, write_faultmap
from harden.fleet import JOURNAL_DIR, apply_fleet
from harden.memory import weight_count
from harden.pipeline import ApplyOptions

distributed = pytest.importorskip("distributed")

OPTS = ApplyOptions(trials=0, clip_percentile=100.0)
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_cluster(workers: int = 2):
    """(address, worker processes) of a scheduler and `workers` workers on 127.0.0.1."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", "127.0.0.1:0"], **quiet)]
    try:
        worker_procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                          "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"], **quiet)
                        for _ in range(workers)]
        procs += worker_procs
        with distributed.Client(address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)
        yield address, worker_procs
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster():
    with loopback_cluster(2) as (address, _):
        yield address


@pytest.fixture()
def chips(tmp_path, residual_cnn):
    folder = tmp_path / "chips"
    folder.mkdir()
    n = weight_count(residual_cnn)
    for seed in range(1, 7):
        write_faultmap(generate_uniform(n, 0.02 * (1 + seed % 3), seed, {"chip_id": f"chip{seed}"}), folder / f"m{seed}.bin")
    return folder


TIMING_KEYS = {"seconds", "timings", "faq", "jobs", "cluster"}


def comparable(obj):
    """A report without timings, worker counts and output folders: what must not change."""
    if isinstance(obj, dict):
        return {k: (Path(v).name if k in ("output", "path") and isinstance(v, str) else comparable(v))
                for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def test_fleet_on_a_cluster_equals_one_process(tmp_path, cluster, residual_cnn, digits_calib_npz, digits_test_npz, chips):
    one = apply_fleet(residual_cnn, [chips], digits_calib_npz, tmp_path / "one", eval_data_path=digits_test_npz, options=OPTS, jobs=1)
    dask = apply_fleet(residual_cnn, [chips], digits_calib_npz, tmp_path / "dask", eval_data_path=digits_test_npz, options=OPTS,
                       cluster=cluster, report_path=tmp_path / "dask.json")
    assert comparable(dask) == comparable(one)
    assert dask["cluster"] == {"address": cluster}
    for c in one["chips"]:
        assert (tmp_path / "dask" / f"{c['chip']}.onnx").read_bytes() == (tmp_path / "one" / f"{c['chip']}.onnx").read_bytes()
    assert json.loads((tmp_path / "dask.json").read_text())["fleet"] == dask["fleet"]


def test_float_campaign_on_a_cluster_equals_one_process(cluster):
    """Blocks of trials on two workers (the fp32 side session): the same figures."""
    model, data = ROOT / "samples/model.onnx", ROOT / "samples/test.npz"
    opts = CampaignOptions(trials=12, seed=3)
    a = simulate(model, data, ["bitflip-fp32:1e-4,1e-3"], options=opts)
    b = simulate(model, data, ["bitflip-fp32:1e-4,1e-3"], options=opts, cluster=cluster)
    assert comparable(a.report) == comparable(b.report)
    assert a.report["points"][1]["accuracy"]["mean"] < a.report["clean"]["accuracy"]


def test_int8_campaign_on_a_cluster_equals_one_process(tmp_path, cluster, residual_cnn, digits_calib_npz, digits_test_npz, chips):
    fleet = apply_fleet(residual_cnn, [chips], digits_calib_npz, tmp_path / "h", eval_data_path=digits_test_npz, options=OPTS, jobs=1)
    int8 = Path(fleet["chips"][0]["output"])
    opts = CampaignOptions(trials=40, margin=0.02, seed=1)
    points = ["bitflip:1e-3,1e-2", "bitflip-bias:1e-3", "stuckat:0.04"]
    a = simulate(int8, digits_test_npz, points, options=opts, per_layer="bitflip:1e-2")
    b = simulate(int8, digits_test_npz, points, options=opts, per_layer="bitflip:1e-2", cluster=cluster)
    assert comparable(a.report) == comparable(b.report)
    assert any(p.stopped_early for p in a.result.points), "the margin must stop some point for the test to mean anything"


def test_a_killed_worker_costs_only_its_tasks(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz, chips):
    one = apply_fleet(residual_cnn, [chips], digits_calib_npz, tmp_path / "one", eval_data_path=digits_test_npz, options=OPTS, jobs=1)
    with loopback_cluster(2) as (address, workers):
        killed = []

        def on_chip(_name):
            if not killed:
                workers[0].send_signal(signal.SIGKILL)
                killed.append(True)

        rep = apply_fleet(residual_cnn, [chips], digits_calib_npz, tmp_path / "dask", eval_data_path=digits_test_npz,
                          options=OPTS, cluster=address, on_chip=on_chip)
        assert workers[0].wait(timeout=30) == -signal.SIGKILL
    assert comparable(rep) == comparable(one)
    assert sorted(p.name for p in (tmp_path / "dask").glob("*.onnx")) == sorted(f"{c['chip']}.onnx" for c in one["chips"])


def test_an_interrupted_fleet_resumes_and_ends_as_an_uninterrupted_one(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz, chips):
    full = apply_fleet(residual_cnn, [chips], digits_calib_npz, tmp_path / "full", eval_data_path=digits_test_npz, options=OPTS, jobs=1)
    out = tmp_path / "resumed"
    done: list[str] = []

    def stop_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz, options=OPTS, jobs=1,
                    report_path=tmp_path / "r.json", on_chip=stop_after_two)
    assert len(list(out.glob("*.onnx"))) == 2 and not (tmp_path / "r.json").exists()
    again: list[str] = []
    rep = apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz, options=OPTS, jobs=2,
                      report_path=tmp_path / "r.json", on_chip=again.append)
    assert sorted(again + done) == sorted(c["chip"] for c in full["chips"])  # every chip once
    assert rep["timings"]["resumed_chips"] == 2
    assert comparable(rep) == comparable(full)
    for c in full["chips"]:
        assert (out / f"{c['chip']}.onnx").read_bytes() == (tmp_path / "full" / f"{c['chip']}.onnx").read_bytes()
    # A changed input (another seed) invalidates the journal: everything runs again.
    again.clear()
    apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz,
                options=ApplyOptions(trials=0, clip_percentile=100.0, seed=5), jobs=1, on_chip=again.append)
    assert len(again) == len(full["chips"])
    assert len(list((out / JOURNAL_DIR).glob("*.json"))) == len(full["chips"])


def test_a_tampered_output_is_redone(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz, chips):
    out = tmp_path / "o"
    apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz, options=OPTS, jobs=1)
    victim = sorted(out.glob("*.onnx"))[0]
    victim.write_bytes(b"not a model")
    again: list[str] = []
    apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz, options=OPTS, jobs=1, on_chip=again.append)
    assert again == [victim.stem]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_a_denied_folder_is_one_clear_error(tmp_path, residual_cnn, digits_calib_npz, chips):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write"):
            apply_fleet(residual_cnn, [chips], digits_calib_npz, out, options=OPTS, jobs=1)
    finally:
        out.chmod(0o700)


@pytest.mark.parametrize("code", ["ENOSPC", "EACCES"])
def test_a_refused_write_is_one_clear_error_and_keeps_finished_chips(tmp_path, residual_cnn, digits_calib_npz, digits_test_npz,
                                                                      chips, monkeypatch, code):
    """The disk fills up (or permission goes) at the third chip's write: an exit-2 error naming the
    file, chips 1 and 2 intact, no temp file left; a rerun once the disk has room finishes."""
    import errno

    import harden.fileio as fileio

    real = fileio.atomic_path
    onnx_writes = []

    @contextlib.contextmanager
    def refusing(path):
        if str(path).endswith(".onnx"):
            onnx_writes.append(path)
            if len(onnx_writes) == 3:
                raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        with real(path) as tmp:
            yield tmp

    monkeypatch.setattr(fileio, "atomic_path", refusing)
    out = tmp_path / "full"
    with pytest.raises(OutputError, match=os.strerror(getattr(errno, code))) as info:
        apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz, options=OPTS, jobs=1)
    assert info.value.exit_code == 2 and ".onnx" in str(info.value)
    written = sorted(out.glob("*.onnx"))
    assert len(written) == 2 and all(p.stat().st_size > 1000 for p in written)
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(fileio, "atomic_path", real)
    again: list[str] = []
    rep = apply_fleet(residual_cnn, [chips], digits_calib_npz, out, eval_data_path=digits_test_npz, options=OPTS, jobs=1,
                      on_chip=again.append)
    assert len(again) == len(rep["chips"]) - 2


def test_cluster_address_checks(monkeypatch, residual_cnn, digits_calib_npz, chips, tmp_path):
    from harden.cluster import cluster_address

    monkeypatch.delenv("HARDEN_CLUSTER", raising=False)
    assert cluster_address(None) is None
    monkeypatch.setenv("HARDEN_CLUSTER", "local")
    assert cluster_address(None) == "local"
    assert cluster_address("tcp://127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    with pytest.raises(InputError, match="scheduler address"):
        cluster_address("not an address")
    port = _free_port()  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        apply_fleet(residual_cnn, [chips], digits_calib_npz, tmp_path / "x", options=OPTS, cluster=f"tcp://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 120
