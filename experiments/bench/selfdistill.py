"""Benchmark of the SD-PLL probes, in one run: a full digits table (8 η × 3 seeds × teacher + 4 students
+ PLL, the paper's SGD recipe) trained one probe at a time and as batches of probes, with the time
ratio and a check that every model's accuracies match; optionally (``--solvers``) the closed form and
the exact solver against SGD on the same kind of table.

    python -m experiments.bench.selfdistill --out experiments/results/selfdistill [--batched-threads 1,2]
    python -m experiments.bench.selfdistill --repeats 3   # three runs, each timing both ways afresh
    python -m experiments.bench.selfdistill --render   # bench.md again, e.g. after a new mini study

Writes bench.json and bench.md (atomically; a part not run this time keeps its last results), with
the load average of the machine around each timing, and the mini study's wall time (its timings.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from phis.results import atomic_write_json, atomic_write_text, markdown_table
from phis.selfdistill import theory
from phis.selfdistill.corruption import corrupt_labels, corruption_matrix
from phis.selfdistill.features import FeatureSet, block_feature_set, load_features, validation_rows
from phis.selfdistill.probe import SGDRecipe, fit_probe, one_hot
from phis.selfdistill.rounds import SDRun, self_distill, self_distill_batched
from phis.selfdistill.theory import softmax

ETAS = (0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
BLOCK = {"kind": "block", "name": "block", "K": 10, "n": 50, "c": 0.4, "d": 0.1, "n_test": 20}
# SGD learning rates: the digits table's; for the unit-norm block features the rate is scaled up by
# about the squared feature norm of real features (~250), else 200 epochs stop far from the optimum.
BLOCK_LR, DIGITS_LR = 20.0, 0.05
DIGITS = {"kind": "efficientnet", "name": "digits", "dataset": "digits", "variant": 0, "size": 224}
# the digits table of conf/sd_experiment/digits_table.yaml: λ (sd/lam=wd5e-4), seeds, PLL loss, and
# the validation split its epochs are selected on (sd/solver=sgd: val_fraction, val_seed)
DIGITS_LAM, TABLE_SEEDS, TABLE_PLL = 5e-4, (0, 1, 2), ("gce",)
VAL_FRACTION, VAL_SEED = 0.1, 0
REPORT_FIELDS = (
    "test_acc_last",
    "test_acc_best_val",
    "test_acc_best_test",
    "train_acc_true",
    "train_acc_given",
    "train_tied",
)
# what bench.json runs from before the validation split compared (test_acc_best: best on test)
LEGACY_FIELDS = ("test_acc_last", "test_acc_best", "train_acc_true", "train_acc_given", "train_tied")


def _rounds(feats: FeatureSet, y_given: np.ndarray, lam: float, rounds: int, solver: str, lr: float) -> tuple:
    """Training predictions [rounds, N] and test accuracies [rounds] of teacher + students, and seconds."""
    t0 = time.perf_counter()
    targets, W, preds, test = one_hot(y_given, feats.num_classes), None, [], []
    for t in range(rounds):
        warm = W if solver == "exact" else None
        W = fit_probe(
            feats.X_train, targets, lam, solver, recipe=SGDRecipe(lr=lr), W0=warm, seed=t, tol=1e-8
        ).W
        targets = softmax(feats.X_train @ W.T)
        preds.append(targets.argmax(1))
        test.append(float(np.mean((feats.X_test @ W.T).argmax(1) == feats.y_test)))
    return np.array(preds), np.array(test), time.perf_counter() - t0


def _closed_form(feats: FeatureSet, y_given: np.ndarray, lam: float, rounds: int) -> tuple:
    """Training predictions [rounds, N] of the linearized label averaging, and seconds."""
    t0 = time.perf_counter()
    G = feats.X_train @ feats.X_train.T
    Y0 = one_hot(y_given, feats.num_classes)
    preds = [theory.label_averaging(G, Y0, lam, t).argmax(1) for t in range(1, rounds + 1)]
    return np.array(preds), time.perf_counter() - t0


def bench_table(
    feats: FeatureSet, lam: float, lr: float, seeds: Sequence[int], rounds: int, closed: bool
) -> dict:
    """All methods on one table (η × seeds × rounds); accuracies are w.r.t. the true training labels."""
    methods = ["closed_form", "exact", "sgd"] if closed else ["exact", "sgd"]
    seconds = dict.fromkeys(methods, 0.0)
    acc = {m: [] for m in methods}
    test = {m: [] for m in ("exact", "sgd")}
    same = {m: [] for m in methods if m != "exact"}
    for eta in ETAS:
        C = corruption_matrix("sym", feats.num_classes, eta)
        for seed in seeds:
            y_given = corrupt_labels(feats.y_train, C, seed)
            preds = {}
            for m in ("exact", "sgd"):
                preds[m], t_acc, s = _rounds(feats, y_given, lam, rounds, m, lr)
                seconds[m] += s
                test[m].append(t_acc)
            if closed:
                preds["closed_form"], s = _closed_form(feats, y_given, lam, rounds)
                seconds["closed_form"] += s
            for m in methods:
                acc[m].append((preds[m] == feats.y_train).mean(1))
            for m in same:
                same[m].append((preds[m] == preds["exact"]).mean(1))
    acc = {m: np.array(v) for m, v in acc.items()}  # [cells, rounds]
    return {
        "features": feats.name,
        "N": len(feats.y_train),
        "D": feats.X_train.shape[1],
        "lam": lam,
        "sgd_lr": lr,
        "models_per_method": len(ETAS) * len(seeds) * rounds,
        "seconds": seconds,
        "train_acc_true_mean": {m: float(v.mean()) for m, v in acc.items()},
        "mean_abs_diff_vs_exact": {m: float(np.abs(acc[m] - acc["exact"]).mean()) for m in same},
        "same_train_prediction_vs_exact": {m: float(np.mean(v)) for m, v in same.items()},
        "test_acc_mean_abs_diff_sgd_vs_exact": float(
            np.abs(np.array(test["sgd"]) - np.array(test["exact"])).mean()
        ),
    }


def bench_batched(feats: FeatureSet, threads: int, batched_threads: Sequence[int], rounds: int = 5) -> dict:
    """A full table trained one probe at a time (``self_distill`` per cell, ``threads`` threads) and as
    batches of probes (``self_distill_batched``: each round's probes of all cells together, once per
    entry of ``batched_threads``); seconds, speed-ups, agreement of every model's accuracies."""
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    cells = [(eta, seed) for eta in ETAS for seed in TABLE_SEEDS]
    given = [
        corrupt_labels(feats.y_train, corruption_matrix("sym", feats.num_classes, eta), seed)
        for eta, seed in cells
    ]
    is_val = validation_rows(feats.y_train, VAL_FRACTION, VAL_SEED)  # as the table's jobs carve it
    X_train, X_val = feats.X_train[~is_val], feats.X_train[is_val]
    settings = {
        "rounds": rounds,
        "solver": "sgd",
        "recipe": SGDRecipe(lr=DIGITS_LR),
        "pll_losses": TABLE_PLL,
        "keep_outputs": True,
    }
    args = (feats.y_train[~is_val], feats.X_test, feats.y_test, DIGITS_LAM, feats.num_classes)
    with _threads(threads):
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        alone = [
            self_distill(X_train, y[~is_val], *args, seed=seed, X_val=X_val, y_val=y[is_val], **settings)
            for y, (_, seed) in zip(given, cells)
        ]
        one_by_one = {
            "threads": threads,
            "seconds": time.perf_counter() - t0,
            "loadavg": [load_before, os.getloadavg()],
        }
    batched = []
    for n in batched_threads:
        with _threads(n):
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            runs = self_distill_batched(
                X_train,
                [y[~is_val] for y in given],
                *args,
                seeds=[s for _, s in cells],
                X_val=X_val,
                y_val=[y[is_val] for y in given],
                **settings,
            )
            seconds = time.perf_counter() - t0
            batched.append(
                {
                    "threads": n,
                    "seconds": seconds,
                    "speedup": one_by_one["seconds"] / seconds,
                    "loadavg": [load_before, os.getloadavg()],
                    **agreement(alone, runs),
                }
            )
    return {
        "started": started,  # UTC
        "cpu": torch.backends.cpu.get_cpu_capability(),  # this VM's host varies: AVX2 one day, AVX512 another
        "features": feats.name,
        "N": len(X_train),
        "n_val": len(X_val),
        "D": feats.X_train.shape[1],
        "lam": DIGITS_LAM,
        "sgd_lr": DIGITS_LR,
        "cells": len(cells),
        "models": sum(len(run.reports) for run in alone),
        "fields_compared": list(REPORT_FIELDS),
        "one_by_one": one_by_one,
        "batched": batched,
    }


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """``n`` torch and BLAS threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


def agreement(alone: Sequence[SDRun], batched: Sequence[SDRun]) -> dict:
    """How many model reports differ between the two ways, and by how much (accuracies, outputs)."""
    fields = [
        (a, b, f)
        for ra, rb in zip(alone, batched)
        for a, b in zip(ra.reports, rb.reports)
        for f in REPORT_FIELDS
    ]
    outputs = [
        np.abs(ra.outputs[k] - rb.outputs[k]).max() for ra, rb in zip(alone, batched) for k in ra.outputs
    ]
    return {
        "accuracy_values_compared": len(fields),
        "accuracy_values_different": sum(
            not (getattr(a, f) == getattr(b, f) or (np.isnan(getattr(a, f)) and np.isnan(getattr(b, f))))
            for a, b, f in fields
        ),
        "max_abs_accuracy_diff": float(np.nanmax([abs(getattr(a, f) - getattr(b, f)) for a, b, f in fields])),
        "max_abs_softmax_output_diff": float(max(outputs)),
    }


def report_batched(runs: Sequence[dict]) -> str:
    """The markdown section of ``bench_batched``'s runs: one row per run and batched thread count."""

    def load(pair: list) -> str:
        return " → ".join(f"{x[0]:.2f}" for x in pair)

    header = [
        "run",
        "started (UTC)",
        "CPU",
        "features",
        "N×D",
        "λ",
        "(η, seed) cells",
        "models",
        "one by one: threads",
        "s",
        "load avg (1 min)",
    ]
    header += [
        "batched: threads",
        "s",
        "load avg (1 min)",
        "speed-up",
        "accuracies equal",
        "max abs Δ softmax output",
    ]
    rows = []
    for k, r in enumerate(runs, 1):
        alone = r["one_by_one"]
        for b in r["batched"]:
            row = [k, r.get("started", "—"), r.get("cpu", "—"), r["features"], f"{r['N']}×{r['D']}"]
            row += [f"{r['lam']:g}", r["cells"], r["models"]]
            row += [alone["threads"], f"{alone['seconds']:.1f}", load(alone["loadavg"])]
            row += [b["threads"], f"{b['seconds']:.1f}", load(b["loadavg"]), f"{b['speedup']:.2f}×"]
            equal = b["accuracy_values_compared"] - b["accuracy_values_different"]
            row += [f"{equal} / {b['accuracy_values_compared']}", f"{b['max_abs_softmax_output_diff']:.1e}"]
            rows.append(row)
    text = "### A full SD table, one probe at a time vs batched probes (paper's SGD recipe)\n\n"
    text += markdown_table(header, rows)
    text += (
        "\nTeacher + 4 students + PLL (GCE) per (η, seed); η ∈ {" + ", ".join(f"{e:g}" for e in ETAS) + "}, "
        f"seeds {list(TABLE_SEEDS)}. Each run times the one-by-one loop and the batched probes afresh, "
        f"one after the other. Accuracies compared for every model: {_compared(runs)}. Load average: "
        f"1-minute value before → after each timing on this {os.cpu_count()}-core machine; above "
        f"{os.cpu_count()} it was shared.\n"
    )
    return text


