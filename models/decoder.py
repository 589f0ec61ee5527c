"""One Flax NNX decoder for Llama (2, 3, 3.2, SmolLM2) and Qwen2/Qwen2.5.

The families differ only by configuration (q/k/v biases, RoPE scaling, epsilon, tied
embeddings). Each layer exposes named *sites* where calibration captures activations and
where quantized runtimes insert quantizers (through a ``SiteHooks`` object):

  attn_in  [B, T, d]          input of q/k/v (RMSNorm output)
  q_rope   [B, T, H, hd]      q after RoPE, before the online key rotation
  k_rope   [B, T, KV, hd]     k after RoPE, before the online key rotation
  q        [B, T, H, hd]      q as it enters q.k (after the key rotation, if any)
  k        [B, T, KV, hd]     k as it enters q.k / the cache (after the key rotation)
  v        [B, T, KV, hd]     v_proj output per KV head (what the cache holds)
  o_in     [B, T, H, hd]      o_proj input (attention output per head)
  mlp_in   [B, T, d]          input of up/gate
  down_in  [B, T, ffn]        down_proj input (after the online Hadamard, if any)
  lowrank  [B, T, k]          x @ A of a linear with a low-rank (LQER) correction

Online transforms are part of the model's state: ``key_rotation`` ([hd, hd], applied to q
and k of every head after RoPE: q.k is unchanged for an orthogonal matrix) and
``down_hadamard`` (static size: the down_proj input is multiplied by the normalized
Hadamard of that size). With identity hooks and no transforms this is a plain float model.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resq_jax.models.config import ModelConfig
from resq_jax.models.rope import apply_rope, inverse_frequencies, rope_tables
from resq_jax.util.precision import EXACT

SITES = ("attn_in", "q_rope", "k_rope", "q", "k", "v", "o_in", "mlp_in", "down_in")


class SiteHooks:
    """Identity hooks: a float model. Subclasses quantize (fake or packed) at sites.

    Hooks must be hashable (they are static arguments of jitted functions) and must not
    depend on the layer index, so one compiled layer serves every layer.
    """

    def __call__(self, site: str, x: jnp.ndarray) -> jnp.ndarray:
        return x

    def __hash__(self):
        return hash(type(self))

    def __eq__(self, other):
        return type(self) is type(other)


IDENTITY = SiteHooks()


class Online(nnx.Variable):
    """An online transform matrix held by the model (not a trainable weight)."""


def as_param(a) -> nnx.Param:
    return nnx.Param(jnp.asarray(a))


class Linear(nnx.Module):
    """y = x @ w + b, plus an optional low-rank correction hooks("lowrank", x @ A) @ B (LQER).

    w: [d_in, d_out]; b: [d_out]; A: [d_in, k]; B: [k, d_out].
    """

    def __init__(self, w, b=None, lr_a=None, lr_b=None):
        self.w = as_param(w)
        self.b = nnx.data(None if b is None else as_param(b))
        self.lr_a = nnx.data(None if lr_a is None else as_param(lr_a))
        self.lr_b = nnx.data(None if lr_b is None else as_param(lr_b))

    def __call__(self, x, hooks: "SiteHooks" = None):
        y = jnp.einsum("...i,io->...o", x, self.w[...].astype(x.dtype), precision=EXACT)
        if self.lr_a is not None:
            t = jnp.einsum("...i,ik->...k", x, self.lr_a[...].astype(x.dtype), precision=EXACT)
            if hooks is not None:
                t = hooks("lowrank", t)
            y = y + jnp.einsum("...k,ko->...o", t, self.lr_b[...].astype(x.dtype), precision=EXACT)
        if self.b is not None:
            y = y + self.b[...].astype(x.dtype)
        return y


def pairwise_sum(v: jnp.ndarray) -> jnp.ndarray:
    """Sum over the last axis in a fixed pairwise order built from elementwise adds: [..., n] ->
    [..., 1]. Every row is summed the same way whatever the array's other dimensions, unlike
    XLA's reduce, whose CPU code sums a row differently for large arrays (measured: RMSNorm of
    [8, 512, 576] vs [4, 512, 576] differed in the last bit), which re-draws a W4A4 model's
    4-bit rounding ties and made its perplexity depend on the batch size."""
    while v.shape[-1] > 1:
        n, h = v.shape[-1], v.shape[-1] // 2
        s = v[..., :h] + v[..., h:2 * h]
        v = jnp.concatenate([s, v[..., 2 * h:]], axis=-1) if n % 2 else s
    return v


def rms_norm(x: jnp.ndarray, gain: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x: [..., d] normalized in float32 then scaled by gain: [d] (transformers' order); the mean
    square is a pairwise_sum, so a row's result does not depend on the batch shape."""
    x32 = x.astype(jnp.float32)
    var = pairwise_sum(x32 * x32) / jnp.float32(x.shape[-1])
    return (gain.astype(jnp.float32) * (x32 * jax.lax.rsqrt(var + eps))).astype(x.dtype)


