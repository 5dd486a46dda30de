"""The arithmetic harden simulates: what an int8 accelerator computes, on any host.

An int8 accelerator multiplies int8 weights by 8-bit activations, accumulates the products
exactly in int32, adds the int32 bias and requantises. onnxruntime's default session instead
fuses every DequantizeLinear -> op -> QuantizeLinear group into QLinearConv / QGemm /
QLinearMatMul, whose u8s8 kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) add
pairs of u8 x s8 products in saturating 16-bit lanes (`vpmaddubsw`). Stuck bits push weights to
extreme codes, exactly where that saturation bites, so the host's fused kernels are not the chip.

harden therefore runs every evaluation that stands for a chip with QDQ fusion switched off
(`session.disable_quant_qdq`): DequantizeLinear -> float32 op -> QuantizeLinear, the ONNX
definition of a QDQ graph. The float32 op adds the same products the chip adds, each rounded
once, so an accumulation differs from the exact int32 sum only by float32 rounding (relative
error about K * 2**-24 for K products); after requantisation the 8-bit activations are the
chip's, except where the exact value sits within that error of a rounding tie, where they may
differ by one step. No host instruction set enters: the same figures on AVX2, AVX-512 VNNI and
ARM hosts, to that tolerance (`TOLERANCE`, tested in tests/test_arithmetic.py against an exact
integer reference, and under an emulated AVX2-only CPU in CI).

What is not simulated: int32 accumulator overflow (the float path does not wrap; no layer of a
plausible model comes near 2**31 without a faulty bias) and a chip's own requantisation
rounding mode (round-half-to-even here, as ONNX QuantizeLinear defines it).

The cost is onnxruntime's float kernels instead of its int8 ones (bench/bench_arithmetic.py).
"""

from __future__ import annotations

import functools
import platform
import re

import numpy as np
import onnxruntime as ort

#: The name recorded in every report for the arithmetic above.
ARITHMETIC = "int32-exact"

#: Session config entries that give the arithmetic above (set on every chip session).
EXACT_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}

#: What "the same figures on any host" means, as stated in reports and docs and tested.
TOLERANCE = {
    "activation_steps": 1,  # a requantised activation is the exact one or one step away (at a tie)
    "activation_ties": 1e-3,  # ... and at most this fraction of activations are off by that step
    "accuracy_samples": 1,  # an accuracy figure moves by at most one sample between hosts
}

#: CPUID features (numpy's runtime detection names) that decide which int8 kernels MLAS picks.
_CPUID_FEATURES = ("AVX2", "AVX512F", "AVX512BW", "AVX512VNNI", "ASIMD", "ASIMDDP")
#: /proc/cpuinfo flags numpy does not detect (AVX-VNNI of hybrid Intel cores, AMX).
_CPUINFO_FLAGS = ("avx_vnni", "amx_int8")


def describe() -> dict:
    """The arithmetic record that reports carry (`results.arithmetic`)."""
    return {
        "name": ARITHMETIC,
        "path": "DequantizeLinear -> float32 op -> QuantizeLinear (onnxruntime QDQ fusion off)",
        "tolerance": dict(TOLERANCE),
        "host": host_features(),
    }


@functools.lru_cache(maxsize=1)
def host_features() -> dict:
    """The CPU features that decide how onnxruntime's fused int8 kernels behave on this host.

    Read through numpy's own CPUID probe (so an emulated CPU reports what it emulates), plus
    the few /proc/cpuinfo flags numpy does not probe.
    """
    machine = platform.machine().lower()
    flags = [f.lower() for f in _CPUID_FEATURES if _numpy_cpu_features().get(f)]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            found = set(re.findall(r"\b(" + "|".join(_CPUINFO_FLAGS) + r")\b", fh.read(1 << 20)))
        flags += [f for f in _CPUINFO_FLAGS if f in found]
    except OSError:
        pass
    return {"machine": machine, "int8_flags": flags, "fused_int8_exact": fused_kernels_exact(machine, flags)}


def _numpy_cpu_features() -> dict:
    # numpy's CPUID probe is semi-private (numpy >= 2: numpy._core; 1.x: numpy.core).
    for mod in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            return dict(__import__(mod, fromlist=["__cpu_features__"]).__cpu_features__)
        except (ImportError, AttributeError):
            continue
    return {}


def fused_kernels_exact(machine: str, flags: list[str]) -> bool | None:
    """Whether onnxruntime's fused u8s8 kernels accumulate exactly on such a CPU (None: unknown).

    x86 without VNNI pairs u8 x s8 products in saturating int16 lanes (`vpmaddubsw`); x86 VNNI
    and ARM's dot-product kernels accumulate in int32.
    """
    if machine in ("x86_64", "amd64", "i686", "i386"):
        if not flags:
            return None
        return any(f in flags for f in ("avx512vnni", "avx_vnni", "amx_int8"))
    if machine in ("aarch64", "arm64"):
        return True
    return None


def session_options(*, optimize: bool = True, threads: int | None = None) -> ort.SessionOptions:
    """Options of a chip session: QDQ fusion off (the arithmetic above), quiet logs."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in EXACT_SESSION_CONFIG.items():
        opts.add_session_config_entry(key, value)
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def requantize_reference(acc: np.ndarray, multiplier: np.ndarray | float, zero_point: int, dtype=np.uint8) -> np.ndarray:
    """Exact int32 accumulations -> 8-bit codes, round half to even (ONNX QuantizeLinear).

    The independent reference the tests hold harden's figures to: the scale product is taken
    in float64 (`multiplier` = input scale x weight scale / output scale), so no float32
    rounding enters before the final rounding.
    """
    info = np.iinfo(dtype)
    y = np.rint(acc.astype(np.float64) * np.asarray(multiplier, dtype=np.float64)) + zero_point
    return np.clip(y, info.min, info.max).astype(dtype)
