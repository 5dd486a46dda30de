"""Where each int8 weight lives in the chip's weight memory, and the `harden.memory_map` record.

The weight *stream*: the int8 weight tensors in order of first consumer, flattened in C order
and concatenated. A memory layout maps every stream element to an address; everything
downstream (FAQ, chip read-back, the `chip` fault model) works on the stream through
`MemoryMap.stream_masks`, so a layout only has to provide addresses.

Layouts are plugins (entry-point group `harden.layouts`, docs/plugins.md): a `Layout` subclass
with a `name`, a frozen `Params` dataclass, `check(num_words)`, `words_needed(tensors)`,
`place(tensors, num_words) -> MemoryMap` and `addresses(memory_map) -> int64 per element`.
Built in: `linear` (DESIGN.md): stream element k lives at address k mod num_words. The
`harden-tiled` package in plugins/ adds `tiled` (crossbar tiles for processing-in-memory parts).
The layout's name and parameters go into `harden.memory_map` (`layout`, `params`), and a
layout may add fields of its own to each tensor's record (`TensorSlot.extra`), so that the
record alone still gives every weight's address.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import model as m
from . import plugins
from .errors import InputError
from .plugins import coerce_params, params_dict


@dataclass(frozen=True)
class TensorSlot:
    """A weight tensor's place in the stream: elements [offset, offset + count); `extra` holds
    layout-specific fields of its `harden.memory_map` record (none for `linear`)."""

    name: str
    offset: int
    count: int
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"name": self.name, "offset": self.offset, "count": self.count, **self.extra}


@dataclass(frozen=True)
class MemoryMap:
    """The layout of the weight stream in a memory of `num_words` words."""

    num_words: int
    tensors: tuple[TensorSlot, ...]
    layout: str = "linear"
    word_bits: int = 8
    params: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Number of weights in the stream."""
        return sum(t.count for t in self.tensors)

    def slot(self, name: str) -> TensorSlot:
        return next(t for t in self.tensors if t.name == name)

    def stream_addresses(self) -> np.ndarray:
        """The address (int64) of every stream element, from the layout registry
        (linear: k mod num_words)."""
        if self.layout == "linear" and not self.params:
            return np.arange(self.total, dtype=np.int64) % self.num_words
        a = np.asarray(get_layout((self.layout, self.params)).addresses(self))
        if a.shape != (self.total,) or a.dtype.kind not in "ui":
            raise ValueError(f"layout {self.layout!r} returned {a.dtype} addresses of shape {a.shape}, not ({self.total},) integers")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= self.num_words):
            raise ValueError(f"layout {self.layout!r} returned an address outside [0, {self.num_words})")
        return a.astype(np.int64, copy=False)

    def stream_masks(self, faultmap) -> tuple[np.ndarray, np.ndarray]:
        """(sa0, sa1) of the word under every stream element, as two uint8 arrays.

        Linear layout: one dense per-word table tiled over the stream (np.resize repeats it), so
        the cost is a memcpy, not a search per weight.
        """
        if faultmap.num_words != self.num_words:
            raise InputError(
                f"fault map covers {faultmap.num_words} words but the memory map expects {self.num_words}"
            )
        sa0 = np.zeros(self.num_words, np.uint8)
        sa1 = np.zeros(self.num_words, np.uint8)
        addr = faultmap.addresses.astype(np.int64)
        sa0[addr] = faultmap.sa0
        sa1[addr] = faultmap.sa1
        if self.layout == "linear" and not self.params:
            return np.resize(sa0, self.total), np.resize(sa1, self.total)
        a = self.stream_addresses()
        return sa0[a], sa1[a]

    def to_json(self) -> str:
        """The `harden.memory_map` metadata value."""
        doc = {
            "layout": self.layout,
            "word_bits": self.word_bits,
            "num_words": self.num_words,
            **({"params": self.params} if self.params else {}),
            "tensors": [t.record() for t in self.tensors],
        }
        return json.dumps(doc, sort_keys=False, separators=(", ", ": "))

    @classmethod
    def from_json(cls, text: str) -> "MemoryMap":
        doc = json.loads(text)
        return cls(
            num_words=int(doc["num_words"]),
            tensors=tuple(
                TensorSlot(t["name"], int(t["offset"]), int(t["count"]), {k: v for k, v in t.items() if k not in _SLOT_KEYS})
                for t in doc["tensors"]
            ),
            layout=doc.get("layout", "linear"),
            word_bits=int(doc.get("word_bits", 8)),
            params=doc.get("params", {}),
        )