def _grouped_queries(q: jnp.ndarray, kv: int) -> jnp.ndarray:
    """q: [B, T, H, hd] -> scaled float32 [B, KV, T*G, hd], rows ordered (t, g): the G query
    heads sharing a KV head stacked so each KV head is one large batched matmul."""
    b, t, h, hd = q.shape
    g = h // kv
    qg = q.astype(jnp.float32).reshape(b, t, kv, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, hd)
    return qg * jnp.float32(1.0 / np.sqrt(hd))


def _ungroup(out: jnp.ndarray, t: int, dtype) -> jnp.ndarray:
    """out: [B, KV, T*G, hd] rows ordered (t, g) -> [B, T, H, hd]."""
    b, kv, _, hd = out.shape
    return out.reshape(b, kv, t, -1, hd).transpose(0, 2, 1, 3, 4).reshape(b, t, -1, hd).astype(dtype)


def _attend(qg, kk, vv, mask):
    """Masked softmax attention in float32. qg: [B, KV, M, hd] (scaled); kk, vv: [B, KV, S, hd];
    mask: [M, S] bool (True = attend) -> [B, KV, M, hd]."""
    scores = jnp.einsum("bkmd,bksd->bkms", qg, kk, precision=EXACT)
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return jnp.einsum("bkms,bksd->bkmd", probs, vv, precision=EXACT) / jnp.sum(probs, axis=-1, keepdims=True)


def _kv_major(x: jnp.ndarray) -> jnp.ndarray:
    """[B, S, KV, hd] -> float32 [B, KV, S, hd]."""
    return x.astype(jnp.float32).transpose(0, 2, 1, 3)


def causal_attention(q, k, v, q_positions, left_pad=None):
    """Grouped-query causal attention in float32 against a cache.

    q: [B, T, H, hd]; k, v: [B, S, KV, hd]; q_positions: [T] cache slots of the queries (slot
    s holds the token at slot s, so slots after a query's are masked). left_pad: [B] int or
    None: row b's first left_pad[b] slots are padding of a left-padded batch, masked (a query
    always sees its own slot, so a padding query has a finite softmax). Returns [B, T, H, hd].
    """
    t, kv, s = q.shape[1], k.shape[2], k.shape[1]
    g = q.shape[2] // kv
    slots, pos = jnp.arange(s)[None, :], jnp.repeat(q_positions, g)[:, None]
    mask = slots <= pos  # [T*G, S]
    if left_pad is not None:
        real = slots >= left_pad[:, None]  # [B, S]
        mask = mask & (real[:, None, None, :] | (slots == pos))  # [B, 1, T*G, S]
    out = _attend(_grouped_queries(q, kv), _kv_major(k), _kv_major(v), mask)
    return _ungroup(out, t, q.dtype)


def causal_self_attention(q, k, v, block: int = 128):
    """Causal attention of a sequence on itself (positions 0..T-1, no cache), in float32.

    q: [B, T, H, hd]; k, v: [B, T, KV, hd] -> [B, T, H, hd]. The queries are cut into blocks
    of ``block`` positions and block i attends only to keys 0 .. its last position, so the
    masked upper triangle is never computed (about half the work of ``causal_attention`` at
    T = 512); every row's result is the same masked softmax.
    """
    t, kv = q.shape[1], k.shape[2]
    g = q.shape[2] // kv
    qg, kk, vv = _grouped_queries(q, kv), _kv_major(k), _kv_major(v)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        mask = jnp.arange(end)[None, :] <= jnp.repeat(jnp.arange(start, end), g)[:, None]
        outs.append(_attend(qg[:, :, start * g:end * g], kk[:, :, :end], vv[:, :, :end], mask))
    return _ungroup(jnp.concatenate(outs, axis=2), t, q.dtype)


