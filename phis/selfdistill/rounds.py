"""The SD-PLL training procedures: self-distillation rounds and the PLL student, from linear probes.

``self_distill`` runs a teacher on the given labels, then students that each start from scratch on
the previous round's training-set softmax outputs (temperature 1), and optionally the PLL student:
top-2 classes of the teacher's softmax, ½ each, initialized from the teacher. ``self_distill_batched``
does the same for many label sets at once, training each round's probes of all of them together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from phis.selfdistill.batched import fit_sgd_batched
from phis.selfdistill.probe import (
    PLL_ROWS,
    SOLVERS,
    ProbeFit,
    ProbeTask,
    SGDRecipe,
    accuracy,
    check_loss,
    fit_probe,
    logit_accuracy,
    logit_tie_fraction,
    one_hot,
    two_hot,
)
from phis.selfdistill.theory import softmax

# those of the epoch with the best test accuracy (the official SD-PLL code's choice, selected on test).
TEACHER_CHECKPOINTS = ("last", "best_test")


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
    teacher_checkpoint: str = "last",
) -> SDRun:
    """Teacher (round 1) + ``rounds − 1`` students, then one PLL student per loss in ``pll_losses``,
    each probe fit alone (the reference for ``self_distill_batched``).

    Rows are named "Teacher", "2", ..., str(rounds), then "PLL" (GCE) / "PLL-CE". Exact rounds are
    warm-started from the previous round's W; each round's minimizer is unique, so that only saves
    iterations. SGD round t draws its init and minibatch order from seed 1000·seed + t, the PLL
    students from 1000·seed + 999. ``teacher_checkpoint`` (``TEACHER_CHECKPOINTS``) picks the weights
    that teach the next round and the PLL student; reports are of the last epoch's weights either way
    (with ``test_acc_best`` the best test accuracy over epochs).
    """

    def one_by_one(tasks: Sequence[ProbeTask]) -> list[tuple[ProbeFit, float]]:
        timed = []
        for task in tasks:
            t0 = time.perf_counter()
            fit = _fit_task(X_train, task, solver, tol, X_test, y_test)
            timed.append((fit, time.perf_counter() - t0))
        return timed

    return _distill(
        X_train,
        [y_given],
        [seed],
        y_true,
        X_test,
        y_test,
        lam,
        num_classes,
        rounds,
        solver,
        recipe,
        pll_losses,
        q,
        keep_outputs,
        teacher_checkpoint,
        one_by_one,
    )[0]


def self_distill_batched(
    X_train: np.ndarray,
    y_given: Sequence[np.ndarray],
    y_true: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    lam: float,
    num_classes: int,
    *,
    seeds: Sequence[int],
    rounds: int = 5,
    solver: str = "exact",
    recipe: SGDRecipe | None = None,
    pll_losses: Sequence[str] = ("gce",),
    q: float = 0.7,
    tol: float = 1e-8,
    keep_outputs: bool = False,
    teacher_checkpoint: str = "last",
    device: str | torch.device | None = None,
) -> list[SDRun]:
    """``self_distill`` of every label set y_given[r] (with seed seeds[r]) on the same features.

    With SGD, each round's probes of all label sets are one ``fit_sgd_batched`` call: a table's (η,
    seed) cells train together, and the PLL students (every loss), which need only the teacher, join
    round 2's call (a round fewer; with one round they follow it). A run's reports equal
    ``self_distill``'s up to float32 round-off; a model's ``seconds`` is its share of its batch.
    The exact solver fits the probes one by one.
    """
    if len(y_given) != len(seeds):
        raise ValueError(f"one seed per label set: got {len(y_given)} label sets and {len(seeds)} seeds")

    def batched(tasks: Sequence[ProbeTask]) -> list[tuple[ProbeFit, float]]:
        t0 = time.perf_counter()
        if solver == "sgd":
            fits = fit_sgd_batched(X_train, tasks, X_eval=X_test, y_eval=y_test, device=device)
        else:
            fits = [_fit_task(X_train, task, solver, tol, X_test, y_test) for task in tasks]
        share = (time.perf_counter() - t0) / max(len(tasks), 1)
        return [(fit, share) for fit in fits]

    return _distill(
        X_train,
        list(y_given),
        list(seeds),
        y_true,
        X_test,
        y_test,
        lam,
        num_classes,
        rounds,
        solver,
        recipe,
        pll_losses,
        q,
        keep_outputs,
        teacher_checkpoint,
        batched,
    )


def _fit_task(
    X: np.ndarray, task: ProbeTask, solver: str, tol: float, X_eval: np.ndarray, y_eval: np.ndarray
) -> ProbeFit:
    return fit_probe(
        X,
        task.targets,
        task.lam,
        solver,
        recipe=task.recipe,
        loss=task.loss,
        q=task.q,
        W0=task.W0,
        seed=task.seed,
        tol=tol,
        X_eval=X_eval,
        y_eval=y_eval,
    )


def _distill(
    X_train: np.ndarray,
    y_given: list[np.ndarray],
    seeds: list[int],
    y_true: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    lam: float,
    num_classes: int,
    rounds: int,
    solver: str,
    recipe: SGDRecipe | None,
    pll_losses: Sequence[str],
    q: float,
    keep_outputs: bool,
    teacher_checkpoint: str,
    fit_many: Callable[[Sequence[ProbeTask]], list[tuple[ProbeFit, float]]],
) -> list[SDRun]:
    """The rounds of ``self_distill`` for every label set, each round's probes fit by one ``fit_many``."""
    if rounds < 1:
        raise ValueError(f"need rounds ≥ 1 (the teacher), got {rounds}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    for loss in pll_losses:
        check_loss(loss)
    if teacher_checkpoint not in TEACHER_CHECKPOINTS:
        raise ValueError(
            f"unknown teacher_checkpoint {teacher_checkpoint!r}; choose one of {TEACHER_CHECKPOINTS}"
        )
    if teacher_checkpoint == "best_test" and (solver != "sgd" or len(y_test) == 0):
        raise ValueError(
            f"teacher_checkpoint='best_test' selects an SGD epoch by test accuracy: it needs solver='sgd' "
            f"(got {solver!r}) and a test set (got {len(y_test)} test samples)"
        )
    recipe = recipe or SGDRecipe()
    runs = [SDRun([]) for _ in y_given]
    targets = [one_hot(y, num_classes) for y in y_given]
    W_prev: list[np.ndarray | None] = [None] * len(runs)
    teachers: list[tuple[np.ndarray, np.ndarray]] = []
    cells = [(r, loss) for r in range(len(runs)) for loss in pll_losses]

    def pll_tasks() -> list[ProbeTask]:
        pll_targets = [two_hot(P_t, seed=seed) for (_, P_t), seed in zip(teachers, seeds)]
        return [
            ProbeTask(
                pll_targets[r], lam, recipe, loss=loss, q=q, W0=teachers[r][0], seed=seeds[r] * 1000 + 999
            )
            for r, loss in cells
        ]

    pll_fits: list[tuple[ProbeFit, float]] = []
    for t in range(1, rounds + 1):
        name = "Teacher" if t == 1 else str(t)
        tasks = [
            ProbeTask(
                targets[r], lam, recipe, W0=W_prev[r] if solver == "exact" else None, seed=seeds[r] * 1000 + t
            )
            for r in range(len(runs))
        ]
        # The PLL students need only the teacher: they are fit beside round 2, so that a batched fit
        # trains them in the same stack as the students (their reports still come last).
        fits = fit_many(tasks + (pll_tasks() if t == 2 else []))
        pll_fits += fits[len(runs) :]
        for r, (fit, seconds) in enumerate(fits[: len(runs)]):
            W_teach = fit.W_best if teacher_checkpoint == "best_test" else fit.W
            Z = X_train @ fit.W.T  # training logits: the report's, and the next targets' with "last"
            targets[r] = softmax(Z if W_teach is fit.W else X_train @ W_teach.T)
            W_prev[r] = W_teach
            if t == 1:
                teachers.append((W_teach, targets[r]))
            runs[r].reports.append(_report(name, fit, Z, y_true, y_given[r], X_test, y_test, seconds))
            if keep_outputs:
                runs[r].outputs[name] = targets[r]
    if rounds == 1:
        pll_fits = fit_many(pll_tasks())
    for (r, loss), (fit, seconds) in zip(cells, pll_fits):
        name, Z = PLL_ROWS[loss], X_train @ fit.W.T
        runs[r].reports.append(_report(name, fit, Z, y_true, y_given[r], X_test, y_test, seconds))
        if keep_outputs:
            runs[r].outputs[name] = softmax(Z)
    return runs


def _report(
    name: str,
    fit: ProbeFit,
    train_logits: np.ndarray,
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
        logit_accuracy(train_logits, y_true),
        logit_accuracy(train_logits, y_given),
        logit_tie_fraction(train_logits),
        seconds,
    )
