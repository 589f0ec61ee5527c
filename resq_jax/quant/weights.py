"""Weight quantization of every decoder linear: RTN, or GPTQ with streamed Hessians.

GPTQ (docs/algorithms.md, GPTQ) streams the model layer by layer over calibration windows.
Inside a layer each linear's Hessian comes from the inputs produced by the already
quantized earlier parts of the layer, in the order [q, k, v] -> [o] -> [gate, up] -> [down];
the next layer is fed the outputs of the fully quantized layer. Activations stay in float
while collecting Hessians (online transforms, such as the down_proj Hadamard and the key
rotation, are part of the model and do apply).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Mapping, MutableMapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from resq_jax.calibration.statistics import check_window_count
from resq_jax.distributed.mesh import data_mesh, gather, sharded_rows
from resq_jax.formats.bits import OFF
from resq_jax.formats.integer import WeightCodes, dequantize_weight, quantize_weight_sym
from resq_jax.models.config import ModelConfig
from resq_jax.models.decoder import IDENTITY, site_recorder
from resq_jax.models.streaming import LayerStreamer
from resq_jax.models.views import LazyWeights
from resq_jax.quant.code_store import CodeStore
from resq_jax.quant.gptq import DEFAULT_DAMP, F64_CHOLESKY_MAX, gram, gram_rows
from resq_jax.quant.layouts import LINEARS, WeightSpec, linear_high_rows
from resq_jax.util.progress import progress_bar

# (site whose inputs feed the linears, the linears) in the order GPTQ visits them
GPTQ_ORDER = (("attn_in", ("q", "k", "v")), ("o_in", ("o",)), ("mlp_in", ("gate", "up")), ("down_in", ("down",)))

# A group of linears with more weights than this (a 7B model's gate/up: 3584 x 37888) is quantized one linear
# at a time in blocks of GPTQ_COLUMN_BLOCK output columns against the group's one factor (gptq_quantize's
# column_block), so GPTQ's working copies are a block's. Smaller groups (every group of SmolLM2 and
# Qwen2.5-0.5B) are swept whole, side by side, as they always were.
GROUP_ELEMENTS_MAX = 1 << 26
GPTQ_COLUMN_BLOCK = 2048
# A Hessian over more inputs than F64_CHOLESKY_MAX (a 7B down_proj: 18944) is summed on the host in blocks of
# this many rows straight into its one float32 buffer, instead of one whole [d, d] Gram matrix per batch.
HESSIAN_ROW_BLOCK = 2048
# windows per GPTQ batch (per device over a data mesh)
GPTQ_BATCH = 4


@dataclasses.dataclass
class QuantizedWeights:
    """A weights mapping with every decoder linear quantized, and the quantizer's integer codes.

    weights: the input mapping with ``layers.{i}.{name}`` replaced by its dequantized float32
             weights [d_in, d_out] in the original row order (what the fake-quant model runs): a view
             (``dequantized``) that dequantizes a linear's codes when it is read, so the quantized
             model is never whole in memory.
    codes:   {"layers.{i}.{name}": WeightCodes} (a ``CodeStore``, in memory or spilled to files) in the
             row order of ``linear_high_rows`` (o_proj's rows permuted so every head's high rows come
             last; identity for the others). Empty when weights are not quantized (w_bits >= 16).
    """

    weights: Mapping
    codes: MutableMapping


def _unpermute(rows: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """rows: [d_in, d_out] in ``perm`` order -> the original row order."""
    if perm is None:
        return rows
    out = np.empty_like(rows)
    out[perm] = rows
    return out


def dequantized(config: ModelConfig, weights: Mapping[str, np.ndarray], codes: Mapping,
                spec: WeightSpec) -> LazyWeights:
    """``weights`` with every linear that has codes replaced by ``dequantize_weight`` of its codes in the
    original row order (float32), computed when read: the fake-quant model as a view."""

    def entry(key):
        name = key.rsplit(".", 1)[-1]
        if name not in LINEARS or key not in codes:
            return None
        perm, _ = linear_high_rows(config, name, spec)
        return _unpermute(np.asarray(dequantize_weight(codes[key])), perm)

    return LazyWeights(weights, entry)


def rtn_weights_codes(config: ModelConfig, weights: Mapping[str, np.ndarray], spec: WeightSpec,
                      codes: MutableMapping | None = None, progress: bool = False) -> QuantizedWeights:
    """Every decoder linear quantized with round-to-nearest (embeddings, lm_head untouched); the codes
    go to ``codes`` (default a CodeStore in memory), one linear at a time; ``progress``: a bar by layer."""
    codes = CodeStore() if codes is None else codes
    if spec.w_bits >= OFF:
        return QuantizedWeights(weights, codes)
    bar = progress_bar(config.num_layers, "rtn", unit="layer") if progress else None
    for i in range(config.num_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            perm, high = linear_high_rows(config, name, spec)
            w = np.asarray(weights[key], np.float32)
            codes[key] = quantize_weight_sym(jnp.asarray(w if perm is None else w[perm]), spec.w_bits,
                                             spec.high_bits, high, spec.clip_search)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return QuantizedWeights(dequantized(config, weights, codes, spec), codes)


def _layer_entries(weights: Mapping[str, np.ndarray], i: int) -> dict:
    """Layer i's entries read once (a view computes each on access; GPTQ builds the layer five times)."""
    prefix = f"layers.{i}."
    return {k: weights[k] for k in weights if k.startswith(prefix)}


