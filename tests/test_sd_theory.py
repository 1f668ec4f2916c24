"""SD-PLL theory against brute force: block model, label averaging, exact softmax rounds, thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from phis.selfdistill import theory
from phis.selfdistill.blockmodel import block_features, block_gram_eigen
from phis.selfdistill.corruption import corrupt_labels, corruption_matrix, realized_matrix
from phis.selfdistill.theory import (
    block_all_correct,
    block_outputs,
    block_sigmas,
    condition_holds,
    eigen_decay,
    fit_exact,
    label_averaging,
    rounds_to_full_accuracy,
    self_distill_exact,
    sigma_ratio,
    softmax,
    stationary_point,
    threshold,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_correct(P: np.ndarray, y: np.ndarray) -> bool:
    """True class is the strict argmax of every row of P [N, K]."""
    rest = P.copy()
    rest[np.arange(len(y)), y] = -np.inf
    return bool((P[np.arange(len(y)), y] > rest.max(1)).all())


def _first_all_correct(outputs: list[np.ndarray], y: np.ndarray) -> int | None:
    return next((t for t, P in enumerate(outputs, start=1) if _all_correct(P, y)), None)


# ---------------------------------------------------------------------------------------------- block model


def test_block_features_two_level_gram() -> None:
    K, n, c, d = 3, 4, 0.55, 0.2
    data = block_features(K, n, c, d, n_test=2, seed=5)
    N, N_test = K * n, K * 2
    assert data.X_train.shape == (N, 1 + K + N + N_test) and data.X_test.shape == (N_test, 1 + K + N + N_test)
    X = np.vstack([data.X_train, data.X_test])
    y = np.concatenate([data.y_train, data.y_test])
    expected = np.where(y[:, None] == y[None, :], c, d)
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(X @ X.T, expected, atol=1e-12)
    np.testing.assert_array_equal(np.bincount(data.y_train), [n] * K)
    assert data.superclass is None
    plain = block_features(K, n, c, d, n_test=2, rotate=False)
    np.testing.assert_allclose(plain.X_train @ plain.X_test.T, data.X_train @ data.X_test.T, atol=1e-12)
    assert np.abs(data.X_train - block_features(K, n, c, d, n_test=2, seed=6).X_train).max() > 0.1


def test_block_features_three_level_gram() -> None:
    K, n, c, d, e, m = 6, 3, 0.7, 0.4, 0.15, 2
    data = block_features(K, n, c, d, e=e, m=m, n_test=1, seed=0)
    X = np.vstack([data.X_train, data.X_test])
    y = np.concatenate([data.y_train, data.y_test])
    sup = y // m
    expected = np.where(y[:, None] == y[None, :], c, np.where(sup[:, None] == sup[None, :], d, e))
    np.fill_diagonal(expected, 1.0)
    np.testing.assert_allclose(X @ X.T, expected, atol=1e-12)
    assert X.shape[1] == 1 + K // m + K + K * n + K
    np.testing.assert_array_equal(data.superclass, [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    "K, n, c, d, e, m",
    [
        (4, 5, 0.4, 0.1, None, None),
        (6, 4, 0.7, 0.4, 0.15, 2),
        (6, 3, 0.6, 0.3, 0.0, 3),
        (4, 3, 0.5, 0.3, 0.1, 1),
    ],
)
def test_block_gram_eigen_matches_eigh(K, n, c, d, e, m) -> None:
    data = block_features(K, n, c, d, e=e, m=m, seed=1)
    brute = np.linalg.eigvalsh(data.X_train @ data.X_train.T)[::-1]
    eig = block_gram_eigen(K, n, c, d, e=e, m=m)
    np.testing.assert_allclose(eig.spectrum(), brute, atol=1e-10)
    assert sum(eig.multiplicities().values()) == K * n
    assert eig.mu_ins == pytest.approx(1 - c) and eig.mu_cls == pytest.approx(1 - c + n * (c - d))


def test_block_parameter_errors() -> None:
    with pytest.raises(ValueError, match="0 ≤ d ≤ c < 1"):
        block_features(3, 2, 0.2, 0.4)
    with pytest.raises(ValueError, match="both e and m"):
        block_features(4, 2, 0.5, 0.2, e=0.1)
    with pytest.raises(ValueError, match="m=3 must divide K=4"):
        block_gram_eigen(4, 2, 0.5, 0.2, e=0.1, m=3)
    with pytest.raises(ValueError, match="0 ≤ e ≤ d ≤ c < 1"):
        block_gram_eigen(4, 2, 0.5, 0.2, e=0.3, m=2)


# -------------------------------------------------------------------------------------- label averaging


def _random_gram(N: int, rank: int, seed: int) -> np.ndarray:
    """Rank-deficient Gram with a wide spread of eigenvalues."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N, rank)) * np.logspace(0, -2, rank)
    return A @ A.T


