"""LQER / L2QER: SVD correction against an independent NumPy SVD, the L2QER scale, settings
validation, the MXINT activation hooks, a whole tiny model, and real SmolLM2 layer inputs."""
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import build_torch_model, tiny_llama_config
from resq_jax.calibration.statistics import calibrate
from resq_jax.formats.integer import fake_quant_weight
from resq_jax.formats.mxint import fake_quant_mxint
from resq_jax.models.decoder import SITES, from_weights
from resq_jax.models.loaders import load_model
from resq_jax.models.streaming import LayerStreamer
from resq_jax.quant.layouts import LINEARS
from resq_jax.quant.lqer import (
    LINEAR_SITES,
    QUANTIZED_SITES,
    LQERSpec,
    MXIntHooks,
    correct_linear,
    l2qer_scale,
    lowrank_correction,
    lqer_quantize_weights,
    quantize_lowrank,
    quantize_weight,
)


def _best_rank_k(m, k):
    """Independent reference: truncated SVD from the full decomposition."""
    u, s, vt = np.linalg.svd(m, full_matrices=True)
    return (u[:, :k] * s[:k]) @ vt[:k], s


@pytest.fixture(scope="module")
def err_pair():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)) * 0.05
    w_q = np.asarray(fake_quant_mxint(jnp.asarray(w, jnp.float32), 4, 16, 0), np.float64)
    return w, w_q


# ---------------------------------------------------------------------------------------- SVD
@pytest.mark.parametrize("k", [1, 8, 32, 64])
def test_lqer_is_best_rank_k_of_error(err_pair, k):
    w, w_q = err_pair
    a, b = lowrank_correction(w, w_q, k)
    assert a.shape == (96, k) and b.shape == (k, 64) and a.dtype == b.dtype == np.float64
    e = w - w_q
    ref, s = _best_rank_k(e, k)
    np.testing.assert_allclose(a @ b, ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.T @ a, np.eye(k), atol=1e-12)  # A = U_k: orthonormal columns
    resid = np.linalg.norm(e - a @ b)
    assert abs(resid - np.sqrt(np.sum(s[k:] ** 2))) < 1e-10
    if k == 64:  # full rank: exact reconstruction
        assert resid < 1e-12


@pytest.mark.parametrize("k", [4, 32])
def test_l2qer_is_best_rank_k_of_scaled_error(err_pair, k):
    w, w_q = err_pair
    rng = np.random.default_rng(1)
    s = l2qer_scale(np.exp(rng.uniform(-4, 2, size=96)))  # magnitudes spread over 3 decades
    a, b = lowrank_correction(w, w_q, k, scale=s)
    e = w - w_q
    ref, sv = _best_rank_k(s[:, None] * e, k)
    np.testing.assert_allclose(s[:, None] * (a @ b), ref, rtol=0, atol=1e-10)
    resid = np.linalg.norm(s[:, None] * (e - a @ b))
    assert abs(resid - np.sqrt(np.sum(sv[k:] ** 2))) < 1e-10
    # the scaled problem is a different one: the plain LQER correction is worse in the scaled norm
    a0, b0 = lowrank_correction(w, w_q, k)
    assert np.linalg.norm(s[:, None] * (e - a0 @ b0)) > resid * (1 + 1e-3)


def test_exactly_low_rank_error_is_recovered():
    rng = np.random.default_rng(2)
    w_q = rng.standard_normal((48, 80))
    w = w_q + rng.standard_normal((48, 3)) @ rng.standard_normal((3, 80))
    for scale in (None, l2qer_scale(rng.uniform(0.01, 3, 48))):
        a, b = lowrank_correction(w, w_q, 3, scale)
        np.testing.assert_allclose(w_q + a @ b, w, atol=1e-12)


