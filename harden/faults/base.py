"""What every fault model shares: the weight space it injects into, and the injection it returns.

A fault model (`FaultModel`) draws, from a numpy Generator, an `Injection`: which bits of which
int8 weight / int32 bias elements are flipped or stuck. Injections are sparse: per tensor the
sorted flat indices of the hit elements and one mask per element (`flip` is XORed on the unsigned
view, then `(v & ~sa0) | sa1` forces stuck cells, as DESIGN.md reads a faulty word). Only the
hit positions are ever drawn or stored; `apply` copies just the tensors that are hit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import onnx

from ..errors import InputError
from ..memory import (
    LayoutTensor,
    MemoryMap,
    as_layout_tensors,
    get_layout,
    linear_layout,
)
from ..model import initializer_map, qdq_weights

_UNSIGNED = {
    np.dtype(np.int8): np.dtype(np.uint8),
    np.dtype(np.uint8): np.dtype(np.uint8),
    np.dtype(np.int32): np.dtype(np.uint32),
    np.dtype(np.float32): np.dtype(np.uint32),  # float32 weights of a float model (faults/fp32.py)
}


@dataclass(frozen=True)
class Tensor:
    """One injectable tensor: an int8 weight (`kind` "weight"), an int32 bias ("bias"), a
    quantized activation ("activation", uint8/int8, shape [samples, ...], faults/activation.py),
    or a float32 weight of a float model ("weight", dtype float32, faults/fp32.py; its bits are
    those of the uint32 view)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    kind: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        """Bits per element (8 or 32)."""
        return np.dtype(self.dtype).itemsize * 8

    @property
    def cells(self) -> int:
        """Bit cells of the whole tensor."""
        return self.size * self.bits

    @property
    def unsigned(self) -> np.dtype:
        return _UNSIGNED[np.dtype(self.dtype)]