@pytest.mark.parametrize("t", [0, 1, 3, 7])
def test_label_averaging_matches_iterated_linear_rounds(t: int) -> None:
    N, K, lam = 30, 5, 3e-3
    G = _random_gram(N, 12, seed=t)
    rng = np.random.default_rng(0)
    Y0 = np.eye(K)[rng.integers(0, K, N)]
    # Brute force: each linearized round solves (G + K N λ I)(P − 1/K) = G (Y − 1/K).
    Y = Y0.copy()
    for _ in range(t):
        Y = 1 / K + np.linalg.solve(G + K * N * lam * np.eye(N), G @ (Y - 1 / K))
    out = label_averaging(G, Y0, lam, t)
    np.testing.assert_allclose(out, Y, atol=1e-12)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(label_averaging(G, Y0, lam, [t, 0])[0], Y, atol=1e-12)


def test_linearized_round_is_the_linearized_stationary_point() -> None:
    N, K, lam = 20, 3, 1e-2
    G = _random_gram(N, N, seed=3)
    Y0 = softmax(np.random.default_rng(1).standard_normal((N, K)))
    P = label_averaging(G, Y0, lam, 1)
    # P = 1/K + z/K with z = G (Y0 − P) / (N λ): the fixed point with softmax linearized.
    np.testing.assert_allclose(P, 1 / K + G @ (Y0 - P) / (N * lam) / K, atol=1e-12)


def test_eigen_decay() -> None:
    G = _random_gram(15, 6, seed=0)
    mu = np.sort(np.linalg.eigvalsh(G))[::-1]
    sig = mu.clip(0) / (mu.clip(0) + 4 * 15 * 1e-2)
    np.testing.assert_allclose(eigen_decay(G, 4, 15, 1e-2, 3), sig**3, atol=1e-14)
    np.testing.assert_allclose(
        eigen_decay(G, 4, 15, 1e-2, [0, 2, 5]), sig[None] ** np.array([[0], [2], [5]]), atol=1e-14
    )
    X = np.random.default_rng(0).standard_normal((15, 40))
    np.testing.assert_allclose(
        eigen_decay(X.T @ X, 4, 15, 1e-2, 2)[:15], eigen_decay(X @ X.T, 4, 15, 1e-2, 2)
    )


def test_label_averaging_errors() -> None:
    with pytest.raises(ValueError, match="lam must be > 0"):
        label_averaging(np.eye(3), np.eye(3), 0.0, 1)
    with pytest.raises(ValueError, match=r"\[N=3, K\]"):
        label_averaging(np.eye(3), np.eye(4), 0.1, 1)
    with pytest.raises(ValueError, match="probability distribution"):
        label_averaging(np.eye(3), 2 * np.eye(3), 0.1, 1)


# ------------------------------------------------------------------------------------ exact softmax rounds


def _primal_reference(X: np.ndarray, T: np.ndarray, lam: float) -> np.ndarray:
    """Round minimizer by BFGS on W [K, D] directly, objective and gradient written out here."""
    N, K = T.shape

    def fun(w):
        W = w.reshape(K, -1)
        Z = X @ W.T
        lse = np.log(np.exp(Z - Z.max(1, keepdims=True)).sum(1)) + Z.max(1)
        P = np.exp(Z - lse[:, None])
        return -(T * (Z - lse[:, None])).sum() / N + lam / 2 * (w @ w), ((P - T).T @ X / N + lam * W).ravel()

    res = minimize(
        fun, np.zeros(K * X.shape[1]), jac=True, method="BFGS", options={"gtol": 1e-11, "maxiter": 5000}
    )
    return res.x.reshape(K, -1)


