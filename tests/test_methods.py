"""Recipes: defaults and validation of QuantConfig, the MXINT (LQER) recipes and the ResQ + L2QER
combination wired end to end on a tiny model, the storage-bits accounting."""
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import build_torch_model, tiny_llama_config
from resq_jax.formats.integer import fake_quant_weight
from resq_jax.models.decoder import from_weights
from resq_jax.models.loaders import load_model
from resq_jax.models.streaming import LayerStreamer
from resq_jax.pipeline.quantize import check_rank, quantize_model, weight_bits
from resq_jax.pipeline.recipes import QuantConfig, QuantConfigError
from resq_jax.quant.lqer import int_lowrank_weights, lowrank_correction


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_methods")
    build_torch_model(tiny_llama_config(), seed=3).save_pretrained(folder)
    m = load_model(str(folder), with_tokenizer=False)
    tokens = np.random.default_rng(1).integers(0, m.config.vocab_size, (6, 32)).astype(np.int32)
    return m, tokens


def _logits(config, weights, tokens, hooks=None):
    st = LayerStreamer(from_weights(config, weights))
    return np.asarray(st.logits(jnp.asarray(tokens)) if hooks is None else st.logits(jnp.asarray(tokens), hooks))


def test_method_defaults():
    lq = QuantConfig(method="l2qer")
    assert (lq.a_bits, lq.kv_bits, lq.rank_used) == (8, 16, 32)
    assert lq.lqer_spec().scaled and lq.lqer_spec().w_format == "mxint"
    assert not QuantConfig(method="lqer").lqer_spec().scaled
    assert QuantConfig(method="mxint").rank_used == 0
    rq = QuantConfig(method="resq")
    assert (rq.a_bits, rq.kv_bits, rq.weights_by, rq.rank_used) == (4, 4, "gptq", 0)
    assert QuantConfig(method="rtn").weights_by == "rtn"
    # MSE clip search of weight scales: on by default for the integer recipes, explicit False kept
    assert QuantConfig(method="resq").clip_search and QuantConfig(method="rtn").clip_search
    assert not QuantConfig(method="resq", clip_search=False).clip_search
    assert not QuantConfig(method="lqer").clip_search and not QuantConfig(method="none").clip_search
    assert QuantConfig(method="resq+l2qer").rank_used == 32
    # the weight-only integer LQER variant: symmetric int4 weights with groups of 128
    spec = QuantConfig(method="lqer", a_bits=16, w_format="int").lqer_spec()
    assert (spec.w_format, spec.group_size, spec.a_width) == ("int", 128, 16)
    assert QuantConfig(method="l2qer", a_bits=6).lqer_spec().a_width == 6


@pytest.mark.parametrize("kwargs,needle", [
    (dict(method="lqer", kv_bits=4), "does not quantize the KV cache"),
    (dict(method="l2qer", a_bits=5), "MXINT width must be one of 4, 6, 8"),
    (dict(method="mxint", w_bits=3), "MXINT width"),
    (dict(method="l2qer", rank=-1), "--rank"),
    (dict(method="lqer", weight_quantizer="gptq"), "MXINT-rounded"),
    (dict(method="lqer", w_format="fp8"), "--w-format"),
    (dict(method="lqer", w_format="int", group_size=0), "--group-size"),
])
def test_bad_settings(kwargs, needle):
    with pytest.raises(QuantConfigError, match=needle):
        QuantConfig(**kwargs)


def test_rank_larger_than_a_linear_fails_before_work(tiny):
    m, _ = tiny
    limit = min(m.config.hidden_size, m.config.kv_size)  # 32: the k/v projections
    check_rank(m.config, QuantConfig(method="l2qer", rank=limit))
    with pytest.raises(QuantConfigError, match=f"min\\(d_in, d_out\\) = {limit}"):
        check_rank(m.config, QuantConfig(method="l2qer", rank=limit + 1))
    with pytest.raises(QuantConfigError, match="--rank"):
        quantize_model(m.config, m.weights, QuantConfig(method="resq+l2qer", rank=limit + 1))


def test_weight_bits_hand_worked():
    from resq_jax.models.config import ModelConfig

    cfg = ModelConfig(arch="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_eps=1e-5, rope_theta=1e4,
                      tie_word_embeddings=False)
    # shapes q [64,64], k/v [64,32], o [64,64], gate/up [64,128], down [128,64]: n = 36864 weights
    n = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128 + 128 * 64
    # ResQ 1/8: q/k/v/gate/up have 8 high input rows of 64; o has 4 heads x 2 high rows; down none
    high = 8 * 64 + 2 * 8 * 32 + 2 * 8 * 128  # q, k/v, gate/up
    high += 4 * 2 * 64  # o
    want = (4 * (n - high) + 8 * high) / n
    assert want == pytest.approx(4 + 4 * 3584 / 36864)
    assert weight_bits(cfg, QuantConfig(method="resq")) == pytest.approx(want, rel=1e-12)
    assert weight_bits(cfg, QuantConfig(method="mxint")) == pytest.approx(4.5)
    lr = 8 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64) / n
    assert weight_bits(cfg, QuantConfig(method="resq+l2qer", rank=1)) == pytest.approx(want + lr, rel=1e-12)
    assert weight_bits(cfg, QuantConfig(method="none")) == 16.0


