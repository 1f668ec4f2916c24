"""The SD-PLL training procedures: self-distillation rounds and the PLL student, from linear probes.

``self_distill`` runs a teacher on the given labels, then students that each start from scratch on
the previous round's training-set softmax outputs (temperature 1), and optionally the PLL student:
top-2 classes of the teacher's softmax, ½ each, initialized from the teacher. ``self_distill_batched``
does the same for many label sets at once, training each round's probes of all of them together.
"""

from __future__ import annotations

import math
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
    runner_up_share,
    top2_report,
    two_hot,
)
from phis.selfdistill.theory import softmax

# Which weights of a round teach the next round and the PLL student: the last epoch's; those of the
# epoch with the best accuracy on the validation split (carved from the training set, with its given
# labels); or those of the epoch with the best test accuracy (the official SD-PLL code's choice, a
# selection on the test set, kept only to reproduce its numbers).
TEACHER_CHECKPOINTS = ("last", "best_val", "best_test")


@dataclass
class ModelReport:
    """Accuracies of one model of a self-distillation run (fractions in [0, 1]).

    Test accuracy three ways: of the last epoch's weights; of the first epoch with the best accuracy on
    the validation split (NaN without one); and the best over epochs (the official code's selection on
    the test set). Full-batch solvers have no epochs: all three are the solution's.
    """

    name: str
    test_acc_last: float
    test_acc_best_val: float
    test_acc_best_test: float
    train_acc_true: float  # w.r.t. the true labels: the theory's "every instance predicted right"
    train_acc_given: float  # w.r.t. the (possibly corrupted) labels the teacher saw
    train_tied: float  # fraction of training instances with tied top logits (see ``accuracy``)
    seconds: float = 0.0


@dataclass
class SDRun:
    """All models of one run, teacher first, PLL last; ``outputs`` are training softmax outputs."""

    reports: list[ModelReport]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # name → [N, K]
    # ``top2_report`` of the PLL targets, and each PLL row's ``runner_up_share`` as "<row>_to_runner_up"
    top2: dict[str, float] = field(default_factory=dict)


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
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
) -> SDRun:
    """Teacher (round 1) + ``rounds − 1`` students, then one PLL student per loss in ``pll_losses``,
    each probe fit alone (the reference for ``self_distill_batched``).

    Rows are named "Teacher", "2", ..., str(rounds), then "PLL" (GCE) / "PLL-CE". Exact rounds are
    warm-started from the previous round's W; each round's minimizer is unique, so that only saves
    iterations. SGD round t draws its init and minibatch order from seed 1000·seed + t, the PLL
    students from 1000·seed + 999. X_val [Nv, D] is the validation split, carved from the training
    set, and y_val [Nv] its given (possibly corrupted) labels: SGD epochs are selected on it.
    ``teacher_checkpoint`` (``TEACHER_CHECKPOINTS``) picks the weights that teach the next round and the
    PLL student; a model's training accuracies are of its last epoch's weights either way.
    """
    X_val, (y_val,) = _validation(X_val, [y_val], X_train.shape[1])

    def one_by_one(tasks: Sequence[ProbeTask]) -> list[tuple[ProbeFit, float]]:
        timed = []
        for task in tasks:
            t0 = time.perf_counter()
            fit = _fit_task(X_train, task, solver, tol, X_test, y_test, X_val)
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
        X_val,
        [y_val],
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
    X_val: np.ndarray | None = None,
    y_val: Sequence[np.ndarray] | None = None,
    device: str | torch.device | None = None,
) -> list[SDRun]:
    """``self_distill`` of every label set y_given[r] (with seed seeds[r]) on the same features.

    With SGD, each round's probes of all label sets are one ``fit_sgd_batched`` call: a table's (η,
    seed) cells train together, and the PLL students (every loss), which need only the teacher, join
    round 2's call (a round fewer; with one round they follow it). A run's reports equal
    ``self_distill``'s up to float32 round-off; a model's ``seconds`` is its share of its batch.
    The exact solver fits the probes one by one. y_val[r] holds label set r's validation labels.
    """
    if len(y_given) != len(seeds):
        raise ValueError(f"one seed per label set: got {len(y_given)} label sets and {len(seeds)} seeds")
    if y_val is not None and len(y_val) != len(y_given):
        raise ValueError(
            f"one validation label set per label set: got {len(y_given)} label sets and {len(y_val)}"
        )
    X_val, y_val = _validation(X_val, y_val or [None] * len(y_given), X_train.shape[1])

    def batched(tasks: Sequence[ProbeTask]) -> list[tuple[ProbeFit, float]]:
        t0 = time.perf_counter()
        if solver == "sgd":
            fits = fit_sgd_batched(X_train, tasks, X_eval=X_test, y_eval=y_test, X_val=X_val, device=device)
        else:
            fits = [_fit_task(X_train, task, solver, tol, X_test, y_test, X_val) for task in tasks]
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
        X_val,
        y_val,
        batched,
    )


