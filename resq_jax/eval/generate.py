"""Greedy generation with a KV cache (float, fake-quant or packed decoder).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resq_jax.models.decoder import IDENTITY, Decoder, SiteHooks, init_cache


@functools.partial(jax.jit, static_argnames=("graphdef", "hooks"))
def _decode_step(graphdef, state, tokens, cache, cache_index, hooks):
    """tokens: [B, T] at positions cache_index.. -> (next token ids [B], updated cache)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, hooks=hooks, cache=cache, cache_index=cache_index)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def generate_greedy(model: Decoder, prompt_ids: np.ndarray, max_new_tokens: int = 32, *,
                    hooks: SiteHooks = IDENTITY, eos_token_id: int | None = None,
                    cache: list | None = None) -> np.ndarray:
    """Greedy decoding with the KV cache. prompt_ids: [T] -> new token ids [<= max_new_tokens].

    ``cache``: an empty per-layer cache for at least T + max_new_tokens positions (default: a
    float32 one from init_cache; the packed runtime passes its quantized cache)."""
    prompt_ids = np.asarray(prompt_ids, dtype=np.int32)
    if prompt_ids.ndim != 1 or prompt_ids.size == 0:
        raise ValueError("the prompt must tokenize to at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    graphdef, state = nnx.split(model)
    if cache is None:
        cache = init_cache(model.config, 1, prompt_ids.size + max_new_tokens)
    nxt, cache = _decode_step(graphdef, state, jnp.asarray(prompt_ids[None]), cache, 0, hooks)
    out = []
    pos = prompt_ids.size
    for _ in range(max_new_tokens):
        tok = int(nxt[0])
        out.append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            break
        nxt, cache = _decode_step(graphdef, state, nxt[:, None], cache, jnp.int32(pos), hooks)
        pos += 1
    return np.asarray(out, dtype=np.int32)
