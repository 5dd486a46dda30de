"""Sharpness-aware, quantization-aware fine-tuning (SAQ; METHODS.md section 3) on the ONNX graph.

One step on a batch (Liu et al.'s SAQ, with Kwon et al.'s adaptive SAM perturbation):

    wq   = Q(w)                         per-channel symmetric int8 fake quantization, STE
    g    = dL/dwq                        at the quantized weights
    eps  = rho * T^2 g / ||T g||          T = |wq| ("asam", default), the channel's quantization
                                          step ("scale"), or 1 ("sam": plain SAM)
    w   <- w - lr * dL(Q(w) + eps)/dw    (STE through Q), SGD with momentum

Q reproduces onnxruntime's quantizer (scale = max|w| over the channel / 127, round half to
even, clamp to [-127, 127]; channel axis 0 for Conv and Gemm with transB=1, 1 for MatMul and
Gemm with transB=0), so the weights are fine-tuned for the int8 codes they will become.
BatchNorm statistics stay frozen (graph.py). Only the weights and biases of Conv / Gemm /
MatMul (and BatchNorm's affine parameters) train; the clip pass's thresholds do not.

The loss is cross-entropy against the labels of the training data, or against the model's own
predictions before fine-tuning when the data has no labels. `fine_tune` also takes a weight
noise (variability.py) drawn afresh on every forward pass, for variability-aware training.

Why adaptive: plain SAM with one radius for all weights (rho 0.05 on raw weights) collapsed the
clean accuracy of a small CNN whose layers differ 10x in weight scale; scaling the perturbation
to the weights keeps every layer's relative perturbation comparable (docs/training.md has the
search behind the defaults).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..data import Dataset
from ..errors import InputError
from ..model import output_channel_axis
from ..runtime import fixed_batch
from . import require_torch

torch = require_torch("SAQ fine-tuning (--saq)")

from .graph import OnnxModule  # noqa: E402

MODES = ("asam", "scale", "sam")
# Below this many trained values one intra-op thread is fastest: torch's threads cost more than
# they save on small layers, and on a busy machine they spin against each other (measured on
# the digits CNN: 0.25 s per SAQ epoch with 1 thread, 8 s with 2 on a shared 2-core host).
SMALL_MODEL = 1_000_000
HARDEN_PREFIX = "_harden_"


@dataclass
class SAQConfig:
    """Knobs of the fine-tune. The defaults are what `harden apply --saq` runs (docs/training.md)."""

    epochs: int = 5
    lr: float = 1e-3
    rho: float = 0.5
    mode: str = "asam"
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # learning rate: "cosine" (to 0 over the epochs) or "constant"
    kd: float = 0.0  # weight of the distillation term (KL to the model before fine-tuning)
    quantize: bool = True  # fake-quantize the weights (False: float fine-tune, e.g. variability only)
    sam: bool = True  # False: no perturbation step (plain quantization-aware fine-tune)
    tolerance: float = 0.01  # keep the last epoch whose int8 accuracy on the validation data is within this of the start
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None: 1 below SMALL_MODEL values, else torch's default

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"SAQ mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"--epochs must be an integer >= 1, got {self.epochs!r}")
        if not (self.rho >= 0 and math.isfinite(self.rho)):
            raise InputError(f"--rho must be >= 0, got {self.rho!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be > 0, got {self.lr!r}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.kd <= 1.0:
            raise InputError(f"kd must be in [0, 1], got {self.kd!r}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size!r}")


def quant_scale(w: "torch.Tensor", axis: int) -> "torch.Tensor":
    """Per-channel symmetric int8 scale (max |w| / 127), broadcastable against w, no gradient."""
    red = [i for i in range(w.dim()) if i != axis]
    m = w.detach().abs().amax(dim=red, keepdim=True) if red else w.detach().abs()
    return torch.clamp(m, min=1e-12) / 127.0


def fake_quant(w: "torch.Tensor", axis: int) -> "torch.Tensor":
    """Q(w) with a straight-through estimator: forward the int8 grid value, backward identity."""
    s = quant_scale(w, axis)
    q = torch.clamp(torch.round(w / s), -127, 127) * s
    return w + (q - w).detach()


def trainable_names(module: OnnxModule) -> tuple[list[str], list[str]]:
    """(weights, other trainable float initializers): weights are input 1 of Conv/Gemm/MatMul;
    the others are their biases and anything else float except frozen statistics and the
    clip pass's tensors."""
    weights = module.weight_names()
    others = [
        n for n, p in module.onnx_parameters().items()
        if n not in weights and p.requires_grad and HARDEN_PREFIX not in n and not n.startswith("harden_")
    ]
    return weights, others


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    seconds: float
    val_accuracy: float | None = None


@dataclass
class FineTuneResult:
    model: onnx.ModelProto
    epochs: list[EpochRecord] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def _feeds_of(data: Dataset) -> dict[str, "torch.Tensor"]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.inputs.items()}


