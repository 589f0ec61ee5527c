"""Where the high-precision channels are: the activation / KV quantizer settings of a recipe
(ActivationSpec), the weight quantizer settings (WeightSpec) and the row order of each linear's
weights, shared by the fake-quant model, GPTQ and the packed runtime.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from resq_jax.formats.bits import OFF
from resq_jax.models.config import ModelConfig
from resq_jax.util.checks import is_int


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """Static activation/KV quantization settings of every layer."""

    a_bits: int = OFF
    kv_bits: int = OFF
    down_bits: int = OFF
    high_bits: int = 8
    high_residual: int = 0  # r: high channels of attn_in / mlp_in
    high_head: int = 0  # r_h: high channels per head of o_in, k, v
    qk_bits: int = OFF  # q/k before the online key rotation
    lowrank_bits: int = OFF  # x @ A of a low-rank (L2QER) correction, per token

    @property
    def active(self) -> bool:
        return min(self.a_bits, self.kv_bits, self.down_bits, self.qk_bits, self.lowrank_bits) < OFF


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Static weight quantization settings: symmetric per output channel."""

    w_bits: int = OFF
    high_bits: int = 8
    high_residual: int = 0  # last r input rows of q/k/v/gate/up in high_bits
    high_head: int = 0  # last r_h input rows of every head's block of o_proj in high_bits
    clip_search: bool = False


def head_high_last_permutation(num_heads: int, head_dim: int, high_head: int) -> np.ndarray:
    """Row order of an o_proj-like input ``[num_heads * head_dim]`` whose last ``high_head`` channels of every
    head are high precision: every head's low rows first (in order), then every head's high rows. The
    weights' high block is then the last ``num_heads * high_head`` rows."""
    for v, name in ((num_heads, "num_heads"), (head_dim, "head_dim")):
        if not is_int(v) or int(v) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not is_int(high_head) or not 0 <= int(high_head) <= int(head_dim):
        raise ValueError(f"high_head must be an integer in 0..head_dim={head_dim}, got {high_head!r}")
    rows = np.arange(num_heads * head_dim).reshape(num_heads, head_dim)
    cut = head_dim - int(high_head)
    return np.concatenate([rows[:, :cut].ravel(), rows[:, cut:].ravel()]).astype(np.int64)


def linear_high_rows(config: ModelConfig, name: str, spec: WeightSpec) -> tuple[np.ndarray | None, int]:
    """(row permutation or None, number of high rows at the end after permuting) for a linear."""
    if name in ("q", "k", "v", "gate", "up"):
        return None, spec.high_residual
    if name == "o":
        if spec.high_head == 0:
            return None, 0
        return head_high_last_permutation(config.num_heads, config.head_dim, spec.high_head), \
            config.num_heads * spec.high_head
    return None, 0  # down: uniform


LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
