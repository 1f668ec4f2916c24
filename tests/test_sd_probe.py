"""SD-PLL probes, features and the job function: SGD recipe, PLL student, thresholds end to end."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phis.selfdistill import batched as sd_batched
from phis.selfdistill import features as feat
from phis.selfdistill import rounds as sd_rounds
from phis.selfdistill import theory
from phis.selfdistill.batched import fit_sgd_batched
from phis.selfdistill.blockmodel import block_features
from phis.selfdistill.corruption import corrupt_labels, corruption_matrix
from phis.selfdistill.probe import (
    PLL_ROWS,
    ProbeFit,
    ProbeTask,
    SGDRecipe,
    accuracy,
    fit_gce_full_batch,
    fit_probe,
    fit_sgd,
    objective,
    one_hot,
    tie_fraction,
    two_hot,
)
from phis.selfdistill.rounds import TEACHER_CHECKPOINTS, self_distill, self_distill_batched
from phis.selfdistill.run import run_job, validate
from phis.selfdistill.theory import softmax

pytestmark = pytest.mark.usefixtures("one_thread")


# Small-logit block model (|logits| stay well below 1): the linearized theory is exact here.
SMALL = {"K": 4, "n": 60, "c": 0.2, "d": 0.17, "lam": 0.2}


def _mixture(N: int = 240, D: int = 6, K: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes with a large common offset (features of a real extractor are not
    centred), so the problem is neither separable nor well conditioned."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % K
    means = rng.normal(size=(K, D))
    return 1.0 + means[y] + 1.5 * rng.normal(size=(N, D)), y


# ---------------------------------------------------------------------------------------------- SGD


@pytest.mark.parametrize("loss", ["ce", "gce"])
def test_sgd_steps_equal_torch_sgd_with_autograd(loss: str) -> None:
    """Analytic gradients + hand-written momentum/decay = torch.optim.SGD on the autograd loss."""
    X, y = _mixture(N=50)
    T = two_hot(np.random.default_rng(1).dirichlet(np.ones(3), size=50)) if loss == "gce" else one_hot(y, 3)
    W0 = np.random.default_rng(2).normal(size=(3, X.shape[1])) * 0.1
    recipe = SGDRecipe(epochs=3, batch_size=16, lr=0.05, momentum=0.9, lr_decay=0.9)
    lam, q, seed = 1e-2, 0.7, 5
    ours = fit_sgd(X, T, lam, recipe, loss=loss, q=q, W0=W0, seed=seed).W

    W = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float32))
    opt = torch.optim.SGD([W], lr=recipe.lr, momentum=recipe.momentum, weight_decay=lam)
    Xt, Tt = torch.tensor(X, dtype=torch.float32), torch.tensor(T, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), recipe.batch_size):
            idx = perm[start : start + recipe.batch_size]
            logits = Xt[idx] @ W.T
            if loss == "ce":
                value = F.cross_entropy(logits, Tt[idx])
            else:
                value = (Tt[idx] * (1 - logits.softmax(1).pow(q)) / q).sum(1).mean()
            opt.zero_grad()
            value.backward()
            opt.step()
        for group in opt.param_groups:
            group["lr"] *= recipe.lr_decay
    np.testing.assert_allclose(ours, W.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_sgd_recipe_converges_to_the_exact_solution() -> None:
    """The paper's recipe (momentum 0.9, ×0.98 per epoch, 200 epochs) ends near the float64 optimum."""
    X, y = _mixture()
    T, lam = one_hot(y, 3), 1e-2
    W_star = theory.fit_exact(X, T, lam, tol=1e-12)
    fit = fit_sgd(X, T, lam, SGDRecipe(batch_size=32, lr=0.1), seed=0, X_eval=X, y_eval=y)
    assert np.linalg.norm(fit.W - W_star) / np.linalg.norm(W_star) < 0.03
    gap = objective(X, T, fit.W, lam) - objective(X, T, W_star, lam)
    assert 0 <= gap < 2e-4
    assert fit.test_acc_per_epoch.shape == (200,)
    # a few epochs are far from it: the check above is not trivially met
    short = fit_sgd(X, T, lam, SGDRecipe(epochs=2, batch_size=32, lr=0.1), seed=0).W
    assert np.linalg.norm(short - W_star) / np.linalg.norm(W_star) > 0.1


def test_gce_full_batch_reaches_a_stationary_point_below_its_start() -> None:
    X, y = _mixture()
    T = two_hot(one_hot(y, 3) * 0.6 + np.random.default_rng(0).dirichlet(np.ones(3), size=len(y)) * 0.4)
    lam, q = 1e-2, 0.7
    W0 = theory.fit_exact(X, one_hot(y, 3), lam)
    W = fit_gce_full_batch(X, T, lam, W0, q=q)
    Wt = torch.tensor(W, requires_grad=True)
    p = torch.softmax(torch.tensor(X) @ Wt.T, 1)
    value = (torch.tensor(T) * (1 - p.pow(q)) / q).sum(1).mean() + 0.5 * lam * (Wt * Wt).sum()
    value.backward()
    assert Wt.grad.abs().max() < 1e-6
    assert objective(X, T, W, lam, "gce", q) < objective(X, T, W0, lam, "gce", q)


def test_fit_probe_rejects_unknown_choices() -> None:
    X, y = _mixture(N=30)
    with pytest.raises(ValueError, match=r"unknown solver 'adam'.*\['exact', 'sgd'\]"):
        fit_probe(X, one_hot(y, 3), 1e-2, "adam")
    with pytest.raises(ValueError, match=r"unknown probe loss 'mae'.*\['gce', 'ce'\]"):
        fit_probe(X, one_hot(y, 3), 1e-2, "exact", loss="mae")
    with pytest.raises(ValueError, match="needs an initialization"):
        fit_probe(X, one_hot(y, 3), 1e-2, "exact", loss="gce")


def _fit_alone(X: np.ndarray, task: ProbeTask, Xe=None, ye=None, Xv=None) -> ProbeFit:
    """One batched task fit on its own by the one-by-one path (``fit_sgd`` with the task's fields): the
    reference every batched probe must match."""
    return sd_rounds._fit_task(X, task, "sgd", 1e-8, Xe, ye, Xv)