def _batch_size(module: OnnxModule, feeds: dict[str, "torch.Tensor"], preferred: int, fixed: int | None) -> int:
    """The preferred batch, unless the graph only runs at its fixed batch size."""
    n = len(next(iter(feeds.values())))
    b = min(preferred, n)
    if fixed is None or fixed == b:
        return b
    try:
        with torch.no_grad():
            module.run({k: v[: min(b, n)] for k, v in feeds.items()})
        return b
    except (RuntimeError, ValueError, IndexError):
        return fixed


def predict(module: OnnxModule, data: Dataset, batch_size: int = 256, values=None, fixed: int | None = None) -> np.ndarray:
    """Top-1 predictions of the module (first output) on the data (eval mode, no gradient).
    A graph with a fixed batch size `fixed` gets its last partial batch padded."""
    feeds = _feeds_of(data)
    out_name = module.output_names[0]
    n = len(data)
    preds = []
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            x = {k: v[i : i + batch_size] for k, v in feeds.items()}
            m = len(next(iter(x.values())))
            if fixed is not None and m < batch_size:
                x = {k: torch.cat([v, v[-1:].expand(batch_size - m, *v.shape[1:])]) for k, v in x.items()}
            y = module.run(x, values=values)[out_name][:m]
            preds.append(y.reshape(len(y), -1).argmax(1).numpy())
    module.train(was_training)
    return np.concatenate(preds)


def _accuracy(module, data: Dataset, target: np.ndarray, batch: int, fixed: int | None, values) -> float:
    return float(np.mean(predict(module, data, batch, values=values, fixed=fixed) == target))


def quantized_values(module: OnnxModule, axes: dict[str, int]) -> dict[str, "torch.Tensor"]:
    """The fake-quantized weights (no gradient), to evaluate the module as int8 would compute."""
    with torch.no_grad():
        return {n: fake_quant(module.parameter(n), a) for n, a in axes.items()}


