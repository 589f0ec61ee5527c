"""Perplexity with jitted, layer-streamed forward passes (greedy generation: resq_jax/eval/generate.py).

Perplexity protocol (docs/reproducing.md, Evaluation protocol): the text is tokenized once without BOS, cut into the first
N non-overlapping windows of L tokens; ppl = exp(mean over windows of the mean next-token
cross-entropy of the window), computed in float32.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from resq_jax.distributed import mesh as dmesh
from resq_jax.models.decoder import IDENTITY, Decoder, SiteHooks
from resq_jax.models.streaming import LayerStreamer, head_nll, layer_apply
from resq_jax.util.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    window_nll: np.ndarray  # [N] mean cross-entropy of each window
    tokens_per_second: float
    seconds: float


def perplexity(model: Decoder | LayerStreamer, windows: np.ndarray, *, batch_size: int = 4,
               hooks: SiteHooks = IDENTITY, progress: bool | str = True, shard_weights: bool = False
               ) -> PerplexityResult:
    """windows: [N, L] int token ids -> perplexity over the windows.

    Layer-major: every batch of ``batch_size`` windows goes through layer i before any goes through
    layer i + 1, so each layer is built (put on the device; for a streamed model, read and computed
    from its store) once per evaluation, and only the activations of all windows, [N, L, d] float32,
    are kept between layers, on the host. A short last batch is padded with copies of its first
    window (the padding's losses are dropped), so every batch has one shape and compiles once. Each
    batch sees the same jitted calls with the same inputs as a batch-by-batch pass through the whole
    model, so the numbers are the same.

    Data-parallel: in a multi-process job each process evaluates a contiguous share of the batches and the
    windows' losses are gathered in window order; within a process the batches go round-robin over its local
    devices (each with a copy of the layer). Every batch meets the same jitted calls either way, so the
    perplexity equals the one-device one bit for bit.

    ``shard_weights`` (``--shard-weights``): instead, each layer's weights and the head are split over this
    process's devices along their output axis (distributed.mesh.shard_weights) and every batch runs on all of
    them, for layers too large for one device; the sums are then XLA's partitioned ones, equal to the one-device
    numbers within float32 rounding.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N >= 1, L >= 2] token ids, got shape {windows.shape}")
    runner = model if isinstance(model, LayerStreamer) else LayerStreamer(model)
    n, seq_len = windows.shape
    batch_size = max(1, min(batch_size, n))
    batches = []
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        batches.append((jnp.asarray(batch, dtype=jnp.int32), real))
    n_batches = len(batches)
    n_proc, pid = jax.process_count(), jax.process_index()
    share = -(-n_batches // n_proc)  # batches per process; the last processes may get padding batches
    mine = batches[pid * share:(pid + 1) * share]
    mine += [(batches[0][0], 0)] * (share - len(mine))
    label = progress if isinstance(progress, str) else "perplexity"
    n_layers = len(runner.layers)
    bar = progress_bar(n_layers + 2, label, unit="layer") if progress else None
    start = time.perf_counter()
    # this process's batches go round-robin over its devices, a wave of one batch per device at a time, each
    # device with its own copy of the layer: the same jitted calls on the same inputs, so the same numbers
    devices = jax.local_devices()[:max(1, min(len(jax.local_devices()), len(mine)))]
    mesh = dmesh.model_mesh() if shard_weights and len(jax.local_devices()) > 1 else None
    xs = [np.asarray(runner.embed(b)) for b, _ in mine]
    positions, rope = runner.rope(seq_len)
    if bar is not None:
        bar.update(1)
    for i in range(n_layers):
        g, s = runner.layers[i]
        xs = _apply_all(xs, s, (rope, positions), lambda x, s, rope, positions:
                        layer_apply(g, s, x, rope, positions, hooks)[0], devices=devices, mesh=mesh)
        del g, s
        if bar is not None:
            bar.update(1)
    g, s = runner.head_parts
    local = np.stack(_apply_all(list(zip(xs, [b for b, _ in mine])), s, (),
                                lambda xb, s: head_nll(g, s, xb[0], xb[1]), devices=devices, mesh=mesh))
    losses = dmesh.gather_host(local)  # [n_proc * share, batch_size]: every process's batches in window order
    losses = [row[:real] for row, (_, real) in zip(losses, batches)]
    if bar is not None:
        bar.update(1)
        bar.close()
    seconds = time.perf_counter() - start
    window_nll = np.concatenate(losses).astype(np.float64)
    return PerplexityResult(
        ppl=float(math.exp(window_nll.mean())),
        window_nll=window_nll,
        tokens_per_second=windows.size / seconds,
        seconds=seconds,
    )



def _apply_all(items: list, weights, consts: tuple, fn, *, devices, mesh=None) -> list[np.ndarray]:
    """[np.asarray(fn(item, weights, *consts)) for item in items].

    One device: the plain loop on the default device. Several: item k on devices[k % len(devices)], with a copy
    of ``weights`` and ``consts`` on each device, one item per device dispatched before any result is read, so
    the devices run together. ``mesh`` (a model mesh): ``weights`` split over it (shard_weights), the items and
    ``consts`` replicated, one call at a time on all its devices."""
    if mesh is not None:
        weights, consts = dmesh.shard_weights(weights, mesh), dmesh.replicate(consts, mesh)
        return [np.asarray(fn(dmesh.replicate(item, mesh), weights, *consts)) for item in items]
    if len(devices) == 1:
        return [np.asarray(fn(jax.tree.map(jnp.asarray, item), weights, *consts)) for item in items]
    copies = [jax.device_put((weights, consts), d) for d in devices]
    out = []
    for k in range(0, len(items), len(devices)):
        wave = [fn(jax.device_put(item, devices[j]), copies[j][0], *copies[j][1])
                for j, item in enumerate(items[k:k + len(devices)])]
        out += [np.asarray(y) for y in wave]
    return out
