"""Linear softmax probes without bias: labels, objectives and fitting one probe.

A probe W [K, D] maps features X [N, D] to logits X Wᵀ and is fit to minimize
(1/N) Σ_i loss(target_i, softmax(W φ_i)) + (λ/2) ‖W‖². Two ways to fit:
- ``exact``: to optimality in float64 (``theory.fit_exact`` for cross-entropy, which is convex; L-BFGS
  from the given start for the non-convex GCE loss, i.e. the local minimum the teacher init leads to);
- ``sgd``: the paper's recipe (SGD, momentum 0.9, batch 128, 200 epochs, LR × 0.98 after each epoch,
  weight decay = λ) in float32, minibatches sliced from one shuffled tensor per epoch, with analytic
  gradients (the update equals ``torch.optim.SGD`` with the same settings).

Many probes on one feature matrix train together in ``phis.selfdistill.batched``; the self-distillation
rounds built from probes are in ``phis.selfdistill.rounds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from phis.selfdistill.theory import fit_exact, softmax

SOLVERS = ("exact", "sgd")
SGD_FORMS = ("auto", "primal", "dual")  # what fit_sgd_batched trains: see its docstring
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
    """A fitted probe and, for SGD with a test set, the test accuracy after every epoch and the weights
    of the first epoch with the best of them (the official code's checkpoint)."""

    W: np.ndarray  # [K, D] float64
    test_acc_per_epoch: np.ndarray | None = None  # [epochs]
    W_best: np.ndarray | None = None  # [K, D] float64


# Which weights of a round teach the next round and the PLL student: the last epoch's (ours, honest), or


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
    return logit_accuracy(X @ W.T, y)


def logit_accuracy(Z: np.ndarray, y: np.ndarray) -> float:
    """``accuracy`` from the logits Z [N, K]."""
    if len(y) == 0:
        return math.nan
    top = _top_set(Z)
    return float(np.mean(top[np.arange(len(y)), y] / top.sum(axis=1)))


def tie_fraction(X: np.ndarray, W: np.ndarray) -> float:
    """Fraction of rows of X [N, D] whose largest logits are tied (NaN when N = 0)."""
    return logit_tie_fraction(X @ W.T)


def logit_tie_fraction(Z: np.ndarray) -> float:
    return float(np.mean(_top_set(Z).sum(axis=1) > 1)) if len(Z) else math.nan


def _top_set(Z: np.ndarray) -> np.ndarray:
    """[N, K] mask of the logits within TIE_RTOL × (row range) of the row maximum."""
    zmax = Z.max(axis=1, keepdims=True)
    return Z >= zmax - TIE_RTOL * (zmax - Z.min(axis=1, keepdims=True))


def logit_grad(
    logits: torch.Tensor, targets: torch.Tensor, loss: str, q: float | torch.Tensor, dim: int = 1
) -> torch.Tensor:
    """d loss / d logits per sample for soft targets (classes along ``dim``; [B, K] by default).

    ce: Σ_k −t_k log p_k → p − t. gce: Σ_k t_k (1 − p_k^q)/q → with a_k = t_k p_k^q, p Σ_k a_k − a
    (from ∂p_k/∂z_j = p_k (δ_kj − p_j)).
    """
    p = torch.softmax(logits, dim=dim)
    if loss == "ce":
        return p - targets
    return gce_logit_grad(p, targets, p.pow(q), dim)


def gce_logit_grad(p: torch.Tensor, targets: torch.Tensor, p_q: torch.Tensor, dim: int) -> torch.Tensor:
    """GCE's d loss / d logits from the softmax p and p^q (``logit_grad``)."""
    a = targets * p_q
    return p * a.sum(dim, keepdim=True) - a


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
    check_loss(loss)
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
    W_best, best = W.clone(), -1.0
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
            if curve[epoch] > best:
                best = curve[epoch]
                W_best.copy_(W)
    if Xe is None:
        return ProbeFit(W.double().numpy())
    return ProbeFit(W.double().numpy(), curve, W_best.double().numpy())


@dataclass(frozen=True)
class ProbeTask:
    """One probe of a batched fit: what ``fit_probe`` takes besides the shared features."""

    targets: np.ndarray  # [N, K]
    lam: float
    recipe: SGDRecipe = SGDRecipe()
    loss: str = "ce"
    q: float = 0.7
    W0: np.ndarray | None = None
    seed: int = 0


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


def check_loss(loss: str) -> None:
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
    check_loss(loss)
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