def online_hadamard(x: jnp.ndarray, n: int) -> jnp.ndarray:
    """x: [..., n] -> x @ H^T with H the normalized size-n Hadamard (native kernel when built)."""
    from resq_jax.kernels.hadamard import hadamard  # native kernel, or the jnp reference with a warning

    return hadamard(x, n)


def _linear(weights: Mapping[str, Any], p: str, name: str) -> nnx.Module:
    """Linear ``p + name`` from its weight (and optional ``_bias``, ``_lr_a``/``_lr_b``); an
    entry that is already a module (e.g. resq_jax.runtime's packed-integer linear, which holds
    its own bias) is used as it is."""
    w = weights[p + name]
    if isinstance(w, nnx.Module):
        return w
    get = lambda n: weights.get(p + name + n)  # noqa: E731
    return Linear(w, get("_bias"), get("_lr_a"), get("_lr_b"))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, weights: Mapping[str, Any], i: int):
        p = f"layers.{i}."
        get = lambda n: weights.get(p + n)  # noqa: E731
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_eps
        self.attn_norm = as_param(weights[p + "attn_norm"])
        self.q, self.k, self.v, self.o = (_linear(weights, p, n) for n in ("q", "k", "v", "o"))
        self.mlp_norm = as_param(weights[p + "mlp_norm"])
        self.gate, self.up, self.down = (_linear(weights, p, n) for n in ("gate", "up", "down"))
        rot = get("key_rotation")
        self.key_rotation = nnx.data(None if rot is None else Online(jnp.asarray(rot)))
        self.down_hadamard = int(weights.get(p + "down_hadamard", 0) or 0)

    def __call__(self, x, cos, sin, positions, hooks: SiteHooks = IDENTITY, cache=None, cache_index=None,
                 capture: tuple[str, ...] = (), left_pad=None):
        """x: [B, T, d] -> (x: [B, T, d], captured sites dict, updated cache or None)."""
        site, sites = site_recorder(hooks, capture)
        a, new_cache = self.attention(x, cos, sin, positions, hooks, cache, cache_index, site, left_pad)
        x = self.attention_residual(x, a, hooks)
        x = x + self.mlp(x, hooks, site)
        return x, sites, new_cache

    def attention(self, x, cos, sin, positions, hooks: SiteHooks = IDENTITY, cache=None, cache_index=None,
                  site=None, left_pad=None):
        """The attention half up to the o_proj input. x: [B, T, d] -> (a: [B, T, H, hd] after the
        o_in site, updated cache or None); ``site(name, value)`` applies hooks (and captures);
        ``left_pad``: [B] padding slots per row (causal_attention), with a cache only."""
        site = site or site_recorder(hooks, ())[0]
        b, t, _ = x.shape
        hd = self.head_dim
        h = site("attn_in", rms_norm(x, self.attn_norm[...], self.eps))
        q = self.q(h, hooks).reshape(b, t, self.num_heads, hd)
        k = self.k(h, hooks).reshape(b, t, self.num_kv_heads, hd)
        v_raw = self.v(h, hooks).reshape(b, t, self.num_kv_heads, hd)
        v = site("v", v_raw)
        q = site("q_rope", apply_rope(q, cos, sin))
        k = site("k_rope", apply_rope(k, cos, sin))
        if self.key_rotation is not None:
            rot = self.key_rotation[...].astype(q.dtype)
            q = jnp.einsum("bthd,de->bthe", q, rot, precision=EXACT)
            k = jnp.einsum("bthd,de->bthe", k, rot, precision=EXACT)
        k_raw = k
        q = site("q", q)
        k = site("k", k)
        new_cache = None
        if cache is None:  # the sequence on itself, positions 0..T-1
            a = causal_self_attention(q, k, v)
        else:
            if isinstance(cache, dict):
                k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
                v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
                new_cache = {"k": k_all, "v": v_all}
            else:  # a cache that stores k/v in its own format (resq_jax.runtime's quantized cache)
                k_all, v_all, new_cache = cache.write(k_raw, v_raw, cache_index)
            a = causal_attention(q, k_all, v_all, positions, left_pad)
        return site("o_in", a), new_cache

    def attention_residual(self, x, a, hooks: SiteHooks = IDENTITY):
        """x: [B, T, d] residual, a: [B, T, H, hd] o_proj input -> x + o_proj(a)."""
        b, t = a.shape[:2]
        return x + self.o(a.reshape(b, t, self.num_heads * self.head_dim), hooks)

    def mlp(self, x, hooks: SiteHooks = IDENTITY, site=None):
        """The MLP half's output (without the residual). x: [B, T, d] -> [B, T, d]."""
        site = site or site_recorder(hooks, ())[0]
        h = site("mlp_in", rms_norm(x, self.mlp_norm[...], self.eps))
        g = jax.nn.silu(self.gate(h, hooks)) * self.up(h, hooks)
        if self.down_hadamard:
            g = online_hadamard(g, self.down_hadamard)  # U_D, fused into down's weights
        g = site("down_in", g)
        return self.down(g, hooks)