def _sgd_float64(X: np.ndarray, task: ProbeTask) -> list[np.ndarray]:
    """``fit_sgd``'s recipe written out in float64 (same init, same minibatch order): W after each epoch.
    Features and targets are first rounded to float32, as ``fit_sgd`` stores them."""
    X, T = X.astype(np.float32).astype(np.float64), task.targets.astype(np.float32).astype(np.float64)
    gen = torch.Generator().manual_seed(task.seed)
    K, D = task.targets.shape[1], X.shape[1]
    if task.W0 is None:
        W = ((torch.rand(K, D, generator=gen, dtype=torch.float32) * 2 - 1) / math.sqrt(D)).numpy()
    else:
        W = task.W0.astype(np.float32)
    W, buf, lr, recipe, out = W.astype(np.float64), np.zeros((K, D)), task.recipe.lr, task.recipe, []
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(X), generator=gen).numpy()
        for start in range(0, len(X), recipe.batch_size):
            idx = perm[start : start + recipe.batch_size]
            p = softmax(X[idx] @ W.T)
            t = T[idx]
            if task.loss == "ce":
                dz = p - t
            else:
                a = t * p**task.q
                dz = p * a.sum(1, keepdims=True) - a
            buf = recipe.momentum * buf + dz.T @ X[idx] / len(idx) + task.lam * W
            W = W - lr * buf
        lr *= recipe.lr_decay
        out.append(W.copy())
    return out


