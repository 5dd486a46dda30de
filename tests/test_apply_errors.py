"""The bad-input matrix of `harden apply`.

Every case starts from one valid set of inputs (the plain digits CNN, its calibration .npz and
a valid HFM1 fault map) and breaks exactly one thing. Each must end with exit code 2 and one
line on stderr that starts with ``error:`` and names the problem; no traceback; and no output
model, no report and no stray temp file left behind (DESIGN.md: CLI and exit codes, write).

Bad fault maps are made by editing bytes of a valid file; the CRC is fixed up afterwards
wherever the case is not about the CRC, so that the intended rule is the one that fails.

Inputs are checked before any work starts, so apart from the cases marked ``runs_pipeline``
every case must fail before the model is simplified: the in-process tests replace
``harden.passes.prepare.prepare`` (the first pass of the plan) with a tripwire to prove it (and to keep this file fast).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import harden.passes.prepare
import harden.pipeline
from harden.cli import main
from harden.faultmap import HEADER_SIZE, generate_uniform, read_faultmap, write_faultmap
from harden.memory import weight_count

MODEL, FAULTMAP, DATA = "model.onnx", "chip.bin", "calib.npz"
OUT_MODEL, OUT_REPORT, OUT_SUMMARY = "model.hardened.onnx", "report.json", "summary.md"


# --- the valid base set ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory, plain_cnn, digits_calib_npz) -> Path:
    """A folder with a valid model.onnx, calib.npz and chip.bin (read-only for the tests)."""
    d = tmp_path_factory.mktemp("apply_errors_base")
    shutil.copyfile(plain_cnn, d / MODEL)
    shutil.copyfile(digits_calib_npz, d / DATA)
    num_words = weight_count(d / MODEL)
    fm = generate_uniform(num_words, 0.02, seed=3, meta={"chip_id": "test-chip"})
    assert fm.num_records >= 3  # the byte edits below need a few records
    write_faultmap(fm, d / FAULTMAP)
    return d


@dataclass
class Paths:
    """The paths handed to `harden apply` for one case."""

    indir: Path
    outdir: Path
    model: Path
    faultmap: Path
    data: Path
    output: Path
    report: Path
    summary: Path

    def argv(self) -> list[str]:
        return ["apply", str(self.model), "--faultmap", str(self.faultmap), "--data", str(self.data),
                "-o", str(self.output), "--report", str(self.report), "--summary-md", str(self.summary)]


def fresh_inputs(base: Path, tmp: Path) -> Paths:
    """A private copy of the base inputs in tmp/in, and an empty tmp/out for the outputs."""
    indir, outdir = tmp / "in", tmp / "out"
    shutil.copytree(base, indir)
    outdir.mkdir()
    return Paths(indir, outdir, indir / MODEL, indir / FAULTMAP, indir / DATA,
                 outdir / OUT_MODEL, outdir / OUT_REPORT, outdir / OUT_SUMMARY)


# --- helpers to break one thing --------------------------------------------------------------


def _hfm_fields(data: bytes) -> dict:
    n = struct.unpack_from("<Q", data, 16)[0]
    return {"n": n, "num_words": struct.unpack_from("<Q", data, 8)[0],
            "addr": HEADER_SIZE, "sa0": HEADER_SIZE + 8 * n, "sa1": HEADER_SIZE + 9 * n,
            "meta": HEADER_SIZE + 10 * n}


def _fix_crc(data: bytearray) -> bytearray:
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[HEADER_SIZE:])))
    return data


def edit_faultmap(edit: Callable[[bytearray, dict], None], fix_crc: bool = True):
    """A case builder that edits the bytes of the valid fault map (then re-seals the CRC)."""

    def build(p: Paths) -> None:
        data = bytearray(p.faultmap.read_bytes())
        edit(data, _hfm_fields(data))
        p.faultmap.write_bytes(bytes(_fix_crc(data) if fix_crc else data))

    return build


def _set_addr(i: int, value: Callable[[bytearray, dict], int]):
    def edit(data: bytearray, f: dict) -> None:
        struct.pack_into("<Q", data, f["addr"] + 8 * i, value(data, f))

    return edit


def _addr(data: bytearray, f: dict, i: int) -> int:
    return struct.unpack_from("<Q", data, f["addr"] + 8 * i)[0]


def _swap_first_addresses(data: bytearray, f: dict) -> None:
    a0, a1 = _addr(data, f, 0), _addr(data, f, 1)
    struct.pack_into("<QQ", data, f["addr"], a1, a0)


def _stuck_both_ways(data: bytearray, f: dict) -> None:
    data[f["sa0"]] |= 0x04  # record 0: bit 2 stuck at 0 ...
    data[f["sa1"]] |= 0x04  # ... and at 1


def _no_stuck_bit(data: bytearray, f: dict) -> None:
    data[f["sa0"]] = data[f["sa1"]] = 0


def _flip_body_byte(data: bytearray, f: dict) -> None:
    data[f["sa1"] + 1] ^= 0x40  # the CRC is left as it was


def _set_header(fmt: str, offset: int, value: int):
    def edit(data: bytearray, f: dict) -> None:
        struct.pack_into(fmt, data, offset, value)

    return edit


def _bad_meta(data: bytearray, f: dict) -> None:
    data[f["meta"]] = ord("[")  # '{...}' -> '[...}'


def write_model(path: Path, model: onnx.ModelProto) -> None:
    path.write_bytes(model.SerializeToString())


def no_weight_model(p: Paths) -> None:
    """Relu only: a valid model that matches the data, but nothing to put in weight memory."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"], name="relu")], "relu_only", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    write_model(p.model, model)


