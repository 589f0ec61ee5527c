"""Quantizers: hand-worked codes, float32 parity with independent references (NumPy, torch),
invariances (grouping, idempotence), MSE clip search, MXINT format, validation, jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from resq_jax.formats.bits import check_bits
from resq_jax.formats.integer import (
    dequantize_asym,
    dequantize_mixed,
    dequantize_weight,
    fake_quant_asym,
    fake_quant_mixed,
    fake_quant_sym_tensor,
    fake_quant_weight,
    fake_quant_with_scale,
    quantize_asym,
    quantize_mixed,
    quantize_weight_sym,
    quantize_with_scale,
    weight_scales,
)
from resq_jax.formats.mxint import dequantize_mxint, fake_quant_mxint, quantize_mxint

F32 = np.float32


def _np(a):
    return np.asarray(a)


# ---------------------------------------------------------------------------------------------
# asymmetric activation quantizer
# ---------------------------------------------------------------------------------------------
def test_asym_hand_worked_4bit():
    # xmin=-1, xmax=2: scale = 3/15 = 0.2, zero = round(1/0.2) = 5;
    # codes: -1/0.2=-5 -> 0, 0 -> 5, 0.5/0.2=2.5 -> 2 (half to even) -> 7, 2/0.2=10 -> 15.
    c = quantize_asym(jnp.array([-1.0, 0.0, 0.5, 2.0]), 4)
    assert c.q.dtype == jnp.uint8
    np.testing.assert_array_equal(_np(c.q), [0, 5, 7, 15])
    assert _np(c.scale).shape == (1,) and _np(c.scale)[0] == F32(3) / F32(15)
    assert _np(c.zero)[0] == 5.0
    np.testing.assert_allclose(_np(dequantize_asym(c)), [-1.0, 0.0, 0.4, 2.0], rtol=1e-6)


def test_asym_rows_are_independent_and_shapes():
    x = jnp.array([[-1.0, 0.0, 0.5, 2.0], [0.0, 0.125, 0.375, 3.75]])
    c = quantize_asym(x, 4)
    assert c.q.shape == (2, 4) and c.scale.shape == (2, 1) and c.zero.shape == (2, 1)
    np.testing.assert_array_equal(_np(c.q), [[0, 5, 7, 15], [0, 0, 2, 15]])
    np.testing.assert_array_equal(_np(c.zero)[:, 0], [5.0, 0.0])


def test_asym_all_zero_row_uses_minus_one_one():
    # [-1, 1] at 4 bits: scale = 2/15; in float32 1/scale = 7.4999995 -> zero 7, codes 7.
    c = quantize_asym(jnp.zeros((2, 4)), 4)
    np.testing.assert_array_equal(_np(c.q), 7)
    np.testing.assert_array_equal(_np(c.zero), 7.0)
    np.testing.assert_array_equal(_np(c.scale), F32(2) / F32(15))
    # 2 bits: scale 2/3, 1/scale = 1.5 exactly -> round half to even -> zero 2.
    c2 = quantize_asym(jnp.zeros((4,)), 2)
    np.testing.assert_array_equal(_np(c2.q), 2)
    assert _np(c2.zero)[0] == 2.0
    np.testing.assert_array_equal(_np(fake_quant_asym(jnp.zeros((3, 8)), 4)), 0.0)
    # a row that is all zero next to a normal row: only that row takes the [-1, 1] range
    c3 = quantize_asym(jnp.array([[0.0, 0.0], [1.0, -1.0]]), 8)
    assert np.isfinite(_np(c3.scale)).all()


def test_asym_saturation_with_clip_ratio():
    # clip_ratio 0.5: xmin=-0.5, xmax=1, scale=0.1, zero=5; -1 -> -10+5 clipped to 0,
    # 2 -> 20+5 clipped to 15 (both grid ends); dequantized to the clipped range.
    x = jnp.array([-1.0, 0.0, 0.5, 2.0])
    c = quantize_asym(x, 4, clip_ratio=0.5)
    np.testing.assert_array_equal(_np(c.q), [0, 5, 10, 15])
    assert _np(c.zero)[0] == 5.0
    np.testing.assert_allclose(_np(fake_quant_asym(x, 4, 0.5)), [-0.5, 0.0, 0.5, 1.0], rtol=1e-6)


def test_asym_round_half_to_even_ties():
    # power-of-two scales make x / scale exact ties
    # 4 bits, xmax = 3.75 -> scale 0.25, zero 0: 0.5->0, 1.5->2, 2.5->2, 3.5->4
    c = quantize_asym(jnp.array([0.0, 0.125, 0.375, 0.625, 0.875, 3.75]), 4)
    np.testing.assert_array_equal(_np(c.q), [0, 0, 2, 2, 4, 15])
    # 2 bits, xmin=-1, xmax=2 -> scale 1, zero 1: -0.5 -> -0 -> 1, 0.5 -> 0 -> 1, 1.5 -> 2 -> 3
    c = quantize_asym(jnp.array([-1.0, -0.5, 0.5, 1.5, 2.0]), 2)
    np.testing.assert_array_equal(_np(c.q), [0, 1, 1, 3, 3])
    # the zero point ties too: xmin=-0.5, xmax=2.5 -> scale 1, zero = round(0.5) = 0
    c = quantize_asym(jnp.array([-0.5, 2.5]), 2)
    assert _np(c.zero)[0] == 0.0
    np.testing.assert_array_equal(_np(c.q), [0, 2])
    # xmin=-1.5, xmax=1.5 -> scale 1, zero = round(1.5) = 2; 1.5 -> 2 + 2 = 4, saturates to 3
    c = quantize_asym(jnp.array([-1.5, 1.5]), 2)
    assert _np(c.zero)[0] == 2.0
    np.testing.assert_array_equal(_np(c.q), [0, 3])


def _torch_asym_reference(x, bits):
    """Independent float32 reference of docs/algorithms.md, Quantizers (activations)."""
    x = torch.from_numpy(x)
    maxq = 2**bits - 1
    xmin = torch.clamp(x.min(-1, keepdim=True).values, max=0)
    xmax = torch.clamp(x.max(-1, keepdim=True).values, min=0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return q.numpy(), scale.numpy(), zero.numpy(), ((q - zero) * scale).numpy()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asym_parity_with_torch_float32(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((512, 64)) * rng.uniform(0.01, 10, (512, 1))).astype(F32)
    x[:40] = np.abs(x[:40])  # rows with xmin = 0
    x[40:50] = 0.0
    q, scale, zero, deq = _torch_asym_reference(x, bits)
    c = quantize_asym(jnp.asarray(x), bits)
    np.testing.assert_array_equal(_np(c.q), q)  # exact codes: true IEEE division, no reciprocal
    np.testing.assert_array_equal(_np(c.scale), scale)
    np.testing.assert_array_equal(_np(c.zero), zero)
    np.testing.assert_array_equal(_np(fake_quant_asym(jnp.asarray(x), bits)), deq)


def test_asym_fake_quant_is_dequantize_of_quantize_and_keeps_dtype():
    x = jax.random.normal(jax.random.key(0), (16, 32))
    np.testing.assert_array_equal(_np(fake_quant_asym(x, 4)), _np(dequantize_asym(quantize_asym(x, 4))))
    xb = x.astype(jnp.bfloat16)
    out = fake_quant_asym(xb, 4)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        _np(out.astype(jnp.float32)),
        _np(dequantize_asym(quantize_asym(xb.astype(jnp.float32), 4)).astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_array_equal(_np(fake_quant_asym(x, 16)), _np(x))  # 16 bits: off


def test_asym_idempotent():
    x = jax.random.normal(jax.random.key(1), (64, 48)) * 3.0
    for bits in (3, 4, 8):
        y = fake_quant_asym(x, bits)
        np.testing.assert_array_equal(_np(quantize_asym(y, bits).q), _np(quantize_asym(x, bits).q))
        np.testing.assert_allclose(_np(fake_quant_asym(y, bits)), _np(y), rtol=2e-6, atol=1e-7)
        assert float(jnp.max(jnp.abs(y - x))) > 0  # it did quantize


# ---------------------------------------------------------------------------------------------
# mixed-precision activation quantizer
# ---------------------------------------------------------------------------------------------
def test_mixed_hand_worked_blocks_have_independent_scales():
    # d = 6, high = 2: low block [-1, -0.5, 0.5, 2] at 2 bits (scale 1, zero 1 -> 0,1,1,3);
    # high block [0, 3.75] at 4 bits (scale 0.25, zero 0 -> 0, 15)
    x = jnp.array([[-1.0, -0.5, 0.5, 2.0, 0.0, 3.75]])
    c = quantize_mixed(x, 2, 4, 2)
    assert c.low.q.shape == (1, 1, 4) and c.high.q.shape == (1, 1, 2)
    np.testing.assert_array_equal(_np(c.low.q)[0, 0], [0, 1, 1, 3])
    np.testing.assert_array_equal(_np(c.high.q)[0, 0], [0, 15])
    assert _np(c.low.scale).item() == 1.0 and _np(c.high.scale).item() == 0.25
    np.testing.assert_array_equal(_np(dequantize_mixed(c)), [[-1.0, 0.0, 0.0, 2.0, 0.0, 3.75]])
    np.testing.assert_array_equal(_np(fake_quant_mixed(x, 2, 4, 2)), _np(dequantize_mixed(c)))


def test_mixed_outlier_in_high_block_does_not_hurt_low_block():
    x = jax.random.normal(jax.random.key(2), (8, 64))
    x_out = x.at[:, -1].set(1000.0)
    low_err_uniform = jnp.abs(fake_quant_asym(x_out, 4) - x_out)[:, :56].mean()
    y = fake_quant_mixed(x_out, 4, 8, 8)
    np.testing.assert_array_equal(_np(y[:, :56]), _np(fake_quant_asym(x[:, :56], 4)))
    np.testing.assert_array_equal(_np(y[:, 56:]), _np(fake_quant_asym(x_out[:, 56:], 8)))
    # measured: 0.082 (mixed) vs 0.81 (one 4-bit range stretched by the outlier)
    assert float(jnp.abs(y - x_out)[:, :56].mean()) < 0.2 * float(low_err_uniform)


def test_mixed_high_zero_is_uniform_and_off_blocks_pass_through():
    x = jax.random.normal(jax.random.key(3), (5, 32))
    np.testing.assert_array_equal(_np(fake_quant_mixed(x, 4, 8, 0)), _np(fake_quant_asym(x, 4)))
    c = quantize_mixed(x, 4, 8, 0)
    assert c.high is None
    y = fake_quant_mixed(x, 4, 16, 4)  # high block unquantized
    np.testing.assert_array_equal(_np(y[:, 28:]), _np(x[:, 28:]))
    np.testing.assert_array_equal(_np(y[:, :28]), _np(fake_quant_asym(x[:, :28], 4)))
    np.testing.assert_array_equal(_np(fake_quant_mixed(x, 16, 16, 4)), _np(x))
    y = fake_quant_mixed(x, 4, 8, 32)  # every channel high
    np.testing.assert_array_equal(_np(y), _np(fake_quant_asym(x, 8)))


def test_mixed_per_token_head_groups_equal_reshape():
    tokens, heads, hd = 7, 4, 16
    x = jax.random.normal(jax.random.key(4), (2, tokens, heads * hd)) * jnp.linspace(0.1, 5, heads * hd)
    y = fake_quant_mixed(x, 4, 8, hd // 8, group=hd)
    xr = x.reshape(2, tokens, heads, hd)
    ref = jnp.concatenate([fake_quant_asym(xr[..., : hd - 2], 4), fake_quant_asym(xr[..., hd - 2:], 8)], -1)
    np.testing.assert_array_equal(_np(y), _np(ref.reshape(x.shape)))
    np.testing.assert_array_equal(_np(y), _np(fake_quant_mixed(xr, 4, 8, 2).reshape(x.shape)))
    # and it differs from one group per token (the grouping matters)
    assert not np.array_equal(_np(y), _np(fake_quant_mixed(x, 4, 8, 2)))
    c = quantize_mixed(x, 4, 8, 2, group=hd)
    assert c.low.q.shape == (2, tokens, heads, hd - 2) and c.low.scale.shape == (2, tokens, heads, 1)
    np.testing.assert_array_equal(_np(dequantize_mixed(c)), _np(y))


def test_mixed_idempotent_and_errors():
    x = jax.random.normal(jax.random.key(5), (6, 64))
    y = fake_quant_mixed(x, 4, 8, 8, group=32)
    np.testing.assert_allclose(_np(fake_quant_mixed(y, 4, 8, 8, group=32)), _np(y), rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of group"):
        fake_quant_mixed(x, 4, 8, 2, group=48)
    with pytest.raises(ValueError, match="high"):
        fake_quant_mixed(x, 4, 8, 65)
    with pytest.raises(ValueError, match="between 2 and 8"):
        fake_quant_mixed(x, 9, 8, 8)


# ---------------------------------------------------------------------------------------------
# symmetric weight quantizer
# ---------------------------------------------------------------------------------------------
def test_weight_hand_worked_codes():
    # w: [d_in=4, d_out=2], the last row is the high (8-bit) block.
    # low col 0 [7, -3.5, 2.5]: scale 7/7 = 1 -> [7, -4, 2] (ties to even); low col 1 zero -> scale 1, codes 0.
    # high col 0 [-3]: scale 3/127 -> -127; high col 1 [2.54]: scale 0.02 -> 127.
    w = jnp.array([[7.0, 0.0], [-3.5, 0.0], [2.5, 0.0], [-3.0, 2.54]])
    c = quantize_weight_sym(w, 4, 8, 1)
    assert c.q_low.dtype == jnp.int8 and c.q_high.dtype == jnp.int8
    np.testing.assert_array_equal(_np(c.q_low), [[7, 0], [-4, 0], [2, 0]])
    np.testing.assert_array_equal(_np(c.scale_low), [[1.0, 1.0]])
    np.testing.assert_array_equal(_np(c.q_high), [[-127, 127]])
    np.testing.assert_array_equal(_np(c.scale_high), [[F32(3) / F32(127), F32(2.54) / F32(127)]])
    deq = _np(dequantize_weight(c))
    np.testing.assert_allclose(deq, [[7, 0], [-4, 0], [2, 0], [-3, 2.54]], rtol=1e-6)
    np.testing.assert_array_equal(_np(fake_quant_weight(w, 4, 8, 1)), deq)


def test_weight_grid_ends_with_fixed_scale():
    w = jnp.array([-10.0, -8.5, -1.0, -0.5, 0.0, 0.5, 1.5, 7.0, 10.0])
    q = quantize_with_scale(w, jnp.float32(1.0), 4)
    assert q.dtype == jnp.int8
    np.testing.assert_array_equal(_np(q), [-8, -8, -1, 0, 0, 0, 2, 7, 7])  # grid [-8, 7]
    np.testing.assert_array_equal(_np(fake_quant_with_scale(w, jnp.float32(0.5), 4)),
                                  [-4.0, -4.0, -1.0, -0.5, 0.0, 0.5, 1.5, 3.5, 3.5])
    # a row with per-column scales, as GPTQ uses it
    row = jnp.array([1.0, 1.0, -1.0])
    np.testing.assert_array_equal(_np(quantize_with_scale(row, jnp.array([0.25, 1.0, 0.1]), 4)), [4, 1, -8])


def _torch_sym_reference(w, bits, clip_search):
    """Independent float32 reference: per output column, optional 2.4-norm shrink search."""
    w = torch.from_numpy(w)
    maxq = 2 ** (bits - 1) - 1
    amax = w.abs().amax(0, keepdim=True)

    def qdq(s):
        return torch.clamp(torch.round(w / s), -maxq - 1, maxq) * s

    base = torch.where(amax == 0, torch.ones_like(amax), amax / maxq)
    if not clip_search:
        return base.numpy()
    best_err = torch.full_like(amax, float("inf"))
    best = base.clone()
    for i in range(80):
        p = 1 - i / 100
        s = torch.where(amax == 0, torch.ones_like(amax), (p * amax) / maxq)
        err = ((w - qdq(s)).abs() ** 2.4).sum(0, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.numpy()


def test_weight_scales_parity_with_torch():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (256, 96)).astype(F32)
    w[:, 5] = 0.0
    s = _np(weight_scales(jnp.asarray(w), 4))
    np.testing.assert_array_equal(s, _torch_sym_reference(w, 4, False))
    assert s[0, 5] == 1.0
    codes = quantize_weight_sym(jnp.asarray(w), 4, 8, 0)
    ref_q = np.clip(np.round(w / s), -8, 7)
    np.testing.assert_array_equal(_np(codes.q_low), ref_q)
    # clip search: same shrink factor per column as the torch loop (pow may differ by an ulp:
    # allow a different choice only where both errors agree to 1e-5)
    sc = _np(weight_scales(jnp.asarray(w), 4, clip_search=True))
    ref = _torch_sym_reference(w, 4, True)
    differ = sc != ref
    assert differ.mean() <= 0.02
    if differ.any():
        def err(scale):
            return (np.abs(w - np.clip(np.round(w / scale), -8, 7) * scale) ** 2.4).sum(0)
        np.testing.assert_allclose(err(sc)[differ[0]], err(ref)[differ[0]], rtol=1e-5)


def test_weight_high_rows_use_8_bits():
    w = jax.random.normal(jax.random.key(6), (256, 64))
    y = fake_quant_weight(w, 4, 8, 32)
    err = jnp.abs(y - w)
    np.testing.assert_array_equal(_np(y[:224]), _np(fake_quant_weight(w[:224], 4, 8, 0)))
    np.testing.assert_array_equal(_np(y[224:]), _np(fake_quant_weight(w[224:], 8, 8, 0)))
    assert float(err[224:].mean()) < float(err[:224].mean()) / 10
    # symmetric grid: 4-bit codes in [-8, 7], max |w| of each column maps to +-7
    c = quantize_weight_sym(w, 4, 8, 32)
    q = _np(c.q_low)
    assert q.min() >= -8 and q.max() <= 7 and (np.abs(q).max(0) == 7).all()
    assert (np.abs(_np(c.q_high)).max(0) == 127).all()
    # 16 bits keeps the high block exact
    y16 = fake_quant_weight(w, 4, 16, 32)
    np.testing.assert_array_equal(_np(y16[224:]), _np(w[224:]))


def test_weight_idempotent_and_dtype():
    w = jax.random.normal(jax.random.key(7), (128, 32))
    y = fake_quant_weight(w, 4, 8, 16)
    np.testing.assert_allclose(_np(fake_quant_weight(y, 4, 8, 16)), _np(y), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(_np(quantize_weight_sym(y, 4, 8, 16).q_low),
                                  _np(quantize_weight_sym(w, 4, 8, 16).q_low))
    assert fake_quant_weight(w.astype(jnp.bfloat16), 4).dtype == jnp.bfloat16


def test_weight_group_size_equals_per_slice_quantization():
    w = jax.random.normal(jax.random.key(8), (96, 24))
    c = quantize_weight_sym(w, 4, 8, 32, group_size=16)
    assert c.scale_low.shape == (4, 24) and c.scale_high.shape == (2, 24)
    y = _np(dequantize_weight(c))
    for g in range(6):
        bits = 4 if g < 4 else 8
        sl = slice(16 * g, 16 * (g + 1))
        np.testing.assert_array_equal(y[sl], _np(fake_quant_weight(w[sl], bits)))
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight_sym(w, 4, 8, 8, group_size=16)


def test_clip_search_never_worse_and_shrinks_heavy_tails():
    def err24(w, y):
        return np.sum(np.abs(_np(w) - _np(y)) ** 2.4, axis=0)

    rng = np.random.default_rng(1)
    gauss = jnp.asarray(rng.standard_normal((256, 64)).astype(F32))
    heavy = jnp.asarray(rng.standard_t(1.5, (256, 64)).astype(F32))
    for w in (gauss, heavy):
        for bits in (3, 4):
            e1 = err24(w, fake_quant_weight(w, bits))
            ec = err24(w, fake_quant_weight(w, bits, clip_search=True))
            assert (ec <= e1 * (1 + 1e-6)).all()
    s1 = _np(weight_scales(heavy, 4))
    sc = _np(weight_scales(heavy, 4, clip_search=True))
    p = sc / s1
    assert (p <= 1.0 + 1e-6).all() and (p >= 0.2 - 1e-6).all()
    assert (p < 0.99).mean() > 0.5  # heavy tails: most columns shrink
    e1 = err24(heavy, fake_quant_weight(heavy, 4)).sum()
    ec = err24(heavy, fake_quant_weight(heavy, 4, clip_search=True)).sum()
    assert ec < 0.92 * e1  # measured 0.883
    # clip search per block and per group, shapes preserved
    c = quantize_weight_sym(heavy, 4, 8, 64, clip_search=True, group_size=32)
    assert c.scale_low.shape == (6, 64) and c.scale_high.shape == (2, 64)


def test_sym_tensor_hand_worked():
    # scale = 1/127: 1 -> 127, -0.5 -> -63.5 -> -64 (half to even), 0.25 -> 31.75 -> 32
    w = jnp.array([[1.0, -0.5], [0.25, 0.0]])
    y = _np(fake_quant_sym_tensor(w, 8))
    s = F32(1) / F32(127)
    np.testing.assert_array_equal(y, np.array([[127, -64], [32, 0]], F32) * s)
    np.testing.assert_array_equal(_np(fake_quant_sym_tensor(jnp.zeros((3, 3)), 8)), 0.0)
    # 4 bits, one scale for the whole tensor (max 7 -> scale 1), not per column (column 1
    # alone would get scale 0.5): -3.5 -> -4 and 2.5 -> 2 (ties to even), 0.75 -> 1
    w4 = jnp.array([[7.0, -3.5], [2.5, 0.75]])
    np.testing.assert_array_equal(_np(fake_quant_sym_tensor(w4, 4)), [[7.0, -4.0], [2.0, 1.0]])


# ---------------------------------------------------------------------------------------------
# MXINT
# ---------------------------------------------------------------------------------------------
def _pad16(vals):
    return list(vals) + [0.0] * (16 - len(vals))


def test_mxint_hand_worked_width4():
    # width 4: 2^(w-1) = 8, q in [0, 7]
    # block 0: m = 0.55 -> e = ceil(log2 0.55) = 0; 0.55*8 = 4.4 -> 4, 0.1*8 = 0.8 -> 1, 0.3*8 = 2.4 -> 2
    # block 1: m = 8 -> e = 3; q = |x|: 8 -> 7 (saturates), 2.5 -> 2, 3.5 -> 4, 4.5 -> 4, 5.5 -> 6, 0.5 -> 0
    x = jnp.array([_pad16([0.55, 0.1, -0.3]), _pad16([8.0, 2.5, -3.5, 4.5, -5.5, 0.5])])
    c = quantize_mxint(x, 4)
    assert c.q.dtype == jnp.int8 and c.exponent.shape == (2, 1)
    np.testing.assert_array_equal(_np(c.exponent)[:, 0], [0, 3])
    np.testing.assert_array_equal(_np(c.q)[0, :3], [4, 1, -2])
    np.testing.assert_array_equal(_np(c.q)[1, :6], [7, 2, -4, 4, -6, 0])
    y = _np(fake_quant_mxint(x, 4))
    np.testing.assert_array_equal(y[0, :3], [0.5, 0.125, -0.25])
    np.testing.assert_array_equal(y[1, :6], [7.0, 2.0, -4.0, 4.0, -6.0, 0.0])
    np.testing.assert_array_equal(y[:, 6:], 0.0)  # exact zeros stay zero


def test_mxint_hand_worked_width8_and_6():
    # width 8: m = 0.75 -> e = 0, q = round(|x| * 128): 0.75 -> 96, 0.001 -> 0, 0.3 -> 38.4 -> 38
    x = jnp.array(_pad16([0.75, 0.001, -0.3]))
    np.testing.assert_array_equal(_np(quantize_mxint(x, 8).q)[:3], [96, 0, -38])
    np.testing.assert_array_equal(_np(fake_quant_mxint(x, 8))[:3], [0.75, 0.0, -38 / 128])
    # width 6: m = 1 -> e = 0, q = round(|x| * 32) clipped to 31: 1 -> 31, 0.5 -> 16
    x = jnp.array(_pad16([1.0, 0.5]))
    np.testing.assert_array_equal(_np(quantize_mxint(x, 6).q)[:2], [31, 16])


def test_mxint_zero_block_borrows_smallest_nonzero_max():
    # blocks (along the last axis): maxes 8, 0, 0.55 -> the zero block borrows 0.55 -> e = 0
    x = jnp.array(_pad16([8.0]) + [0.0] * 16 + _pad16([0.55]))
    c = quantize_mxint(x, 4)
    np.testing.assert_array_equal(_np(c.exponent), [3, 0, 0])
    # only big blocks: the zero block borrows 8 -> e = 3
    c = quantize_mxint(jnp.array([0.0] * 16 + _pad16([-8.0])), 4)
    np.testing.assert_array_equal(_np(c.exponent), [3, 3])
    # all-zero tensor uses m = 1 -> e = 0, values zero
    c = quantize_mxint(jnp.zeros((2, 32)), 8)
    np.testing.assert_array_equal(_np(c.exponent), 0)
    np.testing.assert_array_equal(_np(dequantize_mxint(c)), 0.0)


def test_mxint_exponent_clip_at_128_without_overflow():
    # m = 3e38 > 2^127 -> e = 128; q = round(3e38 / 2^125) = round(7.05) = 7; value 7 * 2^125
    c = quantize_mxint(jnp.array(_pad16([3e38, 1e38])), 4)
    assert int(c.exponent[0]) == 128
    np.testing.assert_array_equal(_np(c.q)[:2], [7, 2])
    y = _np(dequantize_mxint(c))
    assert y[0] == F32(7 * 2.0**125) and np.isfinite(y).all()


def _np_mxint(x, width, block=16):
    """Independent float64 NumPy reference of docs/algorithms.md, MXINT, along the last axis."""
    x = np.asarray(x, np.float64)
    xb = x.reshape(*x.shape[:-1], -1, block)
    m = np.abs(xb).max(-1, keepdims=True)
    nz = m[m > 0]
    m = np.where(m > 0, m, nz.min() if nz.size else 1.0)
    e = np.clip(np.ceil(np.log2(m)), -127, 128)
    q = np.clip(np.round(np.abs(xb) * 2.0 ** (width - 1) / 2.0**e), 0, 2 ** (width - 1) - 1)
    return (np.sign(xb) * q * 2.0 ** (e - (width - 1))).reshape(x.shape), e[..., 0]


@pytest.mark.parametrize("width", [4, 6, 8])
def test_mxint_parity_with_numpy_and_axis(width):
    rng = np.random.default_rng(width)
    x = (rng.standard_t(2, (24, 64)) * 10.0 ** rng.uniform(-6, 6, (24, 1))).astype(F32)
    x[3, 16:32] = 0.0
    x[5, :5] = 0.0
    ref, e = _np_mxint(x, width)
    c = quantize_mxint(jnp.asarray(x), width)
    np.testing.assert_array_equal(_np(c.exponent), e)
    np.testing.assert_array_equal(_np(fake_quant_mxint(jnp.asarray(x), width)), ref.astype(F32))
    # axis = 0 (weights [d_in, d_out], contraction over d_in) is the transpose of axis = -1
    np.testing.assert_array_equal(_np(fake_quant_mxint(jnp.asarray(x.T), width, axis=0)), ref.T.astype(F32))
    assert quantize_mxint(jnp.asarray(x.T), width, axis=0).exponent.shape == (4, 24)


def test_mxint_not_idempotent_when_max_rounds_to_power_of_two():
    # documented property of the format: m = 0.55 -> 0.5 after one pass (e = 0), then e = -1 and
    # 0.5 * 8 / 0.5 = 8 saturates to 7 -> 0.4375. Blocks whose max code stays above 2^(w-2) are stable.
    x = jnp.array(_pad16([0.55]))
    y = fake_quant_mxint(x, 4)
    assert float(y[0]) == 0.5 and float(fake_quant_mxint(y, 4)[0]) == 0.4375
    x = jnp.array(_pad16([0.9, 0.3, -0.6]))
    y = fake_quant_mxint(x, 4)
    np.testing.assert_array_equal(_np(fake_quant_mxint(y, 4)), _np(y))


def test_mxint_errors():
    x = jnp.ones((2, 32))
    for bad in (2, 3, 5, 7, 16, 4.0):
        with pytest.raises(ValueError, match=r"MXINT width must be one of \(4, 6, 8\)"):
            fake_quant_mxint(x, bad)
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        fake_quant_mxint(jnp.ones((2, 20)), 8)
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        fake_quant_mxint(jnp.ones((20, 32)), 8, axis=0)
    with pytest.raises(ValueError, match="axis"):
        fake_quant_mxint(x, 8, axis=2)


# ---------------------------------------------------------------------------------------------
# validation and jit
# ---------------------------------------------------------------------------------------------
def test_check_bits():
    for b in (2, 3, 4, 8, 16, np.int64(4)):
        assert check_bits(b, "--w-bits") == int(b)
    for bad in (0, 1, 9, 15, 17, 32, 4.0, True, "4", None):
        with pytest.raises(ValueError, match=r"--a-bits: bits must be between 2 and 8 \(or 16 to disable\), got"):
            check_bits(bad, "--a-bits")
    with pytest.raises(ValueError, match=r"between 2 and 8, got 16"):
        check_bits(16, "--kv-bits", allow_off=False)
    for fn in (lambda: quantize_asym(jnp.ones(4), 16), lambda: quantize_asym(jnp.ones(4), 1),
               lambda: fake_quant_weight(jnp.ones((4, 4)), 12),
               lambda: quantize_with_scale(jnp.ones(4), jnp.ones(4), 16)):
        with pytest.raises(ValueError, match="bits must be between 2 and 8"):
            fn()
    with pytest.raises(ValueError, match="clip_ratio"):
        quantize_asym(jnp.ones(4), 4, clip_ratio=1.5)
    with pytest.raises(ValueError, match="high_rows"):
        quantize_weight_sym(jnp.ones((4, 4)), 4, 8, 5)


def test_everything_under_outer_jit_and_vmap():
    x = jax.random.normal(jax.random.key(9), (4, 8, 64))
    w = jax.random.normal(jax.random.key(10), (64, 32))

    @functools.partial(jax.jit, static_argnums=(2,))
    def run(x, w, bits):
        return (fake_quant_asym(x, bits), fake_quant_mixed(x, bits, 8, 2, group=16),
                fake_quant_weight(w, bits, 8, 8, clip_search=True), fake_quant_sym_tensor(w, 8),
                fake_quant_mxint(x, 8), fake_quant_mxint(w, bits, axis=0),
                dequantize_weight(quantize_weight_sym(w, bits, 8, 8, group_size=8)))

    jitted = run(x, w, 4)
    eager = (fake_quant_asym(x, 4), fake_quant_mixed(x, 4, 8, 2, group=16),
             fake_quant_weight(w, 4, 8, 8, clip_search=True), fake_quant_sym_tensor(w, 8),
             fake_quant_mxint(x, 8), fake_quant_mxint(w, 4, axis=0),
             dequantize_weight(quantize_weight_sym(w, 4, 8, 8, group_size=8)))
    for a, b in zip(jitted, eager):
        np.testing.assert_array_equal(_np(a), _np(b))
    # vmap over tokens of a per-token quantizer == batched call (per-row quantizer)
    np.testing.assert_array_equal(_np(jax.vmap(lambda r: fake_quant_asym(r, 4))(x[0])),
                                  _np(fake_quant_asym(x[0], 4)))
    # codes are pytrees: they cross jit boundaries
    codes = jax.jit(lambda x: quantize_mixed(x, 4, 8, 2, 16))(x)
    np.testing.assert_array_equal(_np(dequantize_mixed(codes)), _np(jitted[1]))
