"""GPTQ: error-compensating weight quantization with fixed per-block scales (docs/algorithms.md, GPTQ).

Conventions
- Weights ``w: [d_in, d_out]`` (a linear is ``x @ w``): GPTQ's "columns" of the HF
  ``[d_out, d_in]`` layout are our input ROWS; the sweep walks the input rows.
- Hessian ``H = (2/n) sum_x x x^T``: ``[d_in, d_in]`` float32, accumulated with
  :func:`hessian_update` over every token the linear sees.
- Mixed precision: after the optional ``row_perm`` the LAST ``high_rows`` input rows are the
  high-precision block (``high_bits``), the others the low block (``low_bits``). Each block's
  symmetric per-output-column scales (per (group of rows, column) with ``group_size``) are fixed
  before the sweep from W (``formats.integer.weight_scales``, optional clip search); a row's block and
  group follow its index in the ``row_perm`` layout, never its position in the act_order sweep.
- Numerics: the quantizer is ``formats.integer.quantize_with_scale`` (float32, round then clip) and
  a dequantized row is ``code * scale``, exactly as ``formats.integer.dequantize_weight``. The sweep
  runs in float32; ``U = upper Cholesky of (H + damp)^-1`` is computed in float64 (scoped
  ``jax.enable_x64``) and cast to float32. On SmolLM2's Hessians (condition number <= 3e4 after
  1% damping, measured) float32 would give U to ~1e-5, but the error grows like cond * 6e-8 and
  with 1% damping cond can reach ~100 * d_in (1e5-1e6 for FFN sizes of larger models), where
  float32 loses most digits or its Cholesky fails spuriously. float64 costs one Cholesky plus one
  triangular solve, U being obtained without forming H^-1 (see :func:`_inverse_cholesky_upper`).

Columns are independent given H and the scales, so linears sharing an input (q/k/v, gate/up)
can be quantized in one call on ``concatenate([w_q, w_k, w_v], axis=1)`` (one Cholesky instead
of three, the same result as separate calls).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resq_jax.formats.bits import check_bits, is_off
from resq_jax.formats.integer import WeightCodes, ieee_div, quantize_with_scale, weight_scales
from resq_jax.util.checks import is_int
from resq_jax.util.precision import EXACT

__all__ = [
    "GPTQError", "GPTQDampingWarning", "GPTQResult",
    "gram", "hessian_init", "hessian_update", "gptq_quantize", "gptq_sweep", "gptq_error",
    "benchmark",
]

_F32 = jnp.float32
DEFAULT_DAMP = 0.01  # relative to mean(diag H): GPTQ's and ResQ's damping
DEFAULT_MAX_RETRIES = 4  # damping tried: damp, 10 damp, ..., 10^4 damp (times mean(diag H))


class GPTQError(ValueError):
    """Bad GPTQ arguments or a Hessian GPTQ cannot use; the message says what to change."""


class GPTQDampingWarning(RuntimeWarning):
    """The damped Hessian was not positive definite; GPTQ succeeded with more damping."""


# ----------------------------------------------------------------------------------------------
# Hessian accumulation
# ----------------------------------------------------------------------------------------------
def gram(x: jax.Array) -> jax.Array:
    """``x: [..., d]`` (every leading axis is tokens) -> ``sum_t x_t x_t^T: [d, d]``, float32 at full float32
    precision (resq_jax/util/precision.py): the one implementation of the Hessian's sum of outer products."""
    x = x.reshape(-1, x.shape[-1]).astype(_F32)
    return jnp.matmul(x.T, x, precision=EXACT)


@functools.partial(jax.jit, static_argnames=("start", "rows"))
def gram_rows(x: jax.Array, start: int, rows: int) -> jax.Array:
    """``x: [tokens, d]`` float32 -> rows [start, start + rows) of ``gram(x)``: [rows, d] (a large Hessian
    summed block by block; the float32 sums may round differently in the last bit from the whole product)."""
    return jnp.matmul(x[:, start:start + rows].T, x, precision=EXACT)


def hessian_init(d_in: int) -> tuple[jax.Array, jax.Array]:
    """An empty accumulator: ``(h: [d_in, d_in] float32 zeros, count: int32 0)``."""
    return jnp.zeros((d_in, d_in), _F32), jnp.zeros((), jnp.int32)