def _val_labels(y_val: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """n validation label sets: the true labels with a growing share flipped, as each (η, seed) cell of
    a table scores its epochs against its own given labels."""
    rng = np.random.default_rng(seed)
    return [
        np.where(rng.random(len(y_val)) < 0.15 * i, rng.integers(0, 3, len(y_val)), y_val) for i in range(n)
    ]


@pytest.mark.parametrize("form, D", [("primal", 6), ("dual", 6), ("dual", 120), ("auto", 120)])
def test_batched_sgd_equals_one_probe_at_a_time(form: str, D: int) -> None:
    """Probes with their own targets, losses, weight decays, schedules, inits, seeds (some seeds
    shared, so groups of unequal size get padded) and validation labels end where ``fit_sgd`` alone
    ends each of them, in either batched form (and with N < D, where ``auto`` trains the dual form),
    and keep the same epochs as best on validation and best on test."""
    X, y = _mixture(N=90, D=D)
    Xe, ye = _mixture(N=40, D=D, seed=1)
    Xv, yv = _mixture(N=25, D=D, seed=2)
    rng = np.random.default_rng(3)
    base = SGDRecipe(epochs=6, batch_size=16, lr=0.05)
    slow = SGDRecipe(epochs=6, batch_size=16, lr=0.02, momentum=0.5, lr_decay=0.9)
    W0 = rng.normal(size=(3, X.shape[1])) * 0.1
    tasks = [
        ProbeTask(one_hot(y, 3), 1e-2, base, seed=7),
        ProbeTask(rng.dirichlet(np.ones(3), size=90), 1e-3, base, seed=7),
        ProbeTask(two_hot(rng.dirichlet(np.ones(3), size=90)), 1e-2, slow, loss="gce", q=0.7, seed=7),
        ProbeTask(two_hot(rng.dirichlet(np.ones(3), size=90)), 1e-2, base, loss="gce", q=0.5, W0=W0, seed=7),
        ProbeTask(one_hot(y, 3), 5e-2, slow, loss="ce", W0=W0, seed=7),
        ProbeTask(one_hot(rng.integers(0, 3, 90), 3), 0.0, base, seed=8),
    ]
    tasks = [replace(task, y_val=labels) for task, labels in zip(tasks, _val_labels(yv, len(tasks), 4))]
    batched = fit_sgd_batched(X, tasks, X_eval=Xe, y_eval=ye, X_val=Xv, form=form)
    epochs = []
    for task, fit in zip(tasks, batched):
        alone = _fit_alone(X, task, Xe, ye, Xv)
        # Both float32 runs against the same SGD in float64: each within 2e-6 of the largest weight (16
        # float32 steps of it; their own gaps to float64 measured 1e-7 to 1.2e-6).
        per_epoch = _sgd_float64(X, task)
        best_test = int(np.argmax(alone.test_acc_per_epoch))
        best_val = int(np.argmax(alone.val_acc_per_epoch))
        epochs.append((best_val, best_test))
        for got, want in (
            (alone.W, per_epoch[-1]),
            (fit.W, per_epoch[-1]),
            (fit.W_best_test, per_epoch[best_test]),
            (fit.W_best_val, per_epoch[best_val]),
            (alone.W_best_val, per_epoch[best_val]),
        ):
            assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()
        np.testing.assert_array_equal(fit.test_acc_per_epoch, alone.test_acc_per_epoch)
        np.testing.assert_array_equal(fit.val_acc_per_epoch, alone.val_acc_per_epoch)
        # each probe is scored against its own validation labels
        np.testing.assert_array_equal(
            fit.val_acc_per_epoch[-1], np.mean((Xv @ fit.W.T).argmax(1) == task.y_val)
        )
        assert accuracy(X, fit.W, y) == accuracy(X, alone.W, y)
    # the probes did train apart: different settings give different weights
    assert min(np.abs(a.W - b.W).max() for a, b in zip(batched, batched[1:])) > 1e-3
    assert any(v != t for v, t in epochs)  # validation and test pick epochs of their own
    assert fit_sgd_batched(X, []) == []
    with pytest.raises(ValueError, match="every task needs y_val for the 25 validation rows, got None"):
        fit_sgd_batched(X, [replace(tasks[0], y_val=None)], X_val=Xv)


def test_written_out_softmax_equals_torch_softmax_with_and_without_the_shift() -> None:
    """The batched probes' softmax: plain exp for modest logits, shifted by the row max once any |z|
    reaches 64 (unshifted, 1,000 would overflow), NaN kept, no rows at all."""
    z = torch.randn(3, 5, 4, 10, generator=torch.Generator().manual_seed(0)) * 5
    for logits in (z, z + 1000.0, z * 30):
        got, want = sd_batched._softmax(logits, dim=3), torch.softmax(logits, dim=3)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    z[0, 0, 0, 0] = math.nan
    assert torch.isnan(sd_batched._softmax(z, dim=3)[0, 0, 0]).all()
    assert sd_batched._softmax(torch.empty(0, 10), dim=1).shape == (0, 10)


@pytest.mark.parametrize("lam", [1e-2, 0.0])
def test_dual_sgd_with_one_setting_for_all_probes_equals_the_float64_recipe(monkeypatch, lam: float) -> None:
    """The dual form's scalar path, an SD table's case: every probe shares λ, momentum and schedule
    (targets, losses, inits and seeds differ; groups of unequal size are padded). With λ > 0 the
    momentum buffer is kept scaled and decays by one lerp per step; with λ = 0 it is only multiplied."""
    lerps = []
    real_lerp = torch.Tensor.lerp_
    monkeypatch.setattr(torch.Tensor, "lerp_", lambda t, *args: lerps.append(1) or real_lerp(t, *args))
    X, y = _mixture(N=90, D=120)
    Xe, ye = _mixture(N=40, D=120, seed=1)
    rng = np.random.default_rng(4)
    recipe = SGDRecipe(epochs=6, batch_size=16, lr=0.05)
    tasks = [
        ProbeTask(one_hot(y, 3), lam, recipe, seed=7),
        ProbeTask(rng.dirichlet(np.ones(3), size=90), lam, recipe, seed=7),
        ProbeTask(
            two_hot(rng.dirichlet(np.ones(3), size=90)),
            lam,
            recipe,
            loss="gce",
            W0=rng.normal(size=(3, 120)) * 0.1,
            seed=7,
        ),
        ProbeTask(one_hot(rng.integers(0, 3, 90), 3), lam, recipe, seed=8),
    ]
    Xv, yv = _mixture(N=25, D=120, seed=2)
    tasks = [replace(task, y_val=labels) for task, labels in zip(tasks, _val_labels(yv, len(tasks), 5))]
    batched = fit_sgd_batched(X, tasks, X_eval=Xe, y_eval=ye, X_val=Xv, form="dual")
    assert bool(lerps) == (lam > 0)
    for task, fit in zip(tasks, batched):
        alone = _fit_alone(X, task, Xe, ye, Xv)
        np.testing.assert_array_equal(fit.test_acc_per_epoch, alone.test_acc_per_epoch)
        np.testing.assert_array_equal(fit.val_acc_per_epoch, alone.val_acc_per_epoch)
        per_epoch = _sgd_float64(X, task)
        best_test = int(np.argmax(alone.test_acc_per_epoch))
        best_val = int(np.argmax(alone.val_acc_per_epoch))
        # within 4e-6 of the largest weight: on this set the dual form's gap measured 1.4e-7 to 2.2e-6
        # (the same before the buffer was kept scaled; λ = 0 runs the unscaled code), fit_sgd's 2e-7 to 7.7e-7
        for got, want in (
            (fit.W, per_epoch[-1]),
            (fit.W_best_test, per_epoch[best_test]),
            (fit.W_best_val, per_epoch[best_val]),
        ):
            assert np.abs(got - want).max() <= 4e-6 * np.abs(want).max()


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_batched_sgd_with_cross_entropy_gce_and_mixed_groups_equals_one_at_a_time(form: str) -> None:
    """Groups of one loss each (students and PLL students trained together) and a group mixing both:
    the gradient is formed per run of groups, and every probe still ends where it ends alone."""
    X, y = _mixture(N=90, D=120 if form == "dual" else 6)
    Xe, ye = _mixture(N=40, D=X.shape[1], seed=1)
    rng = np.random.default_rng(5)
    recipe = SGDRecipe(epochs=5, batch_size=16, lr=0.05)
    W0 = rng.normal(size=(3, X.shape[1])) * 0.1
    soft = [two_hot(rng.dirichlet(np.ones(3), size=90)) for _ in range(4)]
    tasks = [
        ProbeTask(one_hot(y, 3), 1e-2, recipe, seed=1),  # group 0: cross-entropy
        ProbeTask(soft[0], 1e-2, recipe, seed=1),
        ProbeTask(soft[1], 1e-2, recipe, loss="gce", W0=W0, seed=2),  # group 1: GCE
        ProbeTask(soft[2], 1e-2, recipe, loss="gce", q=0.5, W0=-W0, seed=2),
        ProbeTask(soft[3], 1e-2, recipe, loss="gce", W0=W0, seed=3),  # group 2: both
        ProbeTask(one_hot(y, 3), 1e-2, recipe, W0=W0, seed=3),
    ]
    calls = []
    real = sd_batched._ProbeStack.logit_grads

    def spy(stack, logits, targets):
        calls.append(stack._loss_runs)
        return real(stack, logits, targets)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd_batched._ProbeStack, "logit_grads", spy)
        batched = fit_sgd_batched(X, tasks, X_eval=Xe, y_eval=ye, form=form)
    assert calls[0] == [(0, 1, "ce"), (1, 2, "gce"), (2, 3, "mixed")]
    for task, fit in zip(tasks, batched):
        alone = _fit_alone(X, task, Xe, ye)
        np.testing.assert_array_equal(fit.test_acc_per_epoch, alone.test_acc_per_epoch)
        want = _sgd_float64(X, task)[-1]
        assert np.abs(fit.W - want).max() <= 4e-6 * np.abs(want).max()


@pytest.mark.parametrize("form", ["primal", "dual", "auto"])
def test_batched_sgd_without_training_rows_keeps_the_initial_weights(form: str) -> None:
    W0 = np.ones((3, 5))
    task = ProbeTask(np.zeros((0, 3)), 1e-3, SGDRecipe(epochs=2), W0=W0)
    (fit,) = fit_sgd_batched(np.zeros((0, 5)), [task], form=form)
    np.testing.assert_array_equal(fit.W, W0)


