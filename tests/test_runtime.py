"""Packed-integer runtime == fake quantization: integer accumulators identical to an integer
reference computed from the fake-quant codes, outputs equal to float rounding, the K/V cache
codes and their dequantized values identical (tiny random models, two SmolLM2 layers; the whole
SmolLM2 perplexity check is slow)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import build_torch_model, tiny_llama_config, tiny_qwen2_config
from models.decoder import from_weights
from models.loaders import load_model
from models.runner import LayerStreamer
from resq_jax.evaluation import generate_greedy, perplexity
from resq_jax.fake_quant import LINEARS, OFF, quantize_weight_rtn
from resq_jax.methods import QuantConfig, quantize_model, weight_spec
from resq_jax.quantizers import fake_quant_mixed, quantize_mixed
from resq_jax.runtime import (PackedLinear, PackError, block_accumulator, dequantize_kv, exact_f32_rows,
                              init_packed_cache, integer_decoder, linear_accumulators, pack_model, packed_decoder,
                              quantize_kv)
from resq_jax.weight_quantization import rtn_weights_codes

# the site whose (raw) value feeds each linear
INPUT_SITE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
              "down": "down_in"}


def _tiny(kind, tmp_path_factory):
    cfg = tiny_llama_config(tied=True, llama3=True) if kind == "llama" else tiny_qwen2_config(tied=False)
    folder = tmp_path_factory.mktemp(kind)
    build_torch_model(cfg, seed=5).save_pretrained(folder)
    return load_model(str(folder), with_tokenizer=False)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return _tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    """One model for the checks that need not run on both families (Qwen2: q/k/v biases)."""
    return _tiny("qwen2", tmp_path_factory)


@functools.partial(jax.jit, static_argnames=("graphdef", "hooks"))
def _step(graphdef, state, tokens, cache, index, hooks):
    """A jitted decoder call with a cache: tokens [B, T] at index.. -> (logits, cache)."""
    return nnx.merge(graphdef, state)(tokens, hooks=hooks, cache=cache, cache_index=index)


def _quantize(m, calib, **kw):
    kw.setdefault("weight_quantizer", "rtn")
    return quantize_model(m.config, m.weights, QuantConfig(method=kw.pop("method", "resq"), **kw), calib,
                          progress=False)


@pytest.fixture(scope="module")
def tiny_resq(tiny):
    calib = np.random.default_rng(1).integers(0, tiny.config.vocab_size, (8, 32))
    qm = _quantize(tiny, calib)
    return qm, pack_model(qm)


def _int_reference(x_site: np.ndarray, act, codes) -> dict[str, np.ndarray]:
    """int64 [G, M, N] sum_k (q - zero) w from the fake path's own codes (quantize_mixed of the
    site value, as FakeQuantHooks computes them) and the weight quantizer's WeightCodes."""
    mc = quantize_mixed(jnp.asarray(x_site), act.low_bits, act.high_bits, act.high)
    out = {}
    for b, block, wq in (("low", mc.low, codes.q_low), ("high", mc.high, codes.q_high)):
        if block is None:
            continue
        n = block.q.shape[-1]
        q = np.asarray(block.q, np.int64).reshape(_tokens(x_site), -1, n)  # [M, G, n]: G = heads for o_in
        z = np.asarray(block.zero, np.int64).reshape(q.shape[0], q.shape[1], 1)
        w = np.asarray(wq, np.int64).reshape(q.shape[1], n, -1)
        out[b] = np.einsum("mgk,gkn->gmn", q - z, w)
    return out


def _tokens(x_site):
    return int(np.prod(x_site.shape[:2]))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jit_apply(graphdef, state, x, hooks):
    return nnx.merge(graphdef, state)(x, hooks)


def _apply(module, x, hooks=None) -> np.ndarray:
    """A linear on x; ``hooks`` quantize a fake linear's low-rank site (packed linears ignore them)."""
    return np.asarray(_jit_apply(*nnx.split(module), jnp.asarray(x), hooks))


