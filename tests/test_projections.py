"""Tests for resq_jax.transforms: Hadamard constructions, fast transforms, rotations, PCA helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from resq_jax.transforms.finite_fields import quadratic_character_table
from resq_jax.transforms.fwht import fwht, hadamard_transform, hadamard_transform_np
from resq_jax.transforms.hadamard import (
    _GS_ORDERS,
    MAX_K,
    HadamardSizeError,
    _choose_k,
    goethals_seidel,
    hadamard_construction,
    hadamard_factor,
    hadamard_k,
    hadamard_matrix,
    has_hadamard,
    paley1,
    paley2,
    substitute_orthogonal,
    sylvester,
)
from resq_jax.transforms.orthogonal import block_diag_rotation, random_orthogonal, randomized_hadamard
from resq_jax.transforms.pca import damped_eigh, high_rank

# K values from docs/algorithms.md, Constructions (plus powers of two), and the extra orders our size rule uses.
TABLE_K = [1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172]
EXTRA_K = [76, 148, 292, 344, 476, 924]
EXPECTED_CONSTRUCTION = {
    12: "Paley I, q=11",
    20: "Paley I, q=19",
    28: "Paley I, q=27=GF(3^3)",
    36: "Paley II, q=17",
    40: "doubling",
    44: "Paley I, q=43",
    52: "Paley II, q=25=GF(5^2)",
    60: "Paley I, q=59",
    108: "Paley I, q=107",
    140: "Paley I, q=139",
    156: "Goethals-Seidel",
    172: "Goethals-Seidel",
    76: "Paley II, q=37",
    148: "Paley II, q=73",
    344: "Paley I, q=343=GF(7^3)",
    924: "Paley II, q=461",
}

# n -> (K, m, true Hadamard?) for the sizes of the target models (docs/algorithms.md, Hadamard sizes).
SIZES = {
    576: (36, 4, True),
    896: (28, 5, True),
    1536: (12, 7, True),
    4864: (76, 6, True),  # 38*128 in the reference; 76 = 2*(37+1) is a true Hadamard
    8960: (140, 6, True),
    11008: (172, 6, True),
    14336: (28, 9, True),
    18944: (148, 7, True),  # 37*512 in the reference
    29568: (924, 5, True),  # 231*128 in the reference
    37: (37, 0, False),
    38: (19, 1, False),
    231: (231, 0, False),
    6: (3, 1, False),
}
POW2 = [1 << a for a in range(0, 15)]  # 1 .. 16384


def _exact_hadamard(h: np.ndarray) -> bool:
    k = h.shape[0]
    return (
        h.dtype == np.int64
        and h.shape == (k, k)
        and set(np.unique(h).tolist()) <= {-1, 1}
        and np.array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))
    )


# ------------------------------------------------------------------------------- constructions


@pytest.mark.parametrize("k", TABLE_K + EXTRA_K)
def test_true_hadamard_exact(k):
    assert has_hadamard(k)
    h = hadamard_k(k)
    assert _exact_hadamard(h)
    if k in EXPECTED_CONSTRUCTION:
        assert hadamard_construction(k).startswith(EXPECTED_CONSTRUCTION[k])


def test_sylvester_matches_scipy_and_popcount():
    for n in [1, 2, 4, 64, 1024]:
        np.testing.assert_array_equal(sylvester(n), scipy.linalg.hadamard(n))
    i = np.arange(64)
    pop = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    np.testing.assert_array_equal(sylvester(64), (-1) ** pop)
    np.testing.assert_allclose(hadamard_matrix(2), np.array([[1, 1], [1, -1]]) / math.sqrt(2), atol=0)


def test_paley1_hand_worked_q3():
    # GF(3): squares {1}; Q[a, b] = chi(a - b) = [[0, -1, 1], [1, 0, -1], [-1, 1, 0]]; H = I + [[0, 1], [-1, Q]].
    expected = np.array([[1, 1, 1, 1], [-1, 1, -1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1]])
    np.testing.assert_array_equal(paley1(3), expected)


@pytest.mark.parametrize("q", [7, 11, 19, 27, 43, 343])
def test_paley1_is_skew_hadamard(q):
    h = paley1(q)
    assert _exact_hadamard(h)
    np.testing.assert_array_equal(h + h.T, 2 * np.eye(q + 1, dtype=np.int64))


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 37, 49, 125])
def test_paley2_is_symmetric_hadamard(q):
    h = paley2(q)
    assert _exact_hadamard(h)
    np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize("q", [9, 25, 27, 49, 81, 121, 125, 343])
def test_gf_prime_power_jacobsthal(q):
    """Quadratic character over GF(p^k): Q Q^T = qI - J, Q J = 0, Q^T = chi(-1) Q.
    These fail for any wrong field arithmetic (e.g. Z_q instead of GF(p^k))."""
    jac = quadratic_character_table(q)
    ones = np.ones((q, q), dtype=np.int64)
    np.testing.assert_array_equal(jac @ jac.T, q * np.eye(q, dtype=np.int64) - ones)
    np.testing.assert_array_equal(jac.sum(1), np.zeros(q, dtype=np.int64))
    np.testing.assert_array_equal(jac.T, (1 if q % 4 == 1 else -1) * jac)


def test_gs_orders_all_build():
    for n in _GS_ORDERS:
        assert _exact_hadamard(goethals_seidel(n))


def test_gs_search_fails_cleanly_outside_budget():
    with pytest.raises(HadamardSizeError, match="Goethals-Seidel"):
        goethals_seidel(29)  # needs more orbits than the budget allows


@pytest.mark.parametrize("k", [3, 6, 37, 38, 92, 231])
def test_no_hadamard_orders(k):
    assert not has_hadamard(k)
    with pytest.raises(HadamardSizeError, match="substitute"):
        hadamard_k(k)
    s = substitute_orthogonal(k)
    assert s.dtype == np.float64 and s.shape == (k, k)
    np.testing.assert_allclose(s @ s.T, k * np.eye(k), atol=1e-10 * k)
    np.testing.assert_array_equal(s, substitute_orthogonal(k))  # deterministic


def test_substitute_is_pinned():
    """The substitute's seed derivation is part of the checkpoint contract: pin its values."""
    expected = np.array(
        [
            [1.6990708331121793, -0.26988583467061183, -0.2007982577405309],
            [0.33637334949682757, 1.3734166445907932, 1.000289803061719],
            [0.00335765033476478, -1.0202393624072317, 1.3996786665442589],
        ]
    )
    np.testing.assert_allclose(substitute_orthogonal(3), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- size rule


@pytest.mark.parametrize("n", sorted(SIZES))
def test_hadamard_factor_sizes(n):
    k_exp, m_exp, true_exp = SIZES[n]
    k, hk, m = hadamard_factor(n)
    assert (k, m) == (k_exp, m_exp) and k * 2**m == n
    assert hk.dtype == np.float64 and hk.shape == (k, k)
    assert has_hadamard(k) == true_exp
    if true_exp:
        np.testing.assert_array_equal(hk, hadamard_k(k).astype(np.float64))
    else:
        np.testing.assert_array_equal(hk, substitute_orthogonal(k))
    np.testing.assert_allclose(hk @ hk.T, k * np.eye(k), atol=1e-10 * k)


@pytest.mark.parametrize("n", POW2)
def test_hadamard_factor_pow2(n):
    k, hk, m = hadamard_factor(n)
    assert k == 1 and 2**m == n
    np.testing.assert_array_equal(hk, np.ones((1, 1)))


def test_hadamard_factor_prefers_largest_power_of_two():
    # 40 * 2 = 80 = 20 * 4: K = 20 (not 40); 312 = 39 * 8: K = 156 (GS) not 312 (Paley I, q = 311).
    assert hadamard_factor(80)[0] == 20
    assert hadamard_factor(312)[0] == 156
    assert hadamard_factor(23 * 4)[0] == 23  # no construction for 92 -> substitute K = odd part


@pytest.mark.parametrize("bad", [0, -4, 1031, 2053 * 2])
def test_impossible_sizes_error(bad):
    with pytest.raises(HadamardSizeError) as err:
        hadamard_factor(bad)
    msg = str(err.value)
    assert "K*2^m" in msg
    if bad > 0:
        nearby = [int(v) for v in msg.split("Nearby sizes that work: [")[1].rstrip("]").split(",")]
        assert len(nearby) == 6 and all(abs(v - bad) < 64 for v in nearby)
        for v in nearby:
            k, m, _ = _choose_k(v)  # the rule hadamard_factor uses, without building H_K
            assert k * 2**m == v and k <= MAX_K
        k, hk, m = hadamard_factor(nearby[2])
        assert k * 2**m == nearby[2] and hk.shape == (k, k)


@pytest.mark.parametrize("bad", [2.0, "64", True, None])
def test_non_int_sizes_error(bad):
    with pytest.raises(HadamardSizeError, match="positive int"):
        hadamard_factor(bad)


# ------------------------------------------------------------------------------- dense matrix


DENSE_N = [1, 2, 4, 8, 12, 20, 28, 36, 40, 64, 128, 156, 172, 576, 896, 1024, 1536]


@pytest.mark.parametrize("n", DENSE_N)
def test_dense_orthogonal_and_kron_layout(n):
    h = hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-10)
    k, hk, m = hadamard_factor(n)
    ref = np.kron(hk, scipy.linalg.hadamard(2**m).astype(np.float64)) / math.sqrt(n)  # K index slowest
    np.testing.assert_array_equal(h, ref)


