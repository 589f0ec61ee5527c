"""Packed mixed-precision activations and the int4/int8 GEMM (docs/algorithms.md, Integer runtime arithmetic).

A ResQ linear ``y = x @ w + bias`` with ``x: [tokens, K]`` and ``w: [K, N]`` is split along K in a
low block (the first ``K - r`` channels / input rows, 4 bits) and a high block (the last ``r``,
8 bits). Activations are quantized per token and asymmetrically, weights per output column and
symmetrically (quantize_mixed / quantize_weight_sym), so with signed
codes (packing.signed_shift: ``q_s = q - 2^(b-1)``, ``z_s = z - 2^(b-1)``)

    y[m, n] = s_x4[m] s_w4[n] (acc4[m, n] - z_x4[m] colsum4[n])
            + s_x8[m] s_w8[n] (acc8[m, n] - z_x8[m] colsum8[n]) + bias[n]

where ``acc4 = X4 @ W4`` and ``acc8 = X8 @ W8`` are int32 products of the signed codes and
``colsum = sum_k W[k, n]`` are the int32 column sums of the integer weights (precomputed once).

Numerics (shared by the jnp reference here and the Triton kernels in ``resq_jax.kernels.triton``):

* quantize_pack: exactly quantize_mixed (float32, IEEE division, round half to even,
  then clip), then the signed shift and int4 packing of packing.py (two per byte along K, low
  nibble = even index).
* mixed_gemm: integer products accumulated in int32 (exact: |acc4| <= 64 K, |acc8| <= 2^14 r);
  the zero-point correction ``c = acc - int32(z) * colsum`` in int32 (z is integer-valued, so
  this is exact); then in float32 ``y = (s_x4 * s_w4) * float(c4)``, ``y = y + (s_x8 * s_w8) *
  float(c8)``, ``y = y + bias``, rounded once to ``out_dtype`` (bfloat16 by default, round to
  nearest even). A GPU kernel may contract the last multiply-adds into FMAs, so outputs agree
  with this reference to float32 rounding, not bit for bit.

Implementations (``impl`` of resq_jax.kernels.mixed_gemm): ``"jnp"`` (this module, pure JAX: what the CPU runtime uses),
``"triton"`` (Triton kernels through ``jax_triton.triton_call``, NVIDIA GPUs), ``"auto"``
(triton when JAX's default backend is a GPU and jax_triton imports, else jnp). Triton and
jax_triton are imported only when the triton path is taken.

Shapes: activations may carry leading batch axes ``[..., K]``; the kernels see them flattened
to ``[tokens, K]``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from resq_jax.formats import packing
from resq_jax.formats.integer import WeightCodes, quantize_mixed
from resq_jax.util.checks import is_int
from resq_jax.util.trees import pytree_dataclass, static_field

_F32 = jnp.float32
_LOW_BITS_PACKED = (2, 3, 4)   # fit the signed int4 nibble [-8, 7] after the shift
_HIGH_BITS_INT8 = tuple(range(2, 9))
_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))




@pytree_dataclass
class PackedActivations:
    """Per-token asymmetric codes of ``x: [..., K]`` on the signed grid, K = 2 * K4p + r.

    q4:     int8 [..., K4p]  low block (first K - r channels), two signed 4-bit codes per byte
    scale4: float32 [...]    per-token scale of the low block
    zero4:  float32 [...]    per-token signed zero point (integer-valued, zero - 2^(low_bits-1))
    q8:     int8 [..., r]    high block (last r channels), signed codes; None when r = 0
    scale8: float32 [...]    None when r = 0
    zero8:  float32 [...]    signed zero point (zero - 2^(high_bits-1)); None when r = 0
    """

    q4: jax.Array
    scale4: jax.Array
    zero4: jax.Array
    q8: jax.Array | None
    scale8: jax.Array | None
    zero8: jax.Array | None
    low_bits: int = static_field(default=4)
    high_bits: int = static_field(default=8)

    @property
    def high(self) -> int:
        return 0 if self.q8 is None else self.q8.shape[-1]

    @property
    def k(self) -> int:
        return 2 * self.q4.shape[-1] + self.high


@pytree_dataclass
class PackedWeights:
    """Symmetric per-output-column codes of ``w: [K, N]``, K = 2 * K4p + r.

    w4:      int8 [K4p, N]  low block (first K - r input rows) packed two per byte along K
    scale4:  float32 [N]
    colsum4: int32 [N]      sum over the K - r rows of the integer codes
    w8:      int8 [r, N]    high block (last r input rows); None when r = 0
    scale8:  float32 [N]    None when r = 0
    colsum8: int32 [N]      None when r = 0
    bias:    float32 [N] or None
    """

    w4: jax.Array
    scale4: jax.Array
    colsum4: jax.Array
    w8: jax.Array | None
    scale8: jax.Array | None
    colsum8: jax.Array | None
    bias: jax.Array | None

    @property
    def high(self) -> int:
        return 0 if self.w8 is None else self.w8.shape[0]

    @property
    def k(self) -> int:
        return 2 * self.w4.shape[0] + self.high

    @property
    def n(self) -> int:
        return self.w4.shape[1]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_mixed_layout(k: int, high: int) -> tuple[int, int]:
    """Validate a K-channel row split in a low block of K - high (int4-packed: even, > 0) and a
    high block of ``high`` channels. Returns (k_low, high)."""
    if not is_int(high) or not 0 <= int(high) < k:
        raise ValueError(f"high (8-bit channels) must be an integer in 0..K-1 = 0..{k - 1} "
                         f"(the low block must not be empty), got {high!r}")
    k_low = k - int(high)
    if k_low % 2:
        raise ValueError(f"the int4 block has K - high = {k} - {high} = {k_low} channels, which is "
                         "odd; int4 packs two per byte: choose high so that K - high is even "
                         "(or pad K with a zero channel)")
    return k_low, int(high)


def check_packed_bits(low_bits, high_bits):
    if low_bits not in _LOW_BITS_PACKED:
        raise ValueError(f"low_bits must be one of {_LOW_BITS_PACKED} (packed int4 storage), "
                         f"got {low_bits!r}")
    if high_bits not in _HIGH_BITS_INT8:
        raise ValueError(f"high_bits must be an integer in 2..8 (int8 storage), got {high_bits!r}")


def check_activations(x):
    if x.ndim == 0:
        raise ValueError("quantize_pack needs x: [..., K] with at least one axis")
    if jnp.dtype(x.dtype) not in _X_DTYPES:
        raise ValueError(f"quantize_pack supports float32 and bfloat16 activations, got {x.dtype}; "
                         "cast with x.astype(jnp.float32)")


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("high", "low_bits", "high_bits"))
def quantize_pack_jnp(x: jax.Array, high: int, low_bits: int = 4,
                      high_bits: int = 8) -> PackedActivations:
    """Reference quantize-and-pack of ``x: [..., K]`` (see the module docstring): codes of
    quantize_mixed(x, low_bits, high_bits, high), signed-shifted, the low block packed."""
    codes = quantize_mixed(x, low_bits, high_bits, high)
    lo = codes.low  # q [..., 1, K - r], scale/zero [..., 1, 1]
    q4, z4 = packing.signed_shift(lo.q[..., 0, :], lo.zero[..., 0, 0], low_bits)
    out = dict(q4=packing.pack_int4(q4, axis=-1), scale4=lo.scale[..., 0, 0], zero4=z4,
               q8=None, scale8=None, zero8=None)
    if high:
        hi = codes.high
        q8, z8 = packing.signed_shift(hi.q[..., 0, :], hi.zero[..., 0, 0], high_bits)
        out.update(q8=q8, scale8=hi.scale[..., 0, 0], zero8=z8)
    return PackedActivations(**out, low_bits=low_bits, high_bits=high_bits)


@jax.jit
def dequantize_packed_activations(px: PackedActivations) -> jax.Array:
    """Float32 ``[..., K]``: ``(q - zero) * scale`` per block (equals dequantize_mixed
    of the unshifted codes)."""
    lo = (packing.unpack_int4(px.q4).astype(_F32) - px.zero4[..., None]) * px.scale4[..., None]
    if px.q8 is None:
        return lo
    hi = (px.q8.astype(_F32) - px.zero8[..., None]) * px.scale8[..., None]
    return jnp.concatenate([lo, hi], axis=-1)


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def _colsum(q):
    return jnp.sum(q.astype(jnp.int32), axis=0)


def pack_weights(codes: WeightCodes, bias: jax.Array | None = None) -> PackedWeights:
    """PackedWeights from ``quantize_weight_sym(w: [K, N], low_bits <= 4, high_bits <=
    8, high_rows=r)`` codes (one scale per output column: group_size=None); ``bias: [N]``."""
    if codes.group_size is not None:
        raise ValueError(f"the packed GEMM takes one weight scale per output column; got "
                         f"group_size={codes.group_size}: quantize with group_size=None")
    check_packed_bits(codes.low_bits, codes.high_bits)
    k = codes.q_low.shape[0] + codes.q_high.shape[0]
    check_mixed_layout(k, codes.q_high.shape[0])
    n = codes.q_low.shape[1]
    if bias is not None:
        bias = jnp.asarray(bias, _F32)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape [N] = ({n},), got {bias.shape}")
    return _pack_weights(codes, bias)


@jax.jit
def _pack_weights(codes: WeightCodes, bias: jax.Array | None) -> PackedWeights:
    q_low, q_high = codes.q_low, codes.q_high
    out = dict(w4=packing.pack_int4(q_low, axis=0), scale4=codes.scale_low[0].astype(_F32),
               colsum4=_colsum(q_low), w8=None, scale8=None, colsum8=None, bias=bias)
    if q_high.shape[0]:
        out.update(w8=q_high.astype(jnp.int8), scale8=codes.scale_high[0].astype(_F32),
                   colsum8=_colsum(q_high))
    return PackedWeights(**out)


@jax.jit
def dequantize_packed_weights(pw: PackedWeights) -> jax.Array:
    """Float32 ``[K, N]``: codes times the per-column scale, per block."""
    lo = packing.unpack_int4(pw.w4, axis=0).astype(_F32) * pw.scale4
    if pw.w8 is None:
        return lo
    return jnp.concatenate([lo, pw.w8.astype(_F32) * pw.scale8], axis=0)


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------
def check_operands(px: PackedActivations, pw: PackedWeights):
    if px.q4.shape[-1] != pw.w4.shape[0] or px.high != pw.high:
        raise ValueError(
            f"activations and weights disagree on the K split: activations have K - r = "
            f"{2 * px.q4.shape[-1]} int4 + r = {px.high} int8 channels, weights {2 * pw.w4.shape[0]} "
            f"+ {pw.high} rows; quantize both with the same high (r)")


def int_dot(a: jax.Array, b: jax.Array, f32_rows: int | None = None) -> jax.Array:
    """a: int8 [M, n] @ b: int8 [n, N] -> int32 [M, N]. f32_rows None: XLA's integer dot (int32
    accumulation); else float32 dots over chunks of ``f32_rows`` rows, each exact
    (exact_f32_rows), converted to int32 and summed: the same integers."""
    dims = (((1,), (0,)), ((), ()))
    if f32_rows is None:
        return lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
    acc = None
    for s in range(0, a.shape[-1], f32_rows):
        part = lax.dot_general(a[:, s:s + f32_rows].astype(_F32), b[s:s + f32_rows].astype(_F32), dims,
                               preferred_element_type=_F32).astype(jnp.int32)
        acc = part if acc is None else acc + part
    return acc


@jax.jit
def int_accumulators(px: PackedActivations, pw: PackedWeights):
    """Integer products ``(acc4 [tokens, N], acc8 [tokens, N] or None)`` in int32 of the signed
    codes (activations flattened to [tokens, K]); no zero-point correction."""
    check_operands(px, pw)
    x4 = packing.unpack_int4(px.q4.reshape(-1, px.q4.shape[-1]), axis=-1)
    acc4 = int_dot(x4, packing.unpack_int4(pw.w4, axis=0))
    if pw.w8 is None:
        return acc4, None
    return acc4, int_dot(px.q8.reshape(-1, px.q8.shape[-1]), pw.w8)


def _block_term(acc, zero, colsum, s_x, s_w):
    """(s_x[m] * s_w[n]) * float32(acc - int32(zero[m]) * colsum[n]); acc: int32 [M, N]."""
    corr = acc - zero.astype(jnp.int32)[:, None] * colsum[None, :]
    return (s_x[:, None] * s_w[None, :]) * corr.astype(_F32)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def mixed_gemm_jnp(px: PackedActivations, pw: PackedWeights, out_dtype=jnp.bfloat16) -> jax.Array:
    """Reference mixed GEMM (module docstring): ``[..., K] x [K, N] -> [..., N]`` in out_dtype."""
    lead = px.q4.shape[:-1]
    acc4, acc8 = int_accumulators(px, pw)
    y = _block_term(acc4, px.zero4.reshape(-1), pw.colsum4, px.scale4.reshape(-1), pw.scale4)
    if acc8 is not None:
        y = y + _block_term(acc8, px.zero8.reshape(-1), pw.colsum8, px.scale8.reshape(-1),
                            pw.scale8)
    if pw.bias is not None:
        y = y + pw.bias[None, :]
    return y.astype(out_dtype).reshape(*lead, pw.n)