# The four stages of one layer, each a function of the layer (graphdef, state) and the cached output of the
# previous stage, so the layer's float work over all windows is done about once and a half (gate/up twice)
# instead of once per Hessian. On one device each is jitted as is (``_STAGES``); on a data mesh each device runs
# the same function on its own windows and returns its own Hessian term (``_sharded_stage``), so a device's
# term is bit-identical to the one-device term of the same windows.
def _term(x, rows: bool):
    """A site's activations x: [..., d] -> its Hessian term: the Gram matrix x^T x [d, d], or with ``rows``
    (a Hessian summed in row blocks, see gptq_weights_codes) the activations themselves as float32 [tokens, d]."""
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32) if rows else gram(x)


def _attn_in(graphdef, state, x, rope, positions, rows=False):
    """x: [B, T, d] layer input -> Hessian term of the q/k/v input (RMSNorm output)."""
    site, sites = site_recorder(IDENTITY, ("attn_in",))
    cos, sin = rope
    nnx.merge(graphdef, state).attention(x, cos, sin, positions, IDENTITY, site=site)  # only attn_in is kept
    return _term(sites["attn_in"], rows)


def _o_in(graphdef, state, x, rope, positions, rows=False):
    """x: [B, T, d] -> (a: [B, T, H, hd] attention output with the quantized q/k/v, its Hessian term)."""
    cos, sin = rope
    a, _ = nnx.merge(graphdef, state).attention(x, cos, sin, positions, IDENTITY)
    return a, _term(a.reshape(*a.shape[:2], -1), rows)  # [B, T, heads * hd]


def _mlp_in(graphdef, state, x, a, rows=False):
    """x: [B, T, d], a: [B, T, H, hd] -> (x + o_proj(a) with the quantized o_proj, Hessian term of
    the gate/up input)."""
    layer = nnx.merge(graphdef, state)
    x1 = layer.attention_residual(x, a)
    site, sites = site_recorder(IDENTITY, ("mlp_in",))
    layer.mlp(x1, IDENTITY, site)  # only mlp_in is kept
    return x1, _term(sites["mlp_in"], rows)


def _down_in(graphdef, state, x1, rows=False):
    """x1: [B, T, d] -> Hessian term of the down_proj input (with the quantized gate/up)."""
    site, sites = site_recorder(IDENTITY, ("down_in",))
    nnx.merge(graphdef, state).mlp(x1, IDENTITY, site)  # the down_proj product is dropped
    return _term(sites["down_in"], rows)


def _out(graphdef, state, x1):
    """x1: [B, T, d] -> the layer's output x1 + mlp(x1) with every linear quantized."""
    return x1 + nnx.merge(graphdef, state).mlp(x1, IDENTITY)


# stage -> (number of activation arguments after the state, number of activation outputs before the term)
_STAGE_ARITY = {_attn_in: (1, 0), _o_in: (1, 1), _mlp_in: (2, 1), _down_in: (1, 0), _out: (1, 1)}
_STAGES = {f: jax.jit(f, static_argnames=("graphdef", "rows") if f is not _out else ("graphdef",))
           for f in _STAGE_ARITY}
