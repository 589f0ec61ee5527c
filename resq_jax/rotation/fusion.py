"""Function-preserving weight transforms (docs/algorithms.md, Norm folding and fusion).

Every function takes a weights mapping (naming contract in models/config.py, linear weights
[d_in, d_out]) and returns a new one; inputs are never modified. Arithmetic in float64, the
result cast back to float32.

  untie_embeddings   lm_head = embed^T (must precede folding: the final norm folds into lm_head only)
  fold_norms         RMSNorm gains into the next linears' input rows; gains set to 1
  FoldedWeights      untie + fold as a view computed per entry on access (no second model in memory)
  rotated_residual   residual-stream basis U [d, d]: E U, U^T W_in, W_out U, U^T W_head
  rotated_values     per layer and KV head U_v [hd, hd]: v columns @ U_v (bias too), o rows U_v^T @
  with_key_rotation  online q/k rotation after RoPE, per layer [hd, hd]
  with_down_hadamard down_proj rows H @ W (H normalized Hadamard of size ffn), H applied online

The four transforms are views (``LazyWeights``) computed per entry on access; ``rotate_residual``,
``rotate_values``, ``set_key_rotation`` and ``fuse_down_hadamard`` are the same views materialized.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from resq_jax.models.config import ModelConfig
from resq_jax.models.views import VOCAB_AXIS, LazyWeights, assemble_vocab, vocab_slice
from resq_jax.transforms.fwht import hadamard_transform_np

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


class FoldedWeights(LazyWeights):
    """``fold_norms(*untie_embeddings(config, weights))`` computed one entry at a time on access.

    Nothing is copied up front and nothing is cached: reading ``layers.3.q`` returns
    attn_norm-gain * q (float64 product, float32 result), reading a norm returns ones, and
    ``lm_head`` is norm-gain * embed^T when the model is tied. Calibration streams the layers
    through this view, so it holds the original model plus one folded layer, not two models.
    ``config`` is the untied configuration (``FoldedWeights.untied_config``).
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray]):
        self._config = config
        tied = config.tie_word_embeddings or "lm_head" not in weights

        def vocab(name, index):
            if name != "lm_head":
                return None
            head = vocab_slice(weights, "embed", index).T if tied else vocab_slice(weights, "lm_head", index)
            return np.ascontiguousarray(_f32(_f64(weights["norm"])[:, None] * _f64(head)))

        def entry(key):
            if key == "lm_head":
                return assemble_vocab(vocab, "lm_head", config.vocab_size)
            prefix, _, name = key.rpartition(".")
            if key == "norm" or (prefix and name in ("attn_norm", "mlp_norm")):
                return np.ones_like(weights[key], dtype=np.float32)
            if prefix.startswith("layers.") and name in _NORM_OF:
                g = _f64(weights[f"{prefix}.{_NORM_OF[name]}"])
                return _f32(g[:, None] * _f64(weights[key]))
            return None

        super().__init__(weights, entry, extra=["lm_head"], vocab=vocab,
                         dtypes=lambda name: np.float32 if name == "lm_head" else None)

    @property
    def untied_config(self) -> ModelConfig:
        return dataclasses.replace(self._config, tie_word_embeddings=False)


def _check_folded(config: ModelConfig, weights: Mapping[str, np.ndarray]):
    gains = [weights["norm"]] + [weights[f"layers.{i}.{n}"] for i in range(config.num_layers)
                                 for n in ("attn_norm", "mlp_norm")]
    if config.tie_word_embeddings or any(not np.all(np.asarray(g) == 1) for g in gains):
        raise ValueError("rotating the residual stream needs untied embeddings and folded norms "
                         "(call untie_embeddings and fold_norms first)")


def _layer_key(key: str) -> tuple[int, str] | None:
    """``layers.{i}.{name}`` -> (i, name); None for global entries."""
    if not key.startswith("layers."):
        return None
    _, i, name = key.split(".", 2)
    return int(i), name


