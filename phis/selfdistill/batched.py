"""Many SGD probes on one shared feature matrix, trained as one stacked problem.

``fit_sgd_batched`` trains M probes (``probe.fit_sgd``'s recipe) as weights [M, K, D] with one batched
matmul each way per step, each probe with its own targets, seed, loss, schedule and weight decay; every
probe ends where ``fit_sgd`` alone would, up to float32 round-off. Probes with the same seed draw the
same minibatch order, so each order is gathered once and its probes share the matmul. With fewer
training rows than features it trains the weights' coefficients on the (centred) training rows instead,
the same SGD with one batched matmul per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from phis.selfdistill.probe import SGD_FORMS, ProbeFit, ProbeTask, check_loss, gce_logit_grad


def _softmax(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.softmax`` written out as exp(z − shift) / Σ: on the CPU the fused kernel is slow over a
    short class axis (10 classes of [3, 128, 8, 10] logits: 370 µs a call against 85–120 µs, on 2
    threads), and in a batched probe step that was a quarter of the time. The shift is the row maximum
    unless every |z| < 64, when no exp can overflow or leave float32's normal range and the max (a slow
    reduction over the short axis) is skipped. Equal up to float32 round-off. On an accelerator the
    fused kernel is fast, and the check would make the device wait every step: ``torch.softmax`` there."""
    if logits.device.type != "cpu":
        return torch.softmax(logits, dim=dim)
    if logits.numel() == 0 or float(logits.abs().amax()) < 64.0:
        e = logits.exp()
    else:  # also NaN logits, which stay NaN
        e = torch.sub(logits, logits.amax(dim, keepdim=True)).exp_()
    return e.div_(e.sum(dim, keepdim=True))


