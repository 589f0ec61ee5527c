"""Packed-integer inference: the quantized model made real (docs/algorithms.md: Quantizers, Integer runtime arithmetic).

``pack_model(qm)`` turns a fake-quant ``methods.QuantizedModel`` into a ``PackedModel`` (integer
weight codes packed, scales, column sums); ``packed_decoder(pm)`` builds the ordinary
``models.decoder.Decoder`` whose seven linears per layer are ``PackedLinear`` modules, run with
``PackedHooks(pm.spec)`` and, for generation, the quantized K/V cache of
``init_packed_cache``.

A packed linear ``y = x @ w + bias``, ``x: [M, K]``, ``w: [K, N]``: K is cut in G groups of
K / G channels (G = 1 for q/k/v/gate/up/down; G = heads for o_proj, whose input is quantized per
(token, head)), each group in a low block (its first K/G - r channels) and a high block (its
last r). The activation codes come from ``quantizers.quantize_mixed`` (the fake-quant numerics
exactly), shifted to the signed grid (``packing.signed_shift``); the weight codes are the
quantizer's own (``QuantizedModel.codes``). Per block b:

    acc_b[g, m, n] = sum_k xq_b[m, g, k] wq_b[g, k, n]        int8 x int8 -> int32 (lax.dot_general)
    c_b[g, m, n]   = acc_b - int32(z_b[m, g]) colsum_b[g, n]  int32, exactly sum_k (q - z) wq
    y[m, n]        = sum_b sum_g (s_b[m, g] sw_b[n]) float32(c_b[g, m, n]) + bias[n]

(one 2-D GEMM per group; the sums over g and b run in that order). Weights with at most 4 bits
are stored two per byte along K (packing.py: low nibble = even index) and unpacked to int8
inside the jitted graph; 5..8-bit blocks are int8. Column sums are derived from the codes when
a linear is built (``with_colsums``), not stored. This is the CPU path (XLA's integer dot; impl
"f32" computes the same integers with float32 GEMMs in chunks short enough to be exact); the
epilogue's order matches resq_jax.kernels.mixed_gemm's reference. ``integer_decoder`` runs a
fake-quant model this way, which is how scripts/quantize.py evaluates the integer recipes.
On an NVIDIA GPU (impl "auto" with jax_triton importable, or "triton") the linears with one
activation group per token and no low-rank term (q/k/v, gate/up, down) run the Triton
quantize-and-pack and mixed GEMM kernels on the same stored arrays instead; o_proj (per-head
groups) and L2QER's low-rank terms stay on XLA's integer dot.

An L2QER correction (``resq+l2qer``) adds Q(Q(x) A) B with int8 A [K, k] and B [k, N] (one
scale per column): t = sum_b s_b sA ((q_b - z_b) A_b) from the input's codes (A's rows split
like the weight's blocks), t quantized per token to ``lowrank_bits`` (the fake path's lowrank
site), then the integer product with B and its epilogue.

What stays as in the fake-quant model: embeddings and lm_head (stored in 16 bits, or as the
int8/int4 codes of resq_jax.embeddings, computed in float32), RMSNorm, RoPE, Q, softmax and
P.V in float32. ResQ's int8 model of the online key
rotation (q/k fake-quantized to 8 bits per (token, head) at the q_rope/k_rope sites, times the
fake-quantized int8 rotation) is kept identical to the fake path: a float product of
dequantized values, so K's codes equal the fake path's. The K/V cache holds codes (low block
packed when <= 4 bits, high block int8, per (token, head) scale and zero of each block) and is
dequantized inside attention, which reproduces the fake-quant K/V exactly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from models.config import ModelConfig
from models.decoder import Decoder
from resq_jax.fake_quant import LINEARS, OFF, ActivationSpec, FakeQuantHooks
from resq_jax.packing import pack_int4, pack_int4_np, signed_shift, unpack_int4, unpack_int4_np
from resq_jax.quantizers import WeightCodes, dequantize_weight, quantize_mixed
from resq_jax.quantizers import pytree_dataclass as _pytree_dataclass

__all__ = ["PackError", "check_packable_config", "ActQuant", "LinearLayout", "PackedLinear", "PackedHooks", "KVCodes",
           "QuantizedKVCache", "PackedModel", "pack_model", "packed_decoder", "init_packed_cache",
           "linear_accumulators", "linear_lowrank", "quantize_input", "LINEAR_INPUT_SITES", "integer_decoder",
           "try_pack", "exact_f32_rows"]

_F32 = jnp.float32
LINEAR_INPUT_SITES = ("attn_in", "mlp_in", "o_in", "down_in")  # quantized inside the packed linears
BLOCKS = ("low", "high")


class PackError(ValueError):
    """A QuantizedModel the packed runtime cannot represent; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# static layouts
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ActQuant:
    """Per-token asymmetric quantizer of a packed linear's input ``x: [..., K]`` (quantize_mixed's
    arguments): groups of ``group`` channels (None: one group of K), in each group the last
    ``high`` channels in ``high_bits`` and the others in ``low_bits``."""

    low_bits: int
    high_bits: int
    high: int
    group: int | None = None

    def bits(self, block: str) -> int:
        return self.low_bits if block == "low" else self.high_bits


