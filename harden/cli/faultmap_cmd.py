"""`harden faultmap generate | show | convert`: make, inspect and convert chip fault maps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from .. import faultmap as fmap
from ..errors import InputError
from ..fileio import check_output_path
from . import main
from ._common import echo, quiet_option


@main.group("faultmap")
def faultmap() -> None:
    """Generate, inspect and convert fault maps (HFM1 binary; CSV address,bit,stuck).

    \b
    Examples:
      harden faultmap generate --for-model model.onnx --rate 0.04 --seed 1 -o chip.bin
      harden faultmap show chip.bin
      harden faultmap convert mbist.csv --words 1048576 --chip-id A17-0042 -o chip.bin
    """


def _is_csv(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".csv"


def _write(fm: fmap.FaultMap, output: str) -> None:
    """HFM1, or CSV when the output ends in .csv (CSV keeps no metadata)."""
    if _is_csv(output):
        fmap.write_faultmap_csv(fm, output)
    else:
        fmap.write_faultmap(fm, output)


def _one_line(fm: fmap.FaultMap, output: str) -> str:
    return (
        f"wrote {output}: {fm.num_words} words, {fm.faulty_cells} faulty cells (rate {fm.rate:.6g}) "
        f"in {fm.num_records} words, crc32 0x{fm.crc32:08x}, chip_id {fm.chip_id}"
    )


@faultmap.command("generate")
@click.option("--words", type=click.IntRange(min=1), help="Size of the weight memory in 8-bit words.")
@click.option("--for-model", "model", type=click.Path(dir_okay=False),
              help="Size the memory to hold this model's int8 weights (one word per weight).")
@click.option("--rate", type=float, required=True, help="Fraction of faulty bit cells, in [0, 1].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--chip-id", help="chip_id to record in the metadata (default sim-<seed>).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Fault map to write (HFM1; CSV if it ends in .csv).")
@quiet_option
def generate(words: int | None, model: str | None, rate: float, seed: int, chip_id: str | None,
             output: str, quiet: bool) -> None:
    """Simulate a chip: every bit cell is stuck with probability RATE, half at 0, half at 1.

    \b
    Examples:
      harden faultmap generate --words 1048576 --rate 0.01 --seed 7 -o chip.bin
      harden faultmap generate --for-model model.onnx --rate 0.04 --seed 1 -o chip.bin
    """
    if (words is None) == (model is None):
        raise InputError("give exactly one of --words N or --for-model MODEL")
    check_output_path(output, model)
    if model is not None:
        from ..memory import weight_count

        words = weight_count(model)
    meta = {"chip_id": chip_id} if chip_id else None
    fm = fmap.generate_uniform(words, rate, seed, meta=meta)
    _write(fm, output)
    echo(_one_line(fm, output), quiet)


@faultmap.command("show")
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.option("--words", type=click.IntRange(min=1), help="Memory size in words (needed for a CSV map).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def show(map_path: str, words: int | None, as_json: bool) -> None:
    """Print a fault map's size, fault rate, stuck-at split, per-bit counts and metadata.

    \b
    Examples:
      harden faultmap show chip.bin
      harden faultmap show mbist.csv --words 1048576 --json
    """
    s = fmap.read_faultmap(map_path, num_words=words).summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    cells = s["faulty_cells"] or 1
    rows = [
        ("fault map", map_path),
        ("chip_id", s["chip_id"] or "-"),
        ("words", f"{s['num_words']} x {s['word_bits']} bits"),
        ("faulty words", f"{s['num_records']} ({s['num_records'] / s['num_words']:.4%} of words)"),
        ("faulty cells", f"{s['faulty_cells']} (rate {s['rate']:.6g})"),
        ("stuck-at-0", f"{s['stuck_at_0']} ({s['stuck_at_0'] / cells:.1%})"),
        ("stuck-at-1", f"{s['stuck_at_1']} ({s['stuck_at_1'] / cells:.1%})"),
        ("per bit", "  ".join(f"b{i}:{c}" for i, c in enumerate(s["faulty_cells_per_bit"])) + "  (b0 = LSB)"),
        ("crc32", f"0x{s['crc32']:08x}"),
        ("metadata", json.dumps(s["meta"], sort_keys=True)),
    ]
    for key, value in rows:
        click.echo(f"{key:<13} {value}")


@faultmap.command("convert")
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--words", type=click.IntRange(min=1), help="Memory size in words (needed for a CSV input).")
@click.option("--chip-id", help="chip_id to record in the metadata.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="HFM1 file to write; CSV if it ends in .csv (CSV keeps no metadata).")
@quiet_option
def convert(input_path: str, words: int | None, chip_id: str | None, output: str, quiet: bool) -> None:
    """Convert a memory-BIST CSV (address,bit,stuck; bit 0 = LSB) to HFM1, or HFM1 to CSV.

    \b
    Examples:
      harden faultmap convert mbist.csv --words 1048576 --chip-id A17-0042 -o chip.bin
      harden faultmap convert chip.bin -o chip.csv
    """
    check_output_path(output, input_path)
    fm = fmap.read_faultmap(input_path, num_words=words)
    meta = dict(fm.meta) or {"source": Path(input_path).name}  # a CSV carries no metadata
    if chip_id:
        meta["chip_id"] = chip_id
    if meta != fm.meta:
        fm = dataclasses.replace(fm, meta=meta)
    _write(fm, output)
    echo(_one_line(fm, output), quiet)
