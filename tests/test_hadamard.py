"""Hadamard constructions: exact orthogonality, prime-power fields, coverage, and loud failures."""

import math
import re
import time

import pytest
import torch

from phis import hadamard
from phis.hadamard import (
    constructible_orders,
    construction,
    hadamard_matrix,
    hadamard_pm1,
    is_constructible,
    quadratic_character,
)

TEACHER_WIDTHS = (192, 256, 384, 512, 768, 1024, 1152, 1280, 1408, 1536)
REFERENCE_COVERAGE = 354  # multiples of 4 up to 2048 that the prime-only public reference builds


def _exactly_orthogonal(n: int) -> bool:
    """H Hᵀ == n I with integer entries; float64 products of ±1 are exact below 2^53."""
    h = hadamard_pm1(n)
    gram = h @ h.T if n <= 256 else (h.double() @ h.double().T).long()
    return torch.equal(gram, n * torch.eye(n, dtype=torch.int64))


def _trial_prime_power(q: int) -> tuple[int, int] | None:
    for p in range(2, q + 1):
        if q % p == 0:
            m = round(math.log(q, p))
            return (p, m) if p**m == q and all(p % d for d in range(2, p)) else None
    return None


def _recipe_order(recipe: str) -> int:
    """Order implied by a recipe string, checking each Paley field condition independently."""
    n = 1
    for kind, arg in re.findall(r"(sylvester|paley1|paley2)\((?:q=)?([^)]*)\)", recipe):
        if kind == "sylvester":
            n *= 2 ** int(arg.split("^")[1])
            continue
        p, _, m = arg.partition("^")
        q = int(p) ** int(m or 1)
        assert _trial_prime_power(q) == (int(p), int(m or 1)), recipe
        assert q % 4 == (3 if kind == "paley1" else 1), recipe
        n *= q + 1 if kind == "paley1" else 2 * (q + 1)
    return n


@pytest.mark.parametrize("n", TEACHER_WIDTHS)
def test_teacher_widths_are_exact_hadamard(n: int) -> None:
    assert _exactly_orthogonal(n)
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert _recipe_order(construction(n)) == n


def test_teacher_widths_build_fast() -> None:
    hadamard._pm1.cache_clear()
    seconds = {}
    for n in TEACHER_WIDTHS:
        start = time.perf_counter()
        hadamard_matrix(n)
        seconds[n] = time.perf_counter() - start
    assert max(seconds.values()) < 1.0, seconds


def test_all_small_orders_exact() -> None:
    orders = constructible_orders(256)
    assert {1, 2, 4, 8, 12, 20, 28, 52, 100, 244} <= set(orders)
    for n in orders:
        assert _exactly_orthogonal(n), (n, orders[n])


@pytest.mark.parametrize(
    ("n", "recipe"),
    [
        (28, "paley1(q=3^3)"),
        (52, "paley2(q=5^2)"),
        (100, "paley2(q=7^2)"),
        (244, "paley1(q=3^5)"),
        (344, "paley1(q=7^3)"),
        (1252, "paley2(q=5^4)"),
        (680, "kron(paley2(q=13^2), sylvester(2^1))"),
    ],
)
def test_prime_power_fields(n: int, recipe: str) -> None:
    assert construction(n) == recipe
    assert _exactly_orthogonal(n)
    if n != 28:  # 28 also has a prime construction (Paley II with q = 13)
        assert not is_constructible(n, prime_powers=False)
        with pytest.raises(ValueError, match=str(n)):
            construction(n, prime_powers=False)


@pytest.mark.parametrize(("p", "m"), [(3, 1), (7, 1), (3, 2), (5, 2), (3, 3), (7, 2), (3, 5), (5, 3)])
def test_quadratic_character_is_a_field_character(p: int, m: int) -> None:
    q = p**m
    chi = quadratic_character(p, m).astype(int)
    assert chi[0] == 0 and (chi[1:] == 1).sum() == (q - 1) // 2 == (chi[1:] == -1).sum()
    assert chi[p - 1] == (-1) ** ((q - 1) // 2)  # χ(−1); −1 has code p − 1
    if m == 1:
        legendre = [0] + [1 if pow(a, (p - 1) // 2, p) == 1 else -1 for a in range(1, p)]
        assert chi.tolist() == legendre
    # A Jacobsthal matrix from a true quadratic character satisfies Q Qᵀ = q I − J and Q J = 0.
    jac = torch.from_numpy(hadamard._jacobsthal(p, m).astype("int64"))
    ones = torch.ones(q, q, dtype=torch.int64)
    assert torch.equal(jac @ jac.T, q * torch.eye(q, dtype=torch.int64) - ones)
    assert torch.equal(jac.sum(1), torch.zeros(q, dtype=torch.int64))


def test_non_constructible_order_is_a_clear_error() -> None:
    assert not is_constructible(668)  # the smallest order of unknown Hadamard existence
    below = max(n for n in range(1, 668) if is_constructible(n))
    above = min(n for n in range(669, 2000) if is_constructible(n))
    assert (below, above) == (664, 672)
    for call in (hadamard_matrix, construction, hadamard_pm1):
        with pytest.raises(ValueError, match=r"668.*664.*672"):
            call(668)
    with pytest.raises(ValueError, match="multiples of 4"):
        hadamard_matrix(6)
    for bad in (0, -4):
        with pytest.raises(ValueError, match=str(bad)):
            hadamard_matrix(bad)


def test_coverage_beats_reference_and_recipes_are_consistent() -> None:
    hadamard._plan.cache_clear()
    hadamard._pm1.cache_clear()
    start = time.perf_counter()
    flags = {n: is_constructible(n) for n in range(4, 2049, 4)}
    assert time.perf_counter() - start < 3.0
    assert hadamard._pm1.cache_info().currsize == 0  # deciding built no matrix
    covered = sum(flags.values())
    assert covered > REFERENCE_COVERAGE
    assert covered > sum(is_constructible(n, prime_powers=False) for n in flags)
    orders = constructible_orders(2048)
    assert [n for n in orders if n % 4 == 0] == [n for n, ok in flags.items() if ok]
    assert all(_recipe_order(recipe) == n for n, recipe in orders.items())
    assert not any(flags[n] for n in (92, 116, 156, 172, 668))  # no Paley/Kronecker route to these


def test_deterministic_fresh_and_typed() -> None:
    a = hadamard_matrix(12)
    a.mul_(0)
    b, c = hadamard_matrix(12), hadamard_matrix(12)
    assert torch.equal(b, c) and b.abs().min() > 0
    assert hadamard_matrix(12, dtype=torch.float32).dtype == torch.float32
    assert torch.equal(hadamard_matrix(1), torch.ones(1, 1, dtype=torch.float64))
    assert torch.equal(hadamard_pm1(2), torch.tensor([[1, 1], [1, -1]]))


@pytest.mark.slow
def test_every_constructible_order_up_to_2048_is_exact() -> None:
    for n, recipe in constructible_orders(2048).items():
        assert _exactly_orthogonal(n), (n, recipe)