def _check_lowrank(qm, lin, key, site, flat):
    """Packed Q(Q(x) A) B: the int32 accumulator of (q - z) A equals an int64 reference from the
    fake path's codes (t = sum_b s_b sA acc_b to float rounding), that of Q(t) B too."""
    from resq_jax.fake_quant import head_high_last_permutation
    from resq_jax.runtime import linear_lowrank

    lay = lin.layout
    a, b = qm.codes[key + "_lr_a"], qm.codes[key + "_lr_b"]
    qa = np.asarray(a.q_low)
    if key.endswith(".o") and lay.high_rows:
        qa = qa[head_high_last_permutation(qm.config.num_heads, qm.config.head_dim, lay.high_rows)]
    n_low = lay.groups * lay.low_rows
    blocks = dataclasses.replace(a, q_low=qa[:n_low], q_high=qa[n_low:])
    ref = _int_reference(site, lay.act, blocks)
    mc = quantize_mixed(jnp.asarray(site), lay.act.low_bits, lay.act.high_bits, lay.act.high)
    t_ref = 0.0
    for blk, codes in (("low", mc.low), ("high", mc.high)):
        if codes is not None:
            s_x = np.asarray(codes.scale, np.float64).reshape(flat.shape[0], -1)  # [M, G]
            t_ref = t_ref + np.einsum("mg,gmk->mk", s_x, ref[blk].astype(np.float64)) * np.asarray(a.scale_low[0])
    t, acc_b = linear_lowrank(lin, jnp.asarray(flat))
    np.testing.assert_allclose(t, t_ref, rtol=1e-5, atol=1e-6 * np.abs(t_ref).max())
    tc = quantize_mixed(jnp.asarray(t), lay.lowrank_bits, OFF, 0).low
    ref_b = (np.asarray(tc.q, np.int64) - np.asarray(tc.zero, np.int64))[:, 0] @ np.asarray(b.q_low, np.int64)
    assert acc_b.dtype == np.int32
    np.testing.assert_array_equal(acc_b[0], ref_b)


def _check_layer_linears(qm, pm, tokens, layers):
    """For each linear of ``layers``: packed accumulators == integer reference; packed output ==
    the fake-quant linear on the fake-quantized site value to float rounding."""
    fake = LayerStreamer(from_weights(qm.config, qm.weights))
    packed = packed_decoder(pm)
    x = fake.embed(jnp.asarray(tokens))
    worst = 0.0
    for i in range(qm.config.num_layers):
        x_next, sites = fake.layer(i, x, qm.hooks, capture=tuple(set(INPUT_SITE.values())))
        if i in layers:
            lin_fake = nnx.merge(*fake.layers[i])
            for name in LINEARS:
                site = np.asarray(sites[INPUT_SITE[name]])
                lin = getattr(packed.layers[i], name)
                flat = site.reshape(_tokens(site), -1)
                accs = linear_accumulators(lin, jnp.asarray(flat))  # jitted, like the runtime
                ref = _int_reference(site, lin.layout.act, qm.codes[f"layers.{i}.{name}"])
                assert accs.keys() == ref.keys()
                for b in ref:
                    assert accs[b].dtype == np.int32
                    np.testing.assert_array_equal(accs[b], ref[b], err_msg=f"layer {i} {name} {b}")
                if lin.layout.rank:
                    _check_lowrank(qm, lin, f"layers.{i}.{name}", site, flat)
                x_fq = np.asarray(qm.hooks(INPUT_SITE[name], jnp.asarray(site))).reshape(flat.shape)
                y_fake = _apply(getattr(lin_fake, name), x_fq, qm.hooks)
                y_packed = _apply(lin, flat)
                err = np.abs(y_packed - y_fake).max() / max(1e-6, np.abs(y_fake).max())
                worst = max(worst, err)
                assert err < 2e-5, (i, name, err)
        x = x_next
    return worst


def test_rtn_codes_reproduce_the_fake_quant_weights(tiny):
    """The codes path changes nothing in the fake-quant model: weights bitwise as before."""
    cfg = QuantConfig(method="resq")
    spec = weight_spec(tiny.config, cfg)
    qw = rtn_weights_codes(tiny.config, tiny.weights, spec)
    from resq_jax.fake_quant import linear_high_rows

    for name in LINEARS:
        key = f"layers.1.{name}"
        perm, high = linear_high_rows(tiny.config, name, spec)
        old = quantize_weight_rtn(np.asarray(tiny.weights[key], np.float32), perm, high, spec)
        np.testing.assert_array_equal(qw.weights[key], old)
        assert qw.codes[key].q_low.dtype == jnp.int8 and qw.codes[key].q_high.shape[0] == (
            tiny.config.num_heads * spec.high_head if name == "o" else 0 if name == "down" else spec.high_residual)


