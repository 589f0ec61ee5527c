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
import numpy as np
from flax import nnx

from resq_jax.models.decoder import IDENTITY, Decoder, SiteHooks
from resq_jax.models.rope import rope_tables
from resq_jax.models.views import VOCAB_AXIS, VOCAB_SLICE, vocab_blocks, vocab_dtype, vocab_slice


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
    """Splits a Decoder into per-layer (graphdef, state) pairs for streamed jitted execution.

    ``LayerStreamer.from_weights(config, weights)`` streams a weights dict instead: each layer is
    built (its arrays put on the device) when it is used and dropped after, so only the
    embeddings, the head and one layer live on the device (calibration and GPTQ of models
    whose float weights fill the host's memory)."""

    def __init__(self, model: Decoder):
        self.config = model.config
        self.inv_freq = model.inv_freq
        self.layers = [nnx.split(layer) for layer in model.layers]
        parts = nnx.split(_HeadView(model.config, model.embed, model.norm, model.lm_head))
        self._head_parts = lambda: parts
        self._embed_host = None  # embed on the device, through head_parts

    @classmethod
    def from_weights(cls, config, weights) -> "LayerStreamer":
        """A streamer over ``weights`` (the naming contract of models/config.py) that builds
        layer i only when ``layers[i]`` is read."""
        from resq_jax.models.decoder import as_param
        from resq_jax.models.rope import inverse_frequencies

        self = cls.__new__(cls)
        self.config = config
        self.inv_freq = jnp.asarray(inverse_frequencies(config))
        self.layers = _LazyLayers(config, weights)

        @functools.cache
        def head_parts():
            # an untied model's head does not need the embedding table on the device
            tied = "lm_head" not in weights
            table = nnx.Param(device_table(weights, "embed" if tied else "lm_head", config.vocab_size))
            return nnx.split(_HeadView(config, table if tied else None, as_param(weights["norm"]),
                                       None if tied else table))

        self._head_parts = head_parts
        # a host gather of the looked-up rows only (bit-identical to the device gather): calibration and
        # GPTQ never build the whole table, nor the lm_head
        self._embed_host = weights
        return self

    @property
    def head_parts(self):
        """(graphdef, state) of the embeddings, final norm and lm_head (built on first use)."""
        return self._head_parts()

    def embed(self, tokens):
        """tokens: [B, T] -> [B, T, d] (the table's dtype)."""
        if self._embed_host is not None:
            tokens = np.asarray(tokens)
            rows = vocab_slice(self._embed_host, "embed", tokens.reshape(-1))
            return jnp.asarray(rows.reshape(*tokens.shape, rows.shape[-1]))
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


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("axis",))
def _set_slice(table, block, start, axis):
    return jax.lax.dynamic_update_slice_in_dim(table, block, start, axis)


def device_table(weights, name: str, vocab_size: int, chunk: int = VOCAB_SLICE) -> jax.Array:
    """The vocabulary table ``name`` (embed [V, d] or lm_head [d, V]) on the device, in the narrowest dtype
    that holds it exactly (``vocab_dtype``: a bfloat16 checkpoint's head stays 2 bytes per value) and built
    slice by slice into one buffer: no whole float32 or float64 copy on the host (a 7B head is 2.2 GB in
    float32). Slices widened to float32 inside the head give the float32 values."""
    dtype = vocab_dtype(weights, name)
    table = None
    for start, block, shape in vocab_blocks(functools.partial(vocab_slice, weights), name, vocab_size, chunk):
        table = jnp.zeros(shape, dtype) if table is None else table
        table = _set_slice(table, jnp.asarray(block.astype(dtype)), start, VOCAB_AXIS[name])
    return table


class _LazyLayers:
    """layers[i] -> (graphdef, state) of DecoderLayer i built from a weights dict on each access."""

    def __init__(self, config, weights):
        self.config, self.weights = config, weights

    def __len__(self):
        return self.config.num_layers

    def __getitem__(self, i):
        from resq_jax.models.decoder import DecoderLayer

        if not -len(self) <= i < len(self):
            raise IndexError(f"layer {i} of a {len(self)}-layer model")
        return nnx.split(DecoderLayer(self.config, self.weights, i % len(self)))


class _HeadView(nnx.Module):
    """The non-layer parts of a Decoder (embeddings, final norm, lm_head)."""

    def __init__(self, config, embed, norm, lm_head):
        self.config = config
        self.embed = embed
        self.norm = norm
        self.lm_head = nnx.data(lm_head)

    embed_tokens = Decoder.embed_tokens
    head = Decoder.head
    head_nll = Decoder.head_nll
    _head_input = Decoder._head_input
