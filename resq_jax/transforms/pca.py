"""PCA bases from covariance matrices (float64 eigendecomposition) and the size of the
high-variance subspace.
"""
from __future__ import annotations

import math

import numpy as np

from resq_jax.transforms.orthogonal import check_dim


def damped_eigh(h: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a damped second-moment matrix, float64.

    h: [d, d]. Symmetrizes (h + h^T)/2, adds damp * mean(diag) * I, returns
    (eigvals [d] ascending, eigvecs [d, d] columns) so the LAST r columns span the
    high-variance subspace and eigvecs @ diag(eigvals) @ eigvecs.T == the damped matrix.
    """
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"damped_eigh needs a square [d, d] matrix, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("damped_eigh: matrix has NaN/inf entries (check the calibration statistics)")
    if not (isinstance(damp, (int, float, np.floating)) and damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"damp must be a finite float >= 0, got {damp!r}")
    sym = 0.5 * (h + h.T)
    d = sym.shape[0]
    if d:
        sym = sym + float(damp) * float(np.mean(np.diag(sym))) * np.eye(d)
    w, v = np.linalg.eigh(sym)
    return w, v


def high_rank(d: int, fraction: float) -> int:
    """Size of the high-precision subspace: int(fraction * d), fraction in [0, 1)."""
    d = check_dim("d", d)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
        raise ValueError(f"fraction must be a float in [0, 1), got {fraction!r}")
    if not (0.0 <= float(fraction) < 1.0):
        raise ValueError(f"fraction must be in [0, 1) (e.g. 0.125 for 1/8 of channels), got {fraction}")
    return int(float(fraction) * d)