@jax.jit
def hessian_update(h: jax.Array, count, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Running ``H = (2/n) sum x x^T`` over the rows of ``x: [..., d_in]`` (all leading axes are
    tokens). ``h: [d_in, d_in]`` float32 holds H over ``count`` tokens; returns the updated
    ``(h, count + m)`` with m = number of new tokens, as the reference does it:
    ``h *= n / (n + m); x *= sqrt(2 / (n + m)); h += x^T x``, all float32 (x^T x at full float32
    precision). Jitted; ``count`` may be a Python int or an int32 scalar. Start from
    :func:`hessian_init`. Note: count is int32 (at most 2^31 - 1 tokens)."""
    d = h.shape[0]
    if x.shape[-1] != d or h.shape != (d, d):
        raise GPTQError(f"hessian_update: x [..., {x.shape[-1]}] does not match h {h.shape}; "
                        "x's last axis must be the linear's input size d_in")
    x = x.reshape(-1, d).astype(_F32)
    m = x.shape[0]
    n = jnp.asarray(count, jnp.int32)
    total = (n + m).astype(_F32)
    h = h.astype(_F32) * (n.astype(_F32) / total)
    h = h + gram(x * jnp.sqrt(_F32(2.0) / total))
    return h, n + m


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GPTQResult:
    """Result of :func:`gptq_quantize` for ``w: [d_in, d_out]``.

    w_q:       float32 [d_in, d_out], dequantized, in the ORIGINAL row order.
    codes:     WeightCodes in the ``row_perm`` layout (rows ``w[row_perm]``; identity when
               row_perm is None): the first d_in - high_rows rows in q_low/scale_low, the last
               high_rows in q_high/scale_high (float32 values and scale None when
               high_bits >= 16). ``dequantize_weight(codes)[inverse(row_perm)] == w_q`` exactly.
    row_perm:  the permutation used (int64 [d_in]) or None.
    damp_used: the relative damping that succeeded (the absolute one is damp_used * mean(diag H)).
    retries:   how many times the damping was multiplied by 10 (0 = first try succeeded).
    """

    w_q: jax.Array
    codes: WeightCodes
    row_perm: np.ndarray | None
    damp_used: float
    retries: int

    def int_codes(self) -> np.ndarray:
        """int8 [d_in, d_out] codes in the original row order (0 for rows of a 16-bit block,
        whose values are in w_q)."""
        high = self.codes.q_high
        if high.dtype != jnp.int8:
            high = jnp.zeros(high.shape, jnp.int8)
        q = np.asarray(jnp.concatenate([self.codes.q_low, high], axis=0))
        return q if self.row_perm is None else q[np.argsort(self.row_perm)]


# ----------------------------------------------------------------------------------------------
# the jitted sweep
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("block_size", "low_bits", "high_bits"))
def gptq_sweep(w: jax.Array, u: jax.Array, scales: jax.Array, row_group: jax.Array,
               row_high: jax.Array, *, block_size: int, low_bits: int, high_bits: int):
    """The GPTQ sweep over the input rows of ``w: [n, d_out]`` in order (n a multiple of
    ``block_size``; pad with zero weight rows and identity rows/columns of u).

    u:         float32 [n, n], upper Cholesky factor of the damped H^-1 (H^-1 = u^T u), in the
               sweep order.
    scales:    float32 [G, d_out], the fixed scale table; row r uses scales[row_group[r]].
    row_group: int32 [n]; row_high: bool [n] (True: high_bits, else low_bits).
    Returns ``(codes int8 [n, d_out], w_q float32 [n, d_out], ok bool)``; ok is False when a
    propagated error became non-finite (then the caller retries with more damping). Rows of a
    16-bit high block keep their updated float values in w_q and code 0.

    For each block of rows [i1, i1 + B): for each row i (a ``lax.fori_loop``):
    q_i = quantize(w_i), err_i = (w_i - q_i) / u_ii, w_j -= u_ij err_i for the rest of the block;
    then every later row: W[i2:] -= u[i1:i2, i2:]^T Err (the blocks are a ``lax.fori_loop`` too,
    so the program size does not depend on n)."""
    n, d_out = w.shape
    b = block_size
    n_blocks = n // b
    high_off = is_off(high_bits)

    def quantize_row(wi, s, high):
        code_low = quantize_with_scale(wi, s, low_bits)
        if high_off:
            return jnp.where(high, jnp.int8(0), code_low), jnp.where(high, wi, code_low.astype(_F32) * s)
        code = jnp.where(high, quantize_with_scale(wi, s, high_bits), code_low)
        return code, code.astype(_F32) * s

    def block_body(k, carry):
        w, codes, w_q, ok = carry
        i1 = k * b
        w1 = lax.dynamic_slice_in_dim(w, i1, b, 0)  # [B, d_out], already updated by earlier blocks
        u_rows = lax.dynamic_slice_in_dim(u, i1, b, 0)  # [B, n]
        u11 = lax.dynamic_slice_in_dim(u_rows, i1, b, 1)  # [B, B], upper triangular
        g1 = lax.dynamic_slice_in_dim(row_group, i1, b)
        h1 = lax.dynamic_slice_in_dim(row_high, i1, b)

        def row_body(i, c):
            w1, c1, q1, e1 = c
            wi = w1[i]
            code, qi = quantize_row(wi, scales[g1[i]], h1[i])
            ei = ieee_div(wi - qi, u11[i, i])
            # u11[i, j] = 0 for j < i: only rows i.. of the block change (row i itself is done)
            w1 = w1 - u11[i][:, None] * ei[None, :]
            return w1, c1.at[i].set(code), q1.at[i].set(qi), e1.at[i].set(ei)

        init = (w1, jnp.zeros((b, d_out), jnp.int8), jnp.zeros((b, d_out), _F32),
                jnp.zeros((b, d_out), _F32))
        _, c1, q1, e1 = lax.fori_loop(0, b, row_body, init)
        # u[i1:i2, j] = 0 for j < i1 (upper triangular): earlier rows receive exact zeros, and
        # the block's own rows are already final in w_q, so the whole matrix can be updated.
        w = w - jnp.matmul(u_rows.T, e1, precision=EXACT)
        codes = lax.dynamic_update_slice_in_dim(codes, c1, i1, 0)
        w_q = lax.dynamic_update_slice_in_dim(w_q, q1, i1, 0)
        return w, codes, w_q, ok & jnp.all(jnp.isfinite(e1))

    init = (w.astype(_F32), jnp.zeros((n, d_out), jnp.int8), jnp.zeros((n, d_out), _F32),
            jnp.asarray(True))
    _, codes, w_q, ok = lax.fori_loop(0, n_blocks, block_body, init)
    return codes, w_q, ok


# ----------------------------------------------------------------------------------------------
# the damped inverse factor
# ----------------------------------------------------------------------------------------------
@jax.jit
def _inverse_cholesky_upper(h: jax.Array, damp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 ``u`` upper triangular with ``u^T u = (h + damp * mean(diag h) * I)^-1`` and
    whether it is usable (finite, positive diagonal). Call under ``jax.enable_x64(True)``:
    the factorization runs in float64.

    With J the row/column reversal, if ``J H J = L L^T`` (lower Cholesky) then
    ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper triangular with a positive
    diagonal, i.e. the upper Cholesky factor of H^-1: one Cholesky and one triangular solve,
    no explicit inverse."""
    h = h.astype(jnp.float64)
    d = h.shape[0]
    h = h + (damp * jnp.mean(jnp.diag(h))) * jnp.eye(d, dtype=jnp.float64)
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    inv = jax.scipy.linalg.solve_triangular(lower, jnp.eye(d, dtype=jnp.float64), lower=True)
    u = jnp.triu(inv[::-1, ::-1])
    ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diag(u) > 0.0)
    return u.astype(_F32), ok


