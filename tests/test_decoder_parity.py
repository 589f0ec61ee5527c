"""Our Flax decoder against transformers (torch, float32) on tiny random models saved with save_pretrained."""
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import build_torch_model, tiny_llama_config, tiny_qwen2_config, torch_logits
from resq_jax.eval.generate import generate_batch, generate_greedy
from resq_jax.models.decoder import from_weights, init_cache
from resq_jax.models.loaders import load_model
from resq_jax.models.streaming import LayerStreamer

CASES = {
    "llama-gqa-llama3-tied": lambda: tiny_llama_config(tied=True, llama3=True),
    "llama-gqa-untied": lambda: tiny_llama_config(tied=False, llama3=False),
    "qwen2-bias-untied": lambda: tiny_qwen2_config(tied=False),
    "qwen2-bias-tied": lambda: tiny_qwen2_config(tied=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    torch_model = build_torch_model(CASES[request.param]())
    folder = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(folder)
    return torch_model, load_model(str(folder), with_tokenizer=False)


def test_config_read_from_folder(saved):
    torch_model, loaded = saved
    hf = torch_model.config
    cfg = loaded.config
    assert cfg.num_kv_heads == hf.num_key_value_heads < cfg.num_heads
    assert cfg.rms_eps == hf.rms_norm_eps
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.attention_bias == (cfg.arch == "qwen2")


def test_logits_match_transformers(saved):
    torch_model, loaded = saved
    tokens = np.random.default_rng(1).integers(0, loaded.config.vocab_size, size=(2, 48))
    ref = torch_logits(torch_model, tokens)
    model = from_weights(loaded.config, loaded.weights)
    ours, _ = model(jnp.asarray(tokens))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    streamed = LayerStreamer(model).logits(jnp.asarray(tokens))
    assert np.abs(np.asarray(streamed) - ref).max() <= 1e-4


def test_kv_cache_decoding_matches_transformers(saved):
    torch_model, loaded = saved
    tokens = np.random.default_rng(2).integers(0, loaded.config.vocab_size, size=(1, 40))
    ref = torch_logits(torch_model, tokens)
    model = from_weights(loaded.config, loaded.weights)
    cache = init_cache(loaded.config, 1, 40)
    logits, cache = model(jnp.asarray(tokens[:, :32]), cache=cache, cache_index=0)
    errs = [np.abs(np.asarray(logits) - ref[:, :32]).max()]
    for s in range(32, 40):
        logits, cache = model(jnp.asarray(tokens[:, s:s + 1]), cache=cache, cache_index=s)
        errs.append(np.abs(np.asarray(logits)[:, 0] - ref[:, s]).max())
    assert max(errs) <= 1e-4


def test_greedy_generation_matches_transformers(saved):
    import torch

    torch_model, loaded = saved
    prompt = np.random.default_rng(3).integers(0, loaded.config.vocab_size, size=12)
    with torch.no_grad():
        ref = torch_model.generate(torch.as_tensor(prompt[None]), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[0, 12:].numpy()
    ours = generate_greedy(from_weights(loaded.config, loaded.weights), prompt, 6)
    np.testing.assert_array_equal(ours, ref)


def test_batched_generation_matches_transformers_left_padded(saved):
    """Three prompts of 5, 12 and 9 tokens in one left-padded batch (our key mask and shifted slots; transformers'
    attention_mask and position ids counted from each row's first real token): the same greedy tokens, and each
    row the same as that prompt alone."""
    import torch

    torch_model, loaded = saved
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, loaded.config.vocab_size, size=n) for n in (5, 12, 9)]
    ids = np.zeros((3, 12), np.int64)
    mask = np.zeros((3, 12), np.int64)
    for i, p in enumerate(prompts):
        ids[i, 12 - p.size:], mask[i, 12 - p.size:] = p, 1
    with torch.no_grad():
        ref = torch_model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)[:, 12:].numpy()
    model = from_weights(loaded.config, loaded.weights)
    ours = generate_batch(model, prompts, 6, length=16)  # padded beyond the longest prompt too
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(ours[i], ref[i])
        np.testing.assert_array_equal(ours[i], generate_greedy(model, p, 6))


def test_long_sequence_logits_and_nll_match_transformers(saved):
    """300 tokens: the block-causal self-attention spans three query blocks; the streamed
    perplexity head (vocabulary-chunked cross-entropy) against torch's cross-entropy."""
    import torch

    torch_model, loaded = saved
    tokens = np.random.default_rng(3).integers(0, loaded.config.vocab_size, size=(2, 300))
    ref = torch_logits(torch_model, tokens)
    streamer = LayerStreamer(from_weights(loaded.config, loaded.weights))
    assert np.abs(np.asarray(streamer.logits(jnp.asarray(tokens))) - ref).max() <= 1e-4
    ref_nll = torch.nn.functional.cross_entropy(torch.as_tensor(ref[:, :-1]).reshape(-1, ref.shape[-1]),
                                                torch.as_tensor(tokens[:, 1:]).reshape(-1), reduction="none")
    ref_nll = ref_nll.reshape(2, -1).mean(-1).numpy()
    np.testing.assert_allclose(np.asarray(streamer.nll(jnp.asarray(tokens))), ref_nll, rtol=1e-5)
