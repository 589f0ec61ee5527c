"""Token log-likelihoods of a decoder, batched and padded to a few fixed shapes so jit compiles a handful of times.

``Scorer(model, hooks)`` scores sequences: for each (input tokens, targets) pair it returns log p(target_i | inputs
up to i) at every target position and whether the target is the arg-max token there (lm-evaluation-harness's
``is_greedy``). Sequences are right-padded to the next bucket length (64, 128, ... up to the model's limit) and
batches to ``batch_size`` rows: causal attention keeps the padding from touching the real positions. The
log-softmax is taken in float32 over the whole vocabulary, one batch of logits at a time.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resq_jax.models.decoder import IDENTITY, Decoder, SiteHooks

MIN_BUCKET = 64


def bucket_length(n: int, limit: int) -> int:
    """The padded length of an n-token sequence: the next power of two from MIN_BUCKET, at most ``limit``."""
    if n > limit:
        raise ValueError(f"a sequence of {n} tokens is longer than the scorer's limit of {limit}")
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, limit)


@functools.partial(jax.jit, static_argnames=("graphdef", "hooks"))
def _score_batch(graphdef, state, tokens, targets, hooks):
    """tokens, targets: [B, T] -> (log p(targets) [B, T] float32, targets are the arg-max [B, T] bool)."""
    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens, hooks=hooks)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


class Scorer:
    """Log-likelihoods of target tokens under ``model`` (a whole Decoder) with ``hooks`` (fake or packed quantizers)."""

    def __init__(self, model: Decoder, hooks: SiteHooks = IDENTITY, *, batch_size: int = 8, max_length: int = 2048):
        self.graphdef, self.state = nnx.split(model)
        self.hooks, self.batch_size, self.max_length = hooks, batch_size, max_length

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """pairs: [(inputs [n], targets [n])] -> [(log p [n] float64, greedy [n] bool)] in the same order; the
        longest go first so a batch's padding is small."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        out: list = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            t = bucket_length(max(len(pairs[i][0]) for i in idx), self.max_length)
            tokens = np.zeros((self.batch_size, t), np.int32)
            targets = np.zeros((self.batch_size, t), np.int32)
            for row, i in enumerate(idx):
                inp, tgt = pairs[i]
                if len(inp) != len(tgt) or not len(inp):
                    raise ValueError(f"inputs and targets must be equally long and non-empty, got {len(inp)} "
                                     f"and {len(tgt)}")
                tokens[row, :len(inp)], targets[row, :len(tgt)] = inp, tgt
            logp, greedy = _score_batch(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(targets), self.hooks)
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for row, i in enumerate(idx):
                n = len(pairs[i][0])
                out[i] = (logp[row, :n], greedy[row, :n])
        return out
