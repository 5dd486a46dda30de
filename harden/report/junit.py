"""`--junit-xml FILE`: the gates as JUnit XML, one test case per gate, which GitLab, Jenkins and
most CI systems read natively (a failed gate shows as a failed test with its message).

Written with the standard library's ElementTree: the format is a handful of elements.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Sequence


def junit_xml(suite: str, cases: Sequence[dict], seconds: float | None = None) -> str:
    """`cases`: dicts with `name`, `passed` and, when failed, `message`."""
    failures = sum(1 for c in cases if not c["passed"])
    root = ET.Element("testsuites", name="harden", tests=str(len(cases)), failures=str(failures))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures), errors="0",
                       time=f"{seconds or 0:.3f}")
    for c in cases:
        tc = ET.SubElement(ts, "testcase", name=c["name"], classname=suite.replace(" ", "."))
        if not c["passed"]:
            ET.SubElement(tc, "failure", message=c.get("message") or "gate failed", type="GateFailed").text = c.get("message") or ""
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def apply_cases(gates: Sequence[dict]) -> list[dict]:
    """apply's gate records (gates.gate_results) as test cases."""
    return [{"name": f"{g['gate']} {g['threshold']:g} ({g['what']})", "passed": g["passed"], "message": g.get("message")}
            for g in gates]


def point_cases(gates: Sequence[dict]) -> list[dict]:
    """simulate's gate records (gates.point_gate_results) as test cases."""
    return [{"name": f"--{g['kind']} {g['point']}={g['threshold']:g}" + ("@ci" if g["statistic"] == "ci" else ""),
             "passed": g["passed"], "message": g.get("message")} for g in gates]