def test_every_linear_accumulators_and_outputs_tiny(tiny, tiny_resq):
    qm, pm = tiny_resq
    tokens = np.random.default_rng(2).integers(0, qm.config.vocab_size, (2, 20))
    _check_layer_linears(qm, pm, tokens, layers=range(qm.config.num_layers))


def test_f32_integer_dot_chunks_are_exact():
    """block_accumulator through float32 dots in chunks (exact_f32_rows; forced small chunks
    here) equals XLA's int8 dot with int32 accumulation, bit for bit, at the extreme codes."""
    rng = np.random.default_rng(0)
    m, g, n, cols = 37, 3, 1500, 29
    xq = jnp.asarray(rng.choice([-128, 127, -1, 0, 5], (m, g, n)).astype(np.int8))
    wq = jnp.asarray(rng.choice([-128, 127, 3], (g, n, cols)).astype(np.int8))
    zero = jnp.asarray(rng.integers(-128, 128, (m, g)).astype(np.float32))
    colsum = jnp.asarray(np.asarray(wq, np.int32).sum(1))
    want = np.einsum("mgk,gkn->gmn", (np.asarray(xq, np.int64) - np.asarray(zero, np.int64)[..., None]),
                     np.asarray(wq, np.int64))
    assert exact_f32_rows(8, 8) == 1024 and exact_f32_rows(4, 4) == 2 ** 18
    for rows in (None, exact_f32_rows(8, 8), 7):
        got = np.stack([np.asarray(c) for c in block_accumulator(xq, zero, wq, colsum, rows)])
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="impl must be one of"):
        PackedLinear(tiny_layout(), {}, impl="cuda")


def tiny_layout():
    from resq_jax.runtime import ActQuant, LinearLayout
    return LinearLayout(d_in=8, d_out=4, groups=1, low_rows=8, high_rows=0, w_low_bits=4, w_high_bits=8,
                        act=ActQuant(4, 16, 0))


def test_f32_and_int8_dots_give_identical_models(tiny, tiny_resq):
    """The packed model with impl "f32" (float32 GEMMs of the codes) and "jnp" (int8 dot): the
    same logits bit for bit, and integer_decoder of the fake-quant model is that model."""
    qm, pm = tiny_resq
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, tiny.config.vocab_size, (2, 24)))
    logits = {impl: np.asarray(packed_decoder(pm, impl)(tokens, hooks=pm.hooks)[0]) for impl in ("jnp", "f32")}
    np.testing.assert_array_equal(logits["jnp"], logits["f32"])
    dec, hooks = integer_decoder(qm, "f32")
    # the model a checkpoint stores: float16 embeddings
    np.testing.assert_array_equal(np.asarray(dec.embed[...]), qm.weights["embed"].astype(np.float16))
    np.testing.assert_array_equal(np.asarray(dec(tokens, hooks=hooks)[0]), logits["jnp"])
    w16 = _quantize(tiny, np.random.default_rng(1).integers(0, tiny.config.vocab_size, (8, 32)), a_bits=16)
    assert integer_decoder(w16) is None  # float activations: the packed runtime cannot run it


