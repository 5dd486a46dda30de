"""onnxruntime sessions: creation, batched inference and capture of intermediate tensors."""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from .arithmetic import session_options
from .data import Dataset
from .errors import InputError

_THREADS: int | None = None  # onnxruntime intra-op threads; None: onnxruntime's default (all cores)


_LOCAL = threading.local()  # a thread's own setting (campaign trial threads), over _THREADS


def set_session_threads(threads: int | None) -> None:
    """Threads for the sessions this process builds from now on (a Dask worker sets 1)."""
    global _THREADS
    _THREADS = threads


def process_session_threads() -> int | None:
    """The process's setting (None: onnxruntime's default, every core)."""
    return _THREADS


def set_thread_session_threads(threads: int | None) -> None:
    """Threads for the sessions the calling thread builds from now on (None: the process's
    setting). A campaign's trial threads (campaign/parallel.py) set 1: one pass per core."""
    _LOCAL.threads = threads


_SHARED_ARENA = False  # the process-wide arena of `session(..., shared_arena=True)` is registered
_SHARED_ARENA_LOCK = threading.Lock()  # Dask workers build sessions from several threads


def _register_shared_arena() -> None:
    global _SHARED_ARENA
    with _SHARED_ARENA_LOCK:
        if _SHARED_ARENA:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        except Exception:  # noqa: BLE001 - registered already by the host program: use that one
            pass
        _SHARED_ARENA = True


def session(model: onnx.ModelProto | bytes, *, optimize: bool = True, host_fused: bool = False,
            spin: bool = True, shared_arena: bool = False) -> ort.InferenceSession:
    """A CPU session for an in-memory model (a ModelProto or its serialized bytes) that computes
    what the chip computes.

    QDQ fusion is off (arithmetic.py: exact int32 accumulation to within float32 rounding, on
    any host). `host_fused=True` gives onnxruntime's default session instead, whose fused int8
    kernels depend on the host CPU: only for warning a user who deploys with onnxruntime.
    `shared_arena=True` (a campaign's sessions, built one after another for a few passes each)
    takes memory from one arena the process keeps, not from an arena of the session's own: a
    new session's first pass otherwise page-faults its activations' memory in afresh (26 MB,
    6,600 faults per 32-trial session of the samples CNN; none with the shared arena). That
    memory stays with the process, so one-off sessions (calibration, statistics) keep their own.
    """
    if host_fused:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
    else:
        opts = session_options(optimize=optimize, threads=getattr(_LOCAL, "threads", None) or _THREADS)
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_arena:
        _register_shared_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    try:
        src = model if isinstance(model, bytes) else model.SerializeToString()
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0][:200]}") from None


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch dimension of the model's first real input, None when it is symbolic."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return None
    return None


def batch_size_for(model: onnx.ModelProto, preferred: int = 64) -> int:
    """The batch size to feed: the model's fixed batch dimension, else `preferred`."""
    return fixed_batch(model) or preferred