def test_int_lowrank_full_rank_float_is_exact(tiny):
    """At full rank with A, B in float, W_q + A B reconstructs the float weights."""
    m, _ = tiny
    wq = {k: (np.asarray(fake_quant_weight(jnp.asarray(v), 4)) if k.split(".")[-1] in ("q", "k", "v", "o", "gate",
                                                                                        "up", "down") else v)
          for k, v in m.weights.items()}
    out = int_lowrank_weights(m.config, m.weights, wq, m.config.kv_size, None, bits=16)
    key = "layers.1.k"  # [64, 32]: full rank 32
    np.testing.assert_allclose(out[key] + out[key + "_lr_a"] @ out[key + "_lr_b"], m.weights[key], atol=2e-6)
    a, b = lowrank_correction(m.weights["layers.0.up"], wq["layers.0.up"], m.config.kv_size)
    np.testing.assert_allclose(out["layers.0.up_lr_a"], a, atol=1e-6)
    out8 = int_lowrank_weights(m.config, m.weights, wq, 4, None, bits=8)
    a8 = out8["layers.2.down_lr_a"]
    np.testing.assert_array_equal(a8, np.asarray(fake_quant_weight(jnp.asarray(a8), 8)))  # on the int8 grid


def test_recipes_end_to_end_tiny(tiny):
    """Every new recipe runs through quantize_model; the correction lowers the logit error of
    its base (MXINT W4A8 for lqer/l2qer, ResQ W4A4KV4 for resq+l2qer)."""
    m, tokens = tiny
    calib, held = tokens[:4], tokens[4:]
    fp = _logits(m.config, m.weights, held)
    err = {}
    for method, extra in (("mxint", {}), ("lqer", {"rank": 16}), ("l2qer", {"rank": 16}),
                          ("resq", {"weight_quantizer": "rtn"}), ("resq+l2qer", {"weight_quantizer": "rtn", "rank": 16})):
        qm = quantize_model(m.config, m.weights, QuantConfig(method=method, **extra), calib, progress=False)
        q = _logits(qm.config, qm.weights, held, qm.hooks)
        err[method] = np.linalg.norm(q - fp) / np.linalg.norm(fp)
        if extra.get("rank"):
            assert qm.weights["layers.0.q_lr_a"].shape == (m.config.hidden_size, 16)
            assert qm.details["weight_bits"] > 4.5
    print("relative logit error", err)
    assert err["lqer"] < 0.8 * err["mxint"] and err["l2qer"] < 0.8 * err["mxint"]
    assert err["resq+l2qer"] < err["resq"]


def test_settings_a_recipe_would_ignore_are_refused():
    from resq_jax.pipeline.recipes import setting_applies

    for kwargs, needle in [(dict(method="resq", rank=8), "--rank does not apply"),
                           (dict(method="resq", w_format="int"), "--w-format does not apply"),
                           (dict(method="resq", group_size=64), "--group-size does not apply"),
                           (dict(method="lqer", high_fraction=0.1), "--high-fraction does not apply"),
                           (dict(method="l2qer", high_bits=6), "--high-bits does not apply"),
                           (dict(method="rtn", high_bits=6), "--high-bits does not apply"),
                           (dict(method="mxint", weight_quantizer="gptq"), "--weight-quantizer does not apply"),
                           (dict(method="resq", weight_quantizer="rtn", act_order=True), "--act-order does not apply"),
                           (dict(method="rtn", damp=0.1), "--damp does not apply")]:
        with pytest.raises(QuantConfigError, match=needle):
            QuantConfig(**kwargs)
    # and they take effect where they apply
    assert QuantConfig(method="rtn", high_fraction=0.125, high_bits=6).high_bits == 6
    qc = QuantConfig(method="resq", act_order=True, damp=0.05)
    assert (qc.act_order, qc.damp) == (True, 0.05) and qc.to_dict()["act_order"] is True
    assert QuantConfig(method="resq", weight_quantizer="rtn").to_dict()["act_order"] is None
    assert QuantConfig(method="resq+l2qer", rank=8).rank_used == 8
    assert not setting_applies("rank", "resq") and setting_applies("rank", "resq+l2qer")
