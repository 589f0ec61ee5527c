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
from resq_jax.eval.generate import generate_batch, generate_greedy
from resq_jax.eval.perplexity import perplexity
from resq_jax.formats.bits import OFF
from resq_jax.formats.integer import fake_quant_mixed, quantize_mixed
from resq_jax.models.decoder import from_weights
from resq_jax.models.loaders import load_model
from resq_jax.models.streaming import LayerStreamer
from resq_jax.pipeline.quantize import quantize_model, weight_spec
from resq_jax.pipeline.recipes import QuantConfig, setting_applies
from resq_jax.quant.layouts import LINEARS
from resq_jax.quant.weights import rtn_weights_codes
from resq_jax.runtime.kv_cache import dequantize_kv, init_packed_cache, quantize_kv
from resq_jax.runtime.linear import PackedLinear, block_accumulator, exact_f32_rows, linear_accumulators
from resq_jax.runtime.pack import PackError, integer_decoder, pack_model, packed_decoder

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
    method = kw.pop("method", "resq")
    if setting_applies("weight_quantizer", method):  # RTN weights unless asked (MXINT recipes round)
        kw.setdefault("weight_quantizer", "rtn")
    return quantize_model(m.config, m.weights, QuantConfig(method=method, **kw), calib, progress=False)


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
    from resq_jax.quant.layouts import head_high_last_permutation
    from resq_jax.runtime.linear import linear_lowrank

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


EPS32 = 2.0 ** -24  # float32 unit roundoff
# The library computes a scale as fl(fl(fl(p) max|w|) / maxq): within 3 eps32 (relative) of
# p max|w| / maxq; its w / s is then within (3 + 1) eps32 |w/s| of the exact quotient and the
# reference's float32 w / fl(s) within 2 eps32 |w/s|. So the two round w/s to different
# neighbours only where the exact w/s lies within 4 eps32 |w/s| of a .5 boundary: the tie
# window is RTN_TIE |w/s| with a 2x margin.
RTN_TIE = 8 * EPS32


def _reference_rtn_layout(config, name, spec, d_in):
    """(row order, number of high rows at its end) of a linear, from the layout definitions:
    q/k/v/gate/up keep their rows, the last high_residual in high precision; o_proj's input is
    [heads * head_dim] with the last high_head channels of every head high, moved to the end
    (every head's low rows first, in order, then every head's high rows); down is uniform."""
    if name == "o":
        is_high = np.arange(d_in) % config.head_dim >= config.head_dim - spec.high_head
        return np.concatenate([np.flatnonzero(~is_high), np.flatnonzero(is_high)]), int(is_high.sum())
    return np.arange(d_in), (0 if name == "down" else spec.high_residual)


def _reference_rtn_block(w, bits, clip_search):
    """Symmetric RTN of one block ``w: float32 [rows, d_out]``, per output column, written from
    the definition (formats.integer.weight_scales / quantize_weight_sym): grid [-2^(b-1), 2^(b-1) - 1],
    scale p max|w| / (2^(b-1) - 1) (1 for an all-zero column) with p = 1, or with the clip search
    every p = 1 - i/100, i < 80, the chosen one minimizing sum |w - code * scale|^2.4 (the first
    minimum). Scales and errors in float64; the codes, as the library computes them, in float32:
    clip(round_half_even(float32 w / float32 scale)). Returns (scales [P, d_out] float64,
    errors [P, d_out] float64, codes [P, rows, d_out] int64) of every candidate p."""
    maxq = 2.0 ** (bits - 1) - 1
    w64 = w.astype(np.float64)
    amax = np.abs(w64).max(axis=0)
    ps = 1.0 - np.arange(80) / 100 if clip_search else np.ones(1)
    scales = np.where(amax == 0.0, 1.0, ps[:, None] * amax / maxq)
    z = w.astype(np.float32)[None] / scales[:, None, :].astype(np.float32)
    codes = np.clip(np.round(z), -maxq - 1, maxq).astype(np.int64)
    errors = np.sum(np.abs(w64[None] - codes * scales[:, None, :]) ** 2.4, axis=1)
    return scales, errors, codes


