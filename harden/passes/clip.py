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

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..runtime import capture
from . import PassContext, PassResult

STYLES = ("zero", "saturate")


class ClipPass:
    """Replace ReLUs by clipped activations with thresholds calibrated on ctx.calib."""

    name = "clip"

    def __init__(self, style: str = "zero", percentile: float = 100.0, headroom: float = 2.0, calib_samples: int = 512):
        if style not in STYLES:
            raise ValueError(f"clip style must be one of {STYLES}")
        self.style, self.percentile, self.headroom, self.calib_samples = style, percentile, headroom, calib_samples

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        relus = [n for n in model.graph.node if n.op_type == "Relu"]
        if not relus:
            return PassResult(model, False, {"style": self.style, "layers": []})
        thresholds = self._calibrate(model, relus, ctx)
        layers = []
        new_nodes, inits = [], []
        last = relus[-1].output[0]
        for node in model.graph.node:
            if node.op_type != "Relu":
                new_nodes.append(node)
                continue
            out = node.output[0]
            t = thresholds[out].astype(np.float32)
            tname = f"{out}_harden_T"
            inits.append(numpy_helper.from_array(t, tname))
            pre = f"{out}_harden_pre"
            new_nodes.append(helper.make_node("Relu", list(node.input), [pre], name=node.name))
            if self.style == "zero":
                mask, zero = f"{out}_harden_over", f"{out}_harden_zero"
                inits.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
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
                "threshold_values": int(sum(l["thresholds"] for l in layers)),
                "layers": layers,
            },
        )

    def _calibrate(self, model, relus, ctx: PassContext) -> dict[str, np.ndarray]:
        """Layer-wise scalar T, element-wise T for the last ReLU (forward order)."""
        names = [n.output[0] for n in relus]
        last = names[-1]
        seen: dict[str, list[np.ndarray]] = {n: [] for n in names}

        def on_batch(acts):
            for n, a in acts.items():
                if n == last or self.percentile < 100:
                    seen[n].append(a)
                else:
                    seen[n].append(np.asarray(a.max(), dtype=np.float32)[None])

        capture(model, ctx.calib.take(self.calib_samples), names, on_batch)
        out = {}
        for n, chunks in seen.items():
            a = np.concatenate(chunks)
            if n == last:
                t = np.percentile(a, self.percentile, axis=0) if self.percentile < 100 else a.max(axis=0)
            else:
                t = np.percentile(a, self.percentile) if self.percentile < 100 else a.max()
            # A dead unit (never positive) keeps a tiny positive T so it stays dead, never NaN.
            out[n] = np.maximum(np.asarray(t, dtype=np.float32), np.float32(1e-6))
        return out
