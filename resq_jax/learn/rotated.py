"""A fused model's loss as a function of extra rotations, applied on the fly to its frozen weights.

The rotations refine a recipe's transforms (rotation.transforms.Transforms) without leaving its layout: the
residual basis becomes ``residual @ Q1`` and every value head's ``value[l, h] @ Q2[l]``, with Q1 and Q2[l]
block-diagonal over the recipe's subspaces (ResQ: the low-variance block, then the high-variance block kept in
8 bits; QuaRot / SpinQuant: one full block), so the high-precision channels stay where the quantizers expect
them. Starting from the fused model of the recipe's transforms (norms folded, untied, down_proj Hadamard fused),
with x -> x Q1 on the residual stream and v -> v Q2[l] per value head:

    embed E Q1;  lm_head Q1^T W;  q, k, v, gate, up rows Q1^T W;  o, down columns W Q1
    v columns of each KV head @ Q2[l] (and its bias);  o rows of each query head Q2[l]^T @ (its KV head's)

The model is unchanged in float (RMSNorm gains are folded to 1, so norm(x Q1) = norm(x) Q1): with identity
hooks the loss does not depend on the rotations (the Riemannian gradient is zero, tests/test_learned_rotations).
With quantizer hooks it does; they pass gradients straight through the rounding (``StraightThrough``). With a
``weight_spec`` the rotated linears are also RTN-quantized in the forward pass (per output channel, the recipe's
high-precision rows in high_bits, no clipping search) and passed straight through in the backward pass, so the
rotations train against the quantized weights as well (``quantize_rotated``).

``rotated_nll`` runs the layers with ``lax.scan`` over their stacked weights and ``jax.checkpoint`` per layer,
so the backward pass keeps one layer's activations at a time plus each layer's input. The frozen weights may be
stored in bfloat16 (``stack_layers``); every layer is cast to float32 before it is rotated, so the arithmetic is
float32 either way and only the stored model is rounded.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resq_jax.formats.integer import fake_quant_weight
from resq_jax.models.config import ModelConfig
from resq_jax.models.decoder import IDENTITY, DecoderLayer, SiteHooks, chunked_kl, chunked_nll, rms_norm
from resq_jax.models.rope import inverse_frequencies, rope_tables
from resq_jax.quant.layouts import LINEARS, WeightSpec, linear_high_rows
from resq_jax.rotation.transforms import Transforms
from resq_jax.transforms.cayley import reorthonormalize
from resq_jax.util.precision import EXACT, exact_matmul

LAYER_KEYS = ("attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down", "q_bias", "k_bias", "v_bias",
              "o_bias", "gate_bias", "up_bias", "down_bias", "key_rotation")


@dataclasses.dataclass(frozen=True)
class StraightThrough(SiteHooks):
    """``inner``'s quantizers in the forward pass, the identity in the backward pass (straight-through)."""

    inner: SiteHooks = IDENTITY

    def __call__(self, site: str, x: jnp.ndarray) -> jnp.ndarray:
        return x + jax.lax.stop_gradient(self.inner(site, x) - x)


def block_diag(blocks: Sequence[jax.Array]) -> jax.Array:
    """blocks [..., n_i, n_i] (the same leading axes) -> [..., N, N] block-diagonal, N = sum n_i."""
    n = sum(b.shape[-1] for b in blocks)
    lead = blocks[0].shape[:-2]
    out = jnp.zeros((*lead, n, n), blocks[0].dtype)
    start = 0
    for b in blocks:
        k = b.shape[-1]
        out = out.at[..., start:start + k, start:start + k].set(b)
        start += k
    return out


def identity_rotations(residual_blocks: Sequence[int], value_blocks: Sequence[int], num_layers: int,
                       dtype=jnp.float32) -> dict:
    """The starting point: {"residual": (I [n, n] per block), "value": (I [L, n, n] per block)}."""
    return {"residual": tuple(jnp.eye(n, dtype=dtype) for n in residual_blocks),
            "value": tuple(jnp.broadcast_to(jnp.eye(n, dtype=dtype), (num_layers, n, n)) for n in value_blocks)}