def _validation(
    X_val: np.ndarray | None, y_val: Sequence[np.ndarray | None], dim: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The validation rows [Nv, D] and each label set's labels [Nv] (Nv = 0 when there are none)."""
    if X_val is None:
        if any(y is not None for y in y_val):
            raise ValueError("validation labels were given without the validation rows X_val")
        return np.zeros((0, dim)), [np.zeros(0, dtype=np.int64) for _ in y_val]
    for y in y_val:
        if y is None or len(y) != len(X_val):
            got = None if y is None else len(y)
            raise ValueError(f"the {len(X_val)} validation rows need as many labels per label set, got {got}")
    return np.asarray(X_val), [np.asarray(y) for y in y_val]


def _fit_task(
    X: np.ndarray,
    task: ProbeTask,
    solver: str,
    tol: float,
    X_eval: np.ndarray,
    y_eval: np.ndarray,
    X_val: np.ndarray | None = None,
) -> ProbeFit:
    """One task fit by the one-by-one path (validation rows scored against ``task.y_val``)."""
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
        X_val=X_val,
        y_val=task.y_val,
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
    X_val: np.ndarray,
    y_val: list[np.ndarray],
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
    selection = {"best_val": ("validation", len(X_val)), "best_test": ("test", len(y_test))}
    if teacher_checkpoint in selection and (solver != "sgd" or selection[teacher_checkpoint][1] == 0):
        split, size = selection[teacher_checkpoint]
        raise ValueError(
            f"teacher_checkpoint={teacher_checkpoint!r} selects an SGD epoch by {split} accuracy: it needs "
            f"solver='sgd' (got {solver!r}) and a {split} set (got {size} {split} samples)"
        )
    recipe = recipe or SGDRecipe()
    runs = [SDRun([]) for _ in y_given]
    targets = [one_hot(y, num_classes) for y in y_given]
    W_prev: list[np.ndarray | None] = [None] * len(runs)
    teachers: list[tuple[np.ndarray, np.ndarray]] = []
    cells = [(r, loss) for r in range(len(runs)) for loss in pll_losses]
    val_labels = y_val if len(X_val) else [None] * len(runs)

    def pll_tasks() -> list[ProbeTask]:
        pll_targets = [two_hot(P_t, seed=seed) for (_, P_t), seed in zip(teachers, seeds)]
        return [
            ProbeTask(
                pll_targets[r],
                lam,
                recipe,
                loss=loss,
                q=q,
                W0=teachers[r][0],
                seed=seeds[r] * 1000 + 999,
                y_val=val_labels[r],
            )
            for r, loss in cells
        ]

    pll_fits: list[tuple[ProbeFit, float]] = []
    for t in range(1, rounds + 1):
        name = "Teacher" if t == 1 else str(t)
        tasks = [
            ProbeTask(
                targets[r],
                lam,
                recipe,
                W0=W_prev[r] if solver == "exact" else None,
                seed=seeds[r] * 1000 + t,
                y_val=val_labels[r],
            )
            for r in range(len(runs))
        ]
        # The PLL students need only the teacher: they are fit beside round 2, so that a batched fit
        # trains them in the same stack as the students (their reports still come last).
        fits = fit_many(tasks + (pll_tasks() if t == 2 else []))
        pll_fits += fits[len(runs) :]
        for r, (fit, seconds) in enumerate(fits[: len(runs)]):
            checkpoints = {"last": fit.W, "best_val": fit.W_best_val, "best_test": fit.W_best_test}
            W_teach = checkpoints[teacher_checkpoint]
            Z = X_train @ fit.W.T  # training logits: the report's, and the next targets' with "last"
            targets[r] = softmax(Z if W_teach is fit.W else X_train @ W_teach.T)
            W_prev[r] = W_teach
            if t == 1:
                teachers.append((W_teach, targets[r]))
                if pll_losses:
                    runs[r].top2 = top2_report(targets[r], y_true, seed=seeds[r])
            runs[r].reports.append(_report(name, fit, Z, y_true, y_given[r], X_test, y_test, seconds))
            if keep_outputs:
                runs[r].outputs[name] = targets[r]
    if rounds == 1:
        pll_fits = fit_many(pll_tasks())
    for (r, loss), (fit, seconds) in zip(cells, pll_fits):
        name, Z = PLL_ROWS[loss], X_train @ fit.W.T
        runs[r].reports.append(_report(name, fit, Z, y_true, y_given[r], X_test, y_test, seconds))
        runs[r].top2[f"{name}_to_runner_up"] = runner_up_share(Z, teachers[r][1], y_true, seed=seeds[r])
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
    if curve is None:  # no epochs (full batch; or no test set, and then NaN): the one accuracy there is
        best_val = last
    elif fit.val_acc_per_epoch is None:  # SGD without a validation split: no honest selection
        best_val = math.nan
    else:  # the test accuracy of the first epoch with the best validation accuracy
        best_val = float(curve[np.argmax(fit.val_acc_per_epoch)])
    return ModelReport(
        name,
        last,
        best_val,
        best,
        logit_accuracy(train_logits, y_true),
        logit_accuracy(train_logits, y_given),
        logit_tie_fraction(train_logits),
        seconds,
    )
