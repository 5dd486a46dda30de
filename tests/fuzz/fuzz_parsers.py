"""Coverage-guided fuzzing of harden's input parsers with atheris (libFuzzer for Python).

    pip install atheris
    python tests/fuzz/fuzz_parsers.py TARGET [libFuzzer options] [CORPUS_DIR ...]
    python tests/fuzz/fuzz_parsers.py hfm1 -max_total_time=300 /tmp/harden-fuzz/hfm1

TARGET is one of:
  hfm1   harden.faultmap.from_bytes on the bytes
  hfm1-sealed  the same, with the header's CRC-32 recomputed first (when there is a header), so
         that mutations reach the record and metadata rules behind the CRC check
  csv    harden.faultmap.read_faultmap on the bytes as a CSV file (num_words = 4096)
  npz    harden.data.load_npz on the bytes as a .npz file, against a small Conv model
  onnx   harden.model.load_model on the bytes as a model file

The contract checked on every input: the parser returns, or raises harden.errors.InputError (the
CLI's exit 2, one line); any other exception is a crash. What a parser accepts must also read
back exactly (HFM1: to_bytes gives the same bytes; CSV: the map survives a CSV round trip).
A first run writes seed inputs (valid files of each kind) into the corpus folder when it is empty.
Not collected by pytest (the file name does not start with test_); docs/robustness.md has the
commands, durations and findings.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import zlib
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["harden"]):
    from harden.data import load_npz
    from harden.errors import InputError
    from harden.faultmap import FaultMap, faultmap_to_csv, from_bytes, generate_uniform, read_faultmap, to_bytes
    from harden.model import load_model

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SCRATCH = Path(tempfile.mkdtemp(prefix="harden-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
NUM_WORDS = 4096


def tiny_model() -> onnx.ModelProto:
    """Conv(1->2, 3x3) -> Relu -> Flatten -> Gemm(2*2*2 -> 3), input [N, 1, 4, 4]."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    inits = [
        numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MODEL = tiny_model()


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def seeds(target: str) -> list[bytes]:
    fm = generate_uniform(NUM_WORDS, 0.01, seed=1, meta={"chip_id": "fuzz"})
    small = FaultMap(100, np.array([3, 9, 42], np.uint64), np.array([1, 0, 4], np.uint8),
                     np.array([0, 2, 8], np.uint8), {"chip_id": "c"})
    x = np.random.default_rng(0).random((5, 1, 4, 4), dtype=np.float32)
    return {
        "hfm1": [to_bytes(small), to_bytes(fm)],
        "hfm1-sealed": [to_bytes(small), to_bytes(fm)],
        "csv": [faultmap_to_csv(small).encode(), b"address,bit,stuck\r\n 4 , 3 , 1\r\n", faultmap_to_csv(fm).encode()],
        "npz": [_npz_bytes(input=x, label=np.arange(5)), _npz_bytes(input=x)],
        "onnx": [MODEL.SerializeToString()],
    }[target]


def _as_file(data: bytes, name: str) -> Path:
    p = SCRATCH / name
    p.write_bytes(data)
    return p


def check_hfm1(data: bytes) -> None:
    try:
        fm = from_bytes(data, source="fuzz.bin")
    except InputError:
        return
    assert to_bytes(fm) == data, "an accepted HFM1 file does not write back byte for byte"


def check_hfm1_sealed(data: bytes) -> None:
    if len(data) >= 32:
        data = data[:28] + zlib.crc32(data[32:]).to_bytes(4, "little") + data[32:]
    check_hfm1(data)


def check_csv(data: bytes) -> None:
    try:
        fm = read_faultmap(_as_file(data, "fuzz.csv"), num_words=NUM_WORDS)
    except InputError:
        return
    again = read_faultmap(_as_file(faultmap_to_csv(fm).encode(), "again.csv"), num_words=NUM_WORDS)
    assert again == fm, "an accepted CSV map does not survive a CSV round trip"


def check_npz(data: bytes) -> None:
    try:
        ds = load_npz(_as_file(data, "fuzz.npz"), MODEL)
    except InputError:
        return
    x = ds.inputs["input"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 4, 4) and len(x) > 0 and np.isfinite(x).all()
    assert ds.labels is None or (ds.labels.dtype == np.int64 and len(ds.labels) == len(x))


def check_onnx(data: bytes) -> None:
    d = SCRATCH / "model"
    d.mkdir(exist_ok=True)
    try:
        load_model(_as_file(data, "model/fuzz.onnx"))
    except InputError:
        return


CHECKS = {"hfm1": check_hfm1, "hfm1-sealed": check_hfm1_sealed, "csv": check_csv, "npz": check_npz, "onnx": check_onnx}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in CHECKS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(CHECKS)}}} [libFuzzer options] [CORPUS_DIR ...]")
    target = sys.argv.pop(1)
    for arg in sys.argv[1:]:
        if not arg.startswith("-") and not Path(arg).is_file():  # a file is an input to re-run
            corpus = Path(arg)
            corpus.mkdir(parents=True, exist_ok=True)
            if not any(corpus.iterdir()):
                for i, seed in enumerate(seeds(target)):
                    (corpus / f"seed-{i}").write_bytes(seed)
    check = CHECKS[target]
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