def test_l2qer_scale_hand_worked():
    # clamp: [0, 1e-2, 1] -> [1e-4, 1e-2, 1]; sqrt(1e-4 * 1) = 1e-2 -> [1e-2, 1, 100]
    np.testing.assert_allclose(l2qer_scale([0.0, 1e-2, 1.0]), [1e-2, 1.0, 100.0], rtol=1e-14)
    # no clamp: min .25, max 16 -> sqrt(4) = 2
    s = l2qer_scale(np.array([1.0, 4.0, 16.0, 0.25], np.float32))
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, [0.5, 2.0, 8.0, 0.125], rtol=1e-15)
    np.testing.assert_allclose(l2qer_scale([3.0, 3.0]), [1.0, 1.0], rtol=1e-15)
    with pytest.raises(ValueError, match="1-D"):
        l2qer_scale(np.ones((2, 3)))
    with pytest.raises(ValueError, match=">= 0"):
        l2qer_scale([1.0, -1.0])


# ---------------------------------------------------------------------------------- validation
def test_rank_errors(err_pair):
    w, w_q = err_pair
    for bad in (0, -1, 65, 2.0):
        with pytest.raises(ValueError, match=r"min\(d_in, d_out\) = 64"):
            lowrank_correction(w, w_q, bad)
    with pytest.raises(ValueError, match="same shape"):
        lowrank_correction(w, w_q[:, :32], 4)
    with pytest.raises(ValueError, match=r"\[96\]"):
        lowrank_correction(w, w_q, 4, scale=np.ones(64))
    with pytest.raises(ValueError, match="> 0"):
        lowrank_correction(w, w_q, 4, scale=np.zeros(96))
    with pytest.raises(ValueError, match=">= 0"):
        LQERSpec(rank=-1)
    LQERSpec(rank=0)  # rank 0 = the plain quantized model


@pytest.mark.parametrize("field", ["a_width", "lowrank_width", "w_bits"])
@pytest.mark.parametrize("width", [5, 3, 7, 2])
def test_mxint_width_errors(field, width):
    with pytest.raises(ValueError, match="4, 6, 8") as info:
        LQERSpec(**{field: width})
    assert field in str(info.value)
    with pytest.raises(ValueError, match="4, 6, 8"):
        MXIntHooks(a_width=width)


def test_spec_validation():
    assert LQERSpec(a_width=6).hooks() == MXIntHooks(a_width=6)  # W4A6
    assert LQERSpec(w_format="int", w_bits=3, group_size=None).w_bits == 3  # int allows 2..8
    with pytest.raises(ValueError, match="mxint, int"):
        LQERSpec(w_format="fp4")
    with pytest.raises(ValueError, match="between 2 and 8"):
        LQERSpec(w_format="int", w_bits=16)
    with pytest.raises(ValueError, match="group_size"):
        LQERSpec(w_format="int", group_size=0)
    with pytest.raises(ValueError, match="LQER"):
        LQERSpec(scaled=1)


# ---------------------------------------------------------------------------------- quantizers
def test_correct_linear_quantizes_a_and_b_along_contraction(err_pair):
    w, w_q = err_pair
    a, b = lowrank_correction(w, w_q, 32)
    a_q, b_q = correct_linear(w, w_q, 32, None, 8)
    assert a_q.dtype == b_q.dtype == np.float32
    np.testing.assert_array_equal(a_q, np.asarray(fake_quant_mxint(jnp.asarray(a, jnp.float32), 8, 16, 0)))
    np.testing.assert_array_equal(b_q, np.asarray(fake_quant_mxint(jnp.asarray(b, jnp.float32), 8, 16, 0)))
    assert not np.array_equal(a_q, a.astype(np.float32))  # really quantized
    assert np.abs(a_q - a).max() <= np.abs(a).max() * 2.0 ** -6  # 8-bit: half a step of 2^(e-7)
    a16, b16 = correct_linear(w, w_q, 32, None, 16)
    np.testing.assert_array_equal(a16, a.astype(np.float32))
    np.testing.assert_array_equal(b16, b.astype(np.float32))