def test_layouts_int4_packed(tiny_resq):
    qm, pm = tiny_resq
    cfg = qm.config
    lay = pm.layouts
    assert lay["o"].groups == cfg.num_heads and lay["o"].act.group == cfg.head_dim
    assert lay["down"].high_rows == 0 and lay["down"].act.high_bits == OFF
    w = pm.arrays["layers.0.q.w_low"]
    assert w.dtype == np.int8 and w.shape == (1, (cfg.hidden_size - lay["q"].high_rows) // 2, cfg.q_size)
    assert pm.arrays["layers.0.q.w_high"].shape == (1, lay["q"].high_rows, cfg.q_size)
    assert pm.arrays["layers.0.o.w_low"].shape == (cfg.num_heads, (cfg.head_dim - lay["o"].high_rows) // 2,
                                                   cfg.hidden_size)
    assert not any("colsum" in k for k in pm.arrays)  # derived from the codes when the linear is built
    assert pm.arrays["embed"].dtype == np.float16 and pm.embedding == {"bits": 16}


def test_column_sums_derived_from_the_codes(tiny_resq):
    """The column sums a packed linear builds equal the sums of the quantizer's own codes."""
    qm, pm = tiny_resq
    layer = packed_decoder(pm).layers[1]
    for name in ("q", "o", "down"):
        lin, codes, lay = getattr(layer, name), qm.codes[f"layers.1.{name}"], pm.layouts[name]
        for b, q in (("low", codes.q_low), ("high", codes.q_high)):
            if lay.rows(b):
                want = np.asarray(q, np.int64).reshape(lay.groups, lay.rows(b), lay.d_out).sum(1)
                np.testing.assert_array_equal(np.asarray(getattr(lin, f"colsum_{b}")[...]), want)


def test_packed_layers_match_fake_quant(tiny, tiny_resq):
    """Each packed layer (linears, quantized K/V, attention) on the fake model's input equals the
    fake-quant layer to float rounding. (Whole-model logits of a random W4A4 model are chaotic:
    the epilogue's float rounding can move a later 4-bit code across a rounding tie, and a random
    model amplifies that; the whole-model check is SmolLM2's perplexity. Inside one layer a tie
    flipped at o_in or mlp_in moves that token's output: on an AVX-512 CPU 89.6% of the tokens
    agreed to 1e-5, all to 5e-2; a systematic error in the packed path would move every token.)"""
    qm, pm = tiny_resq
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, qm.config.vocab_size, (2, 24)))
    fake = LayerStreamer(from_weights(qm.config, qm.weights))
    packed = LayerStreamer(packed_decoder(pm))
    x = fake.embed(tokens)
    x16 = np.asarray(packed.embed(tokens))  # 16-bit embeddings
    assert np.abs(x16 - np.asarray(x)).max() <= 1e-3 * np.abs(np.asarray(x)).max()
    for i in range(qm.config.num_layers):
        y_fake, _ = fake.layer(i, x, qm.hooks)
        y_packed, _ = packed.layer(i, x, pm.hooks)
        y_fake, y_packed = np.asarray(y_fake), np.asarray(y_packed)
        per_token = np.abs(y_packed - y_fake).max(-1) / np.abs(y_fake).max()
        assert np.mean(per_token <= 1e-5) >= 0.8 and per_token.max() <= 0.05, (i, per_token)
        x = jnp.asarray(y_fake)


def test_linears_through_the_mixed_gemm_module(tiny_resq):
    """The kernel path's wiring on CPU: for each linear the Triton GEMM can run (not o_proj's
    per-head groups), the stored arrays through kernels.mixed_gemm's jnp reference (the numerics
    the Triton kernels match, test_triton_kernels) equal the runtime's XLA path to float rounding;
    impl "auto" on CPU is the XLA path."""
    qm, pm = tiny_resq
    packed = packed_decoder(pm)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, qm.config.hidden_size)), jnp.float32)
    ran = []
    for name in LINEARS:
        lin = getattr(packed.layers[1], name)
        assert lin.impl == "auto" and lin.triton_applies() == (name != "o")
        if not lin.triton_applies():
            continue
        xin = x if lin.layout.d_in == x.shape[-1] else jnp.tile(x, (1, 1, -(-lin.layout.d_in // x.shape[-1])))[
            ..., :lin.layout.d_in]
        y = np.asarray(lin(xin))
        y_mg = np.asarray(lin._mixed_gemm(xin, "jnp"))
        assert np.abs(y_mg - y).max() <= 1e-5 * np.abs(y).max(), name
        ran.append(name)
    assert ran == ["q", "k", "v", "gate", "up", "down"]


def test_kv_codes_equal_fake_quant(tiny_resq):
    """The cache's codes are quantize_mixed's; dequantized they are the fake-quant K/V bitwise."""
    qm, pm = tiny_resq
    s = pm.spec
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 7, qm.config.num_kv_heads, qm.config.head_dim)),
                    jnp.float32)
    kv = quantize_kv(x, s.kv_bits, s.high_bits, s.high_head)
    ref = quantize_mixed(x, s.kv_bits, s.high_bits, s.high_head)
    from resq_jax.packing import unpack_int4

    n_low = qm.config.head_dim - s.high_head
    np.testing.assert_array_equal(np.asarray(unpack_int4(kv.low))[..., :n_low].astype(np.int32) + 8,
                                  np.asarray(ref.low.q)[..., 0, :])
    np.testing.assert_array_equal(np.asarray(kv.high).astype(np.int32) + 128, np.asarray(ref.high.q)[..., 0, :])
    fq = np.asarray(fake_quant_mixed(x, s.kv_bits, s.high_bits, s.high_head))
    np.testing.assert_array_equal(np.asarray(dequantize_kv(kv, s.kv_bits, qm.config.head_dim)), fq)
    assert kv.low.dtype == jnp.int8 and kv.low.shape[-1] == (n_low + 1) // 2


