"""Make the bundled samples: a small trained model, its data and one chip's fault map.

    python samples/make_samples.py            # (re)write samples/
    python samples/make_samples.py --check    # rebuild in a temp dir, compare with samples/

Needs torch and scikit-learn (pip install -e '.[train,test]'); the committed files need
neither. The training code is shared with the test suite: it lives in tests/zoo.py, imported
from there, so the sample model is exactly the test suite's "residual" digits CNN (opset 17,
dynamic batch, seed 0). Deterministic: running it twice writes identical bytes (same torch
version and platform).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402  (tests/zoo.py)
from harden.faultmap import generate_uniform, read_faultmap, write_faultmap  # noqa: E402
from harden.memory import weight_count  # noqa: E402

FILES = ("model.onnx", "calib.npz", "test.npz", "chip.bin")
FAULT_RATE = 0.04
FAULT_SEED = 1
CHIP_ID = "sample-chip-0042"


def make(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    d = zoo.digits_splits()
    with tempfile.TemporaryDirectory() as tmp:
        built = zoo.train_digits_cnn("residual", tmp, opset=17, dynamic_batch=True, seed=0)
        shutil.copyfile(built, out / "model.onnx")
    zoo.write_npz(out / "calib.npz", d["x_calib"], d["y_calib"])
    zoo.write_npz(out / "test.npz", d["x_test"], d["y_test"])
    num_words = weight_count(out / "model.onnx")  # one word per int8 weight
    fm = generate_uniform(num_words, FAULT_RATE, FAULT_SEED, {"chip_id": CHIP_ID})
    write_faultmap(fm, out / "chip.bin")
    fm = read_faultmap(out / "chip.bin")
    return {
        "weights": num_words,
        "test_accuracy": zoo.accuracy(out / "model.onnx", d["x_test"], d["y_test"]),
        "calib_accuracy": zoo.accuracy(out / "model.onnx", d["x_calib"], d["y_calib"]),
        "faulty_words": fm.num_records,
        "fault_rate": fm.rate,
    }


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: samples/)")
    ap.add_argument("--check", action="store_true",
                    help="rebuild in a temp folder and compare byte for byte with --out")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            info = make(Path(tmp))
            bad = [f for f in FILES if not (args.out / f).exists()
                   or _sha(Path(tmp) / f) != _sha(args.out / f)]
        print(info)
        if bad:
            print(f"differ from a fresh build: {', '.join(bad)}")
            return 1
        print("samples are up to date")
        return 0
    info = make(args.out)
    for f in FILES:
        p = args.out / f
        print(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}  "
              f"{p.stat().st_size:>7} bytes  sha256 {_sha(p)[:16]}")
    print(f"weights {info['weights']}, test accuracy {info['test_accuracy']:.4f}, "
          f"calib accuracy {info['calib_accuracy']:.4f}, faulty words {info['faulty_words']} "
          f"({info['faulty_words'] / info['weights']:.1%}), cell fault rate {info['fault_rate']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