@dataclasses.dataclass(frozen=True)
class LinearLayout:
    """Static layout of one kind of packed linear (the same in every layer).

    ``w: [d_in, d_out]`` in ``groups`` groups of ``low_rows + high_rows`` input rows; the weight
    blocks have ``w_low_bits`` / ``w_high_bits`` (a block of <= 4 bits is stored packed)."""

    d_in: int
    d_out: int
    groups: int
    low_rows: int
    high_rows: int
    w_low_bits: int
    w_high_bits: int
    act: ActQuant
    rank: int = 0  # k of an L2QER correction Q(Q(x) A) B (0: none); A, B int8 per column
    lowrank_bits: int = 8  # per-token activation bits of x @ A

    def rows(self, block: str) -> int:
        return self.low_rows if block == "low" else self.high_rows

    def bits(self, block: str) -> int:
        return self.w_low_bits if block == "low" else self.w_high_bits

    def stored_shape(self, block: str) -> tuple[int, int, int]:
        """Shape of the stored int8 codes of a block: [G, rows (halved, rounded up, if packed), N]."""
        rows = self.rows(block)
        return self.groups, (rows + 1) // 2 if self.bits(block) <= 4 else rows, self.d_out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "LinearLayout":
        d = dict(d)
        return cls(**{**d, "act": ActQuant(**d["act"])})


# ----------------------------------------------------------------------------------------------
# pure functions over arrays
# ----------------------------------------------------------------------------------------------
def pack_block_np(q: np.ndarray, bits: int) -> np.ndarray:
    """q: int8 [G, rows, N] codes -> stored int8: packed two per byte along rows (a zero row
    appended when rows is odd) when bits <= 4, else unchanged."""
    if bits > 4:
        return np.ascontiguousarray(q, dtype=np.int8)
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros_like(q[:, :1])], axis=1)
    return pack_int4_np(q, axis=1)


