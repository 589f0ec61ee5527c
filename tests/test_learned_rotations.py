"""The loss of a fused model under extra rotations applied on the fly (resq_jax/learn/rotated.py): invariant in
float (equal to the decoder's own loss, zero Riemannian gradient), not invariant with quantizers (a non-zero,
finite straight-through gradient), and the same model as fusing the refined transforms in float64."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resq_jax.learn.rotated import (
    StraightThrough,
    block_diag,
    identity_rotations,
    refined_transforms,
    rotated_kl,
    rotated_nll,
    stack_layers,
)
from resq_jax.models.decoder import from_weights
from resq_jax.models.loaders import load_model
from resq_jax.models.synthetic import write_random_model
from resq_jax.quant.fake_quant import FakeQuantHooks
from resq_jax.quant.layouts import ActivationSpec
from resq_jax.rotation import fusion
from resq_jax.rotation.transforms import apply_transforms, quarot_transforms
from resq_jax.transforms.cayley import skew_gradient


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny-llama-smol: 2 layers, d 64, 4 heads of 16, 2 KV heads."""
    return load_model(str(write_random_model(tmp_path_factory.mktemp("m") / "model", "tiny-llama-smol")))


@pytest.fixture(scope="module")
def fused(tiny):
    """tiny-llama-smol folded, untied, QuaRot-rotated."""
    m = tiny
    view = fusion.FoldedWeights(m.config, m.weights)
    config = view.untied_config
    t = quarot_transforms(config, seed=0)
    weights = dict(apply_transforms(config, view, t))
    return config, view, t, weights


def _orthogonal(rng, *shape):
    q, r = np.linalg.qr(rng.standard_normal(shape))
    return jnp.asarray(q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :], jnp.float32)


def _random_rotations(config, rng, residual=(56, 8), value=(14, 2)):
    return {"residual": tuple(_orthogonal(rng, n, n) for n in residual),
            "value": tuple(_orthogonal(rng, config.num_layers, n, n) for n in value)}


TOKENS = jnp.asarray(np.random.default_rng(7).integers(0, 49152, (2, 24)), jnp.int32)


