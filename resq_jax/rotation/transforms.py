"""The orthogonal transforms of a recipe: ResQ's PCA bases with rotations inside each subspace,
QuaRot's randomized Hadamard, and their fusion into the weights (docs/algorithms.md).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from resq_jax.calibration.statistics import CalibrationStats
from resq_jax.models.config import ModelConfig
from resq_jax.rotation import fusion
from resq_jax.transforms.hadamard import hadamard_matrix
from resq_jax.transforms.orthogonal import block_diag_rotation, randomized_hadamard
from resq_jax.transforms.pca import damped_eigh, high_rank


@dataclasses.dataclass
class Transforms:
    """The orthogonal transforms of a recipe (float64), all optional."""

    residual: np.ndarray | None = None  # [d, d]
    value: np.ndarray | None = None  # [L, KV, hd, hd]
    key: np.ndarray | None = None  # [L, hd, hd]
    down_hadamard: bool = False


def resq_transforms(config: ModelConfig, stats: CalibrationStats, fraction: float, seed: int) -> Transforms:
    """ResQ's bases from calibration statistics (docs/algorithms.md, The bases U_A, U_B, U_C and U_D)."""
    d, hd, n_layers = config.hidden_size, config.head_dim, config.num_layers
    h_res = (stats.attn_sum + stats.mlp_sum) / (2 * n_layers * stats.tokens)
    _, u_a = damped_eigh(h_res)
    r1 = block_diag_rotation(d, high_rank(d, fraction), (seed, 1))
    r2 = block_diag_rotation(hd, high_rank(hd, fraction), (seed, 2))
    value = np.stack([np.stack([damped_eigh(stats.value[l, h])[1] @ r2 for h in range(config.num_kv_heads)])
                      for l in range(n_layers)])
    key = np.stack([damped_eigh(stats.key[l])[1] @ r2 for l in range(n_layers)])
    return Transforms(residual=u_a @ r1, value=value, key=key, down_hadamard=True)


def quarot_transforms(config: ModelConfig, seed: int) -> Transforms:
    hd, n_layers, kv = config.head_dim, config.num_layers, config.num_kv_heads
    h_head = hadamard_matrix(hd)
    return Transforms(residual=randomized_hadamard(config.hidden_size, (seed, 1)),
                      value=np.broadcast_to(h_head, (n_layers, kv, hd, hd)).copy(),
                      key=np.broadcast_to(h_head, (n_layers, hd, hd)).copy(), down_hadamard=True)


def apply_transforms(config: ModelConfig, weights: Mapping[str, np.ndarray], t: Transforms) -> Mapping:
    """Fuse the transforms into (untied, folded) weights; the key rotation and the down_proj Hadamard are also
    installed as online transforms. A view (models.views.LazyWeights): each entry is computed from ``weights`` when
    read, so the transformed model is never whole in memory; ``dict(...)`` materializes it."""
    w = weights
    if t.residual is not None:
        w = fusion.rotated_residual(config, w, t.residual)
    if t.value is not None:
        w = fusion.rotated_values(config, w, t.value)
    if t.key is not None:
        w = fusion.with_key_rotation(config, w, t.key)
    if t.down_hadamard:
        w = fusion.with_down_hadamard(config, w)
    return w
