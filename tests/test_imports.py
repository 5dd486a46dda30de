"""No import cycles, and no harden import hidden in a function (issue 10).

The layers (pyproject.toml, `[tool.importlinter]`) are checked with import-linter; module-level
cycles inside a layer with grimp's import graph (which includes function-level imports); and
a function-level import of a harden module is allowed only for the optional extras (torch).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: harden modules that need an optional extra (torch) and so are imported only where used.
OPTIONAL = ("harden.train", "harden.passes.proact", "harden.passes.saq")

grimp = pytest.importorskip("grimp")


def test_layers_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint) if lint.exists() else "lint-imports"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, found = set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_module_import_cycle():
    g = grimp.build_graph("harden")
    graph = {m: {d for d in g.find_modules_directly_imported_by(m) if d.startswith("harden")} for m in g.modules}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for m, deps in graph.items():
        deps -= {d for d in deps if m.startswith(d + ".")}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_deferred_harden_imports_but_optional_extras():
    offenders = []
    for path in sorted((ROOT / "harden").rglob("*.py")):
        tree = ast.parse(path.read_text())
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or id(node) in top:
                continue
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
            if target.startswith("harden") and not any(n.startswith(OPTIONAL) for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from {target}")
    assert offenders == []


def test_simplify_does_not_import_torch():
    """onnxsim 0.8 imports torch when it is installed (a PPQ bridge): 180 MB resident for a whole
    apply. The core's simplify keeps it out; torch still imports afterwards."""
    pytest.importorskip("torch")
    code = ("import sys, onnx\nfrom harden.model import simplify\n"
            f"simplify(onnx.load({str(ROOT / 'samples' / 'model.onnx')!r}))\n"
            "assert 'onnxsim' in sys.modules and 'torch' not in sys.modules, 'torch imported'\n"
            "import torch\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
