"""Jitted, layer-streamed execution of a Decoder.

The model runs as embed -> one jitted layer function called once per layer -> head. Every
layer has the same structure, so the layer function compiles once and is reused; only one
layer's weights and activations are live in a call, which is what calibration, GPTQ and
evaluation of large models need. Hooks and the captured site names are static.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models.decoder import IDENTITY, Decoder, SiteHooks
from models.rope import rope_tables


@functools.partial(jax.jit, static_argnames=("graphdef", "hooks", "capture"))
def layer_apply(graphdef, state, x, rope, positions, hooks: SiteHooks = IDENTITY,
                capture: tuple[str, ...] = ()):
    """One decoder layer. x: [B, T, d]; rope: (cos, sin) [T, hd]; positions: [T]
    -> (x: [B, T, d], {site: array})."""
    cos, sin = rope
    y, sites, _ = nnx.merge(graphdef, state)(x, cos, sin, positions, hooks, capture=capture)
    return y, sites


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed_apply(graphdef, state, tokens):
    """tokens: [B, T] -> [B, T, d]."""
    return nnx.merge(graphdef, state).embed_tokens(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def head_nll(graphdef, state, x, tokens):
    """Mean next-token cross-entropy per window. x: [B, T, d] final hidden; tokens: [B, T] -> [B] float32."""
    return nnx.merge(graphdef, state).head_nll(x, tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def head_logits(graphdef, state, x):
    """x: [B, T, d] -> logits [B, T, vocab] float32."""
    return nnx.merge(graphdef, state).head(x)


class LayerStreamer:
    """Splits a Decoder into per-layer (graphdef, state) pairs for streamed jitted execution."""

    def __init__(self, model: Decoder):
        self.config = model.config
        self.inv_freq = model.inv_freq
        self.layers = [nnx.split(layer) for layer in model.layers]
        self.head_parts = nnx.split(_HeadView(model))

    def embed(self, tokens):
        g, s = self.head_parts
        return embed_apply(g, s, tokens)

    def rope(self, seq_len: int):
        """positions: [T] and their (cos, sin) tables [T, hd]."""
        positions = jnp.arange(seq_len)
        return positions, rope_tables(self.inv_freq, positions)

    def layer(self, i, x, hooks=IDENTITY, capture=()):
        """Layer i on x: [B, T, d] (positions 0..T-1) -> (x, captured sites)."""
        g, s = self.layers[i]
        positions, rope = self.rope(x.shape[1])
        return layer_apply(g, s, x, rope, positions, hooks, capture)

    def hidden(self, tokens, hooks=IDENTITY):
        """tokens: [B, T] -> last layer output [B, T, d]."""
        x = self.embed(tokens)
        for i in range(len(self.layers)):
            x, _ = self.layer(i, x, hooks)
        return x

    def nll(self, tokens, hooks=IDENTITY):
        """tokens: [B, T] -> mean next-token cross-entropy per window: [B]."""
        g, s = self.head_parts
        return head_nll(g, s, self.hidden(tokens, hooks), tokens)

    def logits(self, tokens, hooks=IDENTITY):
        g, s = self.head_parts
        return head_logits(g, s, self.hidden(tokens, hooks))


class _HeadView(nnx.Module):
    """The non-layer parts of a Decoder (embeddings, final norm, lm_head)."""

    def __init__(self, model: Decoder):
        self.config = model.config
        self.embed = model.embed
        self.norm = model.norm
        self.lm_head = nnx.data(model.lm_head)

    embed_tokens = Decoder.embed_tokens
    head = Decoder.head
    head_nll = Decoder.head_nll