def _compare_rtn_block(q, scale, w, bits, clip_search, label):
    """Check the library's codes ``q`` [rows, d_out] and ``scale`` [1, d_out] of block ``w``
    against the reference. Returns (reference codes with the library's neighbour adopted at
    rounding ties, reference scale float64 [d_out], number of rounding ties, number of
    clip-search ties)."""
    scales, errors, codes = _reference_rtn_block(w, bits, clip_search)
    cols = np.arange(w.shape[1])
    s_lib = np.asarray(scale, np.float64)[0]
    best = np.argmin(errors, axis=0)
    # the candidate the library chose: its scale equals that candidate's to float32 rounding
    picked = np.argmin(np.abs(scales - s_lib), axis=0)
    np.testing.assert_allclose(s_lib, scales[picked, cols], rtol=3 * EPS32, atol=0, err_msg=label)
    # another p than the float64 minimum only where its error is the minimum to float32 noise:
    # the library's error is a float32 sum of |d|^2.4, d = w - fl(code * scale); fl() moves d by
    # up to eps32 max|w|, i.e. a term by 2.4 eps32 max|w| / |d| (relative), ~10 maxq eps32 with
    # the typical |d| ~ scale / 4 = max|w| / (4 maxq), plus ~25 eps32 from exp(2.4 log|d|) and the
    # sum. Measured on these weights: <= 23 eps32 (4-bit), 611 eps32 (8-bit); allowed 16 maxq eps32
    maxq = 2 ** (bits - 1) - 1
    search_ties = picked != best
    assert np.all(errors[picked, cols] <= errors[best, cols] * (1 + 16 * maxq * EPS32)), (
        label, errors[picked, cols], errors[best, cols])
    ref = codes[picked, :, cols].T  # [rows, d_out]
    q = np.asarray(q, np.int64)
    z = w.astype(np.float64) / scales[picked, cols]
    near = np.abs(z - np.floor(z) - 0.5) < RTN_TIE * np.abs(z)
    neighbour = (q == np.clip(np.floor(z), -maxq - 1, maxq)) | (q == np.clip(np.ceil(z), -maxq - 1, maxq))
    tie = (q != ref) & near & neighbour
    ref = np.where(tie, q, ref)
    np.testing.assert_array_equal(q, ref, err_msg=label)
    return ref, scales[picked, cols], int(tie.sum()), int(search_ties.sum())


@pytest.mark.parametrize("clip_search", [True, False])
def test_rtn_codes_match_a_float64_reference(tiny, clip_search):
    """rtn_weights_codes (the codes and dequantized weights of every linear) against an
    independent NumPy reference (_reference_rtn_*): codes equal except at genuine float32
    rounding ties (counted, bounded), scales equal to float32 rounding, the chosen clip-search p
    the float64 minimum (up to float32 noise in the error), dequantized weights equal to float32
    rounding, codes in the row order of the layout definition."""
    from resq_jax.formats.integer import dequantize_weight

    spec = dataclasses.replace(weight_spec(tiny.config, QuantConfig(method="resq")), clip_search=clip_search)
    assert (spec.w_bits, spec.high_bits, spec.high_residual, spec.high_head) == (4, 8, 8, 2)
    qw = rtn_weights_codes(tiny.config, tiny.weights, spec)
    ties = search_ties = n_codes = 0
    for i in range(tiny.config.num_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            w = np.asarray(tiny.weights[key], np.float32)
            order, high = _reference_rtn_layout(tiny.config, name, spec, w.shape[0])
            c = qw.codes[key]
            assert c.q_low.dtype == jnp.int8 and c.q_high.shape == (high, w.shape[1])
            assert c.q_high.dtype == jnp.int8 and (c.scale_high is None) == (high == 0)
            wp = w[order]
            n_low = w.shape[0] - high
            deq = []
            for q, s, rows, bits in ((c.q_low, c.scale_low, wp[:n_low], spec.w_bits),
                                     (c.q_high, c.scale_high, wp[n_low:], spec.high_bits)):
                if rows.shape[0] == 0:
                    continue
                ref, s_ref, t, st = _compare_rtn_block(q, s, rows, bits, clip_search, f"{key} {bits}-bit")
                ties, search_ties, n_codes = ties + t, search_ties + st, n_codes + ref.size
                deq.append(ref * s_ref)
            deq = np.concatenate(deq)[np.argsort(order)]
            # fl(code * fl(scale)): within 3 + 1 eps32 of code * scale
            np.testing.assert_allclose(qw.weights[key], deq, rtol=4 * EPS32, atol=0, err_msg=key)
            back = np.asarray(dequantize_weight(c))[np.argsort(order)]
            np.testing.assert_array_equal(back, qw.weights[key], err_msg=key)
    print(f"\n{n_codes} codes: {ties} rounding ties, {search_ties} clip-search ties")
    # measured 0 and 0; expected inside the windows: 0.7 codes (sum of 2 RTN_TIE |w/s|) and
    # 1 of 2496 columns (two best errors within the tolerance), a tie being rarer still
    assert ties <= 2 and search_ties <= 2, (ties, search_ties)


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
    from resq_jax.runtime.linear import ActQuant, LinearLayout
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
    agreed to 1e-5, all to 5e-2; with transformers 5.24's initialization of the tiny qwen2 model
    (a different random model) 79%, so the bound is 70%; a systematic error in the packed path
    would move every token.)"""
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
        assert np.mean(per_token <= 1e-5) >= 0.7 and per_token.max() <= 0.05, (i, per_token)
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
    from resq_jax.formats.packing import unpack_int4

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
    packed decoder generates through its quantized cache (the public entry point), and its
    tokens are checked against two paths without a cache: one full-sequence forward over the
    prompt + the generated tokens (teacher forcing; causal, so the logits at position T-1+j are
    those of greedy step j, and the argmax at every step equal to the generated token is the
    same as step-by-step greedy producing the same tokens). (a) The packed decoder itself: the
    cached generation must equal its full-sequence recomputation exactly (same codes: the cache
    holds quantize_kv of the k/v that the "k"/"v" hooks quantize identically; only the float
    attention order differs). (b) The fake-quant model (quantize_model's weights through
    from_weights with its hooks): not guaranteed bitwise (integer GEMMs with a float epilogue,
    so near-tied logits may flip), hence measured: with float32 embedding tables all 12 greedy
    tokens agreed for 6 prompts x 2 tiny families (smallest fake-quant top-2 margin 2e-4); with
    the default float16 tables (a different model) agreement fell to a 0..12-token prefix,
    which is why this pack keeps float32 tables. Asserted: all N = 8 tokens agree here."""
    from resq_jax.models.decoder import init_cache

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
    ids, n_new = np.asarray(prompt, np.int32), 8
    new = generate_greedy(packed, ids, n_new, hooks=pm.hooks,
                          cache=init_packed_cache(pm.config, pm.spec, 1, ids.size + n_new))
    assert new.shape == (n_new,) and new.dtype.kind == "i"
    seq = jnp.asarray(np.concatenate([ids, new[:-1]])[None])  # teacher forcing: one forward, no cache
    p_graph, p_state = nnx.split(packed)
    full_packed = np.asarray(_step(p_graph, p_state, seq, None, None, pm.hooks)[0])[0, ids.size - 1:]
    full_fake = np.asarray(_step(graphdef, state, seq, None, None, qm.hooks)[0])[0, ids.size - 1:]
    np.testing.assert_array_equal(full_packed.argmax(-1), new)  # (a) cached == recomputed
    fake_tokens = full_fake.argmax(-1)
    agree = int(np.argmin(np.append(fake_tokens == new, False)))  # leading steps that agree
    top2 = np.sort(full_fake, -1)[:, -2:]
    print(f"packed cached vs fake-quant greedy: {agree}/{n_new} leading tokens agree; fake top-2 margins "
          f"{np.round(top2[:, 1] - top2[:, 0], 4)}, max |packed - fake| logit "
          f"{np.abs(full_packed - full_fake).max():.2e}")
    assert agree == n_new, (new, fake_tokens)  # (b) measured: all agree (docstring)