@pytest.mark.parametrize("n", [2048, 4096, 4864])
def test_dense_orthogonal_large(n):
    h = hadamard_matrix(n)
    x = np.random.default_rng(n).standard_normal((n, 4))
    np.testing.assert_allclose(h.T @ (h @ x), x, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(h @ x, axis=0), np.linalg.norm(x, axis=0), rtol=1e-12)


# ------------------------------------------------------------------------------- fast transform


def test_fwht_hand_worked():
    np.testing.assert_array_equal(np.asarray(fwht(jnp.array([1.0, 2.0, 3.0, 4.0]))), [10.0, -2.0, -4.0, 0.0])
    np.testing.assert_array_equal(np.asarray(fwht(jnp.array([1.0, 0.0, 0.0, 0.0]))), [1.0, 1.0, 1.0, 1.0])
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(fwht(jnp.asarray(x), axis=0)), scipy.linalg.hadamard(8) @ x, atol=1e-5)
    with pytest.raises(HadamardSizeError, match="power-of-two"):
        fwht(jnp.ones(12))


FAST_N = sorted(set([1, 2, 16, 256, 2048, 4096, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172]
                    + [576, 896, 1536, 4864, 37, 38, 231, 6, 92]))


@pytest.mark.parametrize("n", FAST_N)
def test_fast_matches_dense(n):
    rng = np.random.default_rng(n + 1)
    x = rng.standard_normal((3, n))
    h = hadamard_matrix(n)
    y_ref, yt_ref = x @ h.T, x @ h
    scale = np.linalg.norm(x, axis=-1, keepdims=True)
    y32 = np.asarray(hadamard_transform(jnp.asarray(x, jnp.float32)))
    yt32 = np.asarray(hadamard_transform(jnp.asarray(x, jnp.float32), n, transpose=True))
    assert y32.dtype == np.float32
    assert np.max(np.abs(y32 - y_ref) / scale) < 1e-5
    assert np.max(np.abs(yt32 - yt_ref) / scale) < 1e-5
    np.testing.assert_allclose(hadamard_transform_np(x), y_ref, atol=1e-12)
    np.testing.assert_allclose(hadamard_transform_np(x, transpose=True), yt_ref, atol=1e-12)
    with jax.enable_x64(True):
        y64 = np.asarray(hadamard_transform(jnp.asarray(x, jnp.float64)))
        yt64 = np.asarray(hadamard_transform(jnp.asarray(x, jnp.float64), transpose=True))
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, y_ref, atol=1e-12)
    np.testing.assert_allclose(yt64, yt_ref, atol=1e-12)