def site_recorder(hooks: SiteHooks, capture: tuple[str, ...]):
    """(site(name, value) -> hooks(name, value), recording value in ``sites`` when captured; sites)."""
    sites: dict[str, jnp.ndarray] = {}

    def site(name, value):
        if name in capture:
            sites[name] = value
        return hooks(name, value)

    return site, sites


VOCAB_CHUNK = 8192


def scan_vocab(block, init, w: jnp.ndarray, chunk: int = VOCAB_CHUNK, vocab_axis: int = 0):
    """Fold ``block(carry, w_c, off) -> carry`` over the vocabulary of the output matrix ``w`` ([V, d] with
    ``vocab_axis=0``, [d, V] with 1), one float32 slice ``w_c`` of ``chunk`` entries at a time starting at entry
    ``off``; the last V mod chunk entries come zero-padded to a full chunk, so ``block`` masks entries >= V.

    The full chunks are read in place along the vocabulary axis (dynamic slices), so the matrix is never
    copied, transposed or widened whole (a 7B head is 1.1 GB in bfloat16, 2.2 GB in float32). A 16-bit matrix
    is sliced as its raw 16-bit integers and reinterpreted per chunk: given a bfloat16 / float16 matrix, XLA:CPU
    widens all of it to float32 before the loop; this way the loop holds one 16-bit copy at most."""
    v = w.shape[vocab_axis]
    chunk = min(chunk, v)
    n_full, rest = divmod(v, chunk)
    raw = w.dtype.itemsize == 2 and jnp.issubdtype(w.dtype, jnp.floating)
    w_sliced = jax.lax.bitcast_convert_type(w, jnp.uint16) if raw else w

    def step(carry, off):
        w_c = jax.lax.dynamic_slice_in_dim(w_sliced, off, chunk, axis=vocab_axis)
        w_c = jax.lax.bitcast_convert_type(w_c, w.dtype) if raw else w_c
        return block(carry, w_c.astype(jnp.float32), off), None

    carry, _ = jax.lax.scan(step, init, jnp.arange(n_full) * chunk)
    if rest:
        tail = jax.lax.slice_in_dim(w, n_full * chunk, v, axis=vocab_axis).astype(jnp.float32)
        pad = [(0, 0), (0, 0)]
        pad[vocab_axis] = (0, chunk - rest)
        carry = block(carry, jnp.pad(tail, pad), n_full * chunk)
    return carry


def _logits(h: jnp.ndarray, w_c: jnp.ndarray, vocab_axis: int) -> jnp.ndarray:
    """h [N, d] times a [chunk, d] (vocab_axis 0) or [d, chunk] (1) float32 slice -> [N, chunk]."""
    return jnp.matmul(h, w_c.T if vocab_axis == 0 else w_c, precision=EXACT)