def test_auto_form_is_dual_with_fewer_training_rows_than_features(monkeypatch) -> None:
    trained = []
    for name in ("_train_primal", "_train_dual"):
        real = getattr(sd_batched, name)
        monkeypatch.setattr(
            sd_batched, name, lambda stack, real=real, name=name: trained.append(name) or real(stack)
        )
    recipe = SGDRecipe(epochs=2, batch_size=8)
    for D in (40, 30, 6):  # N = 30 rows
        X, y = _mixture(N=30, D=D)
        fit_sgd_batched(X, [ProbeTask(one_hot(y, 3), 1e-2, recipe)])
    assert trained == ["_train_dual", "_train_dual", "_train_primal"]


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_batched_sgd_with_one_momentum_and_idle_probes_equals_one_at_a_time(form: str) -> None:
    """The path where every probe shares the momentum (folded into the gradient's product) and only
    cross-entropy is used, with a padded group (seeds 7, 7, 8) and a last minibatch of 10 of 16."""
    X, y = _mixture(N=90)
    rng = np.random.default_rng(5)
    recipe = SGDRecipe(epochs=5, batch_size=16, lr=0.05)
    tasks = [
        ProbeTask(one_hot(y, 3), 1e-2, recipe, seed=7),
        ProbeTask(rng.dirichlet(np.ones(3), size=90), 1e-3, recipe, seed=7),
        ProbeTask(one_hot(rng.integers(0, 3, 90), 3), 0.0, recipe, seed=8),
    ]
    for task, fit in zip(tasks, fit_sgd_batched(X, tasks, form=form)):
        alone = _fit_alone(X, task)
        np.testing.assert_allclose(fit.W, alone.W, rtol=1e-5, atol=1e-6 * np.abs(alone.W).max())


def test_batched_sgd_needs_one_minibatch_grid() -> None:
    X, y = _mixture(N=30)
    tasks = [ProbeTask(one_hot(y, 3), 1e-2, SGDRecipe(epochs=e, batch_size=8)) for e in (2, 3)]
    with pytest.raises(ValueError, match=r"same epochs and batch_size.*\(2, 8\), \(3, 8\)"):
        fit_sgd_batched(X, tasks)
    with pytest.raises(ValueError, match=r"unknown probe loss 'mae'"):
        fit_sgd_batched(X, [ProbeTask(one_hot(y, 3), 1e-2, loss="mae")])
    with pytest.raises(
        ValueError, match=r"unknown batched SGD form 'kernel'; choose one of auto, primal, dual"
    ):
        fit_sgd_batched(X, tasks[:1], form="kernel")


@pytest.mark.parametrize("solver, pll", [("sgd", ("gce", "ce")), ("exact", ("ce",))])
def test_self_distill_batched_equals_the_runs_one_by_one(solver: str, pll: tuple[str, ...]) -> None:
    """Many label sets (η, seed cells) at once: every model's report equals its run alone."""
    X_all, y_all = _mixture(N=100)
    Xe, ye = _mixture(N=30, seed=1)
    cells = [(eta, seed) for eta in (0.0, 0.4) for seed in (0, 1)]
    given = [corrupt_labels(y_all, corruption_matrix("sym", 3, eta), seed) for eta, seed in cells]
    is_val = feat.validation_rows(y_all, 0.2, 0)
    X, y, Xv = X_all[~is_val], y_all[~is_val], X_all[is_val]
    kwargs = dict(rounds=3, solver=solver, recipe=SGDRecipe(epochs=5, batch_size=16, lr=0.05), pll_losses=pll)
    if solver == "exact":  # no epochs to select: no validation split
        given_val, val = [None] * len(cells), {}
    else:
        given_val = [g[is_val] for g in given]
        val = {"X_val": Xv, "y_val": given_val}
    runs = self_distill_batched(
        X, [g[~is_val] for g in given], y, Xe, ye, 1e-2, 3, seeds=[s for _, s in cells], **val, **kwargs
    )
    for (_, seed), y_given, y_val, run in zip(cells, given, given_val, runs):
        one = {} if y_val is None else {"X_val": Xv, "y_val": y_val}
        alone = self_distill(X, y_given[~is_val], y, Xe, ye, 1e-2, 3, seed=seed, **one, **kwargs)
        assert [r.name for r in run.reports] == ["Teacher", "2", "3", *(PLL_ROWS[loss] for loss in pll)]
        for got, want in zip(run.reports, alone.reports):
            for field in (
                "test_acc_last",
                "test_acc_best_val",
                "test_acc_best_test",
                "train_acc_true",
                "train_acc_given",
                "train_tied",
            ):
                assert getattr(got, field) == getattr(want, field), (got.name, field)
            assert math.isfinite(got.test_acc_best_val)
        # the PLL candidates' report: counts equal, the teacher's probabilities up to float32 round-off
        assert run.top2 == pytest.approx(alone.top2, abs=1e-6) and set(run.top2) >= {"top1_true", "mutual"}
    assert runs[0].reports[0].train_acc_given != runs[2].reports[0].train_acc_given  # the cells differ
    with pytest.raises(ValueError, match="one seed per label set: got 4 label sets and 1 seeds"):
        self_distill_batched(X, given, y, Xe, ye, 1e-2, 3, seeds=[0], **kwargs)


@pytest.mark.parametrize("rounds", [1, 3])
def test_pll_students_train_in_round_twos_batch(monkeypatch, rounds: int) -> None:
    """The PLL students need only the teacher, so they are fit in round 2's batch (one batched call
    per round); with a single round they follow it. Their reports still come last."""
    X, y = _mixture(N=60)
    Xe, ye = _mixture(N=20, seed=1)
    calls = []
    real = sd_rounds.fit_sgd_batched

    def spy(X_, tasks, **kwargs):
        calls.append(sorted({(task.loss, task.seed % 1000) for task in tasks}))
        return real(X_, tasks, **kwargs)

    monkeypatch.setattr(sd_rounds, "fit_sgd_batched", spy)
    recipe = SGDRecipe(epochs=2, batch_size=16, lr=0.05)
    runs = self_distill_batched(
        X,
        [y, y],
        y,
        Xe,
        ye,
        1e-2,
        3,
        seeds=[0, 1],
        rounds=rounds,
        solver="sgd",
        recipe=recipe,
        pll_losses=("gce", "ce"),
    )
    pll = [("ce", 999), ("gce", 999)]
    if rounds == 1:
        assert calls == [[("ce", 1)], pll]
    else:
        assert calls == [[("ce", 1)], [("ce", 2), *pll], [("ce", 3)]]
    names = ["Teacher", *map(str, range(2, rounds + 1)), "PLL", "PLL-CE"]
    assert all([r.name for r in run.reports] == names for run in runs)


