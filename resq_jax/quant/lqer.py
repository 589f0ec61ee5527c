"""LQER and L2QER: low-rank correction of the weight quantization error (docs/algorithms.md, LQER and L2QER).

A linear ``y = x @ W`` (``W: [d_in, d_out]``) runs as

    y ~= Q(x) @ W_q + Q(Q(x) @ A) @ B        A: [d_in, k], B: [k, d_out]

with ``W_q`` the quantized weights (MXINT, or symmetric integer with groups along d_in),
``E = W - W_q`` and ``A @ B`` its best rank-k approximation:

  LQER   SVD(E) = U S V^T;           A = U_k,            B = S_k V_k^T
  L2QER  SVD(diag(s) E) = U S V^T;   A = diag(s)^-1 U_k, B = S_k V_k^T

where ``s`` comes from the calibration activation magnitudes of the linear's input
(``l2qer_scale``). ``Q`` is MXINT (blocks of 16 along the contraction axis): activations at
the linear inputs with ``a_width`` (8 for W4A8, 6 for W4A6), the intermediate ``x @ A`` and
the matrices A, B with ``lowrank_width`` (8). The decoder's ``Linear`` computes the correction
from the weights ``layers.{i}.{name}_lr_a`` / ``_lr_b`` and calls the ``lowrank`` site on
``x @ A``; ``MXIntHooks`` quantizes that site and the linear-input sites. K/V cache, q,
softmax, embeddings and lm_head stay in float (LQER's W4A8 has no KV quantization).

Quantization axes (the contraction axis of each product):
  W_q   [d_in, d_out]   blocks along d_in (axis 0)
  A     [d_in, k]       blocks along d_in (axis 0)
  B     [k, d_out]      blocks along k (axis 0)
  x     [..., d]        blocks along the last axis; o_in [B, T, H, hd] is quantized as the
                        flattened [B, T, H*hd] row o_proj contracts (identical to blocks inside
                        each head when hd % block == 0)
  x @ A [..., k]        blocks along k (the last axis)
Ragged rank: when k is not a multiple of the block, the last block along k holds the k % block
remaining entries (implemented by zero padding, which cannot change a block maximum and whose
zeros stay zero). The model axes (d, H*hd, ffn) must be multiples of the block; the MXINT
quantizer raises a ValueError otherwise.

Numerics: the SVD is float64 NumPy; quantizer arithmetic is float32 (``resq_jax.formats``).
Width >= 16 (``OFF``) leaves a quantizer off: ``a_width = 16`` is weight-only LQER and
``lowrank_width = 16`` keeps A, B and ``x @ A`` in float.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from jax import lax

from resq_jax.formats.bits import OFF, check_bits
from resq_jax.formats.integer import WeightCodes, dequantize_weight, fake_quant_weight, quantize_weight_sym
from resq_jax.formats.mxint import MXINT_WIDTHS, fake_quant_mxint
from resq_jax.models.config import ModelConfig
from resq_jax.models.decoder import SiteHooks
from resq_jax.models.views import overlaid
from resq_jax.quant.layouts import LINEARS
from resq_jax.util.checks import is_int

__all__ = [
    "LQERConfigError", "OFF", "MXINT_BLOCK", "SCALE_FLOOR", "LINEARS", "LINEAR_SITES", "QUANTIZED_SITES",
    "l2qer_scale", "lowrank_correction", "LQERSpec", "MXIntHooks", "quantize_weight",
    "quantize_lowrank", "correct_linear", "lqer_quantize_weights", "int_lowrank_weights",
    "int_lowrank_codes",
]

MXINT_BLOCK = 16
SCALE_FLOOR = 1e-4  # L2QER: activation magnitudes are clamped to at least this before normalizing
# the calibration site (CalibrationStats.abs_mean key) holding each linear's input
LINEAR_SITES = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
                "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}
QUANTIZED_SITES = ("attn_in", "o_in", "mlp_in", "down_in", "lowrank")
W_FORMATS = ("mxint", "int")


class LQERConfigError(ValueError):
    """Invalid LQER settings or inputs; the message names the setting and the fix."""


def _check_width(width, name: str, *, allow_off: bool) -> int:
    ok = is_int(width) and (int(width) in MXINT_WIDTHS or (allow_off and int(width) >= OFF))
    if not ok:
        allowed = ", ".join(str(w) for w in MXINT_WIDTHS)
        off = f" (or {OFF} to leave it unquantized)" if allow_off else ""
        raise LQERConfigError(f"{name}: MXINT width must be one of {allowed}{off} (bits per element "
                              f"including the sign), got {width!r}")
    return int(width)


# ----------------------------------------------------------------------------------------------
# 1. the L2QER scale and the SVD correction (float64 NumPy)
# ----------------------------------------------------------------------------------------------
def l2qer_scale(abs_mean) -> np.ndarray:
    """abs_mean: [d_in] (max over calibration windows of the mean |x| per channel) -> s: [d_in]
    float64: ``s = max(abs_mean, 1e-4)``, then ``s / sqrt(min(s) * max(s))`` (so min(s) and
    max(s) are reciprocal: the scale is centered on 1 geometrically)."""
    a = np.asarray(abs_mean, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise LQERConfigError(f"l2qer_scale needs a non-empty 1-D abs_mean [d_in], got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise LQERConfigError("l2qer_scale: abs_mean must be finite and >= 0 (mean |x| per channel); "
                              "check the calibration statistics")
    s = np.maximum(a, SCALE_FLOOR)
    return s / np.sqrt(s.min() * s.max())


def _check_rank(rank, d_in: int, d_out: int) -> int:
    limit = min(d_in, d_out)
    if not is_int(rank) or not 1 <= int(rank) <= limit:
        raise LQERConfigError(f"rank must be an integer in 1..min(d_in, d_out) = {limit} for a "
                              f"[{d_in}, {d_out}] weight, got {rank!r}; lower the rank")
    return int(rank)


def lowrank_correction(w, w_q, rank: int, scale=None) -> tuple[np.ndarray, np.ndarray]:
    """Rank-k correction of the quantization error of ``w: [d_in, d_out]`` (``w_q`` same shape).

    E = w - w_q in float64. LQER (scale None): SVD(E) -> A = U_k [d_in, k], B = S_k V_k^T
    [k, d_out]. L2QER (scale: [d_in] > 0, see ``l2qer_scale``): SVD(diag(s) E) ->
    A = diag(s)^-1 U_k, B = S_k V_k^T, so diag(s) A B is the best rank-k approximation of
    diag(s) E. Returns float64 (A, B).
    """
    w = np.asarray(w, dtype=np.float64)
    w_q = np.asarray(w_q, dtype=np.float64)
    if w.ndim != 2 or w.shape != w_q.shape:
        raise LQERConfigError(f"w and w_q must be [d_in, d_out] of the same shape, got {w.shape} and {w_q.shape}")
    k = _check_rank(rank, *w.shape)
    e = w - w_q
    s = None
    if scale is not None:
        s = np.asarray(scale, dtype=np.float64)
        if s.shape != (w.shape[0],):
            raise LQERConfigError(f"scale must be [d_in] = [{w.shape[0]}], got shape {s.shape}")
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise LQERConfigError("scale must be finite and > 0 (use l2qer_scale on the activation magnitudes)")
        e = s[:, None] * e
    u, sv, vt = np.linalg.svd(e, full_matrices=False)
    a = u[:, :k]
    if s is not None:
        a = a / s[:, None]
    b = sv[:k, None] * vt[:k]
    return a, b


# ----------------------------------------------------------------------------------------------
# 2. settings
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LQERSpec:
    """LQER / L2QER settings.

    w_format       "mxint" (blocks of ``block`` along d_in, width w_bits in 4/6/8) or "int"
                   (symmetric per output channel, w_bits in 2..8, groups of ``group_size`` rows
                   along d_in; None = one group)
    a_width        MXINT width of the linear inputs: 8 (W4A8) or 6 (W4A6); 16 = float
    lowrank_width  MXINT width of A, B and x @ A (8); 16 = float
    rank           k; 0 = no correction (the plain quantized model)
    scaled         True: L2QER (needs calibration abs_mean), False: LQER
    """

    w_format: str = "mxint"
    w_bits: int = 4
    group_size: int | None = 128
    a_width: int = 8
    lowrank_width: int = 8
    rank: int = 32
    scaled: bool = True
    block: int = MXINT_BLOCK

    def __post_init__(self):
        if self.w_format not in W_FORMATS:
            raise LQERConfigError(f"w_format must be one of {', '.join(W_FORMATS)}, got {self.w_format!r}")
        if self.w_format == "mxint":
            _check_width(self.w_bits, "w_bits", allow_off=False)
        else:
            try:
                check_bits(self.w_bits, "w_bits", allow_off=False)
            except ValueError as e:
                raise LQERConfigError(str(e)) from None
            if self.group_size is not None and (not is_int(self.group_size) or self.group_size <= 0):
                raise LQERConfigError(f"group_size must be a positive integer (e.g. 128) or None for one "
                                      f"group per output channel, got {self.group_size!r}")
        _check_width(self.a_width, "a_width", allow_off=True)
        _check_width(self.lowrank_width, "lowrank_width", allow_off=True)
        if not is_int(self.rank) or self.rank < 0:
            raise LQERConfigError(f"rank must be an integer >= 0 (32 for W4A8; 0 = no correction), "
                                  f"got {self.rank!r}")
        if not isinstance(self.scaled, bool):
            raise LQERConfigError(f"scaled must be True (L2QER) or False (LQER), got {self.scaled!r}")
        if not is_int(self.block) or self.block <= 0:
            raise LQERConfigError(f"block must be a positive integer (MXINT uses 16), got {self.block!r}")

    def hooks(self) -> "MXIntHooks":
        """The activation hooks of this setting (independent of rank / weight format)."""
        return MXIntHooks(a_width=self.a_width, lowrank_width=self.lowrank_width, block=self.block)


# ----------------------------------------------------------------------------------------------
# 3. activation hooks
# ----------------------------------------------------------------------------------------------
def _mxint_ragged(x, width: int, block: int, axis: int):
    """MXINT fake quant along ``axis`` where the last block may be short (zero padding)."""
    n = x.shape[axis]
    pad = (-n) % block
    if pad == 0:
        return fake_quant_mxint(x, width, block, axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    q = fake_quant_mxint(jnp.pad(x, widths), width, block, axis)
    return lax.slice_in_dim(q, 0, n, axis=axis)


@dataclasses.dataclass(frozen=True)
class MXIntHooks(SiteHooks):
    """MXINT fake quantization of the linear inputs (attn_in, o_in, mlp_in, down_in: width
    ``a_width``) and of the low-rank intermediate x @ A (site ``lowrank``: ``lowrank_width``),
    blocks of ``block`` along the last (contraction) axis. Every other site (q, k, v, q_rope,
    k_rope) passes through. Widths >= 16 switch a quantizer off."""

    a_width: int = 8
    lowrank_width: int = 8
    block: int = MXINT_BLOCK

    def __post_init__(self):
        _check_width(self.a_width, "a_width", allow_off=True)
        _check_width(self.lowrank_width, "lowrank_width", allow_off=True)
        if not is_int(self.block) or self.block <= 0:
            raise LQERConfigError(f"block must be a positive integer (MXINT uses 16), got {self.block!r}")

    def __call__(self, site: str, x: jnp.ndarray) -> jnp.ndarray:
        if site in ("attn_in", "mlp_in", "down_in"):
            return x if self.a_width >= OFF else fake_quant_mxint(x, self.a_width, self.block, -1)
        if site == "o_in":  # [B, T, H, hd]: quantize the [B, T, H*hd] row that o_proj contracts
            if self.a_width >= OFF:
                return x
            flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
            return fake_quant_mxint(flat, self.a_width, self.block, -1).reshape(x.shape)
        if site == "lowrank":
            return x if self.lowrank_width >= OFF else _mxint_ragged(x, self.lowrank_width, self.block, x.ndim - 1)
        return x


# ----------------------------------------------------------------------------------------------
# 4. weights
# ----------------------------------------------------------------------------------------------
def quantize_weight(w, spec: LQERSpec) -> np.ndarray:
    """W_q of ``w: [d_in, d_out]``: MXINT (blocks along d_in) or symmetric integer (groups of
    ``spec.group_size`` along d_in), float32 arithmetic. Returns float32 NumPy."""
    w32 = jnp.asarray(w, jnp.float32)
    if w32.ndim != 2:
        raise LQERConfigError(f"weights must be [d_in, d_out], got shape {w32.shape}")
    if spec.w_format == "mxint":
        return np.asarray(fake_quant_mxint(w32, spec.w_bits, spec.block, 0))
    return np.asarray(fake_quant_weight(w32, spec.w_bits, group_size=spec.group_size))


def quantize_lowrank(a, b, lowrank_width: int, block: int = MXINT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """MXINT fake quant of A: [d_in, k] (blocks along d_in) and B: [k, d_out] (blocks along k,
    a ragged last block when k % block != 0) in float32; width >= 16: just cast to float32."""
    a32 = jnp.asarray(a, jnp.float32)
    b32 = jnp.asarray(b, jnp.float32)
    lowrank_width = _check_width(lowrank_width, "lowrank_width", allow_off=True)
    if lowrank_width >= OFF:
        return np.asarray(a32), np.asarray(b32)
    return (np.asarray(fake_quant_mxint(a32, lowrank_width, block, 0)),
            np.asarray(_mxint_ragged(b32, lowrank_width, block, 0)))


def correct_linear(w, w_q, rank: int, scale=None, lowrank_width: int = 8,
                   block: int = MXINT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The quantized correction of one linear: ``lowrank_correction(w, w_q, rank, scale)``
    (float64 SVD of the error against the ORIGINAL w), then A and B MXINT-quantized with
    ``lowrank_width``. Works on any (w, w_q) pair, e.g. rotated weights and their GPTQ W_q.
    Returns (A_q: [d_in, k], B_q: [k, d_out]) float32."""
    a, b = lowrank_correction(w, w_q, rank, scale)
    return quantize_lowrank(a, b, lowrank_width, block)