def stack_layers(config: ModelConfig, weights: Mapping[str, np.ndarray], dtype=jnp.float32) -> dict:
    """A fused model's weights (untied, norms folded) as the frozen input of ``rotated_nll``, on the default device:
    the vocabulary tables, the final norm, and {name: [L, ...]} of the layers' arrays; ``down_hadamard`` an int.

    The linears and the vocabulary tables are stored in ``dtype``: float32, or bfloat16 (half the memory) kept as
    its bit pattern in uint16 (``as_float32`` decodes it), because XLA's CPU backend turns a bfloat16 slice of the
    stack inside the layer loop into a float32 copy of the whole stack outside it. Norms, biases and key rotations
    stay float32. Each array is filled layer by layer on the host (``weights`` may be a view computed on access)
    and moved to the device before the next is built, so the host holds the device copy plus one stacked array."""
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"the frozen model is stored in float32 or bfloat16, not {dtype}")
    big = set(LINEARS) | {"embed", "lm_head"}

    def stored(out: np.ndarray) -> jax.Array:
        return jax.device_put(out.view(np.uint16) if out.dtype == jnp.bfloat16 else out)

    def stacked(name):
        first = np.asarray(weights[f"layers.0.{name}"])
        out = np.empty((config.num_layers, *first.shape), dtype if name in big else np.float32)
        out[0] = first
        for i in range(1, config.num_layers):
            out[i] = np.asarray(weights[f"layers.{i}.{name}"])
        return stored(out)

    if "lm_head" not in weights:
        raise ValueError("rotated_nll needs an untied model (a separate lm_head): fuse the recipe's transforms first")
    return {"embed": stored(np.asarray(weights["embed"], dtype)),
            "lm_head": stored(np.asarray(weights["lm_head"], dtype)),
            "norm": stored(np.asarray(weights["norm"], np.float32)),
            "layers": {name: stacked(name) for name in LAYER_KEYS if f"layers.0.{name}" in weights},
            "down_hadamard": int(weights.get("layers.0.down_hadamard", 0) or 0)}


def frozen_spec(config: ModelConfig, dtype=jnp.float32) -> dict:
    """What ``stack_layers`` returns for a fused model of ``config`` (norms folded, untied, a key rotation and the
    down_proj Hadamard, as every rotation recipe fuses it), with ``jax.ShapeDtypeStruct`` leaves instead of arrays:
    a training step compiles against it without the weights (its memory at 7B on a small machine)."""
    dtype = jnp.dtype(dtype)
    stored = jnp.uint16 if dtype == jnp.bfloat16 else jnp.float32
    n, d, f, v = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv, hd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.head_dim
    big = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    small = {"attn_norm": (d,), "mlp_norm": (d,), "key_rotation": (hd, hd)}
    if config.attention_bias:
        small.update(q_bias=(q,), k_bias=(kv,), v_bias=(kv,))
    layers = {**{k: jax.ShapeDtypeStruct((n, *s), stored) for k, s in big.items()},
              **{k: jax.ShapeDtypeStruct((n, *s), jnp.float32) for k, s in small.items()}}
    return {"embed": jax.ShapeDtypeStruct((v, d), stored), "lm_head": jax.ShapeDtypeStruct((d, v), stored),
            "norm": jax.ShapeDtypeStruct((d,), jnp.float32), "layers": layers, "down_hadamard": f}


def as_float32(x: jax.Array) -> jax.Array:
    """A stored frozen array (``stack_layers``) in float32: bfloat16 bit patterns (uint16) are widened exactly
    (bfloat16 is the top half of a float32), float32 passes through."""
    if x.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    return x.astype(jnp.float32)


def rotate_layer(config: ModelConfig, w: Mapping[str, jax.Array], q1: jax.Array, q2: jax.Array) -> dict:
    """One layer's arrays (``LAYER_KEYS`` names) with the residual rotated by q1 [d, d] and every value head by
    q2 [hd, hd] (module docstring)."""
    kv, hd = config.num_kv_heads, config.head_dim
    group = config.num_heads // kv
    out = dict(w)
    for name in ("q", "k", "v", "gate", "up"):
        out[name] = exact_matmul(q1.T, w[name])
    for name in ("o", "down"):
        out[name] = exact_matmul(w[name], q1)
        if name + "_bias" in w:
            out[name + "_bias"] = exact_matmul(w[name + "_bias"], q1)
    d = config.hidden_size
    out["v"] = jnp.einsum("dkh,he->dke", out["v"].reshape(d, kv, hd), q2, precision=EXACT).reshape(d, kv * hd)
    if "v_bias" in w:
        out["v_bias"] = exact_matmul(w["v_bias"].reshape(kv, hd), q2).reshape(kv * hd)
    o = out["o"].reshape(kv, group, hd, d)
    out["o"] = jnp.einsum("he,kgho->kgeo", q2, o, precision=EXACT).reshape(kv * group * hd, d)
    return out


def quantize_rotated(config: ModelConfig, w: Mapping[str, jax.Array], spec: WeightSpec) -> dict:
    """One layer's rotated arrays with every linear [d_in, d_out] RTN-quantized by ``spec`` in the forward pass
    (rows permuted as the quantizer lays them out, the high rows in high_bits) and the identity in the backward
    pass (straight-through)."""
    out = dict(w)
    for name in LINEARS:
        perm, high = linear_high_rows(config, name, spec)
        x = w[name] if perm is None else w[name][perm]
        q = fake_quant_weight(x, spec.w_bits, spec.high_bits, high)
        if perm is not None:
            q = q[np.argsort(perm)]
        out[name] = w[name] + jax.lax.stop_gradient(q - w[name])
    return out