@pytest.mark.parametrize("checkpoint", ["best_val", "best_test"])
def test_selected_checkpoint_is_the_first_best_epoch_and_teaches_the_next_round(checkpoint: str) -> None:
    """best_val: the first epoch with the best accuracy on the validation split (scored against its
    given labels); best_test: the same on the test set (the official code). That epoch's weights teach
    the next round, the last epoch's are reported, and its test accuracy is the model's
    ``test_acc_<checkpoint>``."""
    X_all, y_all = _mixture(N=110)
    Xe, ye = _mixture(N=30, seed=1)
    is_val = feat.validation_rows(y_all, 0.25, 0)
    X, y, Xv = X_all[~is_val], y_all[~is_val], X_all[is_val]
    given = corrupt_labels(y_all, corruption_matrix("sym", 3, 0.4), 1)
    yv = given[is_val]  # as noisy as the training labels
    recipe = SGDRecipe(epochs=8, batch_size=16, lr=0.05)
    fit = fit_sgd(
        X, one_hot(given[~is_val], 3), 1e-2, recipe, seed=1001, X_eval=Xe, y_eval=ye, X_val=Xv, y_val=yv
    )
    curve = fit.val_acc_per_epoch if checkpoint == "best_val" else fit.test_acc_per_epoch
    chosen = fit.W_best_val if checkpoint == "best_val" else fit.W_best_test
    # replay the same steps and keep the weights after the first epoch of the best accuracy
    first_best = int(np.argmax(curve))
    short = SGDRecipe(epochs=first_best + 1, batch_size=16, lr=0.05)
    replay = fit_sgd(X, one_hot(given[~is_val], 3), 1e-2, short, seed=1001)
    np.testing.assert_allclose(chosen, replay.W, rtol=1e-6, atol=1e-7)
    scored = (Xv, yv) if checkpoint == "best_val" else (Xe, ye)
    assert accuracy(*scored[:1], chosen, scored[1]) == curve.max()
    assert np.argmax(fit.val_acc_per_epoch) != np.argmax(fit.test_acc_per_epoch)  # two different choices
    assert fit_sgd(X, one_hot(y, 3), 1e-2, recipe, seed=1001).W_best_test is None  # no test set, no selection
    assert fit_sgd(X, one_hot(y, 3), 1e-2, recipe, seed=1001, X_eval=Xe, y_eval=ye).W_best_val is None

    kwargs = dict(rounds=2, solver="sgd", recipe=recipe, keep_outputs=True, X_val=Xv, y_val=yv)
    best = self_distill(
        X, given[~is_val], y, Xe, ye, 1e-2, 3, seed=1, teacher_checkpoint=checkpoint, **kwargs
    )
    last = self_distill(X, given[~is_val], y, Xe, ye, 1e-2, 3, seed=1, **kwargs)
    teacher = fit_sgd(
        X, one_hot(given[~is_val], 3), 1e-2, recipe, seed=1001, X_eval=Xe, y_eval=ye, X_val=Xv, y_val=yv
    )
    W_chosen = teacher.W_best_val if checkpoint == "best_val" else teacher.W_best_test
    np.testing.assert_allclose(best.outputs["Teacher"], softmax(X @ W_chosen.T), atol=1e-6)
    np.testing.assert_allclose(last.outputs["Teacher"], softmax(X @ teacher.W.T), atol=1e-6)
    assert (
        last.reports[0].test_acc_best_val == teacher.test_acc_per_epoch[np.argmax(teacher.val_acc_per_epoch)]
    )
    assert best.reports[0].test_acc_best_test == teacher.test_acc_per_epoch.max()
    # the teacher's report is of its last epoch's weights either way; only what it passes on differs
    for field in (
        "test_acc_last",
        "test_acc_best_val",
        "test_acc_best_test",
        "train_acc_true",
        "train_acc_given",
    ):
        assert getattr(best.reports[0], field) == getattr(last.reports[0], field), field
    assert np.abs(best.outputs["2"] - last.outputs["2"]).max() > 1e-2  # the student learnt other targets
    batched = self_distill_batched(
        X,
        [given[~is_val]],
        y,
        Xe,
        ye,
        1e-2,
        3,
        seeds=[1],
        teacher_checkpoint=checkpoint,
        **{**kwargs, "y_val": [yv]},
    )
    for got, want in zip(batched[0].reports, best.reports):
        assert (got.test_acc_last, got.train_acc_given) == (want.test_acc_last, want.train_acc_given)


def test_checkpoint_choices_and_their_needs() -> None:
    X, y = _mixture(N=60)
    Xe, ye = _mixture(N=20, seed=1)
    kwargs = dict(rounds=2, solver="sgd", recipe=SGDRecipe(epochs=2, batch_size=16))
    assert TEACHER_CHECKPOINTS == ("last", "best_val", "best_test")
    with pytest.raises(ValueError, match=r"teacher_checkpoint 'best'.*\('last', 'best_val', 'best_test'\)"):
        self_distill(X, y, y, Xe, ye, 1e-2, 3, teacher_checkpoint="best", **kwargs)
    with pytest.raises(
        ValueError, match="'best_val' selects an SGD epoch by validation accuracy.*got 0 validation"
    ):
        self_distill(X, y, y, Xe, ye, 1e-2, 3, teacher_checkpoint="best_val", **kwargs)
    with pytest.raises(
        ValueError, match="'best_test' selects an SGD epoch by test accuracy: it needs solver='sgd'"
    ):
        self_distill(X, y, y, Xe, ye, 1e-2, 3, rounds=2, solver="exact", teacher_checkpoint="best_test")
    with pytest.raises(ValueError, match="the 5 validation rows need as many labels per label set, got 4"):
        self_distill(X, y, y, Xe, ye, 1e-2, 3, X_val=X[:5], y_val=y[:4], **kwargs)
    with pytest.raises(ValueError, match="validation labels were given without the validation rows"):
        self_distill(X, y, y, Xe, ye, 1e-2, 3, y_val=y[:4], **kwargs)
    # SGD without a validation split has no validation-selected number; the exact solver's is its solution
    sgd = self_distill(X, y, y, Xe, ye, 1e-2, 3, pll_losses=(), **kwargs)
    assert all(math.isnan(r.test_acc_best_val) for r in sgd.reports)
    exact = self_distill(X, y, y, Xe, ye, 1e-2, 3, rounds=2, pll_losses=())
    assert all(r.test_acc_best_val == r.test_acc_best_test == r.test_acc_last for r in exact.reports)