@pytest.mark.parametrize("D", [6, 45])  # D < N: primal coordinates; D > N: row space of X
def test_fit_exact_matches_reference_and_kkt(D: int) -> None:
    N, K, lam = 25, 3, 2e-2
    rng = np.random.default_rng(D)
    X = rng.standard_normal((N, D)) + 3.0 * rng.standard_normal(D)  # offset: hostile conditioning
    T = softmax(2 * rng.standard_normal((N, K)))
    W = fit_exact(X, T, lam)
    assert W.shape == (K, D)
    P = softmax(X @ W.T)
    np.testing.assert_allclose(W, (T - P).T @ X / (N * lam), atol=1e-8)  # stationarity
    np.testing.assert_allclose(W, _primal_reference(X, T, lam), atol=1e-6)


def test_fit_exact_newton_cg_path_matches_dense_newton(monkeypatch) -> None:
    N, D, K, lam = 60, 250, 10, 1e-2  # K × rank = 600 unknowns
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D)) / np.sqrt(D)
    T = np.eye(K)[rng.integers(0, K, N)]
    dense = fit_exact(X, T, lam)
    monkeypatch.setattr(theory, "_DENSE_NEWTON_MAX", 100)
    krylov = fit_exact(X, T, lam, W0=0.1 * rng.standard_normal((K, D)))
    np.testing.assert_allclose(krylov, dense, atol=1e-7)


def test_stationary_point_solves_fixed_point() -> None:
    N, K, lam = 40, 4, 5e-3
    rng = np.random.default_rng(2)
    X = rng.standard_normal((N, 70))
    G = X @ X.T
    Y = np.eye(K)[rng.integers(0, K, N)]
    P = stationary_point(G, Y, lam, tol=1e-12)
    np.testing.assert_allclose(P, softmax(G @ (Y - P) / (N * lam)), atol=1e-9)
    np.testing.assert_allclose(P, softmax(X @ fit_exact(X, Y, lam).T), atol=1e-8)
    # A rank-deficient Gram, given only as a matrix.
    G_low = _random_gram(N, 7, seed=1)
    P_low = stationary_point(G_low, Y, lam, tol=1e-12)
    np.testing.assert_allclose(P_low, softmax(G_low @ (Y - P_low) / (N * lam)), atol=1e-9)


def test_self_distill_exact_chains_rounds() -> None:
    data = block_features(3, 10, 0.5, 0.2, seed=0)
    X, y = data.X_train, data.y_train
    Y0 = np.eye(3)[corrupt_labels(y, corruption_matrix("sym", 3, 0.4), 0)]
    rounds = self_distill_exact(X, Y0, 1e-2, 3)
    assert len(rounds) == 3
    targets = Y0
    for W, P in rounds:
        np.testing.assert_allclose(W, fit_exact(X, targets, 1e-2), atol=1e-7)
        np.testing.assert_allclose(P, softmax(X @ W.T), atol=1e-12)
        targets = P


# Small-logit regime (|logits| ≲ 0.25): linearized and exact softmax agree on every argmax. At small λ
# the exact rounds lag the linearized theory (SPEC's example, logits ~3: see the slow test below).
SMALL_LOGITS = (4, 40, 0.2, 0.17, 0.05)  # K, n, c, d, λ


def test_closed_form_argmax_matches_exact_softmax_rounds() -> None:
    K, n, c, d, lam = SMALL_LOGITS
    data = block_features(K, n, c, d, n_test=5, seed=3)
    X, y = data.X_train, data.y_train
    Y0 = np.eye(K)[corrupt_labels(y, corruption_matrix("asym", K, 0.45), 1)]
    G = X @ X.T
    exact = self_distill_exact(X, Y0, lam, 5)
    assert np.abs(np.log(K * exact[0][1])).max() < 0.25
    for t, (W, P) in enumerate(exact, start=1):
        linear = label_averaging(G, Y0, lam, t)
        np.testing.assert_array_equal(P.argmax(1), linear.argmax(1))
        # Test points: the linearized round-t probe is W = (Y^(t−1) − Y^(t))ᵀ X / (N λ).
        W_lin = (label_averaging(G, Y0, lam, t - 1) - linear).T @ X / (K * n * lam)
        np.testing.assert_array_equal((data.X_test @ W.T).argmax(1), (data.X_test @ W_lin.T).argmax(1))


