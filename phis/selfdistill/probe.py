"""Linear softmax probes without bias, and the SD-PLL training procedures built from them.

A probe W [K, D] maps features X [N, D] to logits X Wᵀ and is fit to minimize
(1/N) Σ_i loss(target_i, softmax(W φ_i)) + (λ/2) ‖W‖². Two ways to fit:
- ``exact``: to optimality in float64 (``theory.fit_exact`` for cross-entropy, which is convex; L-BFGS
  from the given start for the non-convex GCE loss, i.e. the local minimum the teacher init leads to);
- ``sgd``: the paper's recipe (SGD, momentum 0.9, batch 128, 200 epochs, LR × 0.98 after each epoch,
  weight decay = λ) in float32, minibatches sliced from one shuffled tensor per epoch, with analytic
  gradients (the update equals ``torch.optim.SGD`` with the same settings).

``self_distill`` runs a teacher on the given labels, then students that each start from scratch on
the previous round's training-set softmax outputs (temperature 1), and optionally the PLL student:
top-2 classes of the teacher's softmax, ½ each, initialized from the teacher.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from phis.selfdistill.theory import fit_exact, softmax

SOLVERS = ("exact", "sgd")
PLL_LOSSES = ("gce", "ce")
PLL_ROWS = {"gce": "PLL", "ce": "PLL-CE"}  # table row of the PLL student trained with each loss
# Logits closer than this fraction of a row's logit range are a tie. Ties are real here: a PLL
# student whose two candidates get the same two-hot target on every instance (superclasses of size 2)
# has equal logits for them up to solver precision, and its argmax is then decided by round-off.
TIE_RTOL = 1e-5


@dataclass(frozen=True)
class SGDRecipe:
    """The paper's optimizer settings; weight decay is λ, passed separately."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    lr_decay: float = 0.98


@dataclass
class ProbeFit:
    """A fitted probe and, for SGD, the test accuracy after every epoch."""

    W: np.ndarray  # [K, D] float64
    test_acc_per_epoch: np.ndarray | None = None  # [epochs]


@dataclass
class ModelReport:
    """Accuracies of one model of a self-distillation run (fractions in [0, 1]).

    ``test_acc_best`` is the best test accuracy over epochs (the official code's selection on the test
    set); for full-batch solvers there are no epochs and it equals ``test_acc_last``.
    """

    name: str
    test_acc_last: float
    test_acc_best: float
    train_acc_true: float  # w.r.t. the true labels: the theory's "every instance predicted right"
    train_acc_given: float  # w.r.t. the (possibly corrupted) labels the teacher saw
    train_tied: float  # fraction of training instances with tied top logits (see ``accuracy``)
    seconds: float = 0.0


@dataclass
class SDRun:
    """All models of one run, teacher first, PLL last; ``outputs`` are training softmax outputs."""

    reports: list[ModelReport]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # name → [N, K]


def one_hot(y: np.ndarray, K: int) -> np.ndarray:
    """One-hot targets [N, K] float64 for labels y [N]."""
    return np.eye(K)[np.asarray(y, dtype=np.int64)]


def two_hot(P: np.ndarray, seed: int = 0, tie_tol: float = 1e-9) -> np.ndarray:
    """PLL targets [N, K]: ½ on each of the two largest entries of every row of P [N, K].

    Entries within ``tie_tol`` of each other are tied and the tie is broken at random (seeded): on
    symmetric data (the block model's clean instances, whose other classes are exactly alike) any
    fixed rule, e.g. lowest index first, would hand every instance the same second candidate.
    """
    jitter = np.random.default_rng(seed).random(P.shape)
    top2 = np.argsort(-(P + tie_tol * jitter), axis=1, kind="stable")[:, :2]
    T = np.zeros_like(P, dtype=np.float64)
    np.put_along_axis(T, top2, 0.5, axis=1)
    return T


def accuracy(X: np.ndarray, W: np.ndarray, y: np.ndarray) -> float:
    """Argmax accuracy of W [K, D] on X [N, D] against y [N] (NaN when N = 0), a tie among the top
    logits counting as 1/(size of the tie) when y is in it: the expected accuracy of a fair coin flip,
    instead of whatever round-off picks."""
    if len(y) == 0:
        return math.nan
    top = _top_set(X @ W.T)
    return float(np.mean(top[np.arange(len(y)), y] / top.sum(axis=1)))


def tie_fraction(X: np.ndarray, W: np.ndarray) -> float:
    """Fraction of rows of X [N, D] whose largest logits are tied (NaN when N = 0)."""
    return float(np.mean(_top_set(X @ W.T).sum(axis=1) > 1)) if len(X) else math.nan


