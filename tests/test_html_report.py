"""The HTML report (harden.report.html, `harden report`, `simulate --html`) on real reports.

One apply run and one simulate campaign on the bundled samples (few trials) feed every test;
variants of their reports (an int8 input, no campaign, hostile strings) are made by editing the
JSON, which is what `harden report` reads anyway. The browser test opens the page in a headless
chromium and checks that the plots are in the DOM and the page is not blank.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from harden.campaign import CampaignOptions, simulate
from harden.cli import main
from harden.errors import InputError
from harden.pipeline import ApplyOptions, apply
from harden.report.html import load_report, render_html, validate_report

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (harden[report])")

APPLY_SECTIONS = ("summary", "inputs", "accuracy", "resilience", "sdc", "points", "ablation", "fragility", "faq", "passes", "options")
SIMULATE_SECTIONS = ("summary", "inputs", "resilience", "sdc", "points", "options")
HOSTILE = '<script>alert("x")</script>&$x$'


# --- the reports -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def apply_run(tmp_path_factory) -> tuple[Path, dict]:
    """apply on the samples with a small campaign (3 trials; bitflip at two rates, bias flips)."""
    d = tmp_path_factory.mktemp("html_apply")
    opts = ApplyOptions(trials=3, faults=("bitflip:1e-3,1e-2", "bitflip-bias:1e-3"))
    res = apply(SAMPLES / "model.onnx", SAMPLES / "chip.bin", SAMPLES / "calib.npz", d / "model.hardened.onnx",
                report_path=d / "apply.json", eval_data_path=SAMPLES / "test.npz", options=opts)
    return res.output, json.loads((d / "apply.json").read_text())


@pytest.fixture(scope="module")
def apply_report(apply_run) -> dict:
    return apply_run[1]


@pytest.fixture(scope="module")
def int8_model(apply_run) -> Path:
    """An int8 QDQ model for simulate: apply's hardened output."""
    return apply_run[0]


@pytest.fixture(scope="module")
def simulate_report(int8_model) -> dict:
    """simulate: three fault families (two rates of bit flips) and the sample chip, 4 trials."""
    res = simulate(int8_model, SAMPLES / "test.npz", ["bitflip:1e-4,1e-3", "bitflip-bias:1e-3", "stuckat:0.01"],
                   [SAMPLES / "chip.bin"], CampaignOptions(trials=4, seed=1))
    return json.loads(json.dumps(res.report))  # exactly what --report writes and `harden report` reads


@pytest.fixture(scope="module")
def apply_html(apply_report) -> str:
    return render_html(apply_report)


@pytest.fixture(scope="module")
def simulate_html(simulate_report) -> str:
    return render_html(simulate_report)


