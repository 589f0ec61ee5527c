"""Packed integer storage (docs/formats.md, Int4 packing; docs/algorithms.md, Integer runtime arithmetic).

int4 values are stored two per byte along one axis (the contraction axis of the product they
enter): byte j holds element 2j in its low nibble and element 2j+1 in its high nibble, each
as a 4-bit two's complement number in [-8, 7]. int8 values are stored as they are.

Asymmetric activation codes (unsigned, [0, 2^b - 1]) are shifted to the signed range before
packing: ``s = q - 2^(b-1)`` (the zero point shifts by the same amount), so every packed
operand is signed and one integer dot serves weights and activations.

Functions are pure ``jnp`` (jit-able, any leading batch shape) with a NumPy twin for
checkpoint writing; both define the format the Triton kernels read.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pack_int4", "unpack_int4", "pack_int4_np", "unpack_int4_np", "signed_shift",
           "INT4_MIN", "INT4_MAX"]

INT4_MIN, INT4_MAX = -8, 7


def _check_even(n: int, axis: int):
    if n % 2:
        raise ValueError(f"int4 packing needs an even length along axis {axis}, got {n}; pad the "
                         "axis (for example with zero codes) to a multiple of 2")


def pack_int4(q: jax.Array, axis: int = -1) -> jax.Array:
    """q: int [..., n, ...] with values in [-8, 7] -> int8 [..., n // 2, ...] along ``axis``.

    Element 2j goes to the low nibble and 2j+1 to the high nibble of byte j. Values outside
    [-8, 7] wrap (the caller's quantizer guarantees the range)."""
    axis = axis % q.ndim
    _check_even(q.shape[axis], axis)
    q = jnp.moveaxis(q.astype(jnp.int32), axis, -1)
    pairs = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    byte = (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)
    byte = jnp.where(byte > 127, byte - 256, byte).astype(jnp.int8)
    return jnp.moveaxis(byte, -1, axis)


def unpack_int4(p: jax.Array, axis: int = -1) -> jax.Array:
    """Inverse of ``pack_int4``: int8 [..., m, ...] -> int8 [..., 2m, ...] in [-8, 7]."""
    axis = axis % p.ndim
    b = jnp.moveaxis(p.astype(jnp.int32), axis, -1)
    lo = ((b & 0xF) ^ 8) - 8  # sign-extend the low nibble
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    out = jnp.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2).astype(jnp.int8)
    return jnp.moveaxis(out, -1, axis)


def pack_int4_np(q: np.ndarray, axis: int = -1) -> np.ndarray:
    """NumPy twin of ``pack_int4`` (checks the range instead of wrapping)."""
    q = np.asarray(q)
    axis = axis % q.ndim
    _check_even(q.shape[axis], axis)
    if q.size and (q.min() < INT4_MIN or q.max() > INT4_MAX):
        raise ValueError(f"int4 codes must lie in [{INT4_MIN}, {INT4_MAX}], got [{q.min()}, {q.max()}]")
    q = np.moveaxis(q.astype(np.int32), axis, -1)
    pairs = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    byte = ((pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)).astype(np.uint8).view(np.int8)
    return np.ascontiguousarray(np.moveaxis(byte, -1, axis))


def unpack_int4_np(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """NumPy twin of ``unpack_int4``."""
    p = np.asarray(p)
    axis = axis % p.ndim
    b = np.moveaxis(p.astype(np.int32), axis, -1)
    lo = ((b & 0xF) ^ 8) - 8
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    out = np.stack([lo, hi], axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2).astype(np.int8)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def signed_shift(q: jax.Array, zero: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """Unsigned asymmetric codes q in [0, 2^b - 1] with zero point ``zero`` -> (int8 q - 2^(b-1),
    float32 zero - 2^(b-1)): the same values ``(q - zero) * scale`` on a signed grid."""
    off = 1 << (bits - 1)
    return (q.astype(jnp.int32) - off).astype(jnp.int8), zero.astype(jnp.float32) - off