def rotated_residual(config: ModelConfig, weights: Mapping[str, np.ndarray], u: np.ndarray) -> LazyWeights:
    """The residual stream's basis changed to x U, U: [d, d] orthogonal (a view). Function-preserving."""
    _check_folded(config, weights)
    u = _f64(u)

    def vocab(name, index):
        if name == "embed":
            return _f32(_f64(vocab_slice(weights, "embed", index)) @ u)
        return _f32(u.T @ _f64(vocab_slice(weights, "lm_head", index)))

    def entry(key):
        if key in VOCAB_AXIS:
            return assemble_vocab(vocab, key, config.vocab_size)
        layer = _layer_key(key)
        if layer is None:
            return None
        name = layer[1]
        if name in _RESIDUAL_INPUTS:
            return _f32(u.T @ _f64(weights[key]))
        if name in _RESIDUAL_OUTPUTS or name.removesuffix("_bias") in _RESIDUAL_OUTPUTS:
            return _f32(_f64(weights[key]) @ u)
        return None

    return LazyWeights(weights, entry, vocab=vocab)


def rotated_values(config: ModelConfig, weights: Mapping[str, np.ndarray], u_value: np.ndarray) -> LazyWeights:
    """u_value: [L, KV, hd, hd]: v head h's output columns @ U (and its bias); the o_proj input rows of every
    query head in h's GQA group <- U^T @ rows (a view)."""
    hd, kv, g = config.head_dim, config.num_kv_heads, config.group_size
    u_value = _f64(u_value)
    if u_value.shape != (config.num_layers, kv, hd, hd):
        raise ValueError(f"u_value must be [{config.num_layers}, {kv}, {hd}, {hd}], got {u_value.shape}")

    def entry(key):
        layer = _layer_key(key)
        if layer is None:
            return None
        i, name = layer
        u = u_value[i]
        if name == "v":
            v = _f64(weights[key]).reshape(-1, kv, hd)
            return _f32(np.einsum("ikh,khj->ikj", v, u).reshape(-1, kv * hd))
        if name == "v_bias":
            b = _f64(weights[key]).reshape(kv, hd)
            return _f32(np.einsum("kh,khj->kj", b, u).reshape(-1))
        if name == "o":
            o = _f64(weights[key]).reshape(kv, g, hd, -1)  # query head = kv_head * g + j
            return _f32(np.einsum("khj,kgho->kgjo", u, o).reshape(kv * g * hd, -1))
        return None

    return LazyWeights(weights, entry)


def with_key_rotation(config: ModelConfig, weights: Mapping[str, np.ndarray], k_rot: np.ndarray) -> LazyWeights:
    """k_rot: [L, hd, hd], applied online to q and k after RoPE (q.k unchanged when orthogonal); a view."""
    k_rot = np.asarray(k_rot)
    if k_rot.shape != (config.num_layers, config.head_dim, config.head_dim):
        raise ValueError(f"k_rot must be [{config.num_layers}, {config.head_dim}, {config.head_dim}], "
                         f"got {k_rot.shape}")
    keys = [f"layers.{i}.key_rotation" for i in range(config.num_layers)]
    added = set(keys)

    def entry(key):
        return _f32(k_rot[_layer_key(key)[0]]) if key in added else None

    return LazyWeights(weights, entry, extra=[k for k in keys if k not in weights])


def with_down_hadamard(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> LazyWeights:
    """down_proj W <- H W with H the normalized Hadamard of size ffn; the decoder applies g -> g H^T online,
    so (g H^T)(H W) = g W (a view)."""
    n = config.intermediate_size
    keys = [f"layers.{i}.down_hadamard" for i in range(config.num_layers)]
    added = set(keys)

    def entry(key):
        if key in added:
            return n
        layer = _layer_key(key)
        if layer is not None and layer[1] == "down":
            w_t = _f64(weights[key]).T  # [d, ffn]: each row r -> H r, i.e. r @ H^T
            return _f32(hadamard_transform_np(w_t).T)
        return None

    return LazyWeights(weights, entry, extra=[k for k in keys if k not in weights])


def rotate_residual(config: ModelConfig, weights: Mapping[str, np.ndarray], u: np.ndarray) -> Weights:
    """``rotated_residual`` materialized."""
    return dict(rotated_residual(config, weights, u))


def rotate_values(config: ModelConfig, weights: Mapping[str, np.ndarray], u_value: np.ndarray) -> Weights:
    """``rotated_values`` materialized."""
    return dict(rotated_values(config, weights, u_value))


def set_key_rotation(config: ModelConfig, weights: Mapping[str, np.ndarray], k_rot: np.ndarray) -> Weights:
    """``with_key_rotation`` materialized."""
    return dict(with_key_rotation(config, weights, k_rot))


def fuse_down_hadamard(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> Weights:
    """``with_down_hadamard`` materialized."""
    return dict(with_down_hadamard(config, weights))