def _check_abs_mean(config: ModelConfig, weights: Mapping, abs_mean) -> None:
    if abs_mean is None:
        raise LQERConfigError("L2QER (scaled=True) needs calibration abs_mean ({site: [layers, channels]}, "
                              "CalibrationStats.abs_mean); pass it, or use scaled=False for plain LQER")
    for name in LINEARS:
        site = LINEAR_SITES[name]
        if site not in abs_mean:
            raise LQERConfigError(f"abs_mean has no {site!r} entry (needed for {name}); calibrate with "
                                  f"resq_jax.calibration.statistics.calibrate, which records {', '.join(sorted(set(LINEAR_SITES.values())))}")
        d_in = np.shape(weights[f"layers.0.{name}"])[0]
        want = (config.num_layers, d_in)
        if np.shape(abs_mean[site]) != want:
            raise LQERConfigError(f"abs_mean[{site!r}] must be [layers, channels] = {list(want)}, got "
                                  f"{list(np.shape(abs_mean[site]))}; was it calibrated on this model?")


def _check_group_size(config: ModelConfig, weights: Mapping, spec: LQERSpec) -> None:
    if spec.w_format != "int" or spec.group_size is None:
        return
    sizes = sorted({int(np.shape(weights[f"layers.{i}.{n}"])[0]) for i in range(config.num_layers) for n in LINEARS})
    bad = [d for d in sizes if d % spec.group_size]
    if bad:
        g = int(np.gcd.reduce(sizes))
        hint = [c for c in (128, 64, 32, 16) if g % c == 0]
        raise LQERConfigError(
            f"group_size {spec.group_size} does not divide the linear input sizes {bad} of this model; use a "
            f"group size dividing every input size {sizes} (e.g. {hint[0] if hint else g}) or None for one "
            "group per output channel")


