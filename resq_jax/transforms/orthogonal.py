"""Random orthogonal matrices: Haar rotations, block-diagonal rotations inside the low and high
subspaces (ResQ), QuaRot's randomized Hadamard diag(s) H.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from resq_jax.transforms.hadamard import haar_orthogonal, hadamard_matrix

# ----------------------------------------------------------------------------------------
# Random orthogonal rotations and PCA helpers (float64, NumPy)
# ----------------------------------------------------------------------------------------


def check_dim(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def random_orthogonal(n: int, seed: int | Sequence[int]) -> np.ndarray:
    """Haar-random orthogonal matrix [n, n] float64: QR of a standard Gaussian (PCG64 via
    np.random.default_rng(seed)), columns multiplied by sign(diag(R)). Deterministic per seed."""
    n = check_dim("n", n)
    return haar_orthogonal(n, np.random.default_rng(seed))


def _derived_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    state = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint64)
    return [int(s) for s in state]


def block_diag_rotation(n: int, r: int, seed: int | Sequence[int]) -> np.ndarray:
    """blockdiag(R_low [n-r, n-r], R_high [r, r]) float64 [n, n], both Haar-random with
    independent seeds derived from `seed` (SeedSequence(seed).generate_state(2)). Rotates
    inside the low-variance (first n-r) and high-variance (last r) subspaces separately."""
    n = check_dim("n", n)
    r = check_dim("r", r)
    if r > n:
        raise ValueError(f"high-subspace size r={r} must be <= n={n}")
    s_low, s_high = _derived_seeds(seed, 2)
    out = np.zeros((n, n), dtype=np.float64)
    out[: n - r, : n - r] = random_orthogonal(n - r, s_low)
    out[n - r :, n - r :] = random_orthogonal(r, s_high)
    return out


def randomized_hadamard(n: int, seed: int | Sequence[int]) -> np.ndarray:
    """QuaRot's randomized Hadamard ``R = diag(s) @ H``: ``R: [n, n]`` float64, orthogonal, with ``H =
    hadamard_matrix(n)`` and ``s`` random signs from ``np.random.default_rng(seed)``.

    Activations rotate as ``x @ R = (x * s) @ H``: the signs are flipped *before* the mixing, so a
    channel pattern that the plain Hadamard concentrates (a constant vector maps onto one column of a
    Sylvester H) is spread over all channels. Flipping after the mixing (``H @ diag(s)``) would leave
    the concentration in place and only move the signs of the outputs.
    """
    h = hadamard_matrix(n)
    s = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return s[:, None] * h
