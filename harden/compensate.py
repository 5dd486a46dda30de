"""Post-training compensation of FAQ's residual error with calibration statistics.

FAQ alone leaves the error of words it cannot fix (a stuck sign bit can leave an error as large
as the weight). Beyond the paper (issue 2), we let the healthy weights of the same output row
absorb that error, the optimal-brain-surgeon / GPTQ update with H = E[x x^T]:

    F      = faulty weights whose FAQ residual exceeds half a step
    delta  = Hinv[:, F] @ solve(Hinv[F, F], residual[F])       (residual = read-back - target)
    w     <- w + delta

which lands every weight in F exactly on its read-back value and moves the rest of the row to
minimise the output error. FAQ then runs again on the moved row, and bias correction removes
what is left of the mean output error. Work is in code units (a row's scale cancels out).

Cost (our decision): the solve is cubic in |F|, about 15 % of a row at rate 0.04, so on wide
layers (a ResNet-50 3x3 conv has rows of 4608) the joint solve took minutes. Rows wider than
`BLOCK` columns are therefore split into equal blocks of at most `BLOCK` columns, each compensated within
itself with its own block of H (a block-diagonal H, as GPTQ's lazy batches also work block by
block): the error of a faulty weight is absorbed by the healthy weights near it in the row.
Layers no wider than `BLOCK` get the exact joint update. On the residual digits CNN at rate 0.15
(3 chips) blocks of 128 recovered 88.6 % against 89.5 % for the exact update.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .faq_table import FAQTable, faq_remap
from .faultmap import read_back
from .lowrank import LowRank

DAMPENING = 0.01  # fraction of mean(diag(H)) added to the diagonal, as GPTQ does
#: absorbing_targets' pull towards the layer's own targets, as a fraction of mean(diag(H)).
#: Measured on the ViT / BERT digits models at stuck-at 0.04 (3 chips, held-out data): 0.001
#: recovered 95 / 88 %, 0.01 98 / 94 %, 0.1 97 / 97 %, 0.3 95 / 98 % (docs/results.md).
ABSORB_DAMPENING = 0.1
BLOCK = 256  # columns compensated jointly; wider rows are split (see the module docstring)
_CHUNK_BYTES = 64 << 20


def _one_blas_thread():
    """Limit BLAS to one thread when threadpoolctl is installed (it is no core dependency)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def inverse_hessian(h: np.ndarray, dampening: float = DAMPENING) -> np.ndarray:
    """(H + damp I)^-1 with dead inputs (zero variance) made harmless."""
    h = h.copy()
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    damp = dampening * float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp
    try:
        c = np.linalg.cholesky(h)
        ci = np.linalg.inv(c)
        return ci.T @ ci
    except np.linalg.LinAlgError:
        return np.linalg.pinv(h)


