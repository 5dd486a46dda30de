"""An int8 layer pair whose u8 x s8 pair sums overflow int16, and its exact integer reference.

The graph is what onnxruntime's quantizer writes (QuantizeLinear -> DequantizeLinear around a
Conv and a Gemm with per-channel int8 weights and int32 biases); the activation codes sit in
[160, 255] and each output channel's weights share a sign, so nearly every pair of products
exceeds 32767: the case x86 without VNNI saturates in its fused kernels.

`reference` computes what an int8 accelerator computes, in numpy integers: int32 accumulation of
(a - za) * w + b, then requantisation (arithmetic.requantize_reference). Run as a script (the CI
runs it under an emulated AVX2-only CPU): prints a JSON line comparing harden's figures and the
host's fused kernels with the reference.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.arithmetic import requantize_reference

C_IN, C_OUT, HW, K = 64, 16, 4, 3  # Conv: 64 -> 16 channels, 3x3 kernel, 4x4 input -> 2x2
CLASSES = 10
SA = 2.0 ** -7  # input scale: codes 160..255 are exact float32 inputs


def _qdq(x: str, scale: str, zp: str, out: str, axis: int | None = None) -> list[onnx.NodeProto]:
    kw = {} if axis is None else {"axis": axis}
    return [helper.make_node("QuantizeLinear", [x, scale, zp], [out + "_q"], **kw),
            helper.make_node("DequantizeLinear", [out + "_q", scale, zp], [out], **kw)]


def build(seed: int = 0, samples: int = 64) -> tuple[onnx.ModelProto, np.ndarray, dict]:
    """The model, its input batch and the integer parameters `reference` needs."""
    rng = np.random.default_rng(seed)
    signs = np.where(np.arange(C_OUT) % 2 == 0, 1, -1)[:, None, None, None]
    w1 = (signs * rng.integers(60, 128, size=(C_OUT, C_IN, K, K))).astype(np.int8)
    sw1 = rng.uniform(0.002, 0.004, C_OUT).astype(np.float32)
    b1 = rng.integers(-5000, 5000, C_OUT).astype(np.int32)
    w2 = rng.integers(-127, 128, size=(CLASSES, C_OUT * 4)).astype(np.int8)
    sw2 = rng.uniform(0.003, 0.006, CLASSES).astype(np.float32)
    codes = rng.integers(160, 256, size=(samples, C_IN, HW, HW))
    x = (codes * SA).astype(np.float32)

    p = {"w1": w1, "sw1": sw1, "b1": b1, "w2": w2, "sw2": sw2, "za": 0}
    acc1 = _conv_acc(codes, w1, b1)
    p["so1"], p["zo1"] = _range(acc1 * (SA * sw1.astype(np.float64))[None, :, None, None])
    h = requantize_reference(acc1, (SA * sw1.astype(np.float64) / p["so1"])[None, :, None, None], p["zo1"])
    acc2 = _gemm_acc(h, p["zo1"], w2, np.zeros(CLASSES, np.int32))
    p["b2"] = rng.integers(-2000, 2000, CLASSES).astype(np.int32)
    p["so2"], p["zo2"] = _range((acc2 + p["b2"]) * (p["so1"] * sw2.astype(np.float64)))

    f32 = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f32(SA), "sa"), numpy_helper.from_array(np.array(0, np.uint8), "za"),
        numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(sw1, "sw1"), numpy_helper.from_array(np.zeros(C_OUT, np.int8), "zw1"),
        numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(f32(SA * sw1), "sb1"), numpy_helper.from_array(np.zeros(C_OUT, np.int32), "zb1"),
        numpy_helper.from_array(f32(p["so1"]), "so1"), numpy_helper.from_array(np.array(p["zo1"], np.uint8), "zo1"),
        numpy_helper.from_array(w2.T.copy(), "w2"), numpy_helper.from_array(sw2, "sw2"), numpy_helper.from_array(np.zeros(CLASSES, np.int8), "zw2"),
        numpy_helper.from_array(p["b2"], "b2"), numpy_helper.from_array(f32(p["so1"] * sw2), "sb2"),
        numpy_helper.from_array(np.zeros(CLASSES, np.int32), "zb2"),
        numpy_helper.from_array(f32(p["so2"]), "so2"), numpy_helper.from_array(np.array(p["zo2"], np.uint8), "zo2"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
    ]
    nodes = [
        *_qdq("input", "sa", "za", "x_dq"),
        helper.make_node("DequantizeLinear", ["w1", "sw1", "zw1"], ["w1_dq"], axis=0),
        helper.make_node("DequantizeLinear", ["b1", "sb1", "zb1"], ["b1_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w1_dq", "b1_dq"], ["conv"], name="conv", kernel_shape=[K, K]),
        *_qdq("conv", "so1", "zo1", "hidden"),
        helper.make_node("Reshape", ["hidden", "flat"], ["flat_h"]),
        *_qdq("flat_h", "so1", "zo1", "flat_dq"),
        helper.make_node("DequantizeLinear", ["w2", "sw2", "zw2"], ["w2_dq"], axis=1),
        helper.make_node("DequantizeLinear", ["b2", "sb2", "zb2"], ["b2_dq"], axis=0),
        helper.make_node("Gemm", ["flat_dq", "w2_dq", "b2_dq"], ["gemm"], name="gemm"),
        *_qdq("gemm", "so2", "zo2", "logits"),
    ]
    graph = helper.make_graph(
        nodes, "saturating", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C_IN, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", C_OUT, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, x, p


def _range(real: np.ndarray) -> tuple[float, int]:
    lo, hi = min(float(real.min()), 0.0), max(float(real.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0)
    return float(scale), int(np.clip(np.rint(-lo / float(scale)), 0, 255))


def _conv_acc(codes: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int32 accumulation of a valid 3x3 convolution (int64 in numpy, checked to fit)."""
    win = np.lib.stride_tricks.sliding_window_view(codes.astype(np.int64), (K, K), axis=(2, 3))  # N,C,2,2,K,K
    acc = np.einsum("nchwij,ocij->nohw", win, w.astype(np.int64)) + b.astype(np.int64)[None, :, None, None]
    assert np.abs(acc).max() < 2 ** 31
    return acc


