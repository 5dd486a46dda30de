"""The `harden` click group every command module attaches to."""

from __future__ import annotations

import click

from .. import __version__
from ..allocator import tune_allocator
from ._common import HardenGroup


@click.group(cls=HardenGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="harden")
def main() -> None:
    """Harden neural networks for accelerators with faulty weight memory.

    \b
    Typical use:
      harden faultmap generate --for-model model.onnx --rate 0.04 --seed 1 -o chip.bin
      harden apply model.onnx --faultmap chip.bin --data calib.npz -o model.hardened.onnx

    Exit codes: 0 ok, 1 resilience gate not met, 2 bad input, 3 internal error.
    """
    tune_allocator()
