"""Cayley SGD (resq_jax/transforms/cayley.py): one step equals the float64 closed form, orthogonality holds after
every step, a Stiefel problem with a known optimum (Brockett's cost) is solved, and bad input is reported."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resq_jax.transforms.cayley import cayley_sgd, orthogonality_error


def _orthogonal(rng, *shape) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal(shape))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _closed_form(x, g, m, lr, momentum, bound):
    """NumPy float64: W = G X^T - X G^T, M' = mu M + W, a = min(lr, 1/||M'||_1), (I + a/2 M')^-1 (I - a/2 M') X."""
    w = g @ x.T - x @ g.T
    m = momentum * m + w
    a = min(lr, 1.0 / (np.abs(m).sum(axis=0).max() + 1e-8)) if bound else lr
    eye = np.eye(x.shape[0])
    return np.linalg.solve(eye + a / 2 * m, (eye - a / 2 * m) @ x), m


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("bound", [False, True])
def test_steps_equal_the_float64_closed_form(bound, momentum):
    """Three steps with momentum 0.9 or none on random 6 x 6 cases (two batched matrices), in float64."""
    rng = np.random.default_rng(0)
    x0 = _orthogonal(rng, 2, 6, 6)
    grads = [rng.standard_normal((2, 6, 6)) for _ in range(3)]
    with jax.enable_x64(True):
        opt = cayley_sgd(0.3, momentum=momentum, step_bound=bound)
        x = jnp.asarray(x0)
        state = opt.init(x)
        for g in grads:
            upd, state = opt.update(jnp.asarray(g), state, x)
            x = optax.apply_updates(x, upd)
        got = np.asarray(x)
    for b in range(2):
        want, m = x0[b], np.zeros((6, 6))
        for g in grads:
            want, m = _closed_form(want, g[b], m, 0.3, momentum, bound)
        np.testing.assert_allclose(got[b], want, rtol=0, atol=1e-12)
        assert np.abs(want - x0[b]).max() > 0.05  # the steps moved it
    assert int(state.count) == 3 and int(state.skipped) == 0


@pytest.mark.parametrize("shape", [(64, 64), (3, 128, 128), (512, 512)])
def test_orthogonal_after_every_one_of_200_steps(shape):
    """float32, a large learning rate and random gradients of scale 10: max |R^T R - I| <= 1e-5 after every step."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(_orthogonal(rng, *shape), jnp.float32)
    opt = cayley_sgd(optax.cosine_decay_schedule(1.5, 200), momentum=0.9)
    state = opt.init(x)

    @jax.jit
    def step(x, state, g):
        upd, state = opt.update(g, state, x)
        return optax.apply_updates(x, upd), state

    worst, start = 0.0, x
    for k in range(200):
        g = jnp.asarray(10 * rng.standard_normal(shape), jnp.float32)
        x, state = step(x, state, g)
        worst = max(worst, float(jnp.max(orthogonality_error(x))))
    assert worst <= 1e-5, worst
    assert float(jnp.abs(x - start).max()) > 0.1  # it moved
    assert x.dtype == jnp.float32 and int(state.count) == 200


def _brockett(n: int, seed: int):
    """A = Q diag(lam) Q^T, N = diag(n..1) / n: tr(X^T A X N) over orthogonal X has its minimum at the eigenvalues
    in ascending order paired with N's entries in descending order."""
    rng = np.random.default_rng(seed)
    lam = np.sort(rng.uniform(-1, 1, n))
    q = _orthogonal(rng, n, n)
    a = q @ np.diag(lam) @ q.T
    nd = np.arange(n, 0, -1) / n
    return a, nd, float(np.sum(lam * nd))  # lam ascending x nd descending


