"""Where quantization error comes from: per-layer, per-site signal-to-noise ratios of the activation quantizers and
per-channel activation magnitudes, measured by streaming a few windows through a model layer by layer.

``site_snr`` runs the model with its quantizer hooks (as it is evaluated) and, at every quantized site of every
layer, compares the value reaching the site with its quantized version: SNR = 10 log10(sum x^2 / sum (x - q(x))^2)
in dB, in float64 over all tokens of the windows. ``channel_magnitude`` is the mean |x| per channel of one site of
one layer (the ResQ paper's figure of the attention input before and after the projections).
"""
from __future__ import annotations

import numpy as np

from resq_jax.models.decoder import IDENTITY, SiteHooks
from resq_jax.models.streaming import LayerStreamer

SITES = ("attn_in", "k", "v", "o_in", "mlp_in", "down_in")
SITE_LABELS = {"attn_in": "attention input (q/k/v)", "k": "keys (KV cache)", "v": "values (KV cache)",
               "o_in": "o_proj input", "mlp_in": "MLP input (gate/up)", "down_in": "down_proj input"}


def snr_db(x: np.ndarray, q: np.ndarray) -> float:
    """10 log10(sum x^2 / sum (x - q)^2) in float64; inf when q equals x."""
    x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
    noise = float(np.sum((x - q) ** 2))
    return float("inf") if noise == 0.0 else float(10.0 * np.log10(np.sum(x ** 2) / noise))


def site_snr(streamer: LayerStreamer, windows: np.ndarray, hooks: SiteHooks, sites: tuple[str, ...] = SITES,
             measure: SiteHooks | None = None) -> dict[str, np.ndarray]:
    """windows: [N, T] -> {site: [L] SNR in dB} of the quantizers ``measure`` (default ``hooks``) at each site, the
    model running with ``hooks``. A packed model quantizes its linear inputs inside its integer GEMMs, so its own
    hooks leave those sites alone: measure them with FakeQuantHooks of its ActivationSpec, the same quantizers."""
    measure = hooks if measure is None else measure
    x = streamer.embed(np.asarray(windows, np.int32))
    out = {s: np.zeros(streamer.config.num_layers) for s in sites}
    for i in range(streamer.config.num_layers):
        x, captured = streamer.layer(i, x, hooks, capture=sites)
        for s in sites:
            out[s][i] = snr_db(captured[s], measure(s, captured[s]))
    return out


def channel_magnitude(streamer: LayerStreamer, windows: np.ndarray, layer: int, site: str = "attn_in",
                      hooks: SiteHooks = IDENTITY) -> np.ndarray:
    """windows: [N, T] -> mean |x| per channel [channels] at ``site`` of ``layer`` (float64)."""
    if not 0 <= layer < streamer.config.num_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {streamer.config.num_layers} layers")
    x = streamer.embed(np.asarray(windows, np.int32))
    for i in range(layer + 1):
        x, captured = streamer.layer(i, x, hooks, capture=(site,) if i == layer else ())
    a = np.asarray(captured[site], np.float64)
    return np.abs(a.reshape(-1, a.shape[-1] if a.ndim == 3 else a.shape[-2] * a.shape[-1])).mean(axis=0)
