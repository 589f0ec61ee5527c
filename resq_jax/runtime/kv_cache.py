"""The quantized K/V cache of the packed runtime: per (token, head) asymmetric codes, the high
channels of each head at high_bits.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from resq_jax.formats.bits import OFF
from resq_jax.formats.integer import quantize_mixed
from resq_jax.formats.packing import pack_int4, signed_shift, unpack_int4
from resq_jax.models.config import ModelConfig
from resq_jax.models.decoder import init_cache
from resq_jax.quant.layouts import ActivationSpec
from resq_jax.util.trees import pytree_dataclass as pytree_dataclass

_F32 = jnp.float32


@pytree_dataclass
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
    """x: [B, T, KV, hd] -> KVCodes, the codes of formats.integer.quantize_mixed(x, ...) (one group per head)."""
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


@pytree_dataclass
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
    if spec.kv_bits >= OFF:
        return init_cache(config, batch, max_len)
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    empty = jax.eval_shape(lambda: quantize_kv(jnp.zeros(shape, _F32), spec.kv_bits, spec.high_bits, spec.high_head))
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), empty)  # noqa: E731
    return [QuantizedKVCache(k=zeros(), v=zeros(), low_bits=spec.kv_bits, high_bits=spec.high_bits,
                             high=spec.high_head) for _ in range(config.num_layers)]
