"""The decoder's fast paths against their plain definitions: block-causal self-attention and the
vocabulary-chunked cross-entropy of the perplexity head."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resq_jax.models.decoder import causal_attention, causal_self_attention, chunked_kl, chunked_nll


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


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (1024, 256), (300, 8192), (97, 1)])
def test_chunked_nll_equals_full_logsumexp(vocab, chunk, vocab_axis):
    """Online logsumexp over vocabulary chunks (a ragged last chunk padded and masked) = the
    cross-entropy of the full logits, computed in float64 here; targets in every chunk,
    including the last row of the vocabulary; the matrix as a [V, d] table or a [d, V] head."""
    rng = np.random.default_rng(vocab)
    h = rng.standard_normal((64, 32)).astype(np.float32)
    w = (rng.standard_normal((vocab, 32)) * 0.5).astype(np.float32)
    target = rng.integers(0, vocab, 64)
    target[:2] = (vocab - 1, 0)
    logits = h.astype(np.float64) @ w.T.astype(np.float64)
    m = logits.max(-1)
    ref = m + np.log(np.exp(logits - m[:, None]).sum(-1)) - logits[np.arange(64), target]
    w_arg = w if vocab_axis == 0 else np.ascontiguousarray(w.T)
    got = jax.jit(chunked_nll, static_argnames=("chunk", "vocab_axis"))(
        jnp.asarray(h), jnp.asarray(w_arg), jnp.asarray(target), chunk=chunk, vocab_axis=vocab_axis)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("vocab_axis", [0, 1])
@pytest.mark.parametrize("vocab,chunk,dtype", [(1000, 256, "float32"), (1024, 256, "float32"), (300, 8192, "float32"),
                                               (97, 1, "float32"), (1000, 256, "bfloat16")])
def test_chunked_kl_equals_the_full_kl_and_its_gradient(vocab, chunk, dtype, vocab_axis):
    """KL(softmax(h_ref W) || softmax(h W)) accumulated over vocabulary chunks (ragged last chunk masked, the matrix
    as a table or a head, in float32 or bfloat16) = the float64 KL of the full logits; its gradient in h is the
    closed form (softmax(h W) - softmax(h_ref W)) W^T; and it is zero for h = h_ref."""
    rng = np.random.default_rng(vocab + chunk)
    h_ref = rng.standard_normal((64, 32)).astype(np.float32)
    h = (h_ref + 0.5 * rng.standard_normal((64, 32))).astype(np.float32)
    w = jnp.asarray((rng.standard_normal((vocab, 32)) * 0.5).astype(np.float32), dtype)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    logp, logp_ref = _log_softmax64(h.astype(np.float64) @ w64.T), _log_softmax64(h_ref.astype(np.float64) @ w64.T)
    ref = (np.exp(logp_ref) * (logp_ref - logp)).sum(-1)
    assert ref.mean() > 0.1  # a real divergence
    w_arg = w if vocab_axis == 0 else w.T
    kl = jax.jit(chunked_kl, static_argnames=("chunk", "vocab_axis"))
    got = kl(jnp.asarray(h), jnp.asarray(h_ref), w_arg, chunk=chunk, vocab_axis=vocab_axis)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-6)
    grad = jax.grad(lambda x: kl(x, jnp.asarray(h_ref), w_arg, chunk=chunk, vocab_axis=vocab_axis).sum())(
        jnp.asarray(h))
    np.testing.assert_allclose(np.asarray(grad), (np.exp(logp) - np.exp(logp_ref)) @ w64, atol=2e-5)
    same = kl(jnp.asarray(h_ref), jnp.asarray(h_ref), w_arg, chunk=chunk, vocab_axis=vocab_axis)
    assert float(jnp.abs(same).max()) < 1e-5


def _layer_fingerprints(weights):
    """(shape, dtype, content digest) of every array of layer i -> i, and each layer's bytes."""
    import hashlib

    owner, nbytes = {}, {}
    for name, w in weights.items():
        if name.startswith("layers.") and isinstance(w, np.ndarray) and w.size > 1:
            i = int(name.split(".")[1])
            a = np.ascontiguousarray(w)
            key = (a.shape, a.dtype.str, hashlib.sha1(a.tobytes()).hexdigest())
            assert key not in owner, f"{name} has the same content as another layer array"
            owner[key] = i
            nbytes[i] = nbytes.get(i, 0) + a.nbytes
    return owner, nbytes