def truncated_model(p: Paths) -> None:
    data = p.model.read_bytes()
    p.model.write_bytes(data[: len(data) // 2])


def garbage_model(p: Paths) -> None:
    p.model.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def external_data_at(location: str):
    """The base model with its first weight moved to external data at `location`."""

    def build(p: Paths) -> None:
        model = onnx.load(str(p.model))
        t = model.graph.initializer[0]
        nbytes = len(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
            t.external_data.add(key=key, value=value)
        write_model(p.model, model)

    return build


def absurd_input_dim(p: Paths) -> None:
    model = onnx.load(str(p.model))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1 << 40
    write_model(p.model, model)


def absurd_value_info_dim(p: Paths) -> None:
    """An intermediate tensor declared [2**40, 8]: shape inference and quantization would choke."""
    model = onnx.load(str(p.model))
    name = model.graph.node[0].output[0]
    model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1 << 40, 8]))
    write_model(p.model, model)


def absurd_constant_of_shape(p: Paths) -> None:
    """The first conv weight made by ConstantOfShape([2**40, 1, 3, 3]) (legacy models make weights
    this way, and onnxsim would try to fold it into a 40 TB initializer)."""
    model = onnx.load(str(p.model))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    i = next(i for i, t in enumerate(model.graph.initializer) if t.name == conv.input[1])
    name = model.graph.initializer[i].name
    del model.graph.initializer[i]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1 << 40, 1, 3, 3], np.int64), "w_shape"))
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.1])
    model.graph.node.insert(0, helper.make_node("ConstantOfShape", ["w_shape"], [name], name="make_w", value=fill))
    write_model(p.model, model)


def initializer_absurd_dims(p: Paths) -> None:
    """A weight that declares 2**40 rows over the bytes of its real shape."""
    model = onnx.load(str(p.model))
    model.graph.initializer[0].dims[0] = 1 << 40
    write_model(p.model, model)


def undefined_tensor(p: Paths) -> None:
    """A node reads a tensor nothing defines (a missing input)."""
    model = onnx.load(str(p.model))
    model.graph.node[0].input[0] = "ghost"
    write_model(p.model, model)


def no_graph_inputs(p: Paths) -> None:
    """The graph input is gone; its first node still reads it."""
    model = onnx.load(str(p.model))
    del model.graph.input[:]
    write_model(p.model, model)


def nodes_out_of_order(p: Paths) -> None:
    model = onnx.load(str(p.model))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([nodes[1], nodes[0]] + nodes[2:])
    write_model(p.model, model)


