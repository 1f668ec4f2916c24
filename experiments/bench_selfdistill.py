"""Benchmark: the closed form and the exact solver against the paper's 200-epoch SGD recipe, on the same
tables (block model: all three; EfficientNet digits features: exact vs SGD), in one run, one thread.

    python -m experiments.bench_selfdistill --out experiments/results/selfdistill

Reports per table: seconds per method, the time ratio, the mean |Δ accuracy| between methods and how
often they predict the same training label; and the mini study's wall time (from its timings.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from phis.results import atomic_write_json, atomic_write_text, markdown_table
from phis.selfdistill import theory
from phis.selfdistill.corruption import corrupt_labels, corruption_matrix
from phis.selfdistill.features import FeatureSet, block_feature_set, load_features
from phis.selfdistill.probe import SGDRecipe, fit_probe, one_hot, softmax

ETAS = (0.0, 0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
BLOCK = {"kind": "block", "name": "block", "K": 10, "n": 50, "c": 0.4, "d": 0.1, "n_test": 20}
# SGD learning rates: the digits table's; for the unit-norm block features the rate is scaled up by
# about the squared feature norm of real features (~250), else 200 epochs stop far from the optimum.
BLOCK_LR, DIGITS_LR = 20.0, 0.05
DIGITS = {"kind": "efficientnet", "name": "digits", "dataset": "digits", "variant": 0, "size": 224}


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


def report(results: list[dict], mini: dict | None) -> str:
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
    parser.add_argument("--seeds", type=int, default=1, help="seeds per η (each η × seed is one table cell)")
    parser.add_argument("--skip-digits", action="store_true", help="block model only (no feature extraction)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    results = []
    with threadpool_limits(1):
        results.append(bench_table(block_feature_set(BLOCK), 1e-4, BLOCK_LR, seeds, 5, closed=True))
        print(json.dumps(results[-1], indent=1), flush=True)
        if not args.skip_digits:
            digits = load_features(DIGITS, args.cache_dir)
            results.append(bench_table(digits, 5e-4, DIGITS_LR, seeds, 5, closed=False))
            print(json.dumps(results[-1], indent=1), flush=True)
    out = Path(args.out)
    timings = out / "timings.json"
    mini = json.loads(timings.read_text()) if timings.is_file() else None
    atomic_write_json(out / "bench.json", {"tables": results, "mini": mini})
    text = report(results, mini)
    atomic_write_text(out / "bench.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
