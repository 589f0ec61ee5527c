"""Flax NNX decoder for Llama and Qwen2 and its weight loaders."""
from resq_jax.models.config import ModelConfig, ModelConfigError, RopeScaling, config_from_hf

__all__ = ["ModelConfig", "ModelConfigError", "RopeScaling", "config_from_hf"]