_SLOT_KEYS = ("name", "offset", "count")


def linear_layout(tensors: list[tuple[str, int]], num_words: int) -> MemoryMap:
    """Concatenate (name, count) tensors in the given order."""
    if num_words < 1:
        raise InputError("the weight memory must have at least one word")
    slots, offset = [], 0
    for name, count in tensors:
        slots.append(TensorSlot(name, offset, int(count)))
        offset += int(count)
    return MemoryMap(num_words=num_words, tensors=tuple(slots))


# --- layouts as plugins ---------------------------------------------------------------------------


class LayoutTensor(NamedTuple):
    """What a layout knows of one int8 weight tensor.

    `op_type`: the consuming op (Conv, ConvTranspose, Gemm, MatMul; "" when unknown).
    `transposed`: the tensor's (out_channels x fan-in) matrix view is its transpose (Gemm
    without transB, MatMul: a (K, N) weight), as `harden.layer_stats.weight_rows` lays it.
    """

    name: str
    shape: tuple[int, ...]
    op_type: str = ""
    transposed: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of the 2-D matrix view: (out_channels, fan-in)."""
        if self.transposed:
            return int(self.shape[1]), int(self.shape[0])
        if not self.shape:
            return 1, 1
        return int(self.shape[0]), int(math.prod(self.shape[1:]))

    def matrix_index(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) in the matrix view of C-order flat element indices."""
        flat = np.asarray(flat, dtype=np.int64)
        if self.transposed:  # element (k, n) of a (K, N) weight is matrix entry (n, k)
            k, n = np.divmod(flat, int(self.shape[1]))
            return n, k
        return np.divmod(flat, self.matrix_shape[1])

    @classmethod
    def of(cls, name: str, shape, op_type: str = "", attrs: dict | None = None) -> "LayoutTensor":
        """From a consumer op and its attributes (transB of Gemm)."""
        shape = tuple(int(d) for d in shape)
        attrs = attrs or {}
        transposed = len(shape) == 2 and (op_type == "MatMul" or (op_type == "Gemm" and not attrs.get("transB", 0)))
        return cls(name, shape, op_type, transposed)


def as_layout_tensors(tensors) -> list[LayoutTensor]:
    """LayoutTensors from LayoutTensors, QWeights, or (name, shape[, op_type[, transposed]]) tuples."""
    out = []
    for t in tensors:
        if isinstance(t, LayoutTensor):
            out.append(t)
        elif hasattr(t, "op_type") and hasattr(t, "attrs"):  # a QWeight
            out.append(LayoutTensor.of(t.name, t.shape, t.op_type, t.attrs))
        else:
            t = tuple(t)
            out.append(LayoutTensor(str(t[0]), tuple(int(d) for d in t[1]), *t[2:]))
    return out


@dataclass(frozen=True)
class NoParams:
    """A layout without parameters."""


class Layout:
    """A memory layout: where each element of the weight stream lives.

    Subclasses set `name` and `Params` (a frozen dataclass; field types convert text from the
    command line) and implement `place` and `addresses`; `check` and `words_needed` have
    defaults. Register the class under entry-point group `harden.layouts`.
    """

    name: str = ""
    Params: type = NoParams

    def __init__(self, params: Any = None, **kwargs: Any):
        if params is None:
            params = coerce_params(self.Params, kwargs, f"layout {self.name}")
        elif kwargs:
            raise TypeError("give params or keyword arguments, not both")
        self.params = params

    @classmethod
    def from_params(cls, given: dict | None = None) -> "Layout":
        return cls(coerce_params(cls.Params, given, f"layout {cls.name}"))

    @property
    def params_dict(self) -> dict:
        return params_dict(self.params)

    @property
    def spec(self) -> str:
        """NAME or NAME:k=v,... (what --layout takes)."""
        kv = ",".join(f"{k}={v}" for k, v in self.params_dict.items())
        return f"{self.name}:{kv}" if kv else self.name

    def check(self, num_words: int) -> None:
        """InputError when a memory of num_words words cannot hold this layout."""
        if not isinstance(num_words, (int, np.integer)) or num_words < 1:
            raise InputError(f"the weight memory must have at least one word, got {num_words!r}")

    def words_needed(self, tensors: Sequence) -> int:
        """Words of a memory that holds these tensors once (`faultmap generate --for-model`)."""
        return sum(t.size for t in as_layout_tensors(tensors))

    def place(self, tensors: Sequence, num_words: int) -> MemoryMap:
        raise NotImplementedError

    def addresses(self, memory_map: MemoryMap) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<layout {self.spec}>"