def _live_layer_bytes(owner) -> dict[int, int]:
    """Device bytes of layer weights among jax.live_arrays(), per layer (arrays identified by
    content: a layer's weights are put on the device unchanged, float32 -> float32). No
    gc.collect(): a used layer must be freed by reference counting, not wait for the collector."""
    import hashlib

    shapes = {(k[0], k[1]) for k in owner}
    live = {}
    for a in jax.live_arrays():
        if a.is_deleted() or (a.shape, a.dtype.str) not in shapes:
            continue
        h = np.ascontiguousarray(np.asarray(a))
        i = owner.get((h.shape, h.dtype.str, hashlib.sha1(h.tobytes()).hexdigest()))
        if i is not None:
            live[i] = live.get(i, 0) + a.nbytes
    return live


def test_streamer_from_weights_builds_layers_lazily_and_equals_the_model(tmp_path, monkeypatch):
    """LayerStreamer.from_weights (one layer on the device at a time) = LayerStreamer(Decoder):
    the same logits and nll, bit for bit; calibration statistics through it are identical.

    "One layer at a time" is checked on the device's live arrays (jax.live_arrays(), layer
    weights recognised by content, counted in bytes): none of the layer weights is on the device
    after from_weights returns; while layer i runs (a spy on models.streaming.layer_apply) the
    live layer-weight bytes are exactly layer i's (the embeddings / head are not layer arrays);
    after the forward none is left. A streamer that built every layer up front fails the first
    check, one that kept the layers it had built the second. The seed is one no other test
    uses, so another test's model cannot share the fingerprints."""
    from hf_fixtures import build_torch_model, tiny_qwen2_config
    from resq_jax.calibration.statistics import calibrate
    from resq_jax.models import streaming as runner
    from resq_jax.models.decoder import from_weights
    from resq_jax.models.loaders import load_model
    from resq_jax.models.streaming import LayerStreamer

    build_torch_model(tiny_qwen2_config(tied=False), seed=17).save_pretrained(tmp_path)
    m = load_model(str(tmp_path), with_tokenizer=False)
    n = m.config.num_layers
    owner, layer_bytes = _layer_fingerprints(m.weights)
    assert sorted(layer_bytes) == list(range(n))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 40)))

    assert _live_layer_bytes(owner) == {}, "layer weights on the device before the streamer exists"
    lazy = LayerStreamer.from_weights(m.config, m.weights)
    assert len(lazy.layers) == n
    assert _live_layer_bytes(owner) == {}, "from_weights put layer weights on the device up front"
    during, real_apply = [], runner.layer_apply

    def spy(graphdef, state, x, *args, **kw):
        during.append(_live_layer_bytes(owner))
        return real_apply(graphdef, state, x, *args, **kw)

    monkeypatch.setattr(runner, "layer_apply", spy)
    lazy_logits = np.asarray(lazy.logits(tokens))
    lazy_nll = np.asarray(lazy.nll(tokens))
    monkeypatch.setattr(runner, "layer_apply", real_apply)
    print("live layer-weight bytes while each layer ran:", during, "layer bytes:", layer_bytes)
    assert during == [{i: layer_bytes[i]} for i in range(n)] * 2, (during, layer_bytes)
    assert _live_layer_bytes(owner) == {}, "layer weights left on the device after the forward"

    eager = LayerStreamer(from_weights(m.config, m.weights))
    assert _live_layer_bytes(owner) == layer_bytes  # the check sees a model built up front
    np.testing.assert_array_equal(lazy_logits, np.asarray(eager.logits(tokens)))
    np.testing.assert_array_equal(lazy_nll, np.asarray(eager.nll(tokens)))
    a = calibrate(from_weights(m.config, m.weights), np.asarray(tokens), progress=False)
    b = calibrate(lazy, np.asarray(tokens), progress=False)
    for f in ("attn", "mlp", "value", "key"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    with pytest.raises(IndexError):
        lazy.layers[n]