def _reverse_inplace(flat: np.ndarray, chunk: int = 1 << 22) -> None:
    """flat[:] = flat[::-1] with temporaries of ``chunk`` elements (for a C-contiguous [d, d] matrix
    viewed flat, this is J a J: both axes reversed)."""
    n = flat.size
    for s in range(0, n // 2, chunk):
        e = min(s + chunk, n // 2)
        head = flat[s:e].copy()
        flat[s:e] = flat[n - e:n - s][::-1]
        flat[n - e:n - s] = head[::-1]


def _inverse_cholesky_upper_inplace(a: np.ndarray, damp: float) -> bool:
    """The large-d_in form of :func:`_inverse_cholesky_upper`: ``a`` (float32 [d, d] C-contiguous,
    the Hessian) is replaced by U (upper, ``U^T U = (a + damp * mean(diag a) * I)^-1``) in place with
    float32 LAPACK (spotrf, strtri) and returns True; or, when the damped matrix is not positive
    definite, ``a`` is restored and False is returned. No [d, d] temporary: a down_proj Hessian of
    a 7B model (d_in 18944) is 1.4 GB in float32 and would be 2.9 GB more in float64.

    Same algebra as the float64 path: with J the reversal, J H J = L L^T and U = J L^-1 J. LAPACK
    sees the C array as its transpose (a Fortran array), so its upper factor R = L^T of the
    flipped matrix lands in our lower triangle, and the untouched other triangle keeps H for a
    retry."""
    from scipy.linalg import lapack

    d = a.shape[0]
    idx = np.arange(d)
    diag0 = a[idx, idx].astype(np.float64)
    a[idx, idx] = (diag0 + damp * diag0.mean()).astype(np.float32)
    flat = a.reshape(-1)
    _reverse_inplace(flat)  # a <- J a J
    f = a.T  # Fortran-contiguous view of the same memory
    c, info = lapack.spotrf(f, lower=0, overwrite_a=1, clean=0)
    if not np.shares_memory(c, a):
        raise AssertionError("scipy's spotrf did not factor in place")
    ok = info == 0
    if ok:
        c, info = lapack.strtri(f, lower=0, overwrite_c=1)
        if not np.shares_memory(c, a):
            raise AssertionError("scipy's strtri did not invert in place")
        ok = info == 0
    if not ok:  # restore H from the strict upper triangle, which LAPACK did not touch
        for i in range(d):
            a[i, :i] = a[:i, i]
        a[idx, idx] = diag0[::-1].astype(np.float32)
        _reverse_inplace(flat)
        return False
    _reverse_inplace(flat)  # lower L^-1 -> upper J L^-1 J
    for i in range(1, d):
        a[i, :i] = 0.0
    diag = a[idx, idx]
    if not (np.all(diag > 0) and all(np.isfinite(a[r:r + 512]).all() for r in range(0, d, 512))):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------
# d_in above which U is factored in float32 in place (_inverse_cholesky_upper_inplace) instead of float64
F64_CHOLESKY_MAX = 8192


def _check_args(w, h, low_bits, high_bits, high_rows, row_perm, block_size, damp, group_size,
                max_retries):
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise GPTQError(f"gptq_quantize needs w: [d_in, d_out] with d_in, d_out > 0, got shape {w.shape}")
    d_in = w.shape[0]
    if h.shape != (d_in, d_in):
        raise GPTQError(f"the Hessian must be [d_in, d_in] = [{d_in}, {d_in}] for w {w.shape}, got "
                        f"{h.shape}; accumulate it from the linear's inputs x: [..., {d_in}]")
    try:
        low_bits = check_bits(low_bits, "low_bits", allow_off=False)
    except ValueError as e:
        raise GPTQError(f"{e}; GPTQ has nothing to do with 16-bit weights: skip it") from None
    try:
        high_bits = check_bits(high_bits, "high_bits", allow_off=True)
    except ValueError as e:
        raise GPTQError(str(e)) from None
    if not is_int(high_rows) or not 0 <= int(high_rows) <= d_in:
        raise GPTQError(f"high_rows must be an integer in 0..d_in={d_in} (the last high_rows input "
                        f"rows, after row_perm, use high_bits), got {high_rows!r}")
    high_rows = int(high_rows)
    if not is_int(block_size) or int(block_size) <= 0:
        raise GPTQError(f"block_size must be a positive integer (128 is usual), got {block_size!r}")
    if (not isinstance(damp, numbers.Real) or isinstance(damp, bool) or not np.isfinite(damp)
            or not float(damp) > 0.0):
        raise GPTQError(f"damp must be a positive float (relative to mean(diag H), 0.01 is usual), "
                        f"got {damp!r}")
    if not is_int(max_retries) or int(max_retries) < 0:
        raise GPTQError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    if group_size is not None:
        if not is_int(group_size) or int(group_size) <= 0:
            raise GPTQError(f"group_size must be a positive integer or None, got {group_size!r}")
        group_size = int(group_size)
        for rows, what in ((d_in - high_rows, "low"), (high_rows, "high")):
            if rows % group_size:
                raise GPTQError(f"the {what} block has {rows} input rows, not a multiple of "
                                f"group_size {group_size}; pick a group size dividing both blocks")
    if row_perm is not None:
        perm = np.asarray(row_perm)
        if (perm.shape != (d_in,) or not np.issubdtype(perm.dtype, np.integer)
                or not np.array_equal(np.sort(perm), np.arange(d_in))):
            raise GPTQError(f"row_perm must be a permutation of 0..{d_in - 1} (integer array of "
                            f"shape [{d_in}]), got shape {perm.shape} dtype {perm.dtype}")
        row_perm = perm.astype(np.int64)
    return low_bits, high_bits, high_rows, row_perm, int(block_size), float(damp), group_size


def _block_scales(w, start, rows, bits, group_size, clip_search):
    """Scales [n_groups, d_out] of rows [start, start + rows) of w, and each row's group index
    within them. None for an empty or 16-bit block."""
    if rows == 0 or is_off(bits):
        return None, np.zeros(rows, np.int32)
    s = weight_scales(w[start:start + rows], bits, group_size, clip_search)
    gs = rows if group_size is None else group_size
    return s, (np.arange(rows) // gs).astype(np.int32)


def gptq_quantize(w, h, *, low_bits: int, high_bits: int = 8, high_rows: int = 0,
                  row_perm: np.ndarray | None = None, block_size: int = 128, damp: float = DEFAULT_DAMP,
                  act_order: bool = False, clip_search: bool = False, group_size: int | None = None,
                  max_retries: int = DEFAULT_MAX_RETRIES, overwrite_h: bool = False,
                  column_block: int | None = None) -> GPTQResult:
    """GPTQ of ``w: [d_in, d_out]`` with Hessian ``h: [d_in, d_in]`` (see the module docstring).

    Steps: apply ``row_perm`` to w's rows and h's rows and columns (the last ``high_rows`` rows
    of that layout use ``high_bits``, the rest ``low_bits``; high_bits 16 keeps them in float,
    still absorbing the low rows' errors); dead inputs (h_ii = 0): h_ii = 1 and the weight row
    zeroed; the scales of each block (per output column, or per (group of ``group_size`` rows,
    column)) fixed from this W (dead rows zeroed, since they carry no signal) with
    ``formats.integer.weight_scales`` (``clip_search``: MSE clip search); ``act_order``: sweep rows in
    descending diag(h) (a row keeps its block and group); damping ``damp * mean(diag h)``;
    u = upper Cholesky of the damped h^-1 (float64); the blocked sweep (:func:`gptq_sweep`);
    un-permute. If the damped h is not positive definite (or the sweep overflows) the damping is
    multiplied by 10, up to ``max_retries`` times, with a GPTQDampingWarning naming the damping
    that worked; if none works a GPTQError is raised. Never returns non-finite weights.

    Above ``F64_CHOLESKY_MAX`` input rows (a 7B model's down_proj) U is factored in float32 in place on
    the host (:func:`_inverse_cholesky_upper_inplace`; the official GPTQ code factors in float32 at every
    size), so the Hessian exists once; ``overwrite_h=True`` lets that use ``h`` itself (a writable float32
    NumPy array the caller no longer needs) instead of a copy.

    ``column_block``: output columns are independent given U and their scales, so a wide ``w`` (a NumPy
    array, left untouched) may be swept ``column_block`` columns at a time against the one U: the working
    copies are then a block's, not the matrix's. Same algorithm; the float32 sums may round differently
    in the last bit from one whole sweep (products of other shapes).
    """
    w = w if hasattr(w, "ndim") else np.asarray(w)
    big = np.shape(h)[0] > F64_CHOLESKY_MAX
    if big:
        reuse = (overwrite_h and isinstance(h, np.ndarray) and h.dtype == np.float32 and h.flags.c_contiguous
                 and h.flags.writeable)
        h = h if reuse else np.array(h, dtype=np.float32, order="C")
    else:
        h = jnp.asarray(h)
    xp = np if big else jnp
    low_bits, high_bits, high_rows, row_perm, block_size, damp, group_size = _check_args(
        w, h, low_bits, high_bits, high_rows, row_perm, block_size, damp, group_size, max_retries)
    d_in, d_out = np.shape(w)
    n_low = d_in - high_rows
    step = d_out if column_block is None else max(1, min(int(column_block), d_out))
    # the column blocks of w (one block: w itself, as a float32 device array, exactly as before)
    blocks = [(0, d_out)] if step >= d_out else [(c, min(c + step, d_out)) for c in range(0, d_out, step)]

    def block_w(c0, c1):
        wb = jnp.asarray(w) if len(blocks) == 1 else jnp.asarray(np.asarray(w)[:, c0:c1])
        return wb.astype(_F32)

    h = h if big else h.astype(_F32)
    finite_h = (all(np.isfinite(h[r:r + 512]).all() for r in range(0, d_in, 512)) if big
                else bool(jnp.all(jnp.isfinite(h))))
    if not (all(bool(jnp.all(jnp.isfinite(block_w(c0, c1)))) for c0, c1 in blocks) and finite_h):
        raise GPTQError("w or the Hessian contains NaN/inf; damping cannot fix that: check the "
                        "weights and the calibration activations that produced the Hessian")

    if row_perm is not None:
        h = h[row_perm][:, row_perm]
    diag = xp.diag(h)
    dead = diag == 0.0
    if big:
        h[np.flatnonzero(dead), np.flatnonzero(dead)] = 1.0
        dead = jnp.asarray(dead)
    else:
        h = h + jnp.diag(dead.astype(_F32))
    order = np.argsort(-np.asarray(xp.diag(h)), kind="stable") if act_order else None
    if order is not None:
        h = h[order][:, order]
    n_pad = -d_in % block_size

    def prepared(c0, c1):
        """Columns [c0, c1) of w in sweep order, padded, with their scales and row groups."""
        wb = block_w(c0, c1)
        if row_perm is not None:
            wb = wb[row_perm]
        wb = jnp.where(dead[:, None], _F32(0.0), wb)
        s_low, g_low = _block_scales(wb, 0, n_low, low_bits, group_size, clip_search)
        s_high, g_high = _block_scales(wb, n_low, high_rows, high_bits, group_size, clip_search)
        n_low_groups = 0 if s_low is None else s_low.shape[0]
        row_group = np.concatenate([g_low, g_high + n_low_groups]).astype(np.int32)
        row_high = np.arange(d_in) >= n_low
        scales = jnp.concatenate([s for s in (s_low, s_high) if s is not None], axis=0)
        if order is not None:
            wb, row_group, row_high = wb[order], row_group[order], row_high[order]
        wb = jnp.pad(wb, ((0, n_pad), (0, 0)))
        return wb, scales, jnp.asarray(np.pad(row_group, (0, n_pad))), jnp.asarray(np.pad(row_high, (0, n_pad))), \
            s_low, s_high

    def swept(u_pad):
        """The sweep of every column block: ([(codes, w_q, s_low, s_high)] in sweep row order, all finite)."""
        out = []
        for c0, c1 in blocks:
            wb, scales, row_group, row_high, s_low, s_high = prepared(c0, c1)
            codes, w_q, ok = gptq_sweep(wb, u_pad, scales, row_group, row_high,
                                        block_size=block_size, low_bits=low_bits, high_bits=high_bits)
            del wb
            if not (bool(ok) and bool(jnp.all(jnp.isfinite(w_q)))):
                return out, False
            out.append((codes[:d_in], w_q[:d_in], s_low, s_high))
        return out, True

    retries = 0
    damp_now = damp
    while True:
        if big:
            ok = _inverse_cholesky_upper_inplace(h, damp_now)
            u = h if ok else None
        else:
            with jax.enable_x64(True):
                u, ok = _inverse_cholesky_upper(h, jnp.asarray(damp_now, jnp.float64))
                ok = bool(ok)
        if ok:
            # padding rows: identity in u (no coupling), zero weights -> zero code and error
            if big and not n_pad:
                u = jnp.from_dlpack(u)  # the host array itself (zero-copy on CPU), not a second 1.4 GB copy
            u_pad = u if not n_pad else jnp.pad(u, ((0, n_pad), (0, n_pad))) + jnp.diag(
                jnp.concatenate([jnp.zeros(d_in, _F32), jnp.ones(n_pad, _F32)]))
            parts, ok = swept(u_pad)
            del u_pad
        if ok:
            break
        if big and u is not None and retries < max_retries:  # factored in place: no Hessian left to retry with
            raise GPTQError(
                f"GPTQ failed: the sweep over the [{d_in}, {d_in}] Hessian overflowed with damping {damp_now:g} * "
                "mean(diag H); pass a larger damp (the in-place float32 factor of a large Hessian cannot be "
                "retried)")
        if retries >= max_retries:
            raise GPTQError(
                f"GPTQ failed: the damped Hessian [{d_in}, {d_in}] is not positive definite (or the "
                f"sweep overflowed) even with damping {damp_now:g} * mean(diag H) after {retries} "
                "retries; check the calibration inputs (NaN/huge activations, too few tokens) or "
                "pass a larger damp")
        retries += 1
        damp_now *= 10.0
    if retries:
        warnings.warn(
            f"GPTQ: the Hessian [{d_in}, {d_in}] with damping {damp:g} * mean(diag H) was not "
            f"positive definite; used damping {damp_now:g} * mean(diag H) after {retries} "
            "retr" + ("y" if retries == 1 else "ies"), GPTQDampingWarning, stacklevel=2)

    if len(parts) == 1:
        (codes, w_q, s_low, s_high), = parts
    else:  # the blocks side by side, on the host (one block's device copies at a time above)
        codes, w_q, s_low, s_high = (
            None if parts[0][i] is None else jnp.asarray(np.concatenate([np.asarray(p[i]) for p in parts], axis=1))
            for i in range(4))
    del parts
    if order is not None:
        inv = np.argsort(order)
        codes = codes[inv]
        w_q = w_q[inv]
    q_high = w_q[n_low:] if is_off(high_bits) else codes[n_low:]
    weight_codes = WeightCodes(q_low=codes[:n_low], scale_low=s_low, q_high=q_high, scale_high=s_high,
                               low_bits=low_bits, high_bits=high_bits, group_size=group_size)
    if row_perm is not None:
        w_q = w_q[np.argsort(row_perm)]
    return GPTQResult(w_q=w_q, codes=weight_codes, row_perm=row_perm, damp_used=damp_now,
                      retries=retries)


@jax.jit
def gptq_error(w: jax.Array, w_q: jax.Array, h: jax.Array) -> jax.Array:
    """GPTQ's proxy loss ``tr((W - Wq)^T H (W - Wq))`` for ``w, w_q: [d_in, d_out]`` and
    ``h: [d_in, d_in]`` (float32 scalar; with H = (2/n) sum x x^T it is (2/n) ||X W - X Wq||^2)."""
    dw = w.astype(_F32) - w_q.astype(_F32)
    return jnp.sum(dw * jnp.matmul(h.astype(_F32), dw, precision=EXACT))


def benchmark(d_in: int, d_out: int, *, low_bits: int = 4, high_rows: int | None = None,
              tokens: int = 4096, repeats: int = 2, seed: int = 0) -> float:
    """Wall seconds of one :func:`gptq_quantize` call on a random ``[d_in, d_out]`` linear with a
    Hessian from ``tokens`` correlated random inputs (best of ``repeats`` runs after a compiling
    warm-up). ``high_rows`` defaults to d_in // 8 (ResQ's mixed precision)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d_in, d_in)).astype(np.float32) / np.sqrt(d_in)
    x = rng.standard_normal((tokens, d_in)).astype(np.float32) @ (np.eye(d_in, dtype=np.float32) + mix)
    h, _ = hessian_update(*hessian_init(d_in), jnp.asarray(x))
    w = jnp.asarray(rng.standard_normal((d_in, d_out)).astype(np.float32) * 0.05)
    kw = dict(low_bits=low_bits, high_rows=d_in // 8 if high_rows is None else high_rows)
    jax.block_until_ready(gptq_quantize(w, h, **kw).w_q)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(gptq_quantize(w, h, **kw).w_q)
        best = min(best, time.perf_counter() - t0)
    return best
