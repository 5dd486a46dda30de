"""Real, small, trained models for the test suite and the bundled samples.

Everything here is test / sample infrastructure: torch is imported lazily and only by the
builders that train (``train_digits_cnn``, ``train_tabular_mlp``); the data helpers, the legacy
rewrites and ``light_model_path`` need only numpy, onnx, onnxruntime and scikit-learn.

Models
    train_digits_cnn("plain" | "residual", out_dir, opset, dynamic_batch, seed, epochs)
        8x8 scikit-learn digits, input "input" float32 [N, 1, 8, 8] in [0, 1], output
        "logits" [N, 10]. dynamic_batch=False exports a fixed batch of 1 (the shape of the
        old model-zoo graphs), so such a model must be fed one sample at a time.
        BatchNorm is folded into the convolutions by the exporter (eval mode), so the graph
        holds Conv / Relu / MaxPool / Add / GlobalAveragePool / Flatten / Gemm and initializer
        names such as "onnx::Conv_37" (what a default torch export looks like).
    train_tabular_mlp(out_dir, opset, use_matmul)
        breast-cancer MLP, input "input" float32 [N, 30] (standardised), output "logits" [N, 2];
        Gemm nodes, or MatMul + Add with use_matmul=True.
    legacy_initializers_as_inputs / legacy_constant_of_shape: rewrites of a model into the
        shapes old exporters produced; outputs unchanged.
    light_model_path(name): onnx's bundled opset-9 model-zoo graphs (weights from ConstantOfShape).

Data and helpers
    digits_splits(), tabular_splits(): fixed stratified splits (read-only arrays);
    write_npz(path, x, y, input_name): a harden .npz dataset;
    run_ort / accuracy / reference_logits / assert_close: onnxruntime checks used by the tests.

Training: Adam, cosine schedule, fixed seeds, torch deterministic algorithms, one thread; after
the given epochs it keeps going (up to 3x) until the test split reaches the accuracy floor
(digits 96 %, tabular 93 %) and raises if it never does.

Every builder writes atomically and reuses an existing file built with the same parameters
(the file name encodes them, plus ZOO_VERSION). Next to each trained model it writes
``<model stem>.ref.npz`` holding the torch logits on the test split (key "logits"), so a test
can check onnxruntime against torch without retraining (``reference_logits``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from harden.arithmetic import session_options

# Bump when a change to the training or export code changes the models, so cached files
# (named with this version) are rebuilt.
ZOO_VERSION = 1

DIGITS_SPLIT = {"train": 1200, "calib": 256}  # the rest (341) is the test split
TABULAR_SPLIT = {"calib": 100, "test": 140}  # the rest (329) is the train split
DIGITS_ACCURACY_FLOOR = 0.96
TABULAR_ACCURACY_FLOOR = 0.93
EXPORT_RTOL = 1e-4

DEFAULT_DIGITS_EPOCHS = 15
DEFAULT_TABULAR_EPOCHS = 30

_SPLIT_SEED = 0
_cache: dict = {}


# --------------------------------------------------------------------------------------------
# data


def _mkstemp(path: Path, suffix: str = ".tmp") -> str:
    """A temp file next to ``path`` (for an atomic replace) with the mode a plain open() would
    give (mkstemp's 0600 would otherwise survive the rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _frozen(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for a in d.values():
        a.setflags(write=False)
    return d


def digits_splits() -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits, stratified into train / calib / test with a fixed seed.

    Keys x_train, y_train, x_calib, y_calib, x_test, y_test. x: float32 [N, 1, 8, 8] in [0, 1];
    y: int64 class ids. Sizes 1200 / 256 / 341. The arrays are read-only (cached in-process);
    copy before modifying.
    """
    if "digits" not in _cache:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        y = d.target.astype(np.int64)
        x_tr, x_rest, y_tr, y_rest = train_test_split(
            x, y, train_size=DIGITS_SPLIT["train"], stratify=y, random_state=_SPLIT_SEED
        )
        x_ca, x_te, y_ca, y_te = train_test_split(
            x_rest, y_rest, train_size=DIGITS_SPLIT["calib"], stratify=y_rest,
            random_state=_SPLIT_SEED,
        )
        _cache["digits"] = _frozen(
            {
                "x_train": np.ascontiguousarray(x_tr), "y_train": y_tr,
                "x_calib": np.ascontiguousarray(x_ca), "y_calib": y_ca,
                "x_test": np.ascontiguousarray(x_te), "y_test": y_te,
            }
        )
    return dict(_cache["digits"])


def tabular_splits() -> dict[str, np.ndarray]:
    """scikit-learn's breast-cancer table (569 x 30, 2 classes), standardised with the
    train-split statistics; stratified train / calib / test = 329 / 100 / 140.

    Same keys and conventions as digits_splits(); x is float32 [N, 30].
    """
    if "tabular" not in _cache:
        from sklearn.datasets import load_breast_cancer
        from sklearn.model_selection import train_test_split

        d = load_breast_cancer()
        x = d.data.astype(np.float64)
        y = d.target.astype(np.int64)
        x_rest, x_te, y_rest, y_te = train_test_split(
            x, y, test_size=TABULAR_SPLIT["test"], stratify=y, random_state=_SPLIT_SEED
        )
        x_tr, x_ca, y_tr, y_ca = train_test_split(
            x_rest, y_rest, test_size=TABULAR_SPLIT["calib"], stratify=y_rest,
            random_state=_SPLIT_SEED,
        )
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        std[std == 0] = 1.0

        def norm(a):
            return np.ascontiguousarray(((a - mean) / std).astype(np.float32))

        _cache["tabular"] = _frozen(
            {
                "x_train": norm(x_tr), "y_train": y_tr,
                "x_calib": norm(x_ca), "y_calib": y_ca,
                "x_test": norm(x_te), "y_test": y_te,
            }
        )
    return dict(_cache["tabular"])


def digits_dataset(d: dict, split: str, labels: bool = True):
    """A harden Dataset of one digits split (`d` from digits_splits()), with or without labels."""
    from harden.data import Dataset

    return Dataset({"input": np.array(d[f"x_{split}"])}, np.array(d[f"y_{split}"]) if labels else None)


def write_npz(path, x, y=None, input_name: str = "input") -> Path:
    """Write a harden dataset: {input_name: x} plus "label" (int64) when y is given.

    Plain np.savez (no object arrays, loadable with allow_pickle=False), written atomically to
    exactly ``path`` (no ".npz" appended).
    """
    path = Path(path)
    arrays = {input_name: np.ascontiguousarray(x)}
    if y is not None:
        arrays["label"] = np.asarray(y, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_npz(path, arrays)
    return path


def _atomic_npz(path: Path, arrays: dict) -> None:
    tmp = _mkstemp(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# onnxruntime helpers


def ort_session(model) -> ort.InferenceSession:
    """A one-thread session in the chip's arithmetic (harden/arithmetic.py): never the host's
    fused int8 kernels, which saturate on x86 without VNNI."""
    so = session_options(threads=1)
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_ort(model, x: np.ndarray, input_name: str | None = None) -> np.ndarray:
    """First output of ``model`` (path, ModelProto or session) on ``x``. A model with a fixed
    batch dimension is fed in chunks of that size."""
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model)
    inp = sess.get_inputs()[0]
    name = input_name or inp.name
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    if batch is None or batch == len(x):
        return sess.run(None, {name: x})[0]
    if len(x) % batch:
        raise ValueError(f"{len(x)} samples do not split into fixed batches of {batch}")
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` in onnxruntime."""
    return float((run_ort(model, x).argmax(axis=1) == y).mean())


def reference_logits(model_path) -> np.ndarray:
    """The torch logits on the test split recorded when ``model_path`` was trained."""
    p = Path(model_path)
    with np.load(p.with_name(p.stem + ".ref.npz"), allow_pickle=False) as f:
        return f["logits"]


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = EXPORT_RTOL) -> None:
    """|actual - expected| <= rtol * max(1, max|expected|) elementwise (relative to the
    logits' scale, so tiny logits near 0 do not make the check meaningless)."""
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    if err > rtol * scale:
        raise AssertionError(f"max abs diff {err:.3g} > {rtol:g} * {scale:.3g}")


