"""HFM1 fault maps: format, validation, CSV import, generators and the `harden faultmap` CLI."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harden.cli import main
from harden.errors import InputError
from harden.faultmap import (
    HEADER,
    FaultMap,
    faultmap_from_csv,
    faultmap_to_csv,
    from_bytes,
    generate_uniform,
    read_back,
    read_faultmap,
    to_bytes,
    write_faultmap,
)


def small_map(**meta) -> FaultMap:
    return FaultMap(
        num_words=100,
        addresses=np.array([3, 9, 42, 99], dtype=np.uint64),
        sa0=np.array([0x01, 0x00, 0x80, 0x0F], dtype=np.uint8),
        sa1=np.array([0x02, 0x10, 0x00, 0xF0], dtype=np.uint8),
        meta={"chip_id": "A17-0042", **meta},
    )


def raw_file(addresses, sa0, sa1, meta=b"{}", num_words=100, version=1, word_bits=8,
             num_records=None, meta_len=None, crc=None) -> bytes:
    """HFM1 bytes built by hand, with a correct CRC unless told otherwise (bypasses all checks)."""
    body = (np.asarray(addresses, dtype="<u8").tobytes() + np.asarray(sa0, dtype=np.uint8).tobytes()
            + np.asarray(sa1, dtype=np.uint8).tobytes() + meta)
    n = len(addresses) if num_records is None else num_records
    header = HEADER.pack(b"HFM1", version, word_bits, num_words, n,
                         len(meta) if meta_len is None else meta_len,
                         zlib.crc32(body) if crc is None else crc)
    return header + body


def reject(data: bytes, fragment: str, offset: int | None = None) -> str:
    with pytest.raises(InputError) as info:
        from_bytes(data, source="chip.bin")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("chip.bin: offset ")
    if offset is not None:
        assert msg.startswith(f"chip.bin: offset {offset}: "), msg
    assert fragment in msg, msg
    return msg


# --- format ------------------------------------------------------------------------------


def test_header_layout_matches_design():
    data = to_bytes(small_map())
    magic, version, word_bits, num_words, n, meta_len, crc = struct.unpack_from("<4sHHQQII", data)
    assert (magic, version, word_bits, num_words, n) == (b"HFM1", 1, 8, 100, 4)
    assert len(data) == 32 + 4 * 8 + 4 + 4 + meta_len
    assert crc == zlib.crc32(data[32:]) == small_map().crc32
    assert np.frombuffer(data, "<u8", 4, 32).tolist() == [3, 9, 42, 99]
    assert data[64:68] == bytes([0x01, 0x00, 0x80, 0x0F]) and data[68:72] == bytes([0x02, 0x10, 0x00, 0xF0])
    assert json.loads(data[72:]) == {"chip_id": "A17-0042"}


def test_round_trip_through_a_file(tmp_path):
    fm = small_map(source="mbist", date="2024-05-01")
    path = tmp_path / "chip.bin"
    write_faultmap(fm, path)
    back = read_faultmap(path)
    assert back == fm
    assert to_bytes(back) == path.read_bytes()
    assert back.chip_id == "A17-0042" and back.num_records == 4
    assert back.addresses.dtype == np.uint64 and back.sa0.dtype == np.uint8


def test_foreign_json_formatting_is_kept_byte_for_byte():
    data = raw_file([5], [1], [0], meta=b'{ "source" : "mbist",\n  "chip_id": "X" }')
    fm = from_bytes(data)
    assert fm.meta == {"source": "mbist", "chip_id": "X"}
    assert to_bytes(fm) == data and fm.crc32 == zlib.crc32(data[32:])


def test_summary_figures():
    s = small_map().summary()
    assert s["faulty_cells"] == 2 + 1 + 1 + 8 == s["stuck_at_0"] + s["stuck_at_1"]
    assert (s["stuck_at_0"], s["stuck_at_1"]) == (1 + 1 + 4, 1 + 1 + 4)
    assert s["faulty_cells_per_bit"] == [2, 2, 1, 1, 2, 1, 1, 2]
    assert s["rate"] == pytest.approx(12 / 800)
    assert s["num_records"] == 4 and s["chip_id"] == "A17-0042"
    json.dumps(s)


def test_read_back_semantics():
    stored = np.array([0b10101010, 0x00, 0xFF, 0x5A], dtype=np.uint8)
    sa0 = np.array([0b00000010, 0x00, 0x81, 0x00], dtype=np.uint8)
    sa1 = np.array([0b00000001, 0x80, 0x00, 0x00], dtype=np.uint8)
    out = read_back(stored, sa0, sa1)
    assert out.dtype == np.uint8
    assert out.tolist() == [0b10101001, 0x80, 0x7E, 0x5A]
    codes = np.array([-1, 20], dtype=np.int8)  # int8 codes: same bits, int8 back
    assert read_back(codes, np.array([0x80, 0], np.uint8), np.array([0, 0x80], np.uint8)).tolist() == [127, -108]


def test_masks_at_finds_records_for_any_query_shape():
    fm = small_map()
    q = np.array([[0, 3, 9], [42, 98, 99]], dtype=np.int64)
    hit, sa0, sa1 = fm.masks_at(q)
    assert hit.tolist() == [[False, True, True], [True, False, True]]
    assert sa0.tolist() == [[0, 0x01, 0x00], [0x80, 0, 0x0F]]
    assert sa1.tolist() == [[0, 0x02, 0x10], [0x00, 0, 0xF0]]
    empty = FaultMap(10, np.array([], np.uint64), np.array([], np.uint8), np.array([], np.uint8))
    assert not empty.masks_at(np.arange(10)).__getitem__(0).any()


def test_constructor_rejects_invalid_records():
    with pytest.raises(ValueError, match="strictly increasing"):
        FaultMap(10, np.array([2, 1]), np.array([1, 1]), np.array([0, 0]))
    with pytest.raises(ValueError, match="sa0 & sa1"):
        FaultMap(10, np.array([1]), np.array([3]), np.array([1]))
    with pytest.raises(ValueError, match="sa1 must be in"):
        FaultMap(10, np.array([1]), np.array([0]), np.array([256]))
    with pytest.raises(ValueError, match="addresses must be in"):
        FaultMap(10, np.array([-1]), np.array([1]), np.array([0]))


# --- validation --------------------------------------------------------------------------

GOOD = raw_file([3, 9, 42], [1, 0, 4], [0, 2, 8], meta=b'{"chip_id":"c"}')


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def test_good_file_is_accepted():
    assert from_bytes(GOOD).num_records == 3


def test_bad_magic():
    reject(patch(GOOD, 0, b"HFM2"), "bad magic", 0)


def test_unsupported_version():
    reject(patch(GOOD, 4, struct.pack("<H", 2)), "unsupported version 2", 4)


def test_word_size_other_than_8():
    reject(patch(GOOD, 6, struct.pack("<H", 16)), "word_bits is 16", 6)


def test_zero_words():
    reject(raw_file([], [], [], num_words=0), "num_words is 0", 8)


def test_more_records_than_words():
    reject(raw_file([0, 1, 2], [1, 1, 1], [0, 0, 0], num_words=2), "exceeds num_words", 16)


@pytest.mark.parametrize("cut", [0, 4, 20, 31, 32, 40, 57, 60, len(GOOD) - 1])
def test_truncated_file(cut):
    reject(GOOD[:cut], "truncated", cut)


def test_trailing_bytes():
    reject(GOOD + b"\x00\x00", "2 trailing bytes", len(GOOD))


def test_bad_crc():
    reject(patch(GOOD, 60, b"\x07"), "CRC-32 mismatch", 28)
    reject(patch(GOOD, 28, b"\x00\x00\x00\x00"), "CRC-32 mismatch", 28)


def test_unsorted_addresses():
    msg = reject(raw_file([3, 9, 7], [1, 1, 1], [0, 0, 0]), "", 48)
    assert msg == ("chip.bin: offset 48: address 7 is not greater than the previous address 9 "
                   "(addresses must be strictly increasing)")


def test_duplicate_address():
    reject(raw_file([3, 9, 9], [1, 1, 1], [0, 0, 0]), "duplicate address 9", 48)


def test_address_out_of_range():
    reject(raw_file([3, 10], [1, 1], [0, 0], num_words=10), "address 10 is out of range", 40)


def test_bit_stuck_both_ways():
    # record 1's masks: sa0 at 32 + 16 + 1
    reject(raw_file([3, 9], [1, 3], [2, 2]), "stuck at both 0 and 1", 49)


def test_record_without_stuck_bit():
    reject(raw_file([3, 9, 11], [1, 1, 0], [0, 0, 0]), "no stuck bit", 32 + 24 + 2)


def test_first_offending_record_is_named():
    # record 1 has no stuck bit, record 2 is unsorted: record 1 comes first
    reject(raw_file([3, 9, 5], [1, 0, 1], [0, 0, 0]), "record 1 (address 9) has no stuck bit", 32 + 24 + 1)


@pytest.mark.parametrize("meta, fragment, at", [
    (b"[1, 2]", "must be a JSON object, got list", 0),
    (b'"chip"', "must be a JSON object, got str", 0),
    (b"{oops}", "not valid JSON", 1),
    (b'{"a": NaN}', "not valid JSON", 0),
    (b'{"a": "\xff"}', "not valid UTF-8", 7),
    (b"", "not valid JSON", 0),
])
def test_metadata_must_be_a_json_object(meta, fragment, at):
    reject(raw_file([3], [1], [0], meta=meta), fragment, 32 + 10 + at)


@pytest.mark.parametrize("n, meta_len", [(2**60, 2), (2**64 - 1, 2), (1, 2**32 - 1)])
def test_absurd_header_counts_are_rejected_without_allocating(n, meta_len):
    data = raw_file([3], [1], [0], num_words=2**64 - 1, num_records=n, meta_len=meta_len)
    reject(data, "truncated", len(data))


def test_not_a_fault_map_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"\x08\x07\x12\x04junk")
    with pytest.raises(InputError, match=r"model.onnx: offset 0: not an HFM1 fault map \(bad magic"):
        read_faultmap(p)
    with pytest.raises(InputError, match="no such file"):
        read_faultmap(tmp_path / "missing.bin")


def test_every_single_byte_change_is_caught_or_reproduced():
    """Exhaustive: every byte of a small file, every other value."""
    data = bytearray(to_bytes(small_map()))
    accepted = 0
    for i in range(len(data)):
        orig = data[i]
        for v in range(256):
            if v == orig:
                continue
            data[i] = v
            mutated = bytes(data)
            try:
                fm = from_bytes(mutated)
            except InputError:
                continue
            accepted += 1
            assert to_bytes(fm) == mutated
        data[i] = orig
    assert accepted > 0  # num_words may change freely while every address stays below it


# --- generator ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.04, 0.3, 0.75])
def test_generate_uniform_hits_the_rate(rate):
    words = 20_000
    cells = 8 * words
    fm = generate_uniform(words, rate, seed=11)
    sigma = math.sqrt(cells * rate * (1 - rate))
    assert abs(fm.faulty_cells - cells * rate) < 5 * sigma
    s = fm.summary()
    half = fm.faulty_cells / 2
    assert abs(s["stuck_at_1"] - half) < 5 * math.sqrt(half / 2) + 1
    per_bit = np.array(s["faulty_cells_per_bit"])
    expect = cells / 8 * rate
    assert np.all(np.abs(per_bit - expect) < 5 * math.sqrt(expect * (1 - rate)) + 1)


def test_generate_uniform_faulty_word_fraction_matches_methods():
    # METHODS.md: at rate 0.04 about 28 % of 8-bit words hold a faulty bit
    fm = generate_uniform(50_000, 0.04, seed=3)
    p = 1 - 0.96**8
    assert abs(fm.num_records / 50_000 - p) < 5 * math.sqrt(p * (1 - p) / 50_000)


def test_generate_uniform_is_deterministic_per_seed():
    a, b, c = (generate_uniform(5000, 0.02, seed=s) for s in (7, 7, 8))
    assert a == b and to_bytes(a) == to_bytes(b)
    assert not np.array_equal(a.addresses, c.addresses)
    assert to_bytes(a) != to_bytes(c)


def test_generate_uniform_metadata_and_edges():
    fm = generate_uniform(64, 0.1, seed=5)
    assert fm.meta == {"chip_id": "sim-5", "generator": "uniform", "rate": 0.1, "seed": 5}
    assert generate_uniform(64, 0.1, seed=5, meta={"chip_id": "A1"}).chip_id == "A1"
    assert generate_uniform(64, 0.0, seed=1).num_records == 0
    full = generate_uniform(64, 1.0, seed=1)
    assert full.num_records == 64 and np.all((full.sa0 | full.sa1) == 0xFF)
    assert generate_uniform(1000, 0.2, seed=1, p_sa1=1.0).sa0.max() == 0
    assert generate_uniform(1000, 0.2, seed=1, p_sa1=0.0).sa1.max() == 0


def test_generate_uniform_draws_only_the_faulty_cells():
    # 2**40 words: a per-cell mask would need terabytes; ~8800 faults are drawn directly
    fm = generate_uniform(2**40, 1e-9, seed=2)
    assert 0 < fm.num_records < 20_000 and int(fm.addresses[-1]) < 2**40


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_words": 0, "rate": 0.1}, "number of words"),
    ({"num_words": 10, "rate": -0.1}, "fault rate"),
    ({"num_words": 10, "rate": 1.5}, "fault rate"),
    ({"num_words": 10, "rate": float("nan")}, "fault rate"),
])
def test_generate_uniform_rejects_bad_arguments(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        generate_uniform(seed=1, **kwargs)


# --- CSV ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "faults.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_import_groups_cells_into_words(tmp_path):
    p = write(tmp_path, "address,bit,stuck\n9,7,1\n3,0,0\n3,1,1\n\n3,0,0\n9,2,0\n")
    fm = faultmap_from_csv(p, num_words=10, meta={"chip_id": "B"})
    assert fm.addresses.tolist() == [3, 9]
    assert fm.sa0.tolist() == [0x01, 0x04] and fm.sa1.tolist() == [0x02, 0x80]
    assert fm.chip_id == "B" and fm.faulty_cells == 4
    assert read_faultmap(p, num_words=10) == FaultMap(10, fm.addresses, fm.sa0, fm.sa1)


def test_csv_round_trip(tmp_path):
    fm = generate_uniform(3000, 0.05, seed=4)
    p = write(tmp_path, faultmap_to_csv(fm))
    back = faultmap_from_csv(p, num_words=3000, meta=fm.meta)
    assert back == fm


def test_csv_tolerates_crlf_and_spaces(tmp_path):
    p = tmp_path / "f.csv"
    p.write_bytes(b"address,bit,stuck\r\n 4 , 3 , 1\r\n")
    assert faultmap_from_csv(p, 8).sa1.tolist() == [8]
    assert faultmap_from_csv(write(tmp_path, "address,bit,stuck\n"), 8).num_records == 0


@pytest.mark.parametrize("text, fragment", [
    ("addr,bit,stuck\n1,1,1\n", "line 1: the header must be exactly 'address,bit,stuck'"),
    ("", "line 1: the header must be exactly"),
    ("address,bit,stuck\n1,1,1\n\n2,8,0\n", "line 4: bit out of range"),
    ("address,bit,stuck\n1,-1,0\n", "line 2: bit out of range"),
    ("address,bit,stuck\n1,1,2\n", "line 2: stuck must be 0 or 1"),
    ("address,bit,stuck\n1,1,1\n10,1,1\n", "line 3: address out of range"),
    ("address,bit,stuck\n-1,1,1\n", "line 2: address out of range"),
    ("address,bit,stuck\n1,1,1\n2,x,1\n", "line 3: expected three integers"),
    ("address,bit,stuck\n1,1,1\n2,1\n", "line 3: expected three integers"),
    ("address,bit,stuck\n1,1\n2,1\n", "line 2: expected three integers"),
    ("address,bit,stuck\n99999999999999999999,1,1\n", "line 2: expected three integers"),
    ("address,bit,stuck\n5,3,1\n6,0,0\n5,3,0\n", "line 4: address 5 bit 3 is listed as stuck at both 0 and 1 (also on line 2)"),
])
def test_csv_errors_name_the_line(tmp_path, text, fragment):
    with pytest.raises(InputError) as info:
        faultmap_from_csv(write(tmp_path, text), num_words=10)
    assert fragment in str(info.value) and str(info.value).startswith(str(tmp_path / "faults.csv"))


def test_csv_needs_the_memory_size(tmp_path):
    p = write(tmp_path, "address,bit,stuck\n1,1,1\n")
    with pytest.raises(InputError, match="pass --words"):
        read_faultmap(p)


# --- property tests ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def fault_maps(draw) -> FaultMap:
    num_words = draw(st.one_of(st.integers(1, 300), st.integers(1, 2**64 - 1)))
    addrs = sorted(draw(st.sets(st.integers(0, num_words - 1), max_size=min(num_words, 25))))
    faulty = draw(st.lists(st.integers(1, 255), min_size=len(addrs), max_size=len(addrs)))
    split = draw(st.lists(st.integers(0, 255), min_size=len(addrs), max_size=len(addrs)))
    sa0 = np.array([f & s for f, s in zip(faulty, split)], dtype=np.uint8)
    sa1 = np.array([f & ~s & 0xFF for f, s in zip(faulty, split)], dtype=np.uint8)
    meta = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=4))
    return FaultMap(num_words, np.array(addrs, dtype=np.uint64), sa0, sa1, meta)


@settings(max_examples=150, deadline=None)
@given(fault_maps())
def test_valid_maps_round_trip_exactly(fm):
    data = to_bytes(fm)
    back = from_bytes(data)
    assert back == fm
    assert to_bytes(back) == data
    assert back.crc32 == fm.crc32 == struct.unpack_from("<I", data, 28)[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fault_maps(), st.data())
def test_a_flipped_byte_is_rejected_or_reproduced(fm, data):
    raw = bytearray(to_bytes(fm))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        back = from_bytes(bytes(raw))
    except InputError:
        return
    assert to_bytes(back) == bytes(raw)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_crash_the_reader(blob):
    try:
        fm = from_bytes(b"HFM1" + blob)
    except InputError:
        return
    assert to_bytes(fm) == b"HFM1" + blob


# --- CLI ---------------------------------------------------------------------------------


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_input_error(result, fragment: str = "") -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_cli_generate_show_convert(tmp_path):
    chip = tmp_path / "chip.bin"
    r = run("faultmap", "generate", "--words", "4096", "--rate", "0.04", "--seed", "3", "--chip-id", "A1",
            "-o", str(chip))
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 1 and "4096 words" in r.stdout
    fm = read_faultmap(chip)
    assert fm == generate_uniform(4096, 0.04, 3, meta={"chip_id": "A1"})

    r = run("faultmap", "show", str(chip))
    assert r.exit_code == 0, r.output
    for text in ("4096 x 8 bits", f"{fm.faulty_cells} (rate", "stuck-at-1", "b7:", f"0x{fm.crc32:08x}", "A1"):
        assert text in r.stdout

    r = run("faultmap", "show", str(chip), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == json.loads(json.dumps(fm.summary()))

    csv = tmp_path / "chip.csv"
    assert run("faultmap", "convert", str(chip), "-o", str(csv)).exit_code == 0
    assert csv.read_text().startswith("address,bit,stuck\n")
    back = tmp_path / "back.bin"
    r = run("faultmap", "convert", str(csv), "--words", "4096", "--chip-id", "A1", "-o", str(back), "-q")
    assert r.exit_code == 0 and r.stdout == ""
    fb = read_faultmap(back)
    assert np.array_equal(fb.addresses, fm.addresses) and np.array_equal(fb.sa1, fm.sa1)
    assert fb.meta == {"chip_id": "A1", "source": "chip.csv"}

    r = run("faultmap", "show", str(csv), "--words", "4096")
    assert r.exit_code == 0 and f"{fm.faulty_cells} (rate" in r.stdout


def test_cli_generate_for_model(tmp_path):
    pytest.importorskip("harden.memory")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    r = run("faultmap", "generate", "--for-model", str(model), "--rate", "0.5", "-o", str(tmp_path / "c.bin"))
    assert r.exit_code == 0, r.output
    assert read_faultmap(tmp_path / "c.bin").num_words == 12


def test_cli_bad_input_is_one_error_line_and_leaves_no_file(tmp_path):
    bad = write(tmp_path, "address,bit,stuck\n1,9,1\n")
    out = tmp_path / "out.bin"
    assert_input_error(run("faultmap", "convert", str(bad), "--words", "10", "-o", str(out)), "line 2: bit out of range")
    assert_input_error(run("faultmap", "convert", str(bad), "-o", str(out)), "--words")
    assert_input_error(run("faultmap", "generate", "--words", "10", "--rate", "2", "-o", str(out)), "fault rate")
    assert_input_error(run("faultmap", "generate", "--rate", "0.1", "-o", str(out)), "--for-model")
    assert_input_error(run("faultmap", "generate", "--words", "10", "--for-model", str(bad), "--rate", "0.1",
                           "-o", str(out)), "exactly one")
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(GOOD[:-1])
    assert_input_error(run("faultmap", "show", str(corrupt)), "truncated")
    assert_input_error(run("faultmap", "show", str(tmp_path / "nope.bin")), "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.bin", "faults.csv"]


def test_cli_refuses_to_overwrite_its_input(tmp_path):
    chip = tmp_path / "chip.bin"
    write_faultmap(small_map(), chip)
    before = chip.read_bytes()
    assert_input_error(run("faultmap", "convert", str(chip), "-o", str(chip)), "is the input")
    assert chip.read_bytes() == before


def test_cli_help_has_examples():
    for cmd in ("generate", "show", "convert"):
        r = run("faultmap", cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.stdout and f"harden faultmap {cmd}" in r.stdout