def rotated_hidden(rotations: dict | None, frozen: dict, tokens: jax.Array, *, config: ModelConfig,
                   hooks: SiteHooks = IDENTITY, weight_spec: WeightSpec | None = None) -> jax.Array:
    """tokens: [B, T] -> [B * (T - 1), d] final normed hidden states of positions 0..T-2 of the model ``frozen``
    (``stack_layers``) with ``rotations`` ({"residual": blocks [n, n], "value": blocks [L, n, n]}) applied on the
    fly, rotated back into ``frozen``'s basis (h Q1^T), so that ``h @ frozen["lm_head"]`` are its logits; with
    ``weight_spec`` its linears RTN-quantized straight-through (``quantize_rotated``). ``rotations=None``: the
    frozen model as it is (no rotation products)."""
    rotated = rotations is not None
    q1 = block_diag(rotations["residual"]) if rotated else None
    q2 = block_diag(rotations["value"]) if rotated else None  # [L, hd, hd]
    t = tokens.shape[1]
    positions = jnp.arange(t)
    cos, sin = rope_tables(jnp.asarray(inverse_frequencies(config)), positions)
    x = as_float32(jnp.take(jnp.asarray(frozen["embed"]), tokens, axis=0))
    x = exact_matmul(x, q1) if rotated else x
    hadamard = frozen["down_hadamard"]

    @jax.checkpoint
    def layer(x, xs):
        w, q2_l = xs
        w = {k: as_float32(v) for k, v in w.items()}
        w = rotate_layer(config, w, q1, q2_l) if rotated else w
        if weight_spec is not None:
            w = quantize_rotated(config, w, weight_spec)
        named = {f"layers.0.{k}": v for k, v in w.items()}
        if hadamard:
            named["layers.0.down_hadamard"] = hadamard
        y, _, _ = DecoderLayer(config, named, 0)(x, cos, sin, positions, hooks)
        return y, None

    x, _ = jax.lax.scan(layer, x, ({k: jnp.asarray(v) for k, v in frozen["layers"].items()}, q2))
    d = x.shape[-1]
    h = rms_norm(x, jnp.asarray(frozen["norm"]), config.rms_eps).astype(jnp.float32)[:, :-1].reshape(-1, d)
    return exact_matmul(h, q1.T) if rotated else h  # (Q1^T W) applied as (h Q1^T) W: no rotated copy of the head


def _head(frozen: dict) -> jax.Array:
    """The frozen lm_head [d, V] as chunked_nll / chunked_kl read it (bfloat16 storage reinterpreted, not widened:
    they widen it a chunk at a time)."""
    head = jnp.asarray(frozen["lm_head"])
    return jax.lax.bitcast_convert_type(head, jnp.bfloat16) if head.dtype == jnp.uint16 else head


def rotated_nll(rotations: dict, frozen: dict, tokens: jax.Array, *, config: ModelConfig,
                hooks: SiteHooks = IDENTITY, weight_spec: WeightSpec | None = None) -> jax.Array:
    """tokens: [B, T] -> mean next-token cross-entropy per window [B] of the rotated model (``rotated_hidden``)."""
    h = rotated_hidden(rotations, frozen, tokens, config=config, hooks=hooks, weight_spec=weight_spec)
    nll = chunked_nll(h, _head(frozen), tokens[:, 1:].reshape(-1), vocab_axis=1)
    return nll.reshape(tokens.shape[0], -1).mean(axis=-1)


def rotated_kl(rotations: dict, frozen: dict, tokens: jax.Array, *, config: ModelConfig,
               hooks: SiteHooks = IDENTITY, weight_spec: WeightSpec | None = None) -> jax.Array:
    """tokens: [B, T] -> mean over positions of KL(float || quantized) per window [B]: the next-token distribution
    of the float model (``frozen`` with identity hooks and float weights, a constant: no gradient flows into it)
    against the rotated model's under ``hooks`` and ``weight_spec``. The float model does not depend on the
    rotations (module docstring), so it is run without them: ``frozen`` as it is."""
    h = rotated_hidden(rotations, frozen, tokens, config=config, hooks=hooks, weight_spec=weight_spec)
    h_float = rotated_hidden(None, frozen, tokens, config=config)
    kl = chunked_kl(h, jax.lax.stop_gradient(h_float), _head(frozen), vocab_axis=1)
    return kl.reshape(tokens.shape[0], -1).mean(axis=-1)


LOSSES = {"ce": rotated_nll, "kl": rotated_kl}  # the training losses by name (--cayley-loss)


def refined_transforms(t: Transforms, rotations: dict) -> Transforms:
    """The recipe's transforms with the learned rotations folded in (float64): residual @ Q1, value[l, h] @ Q2[l];
    fusing these into the float model (rotation.transforms.apply_transforms) gives the weights ``rotated_nll``
    ran on. The float32 rotations (orthogonal to about 1e-6) are first made orthogonal in float64 (QR), so the
    refined bases are as exactly orthogonal as the recipe's and the float model stays invariant."""
    q1 = reorthonormalize(np.asarray(block_diag([jnp.asarray(b) for b in rotations["residual"]]), np.float64))
    q2 = reorthonormalize(np.asarray(block_diag([jnp.asarray(b) for b in rotations["value"]]), np.float64))
    return dataclasses.replace(t, residual=np.asarray(t.residual, np.float64) @ q1,
                               value=np.einsum("lkhi,lij->lkhj", np.asarray(t.value, np.float64), q2))