# --------------------------------------------------------------------------------------------
# torch: models, training, export (lazy imports)


def _torch():
    import torch

    return torch


def _digits_module(kind: str):
    torch = _torch()
    nn = torch.nn

    def cbr(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    if kind == "plain":
        return nn.Sequential(
            *cbr(1, 16), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 32),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )

    if kind == "residual":
        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.conv1 = nn.Conv2d(c, c, 3, padding=1)
                self.bn1 = nn.BatchNorm2d(c)
                self.conv2 = nn.Conv2d(c, c, 3, padding=1)
                self.bn2 = nn.BatchNorm2d(c)
                self.relu = nn.ReLU()

            def forward(self, x):
                out = self.relu(self.bn1(self.conv1(x)))
                out = self.bn2(self.conv2(out))
                return self.relu(out + x)

        return nn.Sequential(
            *cbr(1, 16), Block(16), Block(16),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )

    raise ValueError(f"unknown digits model kind {kind!r}; expected 'plain' or 'residual'")


def _mlp_module(n_in: int, n_out: int, hidden=(32, 16)):
    nn = _torch().nn
    h1, h2 = hidden
    return nn.Sequential(nn.Linear(n_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                         nn.Linear(h2, n_out))


def _matmul_twin(seq):
    """The same MLP as ``seq`` (Linear/ReLU Sequential) written as ``x @ W + b`` so the export
    has MatMul + Add instead of Gemm."""
    torch = _torch()
    nn = torch.nn

    class MatMulLinear(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.weight = nn.Parameter(lin.weight.detach().t().contiguous().clone())  # [in, out]
            self.bias = nn.Parameter(lin.bias.detach().clone())

        def forward(self, x):
            return torch.matmul(x, self.weight) + self.bias

    layers = [MatMulLinear(m) if isinstance(m, nn.Linear) else m for m in seq]
    return nn.Sequential(*layers).eval()


class _TorchState:
    """Seeds, deterministic algorithms and ONE intra-op thread for the duration of a training
    run. One thread, not two: these models are tiny, and on a 2-core machine that is also busy
    with other work torch's OpenMP threads spin against each other (measured: 0.12 s per digits
    epoch with 1 thread, 0.4 to 10 s with 2)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        torch = _torch()
        self._threads = torch.get_num_threads()
        self._det = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.seed)
        return torch

    def __exit__(self, *exc):
        torch = _torch()
        torch.set_num_threads(self._threads)
        torch.use_deterministic_algorithms(self._det)
        return False


def _train(model, x, y, x_eval, y_eval, *, seed, epochs, lr, floor, batch_size=64,
           weight_decay=0.0, what="model"):
    """Adam + cross-entropy, shuffled mini-batches from a seeded generator. Trains ``epochs``
    epochs, then up to 2x more, one at a time, until eval accuracy >= floor. Returns the model
    in eval mode and its eval accuracy."""
    with _TorchState(seed) as torch:
        gen = torch.Generator().manual_seed(seed)
        xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
        xe = torch.from_numpy(np.array(x_eval))
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        loss_fn = torch.nn.CrossEntropyLoss()

        def evaluate():
            model.eval()
            with torch.no_grad():
                return float((model(xe).argmax(1).numpy() == y_eval).mean())

        acc = 0.0
        for epoch in range(3 * epochs):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), batch_size):
                idx = perm[i:i + batch_size]
                if len(idx) < 2:  # BatchNorm needs > 1 sample
                    continue
                opt.zero_grad()
                loss_fn(model(xt[idx]), yt[idx]).backward()
                opt.step()
            if epoch < epochs:
                sched.step()
            if epoch + 1 >= epochs:
                acc = evaluate()
                if acc >= floor:
                    break
        if acc < floor:
            raise RuntimeError(f"{what}: accuracy {acc:.4f} below the floor {floor} after "
                               f"{3 * epochs} epochs")
        model.eval()
        return model, acc


def _atomic_save(model: onnx.ModelProto, path: Path) -> None:
    tmp = _mkstemp(path)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _export(module, example: np.ndarray, path: Path, *, opset: int, dynamic_batch: bool,
            x_check: np.ndarray, meta: dict) -> None:
    """Legacy (TorchScript) export, eval mode; checker + onnxruntime-vs-torch check; writes
    ``path`` and its ``.ref.npz`` sidecar (torch logits on x_check)."""
    torch = _torch()
    module.eval()
    with torch.no_grad():
        ref = module(torch.from_numpy(np.array(x_check))).numpy()
    tmp = _mkstemp(path, suffix=".tmp.onnx")
    try:
        kwargs = dict(
            opset_version=opset, input_names=["input"], output_names=["logits"],
            do_constant_folding=True, dynamo=False,
        )
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
            torch.onnx.export(module, (torch.from_numpy(np.array(example)),), tmp, **kwargs)
        m = onnx.load(tmp)
        onnx.helper.set_model_props(m, {"zoo": json.dumps(meta, sort_keys=True)})
        m.doc_string = "harden test zoo: " + meta.get("name", "")
        onnx.checker.check_model(m, full_check=True)
        got = run_ort(m, np.array(x_check))
        assert_close(got, ref)
        _atomic_npz(path.with_name(path.stem + ".ref.npz"), {"logits": ref})
        onnx.save(m, tmp)
        os.replace(tmp, path)  # the model appears last: its existence marks a complete build
    finally:
        Path(tmp).unlink(missing_ok=True)


def _cached(path: Path) -> bool:
    return path.exists() and path.with_name(path.stem + ".ref.npz").exists()


def digits_cnn_name(kind: str, opset: int = 17, dynamic_batch: bool = True, seed: int = 0,
                    epochs: int = DEFAULT_DIGITS_EPOCHS) -> str:
    batch = "dyn" if dynamic_batch else "b1"
    return f"digits_{kind}_op{opset}_{batch}_s{seed}_e{epochs}_v{ZOO_VERSION}.onnx"


def train_digits_cnn(kind: str, out_dir, opset: int = 17, dynamic_batch: bool = True,
                     seed: int = 0, epochs: int = DEFAULT_DIGITS_EPOCHS) -> Path:
    """Train (or reuse) a digits CNN and export it to ``out_dir``; returns the .onnx path.

    kind "plain": 3 x (Conv3x3 + BN + ReLU) with a MaxPool after the second, Flatten,
    Linear(512 -> 10); 19,088 weights in Conv/Gemm. kind "residual": stem Conv(1->16) + BN +
    ReLU, 2 residual blocks (conv-bn-relu-conv-bn + identity Add + ReLU), GlobalAveragePool,
    Linear(16 -> 10); 9,520 weights. Test accuracy >= 96 % (raises otherwise).
    dynamic_batch=False exports a fixed batch of 1.
    """
    if kind not in ("plain", "residual"):
        raise ValueError(f"unknown digits model kind {kind!r}; expected 'plain' or 'residual'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / digits_cnn_name(kind, opset, dynamic_batch, seed, epochs)
    if _cached(path):
        return path
    d = digits_splits()
    key = ("digits", kind, seed, epochs)
    if key not in _cache:
        with _TorchState(seed):
            module = _digits_module(kind)
        _cache[key] = _train(
            module, d["x_train"], d["y_train"], d["x_test"], d["y_test"], seed=seed,
            epochs=epochs, lr=3e-3, floor=DIGITS_ACCURACY_FLOOR, what=f"digits {kind}",
        )
    module, acc = _cache[key]
    meta = dict(name=path.stem, kind=kind, opset=opset, dynamic_batch=dynamic_batch, seed=seed,
                epochs=epochs, dataset="sklearn.load_digits", torch_test_accuracy=acc,
                zoo_version=ZOO_VERSION)
    _export(module, d["x_test"][:1], path, opset=opset, dynamic_batch=dynamic_batch,
            x_check=d["x_test"], meta=meta)
    return path


def tabular_mlp_name(opset: int = 17, use_matmul: bool = False, seed: int = 0,
                     epochs: int = DEFAULT_TABULAR_EPOCHS) -> str:
    form = "matmul" if use_matmul else "gemm"
    return f"tabular_mlp_{form}_op{opset}_s{seed}_e{epochs}_v{ZOO_VERSION}.onnx"


def train_tabular_mlp(out_dir, opset: int = 17, use_matmul: bool = False, seed: int = 0,
                      epochs: int = DEFAULT_TABULAR_EPOCHS) -> Path:
    """Train (or reuse) the breast-cancer MLP 30-32-16-2 (Linear-ReLU-Linear-ReLU-Linear) and
    export it with a dynamic batch; returns the .onnx path. The graph has 3 Gemm nodes, or with
    use_matmul=True 3 MatMul + 3 Add (weights stored [in, out]); both variants share the same
    trained weights. Test accuracy >= 93 % (raises otherwise)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / tabular_mlp_name(opset, use_matmul, seed, epochs)
    if _cached(path):
        return path
    d = tabular_splits()
    key = ("tabular", seed, epochs)
    if key not in _cache:
        with _TorchState(seed):
            module = _mlp_module(d["x_train"].shape[1], 2)
        _cache[key] = _train(
            module, d["x_train"], d["y_train"], d["x_test"], d["y_test"], seed=seed,
            epochs=epochs, lr=1e-3, floor=TABULAR_ACCURACY_FLOOR, batch_size=32,
            weight_decay=1e-4, what="tabular mlp",
        )
    module, acc = _cache[key]
    if use_matmul:
        module = _matmul_twin(module)
    meta = dict(name=path.stem, kind="mlp", use_matmul=use_matmul, opset=opset, seed=seed,
                epochs=epochs, dataset="sklearn.load_breast_cancer", torch_test_accuracy=acc,
                zoo_version=ZOO_VERSION)
    _export(module, d["x_test"][:1], path, opset=opset, dynamic_batch=True,
            x_check=d["x_test"], meta=meta)
    return path


# --------------------------------------------------------------------------------------------
# the architectures users deploy, built from torch.nn's own classes

ARCHITECTURES = ("vit", "mobilenetv2", "bert")
#: Test-split accuracy each architecture must reach. The small transformers learn 8x8 digits
#: from 1,200 samples less well than a CNN (the BERT reads 64 pixel-intensity tokens and has no
#: notion of 2-D neighbourhood: 84.5 %); the floor still fails a broken training run.
ARCH_FLOORS = {"vit": 0.94, "mobilenetv2": 0.95, "bert": 0.80}
ARCH_EPOCHS = {"vit": 40, "mobilenetv2": 30, "bert": 40}
BERT_CLS = 0  # token ids: 0 = [CLS], pixel value v (0..16) = v + 1


def digits_tokens(x: np.ndarray) -> np.ndarray:
    """Digits images [N, 1, 8, 8] in [0, 1] as BERT input ids [N, 65] int64: [CLS] then the 64
    pixel intensities (0..16, scikit-learn's own levels) as tokens 1..17."""
    levels = np.rint(np.asarray(x, np.float32).reshape(len(x), -1) * 16).astype(np.int64)
    return np.concatenate([np.full((len(x), 1), BERT_CLS, np.int64), levels + 1], axis=1)


def arch_inputs(kind: str, x: np.ndarray) -> np.ndarray:
    """What the architecture reads for digits images ``x``: the images, or BERT's token ids."""
    return digits_tokens(x) if kind == "bert" else np.asarray(x)


def _arch_module(kind: str):
    torch = _torch()
    nn = torch.nn

    def encoder(dim, depth, norm_first):
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=norm_first)
        return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    if kind == "vit":
        class ViT(nn.Module):
            """Conv patch embedding (patch 4: 4 tokens of 8x8 digits), a class token expanded
            over the batch, learned positions, 3 pre-norm encoder layers (4 heads, GELU),
            LayerNorm, a Linear head on the class token."""

            def __init__(self, dim=32):
                super().__init__()
                self.patch = nn.Conv2d(1, dim, 4, stride=4)
                self.cls = nn.Parameter(torch.zeros(1, 1, dim))
                self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
                self.encoder = encoder(dim, 3, norm_first=True)
                self.norm = nn.LayerNorm(dim)
                self.head = nn.Linear(dim, 10)

            def forward(self, x):
                x = self.patch(x).flatten(2).transpose(1, 2)
                x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
                return self.head(self.norm(self.encoder(x)[:, 0]))

        return ViT()

    if kind == "mobilenetv2":
        class InvertedResidual(nn.Module):
            """MobileNetV2's block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear
            projection, identity shortcut when the shape allows."""

            def __init__(self, cin, cout, stride, t):
                super().__init__()
                hid = cin * t
                layers = [] if t == 1 else [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6()]
                self.use_res = stride == 1 and cin == cout
                self.conv = nn.Sequential(
                    *layers,
                    nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
                    nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout),
                )

            def forward(self, x):
                return x + self.conv(x) if self.use_res else self.conv(x)

        blocks = [(16, 16, 1, 1), (16, 24, 2, 4), (24, 24, 1, 4), (24, 32, 1, 4), (32, 32, 1, 4)]
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            *[InvertedResidual(*b) for b in blocks],
            nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )

    if kind == "bert":
        class Bert(nn.Module):
            """Token and position embeddings (nn.Embedding: Gather from initializers), LayerNorm,
            2 post-norm encoder layers (4 heads, GELU), a Linear head on [CLS]."""

            def __init__(self, dim=32):
                super().__init__()
                self.tok = nn.Embedding(18, dim)
                self.pos = nn.Embedding(65, dim)
                self.ln = nn.LayerNorm(dim)
                self.encoder = encoder(dim, 2, norm_first=False)
                self.head = nn.Linear(dim, 10)

            def forward(self, ids):
                pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
                return self.head(self.encoder(self.ln(self.tok(ids) + self.pos(pos)))[:, 0])

        return Bert()

    raise ValueError(f"unknown architecture {kind!r}; expected one of {', '.join(ARCHITECTURES)}")


