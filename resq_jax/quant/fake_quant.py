"""Fake quantization of a decoder: activation/KV quantizers at the sites, weights quantized
then dequantized in place (docs/algorithms.md, Quantizers).

Layouts (the high-precision channels always sit at the end of their group, which is where
the ResQ projections put the high-variance subspace):
  attn_in, mlp_in  per token: first d - r channels a_bits, last r high_bits
  o_in             per (token, head): first hd - r_h channels a_bits, last r_h high_bits
  k, v (the cache) per (token, head): first hd - r_h kv_bits, last r_h high_bits
  q_rope, k_rope   per (token, head) qk_bits (ResQ's int8 model of the online key rotation)
  down_in          per token, uniform down_bits
  lowrank          per token, lowrank_bits (x @ A of an L2QER correction on integer weights)
Bits >= 16 switch a quantizer off. Embeddings, lm_head, Q, softmax and P.V stay in float.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from resq_jax.formats.bits import OFF
from resq_jax.formats.integer import fake_quant_asym, fake_quant_mixed, fake_quant_sym_tensor, fake_quant_weight
from resq_jax.models.decoder import SiteHooks
from resq_jax.models.views import LazyWeights
from resq_jax.quant.layouts import ActivationSpec, WeightSpec


@dataclasses.dataclass(frozen=True)
class FakeQuantHooks(SiteHooks):
    spec: ActivationSpec

    def __call__(self, site: str, x: jnp.ndarray) -> jnp.ndarray:
        s = self.spec
        if site in ("attn_in", "mlp_in"):
            return _mixed(x, s.a_bits, s.high_bits, s.high_residual)
        if site == "o_in":
            return _mixed(x, s.a_bits, s.high_bits, s.high_head)
        if site in ("k", "v"):
            return _mixed(x, s.kv_bits, s.high_bits, s.high_head)
        if site in ("q_rope", "k_rope"):
            return x if s.qk_bits >= OFF else fake_quant_asym(x, s.qk_bits)
        if site == "down_in":
            return _mixed(x, s.down_bits, OFF, 0)
        if site == "lowrank":
            return x if s.lowrank_bits >= OFF else fake_quant_asym(x, s.lowrank_bits)
        return x


def _mixed(x, low_bits: int, high_bits: int, high: int):
    """A site whose (low) bits are off is not quantized at all: its high channels included."""
    if low_bits >= OFF:
        return x
    return fake_quant_mixed(x, low_bits, high_bits, high)


def quantize_weight_rtn(w: np.ndarray, perm: np.ndarray | None, high_rows: int, spec: WeightSpec) -> np.ndarray:
    """Round-to-nearest fake quantization of w: [d_in, d_out] with the high rows last after ``perm``."""
    wp = w if perm is None else w[perm]
    q = np.asarray(fake_quant_weight(jnp.asarray(wp, jnp.float32), spec.w_bits, spec.high_bits, high_rows,
                                     spec.clip_search))
    if perm is None:
        return q
    out = np.empty_like(q)
    out[perm] = q
    return out


def fake_quantize_key_rotation(weights: Mapping[str, np.ndarray], num_layers: int, bits: int = 8):
    """ResQ models the online key rotation as an int8 matrix (symmetric, per tensor); a view
    (models.views.LazyWeights) computing each layer's on access."""
    keys = {f"layers.{i}.key_rotation" for i in range(num_layers)}

    def entry(key):
        if key not in keys or key not in weights:
            return None
        return np.asarray(fake_quant_sym_tensor(jnp.asarray(weights[key], jnp.float32), bits))

    return LazyWeights(weights, entry)