def fit_sgd_batched(
    X: np.ndarray,
    tasks: Sequence[ProbeTask],
    *,
    X_eval: np.ndarray | None = None,
    y_eval: np.ndarray | None = None,
    X_val: np.ndarray | None = None,
    device: str | torch.device | None = None,
    form: str = "auto",
) -> list[ProbeFit]:
    """``fit_sgd`` of every task on the shared X [N, D], trained together; fits in task order.

    Like ``fit_sgd``, each probe tracks its accuracy per epoch on the test set (X_eval, y_eval) and
    on the validation rows X_val against its own labels (``task.y_val``: a label set's given labels),
    where given, and keeps the weights of its first best epoch on each; both sets are scored by one
    product per epoch.

    Tasks with the same seed (and the same choice of drawing their init) see the same minibatches, as
    they would alone. These U groups are padded to a common size G with idle probes (learning rate 0),
    so a step works on [U, B, G·K] logits at once. ``form`` is what is trained:
    - ``primal``: the weights; a step is one gather X[idx] [U, B, D] and one batched matmul each way;
    - ``dual``: the weights' coefficients, W = a·W0 + C X with a [G] and C [G, K, N] per group. Every
      gradient and weight decay step stays in that span, so this is the same SGD: a step is one
      batched matmul of Gram rows (XXᵀ)[idx] [U, B, N] with C, and the minibatch's gradient is a
      scatter into B columns of C's momentum instead of a second matmul. Cheaper when N ≤ D;
    - ``auto`` (default): ``dual`` when N ≤ D, else ``primal``.
    Both end where ``fit_sgd`` alone ends, up to float32 round-off (the tests hold both to it).
    """
    if form not in SGD_FORMS:
        raise ValueError(f"unknown batched SGD form {form!r}; choose one of {', '.join(SGD_FORMS)}")
    if not tasks:
        return []
    n_val = 0 if X_val is None else len(X_val)
    for task in tasks:
        check_loss(task.loss)
        if n_val and (task.y_val is None or len(task.y_val) != n_val):
            got = None if task.y_val is None else len(task.y_val)
            raise ValueError(f"every task needs y_val for the {n_val} validation rows, got {got} labels")
    grids = {(t.recipe.epochs, t.recipe.batch_size) for t in tasks}
    if len(grids) > 1:
        raise ValueError(
            "batched probes share one minibatch grid: their recipes need the same epochs and batch_size, "
            f"got (epochs, batch_size) in {sorted(grids)}"
        )
    epochs, batch_size = grids.pop()
    N, D = X.shape
    K = tasks[0].targets.shape[1]
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault((task.seed, task.W0 is None), []).append(i)
    U, G = len(groups), max(len(members) for members in groups.values())
    W = torch.zeros(U, G, K, D, dtype=torch.float32)
    T = torch.zeros(U, N, G, K, dtype=torch.float32)
    perms = torch.empty(U, epochs, N, dtype=torch.int64)
    # per probe [U, G]: float64 like the Python floats of fit_sgd, cast to float32 where used
    lr, lr_decay, momentum, lam, q = (np.zeros((U, G)) for _ in range(5))
    y_val = torch.zeros(n_val, U, G, dtype=torch.int64)  # each probe's validation labels
    gce, used = np.zeros((U, G), dtype=bool), np.zeros((U, G), dtype=bool)
    for u, ((seed, draw_init), members) in enumerate(groups.items()):
        gen = torch.Generator().manual_seed(seed)
        if draw_init:  # nn.Linear's default, as in fit_sgd
            init = torch.rand(K, D, generator=gen, dtype=torch.float32)
            W[u, : len(members)] = (init * 2 - 1) / math.sqrt(D)
        for epoch in range(epochs):
            perms[u, epoch] = torch.randperm(N, generator=gen)
        for g, i in enumerate(members):
            task, recipe = tasks[i], tasks[i].recipe
            if not draw_init:
                W[u, g] = torch.as_tensor(task.W0, dtype=torch.float32)
            T[u, :, g] = torch.as_tensor(task.targets, dtype=torch.float32)
            lr[u, g], lr_decay[u, g], momentum[u, g] = recipe.lr, recipe.lr_decay, recipe.momentum
            lam[u, g], q[u, g], gce[u, g] = task.lam, task.q, task.loss == "gce"
            if n_val:
                y_val[:, u, g] = torch.as_tensor(task.y_val)
            used[u, g] = True

    device = torch.device(device or "cpu")
    stack = _ProbeStack(
        X=torch.as_tensor(X, dtype=torch.float32).to(device),
        W0=W.to(device),
        T=T.to(device).view(U * N, G * K),
        perms=perms.to(device),
        lr=lr,
        lr_decay=lr_decay,
        momentum=momentum,
        lam=lam,
        q=q,
        gce=gce,
        used=used,
        batch_size=batch_size,
    )
    y_test = None if y_eval is None else torch.as_tensor(y_eval).view(-1, 1, 1)
    stack.add_eval_sets({"test": (X_eval, y_test), "val": (X_val, y_val)})
    train = _train_dual if form == "dual" or (form == "auto" and N <= D) else _train_primal
    W_end, W_best, curves = train(stack)
    slot = {i: (u, g) for u, members in enumerate(groups.values()) for g, i in enumerate(members)}

    def tracked(name: str, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(accuracy per epoch, weights of the first best epoch) of probe i on one set, if given."""
        return (curves[name][slot[i]], W_best[name][slot[i]]) if name in curves else (None, None)

    return [ProbeFit(W_end[slot[i]], *tracked("test", i), *tracked("val", i)) for i in range(len(tasks))]


@dataclasses.dataclass
class _ProbeStack:
    """The probes of one ``fit_sgd_batched`` call in U groups (one minibatch order each) of G probes.

    Tensors are on the training device; per-probe settings are [U, G] float64 arrays, as the Python
    floats of ``fit_sgd``, cast to float32 where used (idle padding probes: learning rate 0).
    """

    X: torch.Tensor  # [N, D] float32
    W0: torch.Tensor  # [U, G, K, D] the initial weights
    T: torch.Tensor  # [U·N, G·K] targets: row u·N + i holds group u's probes' targets of instance i
    perms: torch.Tensor  # [U, epochs, N] each group's minibatch order
    lr: np.ndarray
    lr_decay: np.ndarray
    momentum: np.ndarray
    lam: np.ndarray
    q: np.ndarray
    gce: np.ndarray  # bool: the probe's loss is GCE (else cross-entropy)
    used: np.ndarray  # bool: a real probe, not padding
    batch_size: int
    X_eval: torch.Tensor | None = None  # [Ne, D] float32: the rows of every evaluation set, one after another
    # name → (its rows of X_eval, labels [n, U, G], or [n, 1, 1] when every probe has the same)
    eval_sets: dict[str, tuple[slice, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def add_eval_sets(self, sets: dict[str, tuple[np.ndarray | None, torch.Tensor | None]]) -> None:
        """Stack the evaluation sets that are given and non-empty into ``X_eval``, in order."""
        rows, start = [], 0
        for name, (X, y) in sets.items():
            if X is None or len(y) == 0:
                continue
            rows.append(torch.as_tensor(X, dtype=torch.float32))
            self.eval_sets[name] = (slice(start, start + len(y)), y.to(self.X.device))
            start += len(y)
        if rows:
            self.X_eval = torch.cat(rows).to(self.X.device)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """U, G, K, N, D."""
        U, G, K, D = self.W0.shape
        return U, G, K, self.X.shape[0], D

    def per_probe(self, values: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32).to(self.X.device).view(shape)

    def minibatches(self, epoch: int):
        """(idx [U, B], rows [U·B]) of each minibatch of the epoch: the instances and their target rows,
        contiguous (one copy of the epoch's order per epoch, not one per step)."""
        U, N = self.perms.shape[0], self.perms.shape[2]
        order, full = self.perms[:, epoch], N // self.batch_size * self.batch_size
        steps = order[:, :full].reshape(U, -1, self.batch_size).transpose(0, 1).contiguous().unbind(0)
        if full < N:
            steps += (order[:, full:].contiguous(),)
        offsets = torch.arange(U, device=self.X.device).view(U, 1) * N
        for idx in steps:
            yield idx, (idx + offsets).view(-1)

    def logit_grads(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """d loss / d logits of every probe, [U, B, G, K], each with its own loss (``logit_grad``).

        Groups come in runs of one kind (``_loss_runs``): a run of cross-entropy groups gets p − t in
        place, a run of GCE groups only the GCE gradient, a group that mixes the losses both, picked per
        probe. (Students and PLL students trained together are such runs: neither pays for the other.)
        """
        p = _softmax(logits, dim=3)
        runs = self._loss_runs
        for u0, u1, kind in runs:
            p_u, t_u = p[u0:u1], targets[u0:u1]
            if kind == "ce":  # p − t, in place
                p_u.sub_(t_u)
                continue
            gce, q = self._gce_settings
            # p^q as exp(q log p): 60 µs against 300 for pow with a per-probe exponent (0 at p = 0 either way)
            grad = gce_logit_grad(p_u, t_u, torch.log(p_u).mul_(q[u0:u1]).exp_(), dim=3)
            if kind == "mixed":
                grad = torch.where(gce[u0:u1], grad, p_u - t_u)
            if len(runs) == 1:
                return grad
            p_u.copy_(grad)
        return p

    @functools.cached_property
    def _loss_runs(self) -> list[tuple[int, int, str]]:
        """Maximal runs [u0, u1) of consecutive groups of one kind: "ce" (no GCE probe, padding
        included), "gce" (every probe GCE) or "mixed"."""
        runs: list[list] = []
        for u, row in enumerate(self.gce):
            kind = "gce" if row.all() else "mixed" if row.any() else "ce"
            if runs and runs[-1][2] == kind:
                runs[-1][1] = u + 1
            else:
                runs.append([u, u + 1, kind])
        return [tuple(run) for run in runs]

    @functools.cached_property
    def _gce_settings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Which probes use GCE, and their q, both [U, 1, G, 1] on the device."""
        U, G = self.gce.shape
        return torch.as_tensor(self.gce).to(self.X.device).view(U, 1, G, 1), self.per_probe(
            self.q, (U, 1, G, 1)
        )

    def shared(self, values: np.ndarray) -> float | None:
        """The setting every real probe has (e.g. the paper's momentum 0.9), or None if they differ."""
        distinct = np.unique(values[self.used])
        return float(distinct[0]) if len(distinct) == 1 else None


class _BestEpochs:
    """Accuracy per epoch of every probe on each evaluation set, and which probes just reached their
    best (first) epoch on each."""

    def __init__(self, stack: _ProbeStack, epochs: int) -> None:
        U, G = stack.lr.shape
        self.sets = stack.eval_sets
        self.curve = {
            name: torch.full((U, G, epochs), math.nan, dtype=torch.float64, device=stack.X.device)
            for name in self.sets
        }
        self.best = {
            name: torch.full((U, G), -1.0, dtype=torch.float64, device=stack.X.device) for name in self.sets
        }

    def better(self, epoch: int, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Record the epoch from the logits of every evaluation row [Ne, U, G, K]; per set, a [U, G] mask
        of the probes that improved."""
        pred = scores.argmax(3)  # [Ne, U, G]
        masks = {}
        for name, (rows, y) in self.sets.items():
            acc = self.curve[name][:, :, epoch]
            acc.copy_((pred[rows] == y).double().mean(0))
            masks[name] = acc > self.best[name]
            self.best[name] = torch.where(masks[name], acc, self.best[name])
        return masks

    def curves(self) -> dict[str, np.ndarray]:
        return {name: _numpy(curve) for name, curve in self.curve.items()}


def _train_primal(stack: _ProbeStack) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train the weights themselves; W, and per evaluation set W at its best epoch and the accuracy
    curves, as float64 arrays."""
    U, G, K, N, D = stack.shape
    epochs = stack.perms.shape[1]
    W = stack.W0.clone()
    Wf = W.view(U, G * K, D)
    lam_w, momentum_w = (
        stack.per_probe(stack.lam, (U, G, 1, 1)),
        stack.per_probe(stack.momentum, (U, G, 1, 1)),
    )
    # One momentum for every probe (the paper's 0.9): the decay of the buffer rides in the gradient's
    # batched matmul (baddbmm's beta) instead of a pass of its own.
    shared_momentum = stack.shared(stack.momentum)
    beta = 1.0 if shared_momentum is None else shared_momentum  # the buffer's factor in baddbmm
    momentum_buf = torch.zeros_like(W)
    buf_f = momentum_buf.view(U, G * K, D)
    tracker, lr = _BestEpochs(stack, epochs), stack.lr.copy()
    W_best = {name: W.clone() for name in tracker.sets}
    for epoch in range(epochs):
        neg_lr_w = stack.per_probe(-lr, (U, G, 1, 1))
        for idx, rows in stack.minibatches(epoch):
            B = idx.shape[1]
            xb = stack.X.index_select(0, idx.reshape(-1)).view(U, B, D)
            targets = stack.T.index_select(0, rows).view(U, B, G, K)
            dz = stack.logit_grads(torch.bmm(xb, Wf.transpose(1, 2)).view(U, B, G, K), targets)
            # buffer ← momentum · buffer + (dzᵀ x / B + λ W);  W ← W − lr · buffer
            if shared_momentum is None:
                momentum_buf.mul_(momentum_w)
            buf_f.baddbmm_(dz.view(U, B, G * K).transpose(1, 2), xb, beta=beta, alpha=1.0 / B)
            momentum_buf.addcmul_(W, lam_w)
            W.addcmul_(momentum_buf, neg_lr_w)
        lr *= stack.lr_decay
        if stack.X_eval is not None:
            scores = (stack.X_eval @ W.view(U * G * K, D).T).view(-1, U, G, K)
            for name, better in tracker.better(epoch, scores).items():
                W_best[name][better] = W[better]
    return _numpy(W), {name: _numpy(w) for name, w in W_best.items()}, tracker.curves()


def _train_dual(stack: _ProbeStack) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train the coefficients of W (``fit_sgd_batched``'s dual form); the same SGD as ``_train_primal``.

    With μ the mean training row, the basis is the N centred rows x̃_j = x_j − μ and μ itself, and
    W = a·W0 + C [X̃; μ]: per probe a scalar a and C [K, N + 1], stored as C [N + 1, U, G·K] (basis
    index first: the test scores are one plain matmul, and group u's [N + 1, G·K] slice is a strided
    matrix the batched matmul reads in place). (On rows that share a large offset, as real features do,
    an uncentred basis makes the terms of the logits cancel and costs float32 digits.) With
    g = dzᵀ X[idx] / B + λ W, the momentum buffer μ_m·buf + g and the step W − lr·buf keep this form:
    the buffer's coefficients decay by μ_m and gain λ times W's, and it gains dz / B in the columns idx
    and the minibatch's Σ dz / B in column N (the gradient's part along μ); a step subtracts lr times
    them. The logits of row i are a·x_i W0ᵀ + (x_i·[X̃; μ]ᵀ) C: one batched matmul with rows of
    [X X̃ᵀ, X μ], computed once in float64.
    With one λ, momentum and schedule for every probe (an SD table's case), a is the same for all and
    the updates take scalars; the buffer is then kept as s·M̂ with s = λ / (1 − μ_m), so that its decay
    and weight-decay gain, μ_m·buf + λ C = s·lerp(M̂, C, 1 − μ_m), are one pass over it instead of two.
    """
    U, G, K, N, D = stack.shape
    GK, epochs, device = G * K, stack.perms.shape[1], stack.X.device
    X64, W0 = stack.X.double(), stack.W0.view(U, GK, D)
    mean = X64.mean(0) if N else X64.new_zeros(D)  # (no rows: W stays a·W0)
    basis = torch.cat([X64 - mean, mean[None]])  # [N + 1, D]
    gram = _products(stack.X, basis, mean)  # [N, N + 1]: row i is x_i·[X̃; μ]ᵀ
    base = _products(stack.X, W0.double().reshape(U * GK, D), mean)  # x_i W0ᵀ of every probe
    base = base.view(N, U, GK).transpose(0, 1).reshape(U * N, GK)  # row u·N + i: group u's
    C, M = (torch.zeros(N + 1, U, GK, device=device) for _ in range(2))
    C_groups = C.permute(1, 0, 2)  # [U, N + 1, G·K], a view
    settings = (stack.lam, stack.momentum, stack.lr, stack.lr_decay)
    shared = [stack.shared(values) for values in settings]
    uniform = None not in shared
    if uniform:  # Python floats; the idle padding probes train too, on zero targets, and are dropped
        lam, momentum, lr, lr_decay = shared
        a, m_a = 1.0, 0.0
        # M = scale · (the buffer's coefficients); a vanishing λ would scale M̂ towards float32's range
        scale = lam / (1.0 - momentum) if momentum < 1 else 0.0
        lerp = scale >= 1e-12
        scale = scale if lerp else 1.0
    else:
        lam, momentum = (stack.per_probe(v, (1, U, G, 1)) for v in (stack.lam, stack.momentum))
        lr, lr_decay, scale = stack.lr.copy(), stack.lr_decay, 1.0
        a, m_a = torch.ones(U, G, device=device), torch.zeros(U, G, device=device)
    if stack.X_eval is not None:
        gram_eval = _products(stack.X_eval, basis, mean)  # [Ne, N + 1]
        base_eval = _products(stack.X_eval, W0.double().reshape(U * GK, D), mean).view(-1, U, G, K)
    a_per_probe = (lambda: torch.full((U, G), a, device=device)) if uniform else (lambda: a)
    tracker = _BestEpochs(stack, epochs)
    best = {name: {"C": C.clone(), "a": a_per_probe().clone()} for name in tracker.sets}
    gram_rows = torch.empty(U * min(stack.batch_size, N), N + 1, device=device)  # reused every step
    groups = torch.arange(U, device=device).view(U, 1)
    C4, M4 = (t.view(N + 1, U, G, K) for t in (C, M))
    for epoch in range(epochs):
        neg_lr = -lr if uniform else stack.per_probe(-lr, (1, U, G, 1))
        for idx, rows in stack.minibatches(epoch):
            B = idx.shape[1]
            base_rows = base.index_select(0, rows).view(U, B, GK)
            if not uniform:
                base_rows = (base_rows.view(U, B, G, K) * a.view(U, 1, G, 1)).view(U, B, GK)
            torch.index_select(gram, 0, idx.view(-1), out=gram_rows[: U * B])
            logits = torch.baddbmm(
                base_rows, gram_rows[: U * B].view(U, B, N + 1), C_groups, beta=a if uniform else 1.0
            )
            dz = stack.logit_grads(logits.view(U, B, G, K), stack.T.index_select(0, rows).view(U, B, G, K))
            # buffer ← momentum · buffer + λ C + the minibatch's gradient; C ← C − lr · buffer
            if not uniform:
                M4.mul_(momentum).addcmul_(C4, lam)
            elif lerp:
                M.lerp_(C, 1.0 - momentum)
            else:
                M.mul_(momentum).add_(C, alpha=lam)
            dz = dz.view(U, B, GK)
            M_rows = (idx * U + groups).view(-1)  # M viewed as [(N + 1)·U, G·K]: basis index · U + group
            M.view((N + 1) * U, GK).index_add_(0, M_rows, dz.view(U * B, GK), alpha=1.0 / (B * scale))
            M[N].add_(dz.sum(1), alpha=1.0 / (B * scale))
            if uniform:
                C.add_(M, alpha=neg_lr * scale)
                m_a = momentum * m_a + lam * a
                a += neg_lr * m_a
            else:
                C4.addcmul_(M4, neg_lr)
                m_a.mul_(momentum.view(U, G)).addcmul_(a, lam.view(U, G))
                a.addcmul_(m_a, neg_lr.view(U, G))
        lr *= lr_decay
        if stack.X_eval is not None:
            scores = (gram_eval @ C.view(N + 1, U * GK)).view(-1, U, G, K)
            improved = tracker.better(epoch, scores.addcmul_(base_eval, a_per_probe().view(1, U, G, 1)))
            for name, better in improved.items():
                if better.any():  # copy the probes that improved (fewer and fewer as training goes on)
                    best[name]["C"].view(N + 1, U, G, K)[:, better] = C4[:, better]
                    best[name]["a"][better] = a_per_probe()[better]

    def weights(C: torch.Tensor, a: torch.Tensor) -> np.ndarray:
        """a·W0 + C [X̃; μ] in float64, [U, G, K, D]."""
        spanned = (C.double().permute(1, 2, 0).reshape(U * GK, N + 1) @ basis).view(U, G, K, D)
        return _numpy(spanned + a.double().view(U, G, 1, 1) * stack.W0.double())

    return weights(C, a_per_probe()), {name: weights(**b) for name, b in best.items()}, tracker.curves()


def _products(rows: torch.Tensor, columns: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """rows @ columnsᵀ in float32 for float32 ``rows`` [n, D] far from the origin and float64
    ``columns`` [m, D], as (rows − mean) @ columnsᵀ + mean @ columnsᵀ: the float32 product of centred
    rows loses no digits to their common offset, and the offset's part is exact in float64."""
    centred = (rows.double() - mean).float()
    return torch.addmm((columns @ mean).float(), centred, columns.float().T)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.double().cpu().numpy()
