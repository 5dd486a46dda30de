"""A layer's d x d second moments kept as the n < d rows they were summed from.

Sequential FAQ needs, per wide layer, H = E[x x^T] and C = E[r x^T] (harden.layer_stats). When
fewer rows were picked than the layer is wide (a 4608-wide ResNet-50 layer keeps 455), both are
of rank n: scale * (sqrt(w) x)^T (sqrt(w) x) with n x d factors of 17 MB, against 170 MB per
dense matrix and as much again for each copy numpy's solve makes. What compensation does with
them needs no dense matrix:

- a diagonal block (the error feedback's blocks of 256 columns): from the block's columns;
- m @ M (the sign choice's costs, T C): (m @ L^T) @ R;
- b (H + D)^-1 for a diagonal D (absorbing_targets' ridge): the Woodbury identity
  D^-1 - D^-1 L^T (I / scale + R D^-1 L^T)^-1 R D^-1, an n x n solve instead of a d x d one.

These are exact; results differ from the dense products only in float64 rounding. The classes
set `__array_ufunc__ = None` so that `ndarray @ LowRank` reaches `__rmatmul__`.
"""

from __future__ import annotations

import numpy as np


class LowRank:
    """One d x d matrix scale * left^T @ right, with left and right (n, d) float64."""

    __array_ufunc__ = None

    def __init__(self, left: np.ndarray, right: np.ndarray, scale: float = 1.0) -> None:
        self.left, self.right, self.scale = left, right, float(scale)

    @property
    def shape(self) -> tuple[int, int]:
        d = self.right.shape[1]
        return (d, d)

    def diagonal(self) -> np.ndarray:
        return self.scale * np.einsum("nd,nd->d", self.left, self.right)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """A dense block, e.g. m[cols, cols] for a slice of columns."""
        rows, cols = key
        return self.scale * (self.left[:, rows].T @ self.right[:, cols])

    def __rmatmul__(self, m: np.ndarray) -> np.ndarray:
        return self.scale * ((m @ self.left.T) @ self.right)

    def __truediv__(self, value: float) -> "LowRank":
        return LowRank(self.left, self.right, self.scale / value)

    def __itruediv__(self, value: float) -> "LowRank":
        self.scale /= value
        return self

    def solve_right(self, b: np.ndarray, diag: np.ndarray) -> np.ndarray:
        """b @ (M + diag(diag))^-1 by the Woodbury identity (diag > 0)."""
        bd = b / diag
        inner = np.eye(self.left.shape[0]) / self.scale + (self.right / diag) @ self.left.T
        z = np.linalg.solve(inner.T, (bd @ self.left.T).T).T
        return bd - z @ (self.right / diag)


class LowRankGroups:
    """A (groups, d, d) stack of LowRank matrices sharing one scale: what LayerStats holds for
    sum_xx or sum_rx when its rows were never multiplied out."""

    __array_ufunc__ = None

    def __init__(self, left: np.ndarray, right: np.ndarray, scale: float = 1.0) -> None:
        self.left, self.right, self.scale = left, right, float(scale)  # (groups, n, d) each

    def __len__(self) -> int:
        return self.left.shape[0]

    def __getitem__(self, g: int) -> LowRank:
        return LowRank(self.left[g], self.right[g], self.scale)

    def __truediv__(self, value: float) -> "LowRankGroups":
        return LowRankGroups(self.left, self.right, self.scale / value)

    def __itruediv__(self, value: float) -> "LowRankGroups":
        self.scale /= value
        return self
