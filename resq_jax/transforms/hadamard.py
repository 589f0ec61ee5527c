"""Hadamard matrices of any LLM size, used by ResQ / QuaRot: the exact constructions and the choice of K
(the fast transform is in fwht.py, random rotations in orthogonal.py, the PCA helpers in pca.py).

Hadamard of size n (docs/algorithms.md, Hadamard sizes)
-------------------------------------------------------
``n = K * 2^m`` and ``H_n = (H_K ⊗ H_{2^m}) / sqrt(n)`` with the K index slowest
(``np.kron(H_K, H_2m)``). ``H_{2^m}`` is Sylvester's matrix in natural order
(``H_2 = [[1, 1], [1, -1]]``, ``H_{2^{m+1}} = kron(H_2, H_{2^m})``, so
``H[i, j] = (-1)^popcount(i & j)``, symmetric). ``H_K`` is unnormalized,
``H_K @ H_K.T == K * I``, and generally NOT symmetric.

``H_K`` comes from our own constructions (no stored tables), see :func:`hadamard_k`:

* Sylvester for K a power of two;
* Paley I for ``K = q + 1``, q a prime power ``≡ 3 (mod 4)`` (skew type ``I + S``);
* Paley II for ``K = 2 (q + 1)``, q a prime power ``≡ 1 (mod 4)``;
* Goethals-Seidel array for K = 4n, n in (39, 43, 73, 119) (K = 156, 172, 292, 476), with four
  circulants found on first use by a small deterministic search over sequences invariant
  under a multiplier subgroup of Z_n^* (:func:`goethals_seidel`);
* doubling ``kron(H_2, H_{K/2})``;
* GF(p^k) arithmetic is built here (polynomials over GF(p) modulo an irreducible
  polynomial found by search), so prime powers such as 25, 27, 343 work.

Sizes with no Hadamard matrix (K odd > 1, or K ≡ 2 mod 4 with K > 2) get a seeded
Haar-random orthogonal K x K matrix times sqrt(K) (:func:`substitute_orthogonal`), so
``H_K H_K^T = K I`` to float64 precision and the transform stays orthogonal.

Choice of K (:func:`hadamard_factor`): write ``n = odd * 2^a``. If ``odd == 1``, K = 1.
Otherwise take the smallest ``K = odd * 2^j`` with ``2 <= j <= a`` and ``K <= MAX_K``
that has a true Hadamard construction (largest power-of-two factor); if there is none,
use the substitute with ``K = odd`` (and ``m = a``) provided ``odd <= MAX_K``; otherwise
raise :class:`HadamardSizeError`. Examples: 576 = 36·16, 896 = 28·32, 1536 = 12·128,
4864 = 76·64 (Paley II, q = 37), 8960 = 140·64, 14336 = 28·512, 18944 = 148·128
(Paley II, q = 73), 29568 = 924·32 (Paley II, q = 461), 11008 = 172·64 (Goethals-Seidel), 37 -> substitute K = 37.

Transform convention (the numerics native kernels must match)
-------------------------------------------------------------
``hadamard_transform(x) == x @ hadamard_matrix(n).T`` along the last axis, i.e.
``y_i = sum_j H[i, j] x_j``: reshape ``x`` to ``[..., K, 2^m]``, unnormalized fast
Walsh-Hadamard transform on the last axis, then ``y[..., k, :] = sum_j H_K[k, j] z[..., j, :]``
(H_K cast to the compute dtype, float32 for float32/bfloat16/float16 inputs, float64
for float64 inputs), then multiply by ``1 / sqrt(n)`` and cast back to the input dtype.
``transpose=True`` computes ``x @ hadamard_matrix(n)`` (uses ``H_K^T``; the Sylvester
part is symmetric). Both are orthogonal and inverse to each other.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from resq_jax.transforms.finite_fields import is_prime_power, quadratic_character_table

MAX_K = 1024
"""Largest K (true Hadamard or substitute) hadamard_factor will use: the K-axis
product costs K multiply-adds per element."""

_SUBSTITUTE_SEED_TAG = 0x52455351  # "RESQ": seed of the substitute for order K is [tag, K]


class HadamardSizeError(ValueError):
    """No Hadamard-like orthogonal transform of this size is available."""


# ----------------------------------------------------------------------------------------
# Hadamard constructions (exact, integer)
# ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sylvester_cached(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int64)
    while h.shape[0] < n:
        h = np.kron(h2, h)
    h.setflags(write=False)
    return h


def sylvester(n: int) -> np.ndarray:
    """Sylvester Hadamard matrix [n, n] int64, n a power of two, natural order:
    H[i, j] = (-1)^popcount(i & j)."""
    if not isinstance(n, (int, np.integer)) or n < 1 or n & (n - 1):
        raise HadamardSizeError(f"Sylvester order must be a power of two, got {n!r}")
    return _sylvester_cached(int(n)).copy()


def paley1(q: int) -> np.ndarray:
    """Paley I Hadamard matrix of order q + 1 ([q+1, q+1] int64), q a prime power ≡ 3 mod 4.

    With the Jacobsthal matrix Q[a, b] = chi(a - b) (skew, Q Q^T = q I - J, Q J = 0) and
    S = [[0, 1^T], [-1, Q]] (skew, S S^T = q I), H = I + S.
    """
    if is_prime_power(q) is None or q % 4 != 3:
        raise HadamardSizeError(f"Paley I needs a prime power q ≡ 3 mod 4, got q={q}")
    jac = quadratic_character_table(q)
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return np.eye(q + 1, dtype=np.int64) + s


def paley2(q: int) -> np.ndarray:
    """Paley II Hadamard matrix of order 2 (q + 1), q a prime power ≡ 1 mod 4.

    C = [[0, 1^T], [1, Q]] is symmetric with C C^T = q I (conference matrix); every zero of C
    becomes [[1, -1], [-1, -1]] and every ±1 becomes ±[[1, 1], [1, -1]].
    """
    if is_prime_power(q) is None or q % 4 != 1:
        raise HadamardSizeError(f"Paley II needs a prime power q ≡ 1 mod 4, got q={q}")
    jac = quadratic_character_table(q)
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jac
    h2 = np.array([[1, 1], [1, -1]], dtype=np.int64)
    z = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    return np.kron(c, h2) + np.kron(np.eye(q + 1, dtype=np.int64), z)


# Odd n for which the multiplier-invariant Goethals-Seidel search below finds four circulants
# within its budget (checked by tests/test_projections.py); gives K = 4n = 156, 172, 292, 476,
# orders that Paley I/II and doubling do not reach. Only n values are listed: the matrices are
# searched for (deterministically) on first use.
_GS_ORDERS = (39, 43, 73, 119)
_GS_MAX_ORBITS = 10  # search budget: at most 2^10 sequences, ~5e5 pairs


def _multiplier_subgroups(n: int) -> list[frozenset[int]]:
    """All subgroups of the unit group Z_n^* generated by at most two elements (all subgroups
    when Z_n^* has rank <= 2), largest first, ties broken by sorted elements (deterministic)."""
    units = [u for u in range(1, n) if math.gcd(u, n) == 1]

    def generate(gens: tuple[int, ...]) -> frozenset[int]:
        group, frontier = {1}, [1]
        while frontier:
            x = frontier.pop()
            for g in gens:
                y = x * g % n
                if y not in group:
                    group.add(y)
                    frontier.append(y)
        return frozenset(group)

    subs = {generate((a,)) for a in units}
    subs |= {generate((a, b)) for a in units for b in units if b > a}
    return sorted(subs, key=lambda g: (-len(g), sorted(g)))


def _gs_circulants(n: int) -> tuple[np.ndarray, ...] | None:
    """Four ±1 sequences A, B, C, D of odd length n whose periodic autocorrelations sum to
    zero at every nonzero shift (so their circulants satisfy sum X X^T = 4n I).

    Search: sequences constant on the orbits of a multiplier subgroup G of Z_n^* acting on
    Z_n (then PAF(g s) = PAF(s), so only orbit representatives need checking); for each G
    with at most _GS_MAX_ORBITS orbits, largest G first, list all 2^t sequences, form all
    unordered pairs and match a pair's PAF vector v against another pair's -v
    (meet in the middle, by sorting). Deterministic: the first match in a fixed order."""
    for group in _multiplier_subgroups(n):
        seen: set[int] = set()
        orbs: list[list[int]] = []
        for x in range(n):
            if x not in seen:
                orb = sorted({x * g % n for g in group})
                seen.update(orb)
                orbs.append(orb)
        t = len(orbs)
        if t > _GS_MAX_ORBITS:
            continue
        count = 1 << t
        signs = 1 - 2 * ((np.arange(count)[:, None] >> np.arange(t)[None, :]) & 1)  # [2^t, t]
        seqs = np.zeros((count, n), dtype=np.int64)
        for j, orb in enumerate(orbs):
            seqs[:, orb] = signs[:, j : j + 1]
        reps = [orb[0] for orb in orbs if orb[0] != 0]
        paf = np.stack([(seqs * np.roll(seqs, -s, axis=1)).sum(1) for s in reps], axis=1)
        i, j = np.triu_indices(count)
        v = (paf[i] + paf[j]).astype(np.int16)  # [pairs, len(reps)], |v| <= 2n
        as_key = lambda a: np.ascontiguousarray(a).view(np.dtype((np.void, a.shape[1] * 2))).ravel()
        key, neg = as_key(v), as_key(-v)
        order = np.argsort(key, kind="stable")
        pos = np.minimum(np.searchsorted(key[order], neg), len(key) - 1)
        hits = np.nonzero(key[order][pos] == neg)[0]
        if len(hits):
            p = hits[0]
            q = order[pos[p]]
            return seqs[i[p]], seqs[j[p]], seqs[i[q]], seqs[j[q]]
    return None


def goethals_seidel(n: int) -> np.ndarray:
    """Hadamard matrix of order 4n (int64) from the Goethals-Seidel array

        [[ A,    B R,    C R,    D R  ],
         [-B R,  A,      D^T R, -C^T R],
         [-C R, -D^T R,  A,      B^T R],
         [-D R,  C^T R, -B^T R,  A    ]]

    with A..D circulant (first rows from :func:`_gs_circulants`) and R the back-identity.
    Raises HadamardSizeError if the bounded search finds no circulants for this n."""
    seqs = _gs_circulants(n)
    if seqs is None:
        raise HadamardSizeError(f"Goethals-Seidel search found no circulants of order {n} within budget")
    idx = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    a, b, c, d = (sq[idx] for sq in seqs)  # circulant: row i is the sequence shifted right by i
    r = np.eye(n, dtype=np.int64)[::-1]
    return np.block(
        [
            [a, b @ r, c @ r, d @ r],
            [-b @ r, a, d.T @ r, -c.T @ r],
            [-c @ r, -d.T @ r, a, b.T @ r],
            [-d @ r, c.T @ r, -b.T @ r, a],
        ]
    )


def _construction_plan(k: int) -> tuple[str, int] | None:
    """How to build a Hadamard matrix of order k: ('sylvester', k), ('paley1', q),
    ('paley2', q), ('gs', k // 4), ('double', k // 2); None if we have no construction.
    Preference order: Sylvester, Paley I, Paley II, Goethals-Seidel search, doubling."""
    if k < 1:
        return None
    if k & (k - 1) == 0:
        return ("sylvester", k)
    if k % 4:
        return None
    if is_prime_power(k - 1) is not None:  # k ≡ 0 mod 4 => k - 1 ≡ 3 mod 4
        return ("paley1", k - 1)
    q = k // 2 - 1
    if q % 4 == 1 and is_prime_power(q) is not None:
        return ("paley2", q)
    if k // 4 in _GS_ORDERS:
        return ("gs", k // 4)
    if _construction_plan(k // 2) is not None:
        return ("double", k // 2)
    return None


def has_hadamard(k: int) -> bool:
    """True if :func:`hadamard_k` can construct an exact Hadamard matrix of order k."""
    return _construction_plan(int(k)) is not None


def hadamard_construction(k: int) -> str:
    """Human-readable description of how H_k is built (e.g. 'Paley II, q=17')."""
    plan = _construction_plan(int(k))
    if plan is None:
        return f"none (substitute: seeded Haar-random orthogonal {k}x{k} times sqrt({k}))"
    kind, arg = plan
    if kind == "sylvester":
        return f"Sylvester 2^{arg.bit_length() - 1}"
    if kind == "paley1":
        p, e = is_prime_power(arg)
        return f"Paley I, q={arg}" + (f"=GF({p}^{e})" if e > 1 else "")
    if kind == "paley2":
        p, e = is_prime_power(arg)
        return f"Paley II, q={arg}" + (f"=GF({p}^{e})" if e > 1 else "")
    if kind == "gs":
        return f"Goethals-Seidel, multiplier-invariant circulants of order {arg}"
    return f"doubling kron(H_2, H_{arg}) [{hadamard_construction(arg)}]"


@functools.lru_cache(maxsize=None)
def _hadamard_k_cached(k: int) -> np.ndarray:
    plan = _construction_plan(k)
    if plan is None:
        raise HadamardSizeError(
            f"no Hadamard construction for order {k}: a Hadamard matrix needs order 1, 2 or a "
            f"multiple of 4, and we build Sylvester, Paley I (q+1), Paley II (2(q+1)) and doubling; "
            f"use substitute_orthogonal({k}) or hadamard_factor(n) which falls back to it"
        )
    kind, arg = plan
    if kind == "sylvester":
        h = sylvester(arg)
    elif kind == "paley1":
        h = paley1(arg)
    elif kind == "paley2":
        h = paley2(arg)
    elif kind == "gs":
        h = goethals_seidel(arg)
    else:
        h = np.kron(np.array([[1, 1], [1, -1]], dtype=np.int64), _hadamard_k_cached(arg))
    # Exact check (float64 sums of ±1 products are exact integers here; BLAS is faster than int64).
    hf = h.astype(np.float64)
    if not np.array_equal(hf @ hf.T, k * np.eye(k)):
        raise AssertionError(f"construction {plan} did not give a Hadamard matrix")  # bug guard
    h.setflags(write=False)
    return h


def hadamard_k(k: int) -> np.ndarray:
    """Exact Hadamard matrix of order k as int64 [k, k] (entries ±1, H H^T = k I).

    Raises HadamardSizeError if we have no construction for k (see module docstring)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise HadamardSizeError(f"order must be an int, got {k!r}")
    return _hadamard_k_cached(int(k)).copy()


def haar_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthogonal [n, n] float64: QR of a Gaussian with columns times sign(diag R)."""
    g = rng.standard_normal((n, n))
    q, r = np.linalg.qr(g)
    s = np.sign(np.diag(r))
    s[s == 0] = 1.0
    return q * s[None, :]


@functools.lru_cache(maxsize=None)
def _substitute_cached(k: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([_SUBSTITUTE_SEED_TAG, k]))
    h = haar_orthogonal(k, rng) * math.sqrt(k)
    h.setflags(write=False)
    return h


def substitute_orthogonal(k: int) -> np.ndarray:
    """Seeded stand-in for an unnormalized Hadamard of order k: sqrt(k) * Q with Q Haar-random
    orthogonal [k, k] float64 from PCG64 seeded with SeedSequence([0x52455351, k]); so
    H H^T = k I to float64 precision. Deterministic for a given NumPy/LAPACK (across BLAS
    builds it may differ in the last ulps)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise HadamardSizeError(f"substitute order must be a positive int, got {k!r}")
    return _substitute_cached(int(k)).copy()


# ----------------------------------------------------------------------------------------
# Choosing n = K * 2^m
# ----------------------------------------------------------------------------------------


def _odd_part(n: int) -> tuple[int, int]:
    a = (n & -n).bit_length() - 1
    return n >> a, a


def _choose_k(n: int) -> tuple[int, int, bool] | None:
    """(K, m, is_true_hadamard) for n > 0, or None if no K <= MAX_K works."""
    odd, a = _odd_part(n)
    if odd == 1:
        return 1, a, True
    for j in range(2, a + 1):
        k = odd << j
        if k > MAX_K:
            break
        if has_hadamard(k):
            return k, a - j, True
    if odd <= MAX_K:
        return odd, a, False
    return None


def _nearby_supported(n: int, count: int = 3) -> tuple[list[int], list[int]]:
    """Up to `count` supported sizes below and above n (true Hadamard or substitute)."""
    below, above = [], []
    x = n - 1
    while x >= 1 and len(below) < count:
        if _choose_k(x) is not None:
            below.append(x)
        x -= 1
    x = max(n + 1, 1)
    while len(above) < count:
        if _choose_k(x) is not None:
            above.append(x)
        x += 1
    return below[::-1], above


def _check_size(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise HadamardSizeError(f"Hadamard size must be a positive int, got {n!r} ({type(n).__name__})")
    n = int(n)
    if n <= 0:
        raise HadamardSizeError(
            f"Hadamard size must be a positive int, got {n}: n must be K*2^m with K a Hadamard "
            f"order (1, 2, 12, 20, 28, 36, ...) or an odd K <= {MAX_K} (seeded orthogonal substitute)"
        )
    if _choose_k(n) is None:
        odd, a = _odd_part(n)
        below, above = _nearby_supported(n)
        true_ks = [k for k in range(12, MAX_K + 1, 4) if k & (k - 1) and has_hadamard(k)]
        raise HadamardSizeError(
            f"no Hadamard transform of size {n} = {odd}*2^{a}: n must be K*2^m with K <= {MAX_K}, "
            f"either 1 or a Hadamard order we construct (one of {true_ks[:12]}... up to {true_ks[-1]}) "
            f"or an odd K (seeded orthogonal substitute); here the odd part {odd} > {MAX_K} and no "
            f"{odd}*2^j <= {MAX_K} has a construction. Nearby sizes that work: {below + above}"
        )
    return n


def hadamard_factor(n: int) -> tuple[int, np.ndarray, int]:
    """Split n = K * 2^m and return (K, H_K, m).

    H_K: float64 [K, K], unnormalized, H_K @ H_K.T == K * I (exactly ±1 entries for a true
    Hadamard; a seeded orthogonal * sqrt(K) substitute otherwise, see module docstring for
    the rule). For n a power of two, K = 1 and H_K = [[1.]]. Stable contract: native kernels
    call this to get H_K. Raises HadamardSizeError for n <= 0 or sizes no K <= MAX_K covers.
    """
    n = _check_size(n)
    k, m, true_h = _choose_k(n)
    h = _hadamard_k_cached(k).astype(np.float64) if true_h else _substitute_cached(k).copy()
    return k, h, m


def hadamard_matrix(n: int) -> np.ndarray:
    """Normalized orthogonal Hadamard-like matrix [n, n] float64:
    np.kron(H_K, H_{2^m}) / sqrt(n) (K index slowest). Dense: n^2 * 8 bytes (use
    :func:`hadamard_transform` / :func:`hadamard_transform_np` for large n)."""
    k, hk, m = hadamard_factor(n)
    return np.kron(hk, _sylvester_cached(1 << m).astype(np.float64)) / math.sqrt(n)