def test_generation_with_quantized_cache(qwen_tiny):
    """Decoding through the quantized (4-bit) K/V cache == the fake path's float cache of
    fake-quant K/V. The same fake-quant decoder (ResQ W4A4KV4, default settings) runs with either
    cache, which isolates the cache from the packed linears (whose float epilogue may flip a later
    4-bit rounding tie of a random model): the dequantized caches equal the float caches bit for
    bit, the per-step logits agree to float rounding, the greedy tokens are the same. Then the
    packed decoder generates through its quantized cache (the public entry point)."""
    from models.decoder import init_cache

    calib = np.random.default_rng(1).integers(0, qwen_tiny.config.vocab_size, (8, 32))
    qm = _quantize(qwen_tiny, calib)
    pm = pack_model(qm, embed_dtype=np.float32)
    assert pm.layouts["q"].w_low_bits == 4 and pm.spec.kv_bits == 4
    graphdef, state = nnx.split(from_weights(qm.config, qm.weights))
    prompt = np.random.default_rng(5).integers(0, qm.config.vocab_size, 9)
    cache_f = init_cache(qm.config, 1, 16)
    cache_q = init_packed_cache(pm.config, pm.spec, 1, 16)
    assert cache_q[0].k.low.dtype == jnp.int8 and cache_q[0].k.low.shape[-1] == (qm.config.head_dim - 2 + 1) // 2
    lf, cache_f = _step(graphdef, state, jnp.asarray(prompt[None]), cache_f, 0, qm.hooks)
    lq, cache_q = _step(graphdef, state, jnp.asarray(prompt[None]), cache_q, 0, qm.hooks)
    for step in range(5):
        assert np.abs(np.asarray(lq) - np.asarray(lf)).max() <= 1e-5 * np.abs(np.asarray(lf)).max()
        tok = jnp.argmax(lf[:, -1], -1)[:, None].astype(jnp.int32)
        assert int(jnp.argmax(lq[0, -1])) == int(tok[0, 0])  # same greedy token
        lf, cache_f = _step(graphdef, state, tok, cache_f, jnp.int32(prompt.size + step), qm.hooks)
        lq, cache_q = _step(graphdef, state, tok, cache_q, jnp.int32(prompt.size + step), qm.hooks)
    filled = prompt.size + 5
    for layer in range(qm.config.num_layers):
        for name in ("k", "v"):
            got = np.asarray(dequantize_kv(getattr(cache_q[layer], name), pm.spec.kv_bits, qm.config.head_dim))
            np.testing.assert_array_equal(got[:, :filled], np.asarray(cache_f[layer][name])[:, :filled])
    packed = packed_decoder(pm)
    ids = np.asarray(prompt[:4], np.int32)
    new = generate_greedy(packed, ids, 3, hooks=pm.hooks, cache=init_packed_cache(pm.config, pm.spec, 1, 7))
    assert new.shape == (3,) and new.dtype.kind == "i" and (0 <= new).all() and (new < qm.config.vocab_size).all()


def test_gptq_codes_path(qwen_tiny):
    tiny = qwen_tiny
    calib = np.random.default_rng(6).integers(0, tiny.config.vocab_size, (8, 32))
    qm = _quantize(tiny, calib, weight_quantizer="gptq")
    assert set(qm.codes) == {f"layers.{i}.{n}" for i in range(tiny.config.num_layers) for n in LINEARS}
    pm = pack_model(qm)  # checks dequantize(codes) == the GPTQ weights exactly
    tokens = np.random.default_rng(7).integers(0, qm.config.vocab_size, (2, 16))
    _check_layer_linears(qm, pm, tokens, layers=(0, tiny.config.num_layers - 1))


