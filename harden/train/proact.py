"""ProAct: progressive training of the clip pass's thresholds (METHODS.md section 2).

The clip pass calibrates every threshold T as the maximum activation over calibration data.
ProAct then trains them, one clipped ReLU at a time, starting from the last one in forward
order and moving backwards, with the weights frozen:

- student = the clipped graph; in the layer being trained the zeroing clip is replaced by
  ProAct's differentiable surrogate `relu(x) * sigmoid(k (T - x) / mean(T0))` (our decision:
  the sharpness k is relative to the layer's calibrated thresholds, so one k fits layers of any
  activation scale); a saturating clip `min(relu(x), T)` is differentiable as it is;
- teacher = the same graph with every clip (and the output guard) bypassed: the unclipped
  model;
- loss = ce * CE(labels, student) + kd * KL(teacher || student) + l2 * mean((T / T0)^2), AdamW
  whose weight decay (decaying linearly to 0 over the layer's steps) pushes T down; T is
  trained as T0 * a with a = 1 at the start (scale-free learning rates);
- a layer's new thresholds are kept only if the int8-free clean accuracy of the hard-clipped
  graph on the validation data stays within `tolerance` of the accuracy before ProAct; else
  that layer is rolled back.

The thresholds are written back into the same initializers (`<relu output>_harden_T`); nothing
else in the graph changes. The output guard's range (`..._harden_L` / `_harden_T` on the logits)
is not trained: it is not a ReLU layer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..data import Dataset
from ..errors import InputError
from . import require_torch

torch = require_torch("--clip-train")

from ..runtime import fixed_batch  # noqa: E402
from .graph import OnnxModule  # noqa: E402
from .saq import SMALL_MODEL, _batch_size, _feeds_of, predict, torch_threads  # noqa: E402
from .saq import _logits as logits


@dataclass
class ProActConfig:
    """Knobs of the threshold training; the defaults are what `--clip-train` runs."""

    epochs: int = 3  # per layer
    lr: float = 1e-2  # scalar (layer-wise) thresholds, relative to T0
    lr_element: float = 1e-2  # the element-wise thresholds of the last ReLU, relative to T0
    ce: float = 0.8
    kd: float = 0.1
    l2: float = 1e-3
    weight_decay: float = 3.0  # AdamW's, decaying linearly to 0 over a layer's steps (docs/training.md)
    sharpness: float = 20.0
    tolerance: float = 0.005
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"ProAct epochs must be an integer >= 1, got {self.epochs!r}")
        for name in ("lr", "lr_element", "sharpness"):
            if not getattr(self, name) > 0:
                raise InputError(f"ProAct {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.tolerance <= 1:
            raise InputError(f"ProAct tolerance must be in [0, 1], got {self.tolerance!r}")


@dataclass
class ClipLayer:
    """One clipped ReLU of the clip pass's graph."""

    relu: str  # the Relu node's name
    relu_input: str
    pre: str  # the Relu's output (the clip's input)
    threshold: str  # the T initializer
    clip_node: str  # the Where (zero style) or Min (saturate) node that applies T
    style: str  # "zero" or "saturate"


def find_clips(model: onnx.ModelProto) -> tuple[list[ClipLayer], list[str]]:
    """The clipped ReLUs in forward order, and the names of every clip-applying node (ReLU clips
    and the output guard's Where), which the teacher bypasses."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    layers, bypass = [], []
    for node in model.graph.node:
        if node.op_type == "Where" and len(node.input) == 3:
            cond = producers.get(node.input[0])
            if cond is None:
                continue
            if cond.op_type == "Greater" and cond.input[0] == node.input[2] and cond.input[1] in inits:
                relu = producers.get(node.input[2])
                if relu is not None and relu.op_type == "Relu":
                    layers.append(ClipLayer(relu.name, relu.input[0], node.input[2], cond.input[1], node.name, "zero"))
                bypass.append(node.name)
            elif cond.op_type == "Or":  # the output guard: Where(Or(Less(x, L), Greater(x, T)), 0, x)
                bypass.append(node.name)
        elif node.op_type == "Min" and len(node.input) == 2 and node.input[1] in inits:
            relu = producers.get(node.input[0])
            if relu is not None and relu.op_type == "Relu":
                layers.append(ClipLayer(relu.name, relu.input[0], node.input[0], node.input[1], node.name, "saturate"))
                bypass.append(node.name)
    return layers, bypass


@dataclass
class ProActResult:
    model: onnx.ModelProto
    thresholds: dict[str, np.ndarray]  # threshold initializer -> new value (accepted layers)
    record: dict = field(default_factory=dict)


def train_thresholds(
    model: onnx.ModelProto,
    train: Dataset,
    val: Dataset,
    cfg: ProActConfig | None = None,
    on_layer: Callable[[dict, int, int], None] | None = None,
) -> ProActResult:
    """Progressive threshold training on a clip pass's graph; see the module docstring."""
    cfg = cfg or ProActConfig()
    cfg.validate()
    layers, bypass = find_clips(model)
    if not layers:
        raise InputError("--clip-train needs the clip pass's clipped ReLUs; the model has none (is --no-clip set?)")
    module = OnnxModule(model)
    threads = 1 if sum(p.numel() for p in module.parameters()) < SMALL_MODEL else None
    with torch_threads(threads):
        return _train(module, model, layers, bypass, train, val, cfg, on_layer)


