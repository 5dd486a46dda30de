"""Would onnxruntime on this host run the written model as the chip does?

harden's figures use the chip's arithmetic (arithmetic.py). A user who also deploys the output
file with onnxruntime on a CPU gets onnxruntime's fused int8 kernels, which saturate on x86
without VNNI. This check runs the written model both ways on the evaluation data, once, and
records both accuracies, so the report can warn when they part.
"""

from __future__ import annotations

import numpy as np
import onnx

from .arithmetic import TOLERANCE, host_features
from .data import Dataset, accuracy, top1
from .report.types import HostOnnxruntime
from .runtime import batch_size_for, run_batched, session


def fused_host_record(model: onnx.ModelProto, data: Dataset, target: np.ndarray, chip_logits: np.ndarray) -> HostOnnxruntime:
    """Both accuracies of the fault-free `model`: the chip's arithmetic and this host's fused kernels.

    `chip_logits` are the model's fault-free logits in the chip's arithmetic (already computed
    by the caller); `differs` is true when the accuracies part by more than the stated tolerance.
    """
    sess = session(model, host_fused=True)
    (logits,) = run_batched(sess, data, batch_size_for(model, 256), [sess.get_outputs()[0].name])
    chip_pred, host_pred = top1(chip_logits), top1(logits)
    chip_acc, host_acc = accuracy(chip_pred, target), accuracy(host_pred, target)
    differing_samples = abs(int(np.sum(chip_pred == target)) - int(np.sum(host_pred == target)))
    return {
        "host": host_features(),
        "accuracy_chip_arithmetic": round(chip_acc, 6),
        "accuracy_onnxruntime_fused": round(host_acc, 6),
        "top1_agreement": round(float(np.mean(chip_pred == host_pred)), 6),
        "max_logit_difference": round(float(np.max(np.abs(chip_logits - logits))), 6) if len(logits) else 0.0,
        "differs": differing_samples > TOLERANCE["accuracy_samples"],
    }
