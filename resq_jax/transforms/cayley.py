"""Cayley SGD: gradient descent with momentum on the orthogonal group, as an optax GradientTransformation.

The parameters are square orthogonal matrices X [..., n, n] (any pytree of them; leading axes batch
independent matrices, e.g. one rotation per layer). With G = dL/dX, the Euclidean gradient:

    W = G X^T - X G^T                          skew: the Riemannian gradient is W X (canonical metric)
    M <- momentum * M + W                      momentum, kept as a skew matrix
    a = min(lr_t, 1 / (||M||_1 + eps))         lr_t from a float or an optax schedule; the bound keeps a step
                                               a moderate rotation whatever the gradient's scale (SpinQuant's
                                               SGDG bounds its step the same way), off with step_bound=False
    X <- (I + a/2 M)^-1 (I - a/2 M) X          the exact Cayley retraction, by one linear solve

The Cayley transform of a skew matrix is orthogonal, so X stays orthogonal up to rounding; d/da of the
retraction at a = 0 is -W X, the descent direction. When a matrix drifts (max |X^T X - I| > ``drift_tol``)
it is re-orthonormalized by QR (signs fixed so that R has a positive diagonal: the change is the rounding).
A step whose gradient has a NaN or an infinity is skipped (zero update, ``CayleyState.skipped`` counts it),
so the rotations stay orthogonal when training diverges; the training loop decides to stop.

Composes with ``optax.chain`` as its last element (the retraction needs the parameters, so nothing may
rescale its output), e.g. ``optax.chain(optax.clip_by_global_norm(1.0), cayley_sgd(schedule))``; the
learning rate may be a float, an optax schedule, or set by ``optax.inject_hyperparams``.

Numerics: float32 (or the parameters' dtype), every product at ``EXACT`` precision (no TF32).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resq_jax.util.precision import exact_matmul

INIT_TOL = 1e-4  # an initial matrix farther than this from orthogonal is refused
DRIFT_TOL = 4e-6  # re-orthonormalize a matrix whose max |X^T X - I| passes this


class CayleyState(NamedTuple):
    count: jax.Array  # [] int32: steps taken (the schedule's argument)
    momentum: Any  # like the parameters: skew [..., n, n]
    skipped: jax.Array  # [] int32: steps skipped for a non-finite gradient
    repaired: jax.Array  # [] int32: steps after which a matrix was re-orthonormalized



def _t(x):
    return jnp.swapaxes(x, -1, -2)


def skew_gradient(g: jax.Array, x: jax.Array) -> jax.Array:
    """g, x: [..., n, n] -> W = G X^T - X G^T [..., n, n], skew."""
    return exact_matmul(g, _t(x)) - exact_matmul(x, _t(g))


def cayley_retract(a: jax.Array, x: jax.Array, step) -> jax.Array:
    """a: [..., n, n] skew; x: [..., n, n]; step: scalar or [..., 1, 1] -> (I + step/2 A)^-1 (I - step/2 A) X."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    half = 0.5 * jnp.asarray(step, a.dtype) * a
    return jnp.linalg.solve(eye + half, exact_matmul(eye - half, x))


def orthogonality_error(x: jax.Array) -> jax.Array:
    """x: [..., n, n] -> max |X^T X - I| per matrix: [...]."""
    return jnp.max(jnp.abs(exact_matmul(_t(x), x) - jnp.eye(x.shape[-1], dtype=x.dtype)), axis=(-2, -1))


def reorthonormalize(x: jax.Array) -> jax.Array:
    """x: [..., n, n] nearly orthogonal -> Q of X = QR with R's diagonal made positive (Q = X up to rounding).
    A NumPy array is factored by NumPy in its own dtype (float64 stays float64), a JAX array by JAX."""
    xp = np if isinstance(x, np.ndarray) else jnp
    q, r = xp.linalg.qr(x)
    return q * xp.where(xp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(x.dtype)[..., None, :]


def check_orthogonal(params, tol: float = INIT_TOL) -> None:
    """ValueError naming the first parameter that is not a square orthogonal matrix [..., n, n] within ``tol``."""
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path) or "the parameter"
        shape = np.shape(x)
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(f"cayley_sgd: {name} has shape {tuple(shape)}; it needs square matrices [..., n, n]")
        err = float(np.max(np.asarray(orthogonality_error(jnp.asarray(x)))))
        if not err <= tol:
            raise ValueError(f"cayley_sgd: {name} is not orthogonal (max |X^T X - I| = {err:.3g} > {tol:g}); start "
                             "from an orthogonal matrix (a Hadamard matrix, or Q of the QR of a Gaussian one)")


def cayley_sgd(learning_rate: float | optax.Schedule, momentum: float = 0.9, *, step_bound: bool = True,
               drift_tol: float = DRIFT_TOL, eps: float = 1e-8) -> optax.GradientTransformation:
    """Cayley SGD with momentum (module docstring). ``init`` checks that the parameters are orthogonal when
    they are concrete arrays (``check_orthogonal``); ``update(grads, state, params)`` needs ``params`` and returns
    the updates Y - X for ``optax.apply_updates``."""

    def init(params):
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
            check_orthogonal(params)
        zero = jnp.zeros([], jnp.int32)
        return CayleyState(count=zero, momentum=jax.tree.map(jnp.zeros_like, params), skipped=zero, repaired=zero)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("cayley_sgd needs the parameters: call update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

        def one(g, x, m):
            m = momentum * m + skew_gradient(g, x)
            step = jnp.asarray(lr, x.dtype)
            if step_bound:  # 1-norm (max column sum) of each matrix: [..., 1, 1]
                norm = jnp.max(jnp.sum(jnp.abs(m), axis=-2), axis=-1)[..., None, None]
                step = jnp.minimum(step, 1.0 / (norm + eps))
            y = cayley_retract(m, x, step)
            drift = orthogonality_error(y) > drift_tol
            y = jax.lax.cond(jnp.any(drift), lambda: jnp.where(drift[..., None, None], reorthonormalize(y), y),
                             lambda: y)
            return y - x, m, jnp.any(drift)

        out = jax.tree.map(one, grads, params, state.momentum)
        is_out = lambda t: isinstance(t, tuple) and len(t) == 3  # noqa: E731
        updates = jax.tree.map(lambda t: t[0], out, is_leaf=is_out)
        new_m = jax.tree.map(lambda t: t[1], out, is_leaf=is_out)
        drifted = jnp.any(jnp.asarray([t[2] for t in jax.tree.leaves(out, is_leaf=is_out)]))
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_m = jax.tree.map(lambda n, m: jnp.where(finite, n, m), new_m, state.momentum)
        state = CayleyState(count=state.count + finite.astype(jnp.int32), momentum=new_m,
                            skipped=state.skipped + (~finite).astype(jnp.int32),
                            repaired=state.repaired + (finite & drifted).astype(jnp.int32))
        return updates, state

    return optax.GradientTransformation(init, update)
