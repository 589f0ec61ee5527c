"""MXINT block formats (LQER's weights and activations): a shared power-of-two exponent per block
of 16 values along an axis and signed integer mantissas (docs/algorithms.md, MXINT).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from resq_jax.formats.bits import check_positive_int
from resq_jax.util.checks import is_int
from resq_jax.util.trees import pytree_dataclass, static_field

_F32 = jnp.float32


MXINT_WIDTHS = (4, 6, 8)


# ----------------------------------------------------------------------------------------------
# 5. MXINT block floating point (docs/algorithms.md, MXINT)
# ----------------------------------------------------------------------------------------------
@pytree_dataclass
class MXCodes:
    """MXINT codes of ``x`` along ``axis`` in blocks of ``block``.

    q:        int8, shape of x: sign(x) * q with q in [0, 2^(width-1) - 1]
    exponent: int32, shape of x with ``axis`` of size n // block: the shared exponent e in
              [-127, 128]; value = q * 2^(e - (width - 1)).
    """

    q: jax.Array
    exponent: jax.Array
    width: int = static_field()
    block: int = static_field()
    axis: int = static_field()


def _check_mxint(x, width, block, axis):
    if not is_int(width) or int(width) not in MXINT_WIDTHS:
        raise ValueError(f"MXINT width must be one of {MXINT_WIDTHS} (bits per element including "
                         f"the sign), got {width!r}")
    block = check_positive_int(block, "MXINT block")
    if not is_int(axis) or not -x.ndim <= int(axis) < x.ndim:
        raise ValueError(f"axis {axis!r} is out of range for an array of shape {x.shape}")
    axis = int(axis) % x.ndim
    n = x.shape[axis]
    if n == 0 or n % block:
        raise ValueError(f"MXINT needs the size of axis {axis} ({n}) to be a positive multiple of "
                         f"the block size {block}; pad the tensor or use a block that divides it")
    return int(width), block, axis


def _ceil_log2(m):
    """Exact ceil(log2(m)) for positive normal float32 m (frexp: m = f * 2^k, f in [0.5, 1))."""
    f, k = jnp.frexp(m)
    return jnp.where(f == 0.5, k - 1, k).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("width", "block", "axis"))
def quantize_mxint(x: jax.Array, width: int, block: int = 16, axis: int = -1) -> MXCodes:
    """MXINT codes of ``x`` in blocks of ``block`` along ``axis`` (the contraction axis: -1 for
    activations ``[tokens, d]``, 0 for weights ``[d_in, d_out]``).

    m = max|x| in the block; an all-zero block borrows the smallest non-zero block max of the
    tensor (an all-zero tensor uses 1); e = clip(ceil(log2 m), -127, 128);
    q = clip(round(|x| * 2^(w-1) / 2^e), 0, 2^(w-1) - 1) (half to even). Exact zeros stay zero.
    Not idempotent in general: a block whose max rounds down to exactly 2^(e-1) gets e-1 when
    quantized again. float32 subnormals are outside the supported range (XLA on CPU flushes them).
    """
    width, block, axis = _check_mxint(x, width, block, axis)
    xf = jnp.moveaxis(x.astype(_F32), axis, -1)
    xb = xf.reshape(*xf.shape[:-1], xf.shape[-1] // block, block)
    ax = jnp.abs(xb)
    m = jnp.max(ax, axis=-1, keepdims=True)  # [..., nb, 1]
    smallest = jnp.min(jnp.where(m > 0.0, m, jnp.inf))
    borrow = jnp.where(jnp.isfinite(smallest), smallest, _F32(1.0))
    m = jnp.where(m > 0.0, m, borrow)
    e = jnp.clip(_ceil_log2(m), -127, 128)
    qmax = float(2 ** (width - 1) - 1)
    mag = jnp.clip(jnp.round(jnp.ldexp(ax, (width - 1) - e)), 0.0, qmax)
    q = (jnp.sign(xb) * mag).astype(jnp.int8).reshape(xf.shape)
    return MXCodes(q=jnp.moveaxis(q, -1, axis), exponent=jnp.moveaxis(e[..., 0], -1, axis),
                   width=width, block=block, axis=axis)


@jax.jit
def dequantize_mxint(codes: MXCodes) -> jax.Array:
    """Float32 values ``q * 2^(e - (width - 1))``, shape of ``codes.q``."""
    e = jnp.repeat(codes.exponent, codes.block, axis=codes.axis)
    return jnp.ldexp(codes.q.astype(_F32), e - (codes.width - 1))


@functools.partial(jax.jit, static_argnames=("width", "block", "axis"))
def fake_quant_mxint(x: jax.Array, width: int, block: int = 16, axis: int = -1) -> jax.Array:
    """dequantize_mxint(quantize_mxint(x, ...)) returned in x's dtype."""
    return dequantize_mxint(quantize_mxint(x, width, block, axis)).astype(x.dtype)