@pytest.mark.parametrize("method", ["rtn", "quarot"])
def test_other_integer_recipes_pack(qwen_tiny, method):
    calib = np.random.default_rng(8).integers(0, qwen_tiny.config.vocab_size, (4, 16))
    qm = _quantize(qwen_tiny, calib, method=method)
    pm = pack_model(qm)
    tokens = np.random.default_rng(9).integers(0, qm.config.vocab_size, (1, 12))
    _check_layer_linears(qm, pm, tokens, layers=(1,))


def test_pack_refuses_what_it_cannot_run(tiny, tiny_resq):
    if tiny.config.arch != "qwen2":
        pytest.skip("one family is enough")
    calib = np.random.default_rng(10).integers(0, tiny.config.vocab_size, (4, 16))
    with pytest.raises(PackError, match="a-bits"):
        pack_model(_quantize(tiny, calib, method="rtn", a_bits=16))
    with pytest.raises(PackError, match="not quantized"):
        pack_model(_quantize(tiny, calib, method="rtn", w_bits=16))
    qm, _ = tiny_resq
    tampered = dataclasses.replace(qm, weights={**qm.weights, "layers.0.up": qm.weights["layers.0.up"] * 1.01})
    with pytest.raises(PackError, match="layers.0.up.*do not dequantize"):
        pack_model(tampered)
    lowrank = dataclasses.replace(qm, weights={**qm.weights, "layers.0.q_lr_a": np.zeros((4, 4), np.float32)})
    with pytest.raises(PackError, match="layers.0.q_lr_a: a low-rank correction without integer codes"):
        pack_model(lowrank)
    with pytest.raises(PackError, match="MXIntHooks; the packed runtime runs the integer recipes"):
        pack_model(_quantize(tiny, calib, method="l2qer"))


def test_resq_l2qer_low_rank_correction_packs(qwen_tiny, tmp_path):
    """resq+l2qer: A and B stored as int8 codes with column sums; every linear's accumulators (the
    weight's blocks, x A and Q(x A) B) equal integer references from the fake path's codes and
    its output equals the fake-quant linear with the quantized lowrank site to float rounding;
    the checkpoint round trip keeps the logits bit for bit."""
    from resq_jax.checkpoint import load_packed, save_packed

    calib = np.random.default_rng(11).integers(0, qwen_tiny.config.vocab_size, (8, 32))
    qm = _quantize(qwen_tiny, calib, method="resq+l2qer", rank=4)
    pm = pack_model(qm)
    assert {lay.rank for lay in pm.layouts.values()} == {4}
    assert pm.arrays["layers.0.q.lr_a_low"].dtype == np.int8
    assert pm.arrays["layers.0.o.lr_a_high"].shape == (qm.config.num_heads, pm.layouts["o"].high_rows, 4)
    tokens = np.random.default_rng(12).integers(0, qm.config.vocab_size, (2, 16))
    _check_layer_linears(qm, pm, tokens, layers=(0, 1))
    save_packed(tmp_path / "ckpt", pm)
    restored = load_packed(tmp_path / "ckpt").model
    assert restored.layouts == pm.layouts
    logits = [np.asarray(LayerStreamer(packed_decoder(m)).logits(jnp.asarray(tokens), m.hooks)) for m in (pm, restored)]
    np.testing.assert_array_equal(logits[0], logits[1])


# ----------------------------------------------------------------------------------------------
# SmolLM2
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


