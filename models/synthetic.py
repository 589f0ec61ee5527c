"""Random models with the exact shapes of real ones, written as transformers folders (config.json, bfloat16
safetensors shards with ``model.safetensors.index.json``, a tokenizer), tensor by tensor: a 7B-shaped model is
written with about one chunk of one tensor in memory.

Scale (why activations stay finite through every layer): every linear's entries are N(0, 1/d_in) (so a linear
keeps the mean square of its input), the embedding's entries N(0, 1), norm gains 1 + N(0, 0.05^2), biases
N(0, 0.02^2). RMSNorm then feeds every attention and MLP block unit-RMS input and each block adds an output of
RMS about 1 (attention) and below 1 (the SwiGLU MLP) to the residual stream, so the residual's RMS grows about
like sqrt(2 * layers), a few units after 28 layers, far from float32 or bfloat16 limits.

The weights are random, so perplexities measure nothing but the pipeline's memory and time; the shapes, dtypes,
file layout and tokenizer are those of the real checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from resq_jax.models.config import ModelConfig, config_from_hf
from resq_jax.models.loaders import expected_shapes, hf_name_map
from resq_jax.util.files import atomic_file

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
_CHUNK_ELEMENTS = 1 << 24  # rows are generated in chunks of about 64 MB of float32


@dataclasses.dataclass(frozen=True)
class Shape:
    """A real model's architecture (its config.json fields) and which tokenizer to ship with it."""

    hf_config: dict
    tokenizer: str  # built-in model whose GGUF tokenizer is saved with the folder


def _qwen2(hidden, ffn, layers, heads, kv, vocab, tied, max_pos=32768):
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": max_pos, "hidden_act": "silu",
            "attention_bias": True, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643}


SHAPES: dict[str, Shape] = {
    "qwen2.5-7b": Shape(_qwen2(3584, 18944, 28, 28, 4, 152064, tied=False, max_pos=131072), "qwen2.5-coder-0.5b"),
    "qwen2.5-0.5b": Shape(_qwen2(896, 4864, 24, 14, 2, 151936, tied=True), "qwen2.5-coder-0.5b"),
    "llama-3-8b": Shape({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                         "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                         "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
                         "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
                         "bos_token_id": 1, "eos_token_id": 2}, "smollm2"),
    # a mid-size Llama for memory checks (tests/test_streaming_scale.py): layers of 86 MB in float32 and
    # SmolLM2's tokenizer and vocabulary, so scripts/quantize.py runs it
    "small-llama": Shape({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
                          "intermediate_size": 6144, "num_hidden_layers": 6, "num_attention_heads": 8,
                          "num_key_value_heads": 2, "vocab_size": 49152, "tie_word_embeddings": False,
                          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                          "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
                          "bos_token_id": 1, "eos_token_id": 2}, "smollm2"),
    # small shapes for tests and quick checks (the tokenizers' vocabularies are larger than these tables: the
    # tokenizer is not saved, token ids are drawn below vocab_size)
    "tiny-qwen2": Shape(_qwen2(64, 96, 4, 4, 2, 512, tied=False), ""),
    "tiny-llama": Shape({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                         "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True,
                         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                         "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16"}, ""),
}


# Llama-3-70B: Llama-3-8B's vocabulary, rope and tokenizer at 8192 wide, 80 layers, 64 heads with 8 KV heads
SHAPES["llama-3-70b"] = Shape({**SHAPES["llama-3-8b"].hf_config, "hidden_size": 8192, "intermediate_size": 28672,
                               "num_hidden_layers": 80, "num_attention_heads": 64}, "smollm2")
# tiny-llama's layers with SmolLM2's vocabulary and tokenizer: the command-line programs run it in seconds
SHAPES["tiny-llama-smol"] = Shape({**SHAPES["tiny-llama"].hf_config, "num_hidden_layers": 2, "vocab_size": 49152,
                                   "bos_token_id": 1, "eos_token_id": 2}, "smollm2")


class SyntheticModelError(ValueError):
    """Bad arguments for a random model; the message names the problem and the fix."""


def hf_config(shape: str, layers: int | None = None) -> dict:
    if shape not in SHAPES:
        raise SyntheticModelError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cfg = dict(SHAPES[shape].hf_config)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers <= 0:
            raise SyntheticModelError(f"--layers must be a positive integer, got {layers!r}")
        cfg["num_hidden_layers"] = layers
    return cfg


def _tensor_plan(config: ModelConfig) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(HF name, HF shape, kind, std) for every tensor, in the order they are written."""
    plan = []
    names = hf_name_map(config)
    for name, shape in expected_shapes(config).items():
        hf, linear = names[name]
        hf_shape = tuple(reversed(shape)) if linear else shape
        suffix = name.rsplit(".", 1)[-1]
        if suffix.endswith("norm") or name == "norm":
            plan.append((hf, hf_shape, "gain", 0.05))
        elif suffix.endswith("bias"):
            plan.append((hf, hf_shape, "normal", 0.02))
        elif name == "embed":
            plan.append((hf, hf_shape, "normal", 1.0))
        else:  # linears (lm_head included): N(0, 1/d_in); HF stores [d_out, d_in]
            plan.append((hf, hf_shape, "normal", float(hf_shape[1]) ** -0.5))
    return plan


def _chunks(shape: tuple[int, ...], kind: str, std: float, seed: int) -> Iterator[np.ndarray]:
    """The tensor's values as bfloat16, in row chunks (one counter-based stream per tensor and seed)."""
    rng = np.random.default_rng(seed)
    rows = shape[0]
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, _CHUNK_ELEMENTS // per_row) if len(shape) > 1 else rows
    for r in range(0, rows, step):
        n = min(step, rows - r)
        x = rng.standard_normal((n, *shape[1:]), dtype=np.float32) * np.float32(std)
        if kind == "gain":
            x += np.float32(1.0)
        yield x.astype(ml_dtypes.bfloat16)


def write_random_model(out: str | os.PathLike, shape: str, layers: int | None = None, seed: int = 0,
                       shard_bytes: int = SHARD_BYTES, with_tokenizer: bool = True) -> Path:
    """Write the folder and return it. Fails before writing anything if ``out`` exists and is not empty."""
    cfg = hf_config(shape, layers)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SyntheticModelError(f"{out} exists and is not empty; choose a new folder")
    config = config_from_hf(cfg)
    plan = _tensor_plan(config)
    shards: list[list[tuple[str, tuple[int, ...], str, float, int]]] = [[]]
    size = 0
    for i, (hf, s, kind, std) in enumerate(plan):
        nbytes = 2 * int(np.prod(s, dtype=np.int64))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf, s, kind, std, i))
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {}, 0
        for hf, s, _, _, _ in shard:
            nbytes = 2 * int(np.prod(s, dtype=np.int64))
            header[hf] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[hf] = fname
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with atomic_file(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for hf, s, kind, std, i in shard:
                for chunk in _chunks(s, kind, std, seed=seed * 1_000_003 + i):
                    chunk.tofile(f)
        total += offset
    if n > 1:
        with atomic_file(out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with atomic_file(out / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    tok = SHAPES[shape].tokenizer
    if with_tokenizer and tok:
        from resq_jax.models.loaders import load_model

        load_model(tok).tokenizer.save_pretrained(str(out))
    return out