@dataclass(frozen=True)
class WeightSpace:
    """The int8 weight tensors (in the `linear` layout order of DESIGN.md) and int32 biases of
    a QDQ model: everything a fault model may hit."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...] = ()
    # What a memory layout needs of each weight (consumer op, matrix view), in `weights` order;
    # empty: only names and shapes are known (enough for `linear`).
    layout_tensors: tuple[LayoutTensor, ...] = ()

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> WeightSpace:
        inits = initializer_map(model)
        table = qdq_weights(model)
        weights = tuple(Tensor(w.name, np.dtype(np.int8), tuple(w.shape), "weight") for w in table)
        biases = tuple(
            Tensor(w.bias, np.dtype(np.int32), tuple(inits[w.bias].dims), "bias") for w in table if w.bias
        )
        return cls(weights, biases, tuple(as_layout_tensors(table)))

    def of_kind(self, kind: str) -> tuple[Tensor, ...]:
        """"weight" or "bias" tensors."""
        if kind == "weight":
            return self.weights
        if kind == "bias":
            return self.biases
        raise ValueError(f"unknown tensor kind {kind!r}")

    @property
    def weight_count(self) -> int:
        """int8 weights, i.e. words of a weight memory that holds the model once."""
        return sum(t.size for t in self.weights)

    def memory_map(self, num_words: int, layout=None) -> MemoryMap:
        """The weights laid out in a memory of num_words words (as `apply` lays them); `layout`:
        None (linear), a harden.memory.Layout, or a spec such as "tiled:rows=128,cols=128"."""
        if layout is None:
            return linear_layout([(t.name, t.size) for t in self.weights], num_words)
        tensors = self.layout_tensors or tuple(LayoutTensor(t.name, tuple(t.shape)) for t in self.weights)
        return get_layout(layout).place(tensors, num_words)

    def memory_words(self, layout=None) -> int:
        """Words of a memory that holds the weights once in `layout` (linear: weight_count)."""
        if layout is None:
            return self.weight_count
        tensors = self.layout_tensors or tuple(LayoutTensor(t.name, tuple(t.shape)) for t in self.weights)
        return int(get_layout(layout).words_needed(tensors))

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.weights + self.biases if t.name == name)


class Fault(NamedTuple):
    """One faulty bit cell: element `index` (flat, C order) of `tensor`, bit `bit` (0 = LSB),
    `kind` "flip", "sa0" or "sa1". `changes`: whether it alters the stored value (a flip always
    does; a stuck cell only when the stored bit differs), None when not known."""

    tensor: str
    index: int
    bit: int
    kind: str
    changes: bool | None = None


@dataclass(frozen=True, eq=False)
class TensorFaults:
    """The hit elements of one tensor: sorted unique flat `index`, and per element the masks
    (in the tensor's unsigned dtype) of flipped, stuck-at-0 and stuck-at-1 bits (None = none)."""

    name: str
    index: np.ndarray
    flip: np.ndarray | None = None
    sa0: np.ndarray | None = None
    sa1: np.ndarray | None = None

    def read(self, stored: np.ndarray) -> np.ndarray:
        """Faulty values (unsigned) of the hit elements, given their stored unsigned values."""
        w = stored
        if self.flip is not None:
            w = w ^ self.flip
        if self.sa0 is not None:
            w = w & ~self.sa0
        if self.sa1 is not None:
            w = w | self.sa1
        return w


@dataclass(frozen=True, eq=False)
class Injection:
    """The faults of one trial, tensor by tensor (tensors without a hit are left out)."""

    tensors: tuple[TensorFaults, ...] = ()
    count: int | None = None  # faulty cells, when the sampler knows it (saves a popcount)

    @property
    def cells(self) -> int:
        """Faulty bit cells (flipped or stuck)."""
        if self.count is not None:
            return self.count
        n = 0
        for tf in self.tensors:
            for m in (tf.flip, tf.sa0, tf.sa1):
                if m is not None:
                    n += _popcount(m)
        return n

    def apply(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A new dict: `values` with every hit tensor replaced by a faulty copy (others shared)."""
        out = dict(values)
        for tf in self.tensors:
            v = np.asarray(values[tf.name])
            u = np.array(v, copy=True, order="C").reshape(-1).view(_UNSIGNED[v.dtype])
            u[tf.index] = tf.read(u[tf.index])
            out[tf.name] = u.view(v.dtype).reshape(v.shape)
        return out

    def faults(self, values: dict[str, np.ndarray] | None = None) -> list[Fault]:
        """Every faulty cell, by tensor (injection order), index, bit. With the clean `values`,
        each fault also says whether it changes the stored bit."""
        out: list[Fault] = []
        for tf in self.tensors:
            bits = None
            for kind, m in (("flip", tf.flip), ("sa0", tf.sa0), ("sa1", tf.sa1)):
                if m is None:
                    continue
                row, bit = np.nonzero(_bit_matrix(m))
                if values is not None:
                    if bits is None:
                        stored = np.ascontiguousarray(values[tf.name]).reshape(-1).view(m.dtype)[tf.index]
                        bits = _bit_matrix(stored)
                    if kind == "flip":
                        changes = np.ones(row.shape, bool)
                    else:
                        changes = bits[row, bit] == (1 if kind == "sa0" else 0)
                else:
                    changes = None
                for j in range(row.size):
                    out.append(Fault(tf.name, int(tf.index[row[j]]), int(bit[j]), kind,
                                     None if changes is None else bool(changes[j])))
        order = {tf.name: i for i, tf in enumerate(self.tensors)}
        out.sort(key=lambda f: (order[f.tensor], f.index, f.bit))
        return out


def _bit_matrix(m: np.ndarray) -> np.ndarray:
    """[n, bits] 0/1 matrix of unsigned masks, column b = bit b (LSB first)."""
    m = np.asarray(m)
    nbytes = m.dtype.itemsize
    as_bytes = m.astype(m.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(-1, nbytes)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")


def _popcount(m: np.ndarray) -> int:
    return int(np.unpackbits(np.ascontiguousarray(m).view(np.uint8)).sum(dtype=np.int64))


class FaultModel:
    """The base of every fault model: the whole protocol the campaign uses, with its defaults.

    A subclass sets `name` (the registry name) and implements `sample`; everything else has a
    default. Parameters live in a dataclass (`params`); `label` names one campaign point
    (e.g. "bitflip:0.001").

    - `deterministic`: every draw is the same (a given chip), so one trial measures it exactly.
    - `space_kind`: the session a trial runs on: "weights" (int8 weights and int32 biases, the
      default), "activations", "analog" or "fp32" (campaign.SESSION_KINDS); the campaign hands
      `check` and `sample` that session's space.
    - `precision`: the model it needs: "int8" (an int8 QDQ model, the default) or "float".
    - `check(space)` raises InputError when the model cannot apply (called before any work).
    - `sample(rng, space)` draws everything from `rng` alone, so that a trial is reproducible
      from the generator's seed.
    - `describe()` is the report's record (default: `name` and the fields of `params`).
    - `targets(space)` (the tensors it may hit) and `restricted(names)` (the same model limited
      to those tensors) make `--per-layer` possible; `restrictable` says whether both exist.
    """

    name: str = "fault"
    deterministic: bool = False
    space_kind: str = "weights"
    precision: str = "int8"

    @property
    def label(self) -> str:
        return self.name

    @property
    def params(self) -> Any:
        return None

    def check(self, space: WeightSpace) -> None:
        """Raise InputError when this model cannot apply to `space` (default: it always can)."""

    def sample(self, rng: np.random.Generator, space: WeightSpace) -> Injection:
        raise NotImplementedError(f"fault model {self.name!r} does not implement sample(rng, space)")

    def describe(self) -> dict:
        params = self.params
        return {"name": self.name, **(asdict(params) if is_dataclass(params) else {})}

    def targets(self, space: WeightSpace) -> tuple[Tensor, ...]:
        """The tensors this model may hit (default: every int8 weight tensor)."""
        return space.weights

    @property
    def restrictable(self) -> bool:
        """Whether `restricted` is implemented (and so `--per-layer` can use this model)."""
        return type(self).restricted is not FaultModel.restricted

    @property
    def restriction(self) -> tuple[str, ...] | None:
        """The tensors this model is already limited to (None: unrestricted)."""
        return None

    def restricted(self, names: tuple[str, ...]) -> "FaultModel":
        raise InputError(f"--per-layer: fault model {self.name!r} cannot be restricted to one tensor")


class Session:
    """The session a campaign's trials run on (one per `space_kind`): the protocol with defaults.

    A session holds one rewrite of the model on one data set: `space` (what a fault model's
    `sample` draws over), `model` (the graph it runs), `clean_logits` / `clean` (its fault-free
    outputs and top-1), and `predictions(injection)` (one inference pass under a trial's faults; `predictions_many`
    and `stack` for a session that runs several trials per pass).
    `values`: the clean tensors an injection applies to, when they are weights (None for
    activations). Optional, with defaults: `ops` (tensor -> (op type, node name)),
    `compare_fused(logits)` and `session_info()` for the report. The int8 weight session
    (campaign/sessions.py: WeightSession) is one kind among activations, analog and fp32.
    """

    space: Any
    model: onnx.ModelProto
    clean_logits: np.ndarray
    clean: np.ndarray
    values: dict[str, np.ndarray] | None = None
    ops: dict[str, tuple[str, str]] = {}

    def predictions(self, injection: "Injection | None" = None) -> np.ndarray:
        raise NotImplementedError

    #: How many trials one inference pass runs (stacking.py); trial t runs at position
    #: t % stack of its group, whoever runs it.
    stack: int = 1

    def predictions_many(self, injections: "list[Injection | None]") -> list[np.ndarray]:
        """`predictions(i)` for each injection (a session that runs several trials per pass
        overrides this)."""
        return [self.predictions(i) for i in injections]

    def compare_fused(self, fused_logits: np.ndarray) -> dict:
        """How this session's clean outputs compare with the weight session's (default: nothing more)."""
        return {}

    def session_info(self) -> dict:
        """What the session says of itself in the report (default: nothing)."""
        return {}

    def describe_faults(self, injection: "Injection") -> list["Fault"]:
        """Every faulty cell of an injection: against the clean values when there are some (so
        a stuck cell that agrees with the stored bit is marked as changing nothing), else every
        flip changes its bit."""
        if self.values is None:
            return [f._replace(changes=True) if f.kind == "flip" else f for f in injection.faults(None)]
        return injection.faults(self.values)


# --- sparse drawing --------------------------------------------------------------------------


def sample_positions(rng: np.random.Generator, population: int, rate: float) -> np.ndarray:
    """Positions of the faulty cells among `population` cells, each faulty with probability
    `rate` independently: a binomial count, then that many distinct positions (sorted int64).
    Never a full random mask, except when more than half the cells are faulty (then the healthy
    ones are drawn)."""
    count = int(rng.binomial(population, rate)) if population else 0
    return sample_k(rng, population, count)


def sample_k(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    """k distinct sorted positions in [0, population), uniformly."""
    if k <= population // 2:
        return _distinct(rng, population, k)
    keep = np.ones(population, dtype=bool)
    keep[_distinct(rng, population, population - k)] = False
    return np.flatnonzero(keep)


def _distinct(rng: np.random.Generator, population: int, k: int) -> np.ndarray:
    """Draw with replacement, drop repeats, top up (a uniform k-subset; O(k) memory). A top-up
    is sorted alone and merged into the sorted picks by a stable sort (timsort: two runs, linear),
    not sorted again with them, and positions below 2**31 are sorted as int32: 3x faster on a
    0.04 stuck-at draw of the MobileNetV2 (8,775 of 219,392 cells), the same positions."""
    narrow = np.int32 if population <= np.iinfo(np.int32).max else np.int64  # int32 sorts twice as fast
    chosen = np.empty(0, dtype=narrow)
    while chosen.size < k:
        draw = np.sort(rng.integers(0, population, size=k - chosen.size, dtype=np.int64).astype(narrow))
        merged = np.sort(np.concatenate((chosen, draw)), kind="stable") if chosen.size else draw
        chosen = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]
    return chosen.astype(np.int64)


def group_cells(
    tensors: tuple[Tensor, ...], positions: np.ndarray, labels: np.ndarray | None = None
) -> list[tuple[Tensor, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Split sorted positions in the concatenated bit space of `tensors` (all of one element
    width: cell (element e, bit b) of tensor t at offset_t + e * bits + b) into per-tensor
    (tensor, element index, bit mask per element, label mask per element). `labels` (bool per
    position) makes a second mask of the bits whose label is True (stuck at 1 rather than 0);
    None when not given. Vectorised over all tensors at once; the loop only slices."""
    if positions.size == 0 or not tensors:
        return []
    bits = tensors[0].bits
    if any(t.bits != bits for t in tensors):
        raise ValueError("group_cells takes tensors of one element width")
    ud = tensors[0].unsigned
    elem, bit = np.divmod(positions, bits)
    bitval = np.left_shift(ud.type(1), bit.astype(ud))
    starts = np.flatnonzero(np.concatenate(([True], elem[1:] != elem[:-1])))
    mask = np.bitwise_or.reduceat(bitval, starts)
    lab = None
    if labels is not None:
        lab = np.bitwise_or.reduceat(np.where(labels, bitval, ud.type(0)), starts)
    elem = elem[starts]
    offsets = np.cumsum([0] + [t.size for t in tensors], dtype=np.int64)
    cuts = np.searchsorted(elem, offsets)
    out = []
    for i, t in enumerate(tensors):
        lo, hi = cuts[i], cuts[i + 1]
        if lo < hi:
            out.append((t, elem[lo:hi] - offsets[i], mask[lo:hi], None if lab is None else lab[lo:hi]))
    return out


def select_tensors(
    candidates: tuple[Tensor, ...], names: tuple[str, ...] | None, what: str
) -> tuple[Tensor, ...]:
    """The `candidates` named in `names` (all of them when None), in the candidates' own order,
    so that a restriction to every tensor draws exactly what the unrestricted model draws.
    InputError on a name that is not a candidate."""

    if names is None:
        return candidates
    known = {t.name for t in candidates}
    unknown = [n for n in names if n not in known]
    if unknown:
        listed = ", ".join(t.name for t in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise InputError(f"{what}: no such tensor {unknown[0]!r} (it can hit: {listed or 'nothing'})")
    wanted = set(names)
    return tuple(t for t in candidates if t.name in wanted)


def check_tensor_names(names, what: str) -> tuple[str, ...] | None:
    """Normalise a `tensors` parameter: None, or a non-empty tuple of distinct names."""

    if names is None:
        return None
    if isinstance(names, str):
        names = (names,)
    try:
        out = tuple(names)
    except TypeError:
        raise InputError(f"{what}: tensors must be a list of tensor names, got {names!r}") from None
    if not out or not all(isinstance(n, str) and n for n in out):
        raise InputError(f"{what}: tensors must be a non-empty list of tensor names, got {names!r}")
    if len(set(out)) != len(out):
        raise InputError(f"{what}: tensors lists a name twice: {names!r}")
    return out


def tensors_suffix(names: tuple[str, ...] | None) -> str:
    """The label suffix of a restricted model: "" or "@name" / "@a+b"."""
    return "" if names is None else "@" + "+".join(names)


def parse_rates(name: str, args: str, example: str = "1e-4,1e-3") -> list[float]:
    """`1e-4,1e-3` -> [1e-4, 1e-3]; each a probability in [0, 1] (InputError otherwise)."""

    if not args.strip():
        raise InputError(f"fault model {name!r} needs one or more rates, e.g. {name}:{example}")
    rates = []
    for item in args.split(","):
        text = item.strip()
        try:
            r = float(text)
        except ValueError:
            raise InputError(f"{name}: {text!r} is not a number (rates are comma-separated, e.g. {name}:{example})") from None
        if not 0.0 <= r <= 1.0:  # also rejects NaN
            raise InputError(f"{name}: rate {text} is outside [0, 1]")
        rates.append(r)
    return rates


def describe_params(name: str, params, **extra) -> dict:
    """A fault model's record for the report: its name and parameters (tensors only if restricted)."""
    d = {"name": name, **asdict(params), **extra}
    if d.get("tensors") is None:
        d.pop("tensors", None)
    else:
        d["tensors"] = list(d["tensors"])
    return d


class ParamsFaultModel(FaultModel):
    """Plumbing shared by the fault models whose parameters are a frozen dataclass with a
    `tensors` restriction: the `params` property, a `NAME:RATE[@tensors]` label, the report
    record (plus `describe_extra`) and `restricted`. Subclasses set `name` and do the physics."""

    describe_extra: dict = {}

    def __init__(self, params) -> None:
        self._params = params

    @property
    def params(self):
        return self._params

    @property
    def label(self) -> str:
        return f"{self.name}:{self._params.rate:g}{tensors_suffix(self._params.tensors)}"

    def describe(self) -> dict:
        return describe_params(self.name, self._params, **self.describe_extra)

    @property
    def restriction(self) -> tuple[str, ...] | None:
        return self._params.tensors

    def restricted(self, names):
        """The same faults limited to the named tensors."""
        return type(self)(replace(self._params, tensors=check_tensor_names(names, self.name)))
