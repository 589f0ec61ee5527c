"""Weight quantization of every decoder linear: RTN, or GPTQ with streamed Hessians.

GPTQ (REFERENCE.md section 4) streams the model layer by layer over calibration windows.
Inside a layer each linear's Hessian comes from the inputs produced by the already
quantized earlier parts of the layer, in the order [q, k, v] -> [o] -> [gate, up] -> [down];
the next layer is fed the outputs of the fully quantized layer. Activations stay in float
while collecting Hessians (online transforms, such as the down_proj Hadamard and the key
rotation, are part of the model and do apply).
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.decoder import IDENTITY, from_weights
from models.runner import LayerStreamer, layer_apply
from resq_jax.fake_quant import LINEARS, OFF, WeightSpec, linear_high_rows
from resq_jax.quantizers import WeightCodes, dequantize_weight, quantize_weight_sym

# (site whose inputs feed the linears, the linears) in the order GPTQ visits them
GPTQ_ORDER = (("attn_in", ("q", "k", "v")), ("o_in", ("o",)), ("mlp_in", ("gate", "up")), ("down_in", ("down",)))


@dataclasses.dataclass
class QuantizedWeights:
    """A weights dict with every decoder linear quantized, and the quantizer's integer codes.

    weights: the input dict with ``layers.{i}.{name}`` replaced by its dequantized float32
             weights [d_in, d_out] in the original row order (what the fake-quant model runs).
    codes:   {"layers.{i}.{name}": WeightCodes} in the row order of ``linear_high_rows`` (o_proj's
             rows permuted so every head's high rows come last; identity for the others), such
             that ``dequantize_weight(codes)`` un-permuted equals ``weights`` exactly. Empty when
             weights are not quantized (w_bits >= 16).
    """

    weights: dict
    codes: dict[str, WeightCodes]


def _unpermute(rows: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    """rows: [d_in, d_out] in ``perm`` order -> the original row order."""
    if perm is None:
        return rows
    out = np.empty_like(rows)
    out[perm] = rows
    return out


def rtn_weights_codes(config: ModelConfig, weights: Mapping[str, np.ndarray], spec: WeightSpec) -> QuantizedWeights:
    """Every decoder linear quantized with round-to-nearest (embeddings, lm_head untouched)."""
    out = dict(weights)
    codes: dict[str, WeightCodes] = {}
    if spec.w_bits >= OFF:
        return QuantizedWeights(out, codes)
    for i in range(config.num_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            perm, high = linear_high_rows(config, name, spec)
            w = np.asarray(weights[key], np.float32)
            codes[key] = quantize_weight_sym(jnp.asarray(w if perm is None else w[perm]), spec.w_bits,
                                             spec.high_bits, high, spec.clip_search)
            out[key] = _unpermute(np.asarray(dequantize_weight(codes[key])), perm)
    return QuantizedWeights(out, codes)


def rtn_weights(config: ModelConfig, weights: Mapping[str, np.ndarray], spec: WeightSpec) -> dict:
    """Every decoder linear fake-quantized with round-to-nearest (embeddings, lm_head untouched)."""
    return rtn_weights_codes(config, weights, spec).weights


@functools.partial(jax.jit, static_argnames=("graphdef", "site"))
def _site_hessian(graphdef, state, x, rope, positions, site: str):
    """Sum over tokens of v v^T for the inputs v of a layer's site, x: [b, T, d] -> [c, c].

    Only the site is returned, so XLA drops the rest of the layer (computing the Hessian of
    q/k/v costs one RMSNorm, that of o_proj the attention block, and so on)."""
    cos, sin = rope
    _, sites, _ = nnx.merge(graphdef, state)(x, cos, sin, positions, IDENTITY, capture=(site,))
    v = sites[site].astype(jnp.float32)
    v = v.reshape(-1, v.shape[2] * (v.shape[3] if v.ndim == 4 else 1))
    return v.T @ v


def gptq_weights(config: ModelConfig, weights: Mapping[str, np.ndarray], windows: np.ndarray,
                 spec: WeightSpec, **kw) -> dict:
    """GPTQ every decoder linear of the (already transformed) model on windows: [N, T]
    (keywords of ``gptq_weights_codes``)."""
    return gptq_weights_codes(config, weights, windows, spec, **kw).weights


def gptq_weights_codes(config: ModelConfig, weights: Mapping[str, np.ndarray], windows: np.ndarray,
                       spec: WeightSpec, *, batch_size: int = 4, act_order: bool = False, progress: bool = True,
                       timings: dict | None = None) -> QuantizedWeights:
    """GPTQ every decoder linear of the (already transformed) model on windows: [N, T]; the codes
    are GPTQResult.codes (act_order permutes rows inside GPTQ only: its codes come back in
    ``linear_high_rows`` order, see gptq.gptq_quantize)."""
    from resq_jax.gptq import gptq_quantize

    out = dict(weights)
    codes: dict[str, WeightCodes] = {}
    if spec.w_bits >= OFF:
        return QuantizedWeights(out, codes)
    windows = np.asarray(windows, np.int32)
    streamer = LayerStreamer(from_weights(config, out))
    positions, rope = streamer.rope(windows.shape[1])
    xs = [streamer.embed(jnp.asarray(windows[s:s + batch_size])) for s in range(0, len(windows), batch_size)]
    n_tokens = windows.size
    bar = _progress(config.num_layers, "gptq") if progress else None
    per_layer = []
    for i in range(config.num_layers):
        t0 = time.perf_counter()
        for site, names in GPTQ_ORDER:
            graphdef, state = nnx.split(_layer(config, out, i))
            h = None
            for x in xs:
                hx = _site_hessian(graphdef, state, x, rope, positions, site)
                h = hx if h is None else h + hx
            h = np.asarray(h, np.float32) * (2.0 / n_tokens)
            for name in names:
                key = f"layers.{i}.{name}"
                perm, high = linear_high_rows(config, name, spec)
                res = gptq_quantize(np.asarray(out[key], np.float32), h, low_bits=spec.w_bits,
                                    high_bits=spec.high_bits, high_rows=high, row_perm=perm,
                                    act_order=act_order, clip_search=spec.clip_search)
                out[key] = np.asarray(res.w_q, np.float32)
                codes[key] = res.codes
        graphdef, state = nnx.split(_layer(config, out, i))
        xs = [layer_apply(graphdef, state, x, rope, positions)[0] for x in xs]
        per_layer.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if timings is not None:
        timings["gptq_per_layer"] = per_layer
    return QuantizedWeights(out, codes)


def _layer(config: ModelConfig, weights: Mapping[str, np.ndarray], i: int):
    from models.decoder import DecoderLayer

    return DecoderLayer(config, weights, i)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True)
