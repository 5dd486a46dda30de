"""The sections of a `harden.report/1` report, typed (TypedDict: the report stays plain JSON).

The builders return these (pipeline.evaluate_on_chip, fleet records, gates, hostcheck), the
renderers read them, and harden/schemas/report-1.schema.json states the same for other tools.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class FileRecord(TypedDict, total=False):
    path: str
    sha256: str
    samples: int


class HeldOut(TypedDict):
    held_out_of: Literal["data"]
    rule: str
    samples: int
    fit_samples: int


class PassRecord(TypedDict, total=False):
    """One pass of the plan: its name, whether it changed the model, seconds, its note, and
    whatever the pass records (counts, thresholds, timings)."""

    # "pass" is a keyword: the key is spelled in the functional TypedDict below
    modified: bool
    seconds: float
    note: str
    skipped: str


PassRecordKeys = TypedDict("PassRecordKeys", {"pass": str})


class Accuracy(TypedDict):
    float: float | None
    int8: float
    int8_on_chip: float
    hardened: float
    hardened_on_chip: float


class HostFeatures(TypedDict):
    machine: str
    int8_flags: list[str]
    fused_int8_exact: bool | None


class Arithmetic(TypedDict):
    name: Literal["int32-exact"]
    path: str
    tolerance: dict[str, float]
    host: HostFeatures


class HostOnnxruntime(TypedDict):
    host: HostFeatures
    accuracy_chip_arithmetic: float
    accuracy_onnxruntime_fused: float
    top1_agreement: float
    max_logit_difference: float
    differs: bool


class Results(TypedDict, total=False):
    """apply's `results`."""

    reference: Literal["labels", "agreement"]
    reference_model: Literal["float", "int8"]
    samples: int
    arithmetic: Arithmetic
    accuracy: Accuracy
    recovery: float | None
    host_onnxruntime: HostOnnxruntime
    resilience: dict[str, Any]


class ApplyGate(TypedDict):
    gate: str
    threshold: float
    value: float
    passed: bool
    what: str
    message: str | None


class ChipRecord(TypedDict):
    """One chip of a fleet report."""

    chip: str
    faultmap: dict[str, Any]
    accuracy: Accuracy
    recovery: float | None
    output: str
    seconds: float
    faq: dict[str, Any] | None


class Distribution(TypedDict):
    mean: float
    min: float
    p05: float
    median: float
    max: float
    yield_: float  # "yield" in the JSON (a keyword here)


class FleetSummary(TypedDict):
    chips: int
    int8: float
    yield_target: float
    int8_on_chip: dict[str, float]
    hardened_on_chip: dict[str, float]