@pytest.mark.parametrize("n", [8192, 8960, 11008, 14336, 16384, 18944, 29568])
def test_fast_large_orthogonal_and_structure(n):
    """No dense n x n: check ||Hx|| = ||x||, H^T H x = x, and H x = vec(H_K X S_M^T)/sqrt(n) with
    scipy's Sylvester S_M (independent reference) when M is small enough to build."""
    k, hk, m = hadamard_factor(n)
    if k > 1:  # +-1 entries: float64 products and sums are exact integers here (and BLAS is fast)
        assert set(np.unique(hk).tolist()) == {-1.0, 1.0}
        np.testing.assert_array_equal(hk @ hk.T, k * np.eye(k))
    x = np.random.default_rng(n).standard_normal((2, n))
    with jax.enable_x64(True):
        y = np.asarray(hadamard_transform(jnp.asarray(x)))
        back = np.asarray(hadamard_transform(jnp.asarray(y), transpose=True))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(back, x, atol=1e-10)
    np.testing.assert_allclose(hadamard_transform_np(x), y, atol=1e-10)
    big = 2**m
    if big <= 2048:
        s = scipy.linalg.hadamard(big).astype(np.float64)
        ref = np.einsum("kj,bjq,pq->bkp", hk, x.reshape(2, k, big), s).reshape(2, n) / math.sqrt(n)
        np.testing.assert_allclose(y, ref, atol=1e-10)
    y32 = np.asarray(hadamard_transform(jnp.asarray(x, jnp.float32)))
    assert np.max(np.abs(y32 - y)) / np.linalg.norm(x[0]) < 1e-5