def _compared(runs: Sequence[dict]) -> str:
    """The report fields each run compared (runs stored before the validation split compared
    ``LEGACY_FIELDS``)."""
    by_fields: dict[tuple[str, ...], list[int]] = {}
    for k, r in enumerate(runs, 1):
        by_fields.setdefault(tuple(r.get("fields_compared", LEGACY_FIELDS)), []).append(k)
    if len(by_fields) == 1:
        return ", ".join(next(iter(by_fields)))
    return "; ".join(f"run {', '.join(map(str, ks))}: {', '.join(f)}" for f, ks in by_fields.items())


def report(results: list[dict], mini: dict | None) -> str:
    """The markdown section of ``bench_table`` (every table) and the mini study's wall time."""
    rows = []
    for r in results:
        s = r["seconds"]
        for m in [k for k in s if k != "exact"]:
            test_diff = f"{100 * r['test_acc_mean_abs_diff_sgd_vs_exact']:.2f}" if m == "sgd" else "—"
            timing = [f"{s[m]:.1f}", f"{s['exact']:.1f}", f"{s[m] / s['exact']:.2f}"]
            agreement = [
                f"{100 * r['mean_abs_diff_vs_exact'][m]:.2f}",
                f"{100 * r['same_train_prediction_vs_exact'][m]:.1f}",
                test_diff,
            ]
            size = f"{r['N']}×{r['D']}"
            rows.append(
                [r["features"], size, f"{r['lam']:g}", r["models_per_method"], m, *timing, *agreement]
            )
    header = ["features", "N×D", "λ", "models", "method", "method s", "exact s", "time ratio (method/exact)"]
    header += [
        "mean abs Δ train acc vs exact (pp)",
        "same train prediction as exact (%)",
        "mean abs Δ test acc (pp)",
    ]
    text = "### Closed form / exact solver vs the paper's 200-epoch SGD recipe (one thread)\n\n"
    text += markdown_table(header, rows)
    text += "\nTeacher + 4 students per (η, seed); η ∈ {" + ", ".join(f"{e:g}" for e in ETAS) + "}.\n"
    if mini:
        text += f"\nMini study ({mini['profile']} profile, {mini['lanes']} sweeps side by side): "
        text += f"{mini['total_wall_s']} s wall; per experiment: "
        text += ", ".join(f"{k} {v['wall_s']} s" for k, v in mini["experiments"].items()) + ".\n"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="experiments/results/selfdistill")
    parser.add_argument("--cache-dir", default=".cache/selfdistill")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads of the one-by-one runs"
    )
    parser.add_argument(
        "--batched-threads", default="1,2", help="thread counts to time the batched probes at"
    )
    parser.add_argument(
        "--solvers", action="store_true", help="also compare closed form / exact solver / SGD"
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="--solvers: seeds per η (each η × seed is a cell)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="time both ways this many times, one after the other"
    )
    parser.add_argument("--skip-digits", action="store_true", help="--solvers: block model only")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite bench.md from bench.json and the mini study's timings",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    previous = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    if args.render:
        return write_report(out, previous["batched"], previous.get("tables", []))
    seeds = list(range(args.seeds))
    with threadpool_limits(args.threads):
        digits = load_features(DIGITS, args.cache_dir)
        batched, batched_threads = [], [int(n) for n in args.batched_threads.split(",")]
        for _ in range(args.repeats):
            batched.append(bench_batched(digits, args.threads, batched_threads))
            print(json.dumps(batched[-1], indent=1), flush=True)
        results = previous.get("tables", [])
        if args.solvers:
            results = [bench_table(block_feature_set(BLOCK), 1e-4, BLOCK_LR, seeds, 5, closed=True)]
            print(json.dumps(results[-1], indent=1), flush=True)
            if not args.skip_digits:
                results.append(bench_table(digits, DIGITS_LAM, DIGITS_LR, seeds, 5, closed=False))
                print(json.dumps(results[-1], indent=1), flush=True)
    return write_report(out, batched, results)


def write_report(out: Path, batched: list[dict] | dict, tables: list[dict]) -> int:
    """bench.json and bench.md, with the mini study's wall time from its timings.json; ``batched`` is a
    list of ``bench_batched`` runs (a single run, as bench.json stored it before repeats, also reads)."""
    batched = [batched] if isinstance(batched, dict) else list(batched)
    timings = out / "timings.json"
    mini = json.loads(timings.read_text()) if timings.is_file() else None
    atomic_write_json(out / "bench.json", {"batched": batched, "tables": tables, "mini": mini})
    text = report_batched(batched) + "\n" + report(tables, mini)
    atomic_write_text(out / "bench.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
