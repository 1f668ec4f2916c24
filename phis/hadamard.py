"""Normalized Hadamard matrices from explicit constructions only.

Orders come from Sylvester (2^k), Paley I (q + 1, q a prime power ≡ 3 mod 4), Paley II (2(q + 1),
q a prime power ≡ 1 mod 4) and Kronecker products of these. Paley's constructions run over the finite
field GF(p^m), not only over primes. An order with no construction is an error: a random orthogonal
stand-in would silently break PHI-S Theorem 2.1 (every entry must have square 1/n).
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import torch
from torch import Tensor

# A plan is ("sylvester", k) | ("paley1", p, m) | ("paley2", p, m) | ("kron", a, b), with q = p^m.
Plan = tuple[str, int, int] | tuple[str, int]


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p^m and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    m = 0
    while q % p == 0:
        q //= p
        m += 1
    return (p, m) if q == 1 else None


@functools.cache
def _plan(n: int, prime_powers: bool) -> Plan | None:
    """How to build order n, preferring direct constructions, then splitting off a power of two."""
    if n & (n - 1) == 0:
        return ("sylvester", n.bit_length() - 1)
    if n % 4:
        return None  # orders above 2 of any Hadamard matrix are multiples of 4
    for q, kind, residue in ((n - 1, "paley1", 3), (n // 2 - 1, "paley2", 1)):
        pm = _prime_power(q)
        if pm is not None and q % 4 == residue and (prime_powers or pm[1] == 1):
            return (kind, *pm)
    two = n & -n  # largest power of two dividing n
    while two > 1:
        if _plan(n // two, prime_powers) is not None:
            return ("kron", n // two, two)
        two //= 2
    for a in range(3, math.isqrt(n) + 1):
        if n % a == 0 and _plan(a, prime_powers) and _plan(n // a, prime_powers):
            return ("kron", a, n // a)
    return None


def _order(n: int) -> int:
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n}")
    return n


def is_constructible(n: int, prime_powers: bool = True) -> bool:
    """Whether order n has a construction here (``prime_powers=False`` restricts Paley to prime q)."""
    return _plan(_order(n), prime_powers) is not None


def _nearest(n: int, prime_powers: bool) -> tuple[int, int]:
    below = next(m for m in range(n - 1, 0, -1) if _plan(m, prime_powers))
    above = next(m for m in range(n + 1, 4 * n + 2) if _plan(m, prime_powers))
    return below, above


def _checked_plan(n: int, prime_powers: bool) -> Plan:
    n = _order(n)
    plan = _plan(n, prime_powers)
    if plan is None:
        below, above = _nearest(n, prime_powers)
        why = "" if n % 4 == 0 else " (Hadamard orders above 2 are multiples of 4)"
        raise ValueError(
            f"no Hadamard construction for order {n}{why}; Sylvester, Paley I/II over GF(q) and their "
            f"Kronecker products reach {below} below and {above} above — use one of those orders"
        )
    return plan


def _recipe_parts(plan: Plan, prime_powers: bool) -> list[str]:
    kind = plan[0]
    if kind == "sylvester":
        return [f"sylvester(2^{plan[1]})"]
    if kind == "kron":
        return [part for n in plan[1:] for part in _recipe_parts(_plan(n, prime_powers), prime_powers)]
    p, m = plan[1], plan[2]
    return [f"{kind}(q={p if m == 1 else f'{p}^{m}'})"]


def construction(n: int, prime_powers: bool = True) -> str:
    """Readable recipe for order n, e.g. ``kron(paley2(q=5^2), sylvester(2^2))``; ValueError if none."""
    parts = _recipe_parts(_checked_plan(n, prime_powers), prime_powers)
    return parts[0] if len(parts) == 1 else f"kron({', '.join(parts)})"


def constructible_orders(limit: int, prime_powers: bool = True) -> dict[int, str]:
    """Every constructible order 1..limit with its recipe (for coverage reports; builds no matrix)."""
    return {n: construction(n, prime_powers) for n in range(1, limit + 1) if _plan(n, prime_powers)}


# ---------------------------------------------------------------------------------------------------
# GF(p^m): an element is an integer 0..q-1 whose base-p digits are its polynomial coefficients
# (lowest degree first), arithmetic modulo a monic irreducible polynomial of degree m.


def _digits(q: int, p: int, m: int) -> np.ndarray:
    """[q, m] base-p digits of 0..q-1."""
    return (np.arange(q)[:, None] // p ** np.arange(m)[None, :]) % p


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial a modulo monic f over GF(p) (coefficients lowest degree first)."""
    a = list(a)
    for top in range(len(a) - 1, len(f) - 2, -1):
        c = a[top]
        if c:
            for i, fi in enumerate(f):
                a[top - len(f) + 1 + i] = (a[top - len(f) + 1 + i] - c * fi) % p
    return a[: len(f) - 1]


