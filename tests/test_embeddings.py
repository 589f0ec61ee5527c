"""Quantized embeddings (resq_jax/quant/embeddings.py): exact codes against an independent torch
reference, the tied head derived from one table equals the float model's head, the fake-quant
and packed paths use the same tables bit for bit, checkpoints round-trip, bad settings fail
early, and the SmolLM2 checkpoint is >= 3.5x smaller than its float16 weights at 4 bits."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import build_torch_model, tiny_llama_config, tiny_qwen2_config
from resq_jax.models.loaders import load_model
from resq_jax.pipeline.quantize import quantize_model
from resq_jax.pipeline.recipes import QuantConfig, QuantConfigError
from resq_jax.quant.embeddings import EmbeddingConfigError, check_embed_settings, quantize_table, tied_head
from resq_jax.runtime.checkpoint import load_packed, save_packed
from resq_jax.runtime.pack import pack_model, packed_decoder
from resq_jax.transforms.orthogonal import block_diag_rotation


def _torch_reference(t: np.ndarray, bits: int, group: int):
    """Symmetric per (row, group) codes written with torch: float16 scales, round half to even."""
    x = torch.from_numpy(t.astype(np.float32)).reshape(t.shape[0], -1, group)
    maxq = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1) / maxq).half()
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(x / s.float()[..., None]), -maxq - 1, maxq).to(torch.int8)
    return q.reshape(t.shape).numpy(), s.numpy()


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 64), (8, 64), (3, 32), (6, 8)])
def test_codes_equal_torch_reference(bits, group):
    rng = np.random.default_rng(bits * 100 + group)
    t = (rng.standard_normal((300, 64)) * rng.uniform(0.01, 2.0, (300, 1))).astype(np.float32)
    t[7] = 0.0  # an all-zero row: scale 1, codes 0
    c = quantize_table(t, bits, group)
    q_ref, s_ref = _torch_reference(t, bits, group)
    np.testing.assert_array_equal(c.q, q_ref)
    np.testing.assert_array_equal(c.scale, s_ref)
    assert c.group == group and c.q.dtype == np.int8 and c.scale.dtype == np.float16
    deq = c.dequantize()
    err = np.abs(deq - t).reshape(300, -1, group)
    assert np.all(err <= 0.5 * c.scale.astype(np.float32)[..., None] * (1 + 1e-6))
    assert np.all(deq[7] == 0) and c.q.min() >= -(2 ** (bits - 1)) and c.q.max() <= 2 ** (bits - 1) - 1


def test_clip_search_picks_the_least_squared_error_scale():
    """quantize_table(clip_search=True) against a torch search over the same factors: equal codes,
    and no group's error above the plain max-scaled one."""
    rng = np.random.default_rng(4)
    t = (rng.standard_t(3, (200, 64)) * 0.05).astype(np.float32)
    c = quantize_table(t, 4, 16, clip_search=True)
    x = torch.from_numpy(t).reshape(200, 4, 16)
    best = None
    for i in range(20):
        f = torch.tensor(np.float32(1.0 - 0.02 * i))
        s = (f * x.abs().amax(-1) / 7).half()
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.clamp(torch.round(x / s.float()[..., None]), -8, 7)
        err = ((q * s.float()[..., None] - x) ** 2).sum(-1)
        if best is None:
            best = (q, s, err)
        else:
            better = err < best[2]
            best = (torch.where(better[..., None], q, best[0]), torch.where(better, s, best[1]),
                    torch.where(better, err, best[2]))
    np.testing.assert_array_equal(c.q, best[0].reshape(200, 64).to(torch.int8).numpy())
    np.testing.assert_array_equal(c.scale, best[1].numpy())
    plain = quantize_table(t, 4, 16)
    err = lambda cc: ((cc.dequantize() - t) ** 2).reshape(200, 4, 16).sum(-1)  # noqa: E731
    assert np.all(err(c) <= err(plain)) and err(c).sum() < 0.9 * err(plain).sum()


