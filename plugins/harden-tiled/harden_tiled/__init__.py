"""`tiled`: a crossbar memory layout for processing-in-memory accelerators (a harden plugin).

Registered as entry point `tiled` in group `harden.layouts` (see pyproject.toml), so that
`harden ... --layout tiled:rows=128,cols=128` and `harden.memory.get_layout("tiled:rows=128,cols=128")`
find it. The mapping (README.md):

    matrix view of each weight tensor (out_channels x fan-in) -> rows x cols blocks, row-major
    each block in its own tile, tiles numbered consecutively over the tensors in stream order
    entry (r, c) of tile t -> address (t*rows*cols + (r % rows)*cols + c % cols) mod num_words
    num_words must be a multiple of rows*cols
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harden.errors import InputError
from harden.memory import Layout, MemoryMap, TensorSlot, as_layout_tensors

__all__ = ["TiledLayout", "TiledParams"]
__version__ = "0.1.0"


@dataclass(frozen=True)
class TiledParams:
    """rows, cols: cells (words) per crossbar tile, e.g. 128 x 128."""

    rows: int = 128
    cols: int = 128

    def __post_init__(self) -> None:
        for key in ("rows", "cols"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 1 << 20:
                raise InputError(f"{key} must be an integer in [1, 1048576], got {v!r}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class TiledLayout(Layout):
    """Weight matrices cut into rows x cols blocks, one block per crossbar tile."""

    name = "tiled"
    Params = TiledParams

    @property
    def tile_words(self) -> int:
        return self.params.rows * self.params.cols

    def check(self, num_words: int) -> None:
        super().check(num_words)
        tw = self.tile_words
        if num_words % tw:
            up = _ceil_div(num_words, tw) * tw
            raise InputError(
                f"layout {self.spec} needs a memory of whole {self.params.rows} x {self.params.cols} tiles "
                f"(a multiple of {tw} words), but the memory has {num_words} words (e.g. {up} would do)"
            )

    def _tiles(self, matrix: tuple[int, int]) -> int:
        return _ceil_div(matrix[0], self.params.rows) * _ceil_div(matrix[1], self.params.cols)

    def words_needed(self, tensors) -> int:
        return sum(self._tiles(t.matrix_shape) for t in as_layout_tensors(tensors)) * self.tile_words

    def place(self, tensors, num_words: int) -> MemoryMap:
        self.check(num_words)
        slots, offset, tile = [], 0, 0
        for t in as_layout_tensors(tensors):
            matrix = t.matrix_shape
            n = self._tiles(matrix)
            extra = {"matrix": list(matrix), "transposed": bool(t.transposed), "tile": tile, "tiles": n}
            slots.append(TensorSlot(t.name, offset, t.size, extra))
            offset += t.size
            tile += n
        return MemoryMap(num_words=int(num_words), tensors=tuple(slots), layout=self.name, params=self.params_dict)

    def addresses(self, memory_map: MemoryMap) -> np.ndarray:
        self.check(memory_map.num_words)
        R, C = self.params.rows, self.params.cols
        out = np.empty(memory_map.total, dtype=np.int64)
        for slot in memory_map.tensors:
            try:
                (m, k), transposed, tile0 = slot.extra["matrix"], bool(slot.extra["transposed"]), int(slot.extra["tile"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"memory map: tensor {slot.name!r} lacks the tiled layout's matrix/transposed/tile fields") from None
            if int(m) * int(k) != slot.count:
                raise InputError(f"memory map: tensor {slot.name!r} has {slot.count} weights but a {m} x {k} matrix")
            j = np.arange(slot.count, dtype=np.int64)
            if transposed:
                c, r = np.divmod(j, int(m))
            else:
                r, c = np.divmod(j, int(k))
            tile = tile0 + (r // R) * _ceil_div(int(k), C) + c // C
            out[slot.offset : slot.offset + slot.count] = tile * (R * C) + (r % R) * C + c % C
        out %= memory_map.num_words
        return out