def with_colsums(layout: LinearLayout, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed linear's stored arrays plus their column sums (int32 [G, N]: ``colsum_b`` of the
    weight blocks, ``lr_a_colsum_b`` / ``lr_b_colsum`` of a low-rank A and B), derived from the
    codes when the linear is built rather than stored."""
    out = dict(arrays)
    for b in BLOCKS:
        if layout.rows(b):
            w = np.asarray(arrays[f"w_{b}"])
            q = unpack_int4_np(w, axis=1)[:, :layout.rows(b)] if layout.bits(b) <= 4 else w
            out[f"colsum_{b}"] = q.sum(axis=1, dtype=np.int32)
            if layout.rank:
                out[f"lr_a_colsum_{b}"] = np.asarray(arrays[f"lr_a_{b}"]).sum(axis=1, dtype=np.int32)
    if layout.rank:
        out["lr_b_colsum"] = np.asarray(arrays["lr_b"]).sum(axis=1, dtype=np.int32)
    return out


def unpack_block(p: jax.Array, rows: int, bits: int) -> jax.Array:
    """Stored codes [G, rows', N] -> int8 [G, rows, N] (inverse of pack_block_np, in the graph)."""
    return unpack_int4(p, axis=1)[:, :rows] if bits <= 4 else p


def quantize_input(x: jax.Array, act: ActQuant) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """x: [M, K] -> {block: (q int8 [M, G, n] signed codes, scale f32 [M, G], zero f32 [M, G]
    signed zero point)} for the non-empty blocks, codes of quantizers.quantize_mixed."""
    codes = quantize_mixed(x, act.low_bits, act.high_bits, act.high, act.group)
    out = {}
    for name, block, bits in (("low", codes.low, act.low_bits), ("high", codes.high, act.high_bits)):
        if block is not None:
            q, zero = signed_shift(block.q, block.zero, bits)
            out[name] = (q, block.scale[..., 0], zero[..., 0])
    return out


F32_EXACT = 2 ** 24  # every integer of magnitude <= 2^24 is a float32


def exact_f32_rows(x_bits: int, w_bits: int) -> int:
    """Rows of a float32 dot of signed x_bits x w_bits codes whose every partial sum is an exact
    integer: |sum| <= rows * 2^(x_bits-1) * 2^(w_bits-1) <= 2^24 (4x4 bits: 262144; 8x8: 1024)."""
    return F32_EXACT >> (x_bits + w_bits - 2)


def _int_dot(a: jax.Array, b: jax.Array, f32_rows: int | None) -> jax.Array:
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


def block_accumulator(xq: jax.Array, zero: jax.Array, wq: jax.Array, colsum: jax.Array,
                      f32_rows: int | None = None) -> tuple[jax.Array, ...]:
    """Zero-point-corrected integer accumulators of one block, exact in int32, one per group.

    xq: int8 [M, G, n]; zero: f32 [M, G] (integer-valued); wq: int8 [G, n, N]; colsum: int32
    [G, N] -> G arrays int32 [M, N]: c_g = sum_k (xq[:, g] - zero[:, g]) wq[g]. ``f32_rows``: see
    _int_dot (the result is the same either way). Groups are separate 2-D GEMMs: XLA's CPU batched
    dot and the [G, M, N] intermediate cost o_proj ~20x its FLOPs."""
    z = zero.astype(jnp.int32)
    return tuple(_int_dot(xq[:, g], wq[g], f32_rows) - z[:, g, None] * colsum[g][None, :] for g in range(xq.shape[1]))


def block_output(c: tuple[jax.Array, ...], scale_x: jax.Array, scale_w: jax.Array) -> jax.Array:
    """c: G arrays int32 [M, N]; scale_x: f32 [M, G]; scale_w: f32 [N] -> f32 [M, N] =
    sum over g in order of (scale_x[m, g] * scale_w[n]) * float32(c_g[m, n])."""
    y = None
    for g, cg in enumerate(c):
        term = (scale_x[:, g, None] * scale_w[None, :]) * cg.astype(_F32)
        y = term if y is None else y + term
    return y


# ----------------------------------------------------------------------------------------------
# the packed linear
# ----------------------------------------------------------------------------------------------
class Packed(nnx.Variable):
    """Packed integer codes and their float scales (not trainable)."""


def _var(a):
    return nnx.data(None if a is None else Packed(jnp.asarray(a)))


class PackedLinear(nnx.Module):
    """A decoder linear on integer codes (module docstring). Arrays, for each block b in
    (low, high) present in the layout: ``w_b`` stored int8 codes (LinearLayout.stored_shape),
    ``scale_b`` f32 [N], ``colsum_b`` int32 [G, N] (derived here); ``bias`` f32 [N] or None. With
    ``layout.rank`` k > 0, the low-rank correction's int8 codes: ``lr_a_b`` [G, rows_b, k] (A's
    rows in the weight's block layout), ``lr_a_colsum_b`` int32 [G, k], ``lr_a_scale`` f32 [k],
    ``lr_b`` [1, k, N], ``lr_b_colsum`` int32 [1, N], ``lr_b_scale`` f32 [N]."""

    def __init__(self, layout: LinearLayout, arrays: Mapping[str, np.ndarray], impl: str = "auto"):
        from resq_jax.kernels.mixed_gemm import IMPLS

        if impl not in (*IMPLS, "f32"):
            raise ValueError(f"impl must be one of {(*IMPLS, 'f32')}, got {impl!r}")
        self.layout = layout
        # "auto": the Triton mixed GEMM where it applies on a GPU, else XLA's integer dot ("jnp");
        # "f32": float32 dots of the codes in exact chunks (the same integers)
        self.impl = impl
        arrays = with_colsums(layout, arrays)
        for b in BLOCKS:
            present = layout.rows(b) > 0
            for f in ("w", "scale", "colsum"):
                setattr(self, f"{f}_{b}", _var(arrays[f"{f}_{b}"] if present else None))
            for f in ("lr_a", "lr_a_colsum"):
                setattr(self, f"{f}_{b}", _var(arrays[f"{f}_{b}"] if present and layout.rank else None))
        for f in ("lr_a_scale", "lr_b", "lr_b_colsum", "lr_b_scale"):
            setattr(self, f, _var(arrays[f] if layout.rank else None))
        self.bias = _var(arrays.get("bias"))

    def accumulators(self, x: jax.Array) -> tuple[dict[str, jax.Array], dict]:
        """x: [M, K] float -> ({block: G zero-corrected accumulators int32 [M, N]}, the input's
        codes from quantize_input)."""
        lay = self.layout
        codes = quantize_input(x, lay.act)
        accs = {}
        for b, (xq, _, zero) in codes.items():
            wq = unpack_block(getattr(self, f"w_{b}")[...], lay.rows(b), lay.bits(b))
            accs[b] = block_accumulator(xq, zero, wq, getattr(self, f"colsum_{b}")[...],
                                        self._f32_rows(lay.act.bits(b), lay.bits(b)))
        return accs, codes

    def _f32_rows(self, x_bits: int, w_bits: int) -> int | None:
        """Chunk rows of the float32 integer dots with impl "f32" (None: XLA's int8 dot)."""
        return exact_f32_rows(x_bits, w_bits) if self.impl == "f32" else None

    def lowrank_accumulators(self, codes: dict) -> tuple[jax.Array, jax.Array, dict]:
        """The correction Q(Q(x) A) B from the input's codes (quantize_input of x: [M, K]):
        t = sum_b s_b sA (int32 acc of (q_b - z_b) A_b): [M, k], quantized per token to
        ``lowrank_bits`` (the fake path's ``lowrank`` site), then its integer product with B.
        Returns (t float32 [M, k], B's accumulator (one int32 [M, N]), t's codes)."""
        lay = self.layout
        t = None
        for b, (xq, scale, zero) in codes.items():
            acc = block_accumulator(xq, zero, getattr(self, f"lr_a_{b}")[...], getattr(self, f"lr_a_colsum_{b}")[...],
                                    self._f32_rows(lay.act.bits(b), 8))
            term = block_output(acc, scale, self.lr_a_scale[...])
            t = term if t is None else t + term
        t_codes = quantize_input(t, ActQuant(lay.lowrank_bits, OFF, 0))
        tq, _, tz = t_codes["low"]
        return t, block_accumulator(tq, tz, self.lr_b[...], self.lr_b_colsum[...],
                                    self._f32_rows(lay.lowrank_bits, 8)), t_codes

    def triton_applies(self) -> bool:
        """Whether the Triton mixed GEMM (resq_jax.kernels.mixed_gemm) can run this linear: one
        activation group per token (not o_proj's per-head groups), no low-rank correction, a
        low block of <= 4 bits with an even number of rows and a high block of <= 8 bits whose
        width equals the activations' high channels."""
        lay = self.layout
        return (lay.groups == 1 and not lay.rank and lay.w_low_bits <= 4 and lay.act.low_bits <= 4
                and lay.low_rows > 0 and lay.low_rows % 2 == 0 and lay.high_rows == lay.act.high
                and (lay.high_rows == 0 or (lay.w_high_bits <= 8 and lay.act.high_bits <= 8)))

    def _mixed_gemm(self, x: jax.Array, impl: str) -> jax.Array:
        """y through kernels.mixed_gemm (quantize_pack + the fused int4/int8 GEMM), float32."""
        from resq_jax.kernels import mixed_gemm as mg

        lay = self.layout
        high = lay.high_rows > 0
        pw = mg.PackedWeights(w4=self.w_low[...][0], scale4=self.scale_low[...], colsum4=self.colsum_low[...][0],
                              w8=self.w_high[...][0] if high else None, scale8=self.scale_high[...] if high else None,
                              colsum8=self.colsum_high[...][0] if high else None,
                              bias=None if self.bias is None else self.bias[...])
        px = mg.quantize_pack(x.astype(_F32), lay.act.high, lay.act.low_bits, lay.act.high_bits if high else 8,
                              impl=impl)
        return mg.mixed_gemm(px, pw, impl=impl, out_dtype=_F32)

    def __call__(self, x: jax.Array, hooks=None) -> jax.Array:
        """x: [..., K] -> y: [..., N] (computed in float32, returned in x's dtype). With impl
        "triton" (or "auto" on a GPU with jax_triton) a linear that ``triton_applies`` runs the
        Triton kernels; the others, and every linear on CPU, XLA's integer dot below."""
        from resq_jax.kernels.mixed_gemm import select_impl

        if self.impl not in ("jnp", "f32") and self.triton_applies() and select_impl(self.impl) == "triton":
            return self._mixed_gemm(x, "triton").astype(x.dtype)
        lead = x.shape[:-1]
        accs, codes = self.accumulators(x.reshape(-1, x.shape[-1]))
        y = None
        for b, c in accs.items():
            term = block_output(c, codes[b][1], getattr(self, f"scale_{b}")[...])
            y = term if y is None else y + term
        if self.layout.rank:
            _, acc, t_codes = self.lowrank_accumulators(codes)
            y = y + block_output(acc, t_codes["low"][1], self.lr_b_scale[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*lead, self.layout.d_out).astype(x.dtype)


def linear_accumulators(lin: PackedLinear, x: jax.Array) -> dict[str, np.ndarray]:
    """Jitted integer accumulators of a packed linear on x: [M, K]: {block: int32 [G, M, N]} (the
    groups stacked)."""
    graphdef, state = nnx.split(lin)
    return {k: np.stack([np.asarray(g) for g in v]) for k, v in _accumulators(graphdef, state, x).items()}


@functools.partial(jax.jit, static_argnums=0)
def _accumulators(graphdef, state, x):
    return nnx.merge(graphdef, state).accumulators(x)[0]


def linear_lowrank(lin: PackedLinear, x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Jitted low-rank branch of a packed linear with rank k on x: [M, K]: (t = Q(x) A float32
    [M, k], int32 [1, M, N] zero-corrected accumulator of Q(t) B)."""
    graphdef, state = nnx.split(lin)
    t, acc = _lowrank(graphdef, state, x)
    return np.asarray(t), np.stack([np.asarray(g) for g in acc])


@functools.partial(jax.jit, static_argnums=0)
def _lowrank(graphdef, state, x):
    lin = nnx.merge(graphdef, state)
    t, acc, _ = lin.lowrank_accumulators(quantize_input(x, lin.layout.act))
    return t, acc


# ----------------------------------------------------------------------------------------------
# hooks and the quantized K/V cache
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackedHooks(FakeQuantHooks):
    """The fake-quant hooks minus the linear inputs (attn_in, mlp_in, o_in, down_in), which the
    packed linears quantize themselves. q_rope/k_rope and k/v (without a quantized cache) keep
    the fake numerics, which the integer codes reproduce exactly."""

    def __call__(self, site: str, x: jnp.ndarray) -> jnp.ndarray:
        if site in LINEAR_INPUT_SITES:
            return x
        return super().__call__(site, x)


@_pytree_dataclass
class KVCodes:
    """Codes of k or v: [B, S, KV, hd] per (token, head): the first hd - r channels in
    ``low_bits`` (packed two per byte when <= 4 bits), the last r in ``high_bits``.

    low:   int8 [B, S, KV, ceil((hd - r) / 2)] (or [B, S, KV, hd - r] when low_bits > 4)
    high:  int8 [B, S, KV, r]
    scale: f32 [B, S, KV, nb]   nb = 2 (low, high), 1 when r = 0
    zero:  f32 [B, S, KV, nb]   signed zero points (zero - 2^(bits-1))
    """

    low: jax.Array
    high: jax.Array
    scale: jax.Array
    zero: jax.Array


def quantize_kv(x: jax.Array, low_bits: int, high_bits: int, high: int) -> KVCodes:
    """x: [B, T, KV, hd] -> KVCodes, the codes of quantizers.quantize_mixed(x, ...) (one group per head)."""
    codes = quantize_mixed(x, low_bits, high_bits, high)
    q_lo, z_lo = signed_shift(codes.low.q[..., 0, :], codes.low.zero[..., 0, :], low_bits)
    if low_bits <= 4:
        if q_lo.shape[-1] % 2:
            q_lo = jnp.concatenate([q_lo, jnp.zeros_like(q_lo[..., :1])], axis=-1)
        q_lo = pack_int4(q_lo, axis=-1)
    scales, zeros = [codes.low.scale[..., 0, :]], [z_lo]
    q_hi = jnp.zeros((*x.shape[:-1], 0), jnp.int8)
    if high:
        q_hi, z_hi = signed_shift(codes.high.q[..., 0, :], codes.high.zero[..., 0, :], high_bits)
        scales.append(codes.high.scale[..., 0, :])
        zeros.append(z_hi)
    return KVCodes(low=q_lo, high=q_hi, scale=jnp.concatenate(scales, -1), zero=jnp.concatenate(zeros, -1))


def dequantize_kv(c: KVCodes, low_bits: int, head_dim: int) -> jax.Array:
    """KVCodes -> f32 [B, S, KV, hd]: (q - zero) * scale per block (bitwise the fake-quant values)."""
    n_low = head_dim - c.high.shape[-1]
    q_lo = unpack_int4(c.low, axis=-1)[..., :n_low] if low_bits <= 4 else c.low
    parts = [(q_lo.astype(_F32) - c.zero[..., :1]) * c.scale[..., :1]]
    if c.high.shape[-1]:
        parts.append((c.high.astype(_F32) - c.zero[..., 1:]) * c.scale[..., 1:])
    return jnp.concatenate(parts, axis=-1)


@_pytree_dataclass
class QuantizedKVCache:
    """One layer's K/V cache held as codes (KVCodes of k after the key rotation, and of v) for
    ``max_len`` positions; ``write`` is what models.decoder calls for a non-dict cache."""

    k: KVCodes
    v: KVCodes
    low_bits: int = dataclasses.field(metadata={"static": True})
    high_bits: int = dataclasses.field(metadata={"static": True})
    high: int = dataclasses.field(metadata={"static": True})

    def write(self, k: jax.Array, v: jax.Array, index) -> tuple[jax.Array, jax.Array, "QuantizedKVCache"]:
        """k, v: [B, T, KV, hd] (unquantized) at positions index.. -> (k_all, v_all: f32 [B, S, KV, hd]
        dequantized, the updated cache)."""
        hd = k.shape[-1]
        new = {}
        for name, x in (("k", k), ("v", v)):
            codes = quantize_kv(x, self.low_bits, self.high_bits, self.high)
            old = getattr(self, name)
            new[name] = jax.tree.map(lambda a, u: lax.dynamic_update_slice(a, u, (0, index, 0, 0)), old, codes)
        cache = dataclasses.replace(self, **new)
        return (dequantize_kv(cache.k, self.low_bits, hd).astype(k.dtype),
                dequantize_kv(cache.v, self.low_bits, hd).astype(v.dtype), cache)


def init_packed_cache(config: ModelConfig, spec: ActivationSpec, batch: int, max_len: int) -> list:
    """Empty quantized K/V cache per layer (a float cache from models.decoder.init_cache when the
    KV cache is not quantized, kv_bits >= 16)."""
    from models.decoder import init_cache

    if spec.kv_bits >= OFF:
        return init_cache(config, batch, max_len)
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    empty = jax.eval_shape(lambda: quantize_kv(jnp.zeros(shape, _F32), spec.kv_bits, spec.high_bits, spec.high_head))
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), empty)  # noqa: E731
    return [QuantizedKVCache(k=zeros(), v=zeros(), low_bits=spec.kv_bits, high_bits=spec.high_bits,
                             high=spec.high_head) for _ in range(config.num_layers)]


# ----------------------------------------------------------------------------------------------
# the packed model
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PackedModel:
    """A quantized model in packed form: everything the packed runtime and a checkpoint need.

    arrays:     flat {name: np.ndarray}: float ``embed`` / ``lm_head`` (16-bit), ``norm``,
                ``layers.{i}.attn_norm`` / ``mlp_norm`` / ``key_rotation`` (float32), and per linear
                ``layers.{i}.{name}.{w,scale,colsum}_{low,high}`` and ``.bias``
    layouts:    {linear name: LinearLayout}, the same in every layer
    spec:       the activation / KV quantizers (ActivationSpec)
    down_hadamard: size of the online down_proj Hadamard (0: none)
    qconfig:    the QuantConfig as a dict
    transforms: the recipe's projections (float32; residual [d, d], value [L, KV, hd, hd],
                key [L, hd, hd]) for inspection and reuse; the runtime does not need them
    embedding:  how the embeddings are stored: {"bits": 16} (float ``embed`` / ``lm_head``) or
                {"bits", "group", "head"} for resq_jax.embeddings codes (embedding_arrays)
    """

    config: ModelConfig
    arrays: dict[str, np.ndarray]
    layouts: dict[str, LinearLayout]
    spec: ActivationSpec
    down_hadamard: int
    qconfig: dict
    transforms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    embedding: dict = dataclasses.field(default_factory=lambda: {"bits": 16})

    @property
    def hooks(self) -> PackedHooks:
        return PackedHooks(self.spec)

    def linear_arrays(self, i: int, name: str) -> dict[str, np.ndarray]:
        prefix = f"layers.{i}.{name}."
        return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}


def _layouts(config: ModelConfig, spec: ActivationSpec, codes: Mapping[str, WeightCodes]) -> dict[str, LinearLayout]:
    hd, heads = config.head_dim, config.num_heads
    out = {}
    for name in LINEARS:
        c = codes[f"layers.0.{name}"]
        d_in, d_out = c.q_low.shape[0] + c.q_high.shape[0], c.q_low.shape[1]
        if name == "o":
            groups, act = heads, ActQuant(spec.a_bits, spec.high_bits, spec.high_head, hd)
        elif name == "down":
            groups, act = 1, ActQuant(spec.down_bits, OFF, 0)
        else:
            groups, act = 1, ActQuant(spec.a_bits, spec.high_bits, spec.high_residual)
        high_rows = c.q_high.shape[0] // groups
        if c.q_high.shape[0] != groups * act.high:
            raise PackError(f"{name}: the weights have {c.q_high.shape[0]} high rows for {groups} group(s), the "
                            f"activations {act.high} high channels per group: quantize weights and activations "
                            "with the same --high-fraction")
        lr = codes.get(f"layers.0.{name}_lr_a")
        rank = 0 if lr is None else lr.q_low.shape[1]
        if rank and spec.lowrank_bits >= OFF:
            raise PackError(f"{name}: a low-rank correction whose x @ A is not quantized (lowrank_bits "
                            f"{spec.lowrank_bits}); the packed runtime needs integer activations")
        out[name] = LinearLayout(d_in=d_in, d_out=d_out, groups=groups, low_rows=d_in // groups - high_rows,
                                 high_rows=high_rows, w_low_bits=c.low_bits, w_high_bits=c.high_bits, act=act,
                                 rank=rank, lowrank_bits=spec.lowrank_bits if rank else 8)
    return out


def check_packable_config(qc) -> None:
    """Raise PackError, before any work, when a methods.QuantConfig gives a model the packed
    runtime cannot represent (pack_model checks the model itself again)."""
    recipe = qc.recipe
    if not recipe.quantize or qc.w_bits >= OFF:
        raise PackError(f"method {qc.method!r} with w_bits={qc.w_bits} leaves the weights in float: nothing to pack")
    if getattr(recipe, "formats", "int") != "int":
        raise PackError(f"method {qc.method!r} uses MXINT formats; the packed runtime runs the integer recipes "
                        "(rtn, gptq, quarot, resq, resq+l2qer) only")
    if qc.a_bits >= OFF or (qc.fraction > 0 and qc.high_bits >= OFF):
        raise PackError(f"the packed runtime needs integer activations (a_bits={qc.a_bits}, "
                        f"high_bits={qc.high_bits}); use --a-bits and --high-bits in 2..8")


def _check_packable(qm) -> ActivationSpec:
    hooks = qm.hooks
    if type(hooks) is not FakeQuantHooks:
        raise PackError(f"method {qm.qconfig.method!r} uses {type(hooks).__name__}; the packed runtime runs the "
                        "integer recipes (rtn, gptq, quarot, resq, resq+l2qer) only")
    spec = hooks.spec
    missing = [k for k in qm.weights if k.endswith(("_lr_a", "_lr_b")) and k not in qm.codes]
    if missing:
        raise PackError(f"{missing[0]}: a low-rank correction without integer codes (A and B must be quantized "
                        "to int8, as resq+l2qer does); evaluate it with fake quantization")
    if not qm.codes:
        raise PackError("the model's weights are not quantized (w_bits 16 or method 'none'): nothing to pack")
    bad = [f"{n}={getattr(spec, n)}" for n in ("a_bits", "down_bits") if getattr(spec, n) >= OFF]
    if spec.high_residual or spec.high_head:
        bad += [f"high_bits={spec.high_bits}"] if spec.high_bits >= OFF else []
    if bad:
        raise PackError(f"the packed runtime needs integer activations: {', '.join(bad)}; quantize with "
                        "--a-bits and --high-bits in 2..8")
    return spec


def _row_perm(config: ModelConfig, lay: LinearLayout, key: str) -> np.ndarray | None:
    """The stored row order of linear ``key`` (``layers.{i}.{name}``): o_proj with high rows has
    every head's high rows last (fake_quant.head_high_last_permutation); None for the others."""
    from resq_jax.fake_quant import head_high_last_permutation

    if key.endswith(".o") and lay.high_rows:
        return head_high_last_permutation(config.num_heads, config.head_dim, lay.high_rows)
    return None


def _linear_codes(config: ModelConfig, lay: LinearLayout, codes: WeightCodes, w_fake: np.ndarray, key: str,
                  bias: np.ndarray | None) -> dict[str, np.ndarray]:
    """Pack one linear's WeightCodes (rows in linear_high_rows order) after checking that they are
    the codes of the fake-quant weights ``w_fake: [d_in, d_out]``."""
    if codes.group_size is not None:
        raise PackError(f"{key}: weights quantized with group_size={codes.group_size}; the packed runtime has "
                        "one scale per output column and block")
    deq = np.asarray(dequantize_weight(codes))
    perm = _row_perm(config, lay, key)
    if not np.array_equal(deq, w_fake if perm is None else w_fake[perm]):
        raise PackError(f"{key}: the weight codes do not dequantize to the model's weights (were the weights "
                        "changed after quantization?); re-run quantize_model")
    g, n = lay.groups, lay.d_out
    out = {}
    for b, q, scale in (("low", codes.q_low, codes.scale_low), ("high", codes.q_high, codes.scale_high)):
        if lay.rows(b) == 0:
            continue
        q = np.asarray(q, np.int8).reshape(g, lay.rows(b), n)
        out[f"w_{b}"] = pack_block_np(q, lay.bits(b))
        out[f"scale_{b}"] = np.asarray(scale, np.float32).reshape(n)
    if bias is not None:
        out["bias"] = np.asarray(bias, np.float32)
    return out


def _lowrank_codes(lay: LinearLayout, perm: np.ndarray | None, a: WeightCodes, b: WeightCodes,
                   a_fake: np.ndarray, b_fake: np.ndarray, key: str) -> dict[str, np.ndarray]:
    """Int8 arrays of a linear's low-rank correction (PackedLinear's ``lr_*``): A [d_in, k] in
    the rows order and blocks of the weight (``perm``: o_proj's head layout), B [k, d_out]."""
    for c, fake, what in ((a, a_fake, "A"), (b, b_fake, "B")):
        if c.q_high.shape[0] or c.group_size is not None or c.low_bits > 8:
            raise PackError(f"{key}: the low-rank {what} must be int8 codes with one scale per column")
        if not np.array_equal(np.asarray(dequantize_weight(c)), fake):
            raise PackError(f"{key}: the low-rank {what} codes do not dequantize to the model's matrix; "
                            "re-run quantize_model")
    qa = np.asarray(a.q_low, np.int8)
    qa = qa if perm is None else qa[perm]
    g, k = lay.groups, qa.shape[1]
    n_low = g * lay.low_rows
    out = {"lr_a_scale": np.asarray(a.scale_low, np.float32).reshape(k)}
    for blk, rows in (("low", qa[:n_low]), ("high", qa[n_low:])):
        if lay.rows(blk):
            out[f"lr_a_{blk}"] = rows.reshape(g, lay.rows(blk), k)
    out.update(lr_b=np.asarray(b.q_low, np.int8)[None], lr_b_scale=np.asarray(b.scale_low, np.float32).reshape(-1))
    return out


def embedding_arrays(emb) -> dict[str, np.ndarray]:
    """Stored arrays of resq_jax.embeddings.EmbeddingCodes: ``embed.q`` (int8 codes [V, d], two
    per byte along d at <= 4 bits), ``embed.scale`` (float16 [V, d / group]), the same for
    ``lm_head`` (codes of lm_head^T) of an untied model, ``head_basis`` [d, d] / ``head_gain`` [d]
    (float32) of a tied model whose head is derived from the table."""
    out = {}
    for name, c in (("embed", emb.table), ("lm_head", emb.head)):
        if c is not None:
            out[f"{name}.q"] = pack_int4_np(c.q, axis=1) if c.bits <= 4 else c.q
            out[f"{name}.scale"] = c.scale
    if emb.gain is not None:
        out["head_gain"] = emb.gain
        if emb.basis is not None:
            out["head_basis"] = emb.basis
    return out


def embedding_codes(arrays: Mapping[str, np.ndarray], embedding: Mapping):
    """The inverse of embedding_arrays: EmbeddingCodes from stored arrays and their description."""
    from resq_jax.embeddings import EmbeddingCodes, TableCodes

    bits = int(embedding["bits"])

    def table(name):
        if f"{name}.q" not in arrays:
            return None
        q = np.asarray(arrays[f"{name}.q"])
        return TableCodes(q=unpack_int4_np(q, axis=1) if bits <= 4 else q, scale=np.asarray(arrays[f"{name}.scale"]),
                          bits=bits)

    return EmbeddingCodes(table=table("embed"), head=table("lm_head"), basis=arrays.get("head_basis"),
                          gain=arrays.get("head_gain"))


def pack_model(qm, embed_dtype=np.float16) -> PackedModel:
    """A fake-quant methods.QuantizedModel -> PackedModel (integer recipes, weights quantized,
    integer activations; see PackError). Quantized embeddings (QuantConfig.embed_bits < 16) are
    stored as their codes (embedding_arrays); float ones in ``embed_dtype`` (16 bits, docs/algorithms.md,
    What stays in float; np.float32 keeps the fake path's values exactly)."""
    spec = _check_packable(qm)
    config, w = qm.config, qm.weights
    layouts = _layouts(config, spec, qm.codes)
    arrays: dict[str, np.ndarray] = {"norm": np.asarray(w["norm"], np.float32)}
    emb = qm.codes.get("embed")
    if emb is None:
        arrays["embed"] = np.asarray(w["embed"]).astype(embed_dtype)
        if "lm_head" in w:
            arrays["lm_head"] = np.asarray(w["lm_head"]).astype(embed_dtype)
        embedding = {"bits": 16}
    else:
        arrays.update(embedding_arrays(emb))
        embedding = {"bits": emb.bits, "group": emb.table.group, "head": emb.head_kind}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for k in ("attn_norm", "mlp_norm", "key_rotation"):
            if p + k in w:
                arrays[p + k] = np.asarray(w[p + k], np.float32)
        for name in LINEARS:
            key = p + name
            lay = layouts[name]
            packed = _linear_codes(config, lay, qm.codes[key], np.asarray(w[key], np.float32), key,
                                   w.get(key + "_bias"))
            if lay.rank:
                packed.update(_lowrank_codes(lay, _row_perm(config, lay, key), qm.codes[key + "_lr_a"], qm.codes[key + "_lr_b"],
                                             np.asarray(w[key + "_lr_a"], np.float32),
                                             np.asarray(w[key + "_lr_b"], np.float32), key))
            arrays.update({f"{key}.{f}": a for f, a in packed.items()})
    hadamard = {int(w.get(f"layers.{i}.down_hadamard", 0) or 0) for i in range(config.num_layers)}
    if len(hadamard) != 1:
        raise PackError(f"layers disagree on the down_proj Hadamard size ({sorted(hadamard)})")
    transforms = {k: np.asarray(v, np.float32) for k, v in dataclasses.asdict(qm.transforms).items()
                  if isinstance(v, np.ndarray)}
    return PackedModel(config=config, arrays=arrays, layouts=layouts, spec=spec, down_hadamard=hadamard.pop(),
                       qconfig=qm.qconfig.to_dict(), transforms=transforms, embedding=embedding)


def packed_decoder(pm: PackedModel, impl: str = "auto") -> Decoder:
    """The models.decoder.Decoder of a PackedModel (float params in float32, PackedLinear linears);
    run it with ``pm.hooks`` (and ``init_packed_cache`` for generation). ``impl`` selects the
    GEMM of the linears (PackedLinear): "auto" (Triton kernels on an NVIDIA GPU, XLA elsewhere),
    "jnp" (XLA's integer dot everywhere), "triton", or "f32" (float32 dots of the integer codes
    in exact chunks: the same int32 accumulators, hence bit-identical outputs to "jnp")."""
    from models.decoder import from_weights

    weights: dict = {k: np.asarray(v, np.float32) for k, v in pm.arrays.items()
                     if k in ("embed", "lm_head", "norm") or k.rsplit(".", 1)[-1] in ("attn_norm", "mlp_norm",
                                                                                        "key_rotation")}
    if pm.embedding["bits"] < OFF:
        emb = embedding_codes(pm.arrays, pm.embedding)
        weights["embed"] = emb.embed()
        head = emb.lm_head(weights["embed"])
        if head is not None:
            weights["lm_head"] = head
    for i in range(pm.config.num_layers):
        if pm.down_hadamard:
            weights[f"layers.{i}.down_hadamard"] = pm.down_hadamard
        for name in LINEARS:
            weights[f"layers.{i}.{name}"] = PackedLinear(pm.layouts[name], pm.linear_arrays(i, name), impl)
    return from_weights(pm.config, weights)


def integer_decoder(qm, impl: str = "auto") -> tuple[Decoder, PackedHooks] | None:
    """(decoder, hooks) that evaluate a fake-quant methods.QuantizedModel with the packed
    runtime's integer arithmetic, or None when the packed runtime cannot represent it (PackError:
    float weights or activations, MXINT recipes).

    Why: a W4A4 model's perplexity is not continuous at float-rounding scale. The classic fake
    path (dequantized activations times dequantized weights, float32 GEMMs) rounds differently
    for every batch shape and CPU, and a one-ulp change moves later 4-bit codes across rounding
    ties, so it reproduces itself only to about 0.5% (SmolLM2: -0.75% between batch 4 and 8).
    The integer products here are exact and the float epilogue is the packed runtime's (``impl``
    as in packed_decoder: "auto" picks what the packed runtime runs on this platform; on CPU
    "jnp" and "f32" give the same integers, hence identical outputs), and the model is the one
    pack_model stores (embeddings and lm_head in float16, docs/algorithms.md, What stays in float, or the
    quantized tables of ``embed_bits`` < 16), so the perplexity is the packed checkpoint's."""
    pm, _ = try_pack(qm)
    return None if pm is None else (packed_decoder(pm, impl), pm.hooks)


def try_pack(qm) -> tuple[PackedModel | None, str]:
    """(pack_model(qm), "") or, when the packed runtime cannot represent the model, (None, why): the
    PackError's message, for the caller to tell the user which evaluation path runs instead."""
    try:
        return pack_model(qm), ""
    except PackError as e:
        return None, str(e)

