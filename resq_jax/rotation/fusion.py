"""Function-preserving weight transforms (docs/algorithms.md, Norm folding and fusion).

Every function takes a weights dict (naming contract in models/config.py, linear weights
[d_in, d_out]) and returns a new one; inputs are never modified. Arithmetic in float64, the
result cast back to float32.

  untie_embeddings   lm_head = embed^T (must precede folding: the final norm folds into lm_head only)
  fold_norms         RMSNorm gains into the next linears' input rows; gains set to 1
  FoldedWeights      untie + fold as a view computed per entry on access (no second model in memory)
  rotate_residual    residual-stream basis U [d, d]: E U, U^T W_in, W_out U, U^T W_head
  rotate_values      per layer and KV head U_v [hd, hd]: v columns @ U_v (bias too), o rows U_v^T @
  set_key_rotation   online q/k rotation after RoPE, per layer [hd, hd]
  fuse_down_hadamard down_proj rows H @ W (H normalized Hadamard of size ffn), H applied online
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from resq_jax.models.config import ModelConfig

Weights = dict[str, np.ndarray]

_RESIDUAL_INPUTS = ("q", "k", "v", "gate", "up")
_RESIDUAL_OUTPUTS = ("o", "down")


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def untie_embeddings(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> tuple[ModelConfig, Weights]:
    """Give the model a separate lm_head [d, vocab] = embed^T; no-op when already untied."""
    out = dict(weights)
    if config.tie_word_embeddings or "lm_head" not in out:
        out["lm_head"] = np.ascontiguousarray(np.asarray(weights["embed"], dtype=np.float32).T)
    return dataclasses.replace(config, tie_word_embeddings=False), out


def fold_norms(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> Weights:
    """Scale the input rows of the linears after each RMSNorm by its gain; set gains to 1.

    Requires an untied lm_head (the final norm's gain must not touch the embeddings).
    """
    if config.tie_word_embeddings or "lm_head" not in weights:
        raise ValueError("fold_norms needs untied embeddings: call untie_embeddings first")
    return dict(FoldedWeights(config, weights))


# linear -> the RMSNorm whose gain folds into its input rows
_NORM_OF = {"q": "attn_norm", "k": "attn_norm", "v": "attn_norm", "gate": "mlp_norm", "up": "mlp_norm"}


class FoldedWeights(Mapping):
    """``fold_norms(*untie_embeddings(config, weights))`` computed one entry at a time on access.

    Nothing is copied up front and nothing is cached: reading ``layers.3.q`` returns
    attn_norm-gain * q (float64 product, float32 result), reading a norm returns ones, and
    ``lm_head`` is norm-gain * embed^T when the model is tied. Calibration streams the layers
    through this view, so it holds the original model plus one folded layer, not two models.
    ``config`` is the untied configuration (``FoldedWeights.untied_config``).
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray]):
        self._config = config
        self._weights = weights
        self._keys = dict.fromkeys([*weights, "lm_head"])  # ordered, O(1) membership

    @property
    def untied_config(self) -> ModelConfig:
        return dataclasses.replace(self._config, tie_word_embeddings=False)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def __getitem__(self, key: str):
        w = self._weights
        if key == "lm_head":
            tied = self._config.tie_word_embeddings or "lm_head" not in w
            head = _f64(w["embed"]).T if tied else _f64(w["lm_head"])
            return np.ascontiguousarray(_f32(_f64(w["norm"])[:, None] * head))
        if key not in w:
            raise KeyError(key)
        prefix, _, name = key.rpartition(".")
        if key == "norm" or (prefix and name in ("attn_norm", "mlp_norm")):
            return np.ones_like(w[key], dtype=np.float32)
        if prefix.startswith("layers.") and name in _NORM_OF:
            g = _f64(w[f"{prefix}.{_NORM_OF[name]}"])
            return _f32(g[:, None] * _f64(w[key]))
        return w[key]


