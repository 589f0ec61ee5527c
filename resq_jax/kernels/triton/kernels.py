"""Triton kernels: quantize-and-pack of activations and the int4/int8 mixed GEMM.

Imports triton at module import: load this module only on the triton path (GPU launchers in
``jax_ops``, the interpreter checks and the ahead-of-time compile in tests/support/triton: ``selfcheck`` / ``aot``).
The numerics are those of ``resq_jax.kernels.gemm_reference`` (its docstring); the formats those of
``resq_jax.formats.packing`` (int4 two per byte along K, low nibble = even index, two's complement).

Kernel parameter order is (input pointers, runtime scalars, output pointers, constexprs), the
order ``jax_triton.triton_call`` passes them in (outputs after the positional inputs).

Float details that make the codes identical to formats.integer.quantize_mixed:

* division: ``tl.math.div_rn`` (IEEE round-to-nearest ``div.rn.f32``); Triton's ``/`` on float32
  lowers to the approximate ``div.full.f32``;
* rounding: round half to even by the float32 magic-number trick ``(v + 1.5*2^23) - 1.5*2^23``,
  exact for |v| < 2^22 (here |v| <= 2^8: codes and zero points; ``|x / scale| <= 2^b - 1``),
  with IEEE round-to-nearest-even additions. It is plain arithmetic, so the same source runs
  under Triton's interpreter (libdevice ``rint`` has no interpreter implementation); LLVM keeps
  both additions (no reassociation without fast-math; checked in the PTX by the tests);
* min/max of a row start from 0 (xmin = min(min(x), 0)), so masked lanes loaded as 0 are neutral.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["quantize_pack_kernel", "mixed_gemm_kernel", "int_acc_kernel"]

_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def _rint(v):
    """Round half to even of float32 v with |v| < 2^22."""
    return (v + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _row_min_max(x_ptr, rows, row_mask, K, col0, n_cols, BLOCK_C: tl.constexpr):
    """min(min(x), 0) and max(max(x), 0) of x[rows, col0 : col0 + n_cols] (float32 [BLOCK_M])."""
    mn = tl.zeros([rows.shape[0]], dtype=tl.float32)
    mx = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        ptrs = x_ptr + rows[:, None].to(tl.int64) * K + col0 + cols[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, tl.min(x, axis=1))
        mx = tl.maximum(mx, tl.max(x, axis=1))
    return mn, mx


@triton.jit
def _scale_zero(mn, mx, MAXQ: tl.constexpr):
    """Asymmetric per-row scale and (unsigned) zero point from the clipped range."""
    empty = (mn == 0.0) & (mx == 0.0)
    mn = tl.where(empty, -1.0, mn)
    mx = tl.where(empty, 1.0, mx)
    scale = tl.math.div_rn(mx - mn, tl.full(mn.shape, MAXQ, tl.float32))
    zero = _rint(tl.math.div_rn(-mn, scale))
    return scale, zero


@triton.jit
def _codes(x, scale, zero, MAXQ: tl.constexpr, OFFSET: tl.constexpr):
    """Signed int32 codes clip(rint(x / scale) + zero, 0, MAXQ) - OFFSET; x: [BM, C], scale/zero: [BM]."""
    s = tl.broadcast_to(scale[:, None], x.shape)
    q = _rint(tl.math.div_rn(x, s)) + zero[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), MAXQ)
    return q.to(tl.int32) - OFFSET


@triton.jit
def quantize_pack_kernel(
        x_ptr,                                  # float32/bfloat16 [M, K], row-major
        M, K, R,                                # tokens, channels, high-block channels (r)
        q4_ptr, s4_ptr, z4_ptr,                 # int8 [M, (K - R) / 2], float32 [M], float32 [M]
        q8_ptr, s8_ptr, z8_ptr,                 # int8 [M, R], float32 [M], float32 [M] (R > 0)
        LOW_BITS: tl.constexpr, HIGH_BITS: tl.constexpr, HAS_HIGH: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program quantizes BLOCK_M rows: a sweep over the row for the range, a second sweep for
    the codes (the re-read mostly hits L1/L2). Low block packed two per byte, BLOCK_P bytes a step."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_base = rows[:, None].to(tl.int64) * K
    k_low = K - R
    n_bytes = k_low // 2
    maxq4: tl.constexpr = (1 << LOW_BITS) - 1
    off4: tl.constexpr = 1 << (LOW_BITS - 1)

    mn, mx = _row_min_max(x_ptr, rows, row_mask, K, 0, k_low, 2 * BLOCK_P)
    scale, zero = _scale_zero(mn, mx, maxq4)
    for p0 in range(0, n_bytes, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = row_mask[:, None] & (p < n_bytes)[None, :]
        x_even = tl.load(x_ptr + row_base + 2 * p[None, :], mask=mask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + row_base + 2 * p[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        lo = _codes(x_even, scale, zero, maxq4, off4)
        hi = _codes(x_odd, scale, zero, maxq4, off4)
        byte = (lo & 15) | ((hi & 15) << 4)  # 0..255; the int8 cast wraps to two's complement
        out = q4_ptr + rows[:, None].to(tl.int64) * n_bytes + p[None, :]
        tl.store(out, byte.to(tl.int8), mask=mask)
    tl.store(s4_ptr + rows, scale, mask=row_mask)
    tl.store(z4_ptr + rows, zero - off4, mask=row_mask)

    if HAS_HIGH:
        maxq8: tl.constexpr = (1 << HIGH_BITS) - 1
        off8: tl.constexpr = 1 << (HIGH_BITS - 1)
        mn8, mx8 = _row_min_max(x_ptr, rows, row_mask, K, k_low, R, BLOCK_R)
        scale8, zero8 = _scale_zero(mn8, mx8, maxq8)
        for c0 in range(0, R, BLOCK_R):
            c = c0 + tl.arange(0, BLOCK_R)
            mask = row_mask[:, None] & (c < R)[None, :]
            x = tl.load(x_ptr + row_base + k_low + c[None, :], mask=mask, other=0.0).to(tl.float32)
            q = _codes(x, scale8, zero8, maxq8, off8)
            tl.store(q8_ptr + rows[:, None].to(tl.int64) * R + c[None, :], q.to(tl.int8), mask=mask)
        tl.store(s8_ptr + rows, scale8, mask=row_mask)
        tl.store(z8_ptr + rows, zero8 - off8, mask=row_mask)


@triton.jit
def _nibbles(b):
    """int8 bytes -> (low, high) nibbles sign-extended, as int8 (same shape)."""
    v = b.to(tl.int32)
    lo = ((v & 15) ^ 8) - 8
    hi = (((v >> 4) & 15) ^ 8) - 8
    return lo.to(tl.int8), hi.to(tl.int8)


@triton.jit
def _accumulate(x4_ptr, w4_ptr, x8_ptr, w8_ptr, M, N, KP, R, rows, cols,
                HAS_HIGH: tl.constexpr, BLOCK_KP: tl.constexpr, BLOCK_R: tl.constexpr):
    """int32 tiles acc4 = X4 @ W4 (unpacked) and acc8 = X8 @ W8 for rows x cols.

    Packed byte j of a row of X4 holds k = 2j (low nibble) and 2j + 1 (high), and so does byte row
    j of W4, so acc4 = lo(X4) @ lo(W4) + hi(X4) @ hi(W4): no interleaving needed. Masked bytes
    load as 0 = two zero codes."""
    rmask = rows < M
    cmask = cols < N
    acc4 = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.int32)
    for k0 in range(0, KP, BLOCK_KP):
        k = k0 + tl.arange(0, BLOCK_KP)
        kmask = k < KP
        xb = tl.load(x4_ptr + rows[:, None].to(tl.int64) * KP + k[None, :],
                     mask=rmask[:, None] & kmask[None, :], other=0)
        wb = tl.load(w4_ptr + k[:, None].to(tl.int64) * N + cols[None, :],
                     mask=kmask[:, None] & cmask[None, :], other=0)
        x_lo, x_hi = _nibbles(xb)
        w_lo, w_hi = _nibbles(wb)
        acc4 = tl.dot(x_lo, w_lo, acc4, out_dtype=tl.int32)
        acc4 = tl.dot(x_hi, w_hi, acc4, out_dtype=tl.int32)
    acc8 = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.int32)
    if HAS_HIGH:
        for k0 in range(0, R, BLOCK_R):
            k = k0 + tl.arange(0, BLOCK_R)
            kmask = k < R
            xq = tl.load(x8_ptr + rows[:, None].to(tl.int64) * R + k[None, :],
                         mask=rmask[:, None] & kmask[None, :], other=0)
            wq = tl.load(w8_ptr + k[:, None].to(tl.int64) * N + cols[None, :],
                         mask=kmask[:, None] & cmask[None, :], other=0)
            acc8 = tl.dot(xq, wq, acc8, out_dtype=tl.int32)
    return acc4, acc8


@triton.jit
def _block_term(acc, zx_ptr, sx_ptr, cs_ptr, sw_ptr, rows, cols, M, N):
    """(s_x[m] * s_w[n]) * float32(acc - int32(z_x[m]) * colsum[n]) (float32 tile)."""
    rmask = rows < M
    cmask = cols < N
    zx = tl.load(zx_ptr + rows, mask=rmask, other=0.0).to(tl.int32)
    sx = tl.load(sx_ptr + rows, mask=rmask, other=0.0)
    cs = tl.load(cs_ptr + cols, mask=cmask, other=0)
    sw = tl.load(sw_ptr + cols, mask=cmask, other=0.0)
    corr = acc - zx[:, None] * cs[None, :]
    return (sx[:, None] * sw[None, :]) * corr.to(tl.float32)


@triton.jit
def mixed_gemm_kernel(
        x4_ptr, w4_ptr,                         # int8 [M, KP], int8 [KP, N]   (KP = (K - R) / 2)
        sx4_ptr, zx4_ptr, sw4_ptr, cs4_ptr,     # float32 [M] x2, float32 [N], int32 [N]
        x8_ptr, w8_ptr,                         # int8 [M, R], int8 [R, N]     (HAS_HIGH)
        sx8_ptr, zx8_ptr, sw8_ptr, cs8_ptr,     # float32 [M] x2, float32 [N], int32 [N] (HAS_HIGH)
        bias_ptr,                               # float32 [N]                  (HAS_BIAS)
        M, N, KP, R,
        y_ptr,                                  # bfloat16 / float32 [M, N]
        HAS_HIGH: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr,
        BLOCK_R: tl.constexpr):
    """y[rows, cols] for one (BLOCK_M, BLOCK_N) tile: int32 accumulation, float32 epilogue."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc4, acc8 = _accumulate(x4_ptr, w4_ptr, x8_ptr, w8_ptr, M, N, KP, R, rows, cols,
                             HAS_HIGH, BLOCK_KP, BLOCK_R)
    y = _block_term(acc4, zx4_ptr, sx4_ptr, cs4_ptr, sw4_ptr, rows, cols, M, N)
    if HAS_HIGH:
        y = y + _block_term(acc8, zx8_ptr, sx8_ptr, cs8_ptr, sw8_ptr, rows, cols, M, N)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=cols < N, other=0.0)[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    out = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    if OUT_BF16:
        tl.store(out, y.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)
    else:
        tl.store(out, y, mask=mask)


@triton.jit
def int_acc_kernel(
        x4_ptr, w4_ptr, x8_ptr, w8_ptr,         # as in mixed_gemm_kernel
        M, N, KP, R,
        acc4_ptr, acc8_ptr,                     # int32 [M, N] each (acc8 written if HAS_HIGH)
        HAS_HIGH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_KP: tl.constexpr, BLOCK_R: tl.constexpr):
    """The raw int32 accumulators of mixed_gemm_kernel (same ``_accumulate``), for checks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc4, acc8 = _accumulate(x4_ptr, w4_ptr, x8_ptr, w8_ptr, M, N, KP, R, rows, cols,
                             HAS_HIGH, BLOCK_KP, BLOCK_R)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(acc4_ptr + offs, acc4, mask=mask)
    if HAS_HIGH:
        tl.store(acc8_ptr + offs, acc8, mask=mask)
