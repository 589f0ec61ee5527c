"""Model configuration shared by every decoder family (Llama, Qwen2/Qwen2.5).

Weight naming contract (what loaders return and the decoder consumes). All
arrays float32 NumPy; linear weights stored ``[d_in, d_out]`` so a linear is
``x @ W`` (HF stores ``[d_out, d_in]``: loaders transpose):

  embed                     [vocab, d]
  layers.{i}.attn_norm      [d]
  layers.{i}.q / k / v      [d, heads*head_dim] / [d, kv_heads*head_dim] (x2)
  layers.{i}.q_bias / k_bias / v_bias   (only when ``attention_bias``)
  layers.{i}.o              [heads*head_dim, d]
  layers.{i}.mlp_norm       [d]
  layers.{i}.gate / up      [d, ffn]
  layers.{i}.down           [ffn, d]
  norm                      [d]
  lm_head                   [d, vocab]   (absent when ``tie_word_embeddings``)

q and k use the split-halves RoPE layout of transformers (``rotate_half``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


class ModelConfigError(ValueError):
    """A model configuration this project cannot run; the message says why."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {self.arch!r}: resq-jax runs {', '.join(SUPPORTED_ARCHITECTURES)} "
                "(Llama-2/3, SmolLM2, Qwen2/Qwen2.5)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ModelConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


_ARCH_BY_HF = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_BY_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a transformers ``config.json`` dict (v4 or v5 layout)."""
    archs = list(hf.get("architectures") or [])
    arch = None
    for a in archs:
        arch = arch or _ARCH_BY_HF.get(a)
    arch = arch or _ARCH_BY_MODEL_TYPE.get(hf.get("model_type", ""))
    if arch is None:
        raise ModelConfigError(
            f"unsupported architecture {archs or hf.get('model_type')!r} in config.json: resq-jax supports "
            f"{', '.join(sorted(_ARCH_BY_HF))} (model_type llama or qwen2)")
    d = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or d // heads
    rope_params = hf.get("rope_parameters") or {}
    rope_scaling_raw = hf.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default") else None)
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = None
    if rope_scaling_raw:
        rtype = rope_scaling_raw.get("rope_type", rope_scaling_raw.get("type"))
        if rtype == "llama3":
            scaling = RopeScaling(
                factor=float(rope_scaling_raw["factor"]),
                low_freq_factor=float(rope_scaling_raw["low_freq_factor"]),
                high_freq_factor=float(rope_scaling_raw["high_freq_factor"]),
                original_max_position_embeddings=int(rope_scaling_raw["original_max_position_embeddings"]),
            )
        elif rtype not in (None, "default"):
            raise ModelConfigError(f"unsupported rope scaling {rtype!r}: resq-jax supports 'default' and 'llama3'")
    eps = hf.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5)
    bias = bool(hf.get("attention_bias", arch == "qwen2"))
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelConfig(
        arch=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=d,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_eps=float(eps),
        rope_theta=float(theta),
        rope_scaling=scaling,
        attention_bias=bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
    )
