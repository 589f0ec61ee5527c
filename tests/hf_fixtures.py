"""Tiny random transformers models (saved with save_pretrained) used as parity fixtures."""
from __future__ import annotations

import numpy as np


def tiny_llama_config(tied: bool = True, llama3: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied,
        rope_scaling=({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16} if llama3 else None),
        torch_dtype="float32",
    )


def tiny_qwen2_config(tied: bool = False):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tied, torch_dtype="float32",
    )


def build_torch_model(config, seed: int = 0):
    """A transformers causal LM with random weights, biases and norm gains made non-trivial."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def transformers_gguf_perplexity(gguf_path: str, windows: np.ndarray) -> float:
    """Independent reference: transformers (torch, float32) loads the GGUF itself; ppl =
    exp(mean over windows of the mean next-token cross-entropy), windows: [N, T]."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = str(gguf_path).rsplit("/", 1)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for w in windows:
            t = torch.as_tensor(w[None], dtype=torch.long)
            losses.append(model(t, labels=t).loss.item())
    return float(np.exp(np.mean(losses)))
