"""Perplexity and greedy generation with jitted, layer-streamed forward passes.

Perplexity protocol (docs/reproducing.md, Evaluation protocol): the text is tokenized once without BOS, cut into the first
N non-overlapping windows of L tokens; ppl = exp(mean over windows of the mean next-token
cross-entropy of the window), computed in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.decoder import IDENTITY, Decoder, SiteHooks, init_cache
from models.runner import LayerStreamer


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    window_nll: np.ndarray  # [N] mean cross-entropy of each window
    tokens_per_second: float
    seconds: float


def perplexity(model: Decoder | LayerStreamer, windows: np.ndarray, *, batch_size: int = 4,
               hooks: SiteHooks = IDENTITY, progress: bool | str = True) -> PerplexityResult:
    """windows: [N, L] int token ids -> perplexity over the windows.

    Batches of ``batch_size`` windows run through the jitted streamed model; a short last
    batch is padded with copies of its first window (the padding's losses are dropped), so
    every batch has one shape and compiles once.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N >= 1, L >= 2] token ids, got shape {windows.shape}")
    runner = model if isinstance(model, LayerStreamer) else LayerStreamer(model)
    n = windows.shape[0]
    batch_size = max(1, min(batch_size, n))
    losses = []
    label = progress if isinstance(progress, str) else "perplexity"
    bar = _progress(n, label) if progress else None
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        nll = np.asarray(runner.nll(jnp.asarray(batch, dtype=jnp.int32), hooks))[:real]
        losses.append(nll)
        if bar is not None:
            bar.update(real)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    window_nll = np.concatenate(losses).astype(np.float64)
    return PerplexityResult(
        ppl=float(math.exp(window_nll.mean())),
        window_nll=window_nll,
        tokens_per_second=windows.size / seconds,
        seconds=seconds,
    )


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="win", file=sys.stderr, leave=False, dynamic_ncols=True)


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