def _gemm_acc(h: np.ndarray, zp: int, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    acc = (h.reshape(len(h), -1).astype(np.int64) - zp) @ w.astype(np.int64).T + b.astype(np.int64)
    assert np.abs(acc).max() < 2 ** 31
    return acc


def reference(p: dict, x: np.ndarray, w1: np.ndarray | None = None, w2: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hidden codes, logit codes) an int8 accelerator computes, with optional other weights."""
    w1 = p["w1"] if w1 is None else w1
    w2 = p["w2"] if w2 is None else w2
    codes = np.rint(x.astype(np.float64) / SA).astype(np.int64)
    acc1 = _conv_acc(codes, w1, p["b1"])
    h = requantize_reference(acc1, (SA * p["sw1"].astype(np.float64) / p["so1"])[None, :, None, None], p["zo1"])
    acc2 = _gemm_acc(h, p["zo1"], w2, p["b2"])
    out = requantize_reference(acc2, p["so1"] * p["sw2"].astype(np.float64) / p["so2"], p["zo2"])
    return h, out


def to_codes(real: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """Float outputs of a DequantizeLinear back to their 8-bit codes."""
    return (np.rint(real.astype(np.float64) / scale) + zp).astype(np.int64)


def pair_sums_overflow_int16(p: dict, x: np.ndarray) -> float:
    """Fraction of adjacent u8 x s8 product pairs (along the reduction) beyond int16: what
    `vpmaddubsw` saturates."""
    codes = np.rint(x / SA).astype(np.int64).reshape(len(x), C_IN, -1)[:, :, 0]
    w = p["w1"].astype(np.int64)[:, :, 0, 0]
    prods = codes[:, None, :] * w[None, :, :]
    pairs = prods[..., 0::2] + prods[..., 1::2]
    return float(np.mean(np.abs(pairs) > 32767))


def compare(seed: int = 0) -> dict:
    """harden's chip evaluator and this host's fused onnxruntime kernels against the reference."""
    from harden.data import Dataset
    from harden.runtime import run_batched, session
    from harden.simulate import ChipEvaluator, Reference

    model, x, p = build(seed)
    data = Dataset({"input": x})
    h_ref, out_ref = reference(p, x)
    ev = ChipEvaluator(model, data, Reference(np.argmax(out_ref, 1), "agreement"))
    sess, feeds = ev.session_for(None)  # the evaluator's own session for the model's weights
    logits, hidden = run_batched(sess, data, 64, ["logits", "hidden"], feeds)
    fused = session(model, host_fused=True)
    f_logits, f_hidden = fused.run(["logits", "hidden"], {"input": x})

    def diff(a, b):
        d = np.abs(a - b)
        return {"max_steps": int(d.max()), "off_fraction": float(np.mean(d > 0))}

    return {
        "pair_overflow_fraction": pair_sums_overflow_int16(p, x),
        "harden_hidden": diff(to_codes(hidden, p["so1"], p["zo1"]), h_ref),
        "harden_logits": diff(to_codes(logits, p["so2"], p["zo2"]), out_ref),
        "fused_hidden": diff(to_codes(f_hidden, p["so1"], p["zo1"]), h_ref),
        "fused_logits": diff(to_codes(f_logits, p["so2"], p["zo2"]), out_ref),
        "harden_accuracy": ev.evaluate(),
    }


if __name__ == "__main__":
    from harden.arithmetic import host_features

    print(json.dumps({"host": host_features(), **compare(int(sys.argv[1]) if len(sys.argv) > 1 else 0)}))
