"""Datasets (.npz) checked against a model, batching, and accuracy / agreement metrics.

The .npz contract (DESIGN.md): arrays keyed by the model's input names (a single-input model may
use any one key), plus an optional `label` array of int class ids; never pickles.
"""

from __future__ import annotations

import lzma
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from .errors import InputError

#: Refuse a .npz that unpacks to more than this (16 GiB): a zip bomb, not calibration data.
MAX_NPZ_BYTES = 1 << 34

#: What zipfile and numpy raise on a damaged archive (bad CRC, unknown compression method,
#: encrypted member, corrupt deflate / bzip2 / lzma stream, short member, bad .npy header).
_UNREADABLE = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError,
               NotImplementedError, RuntimeError, OverflowError, zlib.error, lzma.LZMAError)

_PICKLED = "holds pickled objects, which harden never loads; save plain numeric arrays"

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass
class InputSpec:
    """A model input: name, numpy dtype and shape (None for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are not inputs)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(_ONNX_TO_NP.get(tt.elem_type, np.float32))
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


@dataclass
class Dataset:
    """Model inputs by name (first axis = samples) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> "Dataset":
        """The first n samples."""
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[:n], self.source)

    def subset(self, index: np.ndarray) -> "Dataset":
        """The samples at `index` (an integer array or a boolean mask), in order."""
        return Dataset({k: v[index] for k, v in self.inputs.items()}, None if self.labels is None else self.labels[index], self.source)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Input feeds of at most batch_size samples."""
        for i in range(0, len(self), batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.inputs.items()}


def load_npz(path: str | os.PathLike, model: onnx.ModelProto, *, role: str = "data") -> Dataset:
    """Load a .npz and check it against the model's inputs before any work starts."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such {role} file")
    # np.load takes any other file (.npy, text, a pickle) too; only a zip of .npy arrays is a .npz.
    if not zipfile.is_zipfile(p):
        raise InputError(f"{p}: not a readable .npz (not a zip archive of .npy arrays, as numpy.savez writes)")
    _check_npz_members(p)
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise InputError(f"{p}: {_PICKLED}") from None
        raise InputError(f"{p}: not a readable .npz ({str(exc)[:120]})") from None
    except _UNREADABLE as exc:
        raise InputError(f"{p}: not a readable .npz ({type(exc).__name__}: {str(exc)[:120]})") from None
    odd = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if odd:  # np.load returns the raw bytes of a member that is not a .npy file
        raise InputError(f"{p}: not a readable .npz (member(s) {odd} are not .npy arrays)")
    return check_dataset(arrays, model, source=str(p))


def _check_npz_members(p: Path) -> None:
    """Before numpy allocates anything: the archive unpacks to a sane size, no member is
    encrypted, and every .npy member's header (shape x dtype) accounts for exactly its bytes, so
    a header that declares a huge shape is refused instead of allocated."""
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if total > MAX_NPZ_BYTES:
                raise InputError(f"{p}: unpacks to {total} bytes, more than the {MAX_NPZ_BYTES} harden loads; refused")
            for info in infos:
                if info.flag_bits & 0x1:
                    raise InputError(f"{p}: member {info.filename!r} is encrypted; save plain numeric arrays")
                if not info.filename.endswith(".npy"):
                    continue  # np.load hands back its raw bytes; refused below
                with zf.open(info) as fh:
                    try:
                        version = np.lib.format.read_magic(fh)
                        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                        shape, _fortran, dtype = read_header(fh)
                    except _UNREADABLE:
                        raise
                    except Exception as exc:  # noqa: BLE001 - numpy parses the header with tokenize and ast:
                        # tokenize.TokenError, SyntaxError, RecursionError ... all mean a bad header
                        raise InputError(f"{p}: not a readable .npz (bad .npy header in member {info.filename!r}: "
                                         f"{type(exc).__name__})") from None
                    if dtype.hasobject:
                        raise InputError(f"{p}: {_PICKLED}")
                    header = fh.tell()
                need = math.prod(shape) * dtype.itemsize
                if header + need != info.file_size:
                    raise InputError(
                        f"{p}: not a readable .npz (member {info.filename!r} declares shape {tuple(shape)} of {dtype}, "
                        f"{need} bytes, but holds {info.file_size - header})"
                    )
    except InputError:
        raise
    except _UNREADABLE as exc:
        raise InputError(f"{p}: not a readable .npz ({type(exc).__name__}: {str(exc)[:120]})") from None


