"""The golden reports of `apply` on the samples (tests/data/apply_golden.json): what a refactor
must not change. `python tests/golden.py` rewrites the file (only when a change is meant to
change the figures; say why in the commit)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "data" / "apply_golden.json"
#: Fields that are not behaviour: timings, and what depends on the host (its CPU features and
#: its own fused onnxruntime kernels, hostcheck.py).
VOLATILE = {"seconds", "timings", "host", "host_onnxruntime"}


def cases():
    from harden.pipeline import ApplyOptions

    return {"defaults": ApplyOptions(), "no-clip": ApplyOptions(clip=False, trials=5)}


def normalized(obj):
    if isinstance(obj, dict):
        return {k: (Path(v).name if k == "path" and isinstance(v, str) else normalized(v))
                for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, (list, tuple)):
        return [normalized(v) for v in obj]
    return obj


def run(label: str) -> dict:
    from harden.pipeline import apply

    res = apply(ROOT / "samples/model.onnx", ROOT / "samples/chip.bin", ROOT / "samples/calib.npz",
                eval_data_path=ROOT / "samples/test.npz", options=cases()[label], write=False)
    return {"model_sha256": hashlib.sha256(res.model.SerializeToString(deterministic=True)).hexdigest(),
            "report": normalized(json.loads(json.dumps(res.report, default=str)))}


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({label: run(label) for label in cases()}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
