"""`harden faultmap generate | show | convert`: make, inspect and convert chip fault maps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from .. import faultmap as fmap
from .. import patterns, plugins
from ..errors import InputError
from ..fileio import check_output_path
from ..memory import get_layout, memory_words
from ._common import echo, quiet_option
from ._group import main


@main.group("faultmap")
def faultmap() -> None:
    """Generate, inspect and convert fault maps (HFM1 binary; CSV address,bit,stuck).

    \b
    Examples:
      harden faultmap generate --for-model model.onnx --rate 0.04 --seed 1 -o chip.bin
      harden faultmap generate --words 65536 --rate 0.01 --pattern rows --param row_words=64 -o rows.bin
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
              help="Size the memory to hold this model's int8 weights (one word per weight in the linear layout; see --layout).")
@click.option("--layout", "layout", metavar="NAME[:K=V,...]",
              help="Memory layout the map is for (default linear): --for-model sizes the memory to hold the model "
                   "in it, and a --words size it cannot use is refused. E.g. tiled:rows=128,cols=128.")
@click.option("--rate", type=float, required=True, help="Fraction of faulty bit cells, in [0, 1] (the expected overall rate).")
@click.option("--pattern", default="uniform", show_default=True,
              help="Fault pattern plugin: uniform, bias, bitprofile, clustered, rows, columns, or one a plugin "
                   "package adds ('harden plugins' lists them).")
@click.option("--param", "params", multiple=True, metavar="K=V",
              help="A parameter of the pattern, repeatable, e.g. --param row_words=64 --param bits=0x80 (see the list above).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--chip-id", help="chip_id to record in the metadata (default sim-<seed>).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Fault map to write (HFM1; CSV if it ends in .csv).")
@quiet_option
def generate(words: int | None, model: str | None, layout: str | None, rate: float, pattern: str,
             params: tuple[str, ...], seed: int, chip_id: str | None, output: str, quiet: bool) -> None:
    """Simulate a chip. Default pattern uniform: every bit cell is stuck with probability RATE,
    half at 0, half at 1; other patterns put the faults in bursts, whole rows or bit-lines, or
    weight some bits or one polarity, always at the expected overall rate RATE.

    \b
    Patterns and their parameters (--param K=V):
      uniform     p_sa1=0.5
      bias        p_sa1=0.9            share of faulty cells stuck at 1
      bitprofile  profile=W0,...,W7    relative rate per bit, LSB first (required); p_sa1
      clustered   radius=2 density=0.5 bursts over 2*radius+1 words; p_sa1
      rows        row_words=64 bits=0xff   whole word-lines; p_sa1 per row
      columns     run=256 stride=1 bits=0xff   bit-lines of run words stride apart; p_sa1 per line

    \b
    Examples:
      harden faultmap generate --words 1048576 --rate 0.01 --seed 7 -o chip.bin
      harden faultmap generate --for-model model.onnx --rate 0.04 --seed 1 -o chip.bin
      harden faultmap generate --words 65536 --rate 0.01 --pattern clustered --param radius=4 -o burst.bin
      harden faultmap generate --for-model model.onnx --layout tiled:rows=128,cols=128 --rate 0.01 -o pim.bin
    """

    if (words is None) == (model is None):
        raise InputError("give exactly one of --words N or --for-model MODEL")
    pat = patterns.get_pattern(pattern.strip(), plugins.parse_kv(params, f"pattern {pattern.strip()}"))
    lay = get_layout(layout) if layout is not None else None
    check_output_path(output, model)
    if model is not None:
        words = memory_words(model, lay)
    if lay is not None:
        lay.check(words)
    meta = {"chip_id": chip_id} if chip_id else None
    fm = pat.generate(words, rate, seed, meta=meta)
    _write(fm, output)
    echo(_one_line(fm, output), quiet)


@faultmap.command("show")
@click.argument("map_path", metavar="MAP", type=click.Path(dir_okay=False))
@click.option("--words", type=click.IntRange(min=1), help="Memory size in words (needed for a CSV map).")
@click.option("--layout", "layout", metavar="NAME[:K=V,...]",
              help="Check that the map fits this memory layout (exit 2 if not), e.g. tiled:rows=128,cols=128.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def show(map_path: str, words: int | None, layout: str | None, as_json: bool) -> None:
    """Print a fault map's size, fault rate, stuck-at split, per-bit counts and metadata.

    \b
    Examples:
      harden faultmap show chip.bin
      harden faultmap show mbist.csv --words 1048576 --json
      harden faultmap show pim.bin --layout tiled:rows=128,cols=128
    """

    lay = get_layout(layout) if layout is not None else None
    s = fmap.read_faultmap(map_path, num_words=words).summary()
    if lay is not None:
        lay.check(s["num_words"])
        s["layout"] = lay.spec
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
    if lay is not None:
        rows.insert(3, ("layout", f"{lay.spec} (the map fits it)"))
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
