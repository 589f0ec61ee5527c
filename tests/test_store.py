"""models/store.py: weights read lazily from safetensors and GGUF files, against independent readers, and bad
files refused at load time with the file and the tensor named.

References: the ``safetensors`` library's own reader (torch for bfloat16, which NumPy lacks) for safetensors
files; the ``gguf`` package's reader (its memory-mapped tensors dequantized by ``gguf.quants``) for GGUF."""
from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest

from resq_jax.models.loaders import ModelLoadError, expected_shapes, hf_name_map, load_model
from resq_jax.models.store import WeightStore
from resq_jax.models.synthetic import SyntheticModelError, write_random_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """tiny-qwen2 in bfloat16, split in shards of at most 50 kB (several files and an index)."""
    return write_random_model(tmp_path_factory.mktemp("m") / "qwen", "tiny-qwen2", seed=3, shard_bytes=50_000)


def _torch_reference(folder):
    """HF name -> float32 array, read by the safetensors library itself (torch: bfloat16)."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.to(torch.float32).numpy() for k, v in load_file(str(f)).items()})
    return out


def test_sharded_bf16_store_equals_safetensors_reader(sharded):
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    loaded = load_model(str(sharded), with_tokenizer=False)
    store = loaded.weights
    assert isinstance(store, WeightStore)
    ref = _torch_reference(sharded)
    names = hf_name_map(loaded.config)
    assert set(store) == set(expected_shapes(loaded.config))
    for name in store:
        hf, linear = names[name]
        want = ref[hf].T if linear else ref[hf]
        got = store[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert store.stored_dtype(name) == "BF16"
    assert store.stored_bytes() * 2 == store.float32_bytes()


def test_store_reads_hold_one_tensor_at_a_time(tmp_path):
    """Reading every tensor in turn allocates about one tensor (float32 plus its stored bytes), not the model."""
    folder = write_random_model(tmp_path / "deep", "tiny-qwen2", layers=24, seed=2, with_tokenizer=False)
    store = load_model(str(folder), with_tokenizer=False).weights
    largest = max(4 * int(np.prod(store.shape(n))) for n in store)
    tracemalloc.start()
    for name in store:
        store[name].sum()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.float32_bytes() > 8 * largest  # the bound below is meaningful
    assert peak < 3 * largest + 1_000_000, (peak, largest, store.float32_bytes())


def test_random_model_scale_keeps_activations_finite(tmp_path):
    """The documented scale: the residual's RMS grows about like sqrt(2 * layers) through the float model."""
    import jax.numpy as jnp

    from resq_jax.models.decoder import from_weights

    folder = write_random_model(tmp_path / "m", "tiny-llama", layers=8, seed=1)
    loaded = load_model(str(folder), with_tokenizer=False)
    model = from_weights(loaded.config, loaded.weights)
    tokens = np.random.default_rng(0).integers(0, loaded.config.vocab_size, (2, 32))
    logits = np.asarray(model(jnp.asarray(tokens))[0])
    assert np.isfinite(logits).all()
    assert 0.1 < np.sqrt(np.mean(logits ** 2)) < 100


def _write_safetensors(path, tensors: dict, dtype="F32", corrupt=None):
    """A minimal safetensors writer for bad-file tests (little-endian header, data after it)."""
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        raw = np.ascontiguousarray(a, np.float32).tobytes()
        header[k] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if corrupt:
        corrupt(header)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture()
def tiny_folder(tmp_path):
    """An F32 tiny-qwen2 folder written with the minimal writer (so a test can corrupt it)."""
    from resq_jax.models.config import config_from_hf
    from resq_jax.models.synthetic import hf_config

    cfg = hf_config("tiny-qwen2", layers=1)
    config = config_from_hf(cfg)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        hf, linear = hf_name_map(config)[name]
        tensors[hf] = rng.standard_normal(tuple(reversed(shape)) if linear else shape).astype(np.float32)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, tensors


def test_missing_shard_named(tiny_folder):
    folder, tensors = tiny_folder
    keys = sorted(tensors)
    _write_safetensors(folder / "a.safetensors", {k: tensors[k] for k in keys[:5]})
    index = {"weight_map": {**{k: "a.safetensors" for k in keys[:5]}, **{k: "b.safetensors" for k in keys[5:]}}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"b\.safetensors.*missing"):
        load_model(str(folder), with_tokenizer=False)


def test_truncated_shard_named_with_tensor(tiny_folder):
    folder, tensors = tiny_folder
    path = folder / "model.safetensors"
    _write_safetensors(path, tensors)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor \S+ ends at byte .*truncated"):
        load_model(str(folder), with_tokenizer=False)


def test_wrong_shape_named_with_tensor(tiny_folder):
    folder, tensors = tiny_folder
    tensors = dict(tensors)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]
    _write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight has "
                                             r"shape \[95, 64\], the config implies \[96, 64\]"):
        load_model(str(folder), with_tokenizer=False)


def test_wrong_dtype_named_with_tensor(tiny_folder):
    folder, tensors = tiny_folder

    def as_int(header):
        header["model.norm.weight"]["dtype"] = "I32"

    _write_safetensors(folder / "model.safetensors", tensors, corrupt=as_int)
    with pytest.raises(ModelLoadError, match=r"tensor model\.norm\.weight has dtype I32"):
        load_model(str(folder), with_tokenizer=False)


def test_gguf_store_equals_gguf_reader():
    """The built-in SmolLM2 GGUF (Q8_0 / Q4_1 / F32 tensors): lazily read tensors equal the gguf package's
    reader dequantized with gguf.quants, llama.cpp's q/k permutation undone."""
    import gguf

    from resq_jax.models.loaders import default_gguf_path, unpermute_rope_rows_gguf

    path = default_gguf_path()
    loaded = load_model(str(path), with_tokenizer=False)
    cfg = loaded.config
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    for name, gname, heads, linear in [("embed", "token_embd.weight", None, False),
                                       ("layers.3.q", "blk.3.attn_q.weight", cfg.num_heads, True),
                                       ("layers.3.k", "blk.3.attn_k.weight", cfg.num_kv_heads, True),
                                       ("layers.5.down", "blk.5.ffn_down.weight", None, True),
                                       ("layers.0.attn_norm", "blk.0.attn_norm.weight", None, False)]:
        t = by_name[gname]
        shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
        ref = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        if heads:
            ref = unpermute_rope_rows_gguf(ref, heads)
        np.testing.assert_array_equal(loaded.weights[name], ref.T if linear else ref, err_msg=name)


def test_random_model_refuses_bad_arguments(tmp_path):
    with pytest.raises(SyntheticModelError, match="unknown shape"):
        write_random_model(tmp_path / "x", "qwen9-1t")
    with pytest.raises(SyntheticModelError, match="--layers"):
        write_random_model(tmp_path / "x", "tiny-qwen2", layers=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SyntheticModelError, match="not empty"):
        write_random_model(tmp_path / "full", "tiny-qwen2")