class LinearLayout(Layout):
    """DESIGN.md's default: stream element k at address k mod num_words."""

    name = "linear"

    def place(self, tensors: Sequence, num_words: int) -> MemoryMap:
        self.check(num_words)
        return linear_layout([(t.name, t.size) for t in as_layout_tensors(tensors)], int(num_words))

    def addresses(self, memory_map: MemoryMap) -> np.ndarray:
        return np.arange(memory_map.total, dtype=np.int64) % memory_map.num_words


def get_layout(layout: Any = None) -> Layout:
    """A Layout from None (linear), a Layout, a spec "NAME[:k=v,...]", or (NAME, params dict).

    Names resolve through entry-point group `harden.layouts`; InputError (exit 2) for an
    unknown name or a bad parameter.
    """

    if layout is None:
        return LinearLayout()
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, str):
        name, given = plugins.parse_spec(layout, "--layout")
    else:
        name, given = layout
    cls = plugins.load(plugins.LAYOUTS, name)
    if not (isinstance(cls, type) and issubclass(cls, Layout)):
        raise InputError(f"memory layout {name!r} is not a harden.memory.Layout subclass ({cls!r})")
    return cls.from_params(given)


def model_layout_tensors(model) -> list[LayoutTensor]:
    """The weight tensors a model puts in memory, in stream order: its int8 weights for a QDQ
    model, else the float weights quantization will make int8 (same order, same shapes)."""
    import onnx


    weights = m.qdq_weights(model)
    if weights:
        return as_layout_tensors(weights)
    inits = m.initializer_map(model)
    consumer = {}
    for node in model.graph.node:
        name = m.weight_input(node)
        if name is not None:
            consumer.setdefault(name, node)
    out = []
    for name in m.float_weight_names(model):
        node = consumer[name]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out.append(LayoutTensor.of(name, inits[name].dims, node.op_type, attrs))
    return out


def memory_words(model_path: str | os.PathLike, layout: Any = None) -> int:
    """Words of a memory that holds the model's weights once in `layout` (linear: one word per
    weight, `weight_count`)."""
    lay = get_layout(layout)
    if isinstance(lay, LinearLayout):
        return weight_count(model_path)

    proto = m.load_model(model_path)
    if not m.is_qdq_int8(proto):
        m.drop_initializer_inputs(proto)
        proto = m.simplify(proto)
        m.constants_to_initializers(proto)
    tensors = model_layout_tensors(proto)
    if not tensors:
        raise InputError(f"{model_path}: no Conv, ConvTranspose, Gemm, MatMul or embedding (Gather) weights to put in memory")
    return int(lay.words_needed(tensors))


def weight_count(model_path: str | os.PathLike) -> int:
    """How many int8 weights the model puts in weight memory (the default chip size).

    For a QDQ model: its int8 weight tensors. For a float model: the float weights that
    quantization will turn into int8 tensors (after simplification, so weights made by
    Constant/ConstantOfShape nodes count too).
    """

    proto = m.load_model(model_path)
    if m.is_qdq_int8(proto):
        return sum(w.size for w in m.qdq_weights(proto))
    m.drop_initializer_inputs(proto)
    proto = m.simplify(proto)
    m.constants_to_initializers(proto)
    count = m.float_weight_count(proto)
    if not count:
        raise InputError(f"{model_path}: no Conv, ConvTranspose, Gemm, MatMul or embedding (Gather) weights to put in memory")
    return count
