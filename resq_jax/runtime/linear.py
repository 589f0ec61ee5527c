"""The packed linear: integer codes and scales of one weight, its activation quantizer, and the
integer GEMM with its float32 epilogue (docs/algorithms.md, Integer runtime arithmetic).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resq_jax.formats.bits import OFF
from resq_jax.formats.integer import quantize_mixed
from resq_jax.formats.packing import pack_int4_np, signed_shift, unpack_int4, unpack_int4_np
from resq_jax.kernels.gemm_reference import PackedWeights, int_dot
from resq_jax.kernels.mixed_gemm import IMPLS, mixed_gemm, quantize_pack, select_impl
from resq_jax.quant.fake_quant import FakeQuantHooks

_F32 = jnp.float32
F32_EXACT = 2 ** 24  # every integer of magnitude <= 2^24 is a float32


LINEAR_INPUT_SITES = ("attn_in", "mlp_in", "o_in", "down_in")  # quantized inside the packed linears
BLOCKS = ("low", "high")


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
    signed zero point)} for the non-empty blocks, codes of formats.integer.quantize_mixed."""
    codes = quantize_mixed(x, act.low_bits, act.high_bits, act.high, act.group)
    out = {}
    for name, block, bits in (("low", codes.low, act.low_bits), ("high", codes.high, act.high_bits)):
        if block is not None:
            q, zero = signed_shift(block.q, block.zero, bits)
            out[name] = (q, block.scale[..., 0], zero[..., 0])
    return out


def exact_f32_rows(x_bits: int, w_bits: int) -> int:
    """Rows of a float32 dot of signed x_bits x w_bits codes whose every partial sum is an exact
    integer: |sum| <= rows * 2^(x_bits-1) * 2^(w_bits-1) <= 2^24 (4x4 bits: 262144; 8x8: 1024)."""
    return F32_EXACT >> (x_bits + w_bits - 2)


def block_accumulator(xq: jax.Array, zero: jax.Array, wq: jax.Array, colsum: jax.Array,
                      f32_rows: int | None = None) -> tuple[jax.Array, ...]:
    """Zero-point-corrected integer accumulators of one block, exact in int32, one per group.

    xq: int8 [M, G, n]; zero: f32 [M, G] (integer-valued); wq: int8 [G, n, N]; colsum: int32
    [G, N] -> G arrays int32 [M, N]: c_g = sum_k (xq[:, g] - zero[:, g]) wq[g]. ``f32_rows``: see
    _int_dot (the result is the same either way). Groups are separate 2-D GEMMs: XLA's CPU batched
    dot and the [G, M, N] intermediate cost o_proj ~20x its FLOPs."""
    z = zero.astype(jnp.int32)
    return tuple(int_dot(xq[:, g], wq[g], f32_rows) - z[:, g, None] * colsum[g][None, :] for g in range(xq.shape[1]))


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
        pass

        lay = self.layout
        high = lay.high_rows > 0
        pw = PackedWeights(w4=self.w_low[...][0], scale4=self.scale_low[...], colsum4=self.colsum_low[...][0],
                              w8=self.w_high[...][0] if high else None, scale8=self.scale_high[...] if high else None,
                              colsum8=self.colsum_high[...][0] if high else None,
                              bias=None if self.bias is None else self.bias[...])
        px = quantize_pack(x.astype(_F32), lay.act.high, lay.act.low_bits, lay.act.high_bits if high else 8,
                              impl=impl)
        return mixed_gemm(px, pw, impl=impl, out_dtype=_F32)

    def __call__(self, x: jax.Array, hooks=None) -> jax.Array:
        """x: [..., K] -> y: [..., N] (computed in float32, returned in x's dtype). With impl
        "triton" (or "auto" on a GPU with jax_triton) a linear that ``triton_applies`` runs the
        Triton kernels; the others, and every linear on CPU, XLA's integer dot below."""
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