# ---------------------------------------------------------------------------------------------- PLL


def test_two_hot_breaks_exact_ties_at_random() -> None:
    P = np.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]])
    np.testing.assert_array_equal(two_hot(P), [[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]])
    tied = np.tile([0.7, 0.1, 0.1, 0.1], (300, 1))
    T = two_hot(tied, seed=3)
    assert (T[:, 0] == 0.5).all() and np.allclose(T.sum(1), 1.0)
    seconds = np.bincount(T[:, 1:].argmax(1), minlength=3)
    assert seconds.min() > 60  # all three tied classes get picked, not always the first
    np.testing.assert_array_equal(T, two_hot(tied, seed=3))


def _superclass_run(m: int, eta: float, n: int = 20, exact: bool = True) -> tuple:
    K = 12
    data = block_features(K, n, 0.5, 0.3, e=0.1, m=m, n_test=5)
    sup = np.arange(K) // m
    y_given = corrupt_labels(data.y_train, corruption_matrix("superclass", K, eta, sup), 0, exact=exact)
    run = self_distill(
        data.X_train,
        y_given,
        data.y_train,
        data.X_test,
        data.y_test,
        1e-4,
        K,
        rounds=1,
        pll_losses=("gce", "ce"),
        keep_outputs=True,
    )
    top2 = np.argsort(-run.outputs["Teacher"], 1)[:, :2]
    return data, {r.name: r for r in run.reports}, run.outputs, top2


@pytest.mark.parametrize("eta", [0.15, 0.3, 0.5])
def test_pll_reaches_full_accuracy_when_top2_holds_the_true_class(eta: float) -> None:
    """Superclass size 3, labels corrupted in exact proportions: the teacher errs, but its top-2
    always contains the true class, and one PLL round (GCE as in the official code, and CE with the
    two-hot target) gets every training instance right."""
    data, rows, _, top2 = _superclass_run(3, eta)
    assert (top2 == data.y_train[:, None]).any(1).all()
    assert rows["Teacher"].train_acc_true < 0.9
    assert rows["PLL"].train_acc_true == 1.0
    assert rows["PLL-CE"].train_acc_true == 1.0


def test_pll_top2_condition_is_not_enough_with_sampled_labels() -> None:
    """Sampled (not exact-proportion) labels at low noise: the top-2 still always holds the true class,
    but the teacher's second candidate is the same mate for (almost) a whole class, so that class's
    two-hot targets put equal mass on it and the mate, and the PLL student falls below the teacher."""
    data, rows, _, top2 = _superclass_run(3, 0.1, n=30, exact=False)
    assert (top2 == data.y_train[:, None]).any(1).all()
    assert rows["PLL-CE"].train_acc_true < rows["Teacher"].train_acc_true < 1.0


def test_pll_ties_at_superclass_size_two() -> None:
    """Superclass size 2: the teacher's top-2 is always {true class, its partner}, so both classes of
    a superclass get the same two-hot target and the student's objective is symmetric in them. The
    CE student's optimum is unique, hence symmetric: equal logits for the pair on every training
    instance, a tie (its argmax would be round-off). The GCE student, started from the asymmetric
    teacher, ends at the same tie. Ties count as a coin flip, so both score exactly 50 % and fall
    below the teacher."""
    data, rows, _, top2 = _superclass_run(2, 0.3)
    y = data.y_train
    partner = y ^ 1  # classes 2s and 2s + 1 form a superclass
    np.testing.assert_array_equal(np.sort(top2, 1), np.sort(np.c_[y, partner], 1))
    for name in ("PLL-CE", "PLL"):
        assert rows[name].train_tied == 1.0, name
        assert rows[name].train_acc_true == 0.5, name
        assert rows[name].train_acc_true < rows["Teacher"].train_acc_true


def test_accuracy_counts_ties_as_coin_flips() -> None:
    X = np.eye(3)
    W = np.array([[1.0, 0.0, 2.0], [1.0, 0.5, 2.0], [0.0, 0.2, 2.0]])  # logits = Wᵀ rows of X
    # rows: tie {0, 1}; clear 1; three-way tie
    assert accuracy(X, W, np.array([0, 1, 2])) == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    assert tie_fraction(X, W) == pytest.approx(2 / 3)
    assert accuracy(
        X, W + np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1e-3]]), np.array([0, 1, 2])
    ) == pytest.approx((0.5 + 1 + 1) / 3)


# ---------------------------------------------------------------------------------------------- end to end