def test_thresholds_predict_exact_softmax_simulation() -> None:
    """Exact-proportion symmetric noise at every attainable η: first all-correct round of the exact
    softmax rounds equals the population prediction, including η within 0.01 of η_1 and η_2."""
    K, n, c, d, lam = SMALL_LOGITS
    data = block_features(K, n, c, d, seed=0)
    X, y = data.X_train, data.y_train
    etas = 3 * np.arange(1, 11) / n  # 0.075 ... 0.75 in steps of (K − 1)/n
    thresholds = [threshold(K, n, c, d, lam, t) for t in (1, 2, 3)]
    assert min(abs(e - h) for e in etas for h in thresholds[:2]) < 0.01  # some η sit right at η_t
    for eta in etas:
        Y0 = np.eye(K)[corrupt_labels(y, corruption_matrix("sym", K, eta), 0, exact=True)]
        simulated = _first_all_correct([P for _, P in self_distill_exact(X, Y0, lam, 4)], y)
        predicted = rounds_to_full_accuracy(K, n, c, d, lam, eta, max_rounds=4)
        assert simulated == predicted, f"eta={eta}: simulation {simulated}, theory {predicted}"
        first_over = next((t for t, h in enumerate(thresholds, start=1) if eta < h), None)
        assert predicted == first_over


# ---------------------------------------------------------------------------------------------- thresholds


def test_spec_example_numbers() -> None:
    K, n, c, d, lam = 4, 500, 0.4, 0.1, 1e-5
    assert sigma_ratio(K, n, c, d, lam) == pytest.approx(1.1327, abs=5e-5)
    assert threshold(K, n, c, d, lam, 8) == pytest.approx(0.311, abs=5e-4)
    assert threshold(K, n, c, d, lam, 11) == pytest.approx(0.495, abs=5e-4)
    assert threshold(K, n, c, d, lam, 12) == pytest.approx(0.533, abs=5e-4)
    assert threshold(K, n, c, d, lam, 7) < 0.3 < threshold(K, n, c, d, lam, 8)
    assert rounds_to_full_accuracy(K, n, c, d, lam, 0.3) == 8
    assert rounds_to_full_accuracy(K, n, c, d, lam, 0.5) == 12
    assert rounds_to_full_accuracy(K, n, c, d, lam, 0.0) == 1
    assert rounds_to_full_accuracy(K, n, c, d, lam, 0.75) is None


def test_spec_example_on_explicit_features() -> None:
    """Full size (N = 2000): exact-proportion labels, closed form on the explicit Gram."""
    K, n, c, d, lam = 4, 500, 0.4, 0.1, 1e-5
    data = block_features(K, n, c, d, rotate=False)
    G = data.X_train @ data.X_train.T
    y = data.y_train
    for eta, first in ((0.3, 8), (0.5, 12)):
        Y0 = np.eye(K)[corrupt_labels(y, corruption_matrix("sym", K, eta), 0, exact=True)]
        before, at = label_averaging(G, Y0, lam, [first - 1, first])
        assert not _all_correct(before, y)
        assert _all_correct(at, y)


@pytest.mark.slow
def test_spec_example_exact_softmax_lags_linear_theory() -> None:
    """SPEC's example trained with the exact softmax (N = 2000, ~3 min): the linearized theory says
    rounds 8 (η = 0.3) and 12 (η = 0.5); the exact rounds need 9 and 14."""
    K, n, c, d, lam = 4, 500, 0.4, 0.1, 1e-5
    data = block_features(K, n, c, d, rotate=False)
    X, y = data.X_train, data.y_train
    for eta, linear, exact in ((0.3, 8, 9), (0.5, 12, 14)):
        Y0 = np.eye(K)[corrupt_labels(y, corruption_matrix("sym", K, eta), 0, exact=True)]
        assert rounds_to_full_accuracy(K, n, c, d, lam, eta) == linear
        outputs = [P for _, P in self_distill_exact(X, Y0, lam, exact, tol=1e-9)]
        assert _first_all_correct(outputs, y) == exact


@pytest.mark.parametrize(
    "noise, K, m, e",
    [("sym", 4, None, None), ("asym", 5, None, None), ("superclass", 6, 3, None), ("superclass", 8, 4, 0.05)],
)
def test_threshold_brackets_rounds(noise: str, K: int, m: int | None, e: float | None) -> None:
    n, c, d, lam = 200, 0.4, 0.1, 2e-5
    for t in range(1, 15):
        h = threshold(K, n, c, d, lam, t, noise, m=m)
        if h < 1e-3:
            continue
        kw = dict(m=m, e=e, max_rounds=40)
        assert rounds_to_full_accuracy(K, n, c, d, lam, h - 1e-6, noise, **kw) <= t
        later = rounds_to_full_accuracy(K, n, c, d, lam, h + 1e-6, noise, **kw)
        assert later is None or later > t