def _top_set(Z: np.ndarray) -> np.ndarray:
    """[N, K] mask of the logits within TIE_RTOL × (row range) of the row maximum."""
    zmax = Z.max(axis=1, keepdims=True)
    return Z >= zmax - TIE_RTOL * (zmax - Z.min(axis=1, keepdims=True))


def logit_grad(logits: torch.Tensor, targets: torch.Tensor, loss: str, q: float) -> torch.Tensor:
    """d loss / d logits [B, K] per sample for soft targets [B, K].

    ce: Σ_k −t_k log p_k → p − t. gce: Σ_k t_k (1 − p_k^q)/q → with a_k = t_k p_k^q, p Σ_k a_k − a
    (from ∂p_k/∂z_j = p_k (δ_kj − p_j)).
    """
    p = torch.softmax(logits, dim=1)
    if loss == "ce":
        return p - targets
    a = targets * p.pow(q)
    return p * a.sum(1, keepdim=True) - a


def objective(
    X: np.ndarray, T: np.ndarray, W: np.ndarray, lam: float, loss: str = "ce", q: float = 0.7
) -> float:
    """The regularized training objective at W [K, D] (float64), for checks and solver tests."""
    Z = X @ W.T
    if loss == "ce":
        zmax = Z.max(1, keepdims=True)
        logp = Z - zmax - np.log(np.exp(Z - zmax).sum(1, keepdims=True))
        data = -(T * logp).sum(1).mean()
    else:
        data = (T * (1.0 - softmax(Z) ** q) / q).sum(1).mean()
    return float(data + 0.5 * lam * (W * W).sum())


def fit_sgd(
    X: np.ndarray,
    targets: np.ndarray,
    lam: float,
    recipe: SGDRecipe,
    *,
    loss: str = "ce",
    q: float = 0.7,
    W0: np.ndarray | None = None,
    seed: int = 0,
    X_eval: np.ndarray | None = None,
    y_eval: np.ndarray | None = None,
) -> ProbeFit:
    """The paper's SGD recipe on X [N, D], targets [N, K]; starts from W0 or nn.Linear's default init."""
    _check_loss(loss)
    gen = torch.Generator().manual_seed(seed)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    Tt = torch.as_tensor(targets, dtype=torch.float32)
    N, D = Xt.shape
    K = Tt.shape[1]
    if W0 is None:  # nn.Linear's default: U(−1/√D, 1/√D)
        W = (torch.rand(K, D, generator=gen, dtype=torch.float32) * 2 - 1) / math.sqrt(D)
    else:
        W = torch.as_tensor(W0, dtype=torch.float32).clone()
    Xe = None if X_eval is None or len(y_eval) == 0 else torch.as_tensor(X_eval, dtype=torch.float32)
    ye = None if Xe is None else torch.as_tensor(y_eval)
    momentum_buf = torch.zeros_like(W)
    lr = recipe.lr
    curve = np.full(recipe.epochs, np.nan)
    for epoch in range(recipe.epochs):
        perm = torch.randperm(N, generator=gen)
        for start in range(0, N, recipe.batch_size):
            idx = perm[start : start + recipe.batch_size]
            xb = Xt[idx]  # [B, D]
            grad = logit_grad(xb @ W.T, Tt[idx], loss, q).T @ xb / len(idx) + lam * W
            momentum_buf.mul_(recipe.momentum).add_(grad)
            W.sub_(lr * momentum_buf)
        lr *= recipe.lr_decay
        if Xe is not None:
            curve[epoch] = ((Xe @ W.T).argmax(1) == ye).double().mean().item()
    return ProbeFit(W.double().numpy(), curve if Xe is not None else None)


def fit_gce_full_batch(
    X: np.ndarray, targets: np.ndarray, lam: float, W0: np.ndarray, q: float = 0.7, tol: float = 1e-9
) -> np.ndarray:
    """Full-batch float64 L-BFGS on the GCE objective from W0 [K, D]: the local minimum W0 leads to."""
    Xt = torch.as_tensor(X, dtype=torch.float64)
    Tt = torch.as_tensor(targets, dtype=torch.float64)
    W = torch.as_tensor(W0, dtype=torch.float64).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W],
        lr=1.0,
        max_iter=5000,
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        p = torch.softmax(Xt @ W.T, dim=1)
        value = (Tt * (1 - p.pow(q)) / q).sum(1).mean() + 0.5 * lam * (W * W).sum()
        value.backward()
        return value

    opt.step(closure)
    return W.detach().numpy()


