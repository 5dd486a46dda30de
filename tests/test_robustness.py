"""Robustness of `harden apply` beyond the bad-input matrix (tests/test_apply_errors.py).

- a fault map cut at every offset, or with any byte flipped, fed to the real command: exit 2,
  one `error:` line, no output file and no temp file;
- Ctrl-C (SIGINT) at several points of a real run: exit 130, one `error: interrupted` line,
  and no partial output (all outputs or none; no temp file);
- determinism: two runs in two processes give byte-identical models, and reports and Markdown
  summaries that differ only in their timing fields;
- `--summary-md`: content, written with the other outputs (also when a gate fails), refused
  when it names an input or another output.
"""

from __future__ import annotations

import json
import os
import platform
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import harden.passes.prepare
import harden.pipeline
from harden.cli import main
from harden.errors import InputError
from harden.faultmap import FaultMap, from_bytes, to_bytes
from harden.fileio import atomic_write_many, deferred_signals


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, plain_cnn, digits_calib_npz) -> Path:
    """model.onnx, calib.npz and a small valid chip.bin (a few records, so every byte is cheap)."""
    d = tmp_path_factory.mktemp("robust_in")
    shutil.copyfile(plain_cnn, d / "model.onnx")
    shutil.copyfile(digits_calib_npz, d / "calib.npz")
    fm = FaultMap(num_words=4096, addresses=np.array([5, 77, 1000, 4095], dtype=np.uint64),
                  sa0=np.array([0x01, 0x80, 0x00, 0x30], dtype=np.uint8),
                  sa1=np.array([0x02, 0x00, 0x41, 0x00], dtype=np.uint8), meta={"chip_id": "r-1"})
    (d / "chip.bin").write_bytes(to_bytes(fm))
    return d


def _argv(d: Path, out: Path, faultmap: Path | None = None) -> list[str]:
    return ["apply", str(d / "model.onnx"), "--faultmap", str(faultmap or d / "chip.bin"),
            "--data", str(d / "calib.npz"), "-o", str(out / "m.onnx"), "--report", str(out / "r.json"),
            "--summary-md", str(out / "s.md")]


class _Tripwire(Exception):
    pass


def _no_work(monkeypatch) -> None:
    def tripwire(model):
        raise _Tripwire("work started before the inputs were checked")

    monkeypatch.setattr(harden.passes.prepare, "prepare", tripwire)


# --- fault maps cut or flipped at every offset, through the CLI ------------------------------


def _mutants(good: bytes):
    for cut in range(len(good)):
        yield f"cut at {cut}", good[:cut]
    for i in range(len(good)):
        flipped = bytearray(good)
        flipped[i] ^= 0xFF
        yield f"byte {i} flipped", bytes(flipped)


def test_every_truncation_and_flipped_byte_of_the_faultmap_is_refused_by_apply(inputs, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    good = (inputs / "chip.bin").read_bytes()
    bad = tmp_path / "bad.bin"
    out = tmp_path / "out"
    out.mkdir()
    runner = CliRunner()
    checked = accepted = 0
    for what, data in _mutants(good):
        try:
            from_bytes(data)
        except InputError:
            pass
        else:  # e.g. num_words changed and still above every address: a valid map, read exactly
            assert to_bytes(from_bytes(data)) == data
            accepted += 1
            continue
        bad.write_bytes(data)
        result = runner.invoke(main, _argv(inputs, out, bad))
        assert result.exit_code == 2, (what, result.exit_code, result.output, result.exception)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), (what, result.stderr)
        assert "Traceback" not in result.output
        assert os.listdir(out) == [], (what, os.listdir(out))
        assert sorted(os.listdir(tmp_path)) == ["bad.bin", "out"]
        checked += 1
    assert checked >= 2 * len(good) - 16 and accepted <= 16, (checked, accepted)


# --- SIGINT -----------------------------------------------------------------------------------


