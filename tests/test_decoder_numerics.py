"""The decoder's fast paths against their plain definitions: block-causal self-attention and the
vocabulary-chunked cross-entropy of the perplexity head."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.decoder import causal_attention, causal_self_attention, chunked_nll


@pytest.mark.parametrize("t,block", [(300, 128), (128, 128), (7, 128), (64, 16), (50, 1)])
@pytest.mark.parametrize("heads,kv", [(4, 2), (3, 3), (6, 1)])
def test_block_causal_self_attention_equals_masked_attention(t, block, heads, kv):
    """Queries in blocks that skip the masked keys = the fully masked softmax, for T not a
    multiple of the block, GQA, MHA and MQA."""
    rng = np.random.default_rng(t + block + heads)
    q = jnp.asarray(rng.standard_normal((2, t, heads, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, t, kv, 16)) * 2.0, jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, t, kv, 16)), jnp.float32)
    full = causal_attention(q, k, v, jnp.arange(t))
    blocked = jax.jit(causal_self_attention, static_argnames="block")(q, k, v, block=block)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=2e-6, rtol=0)


def test_causal_attention_against_float64_numpy():
    """The masked path itself: softmax(q k^T / sqrt(hd) + causal mask) v per head in float64."""
    rng = np.random.default_rng(0)
    b, t, h, kv, hd = 2, 20, 4, 2, 8
    q, k, v = (rng.standard_normal(s) for s in ((b, t, h, hd), (b, t, kv, hd), (b, t, kv, hd)))
    ref = np.zeros((b, t, h, hd))
    for head in range(h):
        kh, vh = k[:, :, head // (h // kv)], v[:, :, head // (h // kv)]
        s = np.einsum("btd,bsd->bts", q[:, :, head], kh) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref[:, :, head] = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), vh)
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    np.testing.assert_allclose(np.asarray(causal_self_attention(*args, block=8)), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(causal_attention(*args, jnp.arange(t))), ref, atol=1e-5)


@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (1024, 256), (300, 8192), (97, 1)])
def test_chunked_nll_equals_full_logsumexp(vocab, chunk):
    """Online logsumexp over vocabulary chunks (a ragged last chunk padded and masked) = the
    cross-entropy of the full logits, computed in float64 here; targets in every chunk,
    including the last row of the vocabulary."""
    rng = np.random.default_rng(vocab)
    h = rng.standard_normal((64, 32)).astype(np.float32)
    w = (rng.standard_normal((vocab, 32)) * 0.5).astype(np.float32)
    target = rng.integers(0, vocab, 64)
    target[:2] = (vocab - 1, 0)
    logits = h.astype(np.float64) @ w.T.astype(np.float64)
    m = logits.max(-1)
    ref = m + np.log(np.exp(logits - m[:, None]).sum(-1)) - logits[np.arange(64), target]
    got = jax.jit(chunked_nll, static_argnames="chunk")(jnp.asarray(h), jnp.asarray(w), jnp.asarray(target),
                                                      chunk=chunk)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_streamer_from_weights_builds_layers_lazily_and_equals_the_model(tmp_path):
    """LayerStreamer.from_weights (one layer on the device at a time) = LayerStreamer(Decoder):
    the same logits and nll, bit for bit; calibration statistics through it are identical."""
    from hf_fixtures import build_torch_model, tiny_qwen2_config
    from models.decoder import from_weights
    from models.loaders import load_model
    from models.runner import LayerStreamer
    from resq_jax.calibration import calibrate

    build_torch_model(tiny_qwen2_config(tied=False)).save_pretrained(tmp_path)
    m = load_model(str(tmp_path), with_tokenizer=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 40)))
    eager, lazy = LayerStreamer(from_weights(m.config, m.weights)), LayerStreamer.from_weights(m.config, m.weights)
    assert len(lazy.layers) == m.config.num_layers
    np.testing.assert_array_equal(np.asarray(lazy.logits(tokens)), np.asarray(eager.logits(tokens)))
    np.testing.assert_array_equal(np.asarray(lazy.nll(tokens)), np.asarray(eager.nll(tokens)))
    a = calibrate(from_weights(m.config, m.weights), np.asarray(tokens), progress=False)
    b = calibrate(lazy, np.asarray(tokens), progress=False)
    for f in ("attn", "mlp", "value", "key"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    with pytest.raises(IndexError):
        lazy.layers[m.config.num_layers]