def fine_tune(
    model: onnx.ModelProto,
    train: Dataset,
    cfg: SAQConfig,
    *,
    val: Dataset | None = None,
    noise: Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"] | None = None,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> FineTuneResult:
    """Fine-tune the float initializers of `model` on `train`; return the same graph with the
    new values (write-back: node names and structure unchanged) and per-epoch records.

    `val` (optional): after every epoch, top-1 accuracy at the fake-quantized weights (against
    its labels, else agreement with the model before fine-tuning); the result is the last epoch
    within `cfg.tolerance` of the starting accuracy, or the unchanged model when none is.
    `noise(w, gen)` (optional) returns a perturbed copy of a weight; it is applied to every
    weight on every training forward pass, after fake quantization.
    `on_batch(done, total)` is called after every batch of an epoch (a progress bar).
    """
    cfg.validate()
    module = OnnxModule(model)
    threads = cfg.threads or (1 if sum(p.numel() for p in module.parameters()) < SMALL_MODEL else None)
    with torch_threads(threads):
        return _fine_tune(module, model, train, cfg, val, noise, on_epoch, on_batch)


class torch_threads:
    """Run a block with `n` torch intra-op threads (None: leave them), restoring them after."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
        return False


def _fine_tune(module, model, train, cfg, val, noise, on_epoch, on_batch) -> FineTuneResult:
    model_batch = fixed_batch(model)
    weights, others = trainable_names(module)
    if not weights:
        raise InputError("fine-tuning needs Conv, Gemm or MatMul weights; the model has none")
    wn = module.weight_nodes()
    axes = {n: output_channel_axis(wn[n][0].op_type, wn[n][1], module.parameter(n).dim()) for n in weights}
    for name, p in module.onnx_parameters().items():
        p.requires_grad_(name in weights or name in others)
    trained = weights + others
    params = [module.parameter(name) for name in trained]

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    feeds = _feeds_of(train)
    n = len(train)
    batch = _batch_size(module, feeds, cfg.batch_size, model_batch)
    fixed = model_batch if batch == model_batch else None  # the graph only runs at its fixed batch
    if train.labels is not None:
        labels = torch.from_numpy(train.labels.astype(np.int64))
        label_source = "labels"
    else:
        labels = torch.from_numpy(predict(module, train, batch, fixed=fixed).astype(np.int64))
        label_source = "own predictions"
    out_name = module.output_names[0]
    teacher = _logits(module, feeds, batch, fixed) if cfg.kd > 0 else None
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-n // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cfg.schedule == "cosine" else None
    ce = torch.nn.CrossEntropyLoss()

    def weights_now(detached: bool = False) -> dict[str, "torch.Tensor"]:
        vals = {}
        for name in weights:
            w = module.parameter(name)
            v = fake_quant(w, axes[name]) if cfg.quantize else w
            vals[name] = v.detach().requires_grad_() if detached else v
        return vals

    def loss_at(vals, x, y, idx):
        if noise is not None:
            vals = {k: noise(v, gen) for k, v in vals.items()}
        logits = module.run(x, values=vals)[out_name]
        logits = logits.reshape(len(logits), -1)
        loss = ce(logits, y)
        if teacher is None:
            return loss
        kl = torch.nn.functional.kl_div(torch.log_softmax(logits, 1), torch.log_softmax(teacher[idx], 1),
                                        reduction="batchmean", log_target=True)
        return (1 - cfg.kd) * loss + cfg.kd * kl

    val_target = None
    acc0 = None
    if val is not None:
        val_target = val.labels if val.labels is not None else predict(module, val, batch, fixed=fixed)
        acc0 = _accuracy(module, val, val_target, batch, fixed, quantized_values(module, axes) if cfg.quantize else None)
    snapshot = [p.detach().clone() for p in params]
    kept_epoch = 0
    batches = -(-n // batch)

    epochs: list[EpochRecord] = []
    module.train()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            if fixed is not None and len(idx) < batch:
                continue  # a fixed-batch graph takes full batches only
            x = {k: v[idx] for k, v in feeds.items()}
            y = labels[idx]
            opt.zero_grad(set_to_none=True)
            if cfg.sam and cfg.rho > 0:
                # 1. gradient at the quantized weights
                wq = weights_now(detached=True)
                loss = loss_at(wq, x, y, idx)
                grads = torch.autograd.grad(loss, list(wq.values()))
                eps = _perturbation(cfg, wq, grads, axes)
                # 2. gradient at the perturbed quantized weights, through the STE into w
                vals = weights_now()
                vals = {k: v + eps[k] for k, v in vals.items()}
                loss2 = loss_at(vals, x, y, idx)
                loss2.backward()
            else:
                loss = loss_at(weights_now(), x, y, idx)
                loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            if on_batch:
                on_batch(i // batch + 1, batches)
        seconds = time.perf_counter() - t0
        rec = EpochRecord(epoch + 1, round(total / max(seen, 1), 6), round(seconds, 4))
        if val is not None:
            rec.val_accuracy = round(_accuracy(module, val, val_target, batch, fixed,
                                               quantized_values(module, axes) if cfg.quantize else None), 6)
            if rec.val_accuracy >= acc0 - cfg.tolerance - 1e-12:
                snapshot = [p.detach().clone() for p in params]
                kept_epoch = epoch + 1
            module.train()
        else:
            kept_epoch = epoch + 1
        epochs.append(rec)
        if on_epoch:
            on_epoch(rec, cfg.epochs)
    module.eval()
    if val is not None:
        with torch.no_grad():
            for p, saved in zip(params, snapshot):
                p.copy_(saved)
    new = module.write_back(model)
    record = {
        "config": asdict(cfg),
        "trained_tensors": len(trained),
        "trained_values": int(sum(p.numel() for p in params)),
        "train_samples": n,
        "targets": label_source,
        "batch_size": batch,
        "epochs": [asdict(e) for e in epochs],
        "val_samples": len(val) if val is not None else None,
        "val_accuracy_start": None if acc0 is None else round(acc0, 6),
        "kept_epoch": kept_epoch,
        "seconds_per_epoch": round(float(np.mean([e.seconds for e in epochs])), 4),
    }
    return FineTuneResult(new, epochs, record)


def _logits(module: OnnxModule, feeds: dict, batch: int, fixed: int | None = None) -> "torch.Tensor":
    """The module's first output on all samples (no gradient), flattened past the batch axis."""
    out_name = module.output_names[0]
    n = len(next(iter(feeds.values())))
    chunks = []
    with torch.no_grad():
        for i in range(0, n, batch):
            x = {k: v[i : i + batch] for k, v in feeds.items()}
            m = len(next(iter(x.values())))
            if fixed is not None and m < batch:
                x = {k: torch.cat([v, v[-1:].expand(batch - m, *v.shape[1:])]) for k, v in x.items()}
            y = module.run(x)[out_name][:m]
            chunks.append(y.reshape(len(y), -1))
    return torch.cat(chunks)


def _perturbation(cfg: SAQConfig, wq: dict, grads, axes: dict[str, int]) -> dict[str, "torch.Tensor"]:
    """eps = rho * T^2 g / ||T g|| over all weights jointly (adaptive SAM), at the quantized weights."""
    with torch.no_grad():
        ts = {}
        for (name, w), g in zip(wq.items(), grads):
            if cfg.mode == "asam":
                ts[name] = w.abs()
            elif cfg.mode == "scale":
                ts[name] = quant_scale(w, axes[name]).expand_as(w)
            else:
                ts[name] = torch.ones_like(w)
        norm = torch.sqrt(sum(((ts[n] * g) ** 2).sum() for n, g in zip(wq, grads)))
        norm = torch.clamp(norm, min=1e-12)
        return {n: cfg.rho * ts[n] ** 2 * g / norm for n, g in zip(wq, grads)}
