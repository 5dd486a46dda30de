"""Model diagnostics that say *why* an int8 model is fragile (METHODS.md section 3).

- `activation_sparsity`: per layer, the fraction of exact zeros in the input activation of
  every weight op (the DequantizeLinear output feeding input 0 of a Conv/Gemm/MatMul) and in
  the output of every ReLU / Clip / harden clip (Where or Min of the clip pass), if the graph
  still has them. Activation-sparse quantized nets tend to sit in sharper minima and lose more
  accuracy under weight-memory faults (Malhotra & Gupta 2024).
- `sharpness`: epsilon-sharpness of the int8 model, the mean loss increase when every int8
  weight code is perturbed multiplicatively, w' = clip(round(w * (1 + rho * z)), -128, 127)
  with z ~ N(0, 1) per code, over `samples` perturbations. The loss is the mean cross-entropy
  against the labels, or without labels the mean KL divergence from the clean softmax (the
  clean loss is then 0). Perturbation s draws z from rng([seed, 5348, s]) alone, so the same
  seed perturbs in the same directions at every rho (the increase then grows with rho).

Both run on onnxruntime: sparsity on an unoptimised session that exposes the float tensors
(exact DequantizeLinear outputs), sharpness on the evaluator's weights-as-inputs session.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from .data import Dataset, load_npz
from .errors import InputError
from .model import TABLE_OPS, WEIGHT_OPS, load_model, qdq_weights
from .runtime import capture
from .simulate import ChipEvaluator, Reference
from .stats import summarize

CLIP_OPS = ("Relu", "Clip")


def _model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def _data(data: Dataset | str | os.PathLike, model: onnx.ModelProto) -> Dataset:
    return data if isinstance(data, Dataset) else load_npz(data, model, role="data")


def sparsity_sites(model: onnx.ModelProto) -> list[dict]:
    """The tensors `activation_sparsity` measures, in graph order: weight-op inputs ("input",
    with the consuming op and its int8 weight) and ReLU / clip outputs ("relu" / "clip")."""
    weights = {w.node_name: w for w in qdq_weights(model)}
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    graph_outputs = {o.name for o in model.graph.output}
    sites: list[dict] = []
    seen: set[str] = set()

    def add(rec: dict) -> None:
        if rec["tensor"] not in seen:
            seen.add(rec["tensor"])
            sites.append(rec)

    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and node.op_type not in TABLE_OPS and node.input and node.input[0] in dq_out:
            w = weights.get(node.name)
            add({"tensor": node.input[0], "kind": "input", "op": node.op_type, "node": node.name,
                 "weight": w.name if w is not None else None})
        elif node.op_type in CLIP_OPS:
            add({"tensor": node.output[0], "kind": "relu" if node.op_type == "Relu" else "clip",
                 "op": node.op_type, "node": node.name})
        elif (node.op_type == "Where" and len(node.input) == 3 and node.input[1] == "harden_clip_zero"
              and node.output[0] not in graph_outputs) or (node.op_type == "Min" and node.name.endswith("_harden_min")):
            add({"tensor": node.output[0], "kind": "clip", "op": node.op_type, "node": node.name})
    return sites


def activation_sparsity(
    model: onnx.ModelProto | str | os.PathLike,
    data: Dataset | str | os.PathLike,
    *,
    batch_size: int = 64,
) -> list[dict]:
    """[{tensor, sparsity, kind, op, node, weight?, elements, zeros}] on `data`, in graph order.

    sparsity = zeros / elements over every sample; elements counts all values of the tensor
    over the data set. A float model works too (the weight-op inputs are then whatever feeds
    them through a DequantizeLinear; with none, only ReLU outputs are measured).
    """

    m = _model(model)
    ds = _data(data, m)
    sites = sparsity_sites(m)
    if not sites:
        return []
    names = [s["tensor"] for s in sites]
    zeros = dict.fromkeys(names, 0)
    total = dict.fromkeys(names, 0)

    def on_batch(acts: dict[str, np.ndarray]) -> None:
        for name, a in acts.items():
            zeros[name] += int(a.size - np.count_nonzero(a))
            total[name] += int(a.size)

    capture(m, ds, names, on_batch, batch_size=batch_size)
    out = []
    for s in sites:
        n = total[s["tensor"]]
        out.append({**s, "elements": n, "zeros": zeros[s["tensor"]],
                    "sparsity": round(zeros[s["tensor"]] / n, 6) if n else 0.0})
    return out


def sparsity_summary(records: list[dict]) -> dict:
    """Mean sparsity of the weight-op inputs (unweighted, per layer) and over all their values."""
    inputs = [r for r in records if r["kind"] == "input"]
    if not inputs:
        return {"layers": 0, "mean": None, "overall": None}
    z = sum(r["zeros"] for r in inputs)
    n = sum(r["elements"] for r in inputs)
    return {
        "layers": len(inputs),
        "mean": round(float(np.mean([r["sparsity"] for r in inputs])), 6),
        "overall": round(z / n, 6) if n else None,
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.reshape(len(logits), -1).astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _loss(logits: np.ndarray, labels: np.ndarray | None, clean_logp: np.ndarray) -> float:
    logp = _log_softmax(logits)
    if labels is not None:
        return float(-logp[np.arange(len(labels)), labels].mean())
    p = np.exp(clean_logp)
    return float((p * (clean_logp - logp)).sum(axis=1).mean())


def perturb_codes(values: dict[str, np.ndarray], names: list[str], rho: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`values` with each named int8 tensor replaced by clip(round(w * (1 + rho * z)), -128, 127)."""
    out = dict(values)
    for name in names:
        w = values[name]
        z = rng.standard_normal(w.shape)
        out[name] = np.clip(np.rint(w.astype(np.float64) * (1.0 + rho * z)), -128, 127).astype(np.int8)
    return out