def run_batched(
    sess: ort.InferenceSession,
    data: Dataset,
    batch_size: int,
    outputs: list[str] | None = None,
    extra_feeds: dict[str, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Run the whole dataset and concatenate each requested output along the batch axis.

    A fixed-batch model gets its last partial batch padded and trimmed.
    """
    names = outputs or [o.name for o in sess.get_outputs()]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for feeds in data.batches(batch_size):
        n = len(next(iter(feeds.values())))
        if n < batch_size and _fixed_batch(sess):
            feeds = {k: _pad(v, batch_size) for k, v in feeds.items()}
        if extra_feeds:
            feeds = {**feeds, **extra_feeds}
        for i, out in enumerate(sess.run(names, feeds)):
            chunks[i].append(out[:n])
    return [np.concatenate(c) for c in chunks]


def _fixed_batch(sess: ort.InferenceSession) -> bool:
    shape = sess.get_inputs()[0].shape
    return bool(shape) and isinstance(shape[0], int)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    reps = np.repeat(a[-1:], n - len(a), axis=0)
    return np.concatenate([a, reps])


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also outputs the named intermediate float tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in names:
        if name not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return m


def initializer_bytes(name: str, value: np.ndarray) -> bytes:
    """A ModelProto holding only graph.initializer [value]: appended to a model's bytes, protobuf's
    merge adds it to that model's initializers."""
    m = onnx.ModelProto()
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
    return m.SerializeToString()


class VariantSessions:
    """Ordinary sessions of one model with some of its initializers replaced (a trial's faulty
    weights): the weights stay constant, so onnxruntime folds and prepacks them as for any model,
    which a session fed the weights as inputs cannot do (2 to 4x slower convolutions, measured in
    docs/results.md). The model's bytes without the `names` tensors are serialized once; a
    variant appends its tensors (protobuf merges a repeated field across concatenated messages),
    so it costs the serialization of its tensors and a session build."""

    def __init__(self, model: onnx.ModelProto, names: Iterable[str]):
        names = list(names)
        self.session = session(model)
        base = onnx.ModelProto()
        base.CopyFrom(model)
        wanted = set(names)
        keep = [t for t in base.graph.initializer if t.name not in wanted]
        values = {t.name: onnx.numpy_helper.to_array(t) for t in base.graph.initializer if t.name in wanted}
        del base.graph.initializer[:]
        base.graph.initializer.extend(keep)
        self._base = base.SerializeToString()
        self._tensors = {n: initializer_bytes(n, values[n]) for n in names}

    def session_for(self, values: dict[str, np.ndarray] | None) -> ort.InferenceSession:
        """The session of the model with `values` in place of those initializers."""
        if not values:
            return self.session
        parts = [initializer_bytes(n, values[n]) if n in values else b for n, b in self._tensors.items()]
        return session(self._base + b"".join(parts), shared_arena=True)


def prefix_for(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model reduced to what computing the named tensors needs, which it outputs.

    Layer-by-layer work (sequential compensation) asks for one layer's input at a time: the
    layers after it need not run. Models with control flow (subgraphs may read outer values)
    keep every node.
    """
    names = list(dict.fromkeys(names))
    m = with_outputs(model, names)
    g = m.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return m
    producer = {out: i for i, node in enumerate(g.node) for out in node.output}
    keep: set[int] = set()
    stack = list(names)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(t for t in g.node[i].input if t)
    nodes = [n for i, n in enumerate(g.node) if i in keep]
    used = {t for n in nodes for t in n.input}
    outputs = [o for o in g.output if o.name in set(names)]
    inits = [t for t in g.initializer if t.name in used]
    init_names = {t.name for t in g.initializer}
    # every real input stays (the data feeds them all); an initializer listed as an input
    # (IR < 4) goes with its initializer
    inputs = [i for i in g.input if i.name not in init_names or i.name in used]
    for field, items in (("node", nodes), ("output", outputs), ("initializer", inits), ("input", inputs)):
        g.ClearField(field)
        getattr(g, field).extend(items)
    return m


def capture(
    model: onnx.ModelProto,
    data: Dataset,
    tensors: list[str],
    on_batch: Callable[[dict[str, np.ndarray]], None],
    batch_size: int = 32,
) -> None:
    """Run `data` through `model` and hand each batch's intermediate `tensors` to `on_batch`.

    Streaming keeps memory bounded by one batch of activations, whatever the dataset size.
    """
    m = prefix_for(model, tensors)
    # no spin-waiting between runs: `on_batch` runs numpy's BLAS threads on the same cores
    sess = session(m, optimize=False, spin=False)
    bs = batch_size_for(model, batch_size)
    for feeds in data.batches(bs):
        n = len(next(iter(feeds.values())))
        if n < bs and _fixed_batch(sess):
            feeds = {k: _pad(v, bs) for k, v in feeds.items()}
        outs = sess.run(tensors, feeds)
        on_batch({name: o[:n] for name, o in zip(tensors, outs)})