def chunked_nll(h: jnp.ndarray, w: jnp.ndarray, target: jnp.ndarray, chunk: int = VOCAB_CHUNK,
                vocab_axis: int = 0) -> jnp.ndarray:
    """h: [N, d] float32 normed hidden; w: the output matrix, [V, d] (``vocab_axis=0``, a tied embedding) or
    [d, V] (``vocab_axis=1``, an lm_head), any float dtype (each chunk is widened to float32); target: [N]
    ids -> [N] cross-entropy logsumexp(logits) - logits[target], logits = h @ (the [d, V] matrix), one
    [N, chunk] logit block at a time (online logsumexp, ``scan_vocab``)."""
    n, v = h.shape[0], w.shape[vocab_axis]
    chunk = min(chunk, v)

    @jax.checkpoint  # differentiated (learned rotations), the backward pass recomputes each block's logits
    def block(carry, w_c, off):
        run_max, run_sum, tgt = carry
        logits = jnp.where(off + jnp.arange(chunk) < v, _logits(h, w_c, vocab_axis), -jnp.inf)  # [N, chunk]
        new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1)
        local = target - off
        hit = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)[:, 0]
        return new_max, run_sum, jnp.where(hit, picked, tgt)

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    run_max, run_sum, tgt = scan_vocab(block, init, w, chunk, vocab_axis)
    return run_max + jnp.log(run_sum) - tgt


def chunked_kl(h: jnp.ndarray, h_ref: jnp.ndarray, w: jnp.ndarray, chunk: int = VOCAB_CHUNK,
               vocab_axis: int = 0) -> jnp.ndarray:
    """h, h_ref: [N, d] float32 normed hidden states of a model and of its reference; w as in ``chunked_nll`` ->
    [N] KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v)), p = softmax(h @ W), one [N, chunk] logit
    block of each at a time. With z = h @ W, z_ref = h_ref @ W and running maxima m, m_ref it accumulates
    s = sum exp(z - m), s_ref = sum exp(z_ref - m_ref) and a = sum exp(z_ref - m_ref) (z_ref - z), rescaled
    whenever a maximum grows; then KL = a / s_ref - (m_ref + log s_ref) + (m + log s)."""
    n, v = h.shape[0], w.shape[vocab_axis]
    chunk = min(chunk, v)

    @jax.checkpoint
    def block(carry, w_c, off):
        m, s, m_ref, s_ref, a = carry
        valid = off + jnp.arange(chunk) < v
        z, z_ref = _logits(h, w_c, vocab_axis), _logits(h_ref, w_c, vocab_axis)  # [N, chunk]
        new_m = jnp.maximum(m, jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1))
        new_m_ref = jnp.maximum(m_ref, jnp.max(jnp.where(valid, z_ref, -jnp.inf), axis=-1))
        e = jnp.where(valid, jnp.exp(z - new_m[:, None]), 0.0)
        e_ref = jnp.where(valid, jnp.exp(z_ref - new_m_ref[:, None]), 0.0)
        scale_ref = jnp.exp(m_ref - new_m_ref)
        return (new_m, s * jnp.exp(m - new_m) + e.sum(-1), new_m_ref, s_ref * scale_ref + e_ref.sum(-1),
                a * scale_ref + jnp.sum(e_ref * jnp.where(valid, z_ref - z, 0.0), axis=-1))

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    m, s, m_ref, s_ref, a = scan_vocab(block, init, w, chunk, vocab_axis)
    return a / s_ref - (m_ref + jnp.log(s_ref)) + (m + jnp.log(s))


