"""Greedy generation with a KV cache (float, fake-quant or packed decoder), one prompt or a left-padded batch.

A batch of prompts of different lengths is left-padded to one length ``P``: row b's prompt fills slots
P - n_b .. P - 1 and its new tokens slots P, P + 1, ...; the decoder's ``left_pad`` masks the padding slots in
attention and counts each row's positions from its first real token, so each row computes what it would alone,
quantizers after RoPE (a 4-bit key cache) included, up to the order of float sums. Every row decodes until all rows ended (end-of-text, or ``stop``) or
``max_new_tokens``; a row's output ends at its first end-of-text token (included, as one prompt's does).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resq_jax.models.decoder import IDENTITY, Decoder, SiteHooks, init_cache


@functools.partial(jax.jit, static_argnames=("graphdef", "hooks"))
def _decode_step(graphdef, state, tokens, cache, cache_index, hooks, left_pad):
    """tokens: [B, T] at slots cache_index.. -> (next token ids [B], updated cache); left_pad: [B] or None."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens, hooks=hooks, cache=cache, cache_index=cache_index, left_pad=left_pad)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def generate_batch(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                   hooks: SiteHooks = IDENTITY, eos_token_id: int | None = None, cache: list | None = None,
                   length: int | None = None, stop: Callable[[int, list[int]], bool] | None = None,
                   pad_token_id: int = 0) -> list[np.ndarray]:
    """Greedy continuations of a batch (module docstring). prompts: B token lists -> B arrays of new token ids
    [<= max_new_tokens].

    ``length``: the padded prompt length P (default: the longest prompt; a fixed P keeps jit's shapes few);
    ``cache``: an empty per-layer cache for B rows and at least P + max_new_tokens slots (default: float32 from
    init_cache; the packed runtime passes its quantized cache); ``stop(row, new ids so far)`` -> True ends a row
    early (e.g. on a stop string)."""
    rows = [np.asarray(p, dtype=np.int32).reshape(-1) for p in prompts]
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError("every prompt must tokenize to at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    p = max(r.size for r in rows) if length is None else int(length)
    if p < max(r.size for r in rows):
        raise ValueError(f"length {p} is shorter than the longest prompt ({max(r.size for r in rows)} tokens)")
    b, slots = len(rows), p + max_new_tokens
    tokens = np.full((b, p), pad_token_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, p - r.size:] = r
    pads = np.asarray([p - r.size for r in rows])
    left_pad = None if not pads.any() else jnp.asarray(pads, jnp.int32)
    graphdef, state = nnx.split(model)
    if cache is None:
        cache = init_cache(model.config, b, slots)
    nxt, cache = _decode_step(graphdef, state, jnp.asarray(tokens), cache, 0, hooks, left_pad)
    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for step in range(max_new_tokens):
        ids = np.asarray(nxt)
        for i in np.flatnonzero(~done):
            out[i].append(int(ids[i]))
            if (eos_token_id is not None and ids[i] == eos_token_id) or (stop is not None and stop(int(i), out[i])):
                done[i] = True
        if done.all() or step == max_new_tokens - 1:
            break
        nxt, cache = _decode_step(graphdef, state, nxt[:, None], cache, jnp.int32(p + step), hooks, left_pad)
    return [np.asarray(o, dtype=np.int32) for o in out]


def generate_greedy(model: Decoder, prompt_ids: np.ndarray, max_new_tokens: int = 32, *,
                    hooks: SiteHooks = IDENTITY, eos_token_id: int | None = None,
                    cache: list | None = None) -> np.ndarray:
    """Greedy decoding of one prompt with the KV cache. prompt_ids: [T] -> new token ids [<= max_new_tokens].

    ``cache``: an empty per-layer cache for at least T + max_new_tokens positions (default: a
    float32 one from init_cache; the packed runtime passes its quantized cache)."""
    prompt_ids = np.asarray(prompt_ids, dtype=np.int32)
    if prompt_ids.ndim != 1 or prompt_ids.size == 0:
        raise ValueError("the prompt must tokenize to at least one token")
    return generate_batch(model, [prompt_ids], max_new_tokens, hooks=hooks, eos_token_id=eos_token_id,
                          cache=cache)[0]
