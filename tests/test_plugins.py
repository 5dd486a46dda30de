"""Plugins (issue 5): the entry-point groups harden.fault_models, harden.layouts, harden.passes and
harden.faultmap_patterns; the built-ins register through them; a package outside harden is found
and used through its entry point (a throw-away distribution made here, and the real
plugins/harden-tiled package when it is installed); unknown names are one line, exit 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harden import faults, plugins
from harden.cli import main
from harden.errors import InputError
from harden.faults import fault_model_names, parse_fault_spec, register_fault_model
from harden.memory import LayoutTensor, get_layout
from harden.patterns import generate

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(res, *fragments):
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for f in fragments:
        assert f in lines[0], lines[0]


# --- the built-ins ------------------------------------------------------------------------------


def test_builtins_mirror_pyproject():
    tomllib = pytest.importorskip("tomllib")
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {g: doc["project"]["entry-points"].get(g, {}) for g in plugins.GROUPS}
    assert declared == plugins.BUILTINS


def test_builtins_are_registered_as_entry_points():
    """harden's own fault models, layouts, passes and patterns come from its installed entry
    points, the same mechanism as any plugin (reinstall with pip install -e . if this fails)."""
    for group, expected in plugins.BUILTINS.items():
        found = {ep.name: ep.value for ep in metadata.entry_points(group=group) if ep.dist is not None and ep.dist.name == "harden"}
        assert found == expected, f"{group}: installed metadata is stale; run pip install -e ."
        assert set(plugins.names(group)) >= set(expected)


def test_builtins_load_to_the_right_objects():
    from harden.faults.bitflip import BitFlip
    from harden.memory import LinearLayout
    from harden.passes.clip import ClipPass
    from harden.passes.faq import FAQPass
    from harden.passes.quantize import QuantizePass
    from harden.patterns import Clustered, Uniform

    assert plugins.load(plugins.LAYOUTS, "linear") is LinearLayout
    assert plugins.load(plugins.PASSES, "faq") is FAQPass
    assert plugins.load(plugins.PASSES, "clip") is ClipPass and plugins.load(plugins.PASSES, "quantize") is QuantizePass
    assert plugins.load(plugins.PATTERNS, "uniform") is Uniform and plugins.load(plugins.PATTERNS, "clustered") is Clustered
    assert plugins.load(plugins.FAULT_MODELS, "bitflip") == BitFlip.from_spec
    assert plugins.load(plugins.LAYOUTS, "linear") is plugins.load(plugins.LAYOUTS, "linear")  # cached
    assert {"bitflip", "bitflip-bias", "stuckat", "chip"} <= set(fault_model_names())


def test_source_tree_fallback(monkeypatch):
    """Without harden's distribution metadata (a source tree never pip-installed) the built-ins
    still resolve, from BUILTINS."""
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: ())
    plugins.clear_cache()
    try:
        assert plugins.names(plugins.LAYOUTS) == ["linear"]
        assert plugins.load(plugins.PATTERNS, "rows").name == "rows"
        assert [m.label for m in parse_fault_spec("stuckat:0.01")] == ["stuckat:0.01"]
    finally:
        monkeypatch.undo()
        plugins.clear_cache()


def test_unknown_names_are_one_clear_error(tmp_path):
    for group, kind in plugins.KINDS.items():
        with pytest.raises(InputError) as info:
            plugins.load(group, "nosuch")
        msg = str(info.value)
        assert msg.startswith(f"unknown {kind} 'nosuch' (entry-point group {group}; known: ")
        assert all(n in msg for n in plugins.BUILTINS[group]) and "\n" not in msg
    with pytest.raises(ValueError, match="unknown entry-point group"):
        plugins.names("harden.nosuch")
    with pytest.raises(InputError, match=r"unknown fault model 'bitflop' in 'bitflop:1' \(known: .*bitflip"):
        parse_fault_spec("bitflop:1")
    _one_error_line(CliRunner().invoke(main, ["faultmap", "generate", "--words", "64", "--rate", "0.1", "--pattern", "nosuch",
                                              "-o", str(tmp_path / "x.bin")]), "unknown fault-map pattern 'nosuch'")
    _one_error_line(CliRunner().invoke(main, ["faultmap", "generate", "--words", "64", "--rate", "0.1", "--layout", "nosuch:a=1",
                                              "-o", str(tmp_path / "x.bin")]), "unknown memory layout 'nosuch'")


def test_register_fault_model_still_works(monkeypatch):
    monkeypatch.setattr(faults, "_REGISTRY", dict(faults._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        register_fault_model("bitflip", lambda args: [])  # an entry-point name counts as registered
    register_fault_model("bitflip", lambda args: parse_fault_spec(f"stuckat:{args}"), replace=True)
    assert parse_fault_spec("bitflip:0.5")[0].name == "stuckat"  # in-process registrations win


def test_parse_spec_and_params():
    assert plugins.parse_spec("tiled:rows=128, cols=64", "--layout") == ("tiled", {"rows": "128", "cols": "64"})
    assert plugins.parse_spec("linear", "--layout") == ("linear", {})
    for bad, msg in ((":a=1", "empty name"), ("t:rows", "KEY=VALUE"), ("t:a=1,a=2", "given twice")):
        with pytest.raises(InputError, match=msg):
            plugins.parse_spec(bad, "--layout")


# --- a plugin package outside harden ------------------------------------------------------------

FAKE_MODULE = '''
"""A throw-away harden plugin: one of everything."""
from dataclasses import dataclass

import numpy as np

from harden.faults import FaultModel, Injection, TensorFaults
from harden.memory import Layout, linear_layout
from harden.passes import Pass, PassResult
from harden.patterns import Pattern


class MsbStuck(FaultModel):
    """Bit 7 of the first k weights of every tensor stuck at 1 (`msb:K`)."""

    name, deterministic = "msb", True

    def __init__(self, k):
        self.k = k

    label = property(lambda self: f"msb:{self.k}")
    params = property(lambda self: {"k": self.k})

    @classmethod
    def from_spec(cls, args):
        return [cls(int(a)) for a in args.split(",")]

    def check(self, space):
        pass

    def sample(self, rng, space):
        return Injection(tuple(TensorFaults(t.name, np.arange(self.k), sa1=np.full(self.k, 0x80, np.uint8)) for t in space.weights))


@dataclass(frozen=True)
class ReversedParams:
    gap: int = 0


class Reversed(Layout):
    """The stream back to front, from address num_words - 1 - gap down."""

    name = "reversed"
    Params = ReversedParams

    def place(self, tensors, num_words):
        self.check(num_words)
        mm = linear_layout([(t.name, t.size) for t in tensors], num_words)
        return type(mm)(mm.num_words, mm.tensors, layout=self.name, params=self.params_dict)

    def addresses(self, mm):
        return (mm.num_words - 1 - self.params.gap - np.arange(mm.total)) % mm.num_words


@dataclass(frozen=True)
class EveryParams:
    period: int = 4


class Every(Pattern):
    """Bit 0 of every period-th word (rate ignored beyond 0 / not 0)."""

    name = "every"
    Params = EveryParams

    def cells(self, rng, num_words, rate):
        w = np.arange(0, num_words, self.params.period) if rate > 0 else np.empty(0, np.int64)
        return w, np.zeros(w.size, np.int64), np.ones(w.size, bool)


class Tag(Pass):
    """A pass that records its name in the model's doc string."""

    name = "tag"
    requires = frozenset({"int8"})

    def call(self, model, ctx):
        model.doc_string = "tagged"
        return PassResult(model, True, {"tagged": True})

    def note(self, record):
        return "tagged the model"
