"""SD-PLL theory: label averaging in closed form, exact softmax rounds, and 100%-accuracy thresholds.

Orientation used throughout: samples are rows. X [N, D] holds one feature φ_i per row, G = X Xᵀ is
the N×N sample Gram (SPEC's Φᵀ Φ with Φ = Xᵀ), Y [N, K] holds one target distribution per row, and a
probe W [K, D] gives logits X Wᵀ [N, K]. One round minimizes

    (1/N) Σ_i CE(Y_i, softmax(W φ_i)) + (λ/2) ‖W‖²;

round 1 (the teacher) uses the given labels Y^(0), round t ≥ 2 the softmax outputs of round t − 1 on
the training set. Setting the gradient to zero gives W = (Y − P)ᵀ X / (N λ), so the round's training
outputs P solve P = softmax(G (Y − P) / (N λ)). Linearizing softmax(z) ≈ 1/K + z/K (the logits of a
stationary point sum to zero per row) gives P − 1/K = (G + K N λ I)⁻¹ G (Y − 1/K), hence after t rounds

    Y^(t) = (1/K) 1 1ᵀ + (Σ_i σ_i^t v_i v_iᵀ) (Y^(0) − (1/K) 1 1ᵀ),   σ_i = μ_i / (μ_i + K N λ),

with G = Σ_i μ_i v_i v_iᵀ. The sample-space operator acts on the left because Y is [N, K] here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize

from phis.selfdistill.blockmodel import block_gram_eigen
from phis.selfdistill.corruption import NOISE_KINDS, corruption_matrix

# Differences of label fractions below this are rounding of counts / n, treated as exact zeros.
_FRACTION_TOL = 1e-12
# Dense Newton up to this many unknowns (K × rank); Newton-CG with Hessian-vector products above.
_DENSE_NEWTON_MAX = 2000


def softmax(Z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits Z [N, K]."""
    E = np.exp(Z - Z.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def _check_targets(Y: np.ndarray, N: int) -> np.ndarray:
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[0] != N:
        raise ValueError(f"targets must be [N={N}, K] distributions, got shape {Y.shape}")
    if not np.allclose(Y.sum(1), 1.0, atol=1e-8) or (Y < -1e-12).any():
        raise ValueError("every target row must be a probability distribution (non-negative, sums to 1)")
    return Y


def _check_lam(lam: float) -> float:
    if not lam > 0:
        raise ValueError(f"weight decay lam must be > 0, got {lam}")
    return float(lam)


def _gram_eigh(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD Gram [N, N]: μ [N] (clipped at 0), V [N, N]."""
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square [N, N] Gram matrix, got shape {G.shape}")
    mu, V = np.linalg.eigh((G + G.T) / 2)
    return np.maximum(mu, 0.0), V


def label_averaging(G: np.ndarray, Y0: np.ndarray, lam: float, t: int | Sequence[int]) -> np.ndarray:
    """Y^(t) of the linearized dynamics: G [N, N] sample Gram, Y0 [N, K] given labels.

    Returns [N, K] for one round t, [len(t), N, K] for several (one eigen-decomposition for all).
    """
    mu, V = _gram_eigh(G)
    Y0 = _check_targets(Y0, G.shape[0])
    ts = np.asarray(t)
    if (ts < 0).any():
        raise ValueError(f"rounds t must be ≥ 0, got {t}")
    N, K = Y0.shape
    sigma = mu / (mu + K * N * _check_lam(lam))
    coords = V.T @ (Y0 - 1.0 / K)  # [N, K] in the eigenbasis
    out = np.stack([1.0 / K + V @ (sigma[:, None] ** s * coords) for s in ts.reshape(-1)])
    return out if ts.ndim else out[0]


def eigen_decay(G: np.ndarray, K: int, N: int, lam: float, t: int | Sequence[int]) -> np.ndarray:
    """σ_i^t for the eigenvalues of G sorted descending: [N_G] for one t, [len(t), N_G] for several.

    N is the number of training samples entering K N λ; it is separate from G's size so that the
    D×D feature second-moment matrix Xᵀ X (same non-zero spectrum as the Gram) can be passed too.
    """
    mu = _gram_eigh(G)[0][::-1]
    sigma = mu / (mu + K * N * _check_lam(lam))
    ts = np.asarray(t, dtype=np.float64)
    return sigma[None, :] ** ts.reshape(-1, 1) if ts.ndim else sigma**ts


def _objective(
    w: np.ndarray, F: np.ndarray, T: np.ndarray, lam: float, rows: np.ndarray
) -> tuple[float, np.ndarray]:
    """Round objective and gradient in coordinates F [N, r], W [K, r] flattened; ``rows`` [N] weighs
    each row's loss (1/N each: the mean)."""
    K = T.shape[1]
    W = w.reshape(K, -1)
    Z = F @ W.T
    zmax = Z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(Z - zmax).sum(1))
    P = np.exp(Z - lse[:, None])
    f = rows @ (lse - (T * Z).sum(1)) + 0.5 * lam * (W * W).sum()
    grad = (P - T).T @ (F * rows[:, None]) + lam * W
    return f, grad.ravel()


def _hessian_product(
    w: np.ndarray, v: np.ndarray, F: np.ndarray, lam: float, K: int, rows: np.ndarray
) -> np.ndarray:
    """Hessian of the round objective times v, without forming the Hessian."""
    P = softmax(F @ w.reshape(K, -1).T)
    V = v.reshape(K, -1)
    Zv = F @ V.T
    S = P * (Zv - (P * Zv).sum(1, keepdims=True))
    return (S.T @ (F * rows[:, None]) + lam * V).ravel()


def _dense_hessian(W: np.ndarray, F: np.ndarray, lam: float, rows: np.ndarray) -> np.ndarray:
    """Hessian [K r, K r] of the round objective at W [K, r]."""
    r = F.shape[1]
    K = W.shape[0]
    P = softmax(F @ W.T)
    H = np.empty((K, r, K, r))
    for a in range(K):
        for b in range(a, K):
            weight = rows * P[:, a] * ((a == b) - P[:, b])
            block = F.T @ (F * weight[:, None])
            H[a, :, b, :] = block
            H[b, :, a, :] = block.T
    H = H.reshape(K * r, K * r)
    H[np.diag_indices_from(H)] += lam
    return H


def _newton(
    F: np.ndarray, T: np.ndarray, lam: float, w: np.ndarray, tol: float, rows: np.ndarray
) -> np.ndarray:
    """Damped Newton with Armijo backtracking until the largest gradient entry is ≤ tol."""
    K = T.shape[1]
    f, g = _objective(w, F, T, lam, rows)
    for _ in range(500):
        if np.abs(g).max() <= tol:
            return w
        H = _dense_hessian(w.reshape(K, -1), F, lam, rows)
        step = -np.linalg.solve(H, g)
        slope = g @ step
        alpha = 1.0
        while True:
            f_new, g_new = _objective(w + alpha * step, F, T, lam, rows)
            if f_new <= f + 1e-4 * alpha * slope:
                break
            # Near the optimum the decrease is below float64 rounding of f; then trust the gradient.
            if abs(f_new - f) <= 1e-13 * max(1.0, abs(f)) and np.abs(g_new).max() < np.abs(g).max():
                break
            alpha *= 0.5
            if alpha < 1e-12:
                raise RuntimeError(f"Newton line search stalled at gradient {np.abs(g).max():.3e}")
        w, f, g = w + alpha * step, f_new, g_new
    raise RuntimeError(f"Newton did not reach gradient {tol:g} in 500 steps ({np.abs(g).max():.3e})")


def _fit_coordinates(
    F: np.ndarray,
    T: np.ndarray,
    lam: float,
    W0: np.ndarray | None,
    tol: float,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Exact round minimizer W [K, r] for features F [N, r]; ``rows`` [N] weighs the rows' losses
    (default: the mean, 1/N each)."""
    N, r = F.shape
    K = T.shape[1]
    rows = np.full(N, 1.0 / N) if rows is None else np.asarray(rows, dtype=np.float64)
    w0 = np.zeros(K * r) if W0 is None else np.asarray(W0, dtype=np.float64).ravel()
    if K * r <= _DENSE_NEWTON_MAX:
        return _newton(F, T, lam, w0, tol, rows).reshape(K, r)
    res = minimize(
        _objective,
        w0,
        args=(F, T, lam, rows),
        jac=True,
        hessp=lambda w, v, *args: _hessian_product(w, v, F, lam, K, rows),
        method="trust-ncg",
        options={"gtol": tol, "maxiter": 10_000},
    )
    if np.abs(res.jac).max() > tol:
        raise RuntimeError(
            f"Newton-CG stopped at gradient {np.abs(res.jac).max():.3e} > tol={tol:g} ({res.message}); "
            "loosen tol or rescale the features"
        )
    return res.x.reshape(K, r)


def fit_exact(
    X: np.ndarray, targets: np.ndarray, lam: float, W0: np.ndarray | None = None, tol: float = 1e-10
) -> np.ndarray:
    """Exact minimizer W [K, D] of one round for X [N, D], targets [N, K] (float64, convex).

    Stops when every gradient entry is ≤ tol. When D > N the problem is solved in the row space of X
    (thin SVD X = U S Vᵀ, features U S), where the minimizer lies by the representer theorem.
    Dense Newton for up to 2000 unknowns, Newton-CG (trust region, exact Hessian products) above.
    """
    X = np.asarray(X, dtype=np.float64)
    N, D = X.shape
    T = _check_targets(targets, N)
    lam = _check_lam(lam)
    if D <= N:
        return _fit_coordinates(X, T, lam, W0, tol)
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    keep = S > S[0] * 1e-12
    F, Vt = U[:, keep] * S[keep], Vt[keep]
    W0_reduced = None if W0 is None else np.asarray(W0, dtype=np.float64) @ Vt.T
    return _fit_coordinates(F, T, lam, W0_reduced, tol) @ Vt


def stationary_point(G: np.ndarray, Y_prev: np.ndarray, lam: float, tol: float = 1e-10) -> np.ndarray:
    """Training softmax outputs P [N, K] of the exact round minimizer, from the Gram alone.

    P solves P = softmax(G (Y_prev − P) / (N λ)). It is found by minimizing the (convex) round
    objective over features F = V diag(√μ) with F Fᵀ = G, whose stationarity condition is exactly
    this fixed point; tol bounds the objective's gradient.
    """
    mu, V = _gram_eigh(G)
    T = _check_targets(Y_prev, G.shape[0])
    keep = mu > mu.max() * 1e-12
    F = V[:, keep] * np.sqrt(mu[keep])
    return softmax(F @ _fit_coordinates(F, T, _check_lam(lam), None, tol).T)


def self_distill_exact(
    X: np.ndarray, Y0: np.ndarray, lam: float, rounds: int, tol: float = 1e-10
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W [K, D], training softmax outputs [N, K]) for rounds 1..rounds, each trained to optimality.

    Round 1 fits Y0 [N, K]; round t fits round t − 1's outputs. Each round's minimizer is unique, so
    warm-starting from the previous W only saves iterations.
    """
    if rounds < 1:
        raise ValueError(f"need rounds ≥ 1, got {rounds}")
    X = np.asarray(X, dtype=np.float64)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    targets, W = Y0, None
    for _ in range(rounds):
        W = fit_exact(X, targets, lam, W0=W, tol=tol)
        targets = softmax(X @ W.T)
        out.append((W, targets))
    return out


def block_sigmas(
    K: int, n: int, c: float, d: float, lam: float, *, e: float | None = None, m: int | None = None
) -> dict[str, float]:
    """σ = μ / (μ + K N λ) per block-model eigenvalue: keys ins, cls, ones (and sup for three levels)."""
    eig = block_gram_eigen(K, n, c, d, e=e, m=m)
    scale = K * K * n * _check_lam(lam)
    mus = {"ins": eig.mu_ins, "cls": eig.mu_cls, "ones": eig.mu_ones}
    if eig.mu_sup is not None:
        mus["sup"] = eig.mu_sup
    return {k: mu / (mu + scale) for k, mu in mus.items()}


def sigma_ratio(K: int, n: int, c: float, d: float, lam: float) -> float:
    """r = σ_cls / σ_ins of the block model (the same for three levels: e does not enter)."""
    s = block_sigmas(K, n, c, d, lam)
    return s["cls"] / s["ins"]


def _block_terms(C: np.ndarray, superclass: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-eigenspace parts of Y^(0) − 1/K for an instance of true class k with noisy label l: [K, K, K]
    indexed (k, l, j). Y^(t) − 1/K is Σ_x σ_x^t part_x on the balanced block model."""
    C = np.asarray(C, dtype=np.float64)
    K = C.shape[0]
    f = C.mean(0)  # overall fraction carrying each label
    parts = {
        "ones": np.broadcast_to(f - 1.0 / K, (K, K, K)),
        "ins": np.eye(K)[None, :, :] - C[:, None, :],
    }
    if superclass is None:
        parts["cls"] = np.broadcast_to((C - f)[:, None, :], (K, K, K))
    else:
        sup = np.asarray(superclass)
        same = (sup[:, None] == sup[None, :]).astype(np.float64)
        s = same @ C / same.sum(1, keepdims=True)  # row k: label fractions of k's superclass
        parts["sup"] = np.broadcast_to((s - f)[:, None, :], (K, K, K))
        parts["cls"] = np.broadcast_to((C - s)[:, None, :], (K, K, K))
    return parts


def block_outputs(
    C: np.ndarray, sigmas: dict[str, float], t: int, superclass: np.ndarray | None = None
) -> np.ndarray:
    """Linearized Y^(t) [K, K, K] on the block model: row (k, l) is the output for an instance of true
    class k labelled l, given the realized corruption matrix C (labels as fractions of balanced
    classes) and ``block_sigmas``; pass the feature superclasses for three levels."""
    parts = _block_terms(C, superclass)
    K = np.asarray(C).shape[0]
    return 1.0 / K + sum(sigmas[x] ** t * part for x, part in parts.items())


def block_all_correct(
    C: np.ndarray, sigmas: dict[str, float], t: int, superclass: np.ndarray | None = None
) -> bool:
    """Whether every training instance's round-t output (linearized) has its true class as strict argmax.

    Margins out[k] − out[j] are rescaled by the largest σ^t that enters them, so nothing under- or
    overflows for large t; fraction differences below 1e-12 count as exact zeros.
    """
    C = np.asarray(C, dtype=np.float64)
    K = C.shape[0]
    diag = np.arange(K)
    log_rate, coef = [], []
    for x, part in _block_terms(C, superclass).items():
        margin = part[diag, :, diag][:, :, None] - part  # [k, l, j]
        margin = np.where(np.abs(margin) < _FRACTION_TOL, 0.0, margin)
        log_rate.append(t * np.log(sigmas[x]))
        coef.append(margin)
    coef_arr = np.stack(coef)
    log_w = np.where(coef_arr != 0, np.asarray(log_rate)[:, None, None, None], -np.inf)
    top = log_w.max(0)
    with np.errstate(invalid="ignore"):
        scaled = np.where(coef_arr != 0, coef_arr * np.exp(log_w - top), 0.0).sum(0)
    present = (C > 0)[:, :, None] & ~np.eye(K, dtype=bool)[:, None, :]
    return bool((scaled[present] > 0).all())


def condition_holds(C: np.ndarray, r: float, t: int) -> bool:
    """SPEC's criterion: every instance is predicted as its true class at round t iff, with
    g_kj = C_kk − C_kj, (r^t − 1) g_kj + [l = k] − [l = j] > 0 for all j ≠ k and every label l present
    in class k (C_kl > 0).

    With every C_kj > 0 this is "all g_kj > 0 and r^t > max (1 + g_kj)/g_kj"; pairs whose label never
    occurs only need g_kj > 0 (or nothing, for a clean class). It ignores the all-ones (and superclass)
    eigen-directions, so on the two-level block model it is exact for column-balanced C and an
    approximation for realized sampled fractions, where ``block_all_correct`` is exact.
    """
    C = np.asarray(C, dtype=np.float64)
    K = C.shape[0]
    g = np.diag(C)[:, None] - C
    g = np.where(np.abs(g) < _FRACTION_TOL, 0.0, g)
    with np.errstate(over="ignore"):
        grow = np.power(np.float64(r), t) - 1.0
    lead = np.where(g == 0, 0.0, grow * g)  # [k, j]
    eye = np.eye(K)
    margin = lead[:, None, :] + eye[:, :, None] - eye[None, :, :]  # [k, l, j]: + [l = k] − [l = j]
    present = (C > 0)[:, :, None] & ~eye.astype(bool)[:, None, :]
    return bool((margin[present] > 0).all())


def _noise_scale(noise: str, K: int, m: int | None) -> float:
    """κ in η_t = κ (1 − 1/(r^t − 1)): the noise rate at which the smallest g_kj reaches zero."""
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise!r}; choose one of {NOISE_KINDS}")
    if noise == "sym":
        return (K - 1) / K
    if noise == "asym":
        return K / (K + 2)
    if m is None or m < 2:
        raise ValueError(f"superclass noise needs superclass size m ≥ 2, got m={m}")
    return (m - 1) / m


def threshold(
    K: int, n: int, c: float, d: float, lam: float, t: int, noise: str = "sym", *, m: int | None = None
) -> float:
    """η_t: the largest noise rate (exclusive) at which round t predicts every training instance right.

    η_t = κ (1 − 1/(r^t − 1)) with κ = (K − 1)/K (sym), K/(K + 2) (asym), (m − 1)/m (superclass, size
    m); 0 when r^t ≤ 2 (no positive noise rate is fully corrected yet). Round 1 is the teacher. The
    three-level model has the same threshold when m ≥ 2: the binding pair lies inside a superclass.
    """
    if t < 1:
        raise ValueError(f"round t must be ≥ 1 (round 1 is the teacher), got {t}")
    kappa = _noise_scale(noise, K, m)
    with np.errstate(over="ignore"):
        grow = np.power(np.float64(sigma_ratio(K, n, c, d, lam)), t) - 1.0
    return float(kappa * (1.0 - 1.0 / grow)) if grow > 1.0 else 0.0


def rounds_to_full_accuracy(
    K: int,
    n: int,
    c: float,
    d: float,
    lam: float,
    eta: float,
    noise: str = "sym",
    *,
    m: int | None = None,
    e: float | None = None,
    max_rounds: int = 200,
) -> int | None:
    """First round t (1 = teacher, 2 = first student) at which every training instance is predicted
    right at the population level (exact-proportion corruption), or None within max_rounds.

    With ``e`` the features are three-level with superclasses of m consecutive classes; ``m`` also sets
    the superclass noise's superclasses (m consecutive classes, K divisible by m).
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise!r}; choose one of {NOISE_KINDS}")
    if m is not None and (m < 1 or K % m):
        raise ValueError(f"superclass size m={m} must divide K={K}")
    superclass = None if m is None else np.arange(K) // m
    if noise == "superclass" and superclass is None:
        raise ValueError("superclass noise needs the superclass size m")
    C = corruption_matrix(noise, K, eta, superclass)
    sigmas = block_sigmas(K, n, c, d, lam, e=e, m=m if e is not None else None)
    feature_sup = superclass if e is not None else None
    for t in range(1, max_rounds + 1):
        if block_all_correct(C, sigmas, t, feature_sup):
            return t
    return None


def block_exact_outputs(
    C: np.ndarray,
    n: int,
    c: float,
    d: float,
    lam: float,
    rounds: int,
    *,
    e: float | None = None,
    m: int | None = None,
    tol: float = 1e-10,
) -> np.ndarray:
    """Training outputs [rounds, K, K, K] of the exact (softmax) rounds on the block model with n
    instances per class labelled in exactly C's proportions (the population level, counts n C_kl need
    not be whole): entry (t, k, l) is round t + 1's output for an instance of true class k labelled l
    (NaN where C_kl = 0: no such instance).

    By symmetry the instances of one (k, l) type share their outputs, and the round's stationary
    condition P_i = softmax(Σ_j G_ij (Y_j − P_j) / (N λ)) only sums them per type. It is the stationary
    condition of one CE problem over the types, each weighed by its count n_τ / N, with features of
    Gram (1 − c)/n_τ [τ = τ'] + the class, superclass and shared terms of G, so each round is one small
    convex fit (``_fit_coordinates``), solved exactly; nothing is linearized.
    """
    C = np.asarray(C, dtype=np.float64)
    K = C.shape[0]
    block_gram_eigen(K, n, c, d, e=e, m=m)  # checks the parameters
    if rounds < 1:
        raise ValueError(f"need rounds ≥ 1, got {rounds}")
    k, l = np.nonzero(C > _FRACTION_TOL)
    counts = n * C[k, l]
    n_types, n_sup = len(k), 0 if m is None else K // m
    F = np.zeros((n_types, 1 + n_sup + K + n_types))
    F[:, 0] = np.sqrt(d if e is None else e)
    types = np.arange(n_types)
    if m is not None:
        F[types, 1 + k // m] = np.sqrt(d - e)
    F[types, 1 + n_sup + k] = np.sqrt(c - d)
    F[types, 1 + n_sup + K + types] = np.sqrt((1.0 - c) / counts)
    Y, W = np.eye(K)[l], None
    out = np.full((rounds, K, K, K), np.nan)
    for t in range(rounds):
        W = _fit_coordinates(F, Y, _check_lam(lam), W, tol, rows=counts / (K * n))
        Y = softmax(F @ W.T)
        out[t, k, l] = Y
    return out


def all_right(outputs: np.ndarray) -> bool:
    """Whether every (true class k, label l) row of ``block_exact_outputs``' [K, K, K] that has
    instances puts its largest output, strictly, on k."""
    K = outputs.shape[0]
    rows = ~np.isnan(outputs[:, :, 0])
    diag = np.arange(K)
    margin = outputs[diag, :, diag][:, :, None] - outputs  # [k, l, j]: out[k, l, k] − out[k, l, j]
    margin[diag, :, diag] = np.inf
    return bool((margin[rows] > _FRACTION_TOL).all())


def exact_rounds_to_full_accuracy(
    K: int,
    n: int,
    c: float,
    d: float,
    lam: float,
    eta: float,
    noise: str = "sym",
    *,
    m: int | None = None,
    e: float | None = None,
    max_rounds: int = 30,
) -> int | None:
    """``rounds_to_full_accuracy`` for the exact (softmax) dynamics (``block_exact_outputs``): the
    first round at which every training instance is predicted right, or None within max_rounds."""
    superclass = None if m is None else np.arange(K) // m
    C = corruption_matrix(noise, K, eta, superclass)
    outputs = block_exact_outputs(C, n, c, d, lam, max_rounds, e=e, m=m if e is not None else None)
    return next((t + 1 for t in range(max_rounds) if all_right(outputs[t])), None)


def exact_threshold(
    K: int,
    n: int,
    c: float,
    d: float,
    lam: float,
    t: int,
    noise: str = "sym",
    *,
    m: int | None = None,
    resolution: float = 1e-4,
) -> float:
    """``threshold`` for the exact (softmax) dynamics on the two-level block model: the largest noise
    rate η (to ``resolution``, found by bisection) at which round t still predicts every training
    instance right at the population level; 0 when no positive rate is fully corrected."""
    if t < 1:
        raise ValueError(f"round t must be ≥ 1 (round 1 is the teacher), got {t}")
    superclass = None if m is None else np.arange(K) // m

    def right(eta: float) -> bool:
        C = corruption_matrix(noise, K, eta, superclass)
        return all_right(block_exact_outputs(C, n, c, d, lam, t)[-1])

    lo, hi = 0.0, _noise_scale(noise, K, m)  # every g_kj is 0 at hi: nothing is right there
    if not right(resolution):
        return 0.0
    lo = resolution
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if right(mid) else (lo, mid)
    return lo
