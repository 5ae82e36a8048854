"""Hadamard matrices built from scratch: Sylvester doubling times a Paley block (qronos_algorithm.md §4.2).

A Hadamard matrix of order n has entries +-1 and orthogonal rows; scaled by 1/sqrt(n) it is orthonormal. We build
n = 2^a * m as Sylvester H_{2^a} (Kronecker) a Paley matrix of order m, where m comes from a prime power q:

- Paley I, q = 3 (mod 4): order q + 1 (12 from q = 11, 20 from 19, 44 from 43, 60 from 59, 108, 140, 152, ...);
- Paley II, q = 1 (mod 4): order 2 (q + 1) (12 from 5, 20 from 9, 28 from 13, 36 from 17, 52 from 25, 60 from 29).

Both use the quadratic character chi of GF(q) (prime powers included, so 27 and 25 work), computed here; nothing is
copied from a table. Widths with no such factorisation (a prime like 17, or 156 and 172, which need other
constructions) get :func:`block_hadamard`: a block-diagonal of the largest constructible Hadamards, still
orthonormal, mixing only within each block.

``seed`` multiplies the rows by seeded random signs (a randomized Hadamard, QuaRot style): still orthonormal with
entries +-1/sqrt(n); ``seed=None`` gives the deterministic matrix (Brevitas' HIP uses that one).
"""
from __future__ import annotations

import functools

import numpy as np


# ------------------------------------------------------------------------------------------- finite fields GF(q)

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r, k = r // p, k + 1
    return (p, k) if r == 1 else None


def _poly_mulmod(a: list[int], b: list[int], mod: list[int], p: int) -> list[int]:
    """a * b modulo the monic polynomial ``mod`` over GF(p); coefficient lists, lowest degree first."""
    k = len(mod) - 1
    out = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] = (out[i + j] + x * y) % p
    for d in range(len(out) - 1, k - 1, -1):  # reduce x^d = -(mod[0..k-1]) x^(d-k)
        c = out[d]
        if c:
            out[d] = 0
            for j in range(k):
                out[d - k + j] = (out[d - k + j] - c * mod[j]) % p
    return out[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p), by brute force: the first one with no monic factor
    of degree <= k/2."""
    def polys(deg):
        for idx in range(p ** deg):
            coeffs = [(idx // p ** i) % p for i in range(deg)]
            yield coeffs + [1]

    def divides(f, g):  # does monic f divide g (coefficients mod p)?
        g = list(g)
        while len(g) >= len(f):
            c = g[-1]
            if c:
                shift = len(g) - len(f)
                for i, fc in enumerate(f):
                    g[shift + i] = (g[shift + i] - c * fc) % p
            g.pop()
        return not any(g)

    for cand in polys(k):
        if cand[0] == 0:
            continue  # divisible by x
        if not any(divides(f, cand) for d in range(1, k // 2 + 1) for f in polys(d)):
            return cand
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> np.ndarray:
    """chi(a - b) for all field elements a, b of GF(q) as a [q, q] int matrix (0 on the diagonal, +-1 elsewhere).

    Elements are the integers 0..q-1 read as base-p digit vectors (polynomial coefficients)."""
    p, k = _prime_power(q)
    digits = np.array([[(e // p ** i) % p for i in range(k)] for e in range(q)], dtype=np.int64)  # [q, k]
    weights = p ** np.arange(k)
    if k == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        mod = _irreducible(p, k)
        squares = set()
        for e in range(1, q):
            sq = _poly_mulmod(list(digits[e]), list(digits[e]), mod, p)
            squares.add(int(np.dot(sq, weights)))
    chi = np.array([0] + [1 if e in squares else -1 for e in range(1, q)], dtype=np.int64)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights  # index of a - b
    return chi[diff]


# ------------------------------------------------------------------------------------------- Hadamard blocks

def _paley_one(q: int) -> np.ndarray:
    """Order q + 1 for q = 3 mod 4: I + [[0, 1^T], [-1, Q]] with Q the (skew) Jacobsthal matrix."""
    Q = _quadratic_character(q)
    n = q + 1
    S = np.zeros((n, n), dtype=np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return np.eye(n, dtype=np.int64) + S


def _paley_two(q: int) -> np.ndarray:
    """Order 2 (q + 1) for q = 1 mod 4: C = [[0, 1^T], [1, Q]] (symmetric conference matrix); each 0 of C becomes
    [[1, -1], [-1, -1]] and each +-1 becomes +-[[1, 1], [1, -1]]."""
    Q = _quadratic_character(q)
    n = q + 1
    C = np.zeros((n, n), dtype=np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    A = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    B = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(np.eye(n, dtype=np.int64), A) + np.kron(C, B)


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of order m from Paley I or II, or None when neither applies."""
    q = m - 1
    pk = _prime_power(q)
    if pk and q % 4 == 3:
        return _paley_one(q)
    if m % 2 == 0:
        q = m // 2 - 1
        pk = _prime_power(q)
        if pk and q % 4 == 1:
            return _paley_two(q)
    return None