'''

FAKE_ENTRY_POINTS = """
[harden.fault_models]
msb = harden_fakeplug:MsbStuck

[harden.layouts]
reversed = harden_fakeplug:Reversed
notalayout = harden_fakeplug:Tag

[harden.faultmap_patterns]
every = harden_fakeplug:Every
broken = harden_fakeplug_missing:Thing

[harden.passes]
tag = harden_fakeplug:Tag
"""


def _make_distribution(where: Path, name: str, entry_points: str, module: str | None = None) -> None:
    info = where / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module is not None:
        (where / "harden_fakeplug.py").write_text(module)


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """A distribution `harden-fakeplug` on sys.path, as pip would leave it (no pip needed)."""
    site = tmp_path / "site"
    _make_distribution(site, "harden-fakeplug", FAKE_ENTRY_POINTS, FAKE_MODULE)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    plugins.clear_cache()
    yield site
    plugins.clear_cache()
    sys.modules.pop("harden_fakeplug", None)


def test_plugin_of_each_group_is_found_and_used(fake_plugin, tmp_path):
    import onnx

    from harden.faults import WeightSpace
    from harden.passes import PassContext, run_passes

    for group, name in ((plugins.FAULT_MODELS, "msb"), (plugins.LAYOUTS, "reversed"), (plugins.PATTERNS, "every"), (plugins.PASSES, "tag")):
        assert name in plugins.names(group)
        assert plugins.load(group, name).__module__ == "harden_fakeplug"
    # fault model: through parse_fault_spec, as `simulate --fault msb:2` uses it
    (model,) = parse_fault_spec("msb:2")
    space = WeightSpace((faults.Tensor("w", np.dtype(np.int8), (3,), "weight"),))
    out = model.sample(np.random.default_rng(0), space).apply({"w": np.zeros(3, np.int8)})
    assert out["w"].view(np.uint8).tolist() == [0x80, 0x80, 0]
    assert "msb" in fault_model_names()
    # layout: through get_layout / MemoryMap dispatch
    lay = get_layout("reversed:gap=1")
    mm = lay.place([LayoutTensor("a", (2, 3)), LayoutTensor("b", (4,))], 16)
    assert mm.stream_addresses().tolist() == [14, 13, 12, 11, 10, 9, 8, 7, 6, 5]
    assert json.loads(mm.to_json())["params"] == {"gap": 1}
    # pattern: through the CLI
    out_map = tmp_path / "every.bin"
    res = CliRunner().invoke(main, ["faultmap", "generate", "--words", "64", "--rate", "0.1", "--pattern", "every", "--param", "period=8",
                                    "-o", str(out_map)])
    assert res.exit_code == 0, res.output
    fm = generate("every", 64, 0.1, 0, {"period": 8})
    assert fm.addresses.tolist() == list(range(0, 64, 8)) and out_map.read_bytes()[:4] == b"HFM1"
    # pass: through run_passes (it needs an int8 model: a float one is refused before it runs)
    tag = plugins.load(plugins.PASSES, "tag")()
    with pytest.raises(InputError, match="'tag' needs int8"):
        run_passes(onnx.ModelProto(), [tag], PassContext(calib=None))
    # `harden plugins` lists them with their package
    listing = json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)
    assert listing["harden.layouts"]["reversed"] == "harden_fakeplug:Reversed (harden-fakeplug 0.1)"


def test_broken_and_conflicting_plugins_are_one_line(fake_plugin, tmp_path):
    with pytest.raises(InputError, match=r"fault-map pattern 'broken' \(harden_fakeplug_missing:Thing, from harden-fakeplug 0.1\) failed to load: ModuleNotFoundError"):
        plugins.load(plugins.PATTERNS, "broken")
    res = CliRunner().invoke(main, ["faultmap", "generate", "--words", "64", "--rate", "0.1", "--pattern", "broken", "-o", str(tmp_path / "x.bin")])
    _one_error_line(res, "failed to load")
    with pytest.raises(InputError, match="memory layout 'notalayout' is not a harden.memory.Layout subclass"):
        get_layout("notalayout")
    _make_distribution(fake_plugin, "harden-other", "[harden.layouts]\nreversed = harden_fakeplug:Every\n")
    importlib.invalidate_caches()
    plugins.clear_cache()
    with pytest.raises(InputError, match=r"memory layout 'reversed' is registered by more than one package \(harden_fakeplug:"):
        get_layout("reversed")


def test_plugin_found_in_a_fresh_process(fake_plugin, tmp_path):
    """Discovery needs no import of the plugin by anyone: a new interpreter finds it on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_plugin), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "harden", "faultmap", "generate", "--words", "32", "--rate", "0.5",
                          "--pattern", "every", "-o", str(tmp_path / "e.bin")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "8 faulty cells" in out.stdout  # bit 0 of every 4th word


@pytest.mark.skipif(importlib.util.find_spec("harden_tiled") is None,
                    reason="the harden-tiled plugin is not installed (pip install -e plugins/harden-tiled)")
def test_the_tiled_package_is_a_real_plugin():
    """plugins/harden-tiled is its own distribution, outside the harden package, found through
    its entry point (tests/test_layouts.py uses it end to end)."""
    dist = metadata.distribution("harden-tiled")
    assert [(ep.group, ep.name, ep.value) for ep in dist.entry_points] == [("harden.layouts", "tiled", "harden_tiled:TiledLayout")]
    assert not any(f.parts[0] == "harden" for f in dist.files or [] if f.suffix == ".py")
    listing = json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)
    assert listing["harden.layouts"]["tiled"].startswith("harden_tiled:TiledLayout (harden-tiled ")


def test_a_plugin_pass_runs_inside_apply(fake_plugin, tmp_path):
    """Issue 10: a pass written from docs/plugins.md, registered through an entry point, placed
    in apply's plan by --pass; its record and note reach the report; a bad placement is exit 2."""
    root = Path(__file__).resolve().parent.parent
    args = ["apply", str(root / "samples/model.onnx"), "--faultmap", str(root / "samples/chip.bin"), "--data",
            str(root / "samples/calib.npz"), "--trials", "0", "--clip-percentile", "100", "--quiet"]
    out = tmp_path / "h.onnx"
    res = CliRunner().invoke(main, [*args, "--pass", "tag", "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    import onnx

    assert onnx.load(str(out)).doc_string == "tagged"
    passes = json.loads((tmp_path / "r.json").read_text())["passes"]
    assert [p["pass"] for p in passes][:5] == ["simplify", "clip", "quantize", "tag", "faq"]
    assert passes[3]["tagged"] is True and passes[3]["note"] == "tagged the model"
    # placed before quantize, the pass meets a float model: refused before any work, one line
    res = CliRunner().invoke(main, [*args, "--pass", "tag@before:quantize", "-o", str(tmp_path / "x.onnx")])
    _one_error_line(res, "pass 'tag' needs int8")
    assert not (tmp_path / "x.onnx").exists()
    res = CliRunner().invoke(main, [*args, "--pass", "nope", "-o", str(tmp_path / "x.onnx")])
    _one_error_line(res, "no such pass")


def test_a_pass_needing_a_float_model_is_refused_after_quantize():
    """Verifiable facts are not accumulated: once a pass provides int8 the model is not float,
    so a float pass placed after it is refused before any work."""
    from harden.passes import Pass, PassManager

    class Fake(Pass):
        def __init__(self, name, requires=(), provides=()):
            self.name, self.requires, self.provides = name, frozenset(requires), frozenset(provides)

    PassManager([Fake("float-pass", requires={"float"}), Fake("q", provides={"int8"})]).check_plan({"float"})
    with pytest.raises(InputError, match="'float-pass' needs float"):
        PassManager([Fake("q", provides={"int8"}), Fake("float-pass", requires={"float"})]).check_plan({"float"})
