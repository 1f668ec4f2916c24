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
    """A fitted probe and, for SGD with evaluation sets, each set's accuracy after every epoch and the
    weights of the first epoch with the best of it: on the validation split (carved from the training
    set: an honest checkpoint) and on the test set (the official code's checkpoint, chosen on test)."""

    W: np.ndarray  # [K, D] float64, the last epoch's
    test_acc_per_epoch: np.ndarray | None = None  # [epochs]
    W_best_test: np.ndarray | None = None  # [K, D] float64
    val_acc_per_epoch: np.ndarray | None = None  # [epochs]
    W_best_val: np.ndarray | None = None  # [K, D] float64


def one_hot(y: np.ndarray, K: int) -> np.ndarray:
    """One-hot targets [N, K] float64 for labels y [N]."""
    return np.eye(K)[np.asarray(y, dtype=np.int64)]


def two_hot(P: np.ndarray, seed: int = 0, tie_tol: float = 1e-9) -> np.ndarray:
    """PLL targets [N, K]: ½ on each of the two largest entries of every row of P [N, K] (``top2``)."""
    T = np.zeros_like(P, dtype=np.float64)
    np.put_along_axis(T, top2(P, seed, tie_tol), 0.5, axis=1)
    return T


def top2(P: np.ndarray, seed: int = 0, tie_tol: float = 1e-9) -> np.ndarray:
    """The two largest entries' classes of every row of P [N, K], largest first: [N, 2].

    Entries within ``tie_tol`` of each other are tied and the tie is broken at random (seeded): on
    symmetric data (the block model's clean instances, whose other classes are exactly alike) any
    fixed rule, e.g. lowest index first, would hand every instance the same second candidate.
    """
    jitter = np.random.default_rng(seed).random(P.shape)
    return np.argsort(-(P + tie_tol * jitter), axis=1, kind="stable")[:, :2]


def top2_report(P: np.ndarray, y_true: np.ndarray, seed: int = 0) -> dict[str, float]:
    """What the PLL targets drawn from a teacher's training outputs P [N, K] (``two_hot``, same seed)
    hold, as fractions in [0, 1] (NaN when N = 0), with a the teacher's top class and b its runner-up:

    - ``top1_true``: a is the true class, so the target adds a wrong class b at weight ½;
    - ``runner_up_true``: b is the true class, the instances the target can correct;
    - ``runner_up_prob``: the teacher's mean probability on b, which the target raises to ½;
    - ``mutual``: the share of the instances whose top class is b that carry the same pair {a, b},
      averaged over instances. At 1 the instances of a and of b get the same target and nothing in the
      targets tells the two classes apart.
    """
    if len(P) == 0:
        return dict.fromkeys(("top1_true", "runner_up_true", "runner_up_prob", "mutual"), math.nan)
    pair = top2(P, seed)
    a, b = pair[:, 0], pair[:, 1]
    y_true = np.asarray(y_true)
    counts = np.zeros((P.shape[1], P.shape[1]))  # [x, y]: instances with top class x, runner-up y
    np.add.at(counts, (a, b), 1.0)
    per_top = counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shared = np.where(per_top[b] > 0, counts[b, a] / per_top[b], 0.0)
    return {
        "top1_true": float(np.mean(a == y_true)),
        "runner_up_true": float(np.mean(b == y_true)),
        "runner_up_prob": float(np.mean(P[np.arange(len(P)), b])),
        "mutual": float(np.mean(shared)),
    }


def runner_up_share(Z: np.ndarray, P_teacher: np.ndarray, y_true: np.ndarray, seed: int = 0) -> float:
    """Fraction of training instances that a PLL student (logits Z [N, K]) predicts as its teacher's
    runner-up (``top2`` of P_teacher [N, K], same seed) where that is not the true class: the errors the
    two-hot target's wrong second candidate causes (a tie counts as a fraction, as in ``accuracy``)."""
    if len(Z) == 0:
        return math.nan
    b = top2(P_teacher, seed)[:, 1]
    wrong = b != np.asarray(y_true)
    return float(logit_accuracy(Z[wrong], b[wrong]) * wrong.mean()) if wrong.any() else 0.0


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
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> ProbeFit:
    """The paper's recipe on X [N, D], targets [N, K]; starts from W0 or nn.Linear's default init.

    (X_eval, y_eval) is the test set and (X_val, y_val) the validation split: each given (non-empty)
    set gets its accuracy curve and the weights of its first best epoch in the ``ProbeFit``."""
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
    if X_val is not None and len(X_val) and (y_val is None or len(y_val) != len(X_val)):
        got = None if y_val is None else len(y_val)
        raise ValueError(f"the {len(X_val)} validation rows need as many labels, got {got}")
    checks = {
        name: (torch.as_tensor(Xc, dtype=torch.float32), torch.as_tensor(yc))
        for name, Xc, yc in (("test", X_eval, y_eval), ("val", X_val, y_val))
        if Xc is not None and len(Xc) > 0
    }
    curves = {name: np.full(recipe.epochs, np.nan) for name in checks}
    W_best, best = {name: W.clone() for name in checks}, dict.fromkeys(checks, -1.0)
    momentum_buf = torch.zeros_like(W)
    lr = recipe.lr
    for epoch in range(recipe.epochs):
        perm = torch.randperm(N, generator=gen)
        for start in range(0, N, recipe.batch_size):
            idx = perm[start : start + recipe.batch_size]
            xb = Xt[idx]  # [B, D]
            grad = logit_grad(xb @ W.T, Tt[idx], loss, q).T @ xb / len(idx) + lam * W
            momentum_buf.mul_(recipe.momentum).add_(grad)
            W.sub_(lr * momentum_buf)
        lr *= recipe.lr_decay
        for name, (Xc, yc) in checks.items():
            curves[name][epoch] = ((Xc @ W.T).argmax(1) == yc).double().mean().item()
            if curves[name][epoch] > best[name]:
                best[name] = curves[name][epoch]
                W_best[name].copy_(W)
    W_best = {name: w.double().numpy() for name, w in W_best.items()}
    return ProbeFit(
        W.double().numpy(), curves.get("test"), W_best.get("test"), curves.get("val"), W_best.get("val")
    )


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
    y_val: np.ndarray | None = None  # [Nv] labels of the validation rows its epochs are selected on


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
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> ProbeFit:
    """Fit one probe with the chosen solver; ``W0`` is a warm start (exact) or the initialization (SGD).
    Only SGD has epochs to track on the test set (X_eval, y_eval) and the validation split."""
    check_loss(loss)
    if solver == "sgd":
        recipe = recipe or SGDRecipe()
        evals = {"X_eval": X_eval, "y_eval": y_eval, "X_val": X_val, "y_val": y_val}
        return fit_sgd(X, targets, lam, recipe, loss=loss, q=q, W0=W0, seed=seed, **evals)
    if solver != "exact":
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    if loss == "ce":
        return ProbeFit(fit_exact(X, targets, lam, W0=W0, tol=tol))
    if W0 is None:
        raise ValueError("the GCE loss is not convex: the exact solver needs an initialization W0")
    return ProbeFit(fit_gce_full_batch(X, targets, lam, W0, q=q, tol=tol))