def sharpness(
    model: onnx.ModelProto | str | os.PathLike,
    data: Dataset | str | os.PathLike,
    rho: float = 0.05,
    samples: int = 10,
    seed: int = 0,
    *,
    evaluator: ChipEvaluator | None = None,
    confidence: float = 0.95,
) -> dict:
    """Epsilon-sharpness of the int8 model on `data`:

    {rho, samples, seed, loss ("cross_entropy" | "kl_to_clean"), loss_clean,
     loss_perturbed_mean, increase, std, ci (t interval of the mean increase), codes_changed
     (mean fraction of int8 codes the perturbation changes), per_sample (increases)}.

    `evaluator`: reuse a ChipEvaluator of the same model and data (one session for everything).
    """
    if not (isinstance(rho, (int, float)) and 0.0 < rho < 10.0):
        raise InputError(f"rho must be in (0, 10), got {rho!r}")
    if not isinstance(samples, (int, np.integer)) or isinstance(samples, bool) or samples < 2:
        raise InputError(f"sharpness needs samples >= 2 perturbations, got {samples!r}")
    if evaluator is None:
        m = _model(model)
        ds = _data(data, m)
        if not qdq_weights(m):
            raise InputError("sharpness: the model has no int8 Conv/Gemm/MatMul/Gather weights (not an int8 QDQ model)")
        evaluator = ChipEvaluator(m, ds, Reference(np.empty(0, np.int64), "agreement"))
    labels = evaluator.data.labels
    clean = evaluator.logits(None)
    clean_logp = _log_softmax(clean)
    loss_clean = _loss(clean, labels, clean_logp)
    names = list(evaluator.weight_names)
    size = sum(evaluator.defaults[n].size for n in names)
    losses, changed = [], []
    for s in range(int(samples)):
        rng = np.random.default_rng([int(seed), 5348, s])
        values = perturb_codes(evaluator.defaults, names, float(rho), rng)
        changed.append(sum(int(np.count_nonzero(values[n] != evaluator.defaults[n])) for n in names) / size)
        losses.append(_loss(evaluator.logits(values), labels, clean_logp))
    inc = np.asarray(losses) - loss_clean
    s = summarize(inc, confidence, bounds=None)
    r = (lambda v: round(float(v), 6))
    return {
        "rho": float(rho),
        "samples": int(samples),
        "seed": int(seed),
        "loss": "cross_entropy" if labels is not None else "kl_to_clean",
        "loss_clean": r(loss_clean),
        "loss_perturbed_mean": r(np.mean(losses)),
        "increase": r(s.mean),
        "std": r(s.std),
        "ci": [r(s.low), r(s.high)],
        "confidence": confidence,
        "codes_changed": r(np.mean(changed)),
        "per_sample": [r(v) for v in inc],
    }


def diagnose(
    model: onnx.ModelProto | str | os.PathLike,
    data: Dataset | str | os.PathLike,
    *,
    rho: float = 0.05,
    samples: int = 10,
    seed: int = 0,
    evaluator: ChipEvaluator | None = None,
) -> dict:
    """The `diagnostics` section of simulate's report: sparsity per layer, its summary, sharpness."""
    m = _model(model)
    ds = evaluator.data if evaluator is not None else _data(data, m)
    records = activation_sparsity(m, ds)
    return {
        "samples": len(ds),
        "activation_sparsity": records,
        "sparsity": sparsity_summary(records),
        "sharpness": sharpness(m, ds, rho, samples, seed, evaluator=evaluator),
    }


__all__ = ["activation_sparsity", "diagnose", "perturb_codes", "sharpness", "sparsity_sites", "sparsity_summary"]