@pytest.mark.parametrize("n,seed", [(8, 0), (16, 1)])
def test_brockett_cost_reaches_its_minimum(n, seed):
    a, nd, optimum = _brockett(n, seed)
    a32, n32 = jnp.asarray(a, jnp.float32), jnp.asarray(nd, jnp.float32)

    def cost(x):
        return jnp.trace(jnp.matmul(jnp.matmul(x.T, a32, precision="highest"), x, precision="highest") * n32)

    opt = optax.chain(optax.clip_by_global_norm(10.0), cayley_sgd(optax.cosine_decay_schedule(0.5, 3000, 0.01),
                                                                  momentum=0.9, step_bound=False))
    x = jnp.asarray(_orthogonal(np.random.default_rng(seed + 10), n, n), jnp.float32)
    state = opt.init(x)

    @jax.jit
    def step(x, state):
        f, g = jax.value_and_grad(cost)(x)
        upd, state = opt.update(g, state, x)
        return optax.apply_updates(x, upd), state, f

    first = float(cost(x))
    for _ in range(3000):
        x, state, f = step(x, state)
    final = float(cost(x))
    assert first - optimum > 0.1  # a real distance to cover
    assert abs(final - optimum) <= 1e-4, (final, optimum)
    assert float(orthogonality_error(x)) <= 1e-5


def test_a_non_orthogonal_start_is_refused():
    rng = np.random.default_rng(2)
    good = _orthogonal(rng, 8, 8)
    params = {"r1": jnp.asarray(good), "r2": jnp.asarray(good + 0.01 * rng.standard_normal((8, 8)))}
    with pytest.raises(ValueError, match=r"\['r2'\] is not orthogonal \(max \|X\^T X - I\| = .*start from an "):
        cayley_sgd(1.0).init(params)
    with pytest.raises(ValueError, match="needs square matrices"):
        cayley_sgd(1.0).init({"r": jnp.ones((4, 3))})
    with pytest.raises(ValueError, match="needs the parameters"):
        opt = cayley_sgd(1.0)
        opt.update(params, opt.init({"r1": params["r1"]}))


def test_a_non_finite_gradient_is_skipped():
    """A NaN gradient (a diverging loss): no update, the count of skipped steps rises, the matrix stays put."""
    x = jnp.asarray(_orthogonal(np.random.default_rng(3), 16, 16), jnp.float32)
    opt = cayley_sgd(1.0)
    state = opt.init(x)
    upd, state = opt.update(jnp.full((16, 16), jnp.nan), state, x)
    assert float(jnp.abs(upd).max()) == 0.0 and int(state.skipped) == 1 and int(state.count) == 0
    upd, state = opt.update(jnp.ones((16, 16)), state, x)
    assert float(jnp.abs(upd).max()) > 0 and int(state.count) == 1


def test_inject_hyperparams_sets_the_learning_rate():
    """optax.inject_hyperparams(cayley_sgd): a learning rate of 0 leaves the matrix where it is."""
    x = jnp.asarray(_orthogonal(np.random.default_rng(4), 8, 8), jnp.float32)
    opt = optax.inject_hyperparams(cayley_sgd)(learning_rate=0.5)
    state = opt.init(x)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    upd, _ = opt.update(jnp.ones((8, 8)), state, x)
    assert float(jnp.abs(upd).max()) == 0.0


def test_a_drifted_matrix_is_reorthonormalized():
    """A start 5e-5 from orthogonal (accepted at init, above the drift bound): the first step repairs it by QR."""
    rng = np.random.default_rng(5)
    x = _orthogonal(rng, 32, 32)
    x = jnp.asarray(x + 1e-5 * rng.standard_normal((32, 32)), jnp.float32)
    assert 4e-6 < float(orthogonality_error(x)) < 1e-4
    opt = cayley_sgd(0.1)
    state = opt.init(x)
    upd, state = opt.update(jnp.asarray(rng.standard_normal((32, 32)), jnp.float32), state, x)
    y = optax.apply_updates(x, upd)
    assert int(state.repaired) == 1 and float(orthogonality_error(y)) <= 2e-6