def _job_cfg(**over: object) -> dict:
    cfg = {
        "experiment": "test",
        "report": "table",
        "table_by": [],
        "task": "distill",
        "seed": 0,
        "cache_dir": "unused",
        "save_outputs": False,
        "sd": {
            "features": {
                "kind": "block",
                "name": "block",
                "K": SMALL["K"],
                "n": SMALL["n"],
                "c": SMALL["c"],
                "d": SMALL["d"],
                "e": None,
                "m": None,
                "n_test": 0,
                "feature_seed": 0,
                "rotate": False,
            },
            "corruption": {"kind": "sym", "eta": 0.0, "exact": True},
            "solver": {"name": "exact", "tol": 1e-9},
            "rounds": 4,
            "pll": {"losses": [], "q": 0.7},
            "lam": SMALL["lam"],
        },
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def test_thresholds_predict_the_simulation_end_to_end(tmp_path) -> None:
    """Exact-proportion symmetric noise through the job function (features → corruption → probes):
    every round's 'all training instances right' equals the theory's, and the first such round equals
    the population threshold's, at every attainable η (steps of (K − 1)/n)."""
    K, n = SMALL["K"], SMALL["n"]
    thresholds = [theory.threshold(K, n, SMALL["c"], SMALL["d"], SMALL["lam"], t) for t in range(1, 5)]
    firsts = set()
    for eta in 3 * np.arange(1, 16) / n:  # 0.05 ... 0.75 = (K − 1)/K, where g reaches 0
        res = run_job(_job_cfg(**{"sd.corruption.eta": float(eta)}), tmp_path)
        simulated = [m["train_acc_true"] == 1.0 for m in res["models"]]
        assert simulated == res["theory"]["all_correct_realized"], f"eta={eta}"
        first = next((t for t, ok in enumerate(simulated, start=1) if ok), None)
        assert first == theory.rounds_to_full_accuracy(
            K, n, SMALL["c"], SMALL["d"], SMALL["lam"], eta, max_rounds=4
        )
        assert first == next((t for t, h in enumerate(thresholds, start=1) if eta < h), None)
        firsts.add(first)
    assert {1, 2, None} <= firsts  # the grid crosses thresholds: teacher right, a student needed, none


def test_job_records_both_accuracies_and_true_label_training_accuracy(tmp_path) -> None:
    res = run_job(
        _job_cfg(
            **{
                "sd.corruption.eta": 0.5,
                "sd.corruption.exact": False,
                "sd.features.n_test": 5,
                "sd.pll.losses": ["gce"],
            }
        ),
        tmp_path,
    )
    names = [m["name"] for m in res["models"]]
    assert names == ["Teacher", "2", "3", "4", "PLL"]
    for m in res["models"]:
        assert m["test_acc_best_val"] == m["test_acc_best_test"] == m["test_acc_last"]  # exact: no epochs
        assert 0.0 <= m["train_acc_true"] <= 1.0
    teacher = res["models"][0]
    # the teacher fits its (noisy) labels better than it agrees with the true ones
    assert teacher["train_acc_given"] > teacher["train_acc_true"]
    assert abs(res["noise_realized"] - 0.5) < 0.15
    assert res["teacher_checkpoint"] == "last"


_SGD = {"name": "sgd", "epochs": 4, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "lr_decay": 0.98}


@pytest.mark.parametrize("checkpoint", ["best_test", "best_val"])
def test_selected_checkpoint_job_is_recorded_and_its_tables_say_so(tmp_path, checkpoint: str) -> None:
    from experiments.selfdistill.study import write_accuracy_tables

    sgd = {**_SGD, "val_fraction": 0.2, "val_seed": 0}
    over = {"sd.features.n_test": 5, "sd.solver": sgd, "sd.rounds": 2, "sd.teacher_checkpoint": checkpoint}
    res = run_job(_job_cfg(**over), tmp_path / "job")
    assert res["teacher_checkpoint"] == checkpoint and [m["name"] for m in res["models"]] == ["Teacher", "2"]
    assert (res["n_train"], res["n_val"]) == (4 * 48, 4 * 12)
    paths = write_accuracy_tables("test", [res], tmp_path / "tables")
    text = next(p for p in paths if p.name == "test_test_acc.md").read_text()
    title, rows = text.splitlines()[0], [line.split("|")[1:3] for line in text.splitlines()[4:]]
    word = (
        "best-test-accuracy epoch (the official protocol" if checkpoint == "best_test" else "best-validation"
    )
    assert f"taught by its {word}" in title and "N=192 train + 48 validation / 20 test" in title
    assert [(m.strip(), e.strip()) for m, e in rows] == [
        (name, epoch)
        for name in ("Teacher", "2")
        for epoch in ("last", "best on validation", "best on test (official protocol)")
    ]


def test_validate_lists_the_choices() -> None:
    for key, bad, match in [
        ("sd.solver.name", "adam", r"sd.solver.name='adam'.*\['exact', 'sgd'\]"),
        ("sd.corruption.kind", "pair", r"sd.corruption.kind='pair'.*'sym', 'asym', 'superclass'"),
        ("task", "plot", r"task='plot'.*\['distill', 'spectrum'\]"),
        ("sd.pll.losses", ["mae"], r"sd.pll.losses\[\]='mae'.*\['gce', 'ce'\]"),
        (
            "sd.teacher_checkpoint",
            "best",
            r"sd.teacher_checkpoint='best'.*\['last', 'best_val', 'best_test'\]",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            validate(_job_cfg(**{key: bad}))
    for checkpoint, split in (("best_test", "test"), ("best_val", "validation")):
        with pytest.raises(
            ValueError, match=f"{checkpoint} picks an SGD epoch by {split} accuracy; it needs sd/solver=sgd"
        ):
            validate(_job_cfg(**{"sd.teacher_checkpoint": checkpoint}))  # the default solver is exact
    with pytest.raises(ValueError, match=r"sd.solver.val_fraction=1.0 must lie in \[0, 1\)"):
        validate(_job_cfg(**{"sd.solver": {**_SGD, "val_fraction": 1.0}}))
    with pytest.raises(ValueError, match="the 'exact' solver has no epochs to select"):
        validate(_job_cfg(**{"sd.solver": {"name": "exact", "tol": 1e-9, "val_fraction": 0.1}}))
    with pytest.raises(ValueError, match="best_val needs a validation split: set sd.solver.val_fraction > 0"):
        validate(_job_cfg(**{"sd.solver": {**_SGD, "val_fraction": 0}, "sd.teacher_checkpoint": "best_val"}))
    with pytest.raises(ValueError, match=r"sd.corruption.superclasses='labels'.*\['cluster', 'features'\]"):
        validate(_job_cfg(**{"sd.corruption.kind": "superclass", "sd.corruption.superclasses": "labels"}))


# ---------------------------------------------------------------------------------------------- features


def test_stratified_split_is_deterministic_and_per_class() -> None:
    y = np.repeat(np.arange(5), [10, 20, 30, 7, 3])
    a, b = feat.stratified_split(y, 0.3, 0), feat.stratified_split(y, 0.3, 0)
    np.testing.assert_array_equal(a, b)
    assert [int(a[y == k].sum()) for k in range(5)] == [3, 6, 9, 2, 1]
    assert not np.array_equal(a, feat.stratified_split(y, 0.3, 1))


def test_photo_crops_keep_test_pixels_apart() -> None:
    specs = feat.photo_crop_specs(per_class=20, test_fraction=0.3, seed=0)
    assert len(specs) == 20 * len(feat.PHOTO_SOURCES) and specs[:, 1].sum() == 6 * len(feat.PHOTO_SOURCES)
    for k, source in enumerate(feat.PHOTO_SOURCES):
        H, W = feat._photo(source).shape[:2]
        wide = W >= H
        cut = round(0.7 * (W if wide else H))
        mine = specs[specs[:, 0] == k]
        lo = mine[:, 3] if wide else mine[:, 2]  # first coordinate along the split axis
        hi = lo + mine[:, 4]
        test = mine[:, 1] == 1
        assert (lo[test] >= cut).all() and (hi[~test] <= cut).all()
        assert (mine[:, 2] + mine[:, 4] <= H).all() and (mine[:, 3] + mine[:, 4] <= W).all()


def test_efficientnet_digits_features_are_cached(tmp_path, monkeypatch) -> None:
    """Real EfficientNet-Lite0 features of 2 digits per class (a tiny subset keeps this fast); the
    second load must come from the npz without building the extractor."""
    cfg = {
        "kind": "efficientnet",
        "dataset": "digits",
        "variant": 0,
        "size": 96,
        "batch_size": 32,
        "limit_per_class": 3,
        "test_fraction": 1 / 3,
        "split_seed": 0,
    }
    first = feat.load_features(cfg, tmp_path)
    cache = list(tmp_path.glob("*.npz"))
    assert [p.name for p in cache] == ["efficientnet_lite0_digits_96px_lim3.npz"]
    assert first.X_train.shape == (20, 1280) and first.X_test.shape == (10, 1280)
    assert np.isfinite(first.X_train).all() and first.X_train.std() > 0
    np.testing.assert_array_equal(np.bincount(first.y_test), np.ones(10))

    def no_extractor(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss: the extractor was built again")

    monkeypatch.setattr(feat, "build_teacher", no_extractor)
    again = feat.load_features(cfg, tmp_path)
    np.testing.assert_array_equal(first.X_train, again.X_train)


def test_paper_datasets_fail_at_once_naming_what_to_set(tmp_path, monkeypatch) -> None:
    for name in ("PHIS_SD_DATA_ROOT", "PHIS_CIFAR100_ROOT", "PHIS_FLOWERS102_ROOT", "PHIS_RESNET34_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w")
    import torchvision  # noqa: F401  (imported before the clock starts: only the failures are timed)

    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"set PHIS_CIFAR100_ROOT=.*sd.features.root"):
        feat.load_features({"kind": "torchvision", "dataset": "cifar100", "weights": str(weights)}, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'flowers102' at .* \(from sd.features.root\) lacks"):
        cfg = {"kind": "torchvision", "dataset": "flowers102", "root": str(tmp_path), "weights": str(weights)}
        feat.load_features(cfg, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"sd.features.weights="):
        feat.resnet34_extractor(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"sd.features.dataset='imagenet'.*'cifar100'"):
        feat.load_features({"kind": "torchvision", "dataset": "imagenet", "root": "x"}, tmp_path)
    with pytest.raises(ValueError, match=r"sd.features.kind='clip'.*'block', 'efficientnet', 'torchvision'"):
        feat.load_features({"kind": "clip"}, tmp_path)
    assert time.perf_counter() - t0 < 10  # no download attempt, no retries
    assert not list(tmp_path.rglob("*.npz"))


def test_resnet34_extraction_path_on_fake_data(tmp_path) -> None:
    """The paper's extractor on torchvision's FakeData with random weights saved as a local file."""
    import torchvision

    weights = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), weights)
    model = feat.resnet34_extractor(weights)
    data = torchvision.datasets.FakeData(
        size=6, image_size=(3, 40, 40), num_classes=3, transform=feat.imagenet_transform(32)
    )
    X, y = feat.extract_dataset(model, data, batch_size=4, num_workers=0, desc="fake")
    assert X.shape == (6, 512) and y.shape == (6,) and np.isfinite(X).all()
    assert (X >= 0).all()  # post-ReLU average pool


def test_bench_report_lists_every_run_and_reads_a_single_stored_run(tmp_path) -> None:
    """bench.md has one row per run and batched thread count; bench.json of one run (a dict) still renders."""
    from experiments.bench.selfdistill import write_report

    def run(seconds: float) -> dict:
        agree = {"accuracy_values_compared": 6, "accuracy_values_different": 0}
        agree["max_abs_softmax_output_diff"] = 0.0
        return {
            "features": "digits", "N": 10, "D": 4, "lam": 5e-4, "cells": 1, "models": 6,
            "one_by_one": {"threads": 1, "seconds": 80.0, "loadavg": [[0.5] * 3, [1.0] * 3]},
            "batched": [{"threads": 2, "seconds": seconds, "speedup": 80.0 / seconds,
                         "loadavg": [[1.0] * 3, [1.5] * 3], **agree}],
        }  # fmt: skip

    assert write_report(tmp_path, [run(10.0), run(8.0)], []) == 0
    rows = [line for line in (tmp_path / "bench.md").read_text().splitlines() if "| digits |" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 2"]
    assert "8.00×" in rows[0] and "10.00×" in rows[1]
    write_report(tmp_path, run(16.0), [])  # the layout of bench.json before repeats (no start time, no CPU)
    text = (tmp_path / "bench.md").read_text()
    assert "| 1 | — | — | digits |" in text and "5.00×" in text and "| 2 | — | — | digits |" not in text
    write_report(tmp_path, [{**run(10.0), "started": "2026-11-30 04:00", "cpu": "AVX512"}], [])
    assert "| 1 | 2026-11-30 04:00 | AVX512 | digits |" in (tmp_path / "bench.md").read_text()