def check_dataset(arrays: dict[str, np.ndarray], model: onnx.ModelProto, *, source: str = "<data>") -> Dataset:
    """Match arrays to model inputs; check dtypes, shapes, finiteness and labels."""
    specs = input_specs(model)
    labels = arrays.pop("label", None)
    if len(specs) == 1 and specs[0].name not in arrays:
        if len(arrays) != 1:
            raise InputError(f"{source}: expected an array named {specs[0].name!r} (found {sorted(arrays)})")
        arrays = {specs[0].name: next(iter(arrays.values()))}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InputError(f"{source}: no array for model input(s) {missing} (found {sorted(arrays)})")
    inputs: dict[str, np.ndarray] = {}
    n = None
    for s in specs:
        a = arrays[s.name]
        if a.dtype != s.dtype:
            if a.dtype.kind == "f" and s.dtype.kind == "f":
                a = a.astype(s.dtype)
            else:
                raise InputError(f"{source}: array {s.name!r} has dtype {a.dtype}, the model expects {s.dtype}")
        if a.ndim != len(s.shape) or any(d is not None and d != ad for d, ad in zip(s.shape[1:], a.shape[1:])):
            want = "x".join("?" if d is None else str(d) for d in s.shape)
            raise InputError(f"{source}: array {s.name!r} has shape {a.shape}, the model expects {want}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{source}: array {s.name!r} contains NaN or Inf")
        if n is None:
            n = len(a)
        elif len(a) != n:
            raise InputError(f"{source}: inputs disagree on the number of samples ({n} vs {len(a)})")
        inputs[s.name] = np.ascontiguousarray(a)
    if not n:
        raise InputError(f"{source}: holds no samples")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise InputError(f"{source}: 'label' must be a 1-D array of integer class ids (got {labels.dtype}, shape {labels.shape})")
        if len(labels) != n:
            raise InputError(f"{source}: {len(labels)} labels for {n} samples")
        labels = labels.astype(np.int64)
    return Dataset(inputs, labels, source)


#: The prediction of a sample whose logits contain a NaN (`top1`): a class no label has.
NAN_CLASS = -1


def top1(logits: np.ndarray) -> np.ndarray:
    """Predicted class per sample (logits flattened past the batch axis).

    A sample with a NaN among its logits (float32 weight faults can make them) is predicted as
    NAN_CLASS (-1): wrong against any label, and a change against any fault-free prediction.
    Infinite logits are ordinary values (argmax, ties to the lowest index)."""
    flat = logits.reshape(len(logits), -1)
    pred = np.argmax(flat, axis=1)
    if flat.dtype.kind == "f":
        nan = np.isnan(flat).any(axis=1)
        if nan.any():
            pred[nan] = NAN_CLASS
    return pred


def accuracy(pred: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of predictions equal to the reference (labels, or the float model's top-1)."""
    return float(np.mean(pred == reference))


#: Without --eval-data, every HOLD_OUT_EVERY-th sample of --data (i % k == k - 1) is held out:
#: calibration, clip search, training and compensation see only the others, and the figures
#: are scored on these. A stride, not a random draw: reproducible and stratified when the
#: data is sorted by class.
HOLD_OUT_EVERY = 4
MIN_HELD_OUT = 1


def split_held_out(data: Dataset) -> tuple[Dataset, Dataset, dict]:
    """(the part to fit on, the held-out part to score on, the record the report keeps)."""
    n = len(data)
    held = (np.arange(n) % HOLD_OUT_EVERY) == HOLD_OUT_EVERY - 1
    if held.sum() < MIN_HELD_OUT:
        raise InputError(f"--data has {n} samples: too few to hold out a sample for scoring "
                         f"(every {HOLD_OUT_EVERY}th); give --eval-data, or more data")
    record = {"held_out_of": "data", "rule": f"sample i where i % {HOLD_OUT_EVERY} == {HOLD_OUT_EVERY - 1}",
              "samples": int(held.sum()), "fit_samples": int(n - held.sum())}
    return data.subset(~held), data.subset(held), record
