"""Integer quantizers: asymmetric activations, symmetric weights (MXINT: resq_jax/formats/mxint.py).

Every quantizer comes as a ``quantize_*`` / ``dequantize_*`` pair over integer codes (so the
packed runtime and the kernels can reuse the exact same numerics) and a ``fake_quant_*``
function that is ``dequantize(quantize(x))`` computed in float32 and returned in ``x``'s dtype.
docs/algorithms.md, Quantizers (integer quantizers and MXINT), defines the numerics.

Conventions
- Bit widths, group sizes, block sizes and axes are static Python ints; the functions are pure
  and jitted with those as static arguments, so they also inline into larger jitted programs.
- Arithmetic is float32 whatever the input dtype; ``round`` is round-half-to-even (``jnp.round``)
  and is always applied before ``clip``, and both before any integer cast.
- ``bits >= 16`` means "no quantization" wherever a function says so (mixed activation blocks,
  weight blocks, ``fake_quant_asym``): the block passes through unchanged (cast to float32 in
  code containers).
- Activations ``x: [..., d]`` are quantized over the last axis; weights are stored
  ``w: [d_in, d_out]`` (a linear is ``x @ w``) and quantized per output column.

MXINT ragged tails (mxint.py): the size of the quantized axis must be a multiple of the block size
(16 by default); every hidden/intermediate/head size of the supported models is, and anything
else raises a ValueError rather than silently padding.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resq_jax.formats.bits import check_positive_int, check_quant_bits, is_off
from resq_jax.util.checks import is_int
from resq_jax.util.trees import pytree_dataclass, static_field

# MSE clip search (docs/algorithms.md, MSE clip search): p = 1 - i / GRID for i in range(STEPS), error norm 2.4.
CLIP_SEARCH_STEPS = 80
CLIP_SEARCH_GRID = 100
CLIP_SEARCH_NORM = 2.4

_F32 = jnp.float32
# p = 1 - i/100 rounded once from float64 (as the reference computes it in Python) to float32.
_CLIP_P = np.asarray(1.0 - np.arange(CLIP_SEARCH_STEPS) / CLIP_SEARCH_GRID, dtype=np.float32)


def ieee_div(a, b):
    """IEEE float32 ``a / b`` (correctly rounded), broadcasting b to a's shape.

    XLA's CPU simplifier rewrites ``a / constant`` and ``a / broadcast(b)`` into
    ``a * (1 / b)``, which is off by one ulp for about a quarter of the elements and moves
    codes next to rounding ties (27% of x / scale differed from NumPy/torch). The divisor is
    made a full-shape array that depends on ``a`` (``b + 0 * a``: not folded for floats, and
    batched along with ``a`` under vmap) and hidden behind an optimization barrier, so XLA keeps
    a true division (0 mismatches measured, also under vmap)."""
    a = jnp.asarray(a, _F32)
    shape = jnp.broadcast_shapes(a.shape, jnp.shape(b))
    b = jnp.broadcast_to(jnp.asarray(b, _F32), shape) + jnp.zeros((), _F32) * a
    return a / lax.optimization_barrier(b)


pytree_dataclass, _static = pytree_dataclass, static_field


# ----------------------------------------------------------------------------------------------
# 1. asymmetric integer quantizer over the last axis (activations: per token / per group)
# ----------------------------------------------------------------------------------------------
@pytree_dataclass
class AsymCodes:
    """Asymmetric codes of ``x: [..., g]`` (quantized over the last axis).

    q:     uint8 [..., g], in [0, 2^bits - 1]
    scale: float32 [..., 1]
    zero:  float32 [..., 1], integer-valued, in [0, 2^bits - 1]
    """

    q: jax.Array
    scale: jax.Array
    zero: jax.Array


@functools.partial(jax.jit, static_argnames=("bits", "clip_ratio"))
def quantize_asym(x: jax.Array, bits: int, clip_ratio: float = 1.0) -> AsymCodes:
    """Asymmetric min/max quantization of ``x: [..., g]`` over its last axis.

    xmin = min(min(x), 0) * clip_ratio, xmax = max(max(x), 0) * clip_ratio (an all-zero group
    uses [-1, 1]); scale = (xmax - xmin) / (2^b - 1); zero = round(-xmin / scale);
    q = clip(round(x / scale) + zero, 0, 2^b - 1). bits in 2..8.
    """
    bits = check_quant_bits(bits, "quantize_asym", allow_off=False)
    if not (isinstance(clip_ratio, numbers.Real) and 0.0 < float(clip_ratio) <= 1.0):
        raise ValueError(f"clip_ratio must be a float in (0, 1], got {clip_ratio!r}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize_asym needs x with a non-empty last axis, got shape {x.shape}")
    maxq = float(2**bits - 1)
    x = x.astype(_F32)
    xmin = jnp.minimum(jnp.min(x, axis=-1, keepdims=True), 0.0) * _F32(clip_ratio)
    xmax = jnp.maximum(jnp.max(x, axis=-1, keepdims=True), 0.0) * _F32(clip_ratio)
    empty = (xmin == 0.0) & (xmax == 0.0)
    xmin = jnp.where(empty, _F32(-1.0), xmin)
    xmax = jnp.where(empty, _F32(1.0), xmax)
    scale = ieee_div(xmax - xmin, maxq)
    zero = jnp.round(ieee_div(-xmin, scale))
    q = jnp.clip(jnp.round(ieee_div(x, scale)) + zero, 0.0, maxq)
    return AsymCodes(q=q.astype(jnp.uint8), scale=scale, zero=zero)


@jax.jit
def dequantize_asym(codes: AsymCodes) -> jax.Array:
    """``(q - zero) * scale`` in float32, shape of ``codes.q``."""
    return (codes.q.astype(_F32) - codes.zero) * codes.scale


@functools.partial(jax.jit, static_argnames=("bits", "clip_ratio"))
def fake_quant_asym(x: jax.Array, bits: int, clip_ratio: float = 1.0) -> jax.Array:
    """dequantize_asym(quantize_asym(x)) in float32, returned in x's dtype. bits >= 16: identity."""
    bits = check_quant_bits(bits, "fake_quant_asym", allow_off=True)
    if is_off(bits):
        return x
    return dequantize_asym(quantize_asym(x, bits, clip_ratio)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# 2. mixed-precision per-token (per-group) activation quantizer
# ----------------------------------------------------------------------------------------------
@pytree_dataclass
class MixedCodes:
    """Codes of ``x: [..., d]`` split in groups of ``group`` channels, each group in two blocks.

    low:  AsymCodes with q [..., d // group, group - high] (float32 values if low_bits >= 16,
          None if high == group)
    high: AsymCodes with q [..., d // group, high] (float32 values if high_bits >= 16,
          None if high == 0)
    """

    low: AsymCodes | jax.Array | None
    high: AsymCodes | jax.Array | None
    low_bits: int = static_field()
    high_bits: int = static_field()
    group: int = static_field()
    high_channels: int = static_field()


def _mixed_layout(shape, high, group):
    if len(shape) == 0:
        raise ValueError("mixed quantization needs x with at least one axis")
    d = shape[-1]
    g = d if group is None else check_positive_int(group, "group")
    if d % g:
        raise ValueError(f"the last axis ({d}) must be a multiple of group ({g}); "
                         "use group=None for one group per token or a divisor such as head_dim")
    if not is_int(high) or not 0 <= int(high) <= g:
        raise ValueError(f"high (high-precision channels per group) must be an integer in 0..{g}, "
                         f"got {high!r}")
    return g, int(high)


def _quantize_block(x, bits):
    return x.astype(_F32) if is_off(bits) else quantize_asym(x, bits)


def _dequantize_block(block):
    return dequantize_asym(block) if isinstance(block, AsymCodes) else block.astype(_F32)


@functools.partial(jax.jit, static_argnames=("low_bits", "high_bits", "high", "group"))
def quantize_mixed(x: jax.Array, low_bits: int, high_bits: int, high: int,
                   group: int | None = None) -> MixedCodes:
    """Codes of ``x: [..., d]``: the last axis is cut in groups of ``group`` channels (default d:
    one group per token; head_dim for per-(token, head) groups); in each group the first
    ``group - high`` channels (low block, ``low_bits``) and the last ``high`` channels (high
    block, ``high_bits``) get their own asymmetric scale and zero. bits >= 16 leaves a block
    unquantized; high = 0 is uniform ``low_bits``.
    """
    low_bits = check_quant_bits(low_bits, "low_bits", allow_off=True)
    high_bits = check_quant_bits(high_bits, "high_bits", allow_off=True)
    g, high = _mixed_layout(x.shape, high, group)
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    low_block = None if high == g else _quantize_block(xg[..., : g - high], low_bits)
    high_block = None if high == 0 else _quantize_block(xg[..., g - high:], high_bits)
    return MixedCodes(low=low_block, high=high_block, low_bits=low_bits, high_bits=high_bits,
                      group=g, high_channels=high)


@jax.jit
def dequantize_mixed(codes: MixedCodes) -> jax.Array:
    """Float32 ``[..., d]`` from MixedCodes."""
    parts = [_dequantize_block(b) for b in (codes.low, codes.high) if b is not None]
    xg = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return xg.reshape(*xg.shape[:-2], xg.shape[-2] * xg.shape[-1])


@functools.partial(jax.jit, static_argnames=("low_bits", "high_bits", "high", "group"))
def fake_quant_mixed(x: jax.Array, low_bits: int, high_bits: int, high: int,
                     group: int | None = None) -> jax.Array:
    """dequantize_mixed(quantize_mixed(x, ...)) returned in x's dtype (see quantize_mixed)."""
    if is_off(check_quant_bits(low_bits, "low_bits", allow_off=True)) and (
            high == 0 or is_off(check_quant_bits(high_bits, "high_bits", allow_off=True))):
        _mixed_layout(x.shape, high, group)
        return x
    return dequantize_mixed(quantize_mixed(x, low_bits, high_bits, high, group)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# 3. symmetric per-output-channel weight quantizer, w: [d_in, d_out]
# ----------------------------------------------------------------------------------------------
def _sym_maxq(bits: int) -> float:
    return float(2 ** (bits - 1) - 1)


def _sym_codes(w, scale, bits):
    maxq = _sym_maxq(bits)
    return jnp.clip(jnp.round(ieee_div(w, scale)), -maxq - 1.0, maxq)


@functools.partial(jax.jit, static_argnames=("bits",))
def quantize_with_scale(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """int8 codes ``clip(round(w / scale), -2^(b-1), 2^(b-1) - 1)`` for a fixed ``scale``
    broadcastable to ``w`` (e.g. one weight row ``[d_out]`` with its group's scale ``[d_out]``,
    as GPTQ needs: scales fixed before the sweep)."""
    bits = check_quant_bits(bits, "quantize_with_scale", allow_off=False)
    return _sym_codes(w.astype(_F32), scale.astype(_F32), bits).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("bits",))
def fake_quant_with_scale(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """``quantize_with_scale(w, scale, bits) * scale`` in float32. bits >= 16: w as float32."""
    bits = check_quant_bits(bits, "fake_quant_with_scale", allow_off=True)
    if is_off(bits):
        return w.astype(_F32)
    scale = scale.astype(_F32)
    return _sym_codes(w.astype(_F32), scale, bits) * scale


def _grouped(w, group_size):
    """w: [rows, d_out] -> [n_groups, rows_per_group, d_out]."""
    rows = w.shape[0]
    gs = rows if group_size is None else group_size
    return w.reshape(rows // gs, gs, w.shape[1])


CLIP_SEARCH_COLUMNS = 4096  # output columns per clip-search block (the search's temporaries are 4 blocks)


def _clip_search_scales(wg, amax, bits):
    """Per (group, column) MSE clip search. wg: [G, gs, d_out], amax: [G, d_out] -> scale."""
    maxq = _sym_maxq(bits)
    zero_col = amax == 0.0
    ps = jnp.asarray(_CLIP_P)

    def scale_for(i):
        return jnp.where(zero_col, _F32(1.0), ieee_div(ps[i] * amax, maxq))

    def error(scale):
        deq = _sym_codes(wg, scale[:, None, :], bits) * scale[:, None, :]
        # |d|^2.4 as exp(2.4 log|d|): 4x faster than pow on CPU, exp(-inf) = 0 for d = 0
        return jnp.sum(jnp.exp(_F32(CLIP_SEARCH_NORM) * jnp.log(jnp.abs(wg - deq))), axis=1)

    def body(i, carry):
        best_err, best_scale = carry
        scale = scale_for(i)
        err = error(scale)
        better = err < best_err  # strict: the first (largest) p wins ties
        return jnp.where(better, err, best_err), jnp.where(better, scale, best_scale)

    s0 = scale_for(jnp.int32(0))
    best_err, best_scale = lax.fori_loop(1, CLIP_SEARCH_STEPS, body, (error(s0), s0))
    return best_scale


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "clip_search"))
def weight_scales(w: jax.Array, bits: int, group_size: int | None = None,
                  clip_search: bool = False) -> jax.Array:
    """Symmetric scales of ``w: [rows, d_out]``: ``[rows // group_size, d_out]`` float32
    (``[1, d_out]`` when group_size is None): max|w| over the group's rows / (2^(b-1) - 1), a
    zero column gets 1. ``clip_search``: per (group, column) pick the shrink p = 1 - i/100,
    i < 80, minimizing sum |w - Q_p(w)|^2.4 (first minimum wins)."""
    bits = check_quant_bits(bits, "weight_scales", allow_off=False)
    if w.ndim != 2 or w.shape[0] == 0:
        raise ValueError(f"weight_scales needs w: [rows, d_out] with rows > 0, got shape {w.shape}")
    if group_size is not None:
        group_size = check_positive_int(group_size, "group_size")
        if w.shape[0] % group_size:
            raise ValueError(f"{w.shape[0]} weight rows are not a multiple of group_size "
                             f"{group_size}; choose a group size that divides every block")
    wg = _grouped(w.astype(_F32), group_size)
    amax = jnp.max(jnp.abs(wg), axis=1)
    if clip_search:
        cols = wg.shape[2]
        if cols <= CLIP_SEARCH_COLUMNS:
            return _clip_search_scales(wg, amax, bits)
        # columns are independent: searched one block after another (lax.map), so the temporaries are those
        # of one block; zero columns pad the last block (their scale is 1, then dropped)
        n = -(-cols // CLIP_SEARCH_COLUMNS)
        pad = n * CLIP_SEARCH_COLUMNS - cols
        wb = jnp.pad(wg, ((0, 0), (0, 0), (0, pad))).reshape(*wg.shape[:2], n, CLIP_SEARCH_COLUMNS)
        ab = jnp.pad(amax, ((0, 0), (0, pad))).reshape(amax.shape[0], n, CLIP_SEARCH_COLUMNS)
        out = lax.map(lambda xs: _clip_search_scales(xs[0], xs[1], bits),
                      (jnp.moveaxis(wb, 2, 0), jnp.moveaxis(ab, 1, 0)))  # [n, G, block]
        return jnp.moveaxis(out, 0, 1).reshape(amax.shape[0], -1)[:, :cols]
    return jnp.where(amax == 0.0, _F32(1.0), ieee_div(amax, _sym_maxq(bits)))


@pytree_dataclass
class WeightCodes:
    """Symmetric codes of ``w: [d_in, d_out]``; the last ``high_rows`` input rows form the high block.

    q_low:      int8 [d_in - high_rows, d_out]  (float32 values if low_bits >= 16)
    scale_low:  float32 [n_groups_low, d_out]   (1 group if group_size is None; None if off)
    q_high:     int8 [high_rows, d_out]         (float32 values if high_bits >= 16)
    scale_high: float32 [n_groups_high, d_out]  (None if off or high_rows == 0)
    Dequantized row r of a block is q[r] * scale[r // group_size].
    """

    q_low: jax.Array
    scale_low: jax.Array | None
    q_high: jax.Array
    scale_high: jax.Array | None
    low_bits: int = static_field()
    high_bits: int = static_field()
    group_size: int | None = static_field(default=None)


def _quantize_weight_block(w, bits, group_size, clip_search):
    if is_off(bits):
        return w, None
    if w.shape[0] == 0:
        return w.astype(jnp.int8), None
    scale = weight_scales(w, bits, group_size, clip_search)
    q = _sym_codes(_grouped(w, group_size), scale[:, None, :], bits)
    return q.reshape(w.shape).astype(jnp.int8), scale


def _dequantize_weight_block(q, scale, group_size):
    if scale is None:
        return q.astype(_F32)
    qg = _grouped(q.astype(_F32), group_size)
    return (qg * scale[:, None, :]).reshape(q.shape)


@functools.partial(jax.jit,
                   static_argnames=("low_bits", "high_bits", "high_rows", "clip_search", "group_size"))
def quantize_weight_sym(w: jax.Array, low_bits: int, high_bits: int = 8, high_rows: int = 0,
                        clip_search: bool = False, group_size: int | None = None) -> WeightCodes:
    """Symmetric per-output-column codes of ``w: [d_in, d_out]``: the first d_in - high_rows
    input rows with ``low_bits``, the last ``high_rows`` with ``high_bits``, each block with its
    own per-column scale (per (group, column) with ``group_size`` rows along d_in, e.g. 128;
    both blocks must then be multiples of group_size). bits >= 16 keeps a block in float32."""
    low_bits = check_quant_bits(low_bits, "low_bits", allow_off=True)
    high_bits = check_quant_bits(high_bits, "high_bits", allow_off=True)
    if w.ndim != 2:
        raise ValueError(f"weights must be [d_in, d_out], got shape {w.shape}")
    d_in = w.shape[0]
    if not is_int(high_rows) or not 0 <= int(high_rows) <= d_in:
        raise ValueError(f"high_rows must be an integer in 0..d_in={d_in}, got {high_rows!r}")
    high_rows = int(high_rows)
    if group_size is not None:
        group_size = check_positive_int(group_size, "group_size")
        for rows, what in ((d_in - high_rows, "low"), (high_rows, "high")):
            if rows % group_size:
                raise ValueError(f"the {what} block has {rows} input rows, not a multiple of "
                                 f"group_size {group_size}; pick a group size dividing both blocks")
    w = w.astype(_F32)
    q_low, s_low = _quantize_weight_block(w[: d_in - high_rows], low_bits, group_size, clip_search)
    q_high, s_high = _quantize_weight_block(w[d_in - high_rows:], high_bits, group_size, clip_search)
    return WeightCodes(q_low=q_low, scale_low=s_low, q_high=q_high, scale_high=s_high,
                       low_bits=low_bits, high_bits=high_bits, group_size=group_size)


@jax.jit
def dequantize_weight(codes: WeightCodes) -> jax.Array:
    """Float32 ``[d_in, d_out]`` from WeightCodes."""
    low = _dequantize_weight_block(codes.q_low, codes.scale_low, codes.group_size)
    high = _dequantize_weight_block(codes.q_high, codes.scale_high, codes.group_size)
    return jnp.concatenate([low, high], axis=0)


@functools.partial(jax.jit,
                   static_argnames=("low_bits", "high_bits", "high_rows", "clip_search", "group_size"))
def fake_quant_weight(w: jax.Array, low_bits: int, high_bits: int = 8, high_rows: int = 0,
                      clip_search: bool = False, group_size: int | None = None) -> jax.Array:
    """dequantize_weight(quantize_weight_sym(w, ...)) returned in w's dtype."""
    codes = quantize_weight_sym(w, low_bits, high_bits, high_rows, clip_search, group_size)
    return dequantize_weight(codes).astype(w.dtype)


# ----------------------------------------------------------------------------------------------
# 4. symmetric per-tensor fake quant (ResQ's int8 online key rotation matrix)
# ----------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("bits",))
def fake_quant_sym_tensor(w: jax.Array, bits: int = 8) -> jax.Array:
    """Symmetric per-tensor fake quant: scale = max|w| / (2^(b-1) - 1) (1 for an all-zero
    tensor), grid [-2^(b-1), 2^(b-1) - 1]; float32 arithmetic, returned in w's dtype."""
    bits = check_quant_bits(bits, "fake_quant_sym_tensor", allow_off=True)
    if is_off(bits):
        return w
    wf = w.astype(_F32)
    amax = jnp.max(jnp.abs(wf))
    scale = jnp.where(amax == 0.0, _F32(1.0), ieee_div(amax, _sym_maxq(bits)))
    return (_sym_codes(wf, scale, bits) * scale).astype(w.dtype)