def _check_folded(config: ModelConfig, weights: Mapping[str, np.ndarray]):
    gains = [weights["norm"]] + [weights[f"layers.{i}.{n}"] for i in range(config.num_layers)
                                 for n in ("attn_norm", "mlp_norm")]
    if config.tie_word_embeddings or any(not np.all(np.asarray(g) == 1) for g in gains):
        raise ValueError("rotating the residual stream needs untied embeddings and folded norms "
                         "(call untie_embeddings and fold_norms first)")


def rotate_residual(config: ModelConfig, weights: Mapping[str, np.ndarray], u: np.ndarray) -> Weights:
    """Change the residual stream's basis to x U, U: [d, d] orthogonal. Function-preserving."""
    _check_folded(config, weights)
    u = _f64(u)
    out = dict(weights)
    out["embed"] = _f32(_f64(weights["embed"]) @ u)
    out["lm_head"] = _f32(u.T @ _f64(weights["lm_head"]))
    for i in range(config.num_layers):
        p = f"layers.{i}."
        for name in _RESIDUAL_INPUTS:
            out[p + name] = _f32(u.T @ _f64(weights[p + name]))
        for name in _RESIDUAL_OUTPUTS:
            out[p + name] = _f32(_f64(weights[p + name]) @ u)
            if p + name + "_bias" in weights:
                out[p + name + "_bias"] = _f32(_f64(weights[p + name + "_bias"]) @ u)
    return out


def rotate_values(config: ModelConfig, weights: Mapping[str, np.ndarray], u_value: np.ndarray) -> Weights:
    """u_value: [L, KV, hd, hd]: v head h's output columns @ U (and its bias); the o_proj input
    rows of every query head in h's GQA group <- U^T @ rows."""
    hd, kv, g = config.head_dim, config.num_kv_heads, config.group_size
    u_value = _f64(u_value)
    if u_value.shape != (config.num_layers, kv, hd, hd):
        raise ValueError(f"u_value must be [{config.num_layers}, {kv}, {hd}, {hd}], got {u_value.shape}")
    out = dict(weights)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        u = u_value[i]
        v = _f64(weights[p + "v"]).reshape(-1, kv, hd)
        out[p + "v"] = _f32(np.einsum("ikh,khj->ikj", v, u).reshape(-1, kv * hd))
        if p + "v_bias" in weights:
            b = _f64(weights[p + "v_bias"]).reshape(kv, hd)
            out[p + "v_bias"] = _f32(np.einsum("kh,khj->kj", b, u).reshape(-1))
        o = _f64(weights[p + "o"]).reshape(kv, g, hd, -1)  # query head = kv_head * g + j
        out[p + "o"] = _f32(np.einsum("khj,kgho->kgjo", u, o).reshape(kv * g * hd, -1))
    return out


def set_key_rotation(config: ModelConfig, weights: Mapping[str, np.ndarray], k_rot: np.ndarray) -> Weights:
    """k_rot: [L, hd, hd], applied online to q and k after RoPE (q.k unchanged when orthogonal)."""
    k_rot = np.asarray(k_rot)
    if k_rot.shape != (config.num_layers, config.head_dim, config.head_dim):
        raise ValueError(f"k_rot must be [{config.num_layers}, {config.head_dim}, {config.head_dim}], "
                         f"got {k_rot.shape}")
    out = dict(weights)
    for i in range(config.num_layers):
        out[f"layers.{i}.key_rotation"] = _f32(k_rot[i])
    return out


def fuse_down_hadamard(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> Weights:
    """down_proj W <- H W with H the normalized Hadamard of size ffn; the decoder applies
    g -> g H^T online, so (g H^T)(H W) = g W."""
    from resq_jax.transforms.fwht import hadamard_transform_np

    n = config.intermediate_size
    out = dict(weights)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        w_t = _f64(weights[p + "down"]).T  # [d, ffn]: each row r -> H r, i.e. r @ H^T
        out[p + "down"] = _f32(hadamard_transform_np(w_t).T)
        out[p + "down_hadamard"] = n
    return out