class _Page(HTMLParser):
    """The parts of a page the tests look at: section ids, figures and their svg, ids, URLs."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections: list[str] = []
        self.ids: list[str] = []
        self.figures = 0
        self.svgs_in_figures = 0
        self.svgs = 0
        self.imgs: list[str] = []
        self.scripts = 0
        self.urls: list[str] = []
        self._in_figure = False
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "figure":
            self.figures += 1
            self._in_figure = True
        if tag == "svg":
            self.svgs += 1
            self.svgs_in_figures += self._in_figure
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href", "xlink:href", "data"):
            if key in a and not str(a[key]).startswith(("#", "data:")):
                self.urls.append(a[key])

    def handle_endtag(self, tag):
        if tag == "figure":
            self._in_figure = False

    def handle_data(self, data):
        self.text.append(data)


def _texts(page: _Page) -> str:
    return " ".join(" ".join(page.text).split())


def _self_contained(page: str) -> None:
    p = _Page(page)
    assert "http" not in page, "no URL of any kind, not even an SVG namespace"
    assert p.scripts == 0 and p.urls == [] and "<link" not in page and "@import" not in page
    assert all(src.startswith("data:image/") for src in p.imgs)
    assert len(p.ids) == len(set(p.ids)), "ids must be unique in the page (each svg's ids are prefixed)"


# --- the pages -------------------------------------------------------------------------------

@needs_mpl
def test_apply_page_has_every_section_and_figure(apply_report, apply_html):
    p = _Page(apply_html)
    assert p.sections == list(APPLY_SECTIONS)
    # accuracy bars, accuracy and SDC-1 against rate, ablation, FAQ layers, pass timings
    assert p.figures == 6 and p.svgs == 6 and p.svgs_in_figures == 6
    text = _texts(p)
    for key in ("model", "faultmap", "data", "eval_data"):
        assert apply_report["inputs"][key]["sha256"] in text
    assert "sample-chip-0042" in text and "0x4ed902e8" in text
    acc = apply_report["results"]["accuracy"]
    for label, key in (("float", "float"), ("int8, fault-free", "int8"), ("int8 on this chip", "int8_on_chip"),
                       ("hardened on this chip", "hardened_on_chip")):
        assert label in text and f"{100 * acc[key]:.2f}%" in text
    assert f"{100 * apply_report['results']['recovery']:.1f}%" in text
    rb = apply_report["results"]["resilience"]
    for label in rb["points"]:
        assert label in text
    for v in rb["variants"]:
        assert f"{v['name']} accuracy" in text and f"{v['name']} SDC-1" in text
    # a verdict badge per ablation row and per fragility row (hardened vs int8 at each random point)
    assert len(re.findall(r'class="badge (helps|hurts|none)"', apply_html)) == len(rb["ablation"]) + len(rb["fragility"])
    assert len(rb["fragility"]) == 3 and "Elsewhere: hardened against plain int8" in apply_html
    faq = next(r for r in apply_report["passes"] if r["pass"] == "faq")
    for layer in faq["layers"]:
        assert layer["tensor"] in text and f"{layer['rms_error_faq']:.6g}" in text
    for rec in apply_report["passes"]:
        assert f"{rec['pass']}: full record" in text
    assert "calibration stats" in text  # the faq pass's own timings
    _self_contained(apply_html)


@needs_mpl
def test_simulate_page_has_every_point(simulate_report, simulate_html):
    p = _Page(simulate_html)
    assert p.sections == list(SIMULATE_SECTIONS)
    # accuracy against rate (3 families + the chip panel), per-trial spread, SDC-1 against rate
    assert p.figures == 3 and p.svgs == 3 and p.svgs_in_figures == 3
    text = _texts(p)
    assert simulate_report["inputs"]["model"]["sha256"] in text and simulate_report["inputs"]["data"]["sha256"] in text
    labels = [pt["label"] for pt in simulate_report["points"]]
    assert labels == ["bitflip:0.0001", "bitflip:0.001", "bitflip-bias:0.001", "stuckat:0.01", "chip:sample-chip-0042"]
    for pt in simulate_report["points"]:
        assert pt["label"] in text
        assert f"{100 * pt['accuracy']['mean']:.2f}%" in text
        assert f"{pt['sdc1']['events']} / {pt['sdc1']['opportunities']}" in text
    assert "Chip sample-chip-0042" in text
    _self_contained(simulate_html)


@needs_mpl
def test_rendering_is_deterministic(apply_report, apply_html, simulate_report, simulate_html, tmp_path):
    assert render_html(apply_report) == apply_html
    assert render_html(simulate_report) == simulate_html
    # another process (another hash seed, a fresh matplotlib) writes the same bytes
    src = tmp_path / "sim.json"
    src.write_text(json.dumps(simulate_report))
    out = tmp_path / "sim.html"
    subprocess.run([sys.executable, "-m", "harden", "report", str(src), "-o", str(out), "-q"], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "123"}, timeout=120)
    assert out.read_text(encoding="utf-8") == simulate_html


@needs_mpl
def test_strings_from_the_report_are_escaped(apply_report, simulate_report):
    rep = copy.deepcopy(apply_report)
    fm = rep["inputs"]["faultmap"]
    fm["chip_id"] = fm["meta"]["chip_id"] = HOSTILE
    rep["inputs"]["model"]["path"] = f"/tmp/{HOSTILE}/model.onnx"
    rb = rep["results"]["resilience"]
    old = rb["points"][0]
    rb["points"][0] = f"chip:{HOSTILE}"
    for figs in rb["figures"].values():
        figs[f"chip:{HOSTILE}"] = figs.pop(old)
    for row in rb["ablation"]:
        if row["point"] == old:
            row["point"] = f"chip:{HOSTILE}"
    next(r for r in rep["passes"] if r["pass"] == "faq")["layers"][0]["tensor"] = HOSTILE
    page = render_html(rep)
    assert "<script" not in page and "alert(&quot;x&quot;)" in page
    assert page.count("&lt;script&gt;") >= 5
    _self_contained(page)

    sim = copy.deepcopy(simulate_report)
    sim["points"][0]["label"] = HOSTILE
    sim["points"][-1]["fault"]["chip_id"] = HOSTILE
    page = render_html(sim)
    assert "<script" not in page and "&lt;script&gt;" in page


@needs_mpl
def test_variants_of_the_apply_report_render(apply_report):
    """An int8 input (no float figure, quantize skipped), no campaign, no recovery, many layers."""
    rep = copy.deepcopy(apply_report)
    rep["inputs"]["already_int8"] = True
    rep["results"]["accuracy"]["float"] = None
    rep["results"]["recovery"] = None
    rep["passes"] = [r for r in rep["passes"] if r["pass"] not in ("simplify", "clip")]
    rep["passes"][0] = {"pass": "quantize", "modified": False, "skipped": "model is already int8 QDQ"}
    faq = next(r for r in rep["passes"] if r["pass"] == "faq")
    faq["layers"] = [dict(ly, tensor=f"{ly['tensor']}_{i}") for i in range(10) for ly in faq["layers"]]  # 60 layers
    page = render_html(rep)
    text = _texts(_Page(page))
    assert "already int8 QDQ" in text and "no recovery figure" in text and "skipped: model is already int8 QDQ" in text
    assert "7.weight_quantized_9" in text

    rep2 = copy.deepcopy(apply_report)
    del rep2["results"]["resilience"]
    rep2.pop("output")
    page = render_html(rep2)
    p = _Page(page)
    assert "No resilience campaign" in _texts(p)
    assert "ablation" not in p.sections and p.svgs == 3  # accuracy bars, FAQ layers, timings


@needs_mpl
def test_simulate_per_layer_and_diagnostics(int8_model):
    """simulate --per-layer / --diagnostics: the ranking (plot and table) and the diagnostics tables."""
    res = simulate(int8_model, SAMPLES / "test.npz", ["bitflip:1e-3"], [], CampaignOptions(trials=3, seed=2),
                   per_layer="bitflip:1e-2", diagnostics=True)
    rep = json.loads(json.dumps(res.report))
    p = _Page(render_html(rep))
    assert p.sections == ["summary", "inputs", "resilience", "sdc", "points", "per-layer", "diagnostics", "options"]
    assert p.svgs == 4  # accuracy against rate, per-trial spread, SDC-1 against rate, per-layer losses
    text = _texts(p)
    for r in rep["per_layer"]:
        assert f"{r['rank']} {r['tensor']}" in text and f"{100 * r['loss']:.2f}%" in text
    assert "Sharpness" in text and "Activation sparsity" in text
    for r in rep["diagnostics"]["activation_sparsity"]:
        assert r["tensor"] in text


@needs_mpl
def test_fields_without_a_view_are_still_shown(simulate_report, apply_report):
    sim = dict(simulate_report, future_figures={"widget_rate": 0.125, "rows": [{"a": 1, "b": "<x>"}]})
    p = _Page(render_html(sim))
    assert p.sections[-1] == "other" and "widget_rate 0.125" in _texts(p)
    rep = copy.deepcopy(apply_report)
    rep["results"]["yield"] = {"chips": 3}
    page = render_html(rep)
    assert "results.yield" in _texts(_Page(page)) and "&lt;x&gt;" not in page


@needs_mpl
def test_show_trial_report_renders(int8_model):
    res = simulate(int8_model, SAMPLES / "test.npz", ["bitflip:1e-3"], [], CampaignOptions(seed=0), show_trial=(0, 3))
    page = render_html(json.loads(json.dumps(res.report)))
    p = _Page(page)
    assert "trial" in p.sections and p.svgs == 0
    faults = res.report["trial"]["faults"]
    assert faults and faults[0]["tensor"] in _texts(p)


def test_validate_report_refuses_what_it_cannot_render(apply_report):
    assert validate_report(apply_report) is apply_report
    for bad, msg in [
        ([], "a JSON object is expected"),
        ({"command": "apply"}, 'no "schema" field'),
        ({**apply_report, "schema": "harden.report/2"}, "unsupported report schema 'harden.report/2'"),
        ({**apply_report, "command": "inspect"}, "renders apply and simulate reports"),
        ({k: v for k, v in apply_report.items() if k != "results"}, "missing results"),
        ({**apply_report, "results": {"samples": 3}}, "missing results.accuracy"),
        ({"schema": "harden.report/1", "command": "simulate", "inputs": {}}, "missing points, clean"),
    ]:
        with pytest.raises(InputError, match=re.escape(msg)):
            validate_report(bad)


# --- the command line ------------------------------------------------------------------------

def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


@needs_mpl
def test_report_command_writes_the_page(tmp_path, apply_report, apply_html):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(apply_report))
    r = _run("report", src)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run.html").read_text(encoding="utf-8") == apply_html  # default: beside the JSON
    assert re.fullmatch(r"wrote .*run\.html \(\d+ KiB, 6 plots\)\n", r.output)
    out = tmp_path / "other.html"
    out.write_text("old")
    r = _run("report", src, "-o", out, "-q")
    assert r.exit_code == 0 and r.output == "" and out.read_text(encoding="utf-8") == apply_html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.html", "run.html", "run.json"]  # no temp file left


@pytest.mark.parametrize("content,msg", [
    ("{", "not valid JSON (Expecting property name"),
    ("[1, 2]", "not a harden report (a JSON object is expected, got list)"),
    ('{"schema": "harden.report/0", "command": "apply"}', "unsupported report schema 'harden.report/0'"),
    ('{"schema": "other"}', "unsupported report schema 'other'"),
    ('{"hello": 1}', 'not a harden report (no "schema" field'),
    ('{"schema": "harden.report/1", "command": "apply", "inputs": {}}', "incomplete apply report (missing passes, results)"),
    (b"\xff\xfe{", "not UTF-8"),
])
def test_report_command_refuses_bad_json(tmp_path, content, msg):
    src = tmp_path / "r.json"
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = _run("report", src, "-o", tmp_path / "r.html")
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and r.output.count("\n") == 1 and msg in r.output, r.output
    assert not (tmp_path / "r.html").exists()


@needs_mpl
def test_report_command_refuses_a_report_of_the_wrong_shape(tmp_path, apply_report):
    rep = copy.deepcopy(apply_report)
    rep["results"]["resilience"]["figures"]["int8"] = 5
    src = tmp_path / "r.json"
    src.write_text(json.dumps(rep))
    r = _run("report", src, "-o", tmp_path / "r.html")
    assert r.exit_code == 2 and "unexpected shape" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "r.html").exists()


def test_report_command_paths(tmp_path, apply_report):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(apply_report))
    before = src.read_bytes()
    for args, msg in [
        ((tmp_path / "missing.json",), "no such file"),
        ((src, "-o", src), "is the input"),
        ((src, "-o", tmp_path / "nowhere" / "r.html"), "does not exist"),
        ((src, "-o", tmp_path), "is a directory"),
    ]:
        r = _run("report", *args)
        assert r.exit_code == 2 and r.output.startswith("error: ") and msg in r.output, r.output
    assert src.read_bytes() == before
    odd = tmp_path / "r.html"
    odd.write_text(json.dumps(apply_report))
    r = _run("report", odd)  # the default output would be the input itself
    assert r.exit_code == 2 and "is the input" in r.output


def test_report_command_without_matplotlib(tmp_path, apply_report, monkeypatch):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(apply_report))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = _run("report", src, "-o", tmp_path / "r.html")
    assert r.exit_code == 2 and "install harden[report]" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "r.html").exists()


def test_report_help_has_an_example():
    r = _run("report", "--help")
    assert r.exit_code == 0 and "Example:" in r.output and "harden report report.json -o report.html" in r.output
    assert "report" in _run("--help").output


@needs_mpl
def test_simulate_html_option(tmp_path, int8_model):
    base = ["simulate", int8_model, "--data", SAMPLES / "test.npz", "--fault", "bitflip:1e-3", "--trials", "3", "-q"]
    r = _run(*base, "--report", tmp_path / "s.json", "--html", tmp_path / "s.html")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "s.html").read_text(encoding="utf-8")
    assert page == render_html(load_report(tmp_path / "s.json"))
    assert _Page(page).svgs == 3
    r = _run(*base, "--report", tmp_path / "t.json", "--html", tmp_path / "t.json")
    assert r.exit_code == 2 and "same path as --report" in r.output and not (tmp_path / "t.json").exists()
    r = _run(*base, "--html", SAMPLES / "test.npz")
    assert r.exit_code == 2 and "is the input" in r.output


# --- a real browser --------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _chromium(tmp_path: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


@needs_mpl
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium on PATH (apt-get install chromium)")
@pytest.mark.parametrize("kind", ["apply", "simulate"])
def test_page_in_a_headless_browser(tmp_path, kind, apply_html, simulate_html):
    from PIL import Image

    page = tmp_path / f"{kind}.html"
    html_text = apply_html if kind == "apply" else simulate_html
    page.write_text(html_text, encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Page(dom.stdout)
    expected = _Page(html_text)
    assert parsed.svgs == expected.svgs > 0 and parsed.svgs_in_figures == expected.svgs
    assert parsed.sections == expected.sections
    assert dom.stdout.count("<path") >= html_text.count("<path")  # every plot's geometry was parsed

    shot = tmp_path / f"{kind}.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars", page.as_uri())
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    im = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert im.size == (1200, 3000)
    colours = im.getcolors(maxcolors=1 << 24)
    assert len(colours) > 500, "a blank or unstyled page"
    # the plots' own colours are on screen (the hardened variant's green / simulate's blue)
    want = (0x1B, 0x9E, 0x77) if kind == "apply" else (0x1F, 0x77, 0xB4)
    near = sum(n for n, c in colours if sum(abs(a - b) for a, b in zip(c, want)) < 30)
    assert near > 500, f"too few pixels of the plot colour {want}: {near}"
    # the page is not mostly background
    background = max(colours)[0]
    assert background < 0.9 * im.size[0] * im.size[1]
