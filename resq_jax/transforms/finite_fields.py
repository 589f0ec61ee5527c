"""Finite-field arithmetic for the Paley constructions: prime powers, irreducible polynomials,
the quadratic character of GF(q).
"""
from __future__ import annotations

import functools

import numpy as np

# ----------------------------------------------------------------------------------------
# Integer helpers and finite fields GF(p^k)
# ----------------------------------------------------------------------------------------


def _factorize(n: int) -> dict[int, int]:
    """Prime factorization by trial division (n is small here)."""
    out: dict[int, int] = {}
    d = 2
    while d * d <= n:
        while n % d == 0:
            out[d] = out.get(d, 0) + 1
            n //= d
        d += 1
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def is_prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, k) with q = p^k, p prime, k >= 1; None if q is not a prime power."""
    if q < 2:
        return None
    f = _factorize(q)
    if len(f) != 1:
        return None
    ((p, k),) = f.items()
    return p, k


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials are coefficient lists, lowest degree first; f monic."""
    a = [c % p for c in a]
    df = len(f) - 1
    while len(a) - 1 >= df and any(a):
        if a[-1] == 0:
            a.pop()
            continue
        c = a[-1]
        shift = len(a) - 1 - df
        for i, fc in enumerate(f):
            a[shift + i] = (a[shift + i] - c * fc) % p
        a.pop()
    while len(a) > 1 and a[-1] == 0:
        a.pop()
    return a


def _is_irreducible(f: list[int], p: int) -> bool:
    """Monic f of degree k over GF(p) is irreducible iff no monic g of degree 1..k//2 divides it."""
    k = len(f) - 1
    for dg in range(1, k // 2 + 1):
        for idx in range(p**dg):
            g = [(idx // p**i) % p for i in range(dg)] + [1]
            r = _poly_mod(list(f), g, p)
            if not any(r):
                return False
    return True


@functools.lru_cache(maxsize=None)
def _irreducible_poly(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p) (coefficients low to high),
    enumerating the lower coefficients as base-p digits of 0, 1, 2, ..."""
    for idx in range(p**k):
        f = [(idx // p**i) % p for i in range(k)] + [1]
        if f[0] == 0:
            continue
        if _is_irreducible(f, p):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # impossible


def quadratic_character_table(q: int) -> np.ndarray:
    """chi[a - b] for all field elements a, b of GF(q), as an int64 [q, q] matrix.

    Elements of GF(p^k) are integers e = sum_i c_i p^i (coefficients of a polynomial in the
    root of the irreducible modulus). chi(0) = 0, chi(square) = 1, chi(non-square) = -1.
    """
    pk = is_prime_power(q)
    if pk is None:
        raise ValueError(f"q={q} is not a prime power")
    p, k = pk
    if k == 1:
        squares = np.zeros(q, dtype=bool)
        squares[(np.arange(1, q, dtype=np.int64) ** 2) % q] = True
        diff = (np.arange(q)[:, None] - np.arange(q)[None, :]) % q
    else:
        f = list(_irreducible_poly(p, k))
        digits = (np.arange(q)[:, None] // p ** np.arange(k)[None, :]) % p  # [q, k]
        squares = np.zeros(q, dtype=bool)
        for e in range(1, q):
            c = [int(v) for v in digits[e]]
            sq = [0] * (2 * k - 1)
            for i in range(k):
                for j in range(k):
                    sq[i + j] += c[i] * c[j]
            r = _poly_mod(sq, f, p)
            squares[sum(int(v) * p**i for i, v in enumerate(r))] = True
        dd = (digits[:, None, :] - digits[None, :, :]) % p  # [q, q, k]
        diff = (dd * (p ** np.arange(k))).sum(-1)
    chi = np.where(squares, 1, -1).astype(np.int64)
    chi[0] = 0
    assert squares.sum() == (q - 1) // 2 or q == 2
    return chi[diff]