def _run_until_stage(cmd: list[str], cwd: Path, stage: str, timeout: float = 120) -> tuple[int, str]:
    """Run `cmd` with stderr on a pseudo-terminal (so apply shows its stage lines), send SIGINT
    once it prints `... <stage>`, and return (exit code, everything it printed on stderr)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "HARDEN_DEBUG"}
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    buf, sent = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                buf += chunk
            if not sent and f"... {stage}".encode() in buf:
                proc.send_signal(signal.SIGINT)
                sent = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert sent, f"never saw stage {stage!r}: {buf.decode(errors='replace')}"
    return code, buf.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.parametrize("stage", ["simplify", "quantize", "faq", "write"])
def test_sigint_mid_run_leaves_no_partial_output(stage, inputs, tmp_path, digits_test_npz):
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "harden"] + _argv(inputs, out) + ["--eval-data", str(digits_test_npz)]
    code, err = _run_until_stage(cmd, tmp_path, stage)
    files = sorted(os.listdir(out))
    assert not [f for f in files if f.startswith(".") or f.endswith(".tmp")], files
    if stage == "write" and code == 0:
        # Ctrl-C came after the last rename: the run had finished.
        assert files == ["m.onnx", "r.json", "s.md"]
        return
    assert code == 130, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert errors == ["error: interrupted"], err
    # all or nothing: an interrupt that lands during the renames is held back until they are done
    assert files in ([], ["m.onnx", "r.json", "s.md"]), files
    if stage != "write":
        assert files == []


def test_outputs_are_renamed_as_one_step_under_sigint(tmp_path):
    """SIGINT during atomic_write_many's renames is delivered only after the last one."""
    targets = [tmp_path / f"f{i}" for i in range(3)]
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    import harden.fileio as fileio

    orig = fileio.os.replace
    fileio.os.replace = replace_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_many([(t, b"x") for t in targets])
    finally:
        fileio.os.replace = orig
    assert sorted(os.listdir(tmp_path)) == ["f0", "f1", "f2"]


def test_a_failure_before_the_renames_leaves_nothing(tmp_path):
    def items():
        yield tmp_path / "a", b"1"
        yield tmp_path / "b", b"2"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_many(items())
    assert os.listdir(tmp_path) == []


def test_deferred_signals_restores_the_handler():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs; nothing is raised yet
            reached = True
    assert reached
    assert signal.getsignal(signal.SIGINT) is before


# --- absurd declared sizes are refused before anything is allocated ---------------------------


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("num_records, meta_len", [(2**62, 2), (2**64 - 1, 2), (1, 2**32 - 1)])
def test_absurd_faultmap_counts_allocate_nothing(num_records, meta_len):
    good = bytearray(to_bytes(FaultMap(2**64 - 1, np.array([3], np.uint64), np.array([1], np.uint8),
                                       np.array([0], np.uint8))))
    import struct

    struct.pack_into("<QI", good, 16, num_records, meta_len)
    assert _peak_bytes(lambda: from_bytes(bytes(good))) < 1 << 20


def test_absurd_npy_shape_allocates_nothing(tmp_path, inputs):
    import io
    import zipfile

    import onnx

    from harden.data import load_npz

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 34, 1, 8, 8)})
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("input.npy", header.getvalue() + bytes(64))
    model = onnx.load(str(inputs / "model.onnx"))
    assert _peak_bytes(lambda: load_npz(tmp_path / "x.npz", model)) < 1 << 20


# --- what the fuzzing runs found (docs/robustness.md), kept as regression tests ---------------


def test_csv_line_with_a_control_character_is_one_input_error(tmp_path):
    """numpy and Python's \\s take \\x1f as a blank, int() does not: looking for the bad line
    (line 4 here) once raised ValueError on line 3."""
    from harden.faultmap import read_faultmap

    p = tmp_path / "f.csv"
    p.write_bytes(b"address,bit,stuck\n1,1,1\n5 , 1\x1f , 1\n\x00\x01\n")
    with pytest.raises(InputError, match=r"line 4: expected three integers"):
        read_faultmap(p, num_words=4096)
    p.write_bytes(b"address,bit,stuck\n1,1,1\n5 , 1\x1f , 1\n")
    assert read_faultmap(p, num_words=4096).num_records == 2


def test_npy_header_that_does_not_tokenize_is_one_input_error(tmp_path, inputs):
    """numpy parses .npy headers with tokenize, which raises TokenError (not ValueError)."""
    import struct
    import zipfile

    import onnx

    from harden.data import load_npz

    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as z:
        z.writestr("input.npy", npy)
    with pytest.raises(InputError, match=r"bad \.npy header in member 'input.npy'"):
        load_npz(tmp_path / "x.npz", onnx.load(str(inputs / "model.onnx")))


# --- determinism ------------------------------------------------------------------------------

TIMING_KEYS = {"seconds", "timings"}


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _strip_md_timing(text: str) -> str:
    """Blank the seconds column of the passes table and the total time."""
    lines, in_passes = [], False
    for line in text.splitlines():
        if line.startswith("| pass | seconds |"):
            in_passes = True
        elif not line.startswith("|"):
            in_passes = False
        elif in_passes and not line.startswith("|---"):
            cells = line.split(" | ")
            line = " | ".join([cells[0], "-"] + cells[2:])
        lines.append(line)
    return re.sub(r"[0-9.]+ s in all", "- s in all", "\n".join(lines))