def test_ragged_rank_blocks(err_pair):
    """k = 24: B's blocks along k are rows 0-15 and a ragged block of rows 16-23."""
    w, w_q = err_pair
    a, b = lowrank_correction(w, w_q, 24)
    b32 = jnp.asarray(b, jnp.float32)
    _, b_q = quantize_lowrank(a, b, 8)
    np.testing.assert_array_equal(b_q[:16], np.asarray(fake_quant_mxint(b32[:16], 8, 16, 0)))
    np.testing.assert_array_equal(b_q[16:], np.asarray(fake_quant_mxint(b32[16:], 8, 8, 0)))
    t = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 24)), jnp.float32)
    tq = np.asarray(MXIntHooks()("lowrank", t))
    np.testing.assert_array_equal(tq[..., 16:], np.asarray(fake_quant_mxint(t[..., 16:], 8, 8, -1)))


def test_hooks_quantize_exactly_the_listed_sites():
    rng = np.random.default_rng(4)
    shapes = {"attn_in": (2, 5, 64), "mlp_in": (2, 5, 64), "down_in": (2, 5, 96), "lowrank": (2, 5, 32),
              "o_in": (2, 5, 4, 16), "q_rope": (2, 5, 4, 16), "k_rope": (2, 5, 2, 16), "q": (2, 5, 4, 16),
              "k": (2, 5, 2, 16), "v": (2, 5, 2, 16)}
    assert set(shapes) == set(SITES) | {"lowrank"}
    for widths in ((8, 8), (6, 8), (8, 4)):
        hooks = MXIntHooks(*widths)
        for site, shape in shapes.items():
            x = jnp.asarray(rng.standard_normal(shape) * 3, jnp.float32)
            y = hooks(site, x)
            if site in QUANTIZED_SITES:
                width = widths[1] if site == "lowrank" else widths[0]
                # o_in: blocks inside each head (hd = 16), i.e. the 4-D tensor along its last axis
                np.testing.assert_array_equal(np.asarray(y), np.asarray(fake_quant_mxint(x, width, 16, -1)))
                assert not np.array_equal(np.asarray(y), np.asarray(x)), site
            else:
                assert y is x, site
    # width 16: that quantizer is off
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    assert MXIntHooks(16, 8)("attn_in", x) is x
    assert MXIntHooks(8, 16)("lowrank", x) is x


def test_hooks_hashable_and_equal_for_equal_specs():
    h1, h2 = LQERSpec(rank=32).hooks(), LQERSpec(rank=8, scaled=False, w_format="int").hooks()
    assert h1 == h2 and hash(h1) == hash(h2) and len({h1, h2}) == 1  # rank / weights do not matter
    h3 = LQERSpec(a_width=6).hooks()
    assert h3 != h1 and len({h1, h3}) == 2
    with pytest.raises(Exception):
        h1.a_width = 6  # frozen


# ---------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_llama_config(tied=True)
    cfg.num_key_value_heads = cfg.num_attention_heads  # every linear is >= 64 x 64: rank 64 is full
    folder = tmp_path_factory.mktemp("lqer_llama")
    build_torch_model(cfg, seed=3).save_pretrained(folder)
    m = load_model(str(folder), with_tokenizer=False)
    tokens = np.random.default_rng(5).integers(0, m.config.vocab_size, (4, 32))
    stats = calibrate(from_weights(m.config, m.weights), tokens[:2], progress=False)
    return m, tokens, stats


def _logits(config, weights, tokens, hooks):
    return np.asarray(LayerStreamer(from_weights(config, weights)).logits(jnp.asarray(tokens), hooks), np.float64)