def _factor(n: int) -> tuple[int, int] | None:
    """(a, m) with n = 2^a * m and m = 1 or a Paley order (the largest power of two that leaves a Paley part)."""
    if n < 1:
        return None
    a, m = 0, n
    while m % 2 == 0:
        a, m = a + 1, m // 2
    if m == 1:
        return a, 1
    while True:  # move factors of two from the Sylvester part into the Paley part until one is constructible
        if _paley(m) is not None:
            return a, m
        if a == 0:
            return None
        a, m = a - 1, 2 * m


def is_hadamard_size(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build a true Hadamard of order n."""
    return _factor(n) is not None


def _sylvester(a: int) -> np.ndarray:
    """The +-1 Sylvester Hadamard of order 2^a, by doubling [[H, H], [H, -H]]."""
    H = np.ones((1, 1))
    for _ in range(a):
        n = H.shape[0]
        D = np.empty((2 * n, 2 * n))
        D[:n, :n] = D[:n, n:] = D[n:, :n] = H
        np.negative(H, out=D[n:, n:])
        H = D
    return H


def _signed(H: np.ndarray, seed: int | None) -> np.ndarray:
    if seed is None:
        return H
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=H.shape[0])
    return signs[:, None] * H


def hadamard_matrix(n: int, seed: int | None = None) -> np.ndarray:
    """The orthonormal Hadamard matrix of order n (float64, entries +-1/sqrt(n)), optionally with seeded random
    row signs. Raises ValueError when n = 2^a * m has no constructible m (use :func:`block_hadamard`)."""
    f = _factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructible here (n = 2^a m with m a Paley order); "
                         "use block_hadamard")
    a, m = f
    H = _sylvester(a)
    if m > 1:
        H = np.kron(H, _paley(m).astype(np.float64))
    return _signed(H / np.sqrt(n), seed)


def hadamard_blocks(n: int) -> list[int]:
    """The block sizes :func:`block_hadamard` uses: [n] when n is constructible, else the largest constructible
    size that divides n repeated (when it is at least half of the largest constructible size below n), else greedy
    largest-first pieces (17 -> [16, 1])."""
    if n < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    if is_hadamard_size(n):
        return [n]
    largest = next(b for b in range(n, 0, -1) if is_hadamard_size(b))
    divisor = next(b for b in range(n // 2, 0, -1) if n % b == 0 and is_hadamard_size(b))
    if 2 * divisor >= largest:
        return [divisor] * (n // divisor)
    return [largest] + hadamard_blocks(n - largest)


def block_hadamard(n: int, seed: int | None = None) -> np.ndarray:
    """An orthonormal [n, n] float64 matrix: the true Hadamard when n is constructible, else block-diagonal with
    the largest constructible Hadamard blocks (see :func:`hadamard_blocks`); seeded random row signs as above."""
    sizes = hadamard_blocks(n)
    H = np.zeros((n, n))
    i = 0
    for b in sizes:
        H[i : i + b, i : i + b] = hadamard_matrix(b)
        i += b
    return _signed(H, seed)


def hadamard_factors(n: int, seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(signs, A, B) with ``block_hadamard(n, seed) == diag(signs) @ kron(A, B)``, A and B orthonormal Hadamards of
    orders near sqrt(n) (A a Sylvester one, so symmetric); None when n is not one constructible Hadamard or has no
    split with both factors larger than 1.

    Why: ``x diag(s) kron(A, B)`` is ``A^T X B`` on x reshaped to [a, b], n (a + b) multiply-adds per row instead of
    n^2 (1536 = 32 x 48: 19x fewer), which is what an online rotation costs at run time. Sylvester matrices are
    Kronecker powers of [[1, 1], [1, -1]], so H_2^a (x) P_m = H_2^a1 (x) (H_2^(a - a1) (x) P_m) for any a1 <= a.
    """
    f = _factor(n)
    if f is None:
        return None
    a, m = f
    a1 = 0
    while a1 < a and 2 ** (a1 + 1) * 2 ** (a1 + 1) <= n:
        a1 += 1
    if a1 == 0 or 2 ** a1 == n:
        return None
    A = _sylvester(a1) / np.sqrt(2.0 ** a1)
    B = _sylvester(a - a1)
    if m > 1:
        B = np.kron(B, _paley(m).astype(np.float64))
    B = B / np.sqrt(B.shape[0])
    signs = _signed(np.ones((n, 1)), seed)[:, 0]
    return signs, A, B