def test_leading_batch_shapes_and_dtypes():
    x = np.random.default_rng(3).standard_normal((2, 3, 576)).astype(np.float32)
    y = hadamard_transform(jnp.asarray(x))
    assert y.shape == (2, 3, 576)
    np.testing.assert_allclose(np.asarray(y).reshape(6, 576), x.reshape(6, 576) @ hadamard_matrix(576).T, atol=1e-5)
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = hadamard_transform(xb)
    assert yb.dtype == jnp.bfloat16
    ref = np.asarray(xb, np.float64).reshape(6, 576) @ hadamard_matrix(576).T
    # computed in float32 and rounded once to bfloat16 (relative error <= 2^-8 per element)
    np.testing.assert_allclose(np.asarray(yb, np.float64).reshape(6, 576), ref, rtol=2**-8, atol=1e-6)
    with pytest.raises(HadamardSizeError, match="does not match"):
        hadamard_transform(jnp.asarray(x), n=512)


def test_jit_vmap_grad():
    n = 896
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, n)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, n)), jnp.float32)
    eager = hadamard_transform(x)
    jitted = jax.jit(hadamard_transform)(x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)
    vm = jax.vmap(hadamard_transform)(x)
    np.testing.assert_allclose(np.asarray(vm), np.asarray(eager), atol=1e-6)
    g = jax.jit(jax.grad(lambda v: jnp.sum(w * hadamard_transform(v))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(hadamard_transform(w, transpose=True)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w) @ hadamard_matrix(n), atol=1e-5)


def _count_primitives(jaxpr, name):
    """Occurrences of a primitive in a jaxpr, including nested (pjit, custom_jvp, ...) jaxprs."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _count_primitives(inner, name)
    return count


def test_fwht_is_n_log_n_butterflies():
    for n in [1024, 16384]:
        jaxpr = jax.make_jaxpr(hadamard_transform)(jnp.ones((2, n))).jaxpr
        assert _count_primitives(jaxpr, "dot_general") == 0
        assert _count_primitives(jaxpr, "add") == int(math.log2(n))
        assert _count_primitives(jaxpr, "sub") == int(math.log2(n))
    jaxpr = jax.make_jaxpr(hadamard_transform)(jnp.ones((2, 576))).jaxpr
    assert _count_primitives(jaxpr, "dot_general") == 1  # only the K = 36 factor
    assert _count_primitives(jaxpr, "sub") == 4  # 576 = 36 * 2^4


# ------------------------------------------------------------------------------- rotations, PCA


def test_random_orthogonal():
    q = random_orthogonal(64, 7)
    np.testing.assert_allclose(q @ q.T, np.eye(64), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(64, 7))
    assert not np.allclose(q, random_orthogonal(64, 8))
    # convention: Q = G R^-1 with diag(R) > 0, i.e. Q^T G is upper triangular with positive diagonal
    g = np.random.default_rng(7).standard_normal((64, 64))
    r = q.T @ g
    np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-10)
    assert np.all(np.diag(r) > 0)
    np.testing.assert_allclose(random_orthogonal(2, 0), [[0.19264633241404083, -0.9812682561906395],
                                                            [0.9812682561906395, 0.19264633241404108]], atol=1e-12)


def test_random_orthogonal_haar_moments():
    """Haar measure: E[Q_ij^2] = 1/n and E[trace(Q)] = 0 (a sign-convention bug breaks the trace)."""
    n, reps = 8, 400
    qs = np.stack([random_orthogonal(n, s) for s in range(reps)])
    assert abs(np.mean(qs**2) * n - 1) < 1e-12  # rows are unit norm
    traces = np.trace(qs, axis1=1, axis2=2)
    assert abs(np.mean(traces)) < 4 * np.std(traces) / math.sqrt(reps)
    assert abs(np.var(qs[:, 0, 0]) * n - 1) < 0.25


def test_block_diag_rotation():
    n, r = 64, 8
    b = block_diag_rotation(n, r, 3)
    np.testing.assert_allclose(b @ b.T, np.eye(n), atol=1e-12)
    assert np.all(b[: n - r, n - r :] == 0) and np.all(b[n - r :, : n - r] == 0)
    np.testing.assert_array_equal(b, block_diag_rotation(n, r, 3))
    assert not np.allclose(b[: n - r, : n - r], random_orthogonal(n - r, 3))
    assert not np.allclose(b[: r, : r], b[n - r :, n - r :])
    np.testing.assert_allclose(block_diag_rotation(n, 0, 1) @ block_diag_rotation(n, 0, 1).T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(block_diag_rotation(n, n, 1) @ block_diag_rotation(n, n, 1).T, np.eye(n), atol=1e-12)
    with pytest.raises(ValueError, match="r=65"):
        block_diag_rotation(n, 65, 0)


def test_damped_eigh_hand_worked():
    # diag(3, 1): mean diag 2, damping 0.02 -> eigenvalues [1.02, 3.02], last column = e_0 (high variance)
    w, v = damped_eigh(np.diag([3.0, 1.0]))
    np.testing.assert_allclose(w, [1.02, 3.02], rtol=1e-15)
    np.testing.assert_allclose(np.abs(v[:, -1]), [1.0, 0.0], atol=1e-15)


def test_damped_eigh_reconstructs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 32)) * np.linspace(0.1, 3.0, 32)
    h = x.T @ x
    h_asym = h + 1e-9 * rng.standard_normal(h.shape)  # symmetrized internally
    w, v = damped_eigh(h_asym, damp=0.05)
    damped = 0.5 * (h_asym + h_asym.T) + 0.05 * np.mean(np.diag(h_asym)) * np.eye(32)
    assert np.all(np.diff(w) >= 0)
    np.testing.assert_allclose(v @ np.diag(w) @ v.T, damped, rtol=0, atol=1e-10 * np.abs(damped).max())
    np.testing.assert_allclose(v.T @ v, np.eye(32), atol=1e-12)
    np.testing.assert_allclose(w, np.sort(np.linalg.eigvalsh(h)) + 0.05 * np.mean(np.diag(h)), rtol=1e-9)
    for bad, match in [(np.ones((3, 4)), "square"), (np.full((2, 2), np.nan), "NaN"), (np.eye(2), "damp")]:
        with pytest.raises(ValueError, match=match):
            damped_eigh(bad, damp=-1.0 if match == "damp" else 0.01)


def test_high_rank():
    assert high_rank(576, 0.125) == 72
    assert high_rank(64, 0.125) == 8
    assert high_rank(100, 0.0) == 0
    assert high_rank(100, 0.333) == 33
    for bad in [1.0, -0.1, 1.5, float("nan")]:
        with pytest.raises(ValueError, match="fraction"):
            high_rank(64, bad)


def test_randomized_hadamard_flips_signs_before_mixing():
    """QuaRot's R = diag(s) H (its code draws s, builds diag(s) and applies the Hadamard to it): every
    *row* of R is the row of H times one sign. Independent reference: Sylvester's H from scipy for n = 2^k."""
    import scipy.linalg

    for n in (64, 576):
        r = randomized_hadamard(n, 11)
        np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-10)
        np.testing.assert_array_equal(r, randomized_hadamard(n, 11))
        assert not np.array_equal(r, randomized_hadamard(n, 12))
        ratio = r / hadamard_matrix(n)
        np.testing.assert_array_equal(ratio, np.broadcast_to(ratio[:, :1], ratio.shape))  # one sign per row
        assert set(np.unique(ratio)) == {-1.0, 1.0}
    n = 64
    h = scipy.linalg.hadamard(n) / np.sqrt(n)
    r = randomized_hadamard(n, 3)
    s = np.sign(r[:, 0] / h[:, 0])
    np.testing.assert_allclose(r, np.diag(s) @ h, atol=1e-15)


def test_randomized_hadamard_spreads_a_constant_channel_pattern():
    """The point of the randomization: x = ones (the same value on every channel, as an LLM's massive
    activations often are) is concentrated by a plain Sylvester-type Hadamard onto one output, and spread
    by x diag(s) H. The old H diag(s) order kept max|y| near |y|_2 (nearly all energy in one channel)."""
    for n in (64, 576):
        y = np.ones(n) @ randomized_hadamard(n, 0)
        np.testing.assert_allclose(np.linalg.norm(y), np.sqrt(n), rtol=1e-12)  # orthogonal
        # each y_j = sum_i s_i H_ij is a sum of n random +-1/sqrt(n) terms: about N(0, 1), so max|y| < 5
        assert np.max(np.abs(y)) < 5.0, (n, np.max(np.abs(y)))
        old = np.ones(n) @ (hadamard_matrix(n) * np.random.default_rng(0).choice([-1.0, 1.0], n)[None, :])
        assert np.max(np.abs(old)) > 0.9 * np.sqrt(n)  # the defect this guards against