def test_quantized_weights_dict(tiny):
    m, _, stats = tiny
    spec = LQERSpec(rank=16)
    out = lqer_quantize_weights(m.config, m.weights, spec, stats.abs_mean)
    np.testing.assert_array_equal(out["embed"], m.weights["embed"])
    assert "lm_head" not in out
    for i in range(m.config.num_layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}"
            w = m.weights[key]
            np.testing.assert_array_equal(out[key], np.asarray(fake_quant_mxint(jnp.asarray(w), 4, 16, 0)))
            site = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in",
                    "down": "down_in"}[name]  # docs/algorithms.md, LQER and L2QER: each linear's own input
            s = l2qer_scale(stats.abs_mean[site][i])
            a_q, b_q = correct_linear(w, out[key], 16, s, 8)
            np.testing.assert_array_equal(out[key + "_lr_a"], a_q)
            np.testing.assert_array_equal(out[key + "_lr_b"], b_q)
    plain = lqer_quantize_weights(m.config, m.weights, LQERSpec(rank=0))
    assert not any(k.endswith(("_lr_a", "_lr_b")) for k in plain)
    # int weights: symmetric per channel with groups of 32 rows along d_in
    spec_int = LQERSpec(w_format="int", group_size=32, rank=8, scaled=False)
    out_int = lqer_quantize_weights(m.config, m.weights, spec_int)
    w = m.weights["layers.1.down"]
    np.testing.assert_array_equal(out_int["layers.1.down"],
                                  np.asarray(fake_quant_weight(jnp.asarray(w), 4, group_size=32)))
    np.testing.assert_array_equal(quantize_weight(w, spec_int), out_int["layers.1.down"])


def test_quantize_weights_errors(tiny):
    m, _, stats = tiny
    with pytest.raises(ValueError, match="needs calibration abs_mean"):
        lqer_quantize_weights(m.config, m.weights, LQERSpec(rank=8))
    with pytest.raises(ValueError, match="'down_in'"):
        lqer_quantize_weights(m.config, m.weights, LQERSpec(rank=8),
                              {k: v for k, v in stats.abs_mean.items() if k != "down_in"})
    with pytest.raises(ValueError, match=r"\[3, 64\]"):
        lqer_quantize_weights(m.config, m.weights, LQERSpec(rank=8), {**stats.abs_mean, "attn_in": np.ones((3, 10))})
    with pytest.raises(ValueError, match=r"layers\.0\.q: rank must be .* = 64"):
        lqer_quantize_weights(m.config, m.weights, LQERSpec(rank=65, scaled=False))
    with pytest.raises(ValueError, match=r"group_size 128 .* \[64, 96\].*e\.g\. 32"):
        lqer_quantize_weights(m.config, m.weights, LQERSpec(w_format="int", rank=0))
    corrected = lqer_quantize_weights(m.config, m.weights, LQERSpec(rank=4, scaled=False))
    with pytest.raises(ValueError, match="already has a low-rank correction"):
        lqer_quantize_weights(m.config, corrected, LQERSpec(rank=4, scaled=False))


def test_whole_model_lossless_at_full_rank(tiny):
    """Full rank with A, B and activations in float: W_q + A B = W, the decoder reproduces float."""
    m, tokens, _ = tiny
    fp = _logits(m.config, m.weights, tokens, MXIntHooks(16, 16))
    spec = LQERSpec(rank=64, a_width=16, lowrank_width=16, scaled=False)
    full = _logits(m.config, lqer_quantize_weights(m.config, m.weights, spec), tokens, spec.hooks())
    plain = _logits(m.config, lqer_quantize_weights(m.config, m.weights, LQERSpec(rank=0, a_width=16)), tokens,
                    MXIntHooks(16, 16))
    scale = np.abs(fp).max()
    assert np.abs(full - fp).max() < 2e-5 * scale
    assert np.abs(plain - fp).max() > 1e-2 * scale  # 4-bit weights alone are far from float


