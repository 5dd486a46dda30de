"""Plugins: named extensions found through Python entry points.

Four entry-point groups (docs/plugins.md shows how to write a plugin for each):

    harden.fault_models       NAME = a FaultModel class with `from_spec(args) -> [models]`, or
                              such a parser function itself (`simulate --fault NAME:ARGS`)
    harden.layouts            NAME = a memory Layout class (harden.memory.Layout)
    harden.passes             NAME = a pass class (`name`, `call(model, ctx) -> PassResult`)
    harden.faultmap_patterns  NAME = a fault-map Pattern class (harden.patterns.Pattern)

harden's own built-ins are registered in its pyproject.toml under the same groups and are
loaded the same way. `BUILTINS` mirrors those lines; it is used only when harden's own
distribution metadata is missing (running from a source tree that was never pip-installed),
and a test checks that it matches pyproject.toml.

`load(group, name)` imports the object an entry point names (once; cached); an unknown name
is an InputError (exit 2) that names the group and every known name.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from importlib import metadata
from typing import Any

from .errors import InputError

FAULT_MODELS = "harden.fault_models"
LAYOUTS = "harden.layouts"
PASSES = "harden.passes"
PATTERNS = "harden.faultmap_patterns"
GROUPS = (FAULT_MODELS, LAYOUTS, PASSES, PATTERNS)

# What each group's names are called in messages ("unknown memory layout 'x'").
KINDS = {
    FAULT_MODELS: "fault model",
    LAYOUTS: "memory layout",
    PASSES: "pass",
    PATTERNS: "fault-map pattern",
}

# harden's own entry points, exactly as in pyproject.toml (checked by tests/test_plugins.py).
BUILTINS: dict[str, dict[str, str]] = {
    FAULT_MODELS: {
        "bitflip": "harden.faults.bitflip:BitFlip.from_spec",
        "bitflip-bias": "harden.faults.bitflip:BitFlip.bias_from_spec",
        "stuckat": "harden.faults.stuckat:StuckAt.from_spec",
        "chip": "harden.faults.chip:ChipFaults.from_spec",
    },
    LAYOUTS: {
        "linear": "harden.memory:LinearLayout",
    },
    PASSES: {
        "clip": "harden.passes.clip:ClipPass",
        "quantize": "harden.passes.quantize:QuantizePass",
        "faq": "harden.passes.faq:FAQPass",
    },
    PATTERNS: {
        "uniform": "harden.patterns:Uniform",
        "bias": "harden.patterns:Bias",
        "bitprofile": "harden.patterns:BitProfile",
        "clustered": "harden.patterns:Clustered",
        "rows": "harden.patterns:Rows",
        "columns": "harden.patterns:Columns",
    },
}


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown entry-point group {group!r} (harden's groups: {', '.join(GROUPS)})")


@functools.cache
def _harden_installed() -> bool:
    """Whether harden's own entry points are visible (it was pip-installed)."""
    try:
        dist = metadata.distribution("harden")
    except metadata.PackageNotFoundError:
        return False
    return any(ep.group in GROUPS for ep in dist.entry_points)


@functools.cache
def entry_points(group: str) -> dict[str, tuple[metadata.EntryPoint, ...]]:
    """Every entry point of `group`, by name (a name two distributions define differently
    keeps both, and loading it is refused)."""
    _check_group(group)
    found: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=group):
        same = found.setdefault(ep.name, [])
        if all(e.value != ep.value for e in same):
            same.append(ep)
    if not _harden_installed():
        for name, value in BUILTINS[group].items():
            found.setdefault(name, [metadata.EntryPoint(name, value, group)])
    return {name: tuple(eps) for name, eps in found.items()}


def names(group: str) -> list[str]:
    """The names registered in `group`, sorted."""
    return sorted(entry_points(group))


def _origin(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "harden (source tree)"


@functools.cache
def load(group: str, name: str) -> Any:
    """The object entry point `name` of `group` refers to (imported once).

    InputError (exit 2) for a name nobody registered, naming the group and the known names,
    for a name two installed packages define differently, and for a plugin that fails to import.
    """
    eps = entry_points(group).get(name)
    if not eps:
        known = ", ".join(names(group)) or "none installed"
        raise InputError(f"unknown {KINDS[group]} {name!r} (entry-point group {group}; known: {known})")
    if len(eps) > 1:
        who = "; ".join(f"{ep.value} from {_origin(ep)}" for ep in eps)
        raise InputError(f"{KINDS[group]} {name!r} is registered by more than one package ({who}); uninstall one")
    ep = eps[0]
    try:
        return ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is reported in one line
        raise InputError(
            f"{KINDS[group]} {name!r} ({ep.value}, from {_origin(ep)}) failed to load: {type(exc).__name__}: {exc}"
        ) from None


def clear_cache() -> None:
    """Forget what was found and loaded (after installing a plugin in a running process)."""
    _harden_installed.cache_clear()
    entry_points.cache_clear()
    load.cache_clear()


# --- parameters ---------------------------------------------------------------------------------


def parse_spec(text: str, what: str) -> tuple[str, dict[str, str]]:
    """`NAME` or `NAME:k=v,k=v` -> (NAME, {k: v}) (values still text; see `coerce_params`)."""
    name, _, rest = str(text).partition(":")
    name = name.strip()
    if not name:
        raise InputError(f"{what}: empty name in {text!r} (e.g. tiled:rows=128,cols=128)")
    return name, parse_kv(rest.split(",") if rest.strip() else [], f"{what} {name}")


def parse_kv(items, what: str) -> dict[str, str]:
    """["k=v", ...] -> {k: v}; InputError on an item without '=' or a key given twice."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"{what}: parameters are KEY=VALUE, got {item!r}")
        if key in out:
            raise InputError(f"{what}: parameter {key!r} given twice")
        out[key] = value.strip()
    return out


def _convert(value: Any, kind: Any, key: str, what: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or type(kind).__name__ == "UnionType":  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, what)
    if origin is tuple:
        # "1,2,3" (or "1/2/3" inside a comma-separated NAME:k=v spec) on the command line
        items = re.split(r"[,/]", value) if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        return tuple(_convert(v.strip() if isinstance(v, str) else v, inner, key, what) for v in items if v != "")
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                return low in ("1", "true", "yes")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                return int(value, 0)
            return int(value)
        if kind is float:
            out = float(value)
            if out != out:
                raise ValueError
            return out
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise InputError(f"{what}: parameter {key}={value!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return value


def coerce_params(params_cls: type, given: dict | None, what: str) -> Any:
    """Build the dataclass `params_cls` from a dict of text or typed values.

    Field types (int, float, bool, str, tuple[...], X | None) convert text such as "128" or
    "0x80"; an unknown key or a missing required one is an InputError that lists the fields.
    The dataclass's own __post_init__ may check ranges (raise InputError there).
    """
    given = dict(given or {})
    fields = {f.name: f for f in dataclasses.fields(params_cls) if f.init}
    hints = typing.get_type_hints(params_cls)
    unknown = [k for k in given if k not in fields]
    if unknown:
        raise InputError(f"{what}: unknown parameter {unknown[0]!r} (parameters: {', '.join(fields) or 'none'})")
    kwargs = {k: _convert(v, hints.get(k, str), k, what) for k, v in given.items()}
    missing = [
        k for k, f in fields.items()
        if k not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{what}: parameter {missing[0]!r} is required (parameters: {', '.join(fields)})")
    try:
        return params_cls(**kwargs)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: {exc}") from None


def params_dict(params: Any) -> dict:
    """A params dataclass as a JSON-ready dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