def test_batched_generation_through_the_quantized_cache(qwen_tiny):
    """Three prompts (4, 9, 7 tokens) in one left-padded batch through the packed decoder's 4-bit KV cache. Keys
    are quantized after RoPE, so a row merely shifted right would quantize other keys (measured: prefill logits
    up to 0.36 apart on this model, a different greedy token); with left_pad each row's positions count from its
    first real token and its padding is masked, so its prefill logits equal the prompt alone to float-sum
    rounding (below 1e-4 of the largest logit) and the greedy tokens are one-at-a-time generation's."""
    calib = np.random.default_rng(1).integers(0, qwen_tiny.config.vocab_size, (8, 32))
    pm = pack_model(_quantize(qwen_tiny, calib), embed_dtype=np.float32)
    packed = packed_decoder(pm)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, pm.config.vocab_size, n).astype(np.int32) for n in (4, 9, 7)]
    n_new = 6
    batch = generate_batch(packed, prompts, n_new, hooks=pm.hooks, length=9,
                           cache=init_packed_cache(pm.config, pm.spec, 3, 9 + n_new))
    for p, got in zip(prompts, batch):
        alone = generate_greedy(packed, p, n_new, hooks=pm.hooks,
                                cache=init_packed_cache(pm.config, pm.spec, 1, p.size + n_new))
        np.testing.assert_array_equal(got, alone)
    graphdef, state = nnx.split(packed)
    padded = np.zeros((3, 9), np.int32)
    for i, p in enumerate(prompts):
        padded[i, 9 - p.size:] = p
    pads = jnp.asarray([9 - p.size for p in prompts], jnp.int32)
    together = np.asarray(jax.jit(lambda st, t, c: nnx.merge(graphdef, st)(t, hooks=pm.hooks, cache=c, cache_index=0,
                                                                          left_pad=pads)[0])(
        state, jnp.asarray(padded), init_packed_cache(pm.config, pm.spec, 3, 9)))
    for i, p in enumerate(prompts):
        alone = np.asarray(jax.jit(_step, static_argnums=5)(
            graphdef, state, jnp.asarray(p[None]), init_packed_cache(pm.config, pm.spec, 1, p.size), 0, pm.hooks)[0])
        diff = np.abs(together[i, 9 - p.size:] - alone[0]).max()
        assert diff <= 1e-4 * np.abs(alone).max(), (p.size, diff)


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
    from resq_jax.runtime.checkpoint import load_packed, save_packed

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
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows, tokenize

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
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows, eval_windows, tokenize
    from resq_jax.runtime.checkpoint import load_packed, save_packed

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
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows, eval_windows, tokenize
    from resq_jax.runtime.checkpoint import load_packed, save_packed

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