def arch_name(kind: str, opset: int = 17, seed: int = 0) -> str:
    return f"digits_{kind}_op{opset}_s{seed}_e{ARCH_EPOCHS.get(kind, 0)}_v{ZOO_VERSION}.onnx"


def train_arch(kind: str, out_dir, opset: int = 17, seed: int = 0) -> Path:
    """Train (or reuse) one of ARCHITECTURES on the digits and export it (dynamic batch);
    returns the .onnx path. Input "input": images [N, 1, 8, 8] (vit, mobilenetv2) or token
    ids [N, 65] int64 (bert, see digits_tokens); output "logits" [N, 10]. Test accuracy >=
    ARCH_FLOORS[kind] (raises otherwise)."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {kind!r}; expected one of {', '.join(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / arch_name(kind, opset, seed)
    if _cached(path):
        return path
    d = digits_splits()
    key = ("arch", kind, seed)
    if key not in _cache:
        with _TorchState(seed):
            module = _arch_module(kind)
        _cache[key] = _train(
            module, arch_inputs(kind, d["x_train"]), d["y_train"], arch_inputs(kind, d["x_test"]),
            d["y_test"], seed=seed, epochs=ARCH_EPOCHS[kind], lr=3e-3 if kind == "mobilenetv2" else 1e-3,
            floor=ARCH_FLOORS[kind], weight_decay=1e-4, what=f"digits {kind}",
        )
    module, acc = _cache[key]
    meta = dict(name=path.stem, kind=kind, opset=opset, dynamic_batch=True, seed=seed,
                epochs=ARCH_EPOCHS[kind], dataset="sklearn.load_digits", torch_test_accuracy=acc,
                zoo_version=ZOO_VERSION)
    x_test = arch_inputs(kind, d["x_test"])
    _export(module, x_test[:2], path, opset=opset, dynamic_batch=True, x_check=x_test, meta=meta)
    return path


# --------------------------------------------------------------------------------------------
# legacy rewrites and bundled legacy models


def legacy_initializers_as_inputs(src, out, ir_version: int | None = 3) -> Path:
    """Rewrite ``src`` the way IR-version-3 exporters (the old model zoo) wrote models: every
    initializer is also listed in graph.input. ``ir_version`` sets the model's IR version
    (default 3, where listing them is mandatory; None keeps the source's)."""
    m = onnx.load(str(src))
    listed = {i.name for i in m.graph.input}
    for init in m.graph.initializer:
        if init.name not in listed:
            m.graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    if ir_version is not None:
        m.ir_version = ir_version
    onnx.checker.check_model(m)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(m, out)
    return out


_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def legacy_constant_of_shape(src, out) -> Path:
    """Rewrite ``src`` so some weights come from nodes instead of initializers, as old
    exporters wrote them; the outputs stay bit-identical. For the weight-consuming nodes
    (Conv / ConvTranspose / Gemm / MatMul) in graph order:

    - 1st: its weight (input 1) becomes a ``Constant`` node (value attribute = the tensor);
      its bias (input 2, or for MatMul the initializer added to its output) becomes ``ConstantOfShape(shape, value=0.0) + Constant(bias)``
      (``Add``), the ConstantOfShape's shape coming from a Constant int64 node;
    - 2nd (if any): its weight is stored flattened as an initializer and restored by a
      ``Reshape`` whose target shape is a Constant node.

    The replaced initializers (and their graph.input entries, if listed) are removed. Constant
    folding (onnxsim) turns all of it back into initializers.
    """
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    consumers = [n for n in g.node if n.op_type in _WEIGHT_OPS
                 and len(n.input) > 1 and n.input[1] in inits]
    if not consumers:
        raise ValueError(f"{src}: no {'/'.join(_WEIGHT_OPS)} node with an initializer weight")
    uses = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    new_nodes, removed = [], set()

    def take(name):
        if uses.get(name, 0) != 1:
            return None  # shared tensor: leave it alone
        removed.add(name)
        return numpy_helper.to_array(inits[name])

    first = consumers[0]
    w = take(first.input[1])
    if w is not None:
        new_nodes.append(helper.make_node(
            "Constant", [], [first.input[1]], name="legacy/w0_const",
            value=numpy_helper.from_array(w, first.input[1] + "_value")))
    bname = _bias_of(g, first, inits)
    if bname is not None:
        b = take(bname)
        if b is not None:
            zero = numpy_helper.from_array(np.zeros([1], dtype=b.dtype))
            new_nodes += [
                helper.make_node("Constant", [], [bname + "_shape"], name="legacy/b0_shape",
                                 value=numpy_helper.from_array(
                                     np.array(b.shape, dtype=np.int64), bname + "_shape_value")),
                helper.make_node("ConstantOfShape", [bname + "_shape"], [bname + "_zeros"],
                                 name="legacy/b0_zeros", value=zero),
                helper.make_node("Constant", [], [bname + "_delta"], name="legacy/b0_delta",
                                 value=numpy_helper.from_array(b, bname + "_delta_value")),
                helper.make_node("Add", [bname + "_zeros", bname + "_delta"], [bname],
                                 name="legacy/b0_add"),
            ]
    if len(consumers) > 1:
        wname = consumers[1].input[1]
        w1 = take(wname)
        if w1 is not None:
            g.initializer.append(numpy_helper.from_array(w1.reshape(-1), wname + "_flat"))
            new_nodes += [
                helper.make_node("Constant", [], [wname + "_shape"], name="legacy/w1_shape",
                                 value=numpy_helper.from_array(
                                     np.array(w1.shape, dtype=np.int64), wname + "_shape_value")),
                helper.make_node("Reshape", [wname + "_flat", wname + "_shape"], [wname],
                                 name="legacy/w1_reshape"),
            ]
    if not removed:
        raise ValueError(f"{src}: every weight is shared; nothing to rewrite")

    kept = [i for i in g.initializer if i.name not in removed]
    del g.initializer[:]
    g.initializer.extend(kept)
    kept_inputs = [i for i in g.input if i.name not in removed]
    del g.input[:]
    g.input.extend(kept_inputs)
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + old_nodes)
    onnx.checker.check_model(m)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(m, out)
    return out


