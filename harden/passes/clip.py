"""Hybrid clipped activations with calibrated thresholds (METHODS.md section 2, ProAct).

Every ReLU gets a threshold T: one scalar per layer, except the last ReLU in forward order, which
gets one T per activation element. T is the maximum (or a percentile) of the ReLU's output over
the calibration data. Styles:

- `zero` (FT-ClipAct / ProAct, default): y = x if 0 <= x <= T else 0, built as
  Where(Greater(Relu(x), T), 0, Relu(x)): values above T are taken as faulty and dropped;
- `saturate` (Ranger): y = min(max(x, 0), T).

A zeroing clip only fires in the int8 graph if the clipped tensor's quantization range reaches
above T (issue 3): otherwise QuantizeLinear saturates every outlier to exactly T. The pass
therefore asks the quantizer (TensorQuantOverrides) for a range of `headroom * T` on the ReLU's
input and output.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..data import Dataset
from ..errors import InputError
from ..runtime import batch_size_for, capture
from . import Pass, PassContext, PassResult

STYLES = ("zero", "saturate")
#: The clip search's verdict "leave the model unclipped", in place of a percentile
#: (clip_search.py; ctx.clip_percentile).
NO_CLIP = "none"


GUARDED_OUTPUT_OPS = ("Gemm", "MatMul", "Add", "Conv")


class ClipPass(Pass):
    """Replace ReLUs by clipped activations with thresholds calibrated on ctx.calib.

    `output_guard` (zero style, our addition): the model's logits get an element-wise range
    check too, y = x if L <= x <= T else 0, with L / T the calibrated per-element min / max. A
    corrupted bias of the last layer shifts one logit far outside anything seen in calibration;
    zeroing it lets the other logits decide (measured in docs/results.md).
    """

    name = "clip"
    requires = frozenset({"float"})
    provides = frozenset({"clipped"})
    in_place = True

    def __init__(self, style: str = "zero", percentile: float | None = 100.0, headroom: float = 2.0,
                 calib_samples: int = 512, output_guard: bool = True, thresholds: dict | None = None):
        if style not in STYLES:
            raise ValueError(f"clip style must be one of {STYLES}")
        self.style, self.percentile, self.headroom, self.calib_samples = style, percentile, headroom, calib_samples
        self.output_guard = output_guard and style == "zero"
        #: thresholds calibrated beforehand (`calibrate_thresholds`: one capture for several
        #: percentiles, as the clip search does); None: calibrate on ctx.calib in `call`
        self.thresholds = thresholds

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if self.percentile is None:  # chosen by the clip search earlier in the plan
            if ctx.clip_percentile is None:
                raise InputError("clip: no threshold percentile given and none chosen by a clip search")
            if ctx.clip_percentile == NO_CLIP:  # clipping would not earn its place
                return PassResult(model, False, {"style": self.style, "layers": [], "skipped": "the clip search chose no clipping",
                                                 **_left_alone(model)})
            chosen = ClipPass(self.style, ctx.clip_percentile, self.headroom, self.calib_samples, self.output_guard)
            return chosen.call(model, ctx)
        relus = [n for n in model.graph.node if n.op_type == "Relu"]
        others = _left_alone(model)
        guarded = self.guarded_output(model) if self.output_guard else None
        if not relus and guarded is None:
            return PassResult(model, False, {"style": self.style, "layers": [], **others})
        thresholds = self.thresholds
        if thresholds is None:
            thresholds = calibrate_thresholds(model, ctx.calib.take(self.calib_samples), (self.percentile,), guarded)[self.percentile]
        layers, new_nodes, inits = [], [], []
        last = relus[-1].output[0] if relus else None
        zero = "harden_clip_zero"
        if self.style == "zero":
            inits.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
        for node in model.graph.node:
            if node.op_type != "Relu":
                new_nodes.append(node)
                if guarded is not None and node.output[0] == guarded:
                    layers.append(self._guard_output(node, thresholds[guarded], new_nodes, inits, zero, ctx))
                continue
            out = node.output[0]
            t = thresholds[out].astype(np.float32)
            tname, pre = f"{out}_harden_T", f"{out}_harden_pre"
            inits.append(numpy_helper.from_array(t, tname))
            new_nodes.append(helper.make_node("Relu", list(node.input), [pre], name=node.name))
            if self.style == "zero":
                mask = f"{out}_harden_over"
                new_nodes.append(helper.make_node("Greater", [pre, tname], [mask], name=f"{node.name}_harden_gt"))
                new_nodes.append(helper.make_node("Where", [mask, zero, pre], [out], name=f"{node.name}_harden_where"))
            else:
                new_nodes.append(helper.make_node("Min", [pre, tname], [out], name=f"{node.name}_harden_min"))
            top = float(t.max())
            for tensor in (node.input[0], pre):
                ctx.quant_overrides[tensor] = [{"rmax": np.float32(self.headroom * top)}]
            layers.append(
                {
                    "relu": node.name or out,
                    "granularity": "element" if out == last else "layer",
                    "thresholds": int(t.size),
                    "threshold": round(top, 6) if t.size == 1 else None,
                    "threshold_mean": round(float(t.mean()), 6),
                }
            )
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        model.graph.initializer.extend(inits)
        return PassResult(
            model,
            True,
            {
                "style": self.style,
                "percentile": self.percentile,
                "headroom": self.headroom,
                "output_guard": guarded is not None,
                "threshold_values": int(sum(l["thresholds"] for l in layers)),
                "layers": layers,
                **others,
            },
        )

    def note(self, record: dict) -> str:
        if record.get("skipped"):
            return record["skipped"]
        n = sum(1 for layer in record.get("layers", []) if layer.get("relu"))
        guard = " + output guard" if record.get("output_guard") else ""
        alone = record.get("left_alone")
        rest = "; left alone: " + ", ".join(f"{k} x{v}" for k, v in alone.items()) if alone else ""
        return f"{record['style']} style on {n} ReLUs{guard}, {record.get('threshold_values', 0)} thresholds{rest}"

    def guarded_output(self, model: onnx.ModelProto) -> str | None:
        """The first graph output, when a linear op produces it (logits), else None."""
        out = model.graph.output[0].name
        producer = next((n for n in model.graph.node if out in n.output), None)
        return out if producer is not None and producer.op_type in GUARDED_OUTPUT_OPS else None

    def _guard_output(self, node, bounds, new_nodes, inits, zero, ctx) -> dict:
        """Rename the logits' producer output and append the two-sided zeroing range check."""
        out = node.output[0]
        lo, hi = (b.astype(np.float32) for b in bounds)
        pre = f"{out}_harden_pre"
        node.output[0] = pre
        names = {k: f"{out}_harden_{k}" for k in ("L", "T", "below", "above", "outside")}
        inits += [numpy_helper.from_array(lo, names["L"]), numpy_helper.from_array(hi, names["T"])]
        new_nodes += [
            helper.make_node("Less", [pre, names["L"]], [names["below"]], name=f"{out}_harden_lt"),
            helper.make_node("Greater", [pre, names["T"]], [names["above"]], name=f"{out}_harden_gt"),
            helper.make_node("Or", [names["below"], names["above"]], [names["outside"]], name=f"{out}_harden_or"),
            helper.make_node("Where", [names["outside"], zero, pre], [out], name=f"{out}_harden_where"),
        ]
        span = float(hi.max() - lo.min())
        ctx.quant_overrides[pre] = [{"rmin": np.float32(lo.min() - (self.headroom - 1) * span / 2),
                                     "rmax": np.float32(hi.max() + (self.headroom - 1) * span / 2)}]
        return {"relu": None, "output_guard": out, "granularity": "element", "thresholds": int(lo.size + hi.size),
                "threshold": None, "threshold_mean": round(float(hi.mean()), 6)}


