"""Perplexity with jitted, layer-streamed forward passes (greedy generation: resq_jax/eval/generate.py).

Perplexity protocol (docs/reproducing.md, Evaluation protocol): the text is tokenized once without BOS, cut into the first
N non-overlapping windows of L tokens; ppl = exp(mean over windows of the mean next-token
cross-entropy of the window), computed in float32.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax.numpy as jnp
import numpy as np

from resq_jax.models.decoder import IDENTITY, Decoder, SiteHooks
from resq_jax.models.streaming import LayerStreamer
from resq_jax.util.progress import progress_bar


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
    bar = progress_bar(n, label, unit="win") if progress else None
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