def npz(**arrays):
    """A case builder that replaces the calibration data with `arrays` (callables of the base)."""

    def build(p: Paths) -> None:
        with np.load(p.data) as z:
            x, y = z["input"], z["label"]
        out = {k: (v(x, y) if callable(v) else v) for k, v in arrays.items()}
        with open(p.data, "wb") as fh:
            np.savez(fh, **out)

    return build


def zip_with_text_member(p: Paths) -> None:
    with zipfile.ZipFile(p.data, "w") as z:
        z.writestr("input.txt", "0.5, 0.25")


def npy_declaring_absurd_shape(p: Paths) -> None:
    """A valid zip (good CRC) whose .npy header declares 2**40 x 1 x 8 x 8 floats over 256 bytes:
    numpy would allocate 256 TiB before reading (MemoryError, once an internal error)."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 1, 8, 8)})
    with zipfile.ZipFile(p.data, "w") as z:
        z.writestr("input.npy", header.getvalue() + bytes(256))


def _zip_headers(data: bytearray, field: int, value: int, local: bool = True) -> bytearray:
    """Set a u16 field (offset in the central directory header) in every member of a zip."""
    for sig, off in (((b"PK\x01\x02", field),) + (((b"PK\x03\x04", field - 2),) if local else ())):
        i = data.find(sig)
        while i != -1:
            struct.pack_into("<H", data, i + off, value)
            i = data.find(sig, i + 4)
    return data


def zip_unknown_compression(p: Paths) -> None:
    p.data.write_bytes(bytes(_zip_headers(bytearray(p.data.read_bytes()), 10, 99)))  # method 99


def zip_encrypted_member(p: Paths) -> None:
    p.data.write_bytes(bytes(_zip_headers(bytearray(p.data.read_bytes()), 8, 1)))  # flag bit 0


def _with(x: np.ndarray, index, value) -> np.ndarray:
    x = x.copy()
    x[index] = value
    return x


def remove(attr: str):
    def build(p: Paths) -> None:
        getattr(p, attr).unlink()

    return build


def output_is(target: str):
    """Point -o / --report at one of the inputs."""

    def build(p: Paths) -> None:
        what, _, src = target.partition("=")
        setattr(p, what, getattr(p, src))

    return build


def output_symlink_to_model(p: Paths) -> None:
    p.output.symlink_to(p.model)


def output_folder_missing(p: Paths) -> None:
    p.output = p.outdir / "no" / "such" / OUT_MODEL


def report_equals_output(p: Paths) -> None:
    p.report = p.output


# --- the matrix ------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    build: Callable[[Paths], None]
    fragment: str  # regex, searched case-insensitively in the error line
    runs_pipeline: bool = False  # the problem can only be seen after quantization


CASES = [
    # the model
    Case("model-missing", remove("model"), r"no such model file"),
    Case("model-empty", lambda p: p.model.write_bytes(b""), r"empty file"),
    Case("model-truncated", truncated_model, r"not a valid ONNX model|invalid ONNX model"),
    Case("model-garbage", garbage_model, r"not a valid ONNX model|invalid ONNX model"),
    Case("model-external-data-dotdot", external_data_at("../../etc/passwd"), r"outside the model's folder"),
    Case("model-external-data-absolute", external_data_at("/etc/passwd"), r"outside the model's folder"),
    Case("model-external-data-missing", external_data_at("weights.bin"), r"external data file .* not found"),
    Case("model-absurd-input-dim", absurd_input_dim, r"absurd dimension 1099511627776"),
    Case("model-absurd-value-info-dim", absurd_value_info_dim, r"absurd dimension 1099511627776"),
    Case("model-absurd-constant-of-shape", absurd_constant_of_shape,
         r"'make_w' \(ConstantOfShape\) would make a tensor of shape \[1099511627776, 1, 3, 3\]; refused"),
    Case("model-initializer-absurd-dims", initializer_absurd_dims,
         r"invalid ONNX model: .*raw_data size \(\d+ bytes\) is too small for the declared shape"),
    Case("model-undefined-tensor", undefined_tensor, r"invalid ONNX model: node .* reads 'ghost', which no graph input"),
    Case("model-no-graph-inputs", no_graph_inputs, r"invalid ONNX model: the graph declares no inputs"),
    Case("model-nodes-out-of-order", nodes_out_of_order, r"reads .* before the node that makes it"),
    Case("model-no-weights", no_weight_model, r"no .*weights", runs_pipeline=True),
    # the fault map
    Case("faultmap-missing", remove("faultmap"), r"no such file"),
    Case("faultmap-bad-magic", edit_faultmap(lambda d, f: d.__setitem__(slice(0, 4), b"HFM2")),
         r"offset 0: .*bad magic"),
    Case("faultmap-bad-crc", edit_faultmap(_flip_body_byte, fix_crc=False), r"offset 28: CRC-32 mismatch"),
    Case("faultmap-truncated", lambda p: p.faultmap.write_bytes(p.faultmap.read_bytes()[:-1]), r"file truncated"),
    Case("faultmap-header-truncated", lambda p: p.faultmap.write_bytes(p.faultmap.read_bytes()[:20]),
         r"offset 20: file truncated"),
    Case("faultmap-trailing-bytes", lambda p: p.faultmap.write_bytes(p.faultmap.read_bytes() + b"\0"),
         r"1 trailing bytes"),
    Case("faultmap-word-bits-16", edit_faultmap(_set_header("<H", 6, 16)), r"offset 6: word_bits is 16"),
    Case("faultmap-version-2", edit_faultmap(_set_header("<H", 4, 2)), r"offset 4: unsupported version 2"),
    Case("faultmap-num-words-0", edit_faultmap(_set_header("<Q", 8, 0)), r"offset 8: num_words is 0"),
    Case("faultmap-absurd-record-count",
         edit_faultmap(lambda d, f: struct.pack_into("<QQ", d, 8, 2**64 - 1, 2**62)),
         r"file truncated: the header implies \d+ bytes \(4611686018427387904 records"),
    Case("faultmap-absurd-meta-len", edit_faultmap(_set_header("<I", 24, 2**32 - 1)),
         r"file truncated: the header implies \d+ bytes \(\d+ records, 4294967295 metadata bytes\)"),
    Case("faultmap-more-records-than-words", edit_faultmap(_set_header("<Q", 8, 2)), r"offset 16: num_records \d+ exceeds"),
    Case("faultmap-unsorted-address", edit_faultmap(_swap_first_addresses), r"offset 40: .*strictly increasing"),
    Case("faultmap-duplicate-address", edit_faultmap(_set_addr(1, lambda d, f: _addr(d, f, 0))),
         r"offset 40: duplicate address"),
    Case("faultmap-address-out-of-range", edit_faultmap(_set_addr(0, lambda d, f: f["num_words"])),
         r"offset 32: address \d+ is out of range"),
    Case("faultmap-stuck-both-ways", edit_faultmap(_stuck_both_ways), r"stuck at both 0 and 1"),
    Case("faultmap-no-stuck-bit", edit_faultmap(_no_stuck_bit), r"no stuck bit"),
    Case("faultmap-bad-metadata", edit_faultmap(_bad_meta), r"metadata is not valid JSON"),
    # a CSV map (address,bit,stuck) needs the memory size, known only once the model is quantized
    Case("faultmap-csv-stuck-both-ways", lambda p: p.faultmap.write_text("address,bit,stuck\n5,2,0\n9,1,1\n5,2,1\n"),
         r"line 4: address 5 bit 2 is listed as stuck at both 0 and 1", runs_pipeline=True),
    Case("faultmap-csv-address-out-of-range",
         lambda p: p.faultmap.write_text("address,bit,stuck\n5,2,0\n99999999,0,1\n"),
         r"line 3: address out of range", runs_pipeline=True),
    # the data
    Case("data-missing", remove("data"), r"no such calibration data file"),
    Case("data-not-npz", lambda p: p.data.write_bytes(b"input,label\n0.5,1\n"), r"not a readable \.npz"),
    Case("data-npy", lambda p: np.save(p.indir / "calib.npy", np.zeros((4, 1, 8, 8), np.float32))
         or os.replace(p.indir / "calib.npy", p.data), r"not a readable \.npz"),
    Case("data-truncated-npz", lambda p: p.data.write_bytes(p.data.read_bytes()[:1000]), r"not a readable \.npz"),
    Case("data-zip-not-npy", zip_with_text_member, r"not a readable \.npz.*not \.npy arrays"),
    Case("data-npy-absurd-declared-shape", npy_declaring_absurd_shape,
         r"member 'input.npy' declares shape \(1099511627776, 1, 8, 8\) of float32, 281474976710656 bytes, but holds 256"),
    Case("data-zip-unknown-compression", zip_unknown_compression, r"not a readable \.npz \(NotImplementedError"),
    Case("data-zip-encrypted", zip_encrypted_member, r"member 'input.npy' is encrypted"),
    Case("data-pickled", npz(input=lambda x, y: np.array([{"x": 1}] * len(x), dtype=object), label=lambda x, y: y),
         r"pickled objects"),
    Case("data-wrong-shape-flat", npz(input=lambda x, y: x.reshape(len(x), 64), label=lambda x, y: y),
         r"shape \(256, 64\), the model expects \?x1x8x8"),
    Case("data-wrong-shape-size", npz(input=lambda x, y: x[:, :, :7, :7].copy(), label=lambda x, y: y),
         r"shape \(256, 1, 7, 7\)"),
    Case("data-wrong-dtype", npz(input=lambda x, y: (x * 255).astype(np.uint8), label=lambda x, y: y),
         r"dtype uint8, the model expects float32"),
    Case("data-nan", npz(input=lambda x, y: _with(x, (7, 0, 3, 3), np.nan), label=lambda x, y: y), r"NaN or Inf"),
    Case("data-inf", npz(input=lambda x, y: _with(x, (0, 0, 0, 0), -np.inf), label=lambda x, y: y), r"NaN or Inf"),
    Case("data-label-count", npz(input=lambda x, y: x, label=lambda x, y: y[:-1]), r"255 labels for 256 samples"),
    Case("data-label-float", npz(input=lambda x, y: x, label=lambda x, y: y.astype(np.float32)),
         r"'label' must be a 1-D array of integer"),
    Case("data-no-samples", npz(input=lambda x, y: x[:0], label=lambda x, y: y[:0]), r"holds no samples"),
    Case("data-wrong-key", npz(images=lambda x, y: x, extra=lambda x, y: y), r"expected an array named 'input'"),
    # the outputs
    Case("output-is-model", output_is("output=model"), r"output path .* is the input"),
    Case("output-is-faultmap", output_is("output=faultmap"), r"output path .* is the input"),
    Case("output-symlink-to-model", output_symlink_to_model, r"output path .* is the input"),
    Case("report-is-data", output_is("report=data"), r"output path .* is the input"),
    Case("report-is-output", report_equals_output, r"--report .* is the same path as the output model"),
    Case("output-folder-missing", output_folder_missing, r"output folder .* does not exist"),
    Case("summary-is-data", output_is("summary=data"), r"output path .* is the input"),
    Case("summary-is-report", output_is("summary=report"), r"output path .* is also another output"),
]
CASE_IDS = [c.id for c in CASES]
BY_ID = {c.id: c for c in CASES}


def build_case(case: Case, base: Path, tmp: Path) -> tuple[Paths, dict[str, bytes], set[str]]:
    """Build the broken inputs; return them, the bytes of every input file, and the outputs'
    folder listing, as they were before the run."""
    p = fresh_inputs(base, tmp)
    case.build(p)
    before = {f.name: f.read_bytes() for f in p.indir.iterdir() if f.is_file()}
    return p, before, set(os.listdir(p.outdir))


def check_nothing_written(p: Paths, before: dict[str, bytes], out_listing: set[str]) -> None:
    """No output model, no report, no temp file; every input byte-for-byte as it was."""
    assert set(os.listdir(p.outdir)) == out_listing, "files appeared in the output folder"
    assert set(os.listdir(p.indir)) == set(before), "files appeared in the input folder"
    for name, data in before.items():
        assert (p.indir / name).read_bytes() == data, f"input {name} was modified"
    for path in (p.output, p.report, p.summary):
        existed = path.parent == p.indir or (path.parent == p.outdir and path.name in out_listing)
        if not existed:  # (an output aimed at an input is checked above: the input is unchanged)
            assert not path.exists(), f"{path} was written"
    leftovers = [n for d in (p.indir, p.outdir) for n in os.listdir(d) if n.endswith(".tmp") or n.startswith(".")]
    assert not leftovers, f"stray temp files: {leftovers}"


def check_one_error_line(text: str, case: Case) -> str:
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {len(lines)}:\n{text}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert re.search(case.fragment, line, re.IGNORECASE), f"{case.fragment!r} not in {line!r}"
    return line


# --- the tests -------------------------------------------------------------------------------


class _Tripwire(Exception):
    pass


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_exits_2_with_one_line(case: Case, base: Path, tmp_path: Path, monkeypatch) -> None:
    p, before, out_listing = build_case(case, base, tmp_path)
    simplified = []
    if not case.runs_pipeline:
        def tripwire(model):
            simplified.append(True)
            raise _Tripwire("work started before the inputs were checked")

        monkeypatch.setattr(harden.passes.prepare, "prepare", tripwire)

    result = CliRunner().invoke(main, p.argv())

    assert not simplified, "the pipeline started working before it rejected the input"
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == "", result.stdout
    check_one_error_line(result.stderr, case)
    check_nothing_written(p, before, out_listing)


SUBPROCESS_CASES = [  # (case, launcher): the console script on two, `python -m harden` on the rest
    ("model-truncated", "console-script"),
    ("model-no-weights", "console-script"),  # runs onnxsim and onnxruntime: no library noise either
    ("model-no-weights", "python-m"),
    ("model-external-data-dotdot", "python-m"),
    ("model-undefined-tensor", "python-m"),
    ("faultmap-bad-crc", "python-m"),
    ("faultmap-stuck-both-ways", "python-m"),
    ("data-pickled", "python-m"),
]


@pytest.mark.parametrize("case_id,launcher", SUBPROCESS_CASES, ids=[f"{c}-{l}" for c, l in SUBPROCESS_CASES])
def test_bad_input_in_a_real_process(case_id: str, launcher: str, base: Path, tmp_path: Path) -> None:
    """The real executable: nothing else on stdout or stderr (no traceback, no library noise)."""
    if launcher == "python-m":
        cmd = [sys.executable, "-m", "harden"]
    else:
        beside = Path(sys.executable).with_name("harden")  # this interpreter's script, not another install's
        exe = str(beside) if beside.is_file() else shutil.which("harden")
        if exe is None:
            pytest.skip("no `harden` console script")
        cmd = [exe]
    case = BY_ID[case_id]
    p, before, out_listing = build_case(case, base, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HARDEN_DEBUG"}
    proc = subprocess.run(cmd + p.argv(), capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "", proc.stdout
    check_one_error_line(proc.stderr, case)
    check_nothing_written(p, before, out_listing)


def test_valid_base_inputs_succeed(base: Path, tmp_path: Path) -> None:
    """Positive control: the unbroken inputs harden fine, so the matrix cannot pass vacuously."""
    p = fresh_inputs(base, tmp_path)
    before = {f.name: f.read_bytes() for f in p.indir.iterdir()}
    result = CliRunner().invoke(main, p.argv() + ["--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "error" not in result.stderr.lower(), result.stderr
    assert sorted(os.listdir(p.outdir)) == sorted([OUT_MODEL, OUT_REPORT, OUT_SUMMARY])
    hardened = onnx.load(str(p.output))
    onnx.checker.check_model(hardened)
    assert "harden.memory_map" in {m.key for m in hardened.metadata_props}
    report = json.loads(p.report.read_text())
    assert report["schema"] == "harden.report/1"
    assert read_faultmap(p.faultmap).num_records == report["inputs"]["faultmap"]["num_records"]
    for name, data in before.items():
        assert (p.indir / name).read_bytes() == data
