"""Fast Hadamard transforms of size K * 2^m: the butterfly (fast Walsh-Hadamard transform) over
the 2^m factor and a dense K x K matrix, in jnp (the reference the FFI kernel matches) and NumPy float64.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from resq_jax.transforms.hadamard import HadamardSizeError, hadamard_factor
from resq_jax.util.precision import EXACT

# ----------------------------------------------------------------------------------------
# Fast transforms
# ----------------------------------------------------------------------------------------


def _compute_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _fwht_last(x: jax.Array) -> jax.Array:
    """Unnormalized Sylvester transform on the last (power-of-two) axis: log2(n) butterflies."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(lead + (n // (2 * h), 2, h))
        a = y[..., 0, :]
        b = y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
        h *= 2
    return x


@functools.partial(jax.jit, static_argnames=("axis",))
def fwht(x: jax.Array, axis: int = -1) -> jax.Array:
    """Unnormalized fast Walsh-Hadamard transform (Sylvester, natural order) along `axis`,
    whose length must be a power of two: y = x @ sylvester(n) (symmetric). O(n log n) with
    reshape/add/sub stages, no matmul. Computes in float32 (float64 for float64 input) and
    returns the input's floating dtype (float32 for integer input)."""
    x = jnp.asarray(x)
    n = x.shape[axis]
    if n < 1 or n & (n - 1):
        raise HadamardSizeError(f"fwht needs a power-of-two axis length, got {n} (axis {axis} of shape {x.shape})")
    cdt = _compute_dtype(x.dtype)
    out_dt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else cdt
    y = jnp.moveaxis(x.astype(cdt), axis, -1)
    y = _fwht_last(y)
    return jnp.moveaxis(y, -1, axis).astype(out_dt)


@functools.partial(jax.jit, static_argnames=("n", "transpose"))
def hadamard_transform(x: jax.Array, n: int | None = None, transpose: bool = False) -> jax.Array:
    """Normalized Hadamard transform along the last axis.

    x: [..., n]. Returns y: [..., n] with
      transpose=False: y = x @ hadamard_matrix(n).T   (y_i = sum_j H[i, j] x_j, i.e. H x)
      transpose=True:  y = x @ hadamard_matrix(n)     (H^T x, the inverse)
    Steps (the numerics native kernels must match): K, H_K, m = hadamard_factor(n);
    z = fwht(x.reshape(..., K, 2^m)) in the compute dtype (float32, or float64 for float64
    input); y[..., k, :] = sum_j H_K[k, j] z[..., j, :] (H_K^T if transpose), H_K cast to the
    compute dtype, precision HIGHEST; y *= 1/sqrt(n); cast back to x.dtype.
    Jitted (n, transpose static); works under jit / vmap / grad (n is taken from the shape).
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise HadamardSizeError("hadamard_transform needs at least one axis (x: [..., n])")
    if n is None:
        n = x.shape[-1]
    elif n != x.shape[-1]:
        raise HadamardSizeError(f"n={n} does not match the last axis of x (shape {x.shape}); pass n=None")
    k, hk, m = hadamard_factor(n)
    cdt = _compute_dtype(x.dtype)
    out_dt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else cdt
    lead = x.shape[:-1]
    z = _fwht_last(x.astype(cdt).reshape(lead + (k, 1 << m)))
    if k > 1:
        hmat = jnp.asarray(hk.T if transpose else hk, dtype=cdt)
        z = jnp.einsum("kj,...jm->...km", hmat, z, precision=EXACT)
    y = z.reshape(lead + (n,)) * jnp.asarray(1.0 / math.sqrt(n), dtype=cdt)
    return y.astype(out_dt)


def hadamard_transform_np(x: np.ndarray, transpose: bool = False) -> np.ndarray:
    """NumPy float64 twin of :func:`hadamard_transform` on the last axis (for weight fusion in
    float64 without building the dense n x n matrix): x: [..., n] -> [..., n] float64."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    k, hk, m = hadamard_factor(n)
    lead = x.shape[:-1]
    big = 1 << m
    z = x.reshape(lead + (k, big)).copy()
    h = 1
    while h < big:
        y = z.reshape(lead + (k, big // (2 * h), 2, h))
        a = y[..., 0, :].copy()
        b = y[..., 1, :]
        y[..., 0, :] += b
        y[..., 1, :] = a - b
        h *= 2
    if k > 1:
        z = np.einsum("kj,...jm->...km", hk.T if transpose else hk, z)
    return z.reshape(lead + (n,)) / math.sqrt(n)
