"""Second-order statistics of each weight op's input on calibration data.

For every int8 weight tensor we need, per group of output channels, the input mean E[x]
(bias correction) and H = E[x x^T] (error feedback, METHODS.md / issue 2). A convolution's
input is unfolded into patches (im2col) whose columns follow the weight's C-order flattening
(in_channels/group, kernel...), so a weight row and a patch line up element by element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .data import Dataset
from .lowrank import LowRankGroups
from .model import QWeight
from .runtime import batch_size_for, capture


@dataclass
class LayerStats:
    """Per-group input statistics of one weight op: sum of x, sum of x x^T, row count."""

    groups: int
    sum_x: np.ndarray  # (groups, d)
    sum_xx: np.ndarray | LowRankGroups | None  # (groups, d, d) (as factors when n < d rows), None: means only
    rows: int = 0

    @property
    def mean(self) -> np.ndarray:
        return self.sum_x / max(self.rows, 1)

    def hessian(self, *, release: bool = False) -> np.ndarray | LowRankGroups:
        """E[x x^T] per group. `release`: the sums are divided in place and handed over (these
        stats no longer hold them), which saves a d x d copy per group on wide layers."""
        return self._expectation("sum_xx", release)

    def _expectation(self, field: str, release: bool) -> np.ndarray | LowRankGroups:
        """The sums in `field` divided by the row count (in place and handed over with `release`)."""
        sums = getattr(self, field)
        assert sums is not None
        if not release:
            return sums / max(self.rows, 1)
        setattr(self, field, None)
        sums /= max(self.rows, 1)
        return sums


def supported(w: QWeight) -> bool:
    """Ops whose input we can unfold into the weight's row layout."""
    if w.op_type in ("Gemm", "MatMul"):
        return not w.attrs.get("transA", 0) and len(w.shape) == 2
    if w.op_type == "Conv":
        return len(w.shape) in (3, 4) and w.attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    return False


def weight_rows(w: QWeight, array: np.ndarray) -> np.ndarray:
    """Weight tensor -> (out_channels, d) rows that multiply the unfolded input."""
    if w.op_type == "Conv":
        return array.reshape(array.shape[0], -1)
    if w.op_type == "Gemm" and w.attrs.get("transB", 0):
        return array
    return array.T  # Gemm without transB, MatMul: (K, N) -> (N, K)


def rows_to_weight(w: QWeight, rows: np.ndarray) -> np.ndarray:
    """Inverse of weight_rows."""
    if w.op_type == "Conv":
        return rows.reshape(w.shape)
    if w.op_type == "Gemm" and w.attrs.get("transB", 0):
        return rows
    return rows.T


def unfold(w: QWeight, x: np.ndarray) -> np.ndarray:
    """The op's input as (groups, rows, d) so that output = rows @ weight_row.

    Conv: im2col with pads, strides and dilations; Gemm/MatMul: leading axes flattened.
    """
    if w.op_type in ("Gemm", "MatMul"):
        return x.reshape(1, -1, x.shape[-1])
    spatial = len(w.shape) - 2
    kernel = tuple(w.shape[2:])
    strides = tuple(w.attrs.get("strides", [1] * spatial))
    dil = tuple(w.attrs.get("dilations", [1] * spatial))
    pads = list(w.attrs.get("pads", [0] * (2 * spatial)))
    g = int(w.attrs.get("group", 1))
    pad_width = [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)]
    xp = np.pad(x, pad_width)
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + spatial)))
    # win: N, C, *out_full, *span -> dilate the kernel, stride the output
    idx = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dil)
    win = win[idx]
    n, c = win.shape[:2]
    out = win.shape[2 : 2 + spatial]
    cg = c // g
    win = win.reshape((n, g, cg) + out + kernel)
    # -> g, n, *out, cg, *kernel
    order = (1, 0) + tuple(range(3, 3 + spatial)) + (2,) + tuple(range(3 + spatial, 3 + 2 * spatial))
    win = win.transpose(order)
    return np.ascontiguousarray(win).reshape(g, -1, cg * int(np.prod(kernel)))


#: Input bytes per statistics batch: a batch's unfolded activations (float64 im2col, ~100x the
#: input for a 3x3 convolution) dominate the memory of the statistics; 32 digits are 8 KiB, 32
#: ImageNet images 19 MiB, which unfolded at ResNet-50's second stage made 460 MB arrays.
STATS_BATCH_BYTES = 4 << 20


