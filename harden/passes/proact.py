"""ProAct (`--clip-train`): train the clip pass's thresholds, last layer first (needs torch).

Runs right after the clip pass (harden/train/proact.py does the training). Besides writing the
new thresholds into the same initializers, it rescales the quantization ranges the clip pass
asked for (ctx.quant_overrides, `headroom * max T` on each clipped ReLU's input and output), so
a zeroing clip still fires in int8 at the new threshold.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..data import Dataset
from . import Pass, PassContext, PassResult
from .saq import _bar


class ProActPass(Pass):
    """Progressive threshold training on `train` (default: the calibration data)."""

    name = "clip-train"
    requires = frozenset({"clipped"})
    provides = frozenset({"trained"})

    def __init__(self, config=None, train: Dataset | None = None):
        self.config, self.train = config, train

    def call(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from ..train import require_torch

        require_torch("--clip-train")
        from ..train.proact import ProActConfig, find_clips, train_thresholds

        cfg = self.config or ProActConfig(seed=ctx.seed)
        layers, _ = find_clips(model)
        before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in {l.threshold for l in layers}}

        def on_layer(rec, i, total):
            if ctx.progress:
                verdict = "kept" if rec["accepted"] else "rolled back"
                ctx.progress(f"{self.name} layer {i}/{total} {_bar(i, total)} {rec['relu']}: T x{rec['ratio']:.3f}, "
                             f"accuracy {rec['val_accuracy']:.4f}, {verdict}, {rec['seconds']:.2f} s")

        result = train_thresholds(model, self.train if self.train is not None else ctx.calib, ctx.calib, cfg, on_layer)
        by_name = {l.threshold: l for l in layers}
        for tname, new in result.thresholds.items():
            layer = by_name[tname]
            factor = float(np.max(new) / max(float(np.max(before[tname])), 1e-12))
            for tensor in (layer.relu_input, layer.pre):
                if tensor in ctx.quant_overrides:
                    ctx.quant_overrides[tensor] = [{**o, "rmax": np.float32(o["rmax"] * factor)} if "rmax" in o else o
                                                   for o in ctx.quant_overrides[tensor]]
        record = dict(result.record)
        record["train_data"] = "train data" if self.train is not None else "calibration data"
        rec_layers = record["layers"]
        record["note"] = (f"{record['accepted']}/{len(rec_layers)} layers' thresholds kept, mean T x"
                          f"{np.mean([r['ratio'] for r in rec_layers if r['accepted']] or [1.0]):.3f}; accuracy on calibration data "
                          f"{100 * record['val_accuracy_start']:.2f}% -> {100 * record['val_accuracy_end']:.2f}%")
        return PassResult(result.model, bool(result.thresholds), record)