def test_float_loss_is_the_decoders_and_rotation_invariant(fused):
    config, _, _, weights = fused
    frozen = stack_layers(config, weights)
    model = from_weights(config, weights)
    logits = np.asarray(model(TOKENS)[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    ref = -np.take_along_axis(logp[:, :-1], np.asarray(TOKENS)[:, 1:, None], -1)[..., 0].mean(-1)
    ident = identity_rotations((56, 8), (14, 2), config.num_layers)
    np.testing.assert_allclose(rotated_nll(ident, frozen, TOKENS, config=config), ref, rtol=1e-5)
    rots = _random_rotations(config, np.random.default_rng(0))
    assert float(jnp.abs(block_diag(rots["residual"]) - jnp.eye(64)).max()) > 0.3
    np.testing.assert_allclose(rotated_nll(rots, frozen, TOKENS, config=config), ref, rtol=1e-5)


def test_float_riemannian_gradient_is_zero_and_quantized_is_not(fused):
    config, _, _, weights = fused
    frozen = stack_layers(config, weights)
    rots = _random_rotations(config, np.random.default_rng(1))
    spec = ActivationSpec(a_bits=4, kv_bits=4, down_bits=4, high_bits=8, high_residual=8, high_head=2)
    for hooks, zero in ((StraightThrough(), True), (StraightThrough(FakeQuantHooks(spec)), False)):
        grads = jax.grad(lambda r: rotated_nll(r, frozen, TOKENS, config=config, hooks=hooks).mean())(rots)
        for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(rots)):
            riem = float(jnp.abs(skew_gradient(g, x)).max())
            scale = float(jnp.abs(g).max())
            assert np.isfinite(riem) and scale > 0
            if zero:  # invariant: only the normal component is non-zero (measured: ~4e-7 of the gradient)
                assert riem <= 1e-5 * scale, (riem, scale)
            else:  # the quantizers see the rotation: strongly in the 4-bit blocks (~5%), weakly in the 8-bit (~0.1%)
                assert riem > (1e-2 if x.shape[-1] > 8 else 2e-4) * scale, (x.shape, riem, scale)


def test_refined_transforms_fuse_to_the_rotated_weights(fused):
    """Fusing residual @ Q1 and value @ Q2 in float64 gives the loss rotated_nll computes on the fly."""
    config, view, t, weights = fused
    rots = _random_rotations(config, np.random.default_rng(2))
    refined = refined_transforms(t, rots)
    np.testing.assert_allclose(refined.residual.T @ refined.residual, np.eye(64), atol=1e-6)
    again = stack_layers(config, dict(apply_transforms(config, view, refined)))
    spec = ActivationSpec(a_bits=4, kv_bits=4, down_bits=4, high_bits=8, high_residual=8, high_head=2)
    hooks = FakeQuantHooks(spec)
    on_the_fly = rotated_nll(rots, stack_layers(config, weights), TOKENS, config=config, hooks=hooks)
    ident = identity_rotations((64,), (16,), config.num_layers)
    fused_nll = rotated_nll(ident, again, TOKENS, config=config, hooks=hooks)
    np.testing.assert_allclose(on_the_fly, fused_nll, rtol=2e-3)  # 4-bit codes may flip at float rounding
    assert dataclasses.replace(refined, residual=None, value=None) == dataclasses.replace(t, residual=None, value=None)


def test_bfloat16_storage_rounds_the_stored_model_only(fused):
    """stack_layers(..., bfloat16): the linears and vocabulary tables stored as bfloat16 bit patterns (half their
    bytes; as_float32 decodes them to the ml_dtypes rounding of the float64 weights), norms, biases and key
    rotations in float32; the quantized loss is that of the float32 model whose large arrays were rounded to
    bfloat16, since every layer is widened to float32 before it is rotated, and it differs from the unrounded
    model's only by that rounding."""
    import ml_dtypes

    from resq_jax.learn.rotated import as_float32

    config, _, _, weights = fused
    f32, bf = stack_layers(config, weights), stack_layers(config, weights, jnp.bfloat16)
    linears = ("q", "k", "v", "o", "gate", "up", "down")
    for name in linears:
        assert 2 * bf["layers"][name].nbytes == f32["layers"][name].nbytes
    np.testing.assert_array_equal(np.asarray(as_float32(bf["layers"]["gate"][1])),
                                  np.asarray(weights["layers.1.gate"], np.float64).astype(ml_dtypes.bfloat16))
    assert 2 * bf["embed"].nbytes == f32["embed"].nbytes and 2 * bf["lm_head"].nbytes == f32["lm_head"].nbytes
    assert all(v.dtype == jnp.float32 for k, v in bf["layers"].items() if k not in linears)
    big = ("embed", "lm_head") + tuple(f".{n}" for n in ("q", "k", "v", "o", "gate", "up", "down"))
    rounded = {k: (np.asarray(v, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)
                   if k in big[:2] or k.endswith(big[2:]) else v) for k, v in weights.items()}
    assert sum(not np.array_equal(rounded[k], weights[k]) for k in weights) == 2 + 7 * config.num_layers
    spec = ActivationSpec(a_bits=4, kv_bits=4, down_bits=4, high_bits=8, high_residual=8, high_head=2)
    rots, hooks = _random_rotations(config, np.random.default_rng(3)), FakeQuantHooks(spec)
    got = np.asarray(rotated_nll(rots, bf, TOKENS, config=config, hooks=hooks))
    ref = np.asarray(rotated_nll(rots, stack_layers(config, rounded), TOKENS, config=config, hooks=hooks))
    full = np.asarray(rotated_nll(rots, f32, TOKENS, config=config, hooks=hooks))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert 1e-6 < np.abs(got - full).max() / np.abs(full).max() < 2e-2, (got, full)


@pytest.mark.parametrize("shape", ["tiny-llama-smol", "tiny-qwen2"])
def test_frozen_spec_is_the_stacked_fused_model(tmp_path, shape):
    """learn.rotated.frozen_spec (the shapes a step compiles against without weights: the benchmark's 7B step)
    names exactly the arrays, shapes and stored dtypes stack_layers gives the fused rotated model (residual,
    value and key rotations, down_proj Hadamard, as every recipe with learned rotations fuses it), float32 and
    bfloat16, Llama (no biases) and Qwen2 (q/k/v biases)."""
    from resq_jax.learn.rotated import frozen_spec

    m = load_model(str(write_random_model(tmp_path / "m", shape)))
    view = fusion.FoldedWeights(m.config, m.weights)
    config = view.untied_config
    weights = dict(apply_transforms(config, view, quarot_transforms(config, seed=0)))
    def described(tree):
        return jax.tree.map(lambda a: (a.shape, a.dtype) if hasattr(a, "shape") else a, tree)

    for dtype in (jnp.float32, jnp.bfloat16):
        assert described(stack_layers(config, weights, dtype)) == described(frozen_spec(config, dtype)), dtype


def _decoder_nll(config, weights, hooks) -> np.ndarray:
    """Mean next-token loss per window [B] of the decoder built from ``weights``, log-softmax in float64."""
    logits = np.asarray(from_weights(config, weights)(TOKENS, hooks=hooks)[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return -np.take_along_axis(logp[:, :-1], np.asarray(TOKENS)[:, 1:, None], -1)[..., 0].mean(-1)


@pytest.mark.parametrize("high", [0, 8])
def test_rtn_weights_through_the_estimator_are_the_rtn_model(fused, high):
    """With a weight_spec, rotated_nll at identity rotations is the loss of the model whose linears the pipeline's
    RTN quantizer (quant.weights.rtn_weights_codes: NumPy-side codes, dequantized) produced, under the same
    activation quantizers; ResQ's layout (high = 8 residual rows and 2 rows per o_proj head in 8 bits, permuted)
    and QuaRot's (none). The weights' straight-through gradient reaches the rotations: non-zero and finite
    (float weights and identity hooks give a zero Riemannian gradient, the test above)."""
    from resq_jax.quant.layouts import WeightSpec
    from resq_jax.quant.weights import rtn_weights_codes

    config, _, _, weights = fused
    ws = WeightSpec(w_bits=4, high_bits=8, high_residual=high, high_head=high // 4)
    hooks = FakeQuantHooks(ActivationSpec(a_bits=4, kv_bits=4, down_bits=4, high_bits=8, high_residual=high,
                                          high_head=high // 4))
    ref = _decoder_nll(config, dict(rtn_weights_codes(config, weights, ws).weights), hooks)
    assert np.all(np.abs(ref - _decoder_nll(config, weights, hooks)) > 1e-2)  # the weights' rounding shows
    frozen = stack_layers(config, weights)
    ident = identity_rotations((64 - high, high) if high else (64,), (16 - high // 4, high // 4) if high else (16,),
                               config.num_layers)
    np.testing.assert_allclose(rotated_nll(ident, frozen, TOKENS, config=config, hooks=hooks, weight_spec=ws), ref,
                               rtol=1e-4)
    grads = jax.grad(lambda r: rotated_nll(r, frozen, TOKENS, config=config, weight_spec=ws).mean())(ident)
    for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(ident)):
        riem = float(jnp.abs(skew_gradient(g, x)).max())
        assert np.isfinite(riem) and riem > 1e-3 * float(jnp.abs(g).max()), (x.shape, riem)


# --- training -----------------------------------------------------------------------------------------------
SPEC = ActivationSpec(a_bits=4, kv_bits=4, down_bits=4, high_bits=8, high_residual=8, high_head=2)
WINDOWS = np.random.default_rng(9).integers(0, 49152, (8, 32))


def _train(fused, tmp_path=None, **kw):
    from resq_jax.learn.train import CayleyConfig, train_rotations

    config, _, _, weights = fused
    cc = CayleyConfig(**{"steps": 12, "lr": 1.5, "batch_size": 4, "checkpoint_every": 4, **kw})
    return train_rotations(config, stack_layers(config, weights), identity_rotations((56, 8), (14, 2), config.num_layers),
                           WINDOWS, StraightThrough(FakeQuantHooks(SPEC)), cc, progress=False,
                           checkpoint_dir=None if tmp_path is None else tmp_path / "ck")


def _sample(config, weights, temperature: float) -> np.ndarray:
    """16 windows of 32 tokens sampled from the float model itself at ``temperature``: text this model predicts
    (unlike uniform random tokens, on which a random model's loss means nothing)."""
    model = from_weights(config, weights)
    rng = np.random.default_rng(0)
    tokens = np.zeros((16, 32), np.int64)
    tokens[:, 0] = rng.integers(0, config.vocab_size, 16)
    for i in range(31):  # causal: the logits at i ignore the zeros after it, so one compile serves every i
        logits = np.asarray(model(jnp.asarray(tokens, jnp.int32))[0][:, i], np.float64) / temperature
        p = np.exp(logits - logits.max(-1, keepdims=True))
        tokens[:, i + 1] = [rng.choice(p.shape[1], p=row / row.sum()) for row in p]
    return tokens


@pytest.fixture(scope="module")
def sampled(fused):
    """Temperature 3: flatter than the model (loss 3.46 nats), so the training test's quantizers cost loss."""
    config, _, _, weights = fused
    return _sample(config, weights, 3.0)


@pytest.fixture(scope="module")
def sampled_t1(tiny):
    """Temperature 1: the model's own distribution, on which the float model's expected loss is minimal, so any
    perturbation (here QuaRot's quantizers) costs loss; this random model is near deterministic (0.06 nats)."""
    return _sample(tiny.config, tiny.weights, 1.0)


def test_training_lowers_the_quantized_loss_and_stays_orthogonal(fused, sampled):
    """12 steps on 16 sampled windows: the loss under 4-bit activations and KV falls by more than 0.02 nats and
    closes at least half of its gap to the float loss; every block stays orthogonal."""
    from resq_jax.learn.train import CayleyConfig, train_rotations

    config, _, _, weights = fused
    frozen = stack_layers(config, weights)
    start = identity_rotations((56, 8), (14, 2), config.num_layers)
    hooks = StraightThrough(FakeQuantHooks(SPEC))
    tokens = jnp.asarray(sampled, jnp.int32)
    float_loss = float(rotated_nll(start, frozen, tokens, config=config).mean())
    before = float(rotated_nll(start, frozen, tokens, config=config, hooks=hooks).mean())
    assert before > float_loss + 0.01, (before, float_loss)
    res = train_rotations(config, frozen, start, sampled, hooks,
                          CayleyConfig(steps=12, lr=0.3, batch_size=4, checkpoint_every=4), progress=False)
    after = float(rotated_nll(res.rotations, frozen, tokens, config=config, hooks=hooks).mean())
    assert np.all(np.isfinite(res.losses)), res.losses
    change, se = res.loss_change()  # the training's own paired measurement on its 16 windows
    np.testing.assert_allclose(change, after - before, rtol=1e-4, atol=1e-6)
    assert 0 < se < -change, (change, se)  # measured: -0.045, se 0.022 (16 windows)
    assert after < before - 0.02 and after < float_loss + 0.5 * (before - float_loss), (float_loss, before, after)
    for x in jax.tree.leaves(res.rotations):
        eye = jnp.eye(x.shape[-1])
        assert float(jnp.abs(jnp.swapaxes(x, -1, -2) @ x - eye).max()) <= 1e-5


def test_window_losses_are_each_windows_loss_and_the_change_its_paired_mean(fused, sampled):
    """learn.train.window_losses on 13 windows in passes of 4 (the last padded): each window's loss under the
    quantizers equals the decoder's own forward (float64 log-softmax), window by window in order; TrainResult's
    loss_change is the mean of end - start and its standard error (std with ddof 1 over sqrt(n))."""
    from resq_jax.learn.train import TrainResult, loss_pass, window_losses

    config, _, _, weights = fused
    frozen = stack_layers(config, weights)
    start = identity_rotations((56, 8), (14, 2), config.num_layers)
    hooks = FakeQuantHooks(SPEC)
    arrays = {k: v for k, v in frozen.items() if k != "down_hadamard"}
    windows = sampled[:13]
    got = window_losses(loss_pass(config, hooks, hadamard=frozen["down_hadamard"]), start, windows, arrays, chunk=4)
    logits = np.asarray(from_weights(config, weights)(jnp.asarray(windows, jnp.int32), hooks=hooks)[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ref = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1)[..., 0].mean(-1)
    assert got.shape == (13,) and np.ptp(ref) > 0.05
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    end = got + np.array([-0.3, 0.1, -0.2, 0.0, -0.1, -0.4, 0.2, -0.1, 0.0, -0.3, -0.2, 0.1, -0.2])
    res = TrainResult(rotations=start, losses=np.zeros(1), seconds=0.0, resumed_from=0, start_window_losses=got,
                      end_window_losses=end)
    mean, se = res.loss_change()
    np.testing.assert_allclose(mean, -1.4 / 13, rtol=1e-9)
    d = end - got
    np.testing.assert_allclose(se, np.sqrt(((d - d.mean()) ** 2).sum() / 12 / 13), rtol=1e-9)


def _kl64(logits_ref, logits) -> np.ndarray:
    """[B, T, V] logits of the reference and of the model -> [B] mean over positions 0..T-2 of KL(ref || model),
    in float64."""
    def log_softmax(z):
        z = np.asarray(z, np.float64)[:, :-1]
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    lp_ref, lp = log_softmax(logits_ref), log_softmax(logits)
    return (np.exp(lp_ref) * (lp_ref - lp)).sum(-1).mean(-1)


def test_kl_loss_is_zero_in_float_and_the_decoders_divergence_under_quantizers(fused):
    """rotated_kl: with identity hooks the rotated model is the float model whatever the rotations (KL ~ 0); with
    4-bit quantizers it is the KL, in float64 from the decoder's own logits, of the fake-quantized model from the
    float one; its gradient reaches the rotations (non-zero Riemannian part) and only through the quantized model."""
    config, _, _, weights = fused
    frozen = stack_layers(config, weights)
    rots = _random_rotations(config, np.random.default_rng(3))
    assert float(jnp.abs(rotated_kl(rots, frozen, TOKENS, config=config)).max()) < 1e-5
    model, hooks = from_weights(config, weights), FakeQuantHooks(SPEC)
    ref = _kl64(model(TOKENS)[0], model(TOKENS, hooks=hooks)[0])
    assert ref.min() > 0.01, ref
    ident = identity_rotations((56, 8), (14, 2), config.num_layers)
    np.testing.assert_allclose(rotated_kl(ident, frozen, TOKENS, config=config, hooks=hooks), ref, rtol=2e-3)
    grads = jax.grad(lambda r: rotated_kl(r, frozen, TOKENS, config=config, hooks=StraightThrough(hooks)).mean())(rots)
    for g, x in zip(jax.tree.leaves(grads), jax.tree.leaves(rots)):
        assert float(jnp.abs(skew_gradient(g, x)).max()) > 0, x.shape


def test_training_on_the_kl_loss_lowers_it(tiny, sampled_t1):
    """12 full-batch steps of --cayley-loss kl at lr 0.05 on QuaRot's fused tiny model: the KL of the 4-bit model
    from the float one falls by more than 15% (measured: 0.0125 -> 0.0090; the quantized loss of this tiny model is
    rough in the rotations, so larger rates wander) and every block stays orthogonal."""
    from resq_jax.learn.train import CayleyConfig, train_rotations

    view = fusion.FoldedWeights(tiny.config, tiny.weights)
    config = view.untied_config
    frozen = stack_layers(config, dict(apply_transforms(config, view, quarot_transforms(config, seed=0))))
    start = identity_rotations((64,), (16,), config.num_layers)
    hooks = FakeQuantHooks(dataclasses.replace(SPEC, high_residual=0, high_head=0))
    tokens = jnp.asarray(sampled_t1, jnp.int32)
    before = float(rotated_kl(start, frozen, tokens, config=config, hooks=hooks).mean())
    res = train_rotations(config, frozen, start, sampled_t1, StraightThrough(hooks),
                          CayleyConfig(steps=12, lr=0.05, batch_size=16, loss="kl"), progress=False)
    after = float(rotated_kl(res.rotations, frozen, tokens, config=config, hooks=hooks).mean())
    assert np.all(np.isfinite(res.losses)) and res.losses[0] == pytest.approx(before, rel=1e-4)
    assert after < 0.85 * before, (before, after)
    for x in jax.tree.leaves(res.rotations):
        assert float(jnp.abs(jnp.swapaxes(x, -1, -2) @ x - jnp.eye(x.shape[-1])).max()) <= 1e-5


def test_an_interrupted_run_resumes_to_the_same_rotations(fused, tmp_path):
    """A run stopped after its step-8 checkpoint (steps=8, same schedule) then resumed to 12 equals an
    uninterrupted 12-step run."""
    whole = _train(fused)
    from resq_jax.learn import train as train_mod

    config, _, _, weights = fused
    # the first run: the same 12-step schedule, interrupted after step 8 (an exception from the progress hook)
    calls = {"n": 0}
    real = train_mod.batch_indices

    def stop_after_8(n, b, seed, step):
        if step == 8:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(n, b, seed, step)

    train_mod.batch_indices = stop_after_8
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(fused, tmp_path)
    finally:
        train_mod.batch_indices = real
    assert calls["n"] == 8
    resumed = _train(fused, tmp_path)
    assert resumed.resumed_from == 8
    for a, b in zip(jax.tree.leaves(whole.rotations), jax.tree.leaves(resumed.rotations)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(whole.losses, resumed.losses)


def test_a_diverging_learning_rate_stops_with_orthogonal_rotations(fused):
    from resq_jax.learn.train import CayleyConfig, DivergedError

    with pytest.raises(DivergedError, match=r"diverged at step \d+ of 12 .*lower --cayley-lr") as e:
        _train(fused, diverge_factor=1.0001, lr=50.0)  # any rise counts as divergence here
    for x in jax.tree.leaves(e.value.rotations):
        assert float(jnp.abs(jnp.swapaxes(x, -1, -2) @ x - jnp.eye(x.shape[-1])).max()) <= 1e-5
    with pytest.raises(ValueError, match="learning rate must be a positive number"):
        CayleyConfig(lr=float("nan"))


def test_quantize_py_reports_a_diverged_training_in_one_line(tmp_path, monkeypatch, capsys):
    """quantize.py whose rotation training diverges (forced here: a bound of half the first step's loss, which that
    step already passes) exits with status 2 and one line naming the method, the step and the fix, and writes no
    --json."""
    from resq_jax.cli.quantize import main
    from resq_jax.pipeline import quantize as pipeline

    real = pipeline.cayley_config
    monkeypatch.setattr(pipeline, "cayley_config",
                        lambda qc: dataclasses.replace(real(qc), diverge_factor=0.5))
    model = write_random_model(tmp_path / "model", "tiny-llama-smol")
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as e:
        main(["--quiet", "--model", str(model), "--method", "spinquant", "--weight-quantizer", "rtn",
              "--cayley-steps", "12", "--cayley-batch", "4", "--calib-windows", "8", "--calib-seq-len", "32",
              "--eval-windows", "2", "--eval-seq-len", "32", "--json", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and not out.exists()
    assert len(lines) == 1 and lines[0].startswith("error: spinquant: the rotation training diverged at step "), lines
    assert "diverged at step 1 of 12" in lines[0] and "lower --cayley-lr (now 1.5)" in lines[0], lines


# --- the pipeline: --cayley-steps and the spinquant recipe ----------------------------------------------------
def test_pipeline_refines_resq_rotations_inside_its_subspaces(tiny, sampled):
    """quantize_model(resq, cayley_steps=4): the refined residual basis is the recipe's times a rotation that is
    block-diagonal over (low 56, high 8) channels, every value head's likewise over (14, 2), all orthogonal in
    float64 (the float32 rotations are re-orthonormalized); the keys' rotation is untouched. (On this model ResQ's
    quantized loss is already at the float loss, so its value is checked on spinquant below.)"""
    from resq_jax.pipeline.quantize import quantize_model
    from resq_jax.pipeline.recipes import QuantConfig

    m = tiny
    common = dict(method="resq", weight_quantizer="rtn", seed=0)
    base = quantize_model(m.config, m.weights, QuantConfig(**common), sampled, progress=False)
    qc = QuantConfig(**common, cayley_steps=4, cayley_lr=0.3, cayley_batch=4)
    tuned = quantize_model(m.config, m.weights, qc, sampled, stats=base.stats, progress=False)
    losses = tuned.details["cayley"]["losses"]
    assert len(losses) == 4 and np.all(np.isfinite(losses)) and tuned.seconds["train"] > 0
    measured = tuned.details["cayley"]["window_losses"]  # every training window, before and after
    start, end = np.asarray(measured["start"]), np.asarray(measured["end"])
    assert start.shape == end.shape == (len(sampled),) and np.all(np.isfinite(start)) and np.any(start != end)
    change = tuned.details["cayley"]["loss_change"]
    np.testing.assert_allclose(change["mean"], end.mean() - start.mean(), rtol=1e-9, atol=1e-12)
    assert 0 < change["se"] < np.inf
    u0, u1 = base.transforms.residual, tuned.transforms.residual
    np.testing.assert_allclose(u1.T @ u1, np.eye(64), atol=1e-12)
    q1 = u0.T @ u1
    assert np.abs(q1[:56, 56:]).max() < 1e-12 and np.abs(q1[56:, :56]).max() < 1e-12
    assert np.abs(q1 - np.eye(64)).max() > 1e-3  # it moved
    q2 = np.einsum("lkih,lkij->lkhj", base.transforms.value, tuned.transforms.value)
    assert np.abs(q2[..., :14, 14:]).max() < 1e-12 and np.abs(q2[..., 14:, :14]).max() < 1e-12
    assert np.abs(q2 - np.eye(16)).max() > 1e-4
    np.testing.assert_array_equal(base.transforms.key, tuned.transforms.key)


def test_spinquant_lowers_the_quantized_loss_of_quarot(tiny, sampled_t1):
    """spinquant (QuaRot's transforms refined: 24 full-batch steps at the default training, lr 1.5, momentum 0,
    gradient clipped to norm 1) against quarot: the loss under the recipe's activation and KV quantizers, on the
    fused model of each run's transforms, closes more than half of its gap to the float loss (measured: float
    0.0609, quarot 0.0865, spinquant 0.0659; 12 steps reach 0.0733); the float loss is the same for both (the
    refined basis is orthogonal: an invariance)."""
    from resq_jax.pipeline.quantize import activation_spec, prepare, quantize_model
    from resq_jax.pipeline.recipes import QuantConfig

    m, windows = tiny, sampled_t1
    base = quantize_model(m.config, m.weights, QuantConfig(method="quarot", weight_quantizer="rtn"), windows,
                          progress=False)
    qc = QuantConfig(method="spinquant", weight_quantizer="rtn", cayley_steps=24, cayley_batch=16)
    assert QuantConfig(method="spinquant").cayley_steps_used == 100 and base.qconfig.cayley_steps_used == 0
    tuned = quantize_model(m.config, m.weights, qc, windows, progress=False)
    config, folded = prepare(m.config, m.weights, qc.recipe)
    ident = identity_rotations((64,), (16,), config.num_layers)
    tokens = jnp.asarray(windows, jnp.int32)
    loss = {}
    for name, q in (("quarot", base), ("spinquant", tuned)):
        frozen = stack_layers(config, apply_transforms(config, folded, q.transforms))
        loss[name] = float(rotated_nll(ident, frozen, tokens, config=config,
                                       hooks=FakeQuantHooks(activation_spec(config, qc))).mean())
        loss[name + " float"] = float(rotated_nll(ident, frozen, tokens, config=config).mean())
    fp = loss["quarot float"]
    assert abs(fp - loss["spinquant float"]) < 1e-5, loss
    assert loss["quarot"] > fp + 0.01 and loss["spinquant"] < fp + 0.5 * (loss["quarot"] - fp), loss


def test_pipeline_trains_against_rtn_weights(tiny, sampled_t1):
    """--cayley-weights rtn: the first step's loss is that of quarot's model with RTN weights (clipping search off,
    as the estimator quantizes) on the step's windows, computed by the decoder from quantize_model's weights; with
    float weights (the default) it is not."""
    from resq_jax.learn.train import batch_indices
    from resq_jax.pipeline.quantize import quantize_model
    from resq_jax.pipeline.recipes import QuantConfig

    m, windows = tiny, sampled_t1
    common = dict(method="quarot", weight_quantizer="rtn", cayley_steps=1, cayley_batch=4, cayley_lr=0.3)
    first = {}
    for mode in ("float", "rtn"):
        q = quantize_model(m.config, m.weights, QuantConfig(**common, cayley_weights=mode), windows, progress=False)
        assert q.details["cayley"]["weights"] == mode and q.qconfig.to_dict()["cayley_weights"] == mode
        first[mode] = q.details["cayley"]["losses"][0]
    rtn = quantize_model(m.config, m.weights, QuantConfig(method="quarot", weight_quantizer="rtn", clip_search=False),
                         windows, progress=False)
    tokens = np.asarray(windows[batch_indices(len(windows), 4, 0, 0)])
    logits = np.asarray(from_weights(rtn.config, rtn.weights)(jnp.asarray(tokens), hooks=rtn.hooks)[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ref = float(-np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean())
    assert abs(first["rtn"] - ref) <= 1e-4 * ref + 1e-6, (first, ref)
    assert abs(first["float"] - ref) > 10 * abs(first["rtn"] - ref) + 1e-5, (first, ref)


def test_pipeline_stores_the_frozen_model_in_bfloat16_when_asked(tiny, sampled):
    """--cayley-dtype bfloat16 reaches the training (recorded in the JSON details and the qconfig) and only rounds
    the stored model: the first step's loss is within 1% of the float32 run's, and not equal to it."""
    from resq_jax.pipeline.quantize import quantize_model
    from resq_jax.pipeline.recipes import QuantConfig, QuantConfigError

    m = tiny
    common = {"method": "quarot", "weight_quantizer": "rtn", "cayley_steps": 1, "cayley_batch": 4, "cayley_lr": 0.3}
    first = {}
    for dtype in ("float32", "bfloat16"):
        q = quantize_model(m.config, m.weights, QuantConfig(**common, cayley_dtype=dtype), sampled, progress=False)
        assert q.details["cayley"]["dtype"] == dtype and q.qconfig.to_dict()["cayley_dtype"] == dtype
        first[dtype] = q.details["cayley"]["losses"][0]
    assert 0 < abs(first["bfloat16"] - first["float32"]) < 1e-2 * first["float32"], first
    with pytest.raises(QuantConfigError, match="--cayley-dtype must be one of float32, bfloat16"):
        QuantConfig(**common, cayley_dtype="float16")


def test_pipeline_micro_batches_change_the_memory_not_the_training(tiny, sampled, tmp_path):
    """--cayley-micro-batch 2 reaches the training (JSON details, qconfig), the first step's loss is the whole
    batch's, and the training fingerprint (what a resumed run must match, checked by the CLI before the model
    loads and by the pipeline after) leaves it out."""
    from resq_jax.pipeline.quantize import check_training_folder, quantize_model, training_fingerprint
    from resq_jax.pipeline.recipes import QuantConfig, QuantConfigError

    common = {"method": "quarot", "weight_quantizer": "rtn", "cayley_steps": 1, "cayley_batch": 4, "cayley_lr": 0.3}
    whole = quantize_model(tiny.config, tiny.weights, QuantConfig(**common), sampled, progress=False)
    qc = QuantConfig(**common, cayley_micro_batch=2)
    micro = quantize_model(tiny.config, tiny.weights, qc, sampled, progress=False)
    assert micro.details["cayley"]["micro_batch"] == 2 and qc.to_dict()["cayley_micro_batch"] == 2
    assert whole.details["cayley"]["micro_batch"] == 4
    np.testing.assert_allclose(micro.details["cayley"]["losses"], whole.details["cayley"]["losses"], rtol=1e-4)
    assert training_fingerprint(tiny.config, qc, sampled) == training_fingerprint(tiny.config, QuantConfig(**common),
                                                                                sampled)
    check_training_folder(tmp_path, training_fingerprint(tiny.config, QuantConfig(**common), sampled), write=True)
    check_training_folder(tmp_path, training_fingerprint(None, qc), write=False)  # the CLI's early check
    with pytest.raises(QuantConfigError, match="holds a training of other settings .qconfig differ"):
        check_training_folder(tmp_path, training_fingerprint(None, QuantConfig(**common, seed=1)), write=False)


def test_pipeline_trains_on_the_kl_loss_when_asked(tiny, sampled, tmp_path):
    """--cayley-loss kl reaches the training: recorded in the JSON details and the qconfig, the first step's loss is
    the KL of quarot's fake-quantized model (float weights) from the float model on that step's windows, computed
    in float64 from the decoder's logits; the fingerprint tells it from the cross-entropy's (which keeps the key
    out, so earlier checkpoints resume), and an unknown loss is refused."""
    from resq_jax.learn.train import batch_indices
    from resq_jax.pipeline.quantize import check_training_folder, quantize_model, training_fingerprint
    from resq_jax.pipeline.recipes import QuantConfig, QuantConfigError

    common = {"method": "quarot", "weight_quantizer": "rtn", "cayley_steps": 1, "cayley_batch": 4, "cayley_lr": 0.3}
    qc = QuantConfig(**common, cayley_loss="kl")
    q = quantize_model(tiny.config, tiny.weights, qc, sampled, progress=False)
    assert q.details["cayley"]["loss"] == "kl" and qc.to_dict()["cayley_loss"] == "kl"
    assert QuantConfig(**common).to_dict()["cayley_loss"] == "ce"
    base = quantize_model(tiny.config, tiny.weights, QuantConfig(method="quarot", weight_quantizer="rtn"), sampled,
                          progress=False)
    tokens = jnp.asarray(sampled[batch_indices(len(sampled), 4, 0, 0)], jnp.int32)
    model = from_weights(tiny.config, tiny.weights)  # the float model (before any transform)
    fused_float = from_weights(base.config, dict(apply_transforms(
        base.config, fusion.FoldedWeights(tiny.config, tiny.weights), base.transforms)))
    ref = float(_kl64(model(tokens)[0], fused_float(tokens, hooks=base.hooks)[0]).mean())
    assert ref > 1e-3 and abs(q.details["cayley"]["losses"][0] - ref) <= 2e-3 * ref, (q.details["cayley"], ref)
    ce = training_fingerprint(tiny.config, QuantConfig(**common), sampled)
    assert "cayley_loss" not in ce["qconfig"] and training_fingerprint(tiny.config, qc, sampled) != ce
    check_training_folder(tmp_path, ce, write=True)
    with pytest.raises(QuantConfigError, match="holds a training of other settings"):
        check_training_folder(tmp_path, training_fingerprint(None, qc), write=False)
    with pytest.raises(QuantConfigError, match="--cayley-loss must be one of ce, kl"):
        QuantConfig(**common, cayley_loss="mse")


def test_cayley_momentum_reaches_the_optimizer():
    """The default momentum 0 (the papers' code) gives plain bounded steps: two updates of the pipeline's optimizer
    equal, in float64, X <- (I + a/2 W)^-1 (I - a/2 W) X with W = G X^T - X G^T of that step's gradient alone and
    a = min(lr_t, 1/||W||_1), lr_t the cosine decay; the fingerprint leaves out only 0.9 (earlier versions'
    momentum, so their checkpoints resume with it), the JSON settings name the value, and values outside [0, 1)
    are refused."""
    import optax

    from resq_jax.learn.train import optimizer
    from resq_jax.pipeline.quantize import cayley_config, training_fingerprint
    from resq_jax.pipeline.recipes import QuantConfig, QuantConfigError

    common = {"method": "spinquant", "cayley_steps": 4, "cayley_lr": 1.5}
    qc = QuantConfig(**common, cayley_clip=0.0)  # no clipping: the gradients as they are
    old = QuantConfig(**common, cayley_momentum=0.9)
    assert cayley_config(qc).momentum == 0.0 and cayley_config(old).momentum == 0.9
    assert qc.to_dict()["cayley_momentum"] == 0.0 and old.to_dict()["cayley_momentum"] == 0.9
    assert "cayley_momentum" not in training_fingerprint(None, old)["qconfig"]
    assert training_fingerprint(None, QuantConfig(**common))["qconfig"]["cayley_momentum"] == 0.0
    rng = np.random.default_rng(3)
    x0, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    grads = [rng.standard_normal((8, 8)) * s for s in (0.02, 5.0)]
    with jax.enable_x64(True):
        opt = optimizer(cayley_config(qc))
        x = jnp.asarray(x0)
        state = opt.init(x)
        for g in grads:
            upd, state = opt.update(jnp.asarray(g), state, x)
            x = optax.apply_updates(x, upd)
        got = np.asarray(x)
    want, limits = x0, []
    for t, g in enumerate(grads):
        w = g @ want.T - want @ g.T
        lr_t, bound = 1.5 * 0.5 * (1 + np.cos(np.pi * t / 4)), 1 / (np.abs(w).sum(axis=0).max() + 1e-8)
        a, which = min((lr_t, "lr"), (bound, "bound"))
        limits.append(which)
        eye = np.eye(8)
        want = np.linalg.solve(eye + a / 2 * w, (eye - a / 2 * w) @ want)
    assert limits == ["lr", "bound"]  # both branches of the step size
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    for bad in (1.0, -0.1, True):
        with pytest.raises(QuantConfigError, match="--cayley-momentum must be a number in"):
            QuantConfig(**common, cayley_momentum=bad)


def test_cayley_clip_reaches_the_optimizer():
    """--cayley-clip c (default 1.0, the Hugging Face Trainer's max_grad_norm under the papers' code): before each
    step the gradient of all the rotations together is scaled by min(1, c / ||G||), ||G|| its global Frobenius
    norm; two momentum-0 updates of a pytree (one 8 x 8 matrix and a stack of two 4 x 4) equal the float64 closed
    form, the first clipped (||G|| = 5.6) and lr-limited, the second not clipped; 0 turns clipping off, and the
    fingerprint leaves the clip out only at 0 (earlier versions' training); bad values are refused."""
    import optax

    from resq_jax.learn.train import optimizer
    from resq_jax.pipeline.quantize import cayley_config, training_fingerprint
    from resq_jax.pipeline.recipes import QuantConfig, QuantConfigError

    common = {"method": "spinquant", "cayley_steps": 4, "cayley_lr": 0.5, "cayley_momentum": 0.0}
    assert cayley_config(QuantConfig(**common)).clip == 1.0 and QuantConfig(**common).to_dict()["cayley_clip"] == 1.0
    assert cayley_config(QuantConfig(**common, cayley_clip=0)).clip is None
    assert cayley_config(QuantConfig(**common, cayley_clip=2.5)).clip == 2.5
    assert training_fingerprint(None, QuantConfig(**common))["qconfig"]["cayley_clip"] == 1.0
    assert "cayley_clip" not in training_fingerprint(None, QuantConfig(**common, cayley_clip=0))["qconfig"]
    rng = np.random.default_rng(5)
    x0 = {"a": np.linalg.qr(rng.standard_normal((8, 8)))[0],
          "b": np.stack([np.linalg.qr(rng.standard_normal((4, 4)))[0] for _ in range(2)])}
    grads = [{"a": rng.standard_normal((8, 8)) * 0.6, "b": rng.standard_normal((2, 4, 4)) * 0.6},
             {"a": rng.standard_normal((8, 8)) * 0.02, "b": rng.standard_normal((2, 4, 4)) * 0.02}]
    with jax.enable_x64(True):
        opt = optimizer(cayley_config(QuantConfig(**common)))
        x = jax.tree.map(jnp.asarray, x0)
        state = opt.init(x)
        for g in grads:
            upd, state = opt.update(jax.tree.map(jnp.asarray, g), state, x)
            x = optax.apply_updates(x, upd)
        got = jax.tree.map(np.asarray, x)
    want, scales = dict(x0), []
    for t, g in enumerate(grads):
        norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
        scales.append(min(1.0, 1.0 / norm))
        lr_t = 0.5 * 0.5 * (1 + np.cos(np.pi * t / 4))
        for k in want:
            xs, gs = want[k].reshape(-1, *want[k].shape[-2:]), g[k].reshape(-1, *want[k].shape[-2:]) * scales[-1]
            out = []
            for xi, gi in zip(xs, gs):
                w = gi @ xi.T - xi @ gi.T
                a = min(lr_t, 1 / (np.abs(w).sum(axis=0).max() + 1e-8))
                if t == 0:
                    assert a == lr_t  # the clipped step is lr-limited, not bound-limited
                eye = np.eye(len(xi))
                out.append(np.linalg.solve(eye + a / 2 * w, (eye - a / 2 * w) @ xi))
            want[k] = np.stack(out).reshape(want[k].shape)
    assert scales[0] < 0.3 and scales[1] == 1.0, scales
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-10)
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(QuantConfigError, match="--cayley-clip must be a number >= 0"):
            QuantConfig(**common, cayley_clip=bad)


def test_the_table_labels_the_training_settings_that_differ_from_the_defaults():
    """The printed table's config column names the training: steps@lr, then /w-rtn, /kl, /mMU, /clipC, /bf16 only
    when they differ from the defaults."""
    from resq_jax.cli.table import format_table
    from resq_jax.pipeline.recipes import QuantConfig

    def label(**kw):
        cfg = QuantConfig(method="spinquant", **kw).to_dict()
        table = format_table("m", [{"method": "spinquant", "config": cfg, "ppl": {"t": 1.0}}])
        return table.splitlines()[-1].split("  ")[1].strip()

    assert label() == "W4A4KV4 gptq+clip cayley100@1.5"
    assert label(cayley_steps=30, cayley_lr=0.1, cayley_weights="rtn", cayley_loss="kl", cayley_momentum=0.9,
                 cayley_clip=0.0, cayley_dtype="bfloat16") == "W4A4KV4 gptq+clip cayley30@0.1/w-rtn/kl/m0.9/clip0/bf16"
    assert label(cayley_momentum=0.0, cayley_loss="ce", cayley_clip=1.0) == label()


def test_a_killed_quantize_run_resumes_its_rotation_training(tmp_path):
    """quantize.py --cayley-checkpoint, killed (SIGKILL) once a checkpoint is on disk, then run again: it resumes
    there and ends with the uninterrupted run's losses and perplexity, to the last digit; the same folder with
    other settings is refused in one line before any work."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = write_random_model(tmp_path / "model", "tiny-llama-smol")
    base = [sys.executable, os.path.join(root, "scripts", "quantize.py"), "--quiet", "--model", str(model),
            "--method", "spinquant", "--weight-quantizer", "rtn", "--cayley-steps", "60", "--cayley-batch", "4",
            "--cayley-lr", "0.3", "--calib-windows", "8", "--calib-seq-len", "32", "--eval-windows", "2",
            "--eval-seq-len", "32"]
    run = lambda *a: subprocess.run([*base, *a], capture_output=True, text=True, timeout=900, cwd=root)  # noqa: E731
    whole = run("--json", str(tmp_path / "whole.json"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    ck = tmp_path / "ck"
    proc = subprocess.Popen([*base, "--cayley-checkpoint", str(ck), "--json", str(tmp_path / "resumed.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=root)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.isdigit() for p in (ck / "spinquant").glob("*")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "resumed.json").exists()
    resumed = run("--cayley-checkpoint", str(ck), "--json", str(tmp_path / "resumed.json"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["runs"][1] for n in ("whole", "resumed"))
    assert 10 <= b["cayley"]["resumed_from"] < 60 and a["cayley"]["resumed_from"] == 0, b["cayley"]["resumed_from"]
    assert a["cayley"]["losses"] == b["cayley"]["losses"] and a["ppl"] == b["ppl"]
    other = run("--cayley-checkpoint", str(ck), "--cayley-lr", "0.5")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1 and "holds a training of other settings (qconfig" in lines[0], \
        other.stderr[-2000:]


def test_compile_only_step_memory_counts_the_frozen_model():
    """scripts/benchmark.py --section cayley compiles a training step against the shapes alone: its frozen model
    is tiny-qwen2's fused arrays counted by hand (float32; the linears and vocabulary tables at 2 bytes in
    bfloat16), XLA's arguments are that plus the rotations and optimizer state (ResQ's blocks: 56 + 8 residual,
    14 + 2 per value head and layer), and the step keeps temporaries."""
    from resq_jax.cli.benchmark import cayley_step

    out = cayley_step("tiny-qwen2", 2, 16, method="resq", micro_batches=(None, 1))
    n, d, f, v, hd = 4, 64, 96, 512, 16
    big = 2 * v * d + n * (d * 64 + 2 * d * 32 + 64 * d + 2 * d * f + f * d)  # embed, head, q k v o gate up down
    small = d + n * (2 * d + hd * hd + 64 + 32 + 32)  # final norm; norms, key rotation, q/k/v biases
    rot = 56 ** 2 + 8 ** 2 + n * (14 ** 2 + 2 ** 2)
    assert [(r["dtype"], r["micro_batch"]) for r in out["runs"]] == [
        ("float32", 2), ("float32", 1), ("bfloat16", 2), ("bfloat16", 1)]
    for got in out["runs"]:
        width = 4 if got["dtype"] == "float32" else 2
        assert got["frozen_model_gb"] * 1e9 == width * big + 4 * small, got
        extra = got["arguments_gb"] * 1e9 - got["frozen_model_gb"] * 1e9
        assert 2 * 4 * rot <= extra <= 3 * 4 * rot + 4 * 2 * 16 + 64, (got, extra)  # rotations, momentum, tokens
        assert got["temporaries_gb"] > 0


def test_micro_batches_sum_to_the_whole_batch_step(fused):
    """CayleyConfig(micro_batch=m): the 4 windows of a step pass 1 or 2 at a time and their losses and gradients
    are summed: the step's loss and its update of the rotations are those of the whole batch (to float rounding;
    one step, since Cayley SGD at lr 1.5 amplifies rounding over steps), and a micro-batch that does not divide
    the batch is refused. Without gradient clipping, which would hide a wrong scale of the summed gradient."""
    from resq_jax.learn.train import CayleyConfig

    whole = _train(fused, steps=1, clip=None)
    moved = max(float(jnp.abs(x - jnp.eye(x.shape[-1])).max()) for x in jax.tree.leaves(whole.rotations))
    assert moved > 1e-2, moved
    for m in (1, 2):
        micro = _train(fused, steps=1, micro_batch=m, clip=None)
        # here 1e-7 and 1e-5 of the update; the margins allow a 4-bit rounding flip on another CPU, while a
        # wrong scale of the summed loss or gradient (a factor B / m) would miss by the whole update
        np.testing.assert_allclose(micro.losses, whole.losses, rtol=1e-4)
        for a, b in zip(jax.tree.leaves(whole.rotations), jax.tree.leaves(micro.rotations)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-2 * moved)
    with pytest.raises(ValueError, match="micro-batch .3. must divide the batch .4 windows"):
        CayleyConfig(batch_size=4, micro_batch=3)