def stats_batch(data: Dataset, most: int = 32) -> int:
    """Samples per statistics batch: at most `most`, and at most STATS_BATCH_BYTES of input."""
    per_sample = sum(v[:1].nbytes for v in data.inputs.values()) or 1
    return int(max(1, min(most, STATS_BATCH_BYTES // per_sample)))


def evenly_spaced(cols: np.ndarray, n: int) -> np.ndarray:
    """At most `n` of the unfolded rows (axis 1), evenly spaced: a deterministic subsample."""
    r = cols.shape[1]
    return cols if r <= n else cols[:, np.linspace(0, r - 1, n).astype(np.int64)]


class _Gram:
    """Per layer, the sums over batches of w_b x_b^T x_b and, when paired, w_b r_b^T x_b (per
    group), in as few products as memory allows: the picked rows are kept (float32: they are
    float32 activations, so nothing is lost; x once for both sums) until they number d, then
    multiplied at once. A product per batch cost d x d work whatever the rows: ResNet-50's
    fixed batch of 1 gave its 4608-wide layers 18 rows per batch, and 144 products of
    4608 x 4608 took 14 s of its 45 s of statistics (about 18 s in all now). Rows that never
    reach d are never multiplied out: `pop` hands them over as harden.lowrank factors."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray | None, float]]] = {}
        self._sums: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def add(self, name: str, x: np.ndarray, weight: float, r: np.ndarray | None = None) -> None:
        parts = self._parts.setdefault(name, [])
        parts.append((x.astype(np.float32), None if r is None else r.astype(np.float32), float(weight)))
        if sum(p[0].shape[1] for p in parts) >= x.shape[2]:
            self._flush(name)

    def _flush(self, name: str) -> None:
        parts = self._parts.pop(name, [])
        if not parts:
            return
        b = np.concatenate([p[0] for p in parts], axis=1).astype(np.float64)

        def product(i: int) -> np.ndarray:
            a = np.concatenate([p[i].astype(np.float64) * p[2] for p in parts], axis=1)
            return np.matmul(a.transpose(0, 2, 1), b)

        xx, rx = product(0), None if parts[0][1] is None else product(1)
        if name in self._sums:
            sum_xx, sum_rx = self._sums[name]
            sum_xx += xx
            if rx is not None:
                sum_rx += rx
        else:
            self._sums[name] = (xx, rx)

    def pop(self, name: str) -> tuple:
        """(sum_b w_b x_b^T x_b, sum_b w_b r_b^T x_b or None), each (groups, d, d): float64
        arrays, or LowRankGroups when fewer than d rows were picked in all."""
        if name in self._sums:
            self._flush(name)
            return self._sums.pop(name)
        parts = self._parts.pop(name)
        root = np.concatenate([np.full(p[0].shape[1], np.sqrt(p[2])) for p in parts])[None, :, None]
        x = np.concatenate([p[0] for p in parts], axis=1).astype(np.float64) * root
        if parts[0][1] is None:
            return LowRankGroups(x, x), None
        r = np.concatenate([p[1] for p in parts], axis=1).astype(np.float64) * root
        return LowRankGroups(x, x), LowRankGroups(r, x)


def collect(
    model: onnx.ModelProto,
    weights: list[QWeight],
    data: Dataset,
    *,
    with_hessian: bool = True,
    max_rows: int = 8192,
) -> dict[str, LayerStats]:
    """Input statistics for every supported weight op, in one streamed pass over `data`.

    H is accumulated in float64 from at most `max_rows` unfolded rows per layer (evenly spaced,
    so the result is deterministic); means use every row.
    """
    layers = [w for w in weights if supported(w)]
    stats: dict[str, LayerStats] = {}
    batch = batch_size_for(model, stats_batch(data))  # a fixed-batch model runs its own batch
    n_batches = max(1, -(-len(data) // batch))
    per_batch = max(1, max_rows // n_batches)
    gram = _Gram()

    def on_batch(acts: dict[str, np.ndarray]) -> None:
        for w in layers:
            cols = unfold(w, acts[w.activation].astype(np.float64))
            g, r, d = cols.shape
            st = stats.get(w.name)
            if st is None:
                st = stats[w.name] = LayerStats(
                    groups=g, sum_x=np.zeros((g, d)), sum_xx=np.zeros(0) if with_hessian else None
                )
            st.sum_x += cols.sum(axis=1)
            if with_hessian:
                pick = evenly_spaced(cols, per_batch)
                gram.add(w.name, pick, r / pick.shape[1])
            st.rows += r

    names = sorted({w.activation for w in layers})
    if names:
        capture(model, data, names, on_batch, batch_size=batch)
    if with_hessian:
        for name, st in stats.items():
            st.sum_xx = gram.pop(name)[0]
    return stats


@dataclass
class PairedStats(LayerStats):
    """LayerStats of one op's input in the model being hardened (x), paired sample by sample
    with its input in the reference model (r): what a layer needs to absorb the error that the
    layers before it left (`harden.compensate.absorbing_targets`)."""

    sum_r: np.ndarray | None = None  # (groups, d) sum of r
    sum_rx: np.ndarray | LowRankGroups | None = None  # (groups, d, d) sum of r x^T
    #: the picked rows whose products give sum_xx and sum_rx, multiplied on first use: a stage's
    #: layers then hold rows, not d x d sums, until each is remapped
    pending: tuple | None = None

    def _products(self) -> None:
        if self.pending is not None:
            gram, name = self.pending
            self.sum_xx, self.sum_rx = gram.pop(name)
            self.pending = None

    def hessian(self, *, release: bool = False) -> np.ndarray | LowRankGroups:
        self._products()
        return super().hessian(release=release)

    @property
    def mean_ref(self) -> np.ndarray:
        assert self.sum_r is not None
        return self.sum_r / max(self.rows, 1)

    def cross(self, *, release: bool = False) -> np.ndarray | LowRankGroups:
        """E[r x^T] per group (`release` as for `hessian`)."""
        self._products()
        return self._expectation("sum_rx", release)


def collect_paired(
    reference: onnx.ModelProto,
    model: onnx.ModelProto,
    weights: list[QWeight],
    data: Dataset,
    *,
    max_rows: int = 8192,
    max_kept: int = 1 << 21,
) -> dict[str, PairedStats]:
    """Input statistics of weight ops in `model` and across to `reference`, on the same unfolded
    rows of the same samples: two streamed passes, each running only the prefix the ops' inputs
    need. The reference's picked rows are kept between the passes (float32, at most `max_rows`
    per op and `max_kept` values per op, so a 4608-wide ResNet-50 layer keeps 455 rows; layers
    up to 256 wide keep all 8192)."""
    batch = batch_size_for(model, stats_batch(data))  # a fixed-batch model runs its own batch
    n_batches = max(1, -(-len(data) // batch))
    layers = [w for w in weights if supported(w)]
    kept: dict[str, list] = {w.name: [] for w in layers}
    stats: dict[str, PairedStats] = {}
    seen = [0]
    gram = _Gram()

    def rows_of(w: QWeight, acts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
        cols = unfold(w, acts[w.activation].astype(np.float64))
        g, r, d = cols.shape
        per_batch = max(1, min(max_rows, max(64, max_kept // max(g * d, 1))) // n_batches)
        return cols, evenly_spaced(cols, per_batch), r

    def on_reference(acts: dict[str, np.ndarray]) -> None:
        for w in layers:
            cols, pick, _ = rows_of(w, acts)
            kept[w.name].append((pick.astype(np.float32), cols.sum(axis=1)))

    def on_model(acts: dict[str, np.ndarray]) -> None:
        b = seen[0]
        seen[0] += 1
        for w in layers:
            cols, pick, r = rows_of(w, acts)
            ref_pick, ref_sum = kept[w.name][b]
            kept[w.name][b] = None  # used: free it
            g, _, d = cols.shape
            st = stats.get(w.name)
            if st is None:
                st = stats[w.name] = PairedStats(groups=g, sum_x=np.zeros((g, d)), sum_xx=np.zeros(0),
                                                 sum_r=np.zeros((g, d)), sum_rx=np.zeros(0))  # products: at the end
            weight = r / pick.shape[1]
            st.sum_x += cols.sum(axis=1)
            st.sum_r += ref_sum
            gram.add(w.name, pick, weight, ref_pick)
            st.rows += r

    names = sorted({w.activation for w in layers})
    if names:
        capture(reference, data, names, on_reference, batch_size=batch)
        capture(model, data, names, on_model, batch_size=batch)
    for name, st in stats.items():  # the d x d products when the layer asks for them
        st.pending = (gram, name)
    return stats


def stages(weights: list[QWeight], max_stages: int) -> list[list[QWeight]]:
    """The supported weights in graph order, cut into at most `max_stages` runs of consecutive
    ops: sequential compensation collects one stage's statistics in one pair of passes, so a
    deep model (ResNet-50: 54 ops) costs 2 x max_stages prefix passes, not 2 x 54."""
    layers = [w for w in weights if supported(w)]
    if not layers:
        return []
    return [list(part) for part in np.array_split(np.array(layers, dtype=object), min(max_stages, len(layers)))]