def _check_loss(loss: str) -> None:
    if loss not in PLL_LOSSES:
        raise ValueError(f"unknown probe loss {loss!r}; choose one of {list(PLL_LOSSES)}")


def fit_probe(
    X: np.ndarray,
    targets: np.ndarray,
    lam: float,
    solver: str,
    *,
    recipe: SGDRecipe | None = None,
    loss: str = "ce",
    q: float = 0.7,
    W0: np.ndarray | None = None,
    seed: int = 0,
    tol: float = 1e-8,
    X_eval: np.ndarray | None = None,
    y_eval: np.ndarray | None = None,
) -> ProbeFit:
    """Fit one probe with the chosen solver; ``W0`` is a warm start (exact) or the initialization (SGD)."""
    _check_loss(loss)
    if solver == "sgd":
        recipe = recipe or SGDRecipe()
        return fit_sgd(
            X, targets, lam, recipe, loss=loss, q=q, W0=W0, seed=seed, X_eval=X_eval, y_eval=y_eval
        )
    if solver != "exact":
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    if loss == "ce":
        return ProbeFit(fit_exact(X, targets, lam, W0=W0, tol=tol))
    if W0 is None:
        raise ValueError("the GCE loss is not convex: the exact solver needs an initialization W0")
    return ProbeFit(fit_gce_full_batch(X, targets, lam, W0, q=q, tol=tol))


def self_distill(
    X_train: np.ndarray,
    y_given: np.ndarray,
    y_true: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    lam: float,
    num_classes: int,
    *,
    rounds: int = 5,
    solver: str = "exact",
    recipe: SGDRecipe | None = None,
    pll_losses: Sequence[str] = ("gce",),
    q: float = 0.7,
    seed: int = 0,
    tol: float = 1e-8,
    keep_outputs: bool = False,
) -> SDRun:
    """Teacher (round 1) + ``rounds − 1`` students, then one PLL student per loss in ``pll_losses``.

    Rows are named "Teacher", "2", ..., str(rounds), then "PLL" (GCE) / "PLL-CE". Exact rounds are
    warm-started from the previous round's W; each round's minimizer is unique, so that only saves
    iterations.
    """
    if rounds < 1:
        raise ValueError(f"need rounds ≥ 1 (the teacher), got {rounds}")
    for loss in pll_losses:
        _check_loss(loss)
    run = SDRun([])
    targets = one_hot(y_given, num_classes)
    W_prev, teacher = None, None
    for t in range(1, rounds + 1):
        name = "Teacher" if t == 1 else str(t)
        fit, seconds = _timed_fit(
            X_train,
            targets,
            lam,
            solver,
            recipe=recipe,
            W0=W_prev if solver == "exact" else None,
            seed=seed * 1000 + t,
            tol=tol,
            X_eval=X_test,
            y_eval=y_test,
        )
        targets = softmax(X_train @ fit.W.T)
        W_prev = fit.W
        teacher = teacher if teacher is not None else (fit.W, targets)
        run.reports.append(_report(name, fit, X_train, y_true, y_given, X_test, y_test, seconds))
        if keep_outputs:
            run.outputs[name] = targets
    W_t, P_t = teacher
    for loss in pll_losses:
        fit, seconds = _timed_fit(
            X_train,
            two_hot(P_t, seed=seed),
            lam,
            solver,
            recipe=recipe,
            loss=loss,
            q=q,
            W0=W_t,
            seed=seed * 1000 + 999,
            tol=tol,
            X_eval=X_test,
            y_eval=y_test,
        )
        name = PLL_ROWS[loss]
        run.reports.append(_report(name, fit, X_train, y_true, y_given, X_test, y_test, seconds))
        if keep_outputs:
            run.outputs[name] = softmax(X_train @ fit.W.T)
    return run


def _timed_fit(*args: object, **kwargs: object) -> tuple[ProbeFit, float]:
    t0 = time.perf_counter()
    fit = fit_probe(*args, **kwargs)
    return fit, time.perf_counter() - t0


def _report(
    name: str,
    fit: ProbeFit,
    X_train: np.ndarray,
    y_true: np.ndarray,
    y_given: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    seconds: float,
) -> ModelReport:
    last = accuracy(X_test, fit.W, y_test)
    curve = fit.test_acc_per_epoch
    best = max(float(np.nanmax(curve)), last) if curve is not None and np.isfinite(curve).any() else last
    return ModelReport(
        name,
        last,
        best,
        accuracy(X_train, fit.W, y_true),
        accuracy(X_train, fit.W, y_given),
        tie_fraction(X_train, fit.W),
        seconds,
    )
