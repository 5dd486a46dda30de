"""Shared pytest fixtures.

Model zoo (tests/zoo.py): real models trained on scikit-learn's bundled data sets, built once
per session into ``zoo_dir``. Set HARDEN_ZOO_DIR to a directory to keep them between sessions
(file names encode every build parameter and zoo.ZOO_VERSION, so a stale file is never reused
for different parameters; bump ZOO_VERSION when the training code changes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402


# --- model zoo -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """Where the zoo's models and data files are written (session tmp dir, or $HARDEN_ZOO_DIR)."""
    env = os.environ.get("HARDEN_ZOO_DIR")
    if env:
        p = Path(env)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def digits() -> dict:
    """zoo.digits_splits(): x_/y_ train, calib, test (read-only arrays)."""
    return zoo.digits_splits()


@pytest.fixture(scope="session")
def tabular() -> dict:
    """zoo.tabular_splits(): breast-cancer x_/y_ train, calib, test (read-only arrays)."""
    return zoo.tabular_splits()


@pytest.fixture(scope="session")
def plain_cnn(zoo_dir) -> Path:
    """Digits CNN without skip connections: Conv/Relu/MaxPool/Flatten/Gemm, opset 17, dynamic
    batch, input "input" [N, 1, 8, 8], output "logits" [N, 10]."""
    return zoo.train_digits_cnn("plain", zoo_dir)


@pytest.fixture(scope="session")
def residual_cnn(zoo_dir) -> Path:
    """Digits CNN with 2 residual blocks (Add) and GlobalAveragePool, opset 17, dynamic batch
    (the same model as samples/model.onnx)."""
    return zoo.train_digits_cnn("residual", zoo_dir)


@pytest.fixture(scope="session")
def mlp(zoo_dir) -> Path:
    """Breast-cancer MLP with Gemm nodes, opset 17, input "input" [N, 30], output "logits" [N, 2]."""
    return zoo.train_tabular_mlp(zoo_dir)


@pytest.fixture(scope="session")
def mlp_matmul(zoo_dir) -> Path:
    """The same MLP (same weights) exported as MatMul + Add."""
    return zoo.train_tabular_mlp(zoo_dir, use_matmul=True)


@pytest.fixture(scope="session")
def digits_calib_npz(zoo_dir, digits) -> Path:
    """256 digits images {"input": [256, 1, 8, 8] float32, "label": int64}."""
    return zoo.write_npz(zoo_dir / "digits_calib.npz", digits["x_calib"], digits["y_calib"])


@pytest.fixture(scope="session")
def digits_test_npz(zoo_dir, digits) -> Path:
    """341 held-out digits images with labels."""
    return zoo.write_npz(zoo_dir / "digits_test.npz", digits["x_test"], digits["y_test"])


@pytest.fixture(scope="session")
def tabular_calib_npz(zoo_dir, tabular) -> Path:
    """100 breast-cancer rows {"input": [100, 30] float32, "label": int64}."""
    return zoo.write_npz(zoo_dir / "tabular_calib.npz", tabular["x_calib"], tabular["y_calib"])


@pytest.fixture(scope="session")
def tabular_test_npz(zoo_dir, tabular) -> Path:
    """140 held-out breast-cancer rows with labels."""
    return zoo.write_npz(zoo_dir / "tabular_test.npz", tabular["x_test"], tabular["y_test"])


# --- int8 QDQ versions of the zoo models (what `simulate`, `tune` and the diagnostics take) ---

def quantize_zoo_model(src: Path, calib: Path, out: Path, clip: bool = False) -> Path:
    """prepare (onnxsim) [+ clip] + onnxruntime QDQ quantization, saved to `out`."""
    from harden.data import load_npz
    from harden.model import load_model, save_model
    from harden.passes import PassContext, run_passes
    from harden.passes.clip import ClipPass
    from harden.passes.quantize import QuantizePass
    from harden.model import prepare

    model = load_model(src)
    data = load_npz(calib, model)
    model, _ = prepare(model)
    qmodel, _ = run_passes(model, ([ClipPass()] if clip else []) + [QuantizePass()], PassContext(calib=data))
    save_model(qmodel, out)
    return out


@pytest.fixture(scope="session")
def int8_plain(tmp_path_factory, plain_cnn, digits_calib_npz) -> Path:
    """The plain digits CNN as int8 QDQ (no clip)."""
    return quantize_zoo_model(plain_cnn, digits_calib_npz, tmp_path_factory.mktemp("int8") / "plain.int8.onnx")


@pytest.fixture(scope="session")
def int8_residual(tmp_path_factory, residual_cnn, digits_calib_npz) -> Path:
    """The residual digits CNN as int8 QDQ (no clip)."""
    return quantize_zoo_model(residual_cnn, digits_calib_npz, tmp_path_factory.mktemp("int8") / "residual.int8.onnx")


@pytest.fixture()
def torch_one_thread():
    """Two shared cores: one torch intra-op thread for the test (OpenMP threads spin against
    each other). The training tests use it through `pytestmark`."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