def test_whole_model_w4a8_correction_reduces_logit_error(tiny):
    m, tokens, stats = tiny
    fp = _logits(m.config, m.weights, tokens, MXIntHooks(16, 16))
    errs = {}
    for label, spec in (("rank0", LQERSpec(rank=0)), ("lqer", LQERSpec(rank=24, scaled=False)),
                        ("l2qer", LQERSpec(rank=24, scaled=True))):
        q = _logits(m.config, lqer_quantize_weights(m.config, m.weights, spec, stats.abs_mean), tokens[2:],
                    spec.hooks())
        errs[label] = np.linalg.norm(q - fp[2:]) / np.linalg.norm(fp[2:])
    print("tiny model relative logit error (held-out tokens):", errs)
    assert errs["lqer"] < 0.9 * errs["rank0"]
    assert errs["l2qer"] < 0.9 * errs["rank0"]


# ---------------------------------------------------------------------------------- SmolLM2
SMOL_LAYERS = (0, 15, 29)


@pytest.fixture(scope="module")
def smol_inputs():
    """Real layer inputs of SmolLM2 on 4 windows x 256 tokens of wiki-calib: {(layer, site): [4, 256, c]}."""
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows, tokenize

    m = load_model("smollm2")
    windows = calib_windows(tokenize(load_text("wiki-calib").text, m.tokenizer), 4, 256, seed=0)
    st = LayerStreamer(from_weights(m.config, m.weights))
    x = st.embed(jnp.asarray(windows))
    captured = {}
    for i in range(max(SMOL_LAYERS) + 1):
        x_next, sites = st.layer(i, x, capture=("attn_in", "mlp_in", "down_in", "o_in") if i in SMOL_LAYERS else ())
        for site, v in sites.items():
            captured[(i, site)] = np.asarray(v, np.float32).reshape(4, 256, -1)
        x = x_next
    return m, captured


def test_smollm2_output_error_l2qer_below_lqer_below_plain(smol_inputs):
    """||X W - (Q(X) W_q + Q(Q(X) A_q) B_q)|| / ||X W||, MXINT W4A8, rank 32. The L2QER scale is
    calibrated on windows 0-1 (max over windows of the mean |x|) and the error measured on 2-3."""
    m, captured = smol_inputs
    spec = LQERSpec(rank=0)
    rows = []
    for i in SMOL_LAYERS:
        for name in LINEARS:
            xs = captured[(i, LINEAR_SITES[name])]
            abs_mean = np.abs(xs[:2]).mean(axis=1).max(axis=0)
            x = xs[2:].reshape(-1, xs.shape[-1])
            w = m.weights[f"layers.{i}.{name}"]
            y = x.astype(np.float64) @ w
            xq = np.asarray(fake_quant_mxint(jnp.asarray(x), 8, 16, -1), np.float64)
            w_q = quantize_weight(w, spec)
            errs = [np.linalg.norm(y - xq @ w_q)]
            for scale in (None, l2qer_scale(abs_mean)):
                a_q, b_q = correct_linear(w, w_q, 32, scale, 8)
                t = np.asarray(fake_quant_mxint(jnp.asarray((xq @ a_q).astype(np.float32)), 8, 16, -1), np.float64)
                errs.append(np.linalg.norm(y - xq @ w_q - t @ b_q))
            rows.append(np.array(errs) / np.linalg.norm(y))
            print(f"layer {i:2d} {name:4s} rank0 {rows[-1][0]:.4f}  LQER {rows[-1][1]:.4f}  L2QER {rows[-1][2]:.4f}")
    r = np.array(rows)
    mean = r.mean(axis=0)
    print("mean relative output error: rank0 %.4f  LQER %.4f  L2QER %.4f" % tuple(mean))
    assert mean[2] < 0.85 * mean[1] and mean[1] < 0.95 * mean[0]
    assert np.all(r[:, 1] < r[:, 0])  # LQER never hurts in this setting
    assert np.mean(r[:, 2] < r[:, 1]) >= 0.8