def error_feedback(
    targets: np.ndarray,
    sa0: np.ndarray,
    sa1: np.ndarray,
    hinv: np.ndarray,
    table: FAQTable,
) -> tuple[np.ndarray, np.ndarray]:
    """Move each row (targets: rows x d, code units) so its unfixable faulty weights are absorbed.

    Returns the moved targets and the number of weights forced per row. Rows are solved in
    batches padded to the same |F| (np.linalg.solve is batched), so there is no Python loop
    over weights and only one over chunks of rows.
    """
    faulty = (sa0 | sa1) != 0
    codes = faq_remap(targets.ravel(), sa0.ravel(), sa1.ravel(), table).reshape(targets.shape)
    residual = np.where(faulty, read_back(codes, sa0, sa1).astype(np.float64) - targets, 0.0)
    force = faulty & (np.abs(residual) > 0.5)
    counts = force.sum(axis=1)
    moved = targets.astype(np.float64).copy()
    rows = np.flatnonzero(counts)
    if rows.size == 0:
        return moved, counts
    rows = rows[np.argsort(counts[rows], kind="stable")]
    d = targets.shape[1]

    def chunk_rows(k: int) -> int:
        return max(1, _CHUNK_BYTES // (8 * max(k * k + k * d, 1)))

    start = 0
    while start < rows.size:
        end = min(rows.size, start + chunk_rows(int(counts[rows[start]])))
        end = min(end, start + chunk_rows(int(counts[rows[end - 1]])))
        chunk = rows[start:end]
        _solve_chunk(moved, residual, force, hinv, chunk, int(counts[chunk[-1]]))
        start = end
    return moved, counts


def _solve_chunk(moved, residual, force, hinv, chunk, kmax) -> None:
    """delta_r = Hinv[:, F_r] @ solve(Hinv[F_r, F_r], residual[r, F_r]) for a chunk of rows."""
    for_rows = force[chunk]
    # positions of the forced weights per row, left-aligned (argsort puts True first).
    order = np.argsort(~for_rows, axis=1, kind="stable")[:, :kmax]
    mask = np.take_along_axis(for_rows, order, axis=1)
    idx = np.where(mask, order, 0)
    a = hinv[idx[:, :, None], idx[:, None, :]]
    eye = np.eye(kmax, dtype=bool)[None]
    both = mask[:, :, None] & mask[:, None, :]
    a = np.where(both, a, np.where(eye, 1.0, 0.0))
    rhs = np.where(mask, np.take_along_axis(residual[chunk], idx, axis=1), 0.0)
    sol = np.linalg.solve(a, rhs[..., None])[..., 0]
    moved[chunk] += np.einsum("rkd,rk->rd", hinv[idx], sol, optimize=True)


def bias_delta(
    targets: np.ndarray, codes: np.ndarray, mean_x: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Per-row float bias shift that cancels the mean output error of the stored weights.

    sum_i (w_i - w_hat_i) E[x_i], with w = targets * scale and w_hat = read-back code * scale.
    """
    err = (targets - codes.astype(np.float64)) * scale.reshape(-1, 1)
    return err @ mean_x


def remap_rows(
    targets: np.ndarray,
    sa0: np.ndarray,
    sa1: np.ndarray,
    table: FAQTable,
    hessian: np.ndarray | LowRank | None,
    block: int = BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """FAQ codes for one group of rows, with error feedback when the input `hessian` is given,
    and the number of weights the feedback forced per row."""
    forced = np.zeros(targets.shape[0], np.int64)
    if hessian is not None:
        moved = np.empty(targets.shape, np.float64)
        d = targets.shape[1]
        with _one_blas_thread():  # many small solves: threads only contend (bench/README.md)
            for cols in np.array_split(np.arange(d), -(-d // block)):  # equal blocks of <= block
                cols = slice(int(cols[0]), int(cols[-1]) + 1)
                hinv = inverse_hessian(hessian[cols, cols])
                moved[:, cols], f = error_feedback(targets[:, cols], sa0[:, cols], sa1[:, cols], hinv, table)
                forced += f
        targets = moved
    codes = faq_remap(targets.ravel(), sa0.ravel(), sa1.ravel(), table).reshape(targets.shape)
    return codes, forced


def absorbing_targets(targets: np.ndarray, hessian: np.ndarray | LowRank, cross: np.ndarray | LowRank,
                      dampening: float | None = None) -> np.ndarray:
    """Targets (rows x d, code units) that map this layer's actual input x onto what the
    reference input r gave, regularised towards the targets themselves:

        argmin_T' E||T r - T' x||^2 + damp ||T' - T||^2 = T (E[r x^T] + damp I) (E[x x^T] + damp I)^-1

    so that T' = T exactly when x = r (a ridge towards zero would shrink every weight along the
    input's weak directions). With x the input after the layers already hardened and r the plain
    int8 model's, a layer absorbs the error its predecessors left, as GPTQ's sequential mode does.
    """
    if isinstance(hessian, LowRank):  # n < d picked rows: an n x n solve (harden.lowrank)
        h_diag = hessian.diagonal()
        damp = (ABSORB_DAMPENING if dampening is None else dampening) * float(np.mean(h_diag))
        if damp <= 0:
            return targets
        return hessian.solve_right(targets @ cross + damp * targets, damp + np.where(h_diag <= 0, 1.0, 0.0))
    diag = np.diag_indices_from(hessian)
    h_diag, c_diag = hessian[diag].copy(), cross[diag].copy()
    dead = h_diag <= 0
    damp = (ABSORB_DAMPENING if dampening is None else dampening) * float(np.mean(h_diag))
    if damp <= 0:
        return targets
    # The dampening goes onto the diagonals in place and comes off by restoring them: on a
    # 4608-wide layer (ResNet-50) a copy of each matrix is 170 MB of the pass's peak memory.
    try:
        cross[diag] = c_diag + damp
        hessian[diag] = h_diag + damp + np.where(dead, 1.0, 0.0)
        return np.linalg.solve(hessian.T, (targets @ cross).T).T
    finally:
        hessian[diag], cross[diag] = h_diag, c_diag