def _bias_of(g, node, inits) -> str | None:
    """The bias initializer of a weight node: its input 2 (Conv, Gemm), or for MatMul the
    initializer operand of the Add that consumes its output."""
    if len(node.input) > 2:
        return node.input[2] if node.input[2] in inits else None
    if node.op_type == "MatMul":
        for n in g.node:
            if n.op_type == "Add" and node.output[0] in n.input:
                other = [i for i in n.input if i != node.output[0]]
                if len(other) == 1 and other[0] in inits:
                    return other[0]
    return None


LIGHT_MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                "shufflenet", "squeezenet", "vgg19", "zfnet512")


def with_batchnorm_node(src, dst) -> Path:
    """Insert an explicit BatchNormalization (non-trivial statistics) after the first Conv."""
    src, dst = Path(src), Path(dst)
    m = onnx.load(str(src))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    channels = next(t for t in m.graph.initializer if t.name == conv.input[1]).dims[0]
    rng = np.random.default_rng(0)
    stats = {
        "bn_scale": rng.uniform(0.8, 1.2, channels), "bn_bias": rng.uniform(-0.1, 0.1, channels),
        "bn_mean": rng.uniform(-0.1, 0.1, channels), "bn_var": rng.uniform(0.8, 1.2, channels),
    }
    m.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items())
    out = conv.output[0]
    conv.output[0] = out + "_prebn"
    bn = onnx.helper.make_node("BatchNormalization", [out + "_prebn", *stats], [out], name="inserted_bn")
    nodes = list(m.graph.node)
    nodes.insert(nodes.index(conv) + 1, bn)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def light_model_path(name: str) -> Path:
    """onnx's bundled ``backend/test/data/light/light_<name>.onnx``: real model-zoo graphs
    (IR 3, opset 9, input [1, 3, 224, 224], initializers listed as inputs) whose weights are
    all made by ConstantOfShape nodes (each weight tensor is one repeated value, so the outputs
    carry no meaning; the graphs do). Names: see LIGHT_MODELS."""
    base = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    p = base / f"light_{name}.onnx"
    if not p.exists():
        have = sorted(q.stem[len("light_"):] for q in base.glob("light_*.onnx"))
        raise FileNotFoundError(f"{p} not found; available: {', '.join(have) or 'none'}")
    return p