_stage_attn_in, _stage_o_in, _stage_mlp_in, _stage_down_in, _stage_out = (_STAGES[f] for f in _STAGE_ARITY)


@functools.lru_cache(maxsize=None)
def _sharded_stage(stage, graphdef, rows: bool, mesh):
    """``stage`` over a data mesh: the activation arguments and outputs split on their batch axis, the layer
    state, RoPE tables and positions replicated; the Hessian term (a Gram [d, d] or, with ``rows``, activations
    [tokens, d]) comes back per device, stacked on a leading device axis (Grams) or split on tokens."""
    n_act, n_out = _STAGE_ARITY[stage]
    has_rope = stage in (_attn_in, _o_in)
    has_term = stage is not _out

    def per_device(state, *args):
        kw = {"rows": rows} if has_term else {}
        res = stage(graphdef, state, *args, **kw)
        if not has_term:
            return res
        if not rows:  # a Gram matrix per device, stacked on a leading device axis
            res = (*res[:-1], res[-1][None]) if n_out else res[None]
        return res

    data, rep = P("data"), P()
    in_specs = (rep, *([data] * n_act), *((rep, rep) if has_rope else ()))
    out_specs = data if not has_term else ((data,) * (n_out + 1) if n_out else data)
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


@functools.lru_cache(maxsize=None)
def _sharded_gram_rows(mesh, start: int, rows: int):
    """Per device, rows [start, start + rows) of the Gram matrix of its activations [tokens, d]: [n_dev * rows, d]."""
    return jax.jit(jax.shard_map(lambda t: gram_rows(t, start, rows), mesh=mesh, in_specs=P("data"),
                                 out_specs=P("data"), check_vma=False))


def _kept(outputs: list, pairs):
    """Yields the Hessian term of each (output, Gram) pair, appending the output to ``outputs``."""
    for out, gram_sum in pairs:
        outputs.append(out)
        yield gram_sum


def check_gptq_windows(n_windows: int, batch_size: int, n_devices: int) -> None:
    """Over several devices every device takes ``batch_size`` windows per step, so the window count must be a
    multiple of batch_size * n_devices (calibration's check; one device takes a short last batch)."""
    if n_devices > 1:
        check_window_count(n_windows, batch_size, n_devices)


def _split_codes(c: WeightCodes, cuts: np.ndarray) -> list[WeightCodes]:
    """Codes of linears quantized side by side (outputs concatenated, split at column ``cuts``)
    -> one WeightCodes each."""

    def split(a):
        return [None] * (len(cuts) + 1) if a is None else jnp.split(a, cuts, axis=-1)

    parts = zip(split(c.q_low), split(c.scale_low), split(c.q_high), split(c.scale_high))
    return [dataclasses.replace(c, q_low=a, scale_low=b, q_high=d, scale_high=e) for a, b, d, e in parts]


def _gptq_group(out: MutableMapping, codes: MutableMapping, config: ModelConfig, i: int, names, h: np.ndarray,
                spec: WeightSpec, act_order: bool, damp: float) -> None:
    """GPTQ the linears ``names`` of layer i, which share the input whose Hessian is h, writing the
    dequantized weights into ``out`` and codes into ``codes``. Columns are independent given H and the
    scales, so a group is one call on its side-by-side weights (one Cholesky and one sweep) or, above
    GROUP_ELEMENTS_MAX weights, one call per linear in blocks of GPTQ_COLUMN_BLOCK columns (no side-by-side
    copy; the one Hessian is copied only when it would be factored in place and another linear follows)."""
    from resq_jax.quant.gptq import gptq_quantize

    perm, high = linear_high_rows(config, names[0], spec)
    for name in names[1:]:
        p2, h2 = linear_high_rows(config, name, spec)
        if h2 != high or (perm is None) != (p2 is None) or (perm is not None and not np.array_equal(perm, p2)):
            raise AssertionError(f"linears {names} share an input but not its precision layout")
    keys = [f"layers.{i}.{name}" for name in names]
    kw = dict(low_bits=spec.w_bits, high_bits=spec.high_bits, high_rows=high, row_perm=perm, act_order=act_order,
              damp=damp, clip_search=spec.clip_search)
    d_in = h.shape[0]
    if d_in * sum(out[k].shape[1] for k in keys) > GROUP_ELEMENTS_MAX:
        for n, k in enumerate(keys):
            last = n == len(keys) - 1
            h_k = h if last or d_in <= F64_CHOLESKY_MAX else h.copy()
            res = gptq_quantize(np.asarray(out[k], np.float32), h_k, overwrite_h=True,
                                column_block=GPTQ_COLUMN_BLOCK, **kw)
            out[k] = np.asarray(res.w_q, np.float32)
            codes[k] = res.codes
            del res, h_k
        return
    ws = [np.asarray(out[k], np.float32) for k in keys]
    cuts = np.cumsum([w.shape[1] for w in ws])[:-1]
    w = np.concatenate(ws, axis=1)
    del ws
    res = gptq_quantize(w, h, overwrite_h=True, **kw)
    del w
    w_q = np.asarray(res.w_q, np.float32)
    for k, w_part, c in zip(keys, np.split(w_q, cuts, axis=1), _split_codes(res.codes, cuts)):
        out[k] = w_part
        codes[k] = c