def _irreducible(p: int, m: int) -> list[int]:
    """The first monic irreducible polynomial of degree m over GF(p), by trial division."""
    for code in range(p**m):
        f = [(code // p**i) % p for i in range(m)] + [1]
        if f[0] == 0 and m > 1:
            continue  # divisible by x
        has_factor = any(
            not any(_poly_mod(f, [(g // p**i) % p for i in range(d)] + [1], p))
            for d in range(1, m // 2 + 1)
            for g in range(p**d)
        )
        if not has_factor:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {m} over GF({p})")  # cannot happen


def _gf_mul(a: np.ndarray, b: np.ndarray, f: list[int], p: int) -> np.ndarray:
    """Row-wise product of elements given as digit arrays a, b: [N, m] -> [N, m]."""
    m = a.shape[1]
    prod = np.zeros((a.shape[0], 2 * m - 1), dtype=np.int64)
    for i in range(m):
        prod[:, i : i + m] += a[:, i : i + 1] * b
    for top in range(2 * m - 2, m - 1, -1):  # x^m = -(f_0 + ... + f_{m-1} x^{m-1})
        prod[:, top - m : top] -= prod[:, top : top + 1] * np.asarray(f[:m])
    return prod[:, :m] % p


def quadratic_character(p: int, m: int) -> np.ndarray:
    """χ over GF(p^m) as int8 [q], indexed by element code: 0 at 0, +1 on squares, −1 elsewhere.

    Euler's criterion in the cyclic group GF(q)*: x^((q−1)/2) is 1 for squares and −1 otherwise.
    """
    q = p**m
    if p == 2:
        raise ValueError(f"the quadratic character needs odd q, got q = 2^{m}")
    f = _irreducible(p, m)
    x = _digits(q, p, m)
    power = np.zeros_like(x)
    power[:, 0] = 1
    e = (q - 1) // 2
    while e:  # square-and-multiply, vectorized over all q elements
        if e & 1:
            power = _gf_mul(power, x, f, p)
        x = _gf_mul(x, x, f, p)
        e >>= 1
    code = power @ (p ** np.arange(m))
    chi = np.where(code == 1, 1, np.where(code == p - 1, -1, 0)).astype(np.int8)
    if not (chi[1:] != 0).all():
        raise AssertionError(f"Euler criterion gave a value other than ±1 in GF({p}^{m})")
    chi[0] = 0
    return chi


def _jacobsthal(p: int, m: int) -> np.ndarray:
    """Q[i, j] = χ(x_i − x_j) over GF(p^m): [q, q] int8."""
    q = p**m
    d = _digits(q, p, m)
    diff = ((d[:, None, :] - d[None, :, :]) % p) @ (p ** np.arange(m))
    return quadratic_character(p, m)[diff]


def _paley1(p: int, m: int) -> np.ndarray:
    """Order q + 1 for q ≡ 3 (mod 4): H = I + [[0, 1ᵀ], [−1, Q]] with Q antisymmetric."""
    q = p**m
    s = np.zeros((q + 1, q + 1), dtype=np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(p, m)
    return s + np.eye(q + 1, dtype=np.int8)


def _paley2(p: int, m: int) -> np.ndarray:
    """Order 2(q + 1) for q ≡ 1 (mod 4): conference matrix C = [[0, 1ᵀ], [1, Q]] with each entry
    replaced by a 2×2 block (0 → [[1, −1], [−1, −1]], ±1 → ±[[1, 1], [1, −1]])."""
    q = p**m
    c = np.zeros((q + 1, q + 1), dtype=np.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(p, m)  # zero exactly on the diagonal
    plus = np.array([[1, 1], [1, -1]], dtype=np.int8)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return np.kron(c, plus) + np.kron(np.eye(q + 1, dtype=np.int8), zero)


@functools.lru_cache(maxsize=32)
def _pm1(n: int) -> np.ndarray:
    """The ±1 matrix of order n (read-only int8, cached), built in exact integer arithmetic."""
    plan = _checked_plan(n, True)
    kind = plan[0]
    if kind == "sylvester":
        h = np.ones((1, 1), dtype=np.int8)
        for _ in range(plan[1]):
            h = np.block([[h, h], [h, -h]])
    elif kind == "paley1":
        h = _paley1(plan[1], plan[2])
    elif kind == "paley2":
        h = _paley2(plan[1], plan[2])
    else:
        h = np.kron(_pm1(plan[1]), _pm1(plan[2]))
    h.setflags(write=False)
    return h


def hadamard_pm1(n: int) -> Tensor:
    """The unnormalized Hadamard matrix [n, n] of ±1 as int64 (H Hᵀ = n I exactly); a fresh tensor."""
    return torch.from_numpy(_pm1(_order(n)).astype(np.int64))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalized Hadamard matrix [n, n]: entries ±1/√n, H Hᵀ = I; ValueError if n has no construction."""
    h = torch.from_numpy(_pm1(_order(n)).astype(np.float64)) / math.sqrt(n)
    return h.to(dtype)