def _truncate(m, n_layers):
    keep = {k: v for k, v in m.weights.items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
    return dataclasses.replace(m, config=dataclasses.replace(m.config, num_layers=n_layers), weights=keep)


def test_smollm2_two_layers_every_linear_and_attention(smol):
    """ResQ W4A4KV4 (RTN) on SmolLM2's first two layers (d=576, hd=64, ffn=1536, GQA 9/3)."""
    from resq_jax.data import calib_windows, load_text, tokenize

    m = _truncate(smol, 2)
    text = tokenize(load_text("wiki-calib").text, smol.tokenizer)
    calib = calib_windows(text, 8, 128, seed=0)
    qm = _quantize(m, calib)
    pm = pack_model(qm)
    assert pm.layouts["q"].high_rows == 72 and pm.layouts["o"].high_rows == 8
    _check_layer_linears(qm, pm, calib[:2, :96], layers=(0, 1))
    # attention: the K/V codes written to the cache are the fake path's, dequantized bitwise equal
    fake = LayerStreamer(from_weights(qm.config, qm.weights))
    x = fake.embed(jnp.asarray(calib[:1, :64]))
    _, sites = fake.layer(0, x, qm.hooks, capture=("k", "v"))
    s = pm.spec
    for name in ("k", "v"):
        raw = sites[name]
        kv = quantize_kv(raw, s.kv_bits, s.high_bits, s.high_head)
        np.testing.assert_array_equal(np.asarray(dequantize_kv(kv, s.kv_bits, qm.config.head_dim)),
                                      np.asarray(qm.hooks(name, raw)))


def test_smollm2_integer_evaluation_is_the_checkpoints_and_batch_invariant(smol, tmp_path):
    """SmolLM2 cut to 6 layers, ResQ W4A4KV4 (RTN) with 8-bit embeddings: quantize.py's default
    evaluation (integer_decoder) gives the same perplexity at batch sizes 1, 2 and 4, equal to the
    saved and reloaded packed checkpoint's; the classic fake path is near (float rounding re-draws
    W4A4 codes, so only a band)."""
    from resq_jax.checkpoint import load_packed, save_packed
    from resq_jax.data import calib_windows, eval_windows, load_text, tokenize

    m = _truncate(smol, 6)
    calib = calib_windows(tokenize(load_text("wiki-calib").text, smol.tokenizer), 8, 128, seed=0)
    ev = eval_windows(tokenize(load_text("wiki-eval").text, smol.tokenizer), 4, 256)
    qm = _quantize(m, calib, embed_bits=8)
    dec, hooks = integer_decoder(qm)
    ppl = {b: perplexity(dec, ev, batch_size=b, hooks=hooks, progress=False).ppl for b in (1, 2, 4)}
    assert ppl[1] == ppl[2] == ppl[4], ppl
    save_packed(tmp_path / "ck", pack_model(qm))
    pm = load_packed(tmp_path / "ck").model
    assert perplexity(packed_decoder(pm), ev, batch_size=3, hooks=pm.hooks, progress=False).ppl == ppl[1]
    fake = perplexity(from_weights(qm.config, qm.weights), ev, hooks=qm.hooks, progress=False).ppl
    assert abs(fake / ppl[1] - 1) < 0.05, (fake, ppl[1])


@pytest.mark.slow
def test_smollm2_whole_model_perplexity_packed_equals_fake(smol, tmp_path):
    """The scripts/quantize.py protocol: 64 x 512 calibration, 40 x 512 evaluation, ResQ W4A4KV4
    (RTN weights, 8-bit embeddings, so the checkpoint holds the model's own tables).

    The fake-quant perplexity quantize.py reports (integer_decoder: the model's codes, exact
    integer products) is reproduced by the saved packed checkpoint exactly, at any batch size.
    The classic float fake path computes the same model with other float rounding; a W4A4
    model's perplexity is not continuous at that scale (a one-ulp change moves later 4-bit codes
    across rounding ties), so it only agrees within a band."""
    from resq_jax.checkpoint import load_packed, save_packed
    from resq_jax.data import calib_windows, eval_windows, load_text, tokenize

    calib = calib_windows(tokenize(load_text("wiki-calib").text, smol.tokenizer), 64, 512, seed=0)
    ev = eval_windows(tokenize(load_text("wiki-eval").text, smol.tokenizer), 40, 512)
    qm = _quantize(smol, calib, embed_bits=8)
    dec, hooks = integer_decoder(qm)
    fake_int = perplexity(dec, ev, batch_size=4, hooks=hooks, progress=False).ppl
    fake_int8 = perplexity(dec, ev, batch_size=8, hooks=hooks, progress=False).ppl
    save_packed(tmp_path / "ck", pack_model(qm))
    pm = load_packed(tmp_path / "ck").model
    packed = perplexity(packed_decoder(pm), ev, batch_size=4, hooks=pm.hooks, progress=False).ppl
    fake_float = perplexity(from_weights(qm.config, qm.weights), ev, hooks=qm.hooks, progress=False).ppl
    print(f"ppl integer-exact fake {fake_int!r} (batch 8: {fake_int8!r}), packed checkpoint {packed!r}, "
          f"float fake {fake_float!r}")
    assert fake_int == fake_int8 == packed
    assert abs(fake_float / packed - 1) < 2e-2
