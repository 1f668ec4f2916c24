"""Block feature model of SD-PLL: unit-norm features whose Gram matrix has a known spectrum.

Two levels: correlation c between instances of one class, d across classes (c ≥ d). Three levels add
superclasses of m consecutive classes: c within a class, d within a superclass, e across (c ≥ d ≥ e).
The features are built explicitly from orthonormal directions,

    φ_i = √e e0 + √(d − e) s_{sup(y_i)} + √(c − d) u_{y_i} + √(1 − c) z_i,

(two levels: no s term and e replaced by d), with one private direction z_i per instance, test points
included, so test points share class and superclass directions but never an instance direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockData:
    """Block-model features; classes are balanced and stored class by class."""

    X_train: np.ndarray  # [N, D] float64, unit rows
    y_train: np.ndarray  # [N] int64
    X_test: np.ndarray  # [K * n_test, D] float64
    y_test: np.ndarray  # [K * n_test] int64
    superclass: np.ndarray | None  # [K] superclass id per class, None for two levels


@dataclass(frozen=True)
class BlockEigen:
    """Distinct eigenvalues of the N×N training Gram of the block model and their multiplicities."""

    K: int
    n: int
    m: int | None  # superclass size, None for two levels
    mu_ins: float  # instance contrasts inside a class: 1 − c
    mu_cls: float  # class contrasts (inside a superclass for three levels): 1 − c + n(c − d)
    mu_sup: float | None  # superclass contrasts: μ_cls + n m (d − e)
    mu_ones: float  # the all-ones direction

    def multiplicities(self) -> dict[str, int]:
        """How many eigenvectors each eigenvalue has; they add up to N = K n."""
        if self.m is None:
            return {"ins": self.K * (self.n - 1), "cls": self.K - 1, "sup": 0, "ones": 1}
        n_sup = self.K // self.m
        return {"ins": self.K * (self.n - 1), "cls": self.K - n_sup, "sup": n_sup - 1, "ones": 1}

    def spectrum(self) -> np.ndarray:
        """All N eigenvalues, descending: [N]."""
        mult = self.multiplicities()
        values = {"ins": self.mu_ins, "cls": self.mu_cls, "sup": self.mu_sup, "ones": self.mu_ones}
        full = np.concatenate([np.full(mult[k], values[k], dtype=np.float64) for k in mult if mult[k]])
        return np.sort(full)[::-1]


def _check_params(K: int, n: int, c: float, d: float, e: float | None, m: int | None) -> None:
    if K < 2:
        raise ValueError(f"need K ≥ 2 classes, got K={K}")
    if n < 1:
        raise ValueError(f"need n ≥ 1 instances per class, got n={n}")
    if (e is None) != (m is None):
        raise ValueError(f"three-level model needs both e and m (got e={e}, m={m}); pass neither for two")
    lower = 0.0 if e is None else e
    if not 0.0 <= lower <= d <= c < 1.0:
        names = "0 ≤ d ≤ c < 1" if e is None else "0 ≤ e ≤ d ≤ c < 1"
        raise ValueError(f"correlations must satisfy {names}, got c={c}, d={d}, e={e}")
    if m is not None and (m < 1 or K % m):
        raise ValueError(f"superclass size m={m} must divide K={K}")


def block_features(
    K: int,
    n: int,
    c: float,
    d: float,
    *,
    e: float | None = None,
    m: int | None = None,
    n_test: int = 0,
    seed: int = 0,
    rotate: bool = True,
) -> BlockData:
    """Explicit features realizing the block Gram; ``n_test`` fresh test points per class.

    D = 1 + K/m (three levels only) + K + N + K n_test. With ``rotate`` the orthonormal directions are
    a random orthogonal basis drawn from ``seed`` (dense features, costs a D×D QR); without it they
    are the coordinate axes (sparse, any size).
    """
    _check_params(K, n, c, d, e, m)
    if n_test < 0:
        raise ValueError(f"n_test must be ≥ 0, got {n_test}")
    n_sup = 0 if m is None else K // m
    top = d if e is None else e
    N, N_test = K * n, K * n_test
    D = 1 + n_sup + K + N + N_test
    y_all = np.concatenate([np.repeat(np.arange(K), n), np.repeat(np.arange(K), n_test)])
    rows = np.arange(N + N_test)
    X = np.zeros((N + N_test, D))
    X[:, 0] = np.sqrt(top)
    if m is not None:
        X[rows, 1 + y_all // m] = np.sqrt(d - e)
    X[rows, 1 + n_sup + y_all] = np.sqrt(c - d)
    X[rows, 1 + n_sup + K + rows] = np.sqrt(1.0 - c)
    if rotate:
        q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))
        X = X @ (q * np.sign(np.diag(r))).T  # sign fix makes the basis Haar-distributed
    superclass = None if m is None else np.arange(K) // m
    return BlockData(X[:N], y_all[:N], X[N:], y_all[N:], superclass)


def block_gram_eigen(
    K: int, n: int, c: float, d: float, *, e: float | None = None, m: int | None = None
) -> BlockEigen:
    """Analytic eigenvalues of G = (1 − c) I + (c − d) B_class + (d − e) B_super + e 11ᵀ."""
    _check_params(K, n, c, d, e, m)
    mu_ins = 1.0 - c
    mu_cls = mu_ins + n * (c - d)
    if m is None:
        return BlockEigen(K, n, None, mu_ins, mu_cls, None, mu_cls + K * n * d)
    mu_sup = mu_cls + n * m * (d - e)
    return BlockEigen(K, n, m, mu_ins, mu_cls, mu_sup, mu_sup + K * n * e)