#: Values per ReLU a layer-wise percentile is read from (evenly spaced over each batch's
#: activations): every value of the digits models; ResNet-50's 24 calibration images hold 19 M
#: values at its first ReLU alone, about 1 GB over its 49 ReLUs if all were kept.
PERCENTILE_VALUES = 1 << 20


def calibrate_thresholds(model: onnx.ModelProto, calib: Dataset, percentiles: Sequence[float], guarded: str | None) -> dict[float, dict]:
    """Per percentile, the clip pass's thresholds from one capture of `calib`: a layer-wise scalar
    T per ReLU, element-wise T for the last ReLU (forward order), element-wise (min, max) for the
    guarded output. Several percentiles share the capture (the clip search's candidates differ
    in thresholds, not in the activations they are read from)."""
    names = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    last = names[-1] if names else None
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names + ([guarded] if guarded else [])}
    elementwise = {last, guarded}
    whole = any(p < 100 for p in percentiles)

    per_batch = PERCENTILE_VALUES // max(1, -(-len(calib) // batch_size_for(model, 32)))

    def on_batch(acts):
        for n, a in acts.items():
            if n in elementwise:
                seen[n].append(a)
            elif whole:  # a layer-wise percentile: an evenly spaced sample of the values
                flat = a.reshape(-1)
                if flat.size > per_batch:
                    flat = flat[np.linspace(0, flat.size - 1, per_batch).astype(np.int64)]
                seen[n].append(flat)
            else:
                seen[n].append(np.asarray(a.max(), dtype=np.float32)[None])

    capture(model, calib, list(seen), on_batch)
    out: dict[float, dict] = {p: {} for p in percentiles}
    for n, chunks in seen.items():
        a = np.concatenate(chunks)
        seen[n] = []
        if n == guarded:
            for p in percentiles:
                out[p][n] = (a.min(axis=0), a.max(axis=0))
            continue
        below = [p for p in percentiles if p < 100]
        axis = 0 if n == last else None
        found = dict(zip(below, np.percentile(a, below, axis=axis))) if below else {}
        for p in percentiles:
            t = found[p] if p < 100 else a.max(axis=axis)
            # A dead unit (never positive) keeps a tiny positive T so it stays dead, never NaN.
            out[p][n] = np.maximum(np.asarray(t, dtype=np.float32), np.float32(1e-6))
    return out


#: Activations the clip pass does not replace (it clips ReLU, whose zero floor lets a clipped
#: value fall back to "inactive"); their outputs keep the quantizer's calibrated range.
UNCLIPPED_ACTIVATIONS = ("Clip", "Gelu", "Erf", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu",
                         "Softplus", "Mish", "PRelu")


def _left_alone(model: onnx.ModelProto) -> dict:
    """The activations of the model the pass leaves alone, counted, and why (empty when none)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in UNCLIPPED_ACTIVATIONS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts:
        return {}
    return {"left_alone": counts,
            "left_alone_why": "the clip pass replaces ReLU only; these keep their calibrated quantization range "
                              "(a bit flip in their output is bounded by that range)"}