def test_threshold_closed_forms() -> None:
    K, n, c, d, lam, t = 5, 50, 0.5, 0.2, 1e-4, 6
    r = sigma_ratio(K, n, c, d, lam)
    base = 1 - 1 / (r**t - 1)
    assert threshold(K, n, c, d, lam, t, "sym") == pytest.approx((K - 1) / K * base)
    assert threshold(K, n, c, d, lam, t, "asym") == pytest.approx(K / (K + 2) * base)
    assert threshold(K, n, c, d, lam, t, "superclass", m=3) == pytest.approx(2 / 3 * base)
    assert threshold(K, n, c, d, lam, 1) == 0.0  # r < 2: no positive noise rate is corrected
    with pytest.raises(ValueError, match=r"'pairflip'.*sym"):
        threshold(K, n, c, d, lam, t, "pairflip")
    with pytest.raises(ValueError, match="m ≥ 2"):
        threshold(K, n, c, d, lam, t, "superclass")
    with pytest.raises(ValueError, match="round 1 is the teacher"):
        threshold(K, n, c, d, lam, 0)


def test_condition_holds_spec_form() -> None:
    r, t = 1.3, 5
    C = corruption_matrix("asym", 4, 0.3)  # all entries positive
    g = np.diag(C)[:, None] - C
    g_off = g[~np.eye(4, dtype=bool)]
    spec = bool((g_off > 0).all() and r**t > ((1 + g_off) / g_off).max())
    assert condition_holds(C, r, t) == spec
    for tt in range(1, 12):
        assert condition_holds(C, r, tt) == (r**tt > ((1 + g_off) / g_off).max())
    assert condition_holds(np.eye(4), 1.01, 1)  # clean labels: the teacher is already right
    flipped = np.array([[0.4, 0.6], [0.0, 1.0]])  # g < 0: never
    assert not condition_holds(flipped, 10.0, 50)


@pytest.mark.parametrize("kind", ["sym", "asym", "superclass"])
def test_block_outputs_equal_closed_form_on_features(kind: str) -> None:
    """Two- and three-level features, exact-proportion labels: every instance's Y^(t) equals the
    population formula for its (true, noisy) pair."""
    K, m, n, lam = 6, 3, 12, 2e-3
    for e in (None, 0.05):
        data = block_features(K, n, 0.5, 0.2, e=e, m=None if e is None else m, seed=1)
        y = data.y_train
        sup = np.arange(K) // m
        noisy = corrupt_labels(y, corruption_matrix(kind, K, 0.5, sup), 2, exact=True)
        C = realized_matrix(y, noisy, K)
        sig = block_sigmas(K, n, 0.5, 0.2, lam, e=e, m=None if e is None else m)
        G = data.X_train @ data.X_train.T
        for t in (1, 4):
            population = block_outputs(C, sig, t, data.superclass)
            np.testing.assert_allclose(
                label_averaging(G, np.eye(K)[noisy], lam, t), population[y, noisy], atol=1e-10
            )


def test_sampled_labels_realized_fractions_decide() -> None:
    """Sampled corruption: the realized matrix (not the nominal η) predicts the closed form on the
    features round by round; condition_holds (no all-ones term) agrees almost always."""
    K, n, c, d, lam = 4, 60, 0.4, 0.1, 1e-4
    data = block_features(K, n, c, d, rotate=False)
    G, y = data.X_train @ data.X_train.T, data.y_train
    sig = block_sigmas(K, n, c, d, lam)
    r = sigma_ratio(K, n, c, d, lam)
    disagree_nominal, agree_spec, checks = 0, 0, 0
    rounds = np.arange(1, 25)
    for seed in range(6):
        noisy = corrupt_labels(y, corruption_matrix("sym", K, 0.45), seed)
        C = realized_matrix(y, noisy, K)
        for t, Y in zip(rounds, label_averaging(G, np.eye(K)[noisy], lam, rounds)):
            sim = _all_correct(Y, y)
            assert sim == block_all_correct(C, sig, t)
            agree_spec += sim == condition_holds(C, r, t)
            checks += 1
        first_sim = next(t for t in range(1, 60) if block_all_correct(C, sig, t))
        disagree_nominal += first_sim != rounds_to_full_accuracy(K, n, c, d, lam, 0.45)
    assert agree_spec >= 0.95 * checks
    assert disagree_nominal > 0  # sampled fractions really do shift the round