def test_two_runs_are_byte_identical_apart_from_timing(inputs, tmp_path, digits_test_npz):
    """Two processes (different hash seeds), same inputs and seed: same bytes."""
    runs = []
    for i in (1, 2):
        d = tmp_path / f"run{i}"
        shutil.copytree(inputs, d)
        shutil.copyfile(digits_test_npz, d / "test.npz")
        env = {k: v for k, v in os.environ.items() if k != "HARDEN_DEBUG"}
        env["PYTHONHASHSEED"] = str(i)
        cmd = [sys.executable, "-m", "harden", "apply", "model.onnx", "--faultmap", "chip.bin", "--data", "calib.npz",
               "--eval-data", "test.npz", "-o", "m.onnx", "--report", "r.json", "--summary-md", "s.md", "--seed", "3",
               "--quiet"]
        proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        runs.append(d)
    a, b = runs
    assert (a / "m.onnx").read_bytes() == (b / "m.onnx").read_bytes()
    ra, rb = (json.loads((d / "r.json").read_text()) for d in runs)
    assert "seconds" in ra and all("seconds" in p for p in ra["passes"] if not p.get("skipped"))
    assert _strip_timing(ra) == _strip_timing(rb)
    assert _strip_md_timing((a / "s.md").read_text()) == _strip_md_timing((b / "s.md").read_text())


# --- --summary-md -----------------------------------------------------------------------------


def _table(md: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with `header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    assert re.fullmatch(r"\|(-+:?\|)+", lines[start + 1].replace("---:", "---")), lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


@pytest.fixture(scope="module")
def gated_run(inputs, tmp_path_factory):
    """One apply run with both gates (--max-drop 0 fails whenever hardening loses anything)."""
    out = tmp_path_factory.mktemp("gated")
    result = CliRunner().invoke(main, _argv(inputs, out) + ["--quiet", "--min-accuracy", "0.5", "--max-drop", "0"])
    return result, out


def test_summary_md_holds_the_figures_and_is_written_when_a_gate_fails(gated_run):
    result, out = gated_run
    report = json.loads((out / "r.json").read_text())
    acc = report["results"]["accuracy"]
    failed_drop = acc["int8"] - acc["hardened_on_chip"] > 0
    assert result.exit_code == (1 if failed_drop else 0), (result.output, result.exception)
    assert sorted(os.listdir(out)) == ["m.onnx", "r.json", "s.md"]
    md = (out / "s.md").read_text()
    assert md.startswith("### harden: `model.onnx` on chip `r-1`")
    accs = dict(_table(md, "| model | accuracy |"))
    assert accs["hardened on this chip"] == f"**{100 * acc['hardened_on_chip']:.2f}%**"
    assert accs["int8 on this chip"] == f"{100 * acc['int8_on_chip']:.2f}%"
    gates = _table(md, "| gate |")
    assert [g[0].split()[0] for g in gates] == ["`--min-accuracy`", "`--max-drop`"]
    assert gates[0][3] == "pass" and gates[1][3] == ("**FAIL**" if failed_drop else "pass")
    assert ("Gates: **FAILED**" in md) == failed_drop
    chip = _table(md, "| chip |")
    assert chip[0][1:5] == ["4096", "7", f"{report['inputs']['faultmap']['rate']:.4f}", "4"]
    passes = _table(md, "| pass |")
    assert [p[0] for p in passes] == [p["pass"] for p in report["passes"]]
    assert all(re.fullmatch(r"\d+\.\d\d", p[1]) for p in passes)
    assert report["output"]["sha256"][:16] in md


def test_summary_md_escapes_table_cells(gated_run):
    from harden.report.markdown import summary_markdown

    report = json.loads((gated_run[1] / "r.json").read_text())
    report["inputs"]["faultmap"]["chip_id"] = "a|b\nc`d"
    md = summary_markdown(report)
    assert "`a\\|b c'd`" in md
    assert "Gates: no gates given." in md


@pytest.mark.parametrize("target", ["data", "output", "report"])
def test_summary_md_may_not_name_an_input_or_another_output(target, inputs, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    argv = _argv(inputs, out)
    where = {"data": inputs / "calib.npz", "output": out / "m.onnx", "report": out / "r.json"}[target]
    argv[argv.index("--summary-md") + 1] = str(where)
    before = (inputs / "calib.npz").read_bytes()
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.match(r"error: output path .* (is the input|is also another output)", lines[0]), lines
    assert os.listdir(out) == []
    assert (inputs / "calib.npz").read_bytes() == before


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_low_memory_sets_glibc_malloc_unless_the_user_did():
    """harden.allocator: set with HARDEN_LOW_MEMORY=1, left alone without it or when MALLOC_* is
    in the environment."""
    code = "from harden.allocator import tune_allocator; print(tune_allocator())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "HARDEN_LOW_MEMORY"}

    def run(e):
        return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout.strip()

    assert run(env) == "False"
    assert run({**env, "HARDEN_LOW_MEMORY": "1"}) == "True"
    assert run({**env, "HARDEN_LOW_MEMORY": "1", "MALLOC_ARENA_MAX": "4"}) == "False"