class Decoder(nnx.Module):
    """Decoder-only LM: embeddings, layers, final RMSNorm, lm_head (tied or separate)."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, Any]):
        self.config = config
        self.embed = as_param(weights["embed"])
        self.layers = nnx.List([DecoderLayer(config, weights, i) for i in range(config.num_layers)])
        self.norm = as_param(weights["norm"])
        head = weights.get("lm_head")
        if head is None and not config.tie_word_embeddings:
            raise ValueError("weights have no 'lm_head' but the config says embeddings are not tied")
        self.lm_head = nnx.data(None if head is None else as_param(head))
        self.inv_freq = jnp.asarray(inverse_frequencies(config))

    def embed_tokens(self, tokens):
        """tokens: [B, T] int -> [B, T, d]."""
        return jnp.take(self.embed[...], tokens, axis=0)

    def _head_input(self, x):
        """x: [B, T, d] last layer output -> the final RMSNorm's output in float32."""
        return rms_norm(x, self.norm[...], self.config.rms_eps).astype(jnp.float32)

    def head(self, x):
        """x: [B, T, d] (last layer output) -> logits [B, T, vocab] float32."""
        h = self._head_input(x)
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", h, self.embed[...].astype(jnp.float32), precision=EXACT)
        return jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(jnp.float32), precision=EXACT)

    def head_nll(self, x, tokens):
        """Mean next-token cross-entropy per window without materializing the logits.

        x: [B, T, d] last layer output; tokens: [B, T] -> [B] float32. The vocabulary is swept
        in chunks of VOCAB_CHUNK entries of the output matrix with a running (max, sum of exp),
        the target's logit taken from the same chunk's product; the result equals
        logsumexp(logits) - logits[target] of ``head`` up to float32 summation order.
        """
        b, t, d = x.shape
        h = self._head_input(x)[:, :-1].reshape(-1, d)
        target = tokens[:, 1:].reshape(-1)
        if self.lm_head is None:  # widened per chunk, never transposed
            nll = chunked_nll(h, self.embed[...], target, vocab_axis=0)
        else:
            nll = chunked_nll(h, self.lm_head[...], target, vocab_axis=1)
        return nll.reshape(b, t - 1).mean(axis=-1)

    def rope(self, positions):
        return rope_tables(self.inv_freq, positions)

    def __call__(self, tokens, hooks: SiteHooks = IDENTITY, cache=None, cache_index=None, left_pad=None):
        """tokens: [B, T] -> (logits [B, T, vocab], new cache or None).

        With ``cache`` (a list of per-layer {"k", "v"}: [B, S, KV, hd], or of objects with
        ``write(k, v, index) -> (k_all, v_all, new)`` that receive k/v before the k/v site
        hooks, as the packed runtime's quantized cache) the tokens sit at positions
        cache_index .. cache_index+T-1 (cache slots). ``left_pad``: [B] int, a left-padded batch:
        row b's first left_pad[b] slots hold padding, masked in attention, and its positions
        count from its first real token (slot - left_pad[b]), so each row computes what it
        would alone, quantizers after RoPE included.
        """
        if left_pad is not None and cache is None:
            raise ValueError("left_pad masks cache slots: pass a cache with it")
        t = tokens.shape[1]
        start = 0 if cache_index is None else cache_index
        positions = start + jnp.arange(t)
        cos, sin = self.rope(positions if left_pad is None else positions[None, :] - left_pad[:, None])
        x = self.embed_tokens(tokens)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, _, c = layer(x, cos, sin, positions, hooks, None if cache is None else cache[i], cache_index,
                            left_pad=left_pad)
            if cache is not None:
                new_cache.append(c)
        return self.head(x), new_cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> list[dict[str, jnp.ndarray]]:
    """Empty KV cache: per layer {"k", "v"}: [batch, max_len, kv_heads, head_dim]."""
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers)]


def from_weights(config: ModelConfig, weights: Mapping[str, Any]) -> Decoder:
    """Build the decoder from a weights dict (naming contract in models/config.py)."""
    return Decoder(config, weights)


def to_weights(model: Decoder) -> dict[str, np.ndarray]:
    """Inverse of ``from_weights``: the model's weights as a flat dict of NumPy arrays."""
    out: dict[str, np.ndarray] = {"embed": np.asarray(model.embed[...]), "norm": np.asarray(model.norm[...])}
    if model.lm_head is not None:
        out["lm_head"] = np.asarray(model.lm_head[...])
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = np.asarray(layer.attn_norm[...])
        out[p + "mlp_norm"] = np.asarray(layer.mlp_norm[...])
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            lin = getattr(layer, name)
            out[p + name] = np.asarray(lin.w[...])
            if lin.b is not None:
                out[p + name + "_bias"] = np.asarray(lin.b[...])
            if lin.lr_a is not None:
                out[p + name + "_lr_a"] = np.asarray(lin.lr_a[...])
                out[p + name + "_lr_b"] = np.asarray(lin.lr_b[...])
        if layer.key_rotation is not None:
            out[p + "key_rotation"] = np.asarray(layer.key_rotation[...])
        if layer.down_hadamard:
            out[p + "down_hadamard"] = layer.down_hadamard
    return out