def test_tied_head_from_the_rotated_table_equals_the_float_head():
    """lm_head = U^T diag(g) E^T equals M (E U)^T with M = U^T diag(g) U (no quantization)."""
    rng = np.random.default_rng(0)
    d, v = 48, 500
    e = rng.standard_normal((v, d)).astype(np.float32)
    g = rng.uniform(0.5, 2.0, d).astype(np.float32)
    u = block_diag_rotation(d, 6, (0, 1))
    want = (u.T @ (g[:, None].astype(np.float64) * e.T.astype(np.float64)))
    got = tied_head(u, g, (e.astype(np.float64) @ u).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    np.testing.assert_allclose(tied_head(None, g, e), g[:, None] * e.T, rtol=1e-7)


def test_bad_settings_fail_with_the_fix():
    with pytest.raises(EmbeddingConfigError, match="divide the hidden size 576.*64"):
        check_embed_settings(4, 100, 576)
    with pytest.raises(QuantConfigError, match="embed_bits"):
        QuantConfig(method="resq", embed_bits=9)
    assert check_embed_settings(4, None, 576) == 64 and check_embed_settings(8, None, 576) == 576
    assert check_embed_settings(4, None, 96 * 7) == 96 * 7  # 64 does not divide 672: whole rows


def _tiny(kind, tmp_path_factory):
    cfg = tiny_llama_config(tied=True, llama3=True) if kind == "llama" else tiny_qwen2_config(tied=False)
    folder = tmp_path_factory.mktemp(kind)
    build_torch_model(cfg, seed=3).save_pretrained(folder)
    return load_model(str(folder), with_tokenizer=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _tiny("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return _tiny("qwen2", tmp_path_factory)


def _quantize(m, method="resq", **kw):
    calib = np.random.default_rng(0).integers(0, m.config.vocab_size, (8, 32))
    return quantize_model(m.config, m.weights, QuantConfig(method=method, weight_quantizer="rtn", **kw), calib,
                          progress=False)


@pytest.mark.parametrize("kind,method,head", [("llama", "resq", "derived"), ("llama", "rtn", "tied"),
                                              ("qwen", "resq", "table")])
def test_fake_and_packed_use_the_same_tables(kind, method, head, llama, qwen, tmp_path):
    m = llama if kind == "llama" else qwen
    qm = _quantize(m, method, embed_bits=4, embed_group=16)
    emb = qm.codes["embed"]
    assert emb.head_kind == head and emb.bits == 4 and emb.table.group == 16
    pm = pack_model(qm)
    assert pm.embedding == {"bits": 4, "group": 16, "head": head}
    assert pm.arrays["embed.q"].shape == (m.config.vocab_size, m.config.hidden_size // 2)
    assert ("lm_head.q" in pm.arrays) == (head == "table") and ("head_gain" in pm.arrays) == (head == "derived")
    save_packed(tmp_path / "ck", pm)
    loaded = load_packed(tmp_path / "ck").model
    for p in (pm, loaded):
        dec = packed_decoder(p)
        np.testing.assert_array_equal(np.asarray(dec.embed[...]), qm.weights["embed"])
        if head == "tied":
            assert dec.lm_head is None and "lm_head" not in qm.weights
        else:
            np.testing.assert_array_equal(np.asarray(dec.lm_head[...]), qm.weights["lm_head"])
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, m.config.vocab_size, (2, 12)))
    np.testing.assert_array_equal(np.asarray(packed_decoder(pm)(tokens, hooks=pm.hooks)[0]),
                                  np.asarray(packed_decoder(loaded)(tokens, hooks=pm.hooks)[0]))


def test_derived_head_tracks_the_float_head(llama):
    """Tied + rotated (ResQ): the quantized model's head M Q(T)^T differs from the fused float
    head U^T diag(g) E^T only by the table's quantization error (8 bits: small), and the
    embeddings equal Q(E U)."""
    plain = _quantize(llama, "resq")
    q8 = _quantize(llama, "resq", embed_bits=8)
    assert "embed" not in plain.codes
    for name in ("embed", "lm_head"):
        a, b = plain.weights[name], q8.weights[name]
        rel = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert 0 < rel < 1e-2, (name, rel)


def test_float_method_refuses_embed_bits(llama):
    calib = np.random.default_rng(0).integers(0, llama.config.vocab_size, (8, 32))
    with pytest.raises(QuantConfigError, match="leaves the model in float"):
        quantize_model(llama.config, llama.weights, QuantConfig(method="none", embed_bits=4), calib, progress=False)


def test_smollm2_checkpoint_ratio_at_4_bit_embeddings(tmp_path):
    """ResQ W4A4KV4 (RTN) with 4-bit embeddings: the packed checkpoint (projections included)
    against the float16 weights of SmolLM2 (134.5M parameters, one tied table)."""
    from resq_jax.data.texts import load_text
    from resq_jax.data.windows import calib_windows, tokenize

    m = load_model("smollm2")
    calib = calib_windows(tokenize(load_text("wiki-calib").text, m.tokenizer), 4, 64, seed=0)
    qm = quantize_model(m.config, m.weights, QuantConfig(method="resq", weight_quantizer="rtn", embed_bits=4,
                                                         clip_search=False), calib, progress=False)
    pm = pack_model(qm)
    assert pm.embedding["head"] == "derived" and "lm_head.q" not in pm.arrays
    save_packed(tmp_path / "ck", pm)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ck") for f in fs)
    fp16 = 2 * sum(np.asarray(v).size for v in m.weights.values())
    print(f"checkpoint {size / 1e6:.2f} MB, float16 {fp16 / 1e6:.2f} MB, ratio {fp16 / size:.3f}")
    assert fp16 / size >= 3.5
    dec = packed_decoder(load_packed(tmp_path / "ck").model)
    np.testing.assert_array_equal(np.asarray(dec.lm_head[...]), qm.weights["lm_head"])
