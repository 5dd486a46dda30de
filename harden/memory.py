"""Where each int8 weight lives in the chip's weight memory, and the `harden.memory_map` record.

Layout `linear` (DESIGN.md): the int8 weight tensors in order of first consumer, flattened in C
order and concatenated into one stream; stream element k lives at address k mod num_words.
A layout turns that stream into per-element addresses; everything downstream (FAQ, chip
read-back) works on the stream, so a new layout only has to provide `stream_addresses`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class TensorSlot:
    """A weight tensor's place in the stream: elements [offset, offset + count)."""

    name: str
    offset: int
    count: int


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
        """The address of every stream element (linear: k mod num_words)."""
        if self.layout != "linear":
            raise InputError(f"unknown memory layout {self.layout!r}")
        return np.arange(self.total, dtype=np.int64) % self.num_words

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
        if self.layout == "linear":
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
            "tensors": [asdict(t) for t in self.tensors],
        }
        return json.dumps(doc, sort_keys=False, separators=(", ", ": "))

    @classmethod
    def from_json(cls, text: str) -> "MemoryMap":
        doc = json.loads(text)
        return cls(
            num_words=int(doc["num_words"]),
            tensors=tuple(TensorSlot(t["name"], int(t["offset"]), int(t["count"])) for t in doc["tensors"]),
            layout=doc.get("layout", "linear"),
            word_bits=int(doc.get("word_bits", 8)),
            params=doc.get("params", {}),
        )


def linear_layout(tensors: list[tuple[str, int]], num_words: int) -> MemoryMap:
    """Concatenate (name, count) tensors in the given order."""
    if num_words < 1:
        raise InputError("the weight memory must have at least one word")
    slots, offset = [], 0
    for name, count in tensors:
        slots.append(TensorSlot(name, offset, int(count)))
        offset += int(count)
    return MemoryMap(num_words=num_words, tensors=tuple(slots))


def weight_count(model_path: str | os.PathLike) -> int:
    """How many int8 weights the model puts in weight memory (the default chip size).

    For a QDQ model: its int8 weight tensors. For a float model: the float weights that
    quantization will turn into int8 tensors (after simplification, so weights made by
    Constant/ConstantOfShape nodes count too).
    """
    from . import model as m

    proto = m.load_model(model_path)
    if m.is_qdq_int8(proto):
        return sum(w.size for w in m.qdq_weights(proto))
    m.drop_initializer_inputs(proto)
    proto = m.simplify(proto)
    m.constants_to_initializers(proto)
    count = m.float_weight_count(proto)
    if not count:
        raise InputError(f"{model_path}: no Conv, ConvTranspose, Gemm or MatMul weights to put in memory")
    return count
