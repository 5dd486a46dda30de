"""FAQ for one chip: lay the int8 weights out in memory, remap the ones on faulty words.

Steps (METHODS.md section 1, DESIGN.md step 5, issue 2):
1. The memory layout of the int8 weight tensors (`linear` unless another layout plugin is
   given, e.g. "tiled:rows=128,cols=128"); the chip's stuck masks under every weight.
2. One FAQ lookup table for the fault patterns present.
3. Per weight tensor in graph order, per group of output rows: error feedback onto healthy
   weights with the calibration Hessian (optional), then the table gather, then bias correction
   of the mean residual error (optional). Sequential (default): each layer's statistics come
   from the model with the layers before it already hardened, paired with the plain model's, and
   its targets first absorb the error those layers left (compensate.absorbing_targets).
4. `harden.memory_map`, `harden.faultmap` and `harden.version` metadata.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnx

from .. import __version__
from ..allocator import release_memory
from ..compensate import absorbing_targets, bias_delta, remap_rows
from ..faq_table import FAQTable, faq_remap, pattern_keys
from ..faultmap import FaultMap, read_back
from ..layer_stats import PairedStats, collect, collect_paired, rows_to_weight, stages, supported, weight_rows
from ..memory import MemoryMap, as_layout_tensors, get_layout, linear_layout
from ..model import (TABLE_OPS, QWeight, channel_sign_scales, get_initializer, mean_free_tables, qdq_weights, row_axis, set_initializer,
                     set_metadata)
from . import Pass, PassContext, PassResult

INT32 = np.iinfo(np.int32)
#: Sequential compensation's stages: up to 16 (per layer on the small models measured in
#: docs/results.md), fewer on large models, where each stage costs two passes of the model's
#: prefix over the calibration data (ResNet-50, 25.5 M weights: 2 stages, for issue 12's 3-minute
#: apply; 4 stages cost it 74 s of FAQ against 37 s joint).
MAX_STAGES, STAGE_WEIGHTS, MIN_STAGES = 16, 2_000_000, 2


def stages_for(num_weights: int) -> int:
    """How many stages sequential compensation uses for a model of `num_weights` weights."""
    return max(MIN_STAGES, min(MAX_STAGES, int(MAX_STAGES * STAGE_WEIGHTS / max(num_weights, 1))))


def memory_map_for(model: onnx.ModelProto, num_words: int, layout=None) -> MemoryMap:
    """A QDQ model's int8 weights laid out in a memory of num_words words.

    `layout`: None (linear, DESIGN.md's default), a harden.memory.Layout, a spec string
    "NAME[:k=v,...]" or (NAME, params dict); names resolve through `harden.layouts` entry points.
    InputError (exit 2) for an unknown layout or a memory size the layout cannot use.
    """
    if layout is None:
        return linear_layout([(w.name, w.size) for w in qdq_weights(model)], num_words)
    return get_layout(layout).place(as_layout_tensors(qdq_weights(model)), num_words)


def faultmap_record(fm: FaultMap) -> dict:
    """The `harden.faultmap` metadata value."""
    return {"crc32": fm.crc32, "num_words": fm.num_words, "num_records": fm.num_records, "chip_id": fm.chip_id}


def _targets(w: QWeight, codes: np.ndarray, float_weight: np.ndarray | None) -> np.ndarray:
    """What each weight should read back as, in code units: the float weight / scale if known."""
    if float_weight is None:
        return codes.astype(np.float32)
    scale = w.scale
    if scale.ndim:
        shape = [1] * len(w.shape)
        shape[w.axis] = -1
        scale = scale.reshape(shape)
    return (float_weight / scale).astype(np.float32)


def _channel_shaped(w: QWeight, per_channel: np.ndarray) -> np.ndarray:
    """A per-output-channel vector (or a single value) shaped to broadcast against the weight."""
    if per_channel.size == 1:
        return per_channel.reshape(())
    shape = [1] * len(w.shape)
    shape[row_axis(w)] = -1
    return per_channel.reshape(shape)


def _row_scale(w: QWeight, rows: int) -> np.ndarray:
    return np.broadcast_to(w.scale.astype(np.float64).ravel(), (rows,)) if w.scale.size in (1, rows) else np.ones(rows)


def calibration_stats(model: onnx.ModelProto, ctx: PassContext, samples: int, with_hessian: bool) -> dict:
    """The int8 model's layer-input statistics, computed once per context (chip independent)."""
    key = (samples, with_hessian)
    if key not in ctx.layer_stats:
        ctx.layer_stats[key] = collect(model, qdq_weights(model), ctx.calib.take(samples), with_hessian=with_hessian)
    return ctx.layer_stats[key]


class FAQPass(Pass):
    """Fault-aware quantization for one chip, with error feedback and bias correction."""

    name = "faq"
    requires = frozenset({"int8"})
    provides = frozenset({"hardened"})
    in_place = True

    def note(self, record: dict) -> str:
        return (f"{record['on_faulty_words']} weights on faulty words, {record['changed']} codes changed, "
                f"{record['forced']} absorbed by error feedback, {record['negated_channels']} channels stored negated, "
                + (f"{record['shifted_rows']} table rows shifted, " if record.get("shifted_rows") else "")
                + f"{record['bias_corrected']} biases corrected")

    def __init__(self, faultmap: FaultMap, *, compensate: bool = True, bias_correction: bool = True, calib_samples: int = 256,
                 layout=None, sequential: bool = True, max_stages: int | None = None, sign_choice: bool = True):
        self.faultmap = faultmap
        self.sign_choice = sign_choice and compensate
        self.sequential = sequential and compensate
        self.max_stages = max_stages
        self.layout = None if layout is None else get_layout(layout)  # None: linear
        self.compensate = compensate
        self.bias_correction = bias_correction
        self.calib_samples = calib_samples

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        fm = self.faultmap
        weights = qdq_weights(model)
        signable = channel_sign_scales(model, weights) if self.sign_choice else {}
        mean_free = mean_free_tables(model, weights) if self.compensate else set()
        mm = memory_map_for(model, fm.num_words, self.layout)
        t0 = time.perf_counter()
        sa0_s, sa1_s = mm.stream_masks(fm)
        faulty_s = np.flatnonzero((sa0_s | sa1_s) != 0)
        table = FAQTable.build(pattern_keys(sa0_s[faulty_s], sa1_s[faulty_s]))
        t_table = time.perf_counter() - t0

        t0 = time.perf_counter()
        need_stats = self.compensate or self.bias_correction
        stats = calibration_stats(model, ctx, self.calib_samples, self.compensate) if need_stats and not self.sequential else {}
        if self.sequential:
            reference = onnx.ModelProto()
            reference.CopyFrom(model)
            calib = ctx.calib.take(self.calib_samples)
            stage_list = stages(weights, self.max_stages or stages_for(sum(w.size for w in weights)))
            stage_of = {w.name: i for i, stage in enumerate(stage_list) for w in stage}
        t_stats = time.perf_counter() - t0
        t_stage = 0.0  # sequential: the stages' statistics, collected inside the remap loop

        t0 = time.perf_counter()
        layers, totals = [], {"weights": 0, "on_faulty_words": 0, "changed": 0, "forced": 0, "negated_channels": 0, "shifted_rows": 0,
                              "bias_corrected": 0}
        for w in weights:
            slot = mm.slot(w.name)
            s0 = sa0_s[slot.offset : slot.offset + slot.count].reshape(w.shape)
            s1 = sa1_s[slot.offset : slot.offset + slot.count].reshape(w.shape)
            plain = get_initializer(model, w.name)
            targets = _targets(w, plain, ctx.float_weights.get(w.name))
            if self.sequential and w.name in stage_of and w.name not in stats:
                # this stage's inputs as the stages hardened so far make them, paired with the reference's
                t1 = time.perf_counter()
                release_memory()  # the stage before's d x d temporaries (harden.allocator)
                stats.update(collect_paired(reference, model, stage_list[stage_of[w.name]], calib))
                t_stage += time.perf_counter() - t1
            shifted = 0
            if w.op_type in TABLE_OPS and self.compensate:
                codes, negated, shifted = _table_rows(targets, plain, s0, s1, table, w.name in mean_free, w.name in signable)
                forced, bias_fix = 0, None
            else:
                codes, forced, bias_fix, negated = self._remap_tensor(w, targets, plain, s0, s1, table, stats.get(w.name),
                                                                      w.name in signable)
            if self.sequential:
                stats[w.name] = None  # used: free its d x d sums (ResNet-50 peaked at 4.2 GB holding all)
            set_initializer(model, w.name, codes)
            sign = np.ones(1)  # per output channel when some are stored negated
            if negated is not None:  # before the next stage's statistics read this model
                sign = np.where(negated, -1.0, 1.0)
                for name in signable[w.name]:
                    set_initializer(model, name, get_initializer(model, name) * sign.astype(np.float32))
            if w.bias is not None and (bias_fix is not None or negated is not None):
                b = get_initializer(model, w.bias).astype(np.int64) * sign.astype(np.int64)
                if bias_fix is not None:
                    bias_scale = np.broadcast_to(w.bias_scale.astype(np.float64) * sign, b.shape)
                    b += np.rint(bias_fix / bias_scale).astype(np.int64)
                set_initializer(model, w.bias, np.clip(b, INT32.min, INT32.max).astype(np.int32))
            faulty = (s0 | s1) != 0
            err_plain = read_back(plain, s0, s1).astype(np.float64) - targets
            err_hard = read_back(codes, s0, s1).astype(np.float64) * _channel_shaped(w, sign) - targets
            if w.name in mean_free:  # only a row's deviation from its mean reaches the model there
                err_plain, err_hard = (e - e.mean(axis=-1, keepdims=True) for e in (err_plain, err_hard))
            layer = {
                "tensor": w.name,
                "op": w.op_type,
                "weights": w.size,
                "on_faulty_words": int(faulty.sum()),
                "changed": int((codes != plain).sum()),
                "forced": forced,
                "negated_channels": 0 if negated is None else int(negated.sum()),
                "shifted_rows": shifted,
                "bias_corrected": bool(bias_fix is not None and w.bias is not None),
                "rms_error_plain": round(float(np.sqrt(np.mean(err_plain**2))), 5),
                "rms_error_faq": round(float(np.sqrt(np.mean(err_hard**2))), 5),
            }
            layers.append(layer)
            for k in ("weights", "on_faulty_words", "changed", "forced", "negated_channels", "shifted_rows"):
                totals[k] += layer[k]
            totals["bias_corrected"] += int(layer["bias_corrected"])
        t_remap = time.perf_counter() - t0

        set_metadata(model, "harden.memory_map", mm.to_json())
        set_metadata(model, "harden.faultmap", json.dumps(faultmap_record(fm)))
        set_metadata(model, "harden.version", __version__)
        record = {
            **totals,
            "layout": "linear" if self.layout is None else self.layout.spec,
            "compensation": self.compensate,
            "sequential": self.sequential,
            "sign_choice": self.sign_choice,
            **({"stages": len(stage_list)} if self.sequential else {}),
            "bias_correction": self.bias_correction,
            "table_patterns": int(table.values.shape[0]),
            "timings": {"table": round(t_table, 4), "calibration_stats": round(t_stats + t_stage, 4), "remap": round(t_remap - t_stage, 4)},
            "layers": layers,
        }
        return PassResult(model, True, record)

    def _remap_tensor(self, w, targets, plain, s0, s1, table, stats, signs: bool):
        """Codes for one tensor; returns (codes, forced count, per-row float bias fix or None,
        the rows stored negated (sign choice) or None)."""
        if stats is None or not supported(w):
            faq = faq_remap(targets.ravel(), s0.ravel(), s1.ravel(), table).reshape(w.shape)
            # Without compensation the healthy words keep the quantizer's own codes.
            return np.where((s0 | s1) != 0, faq, plain).astype(np.int8), 0, None, None
        t_rows, s0_rows, s1_rows = (weight_rows(w, a) for a in (targets, s0, s1))
        n_rows = t_rows.shape[0]
        per_group = n_rows // stats.groups
        codes_rows = np.empty(t_rows.shape, np.int8)
        signed = np.ones((n_rows, 1))  # -1 on rows stored negated
        fix = np.zeros(n_rows)
        forced = 0
        scale = _row_scale(w, n_rows)
        paired = isinstance(stats, PairedStats)
        # a sequential layer's stats are its own and dropped after this: take their sums in place
        hessians = stats.hessian(release=paired) if self.compensate else None
        cross = stats.cross(release=True) if paired else None
        for g in range(stats.groups):
            sl = slice(g * per_group, (g + 1) * per_group)
            hessian = hessians[g] if hessians is not None else None
            rows = t_rows[sl].astype(np.float64)
            if paired:
                rows = absorbing_targets(rows, hessian, cross[g])
            if hessian is None:
                faq = faq_remap(t_rows[sl].ravel(), s0_rows[sl].ravel(), s1_rows[sl].ravel(), table).reshape(t_rows[sl].shape)
                codes_rows[sl] = np.where((s0_rows[sl] | s1_rows[sl]) != 0, faq, weight_rows(w, plain)[sl])
            else:
                codes_rows[sl], f = remap_rows(rows, s0_rows[sl], s1_rows[sl], table, hessian)
                if signs:
                    aim = t_rows[sl] @ (cross[g] if paired else hessian)
                    codes_rows[sl], signed[sl], f = _sign_choice(rows, codes_rows[sl], f, s0_rows[sl], s1_rows[sl], table, hessian, aim)
                forced += int(f.sum())
            effective = codes_rows[sl] * signed[sl]  # in units of the row's original scale
            if self.bias_correction and paired:
                # E[T r] - E[codes x]: what the reference computed minus what this layer now does
                fix[sl] = (t_rows[sl] @ stats.mean_ref[g] - effective @ stats.mean[g]) * scale[sl]
            elif self.bias_correction:
                fix[sl] = bias_delta(t_rows[sl], effective, stats.mean[g], scale[sl])
        codes = rows_to_weight(w, codes_rows)
        negated = signed[:, 0] < 0
        return np.ascontiguousarray(codes), forced, fix if self.bias_correction else None, negated if negated.any() else None


def _sign_choice(rows, codes, forced, s0, s1, table, hessian, aim):
    """Per row, the codes of `rows` or of `-rows` (stored with a negated scale), whichever
    reads back through the stuck bits with the smaller output error: a stuck sign bit then
    agrees with the weights it sits under in either case. The error of read-back rows C is
    E||T r - C x||^2 = C H C^T - 2 (T E[r x^T]) C^T + const (x = r without sequential
    compensation), `aim` = T E[r x^T]. Returns (codes, row signs as (rows, 1) +-1, forced per row)."""
    codes_n, forced_n = remap_rows(-rows, s0, s1, table, hessian)
    read = read_back(codes, s0, s1).astype(np.float64)
    read_n = -read_back(codes_n, s0, s1).astype(np.float64)
    cost = np.einsum("rd,rd->r", read @ hessian - 2 * aim, read)
    cost_n = np.einsum("rd,rd->r", read_n @ hessian - 2 * aim, read_n)
    neg = cost_n < cost
    return np.where(neg[:, None], codes_n, codes), np.where(neg, -1.0, 1.0)[:, None], np.where(neg, forced_n, forced)


def _table_rows(targets, plain, s0, s1, table, mean_free: bool, signs: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Codes for an embedding table, row by row (a lookup has no input statistics to feed an
    error back onto). A row with a faulty word is remapped as it is and, with `signs` (its
    scale is its own: quantize.per_row_table_scales), negated under a negated scale; with
    `mean_free` (a LayerNorm follows: model.mean_free_tables) also shifted by a common value c,
    which the normalization removes, c chosen to minimise the read-back error with its mean
    removed. A stuck bit then costs only what the rest of its row cannot follow. Each row keeps
    the candidate with the least error. Returns (codes, rows stored negated or None, rows
    shifted)."""
    t = targets.reshape(targets.shape[0], -1).astype(np.float64)
    a0, a1 = s0.reshape(t.shape), s1.reshape(t.shape)
    rows = np.flatnonzero(((a0 | a1) != 0).any(axis=1))
    out = plain.reshape(t.shape).copy()
    if rows.size == 0:
        return plain, None, 0
    t, a0, a1, healthy = t[rows], a0[rows], a1[rows], out[rows]
    faulty = (a0 | a1) != 0
    best = None
    for sign in (1.0, -1.0) if signs else (1.0,):
        # healthy words keep the quantizer's codes (negated: clipped to int8's range)
        start = healthy if sign > 0 else np.clip(-healthy.astype(np.int16), -128, 127).astype(np.int8)
        faq = faq_remap((sign * t).ravel(), a0.ravel(), a1.ravel(), table).reshape(t.shape)
        q, cost, c = _shifted_rows(sign * t, np.where(faulty, faq, start), a0, a1, table, mean_free)
        if best is None:
            best = (q, cost, c, np.zeros(rows.size, bool))
        else:
            take = cost < best[1]
            best = (np.where(take[:, None], q, best[0]), np.where(take, cost, best[1]), np.where(take, c, best[2]), take)
    q, _, c, negated = best
    out[rows] = q
    neg = np.zeros(out.shape[0], bool)
    neg[rows] = negated
    return out.reshape(plain.shape), (neg if neg.any() else None), int(np.count_nonzero(c))


#: Shifts tried for a mean-free table row, in code units: every integer in [-16, 16], then
#: eighths of a step around the best. On the BERT's tables (3 chips, 0.15) +-4 recovered 84.0 %,
#: +-16 86.5 %, +-32 86.8 % (docs/results.md); the smaller span keeps shifted rows further from
#: the calibrated range of the activations they are added into.
SHIFT_COARSE = np.arange(-16.0, 17.0)
SHIFT_FINE = np.arange(-7, 8) / 8.0


def _shifted_rows(t, codes, a0, a1, table, mean_free: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows `t` (code units) read back through stuck bits `a0`/`a1`: the codes (from `codes`,
    or FAQ on t + c when `mean_free` and a shift c reads back better), the squared read-back
    error of each (about its mean when `mean_free`) and the shift c chosen."""

    def error(q: np.ndarray) -> np.ndarray:
        err = read_back(q, a0, a1).astype(np.float64) - t
        if mean_free:
            err = err - err.mean(axis=1, keepdims=True)
        return (err**2).sum(axis=1)

    best_q, best_cost, best_c = codes.copy(), error(codes), np.zeros(t.shape[0])
    if not mean_free:
        return best_q, best_cost, best_c

    def consider(shifts: np.ndarray) -> None:
        q = faq_remap((t + shifts[:, None]).ravel(), a0.ravel(), a1.ravel(), table).reshape(t.shape)
        cost = error(q)
        better = cost < best_cost
        best_q[better], best_cost[better], best_c[better] = q[better], cost[better], shifts[better]

    for c in SHIFT_COARSE[SHIFT_COARSE != 0]:
        consider(np.full(t.shape[0], c))
    centre = best_c.copy()
    for f in SHIFT_FINE[SHIFT_FINE != 0]:
        consider(centre + f)
    return best_q, best_cost, best_c