def _train(module, model, layers, bypass, train, val, cfg, on_layer) -> ProActResult:
    started = time.perf_counter()
    for p in module.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = module.output_names[0]
    model_batch = fixed_batch(model)
    feeds = _feeds_of(train)
    n = len(train)
    batch = _batch_size(module, feeds, cfg.batch_size, model_batch)
    fixed = model_batch if batch == model_batch else None

    # teacher: every clip bypassed (the unclipped model); its logits on the training data
    def identity(node, inputs):
        return [inputs[2] if node.op_type == "Where" else inputs[0]]

    module.overrides = {name: identity for name in bypass}
    teacher = _logits(module, feeds, batch, fixed)
    module.overrides = {}
    labels = (torch.from_numpy(train.labels.astype(np.int64)) if train.labels is not None
              else teacher.argmax(1))
    val_target = val.labels if val.labels is not None else predict(module, val, batch, fixed=fixed)
    acc0 = float(np.mean(predict(module, val, batch, fixed=fixed) == val_target))

    records = []
    accepted: dict[str, np.ndarray] = {}
    ce = torch.nn.CrossEntropyLoss()
    order = list(reversed(layers))
    for li, layer in enumerate(order):
        t_layer = time.perf_counter()
        T0 = module.parameter(layer.threshold).detach().clone()
        a = torch.ones_like(T0, requires_grad=True)
        element = T0.numel() > 1
        lr = cfg.lr_element if element else cfg.lr
        opt = torch.optim.AdamW([a], lr=lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * -(-n // batch)
        scale = float(T0.mean())
        k = cfg.sharpness / max(scale, 1e-12)

        if layer.style == "zero":
            def surrogate(node, inputs, _a=a, _T0=T0, _k=k):
                pre = inputs[2]
                return [pre * torch.sigmoid(_k * (_T0 * _a - pre))]

            module.overrides = {layer.clip_node: surrogate}
        else:
            module.overrides = {}
        step = 0
        module.train()
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch):
                idx = perm[i : i + batch]
                if fixed is not None and len(idx) < batch:
                    continue
                for group in opt.param_groups:
                    group["weight_decay"] = cfg.weight_decay * (1 - step / max(steps, 1))
                x = {kk: v[idx] for kk, v in feeds.items()}
                logits = module.run(x, values={layer.threshold: T0 * a})[out]
                logits = logits.reshape(len(logits), -1)
                loss = cfg.ce * ce(logits, labels[idx])
                if cfg.kd:
                    loss = loss + cfg.kd * torch.nn.functional.kl_div(
                        torch.log_softmax(logits, 1), torch.log_softmax(teacher[idx], 1), reduction="batchmean", log_target=True)
                loss = loss + cfg.l2 * (a**2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    a.clamp_(min=1e-3)  # a threshold stays positive
                step += 1
        module.overrides = {}
        new_T = (T0 * a.detach()).clamp(min=1e-6)
        with torch.no_grad():
            module.parameter(layer.threshold).copy_(new_T)
        acc = float(np.mean(predict(module, val, batch, fixed=fixed) == val_target))
        keep = acc >= acc0 - cfg.tolerance - 1e-12
        if keep:
            accepted[layer.threshold] = new_T.numpy().copy()
        else:
            with torch.no_grad():
                module.parameter(layer.threshold).copy_(T0)
        rec = {
            "relu": layer.relu,
            "threshold": layer.threshold,
            "granularity": "element" if element else "layer",
            "style": layer.style,
            "calibrated_mean": round(float(T0.mean()), 6),
            "trained_mean": round(float(new_T.mean()), 6),
            "ratio": round(float(new_T.mean() / T0.mean()), 4),
            "val_accuracy": round(acc, 6),
            "accepted": bool(keep),
            "seconds": round(time.perf_counter() - t_layer, 4),
        }
        records.append(rec)
        if on_layer:
            on_layer(rec, li + 1, len(order))
    module.eval()
    new_model = module.write_back(model)
    final = float(np.mean(predict(module, val, batch, fixed=fixed) == val_target))
    record = {
        "config": asdict(cfg),
        "layers": records,
        "accepted": sum(r["accepted"] for r in records),
        "val_samples": len(val),
        "val_accuracy_start": round(acc0, 6),
        "val_accuracy_end": round(final, 6),
        "train_samples": n,
        "targets": "labels" if train.labels is not None else "teacher predictions",
        "seconds": round(time.perf_counter() - started, 4),
    }
    return ProActResult(new_model, accepted, record)


def _logits(module: OnnxModule, feeds: dict, batch: int, fixed: int | None) -> "torch.Tensor":
    return logits(module, feeds, batch, fixed)