def gptq_weights_codes(config: ModelConfig, weights: Mapping[str, np.ndarray], windows: np.ndarray,
                       spec: WeightSpec, *, batch_size: int = GPTQ_BATCH, act_order: bool = False,
                       damp: float = DEFAULT_DAMP, progress: bool = True, timings: dict | None = None,
                       codes: MutableMapping | None = None) -> QuantizedWeights:
    """GPTQ every decoder linear of the (already transformed) model on windows: [N, T]; the codes
    are GPTQResult.codes (act_order permutes rows inside GPTQ only: its codes come back in
    ``linear_high_rows`` order, see gptq.gptq_quantize).

    Per layer, over every batch of windows: the q/k/v Hessian from the layer input; quantize
    q/k/v; the attention output a (cached per batch) and the o_proj Hessian; quantize o; the
    residual x1 = x + o(a) (cached) and the gate/up Hessian; quantize gate/up; the down_proj
    Hessian from x1; quantize down; the next layer's input x1 + mlp(x1).

    Memory: the current layer's float entries (read once from ``weights``, which may be a view) and its
    quantized linears; the codes go to ``codes`` (default a CodeStore in memory) as each group is done, and
    the result's weights are a view dequantizing them, so neither model is ever whole in memory.

    Devices: over a data mesh of several devices (every device of every process, ``distributed.mesh``) each
    device runs ``batch_size`` windows per step and the Hessians add the devices' Gram matrices in window
    order, exactly as one device adds its batches; every process then runs the same GPTQ on the same Hessian,
    so all processes hold identical codes, equal to the one-device run's."""
    codes = CodeStore() if codes is None else codes
    if spec.w_bits >= OFF:
        return QuantizedWeights(weights, codes)
    # the current layer: its quantized linears first, then its float entries; the rest of ``weights`` on demand
    quantized: dict[str, np.ndarray] = {}
    out = collections.ChainMap(quantized, {}, weights)
    windows = np.asarray(windows, np.int32)
    mesh = data_mesh()
    n_dev = mesh.devices.size
    check_gptq_windows(len(windows), batch_size, n_dev)
    streamer = LayerStreamer.from_weights(config, weights)  # embeddings only: layers are built below
    positions, rope = streamer.rope(windows.shape[1])

    def embed(a, b):
        return streamer.embed(jnp.asarray(windows[a:b]))

    if n_dev == 1:  # batches of batch_size windows (the last may be shorter)
        xs = [embed(s, s + batch_size) for s in range(0, len(windows), batch_size)]
    else:  # steps of batch_size windows per device, each device's block built by its own process
        step = batch_size * n_dev
        xs = [sharded_rows(mesh, (step, windows.shape[1], config.hidden_size),
                           lambda a, b, s=s: embed(s + a, s + b)) for s in range(0, len(windows), step)]
    scale = 2.0 / windows.size
    bar = progress_bar(config.num_layers, "gptq", unit="layer") if progress else None
    per_layer = []

    def stage(fn, g, s, *args, rows=None):
        """One stage on one batch: jitted as is on one device, per device over the mesh otherwise."""
        if n_dev == 1:
            return _STAGES[fn](g, s, *args, **({} if rows is None else {"rows": rows}))
        return _sharded_stage(fn, g, bool(rows), mesh)(s, *args)

    def device_terms(t, rows: bool):
        """A batch's Hessian term -> the terms of its batches of batch_size windows in window order, on the
        host: one device's term as is; over a mesh, every device's (gathered from every process)."""
        if n_dev == 1:
            yield t
        elif not rows:
            yield from gather(t)  # [n_dev, d, d]: device k holds the step's k-th batch
        else:
            yield t  # activations split over the devices: summed per device block in ``add_rows``

    def add_rows(h, t):
        """h[block] += rows of each batch's Gram matrix, HESSIAN_ROW_BLOCK rows at a time, batches in order."""
        d = t.shape[-1]
        for r in range(0, d, HESSIAN_ROW_BLOCK):
            nr = min(HESSIAN_ROW_BLOCK, d - r)
            if n_dev == 1:
                h[r:r + nr] += np.asarray(gram_rows(t, r, nr))
            else:
                blocks = gather(_sharded_gram_rows(mesh, r, nr)(t))  # [n_dev * nr, d]
                for k in range(n_dev):
                    h[r:r + nr] += blocks[k * nr:(k + 1) * nr]

    def hessian(terms, rows: bool):
        """(2/n) * the sum of the batches' Gram matrices, added in window order as they come, as a writable
        float32 NumPy array that GPTQ may overwrite; the same additions in the same order on any number of
        devices and processes, so every process gets the one-device Hessian bit for bit. ``terms`` are Gram
        matrices (one partial sum and one batch's Gram in memory) or, with ``rows``, the batches' activations
        [tokens, d], whose Gram matrices are added HESSIAN_ROW_BLOCK rows at a time (the partial sum, one
        batch and one block in memory)."""
        h = None
        for step_term in terms:
            for t in device_terms(step_term, rows):
                if rows:
                    d = t.shape[-1]
                    h = np.zeros((d, d), np.float32) if h is None else h
                    add_rows(h, t)
                elif h is None:
                    h = np.array(t, dtype=np.float32)
                else:
                    h += np.asarray(t)
                del t
            del step_term
        h *= scale
        return h

    def blocked(site):  # the site's Hessian summed in row blocks (its inputs are too many for whole Gram copies)
        d = {"attn_in": config.hidden_size, "o_in": config.num_heads * config.head_dim,
             "mlp_in": config.hidden_size, "down_in": config.intermediate_size}[site]
        return d > F64_CHOLESKY_MAX

    def split():
        return nnx.split(_layer(config, out, i))

    def group(names, h):
        _gptq_group(out, codes, config, i, names, h, spec, act_order, damp)
        for name in names:  # their float weights are no longer needed
            out.maps[1].pop(f"layers.{i}.{name}", None)

    rows = {site: blocked(site) for site, _ in GPTQ_ORDER}
    for i in range(config.num_layers):
        t0 = time.perf_counter()
        quantized.clear()
        out.maps[1] = _layer_entries(weights, i)
        g, s = split()
        h = hessian((stage(_attn_in, g, s, x, rope, positions, rows=rows["attn_in"]) for x in xs), rows["attn_in"])
        del g, s  # the layer's device copy is rebuilt with the quantized linears after each group
        group(("q", "k", "v"), h)
        g, s = split()
        attn: list = []
        h = hessian(_kept(attn, (stage(_o_in, g, s, x, rope, positions, rows=rows["o_in"]) for x in xs)),
                    rows["o_in"])
        del g, s
        group(("o",), h)
        g, s = split()
        x1s: list = []
        h = hessian(_kept(x1s, (stage(_mlp_in, g, s, x, a, rows=rows["mlp_in"]) for x, a in zip(xs, attn))),
                    rows["mlp_in"])
        del attn, g, s
        group(("gate", "up"), h)
        g, s = split()
        h = hessian((stage(_down_in, g, s, x1, rows=rows["down_in"]) for x1 in x1s), rows["down_in"])
        del g, s
        group(("down",), h)
        del h
        g, s = split()
        xs = [stage(_out, g, s, x1) for x1 in x1s]
        del x1s, g, s
        per_layer.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if timings is not None:
        timings["gptq_per_layer"] = per_layer
    quantized.clear()
    out.maps[1] = {}
    return QuantizedWeights(dequantized(config, weights, codes, spec), codes)


def _layer(config: ModelConfig, weights: Mapping[str, np.ndarray], i: int):
    from resq_jax.models.decoder import DecoderLayer

    return DecoderLayer(config, weights, i)
