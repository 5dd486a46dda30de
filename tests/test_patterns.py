"""Fault-map patterns (issue 2): each generated map has the requested overall cell rate within
sampling error, and the structure its name promises.

The bounds are 5 standard deviations of the faulty-cell count, with the variance derived for
each pattern from its own independent units (cells, bit columns, rows, bit-lines, clusters):

    uniform, bias   Binomial(8N, p)                          var = 8N p (1 - p)
    bitprofile      sum over bits of Binomial(N, r_b)        var = N sum_b r_b (1 - r_b)
    rows, columns   independent lines of L_l cells, each failing with probability q
                                                             var = q (1 - q) sum_l L_l^2
    clustered       Poisson(lambda) clusters per word, each marking every cell of its
                    W = 2r+1 words with probability d; cells i, j are both marked by a
                    Poisson(c_ij) number of clusters, c_ij = lambda d^2 (W - delta_ij) for
                    words delta_ij < W apart, so Cov(I_i, I_j) = (1-p)^2 (exp(c_ij) - 1) exactly:
        var = 8N [p(1-p) + (1-p)^2 (7 (e^{lambda W d^2} - 1) + 16 sum_{delta=1}^{W-1} (e^{lambda (W-delta) d^2} - 1))]

(for the clustered pattern the exact count is far from binomial: tens of times the variance of
independent cells). `test_variance_formulas_are_calibrated` checks these formulas against the
spread over 150 seeds, so the 5-sigma bounds are neither loose by construction nor too tight.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner

from harden.cli import main
from harden.errors import InputError
from harden.faultmap import generate_uniform, read_faultmap, to_bytes
from harden.patterns import Clustered, Rows, generate, get_pattern, pattern_names

CASES = [
    ("uniform", {}),
    ("bias", {"p_sa1": 0.9}),
    ("bitprofile", {"profile": "1,1,1,1,1,1,2,4"}),
    ("clustered", {}),
    ("clustered", {"radius": 8, "density": 0.25}),
    ("rows", {"row_words": 32}),
    ("rows", {"row_words": 50, "bits": "0xc0"}),  # a partial last row; two bits per word
    ("columns", {"run": 64}),
    ("columns", {"run": 32, "stride": 16, "bits": "0x81"}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for n, p in CASES]


def _popcount(mask: int) -> int:
    return bin(mask).count("1")


def _line_lengths(name: str, params, num_words: int) -> tuple[int, np.ndarray]:
    """(bits per word on a line, cells per line) of a rows/columns pattern: its independent units."""
    nbits = _popcount(params.bits)
    if name == "rows":
        rw = params.row_words
        words = np.full(-(-num_words // rw), rw, np.int64)
        words[-1] = num_words - rw * (words.size - 1)
        return nbits, words * nbits
    run, stride = params.run, params.stride
    block = run * stride
    lengths = []
    for t in range(-(-num_words // block)):
        for k in range(stride):
            first = t * block + k
            lengths.append(max(0, min(run, -(-(num_words - first) // stride))))
    return nbits, np.repeat(np.array(lengths, np.int64), nbits)


def moments(name: str, params: dict, num_words: int, rate: float) -> tuple[float, float, float]:
    """(expected faulty cells, their standard deviation, independent units expected to fail)."""
    pat = get_pattern(name, params)
    p = pat.params
    cells = 8 * num_words
    if name in ("uniform", "bias"):
        return cells * rate, math.sqrt(cells * rate * (1 - rate)), cells * rate
    if name == "bitprofile":
        r = pat.bit_rates(rate)
        return cells * rate, math.sqrt(num_words * float(np.sum(r * (1 - r)))), cells * rate
    if name in ("rows", "columns"):
        nbits, lengths = _line_lengths(name, p, num_words)
        assert lengths.sum() == num_words * nbits  # every cell of those bits on exactly one line
        q = rate * 8 / nbits
        return cells * rate, math.sqrt(q * (1 - q) * float(np.sum(lengths.astype(float) ** 2))), q * lengths.size
    assert name == "clustered"
    W, d = 2 * p.radius + 1, p.density
    lam = -math.log1p(-rate) / (W * d)
    assert num_words >= 2 * W - 1
    near = 7 * math.expm1(lam * W * d * d) + 16 * sum(math.expm1(lam * (W - k) * d * d) for k in range(1, W))
    var = cells * (rate * (1 - rate) + (1 - rate) ** 2 * near)
    return cells * rate, math.sqrt(var), lam * num_words


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("rate", [0.002, 0.01, 0.05])
def test_generated_rate_is_within_sampling_error(name, params, rate):
    words = 1 << 20
    expected, sd, units = moments(name, params, words, rate)
    assert units >= 20, "too few independent units for a 5-sigma bound to mean much"
    for seed in range(3):
        fm = generate(name, words, rate, seed, params)
        assert abs(fm.faulty_cells - expected) <= 5 * sd, (fm.faulty_cells, expected, sd)
        assert fm.num_words == words


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_variance_formulas_are_calibrated(name, params):
    """Over 150 seeds the z-scores of the faulty-cell count have mean ~0 and variance ~1: the
    expected rate is unbiased and the derived variance is the real one."""
    words, rate, n = 1 << 14, 0.02, 150
    expected, sd, _ = moments(name, params, words, rate)
    z = np.array([(generate(name, words, rate, seed, params).faulty_cells - expected) / sd for seed in range(n)])
    assert abs(z.mean()) < 5 / math.sqrt(n), z.mean()
    assert 0.6 < z.var(ddof=1) < 1.5, z.var(ddof=1)


def test_clustered_variance_is_far_above_independent_cells():
    _, sd, _ = moments("clustered", {}, 1 << 18, 0.01)
    _, sd_uniform, _ = moments("uniform", {}, 1 << 18, 0.01)
    assert sd > 4 * sd_uniform  # a binomial bound would be wrong for it


# --- structure ---------------------------------------------------------------------------------


def _cells(fm):
    """(word, bit, stuck1) of every faulty cell."""
    faulty = np.unpackbits((fm.sa0 | fm.sa1)[:, None], axis=1, bitorder="little")
    rec, bit = np.nonzero(faulty)
    stuck1 = (fm.sa1[rec] >> bit.astype(np.uint8)) & 1
    return fm.addresses[rec].astype(np.int64), bit, stuck1.astype(bool)


def test_uniform_is_generate_uniform_and_the_cli_default(tmp_path):
    assert to_bytes(generate("uniform", 5000, 0.02, 7)) == to_bytes(generate_uniform(5000, 0.02, 7))
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    for out, extra in ((a, []), (b, ["--pattern", "uniform"])):
        res = CliRunner().invoke(main, ["faultmap", "generate", "--words", "5000", "--rate", "0.02", "--seed", "7", "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes() == to_bytes(generate_uniform(5000, 0.02, 7))


def test_bias_sets_the_stuck_at_1_share():
    for p in (0.0, 0.9, 1.0):
        fm = generate("bias", 1 << 16, 0.02, 3, {"p_sa1": p})
        s = fm.summary()
        n = s["faulty_cells"]
        assert abs(s["stuck_at_1"] - p * n) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9
        assert fm.meta["generator"] == "bias" and fm.meta["params"] == {"p_sa1": p}


def test_bitprofile_rates_per_bit():
    profile = [0, 1, 1, 1, 1, 2, 4, 8]
    fm = generate("bitprofile", 1 << 16, 0.02, 5, {"profile": ",".join(map(str, profile))})
    per_bit = np.array(fm.summary()["faulty_cells_per_bit"])
    r = 0.02 * 8 * np.array(profile) / sum(profile)
    bound = 5 * np.sqrt((1 << 16) * r * (1 - r))
    assert per_bit[0] == 0 and np.all(np.abs(per_bit - (1 << 16) * r) <= bound)
    assert get_pattern("bitprofile", {"profile": "1,1,1,1,1,1,1,8"}).max_rate() == pytest.approx(15 / 64)
    with pytest.raises(InputError, match="bit rate above 1"):
        generate("bitprofile", 64, 0.5, 1, {"profile": "0,0,0,0,0,0,0,1"})


def test_rows_are_whole_word_lines_of_one_polarity():
    rw, mask, words = 50, 0xC0, 10_000  # partial last row (10000 = 200 * 50)
    fm = generate("rows", words, 0.05, 2, {"row_words": rw, "bits": hex(mask), "p_sa1": 0.5})
    assert fm.num_records and np.all((fm.sa0 | fm.sa1) == mask)
    rows = np.unique(fm.addresses.astype(np.int64) // rw)
    expect = np.concatenate([np.arange(r * rw, min(words, (r + 1) * rw)) for r in rows])
    assert np.array_equal(fm.addresses.astype(np.int64), expect)
    for r in rows:
        sel = fm.addresses.astype(np.int64) // rw == r
        assert np.all(fm.sa1[sel] == mask) or np.all(fm.sa0[sel] == mask)
    full = generate("rows", 1000, 2 / 8, 1, {"row_words": 7, "bits": "0x03"})  # the highest rate: every row
    assert full.faulty_cells == 1000 * 2
    with pytest.raises(InputError, match="above the 0.25"):
        generate("rows", 1000, 0.3, 1, {"bits": "0x03"})


def test_columns_are_whole_bit_lines_of_one_polarity():
    run, stride, words = 16, 8, 5000
    fm = generate("columns", words, 0.05, 4, {"run": run, "stride": stride})
    word, bit, stuck1 = _cells(fm)
    block = run * stride
    line = ((word // block) * stride + word % stride) * 8 + bit  # (block, k, bit) of each cell
    lines, inverse = np.unique(line, return_inverse=True)
    assert lines.size > 10
    for i, ln in enumerate(lines):
        t, k, b = ln // 8 // stride, ln // 8 % stride, ln % 8
        members = np.arange(t * block + k, min(words, (t + 1) * block), stride)
        assert np.array_equal(np.sort(word[inverse == i]), members)
        assert np.all(bit[inverse == i] == b)
        assert stuck1[inverse == i].all() or not stuck1[inverse == i].any()


def test_clustered_faults_come_in_bursts():
    words = 1 << 16
    fm = generate("clustered", words, 0.01, 6, {"radius": 3, "density": 0.5})
    faulty = np.zeros(words, bool)
    faulty[fm.addresses.astype(np.int64)] = True
    neighbour = faulty[np.roll(np.arange(words), -1)]
    p_word = faulty.mean()
    p_next_given = (faulty & neighbour).sum() / faulty.sum()
    assert p_next_given > 5 * p_word  # uniform faults would give p_next_given ~ p_word
    u = generate_uniform(words, 0.01, 6)
    fu = np.zeros(words, bool)
    fu[u.addresses.astype(np.int64)] = True
    assert (fu & np.roll(fu, -1)).sum() / fu.sum() < 2 * fu.mean()
    assert generate("clustered", 64, 1.0, 1).faulty_cells == 64 * 8
    with pytest.raises(InputError, match="spans 9 words"):
        generate("clustered", 8, 0.1, 1, {"radius": 4})


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_deterministic_per_seed_and_recorded(name, params):
    a, b, c = (generate(name, 4096, 0.03, s, params, meta={"chip_id": "X1"}) for s in (1, 1, 2))
    assert to_bytes(a) == to_bytes(b) and a != c
    assert a.chip_id == "X1" and a.meta["generator"] == name and a.meta["seed"] == 1 and a.meta["rate"] == 0.03
    assert generate(name, 4096, 0.0, 1, params).num_records == 0


def test_pattern_errors_are_one_line_exit_2(tmp_path):
    assert set(pattern_names()) >= {"uniform", "bias", "bitprofile", "clustered", "rows", "columns"}
    for params, msg in (
        ({"row_wordz": 3}, "unknown parameter 'row_wordz' (parameters: row_words, bits, p_sa1)"),
        ({"row_words": "0"}, "row_words must be an integer"),
        ({"row_words": "x"}, "not a valid int"),
        ({"bits": "0x100"}, "bits must be a mask"),
        ({"p_sa1": "2"}, "p_sa1 must be in [0, 1]"),
    ):
        with pytest.raises(InputError) as info:
            Rows.from_params(params)
        assert msg in str(info.value)
    with pytest.raises(InputError, match="'profile' is required"):
        get_pattern("bitprofile")
    with pytest.raises(InputError, match="needs 8 weights"):
        get_pattern("bitprofile", {"profile": "1,2"})
    with pytest.raises(InputError, match="density must be above 0"):
        Clustered(density=0.0)
    out = tmp_path / "x.bin"
    for args, fragment in (
        (["--pattern", "burst"], "unknown fault-map pattern 'burst' (entry-point group harden.faultmap_patterns; known: "),
        (["--pattern", "rows", "--param", "row_words"], "parameters are KEY=VALUE"),
        (["--pattern", "rows", "--param", "foo=1"], "unknown parameter 'foo'"),
        (["--pattern", "rows", "--param", "bits=0x01", "--rate", "0.5"], "rate 0.5 is above the 0.125"),
        (["--pattern", "clustered", "--param", "radius=1", "--param", "radius=2"], "given twice"),
    ):
        res = CliRunner().invoke(main, ["faultmap", "generate", "--words", "1024", "--rate", "0.01", "-o", str(out), *args])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.output
    assert not out.exists()


def test_cli_generates_each_pattern(tmp_path):
    out = tmp_path / "rows.csv"
    res = CliRunner().invoke(main, ["faultmap", "generate", "--words", "4096", "--rate", "0.02", "--seed", "3", "--pattern", "rows",
                                    "--param", "row_words=64", "--param", "bits=0x80", "--chip-id", "R1", "-o", str(tmp_path / "rows.bin")])
    assert res.exit_code == 0, res.output
    fm = read_faultmap(tmp_path / "rows.bin")
    assert fm.meta["generator"] == "rows" and fm.meta["params"] == {"row_words": 64, "bits": 128, "p_sa1": 0.5} and fm.chip_id == "R1"
    assert to_bytes(fm) == to_bytes(generate("rows", 4096, 0.02, 3, {"row_words": 64, "bits": 0x80}, meta={"chip_id": "R1"}))
    res = CliRunner().invoke(main, ["faultmap", "generate", "--words", "4096", "--rate", "0.02", "--pattern", "bitprofile",
                                    "--param", "profile=1,1,1,1,1,1,1,1", "-o", str(out)])
    assert res.exit_code == 0 and out.read_text().startswith("address,bit,stuck")
