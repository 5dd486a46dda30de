"""Replay the Dockerfile's install steps without a Docker engine (none runs on CI's machines).

    python .ci/dockerfile_steps.py [--build-arg NAME=VALUE ...] [--dockerfile Dockerfile]

Run it with a fresh virtual environment active: it reads the Dockerfile, copies what its COPY
lines copy into a scratch folder that stands for the image's root, runs every `RUN pip install
...` line there with bash (the Dockerfile's ARG and ENV values set, --build-arg overriding an
ARG), and finally runs the image's ENTRYPOINT + CMD from its last WORKDIR. Other RUN lines
(creating the user and /data) need root and would change this machine: they are listed, not run.

`instructions()` is also used by tests/test_packaging.py to hold the Dockerfile to the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        raise SystemExit(f"Dockerfile ends inside a continued line: {buf!r}")
    return out


def pip_install_lines(text: str) -> list[str]:
    """The RUN lines that install with pip (the ones a fresh venv can replay)."""
    return [args for inst, args in instructions(text) if inst == "RUN" and re.match(r"pip install\b", args)]


def _kv(args: str) -> dict[str, str]:
    """NAME=VALUE pairs of an ARG or ENV line (quotes as the shell reads them)."""
    pairs = {}
    for word in shlex.split(args):
        name, sep, value = word.partition("=")
        pairs[name] = value if sep else ""
    return pairs


def replay(dockerfile: Path, build_args: dict[str, str]) -> None:
    text = dockerfile.read_text()
    root = Path(tempfile.mkdtemp(prefix="harden-image-"))
    env = dict(os.environ)
    cwd = root
    entrypoint: list[str] = []
    cmd: list[str] = []
    ran = 0
    try:
        for inst, args in instructions(text):
            if inst == "ARG":
                for name, default in _kv(args).items():
                    env[name] = build_args.get(name, default)
            elif inst == "ENV":
                env.update(_kv(args))
            elif inst == "WORKDIR":
                cwd = root / args.lstrip("/")
                cwd.mkdir(parents=True, exist_ok=True)
            elif inst == "COPY":
                *srcs, dest = shlex.split(args)
                target = (cwd / dest) if not dest.startswith("/") else root / dest.lstrip("/")
                for src in srcs:
                    s = ROOT / src
                    if not s.exists():
                        raise SystemExit(f"COPY {src}: no such file in the build context")
                    if s.is_dir():
                        shutil.copytree(s, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                    else:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(s, target / s.name)
            elif inst == "RUN":
                if re.match(r"pip install\b", args):
                    print(f"[dockerfile] RUN {args}   (in {cwd.relative_to(root)}, "
                          f"build args {json.dumps({k: env.get(k, '') for k in _build_arg_names(text)})})", flush=True)
                    subprocess.run(["bash", "-c", args], cwd=cwd, env=env, check=True)
                    ran += 1
                else:
                    print(f"[dockerfile] not run here (needs root, changes the machine): RUN {args}", flush=True)
            elif inst == "ENTRYPOINT":
                entrypoint = json.loads(args)
            elif inst == "CMD":
                cmd = json.loads(args)
        if not ran:
            raise SystemExit("the Dockerfile has no `RUN pip install` line")
        if not entrypoint:
            raise SystemExit("the Dockerfile has no ENTRYPOINT")
        print(f"[dockerfile] {' '.join(entrypoint + cmd)}   (in {cwd.relative_to(root)})", flush=True)
        subprocess.run(entrypoint + cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(entrypoint + ["--version"], cwd=cwd, env=env, check=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _build_arg_names(text: str) -> list[str]:
    return [name for inst, args in instructions(text) if inst == "ARG" for name in _kv(args)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    ap.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    a = ap.parse_args()
    build_args = dict(arg.partition("=")[::2] for arg in a.build_arg)
    if sys.prefix == sys.base_prefix:
        raise SystemExit("activate a fresh virtual environment first")
    replay(a.dockerfile, build_args)


if __name__ == "__main__":
    main()