def test_three_level_superclass_noise_rounds() -> None:
    K, m, n, c, d, e, lam = 6, 3, 20, 0.5, 0.3, 0.05, 1e-3  # n η/(m − 1) whole for every η below
    data = block_features(K, n, c, d, e=e, m=m, seed=0)
    G, y = data.X_train @ data.X_train.T, data.y_train
    hits = 0
    for eta in (0.2, 0.4, 0.5, 0.6):
        noisy = corrupt_labels(y, corruption_matrix("superclass", K, eta, data.superclass), 0, exact=True)
        np.testing.assert_allclose(
            realized_matrix(y, noisy, K), corruption_matrix("superclass", K, eta, data.superclass)
        )
        outputs = [label_averaging(G, np.eye(K)[noisy], lam, t) for t in range(1, 9)]
        predicted = rounds_to_full_accuracy(K, n, c, d, lam, eta, "superclass", m=m, e=e, max_rounds=8)
        assert _first_all_correct(outputs, y) == predicted
        hits += predicted is not None and predicted > 1
    assert hits >= 2


# ------------------------------------------------------------------------------------------- exact dynamics


@pytest.mark.parametrize(
    "noise, K, n, c, d, e, m, lam, exact",
    [
        ("sym", 4, 20, 0.4, 0.1, None, None, 2.6e-4, True),  # counts n C_kl whole: the population
        ("sym", 4, 50, 0.4, 0.1, None, None, 1e-4, False),  # sampled labels: their realized fractions
        ("superclass", 12, 12, 0.5, 0.3, 0.1, 3, 1e-3, True),  # three levels
    ],
)
def test_block_exact_outputs_equal_the_exact_solver_on_the_features(
    noise: str, K: int, n: int, c: float, d: float, e: float | None, m: int | None, lam: float, exact: bool
) -> None:
    """The type-reduced exact rounds (one small weighted fit per round) give every training instance
    the output the exact solver gives it on the explicit block features, round after round."""
    data = block_features(K, n, c, d, e=e, m=m, rotate=False)
    superclass = None if m is None else np.arange(K) // m
    y_given = corrupt_labels(data.y_train, corruption_matrix(noise, K, 0.3, superclass), 0, exact=exact)
    C = realized_matrix(data.y_train, y_given, K)
    simulated = self_distill_exact(data.X_train, np.eye(K)[y_given], lam, 3, tol=1e-10)
    reduced = theory.block_exact_outputs(C, n, c, d, lam, 3, e=e, m=m)
    for t, (_, P) in enumerate(simulated):
        np.testing.assert_allclose(reduced[t, data.y_train, y_given], P, atol=1e-9)
        assert theory.all_right(reduced[t]) == _all_correct(P, data.y_train)
    assert np.isnan(reduced[0][C == 0]).all()  # no instance of that (true class, label) type


def test_spec_example_exact_dynamics_lag_the_linearized_theory() -> None:
    """SPEC's example at the population level: the exact dynamics need rounds 9 (η = 0.3) and 14
    (η = 0.5), as the exact solver on the 2,000 explicit features does (the slow test above), where the
    linearized theory says 8 and 12; its thresholds sit below the linearized ones and bracket the
    exact first rounds."""
    K, n, c, d, lam = 4, 500, 0.4, 0.1, 1e-5
    assert theory.exact_rounds_to_full_accuracy(K, n, c, d, lam, 0.3) == 9
    assert theory.exact_rounds_to_full_accuracy(K, n, c, d, lam, 0.5) == 14
    assert theory.exact_rounds_to_full_accuracy(K, n, c, d, lam, 0.0) == 1
    for t in (8, 12):
        exact = theory.exact_threshold(K, n, c, d, lam, t)
        assert 0 < exact < threshold(K, n, c, d, lam, t) - 0.02
        assert theory.exact_rounds_to_full_accuracy(K, n, c, d, lam, exact - 1e-3, max_rounds=t) == t
        first = theory.exact_rounds_to_full_accuracy(K, n, c, d, lam, exact + 1e-3, max_rounds=20)
        assert first is None or first > t
    assert theory.exact_threshold(K, n, c, d, lam, 1) == 0.0  # the teacher memorizes any noise
    with pytest.raises(ValueError, match="round t must be ≥ 1"):
        theory.exact_threshold(K, n, c, d, lam, 0)
