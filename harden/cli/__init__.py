"""The `harden` command line: a thin layer over harden's Python API.

Exit codes: 0 success; 1 a resilience gate was not met; 2 bad usage or invalid input;
3 an internal error. The group lives in `_group.py`; importing each command module attaches
its commands to it.
"""

from __future__ import annotations

from . import apply_cmd, faultmap_cmd, plugins_cmd, quantize_cmd, report_cmd, simulate_cmd, tune_cmd  # noqa: F401 (they register)
from ._group import main

__all__ = ["main"]