def lqer_quantize_weights(config: ModelConfig, weights: Mapping[str, np.ndarray], spec: LQERSpec,
                          abs_mean: Mapping[str, np.ndarray] | None = None) -> dict:
    """A new weights dict: every decoder linear (q, k, v, o, gate, up, down of every layer)
    replaced by its quantized W_q and, for ``spec.rank > 0``, the MXINT-quantized correction
    ``layers.{i}.{name}_lr_a`` [d_in, k] / ``_lr_b`` [k, d_out] computed from the ORIGINAL
    weights. L2QER (``spec.scaled``) takes the scale of each linear from
    ``abs_mean[site][layer]`` (attn_in for q/k/v, o_in for o, mlp_in for gate/up, down_in for
    down; e.g. ``CalibrationStats.abs_mean``). Embeddings, norms, lm_head, biases and online
    transforms are passed through unchanged. Run the result with ``spec.hooks()``."""
    if not isinstance(spec, LQERSpec):
        raise LQERConfigError(f"spec must be an LQERSpec, got {type(spec).__name__}")
    for i in range(config.num_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            if key not in weights:
                raise LQERConfigError(f"weights have no {key!r}; pass a full decoder weights dict for this config")
            if key + "_lr_a" in weights or key + "_lr_b" in weights:
                raise LQERConfigError(f"{key} already has a low-rank correction; quantize the float weights, "
                                      "not an already corrected model")
    _check_group_size(config, weights, spec)
    if spec.rank > 0 and spec.scaled:
        _check_abs_mean(config, weights, abs_mean)
    out = dict(weights)
    for i in range(config.num_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            w = np.asarray(weights[key], np.float32)
            w_q = quantize_weight(w, spec)
            out[key] = w_q
            if spec.rank == 0:
                continue
            scale = l2qer_scale(np.asarray(abs_mean[LINEAR_SITES[name]])[i]) if spec.scaled else None
            try:
                a_q, b_q = correct_linear(w, w_q, spec.rank, scale, spec.lowrank_width, spec.block)
            except LQERConfigError as e:
                raise LQERConfigError(f"{key}: {e}") from None
            out[key + "_lr_a"] = a_q
            out[key + "_lr_b"] = b_q
    return out


def int_lowrank_weights(config: ModelConfig, weights: Mapping[str, np.ndarray], weights_q: Mapping[str, np.ndarray],
                        rank: int, abs_mean: Mapping[str, np.ndarray] | None = None, bits: int = 8) -> dict:
    """L2QER (``abs_mean`` given) or LQER correction of integer-quantized weights.

    ``weights`` are the float weights (e.g. after ResQ's projections are fused) and
    ``weights_q`` the same dict with every decoder linear quantized (RTN or GPTQ). For each
    linear the rank-k correction of ``weights - weights_q`` is added as
    ``layers.{i}.{name}_lr_a`` [d_in, k] / ``_lr_b`` [k, d_out], each fake-quantized symmetric
    per column to ``bits`` (float32 arithmetic). Run the result with hooks that quantize the
    ``lowrank`` site (``FakeQuantHooks`` with ``ActivationSpec.lowrank_bits``)."""
    return int_lowrank_codes(config, weights, weights_q, rank, abs_mean, bits)[0]


def int_lowrank_codes(config: ModelConfig, weights: Mapping[str, np.ndarray], weights_q: Mapping[str, np.ndarray],
                      rank: int, abs_mean: Mapping[str, np.ndarray] | None = None,
                      bits: int = 8) -> tuple[Mapping, dict[str, WeightCodes]]:
    """``int_lowrank_weights`` and the integer codes of every ``_lr_a`` / ``_lr_b`` (WeightCodes,
    one block; empty when bits >= 16), which dequantize exactly to the weights' values."""
    check_bits(bits, "bits", allow_off=True)
    if abs_mean is not None:
        _check_abs_mean(config, weights, abs_mean)
    added: dict[str, np.ndarray] = {}  # the rank-k factors are small: kept in memory over the view of weights_q
    codes: dict[str, WeightCodes] = {}
    for i in range(config.num_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            scale = None if abs_mean is None else l2qer_scale(np.asarray(abs_mean[LINEAR_SITES[name]])[i])
            try:
                a, b = lowrank_correction(weights[key], weights_q[key], rank, scale)
            except LQERConfigError as e:
                raise LQERConfigError(f"{key}: {e}") from None
            for suffix, m in (("_lr_a", a), ("_lr_b", b)):
                m32 = jnp.asarray(m, jnp.float32)
                if bits < OFF:
                    codes[key + suffix] = quantize_weight_sym(m32, bits)
                    m32 = dequantize_weight(codes[key + suffix])
                added[key + suffix] = np.asarray(m32)
    return overlaid(weights_q, added), codes
