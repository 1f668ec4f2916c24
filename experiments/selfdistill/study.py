"""SD-PLL paper layer: the tables and figures built from sweep results, and the study driver.

    python -m experiments.selfdistill.study run --profile mini --out experiments/results/selfdistill
    python -m experiments.selfdistill.study run --profile paper [overrides...]   # the six datasets' grids
    python -m experiments.selfdistill.study dry-run --profile paper               # list the jobs, run nothing
    python -m experiments.selfdistill.study aggregate <sweep_dir> <out_dir>

``run`` launches every experiment's sweep (``python -m phis.selfdistill.sweep sd_experiment=<name>
hydra.sweep.dir=<sweeps>/<name>``: the SGD jobs of a table trained as batches of probes, then the Hydra
multirun, which skips them and runs the rest), a few side by side, then aggregates. Before launching
anything it checks that every experiment's features are cached or extractable (the paper datasets'
roots and the ResNet34 weights), failing at once with the variables to set. Sweep directories are
deterministic (``multirun/selfdistill/<profile>`` unless ``--sweeps`` says otherwise),
so a re-run skips finished jobs and retries failed ones. ``aggregate`` turns whatever finished under
a sweep directory into tables (markdown + CSV: rows Teacher, 2..5, PLL × η columns, mean ± std over
seeds, in %) and figures (PNG); it is also the Hydra ``on_multirun_end`` hook of conf/selfdistill.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from phis.results import (
    atomic_write_json,
    atomic_write_text,
    collect_results,
    format_mean_std,
    mean_std,
    write_table,
)
from phis.selfdistill import plots
from phis.selfdistill import theory as sd_theory
from phis.selfdistill.features import TORCHVISION_SETS, check_source
from phis.selfdistill.run import validate
from phis.selfdistill.sweep import sweep_plan

# Experiments in launch order (longest first, so side-by-side lanes finish together).
EXPERIMENTS = (
    "digits_table",
    "crops_table",
    "pll_superclass",
    "block_table",
    "region",
    "eigen_decay",
    "simplex",
)
# The paper's grid on its six datasets (conf/sd_experiment/paper_<dataset>.yaml).
PAPER_EXPERIMENTS = tuple(f"paper_{name}" for name in TORCHVISION_SETS)
PROFILES: dict[str, dict[str, list[str]]] = {
    # tiny versions of the block-model experiments: seconds each, for a quick end-to-end check
    "smoke": {
        "block_table": [
            "sd.features.n=10",
            "sd.features.n_test=5",
            "sd.corruption.eta=0.0,0.5,0.8",
            "seed=0",
        ],
        "pll_superclass": ["sd.features.n=10", "sd.features.n_test=5", "sd.corruption.eta=0.0,0.5", "seed=0"],
        "region": ["sd.features.n=10", "sd/rounds=paper", "sd.corruption.eta=0.0,0.3,0.6"],
        "eigen_decay": ["sd/features=block", "sd/lam=block"],
        "simplex": ["sd.features.n=10"],
    },
    # the study as the experiment files define it: real features with the paper's SGD recipe, block
    # model with the exact solver
    "mini": {name: [] for name in EXPERIMENTS},
    # the paper's full grid: 6 datasets × 3 corruptions × 2 λ × 8 η × 3 seeds, ResNet34 features of
    # local copies of the datasets (roots from PHIS_<DATASET>_ROOT or PHIS_SD_DATA_ROOT)
    "paper": {name: [] for name in PAPER_EXPERIMENTS},
}
METRICS = {
    "test_acc_last": "test accuracy (%), last epoch",
    "test_acc_best_val": "test accuracy (%), epoch best on validation",
    "test_acc_best_test": "test accuracy (%), epoch best on test (official protocol)",
    "train_acc_true": "training accuracy w.r.t. the true labels (%)",
}
# The test accuracy of every model three ways, side by side in one table: which epoch's weights.
SELECTIONS = {
    "test_acc_last": "last",
    "test_acc_best_val": "best on validation",
    "test_acc_best_test": "best on test (official protocol)",
}
PLL_ROWS = ("PLL", "PLL-CE")
NOTES = "README.md"  # hand-written notes beside the generated tables, linked from SUMMARY.md


def _row_key(name: str) -> tuple[int, int]:
    if name == "Teacher":
        return (0, 1)
    if name.isdigit():
        return (0, int(name))
    return (1, PLL_ROWS.index(name) if name in PLL_ROWS else len(PLL_ROWS))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


def _models(res: dict) -> dict[str, dict]:
    return {m["name"]: m for m in res["models"]}


def accuracy_table(
    results: Sequence[dict], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]], dict]:
    """Rows (model, and which epoch when there are several metrics) × η columns of mean ± std (over
    seeds, in %) of each metric; also the raw values."""
    etas = sorted({r["eta"] for r in results})
    values: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for r in results:
        for name, m in _models(r).items():
            for metric in metrics:
                values[(name, metric, r["eta"])].append(m[metric])
    names = sorted({name for name, _, _ in values}, key=_row_key)
    several = len(metrics) > 1
    header = ["model"] + (["epoch"] if several else []) + [f"η={e:g}" for e in etas]
    rows = [
        [name]
        + ([SELECTIONS.get(metric, metric)] if several else [])
        + [format_mean_std(values.get((name, metric, e), []), digits=1, scale=100) for e in etas]
        for name in names
        for metric in metrics
    ]
    return header, rows, {"etas": etas, "names": names, "values": values}


def write_accuracy_tables(experiment: str, results: Sequence[dict], out_dir: Path) -> list[Path]:
    """The test-accuracy table (SGD: last / best-on-validation / best-on-test epoch side by side), the
    training-accuracy table (markdown + CSV), the PLL candidates' table, and the gain-over-teacher bars."""
    written: list[Path] = []
    key = results[0].get("table_key", "")
    stem = experiment + (f"_{_slug(key)}" if key else "")
    solvers = sorted({r["solver"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    first = results[0]
    n_val = first.get("n_val", 0)
    sizes = f"N={first['n_train']} train" + (f" + {n_val} validation" if n_val else "")
    context = (
        f"{first['features']} features (K={first['num_classes']}, {sizes} / {first['n_test']} test, "
        f"D={first['dim']}), {first['noise']} noise"
        + (f" ({key})" if key else "")
        + f", λ={first['lam']:g}, solver {'/'.join(solvers)}, seeds {seeds}; mean ± std over seeds"
    )
    recipe_lam = first.get("config", {}).get("sd", {}).get("features", {}).get("paper_lam")
    if recipe_lam is not None and math.isclose(float(recipe_lam), first["lam"]):
        context += " (the official recipe's λ for this dataset)"
    checkpoint = first.get("teacher_checkpoint", "last")
    if checkpoint == "best_test":
        context += (
            "; each round taught by its best-test-accuracy epoch (the official protocol, chosen on test)"
        )
    elif checkpoint == "best_val":
        context += "; each round taught by its best-validation-accuracy epoch"
    if solvers == ["exact"]:  # no epochs: every selection is the solution
        selections = ["test_acc_last"]
        title = f"{experiment}: {METRICS['test_acc_last']}. {context}. Exact solver: no epochs to select"
    else:
        selections = list(SELECTIONS)
        title = (
            f"{experiment}: test accuracy (%) of each model's last epoch, of its epoch best on the "
            f"validation split ({n_val} training instances held out, scored against their given labels), "
            "and of its epoch best on test (the official code's protocol: selected on the test set, not a "
            f"held-out number). {context}"
        )
    # explicit suffix: a stem with a dot (lam_0.0005) would otherwise lose its tail to with_suffix
    header, rows, _ = accuracy_table(results, selections)
    written += list(write_table(out_dir / f"{stem}_test_acc.md", header, rows, title=title))
    header, rows, _ = accuracy_table(results, ["train_acc_true"])
    title = f"{experiment}: {METRICS['train_acc_true']}. {context}"
    written += list(write_table(out_dir / f"{stem}_train_acc_true.md", header, rows, title=title))
    if any(r.get("pll_top2") for r in results):
        written += pll_top2_table(experiment, results, out_dir / f"{stem}_pll_top2.md", context)
    block = first.get("features_kind") == "block"
    metric = "train_acc_true" if block else "test_acc_last"
    written.append(gain_figure(results, metric, out_dir / f"{stem}_gain.png", f"{experiment}: {context}"))
    return written


def pll_top2_table(experiment: str, results: Sequence[dict], stem: Path, context: str) -> list[Path]:
    """What the PLL student's candidates (its teacher's top-2 on the training set, ``top2_report``) hold,
    where its errors go, and its gain over the teacher, per η."""
    etas = sorted({r["eta"] for r in results})
    pll = [name for name in PLL_ROWS if any(name in _models(r) for r in results)]

    def cell(values: list[float]) -> str:
        return format_mean_std(values, digits=1, scale=100)

    def per_eta(value) -> list[str]:
        return [cell([value(r) for r in results if r["eta"] == e and r.get("pll_top2")]) for e in etas]

    rows = [
        ["teacher's top class is the true class (%)"] + per_eta(lambda r: r["pll_top2"]["top1_true"]),
        ["teacher's runner-up is the true class (%)"] + per_eta(lambda r: r["pll_top2"]["runner_up_true"]),
        ["teacher's probability on its runner-up (mean, %)"]
        + per_eta(lambda r: r["pll_top2"]["runner_up_prob"]),
        ["top-2 mutual (%)"] + per_eta(lambda r: r["pll_top2"]["mutual"]),
    ]
    for name in pll:
        rows.append(
            [f"{name}: training instances predicted as a wrong runner-up (%)"]
            + per_eta(lambda r, name=name: r["pll_top2"][f"{name}_to_runner_up"])
        )
        for metric, what in (("test_acc_last", "test, last epoch"), ("train_acc_true", "train, true labels")):
            rows.append(
                [f"{name} − Teacher, {what} (pp)"]
                + per_eta(
                    lambda r, name=name, metric=metric: (
                        _models(r)[name][metric] - _models(r)["Teacher"][metric]
                    )
                )
            )
    title = (
        f"{experiment}: the PLL student's candidates, its teacher's top class a and runner-up b on each "
        "training instance, each given ½. 'Runner-up is the true class': the instances the target can "
        "correct; where a is the true class the target adds a wrong class at the same weight. 'Mutual': "
        "for an instance with candidates (a, b), the share of the instances whose top class is b that "
        "carry the same pair (at 100 % nothing in the targets tells a from b). 'Predicted as a wrong "
        "runner-up': the PLL student's training errors that go to the wrong class its target added. "
        f"{context}"
    )
    header = ["PLL candidates"] + [f"η={e:g}" for e in etas]
    return list(write_table(stem, header, rows, title=title))


def gain_figure(results: Sequence[dict], metric: str, path: Path, title: str) -> Path:
    """Bars of (model − teacher) in percentage points per η, mean ± std over seeds (paired per seed)."""
    etas = sorted({r["eta"] for r in results})
    names = sorted({n for r in results for n in _models(r) if n != "Teacher"}, key=_row_key)
    gains = {}
    for name in names:
        mean, std = [], []
        for e in etas:
            diffs = [
                100 * (_models(r)[name][metric] - _models(r)["Teacher"][metric])
                for r in results
                if r["eta"] == e and name in _models(r)
            ]
            m, s = mean_std(diffs)
            mean.append(m)
            std.append(s)
        gains[name] = (np.array(mean), np.array(std))
    label = "gain in " + ("training accuracy, true labels" if metric == "train_acc_true" else "test accuracy")
    return plots.gain_bars(etas, gains, path, _wrap(title), f"{label} (pp)")


def _wrap(text: str, width: int = 100) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def region_outputs(results: Sequence[dict], out_dir: Path) -> list[Path]:
    """The (η, t) figure, a table of the first round with 100 % training accuracy per η (simulation,
    exact softmax dynamics, linearized theory) and a table of both theories' thresholds η_t."""
    results = sorted(results, key=lambda r: r["eta"])
    etas = np.array([r["eta"] for r in results])
    names = [n for n in sorted(_models(results[0]), key=_row_key) if n == "Teacher" or n.isdigit()]
    rounds = np.arange(1, len(names) + 1)
    simulated = np.array([[_models(r)[n]["train_acc_true"] == 1.0 for n in names] for r in results])
    theory = results[0].get("theory") or {}
    thresholds = None if theory.get("thresholds") is None else np.array(theory["thresholds"], dtype=float)
    realized = np.array([r["theory"]["all_correct_realized"] for r in results]) if theory else None
    exact = _exact_region(results, len(rounds)) if theory else None
    first = results[0]
    title = (
        f"100% training accuracy (true labels) per noise η and round t: {first['features']} "
        f"(K={first['num_classes']}, N={first['n_train']}), λ={first['lam']:g}, "
        f"r={theory.get('r', math.nan):.4f}, exact-proportion noise"
    )
    fig = plots.region(
        etas,
        rounds,
        simulated,
        out_dir / "region.png",
        _wrap(title, 80),
        thresholds,
        realized,
        None if exact is None else exact["thresholds"],
    )

    def first_round(flags: Sequence[bool]) -> str:
        hits = [int(t) for t, ok in zip(rounds, flags) if ok]
        return str(hits[0]) if hits else f"> {rounds[-1]}"

    def rounds_text(t: int | None) -> str:
        return f"> {rounds[-1]}" if t is None else str(t)

    rows = []
    for i, (e, r) in enumerate(zip(etas, results)):
        row = [f"{e:g}", first_round(simulated[i])]
        if exact is not None:
            row += [first_round(exact["realized"][i]), rounds_text(exact["population"][i])]
        row += [rounds_text(r["theory"].get("rounds_to_full")) if theory else "—"]
        row += ["—" if realized is None else first_round(realized[i])]
        rows.append(row)
    header = ["η", "simulation"]
    if exact is not None:
        header += ["exact dynamics (realized labels)", "exact dynamics (population)"]
    header += ["linearized theory (population)", "linearized theory (realized labels)"]
    verdict = "" if exact is None else " " + _region_verdict(rows)
    written = [fig]
    written += write_table(
        out_dir / "region",
        header,
        rows,
        title="First round t with 100 % training accuracy. " + title + "." + verdict,
    )
    if exact is not None and thresholds is not None:
        rows = [[t, f"{lin:.4f}", f"{ex:.4f}"] for t, lin, ex in zip(rounds, thresholds, exact["thresholds"])]
        written += write_table(
            out_dir / "region_thresholds",
            ["round t", "η_t linearized (SPEC §3 closed form)", "η_t exact (softmax stationary points)"],
            rows,
            title=(
                "Largest noise rate at which round t predicts every training instance right, at the "
                "population level (labels in exact proportions), for the linearized dynamics (softmax(z) ≈ "
                "1/K + z/K) and the exact ones (each round's softmax stationary point, "
                "theory.block_exact_outputs; bisection to 1e-4). " + title + "." + verdict
            ),
        )
    return written


def _exact_region(results: Sequence[dict], rounds: int) -> dict[str, list]:
    """The exact (softmax) dynamics on the region's block model: per job, whether each round gets every
    instance right for its realized label fractions, and the population's first round; and η_t."""
    sd = results[0]["config"]["sd"]
    f, lam, noise = sd["features"], float(sd["lam"]), sd["corruption"]["kind"]
    K, n, c, d = int(f["K"]), int(f["n"]), float(f["c"]), float(f["d"])
    realized, population = [], []
    for r in results:
        outputs = sd_theory.block_exact_outputs(np.array(r["C_realized"]), n, c, d, lam, rounds)
        realized.append([sd_theory.all_right(outputs[t]) for t in range(rounds)])
        population.append(
            sd_theory.exact_rounds_to_full_accuracy(K, n, c, d, lam, r["eta"], noise, max_rounds=rounds)
        )
    thresholds = [sd_theory.exact_threshold(K, n, c, d, lam, t, noise) for t in range(1, rounds + 1)]
    return {"realized": np.array(realized), "population": population, "thresholds": np.array(thresholds)}


def _region_verdict(rows: Sequence[Sequence[str]]) -> str:
    """Which dynamics the simulation follows, from the region table's rows (η, simulation, exact
    realized, exact population, linearized population, linearized realized)."""
    same_exact = sum(row[1] == row[2] for row in rows)
    same_linear = sum(row[1] == row[5] for row in rows)
    lags = [int(row[1]) - int(row[5]) for row in rows if row[1].isdigit() and row[5].isdigit()]
    lags = [lag for lag in lags if lag]
    text = (
        "The simulation (the exact solver on the block features) follows the exact softmax dynamics: its "
        f"first round equals theirs for the realized labels at {same_exact} of {len(rows)} noise rates, "
        f"the linearized theory's at {same_linear} of {len(rows)}"
    )
    if lags and min(lags) > 0:
        text += f", which predicts {min(lags)}–{max(lags)} rounds too early where they differ"
    elif lags:
        text += f"; where they differ, the simulation's round minus its is {min(lags)} to {max(lags)}"
    return text + "."


def simplex_outputs(results: Sequence[dict], out_dir: Path) -> list[Path]:
    """Ternary plot of the K = 3 outputs for every model of the first job."""
    res = results[0]
    with np.load(Path(res["_dir"]) / "outputs.npz") as z:
        y_true, y_given = z["y_true"], z["y_given"]
        outputs = {n: z[n] for n in sorted((k for k in z.files if not k.startswith("y_")), key=_row_key)}
    title = (
        f"Training softmax outputs on the simplex: {res['features']} (K=3, N={res['n_train']}), "
        f"{res['noise']} noise η={res['eta']:g} (realized {res['noise_realized']:.2f}), λ={res['lam']:g}. "
        "Colour: true class; ×: corrupted label; instances of one (true, given) label pair coincide"
    )
    return [plots.simplex(outputs, y_true, y_given, out_dir / "simplex.png", _wrap(title, 140))]


def spectrum_outputs(results: Sequence[dict], out_dir: Path) -> list[Path]:
    """σ_i^t panels, one per (features, λ)."""
    results = sorted(results, key=lambda r: (r["features"], r["lam"]))
    panels = [
        (f"{r['features']}: K={r['num_classes']}, N={r['n_train']}, λ={r['lam']:g}", np.array(r["sigma_t"]))
        for r in results
    ]
    title = r"Eigenvalue decay: round $t$ keeps the label component along eigenvector $v_i$ by $\sigma_i^t$"
    return [plots.eigen_decay(panels, out_dir / "eigen_decay.png", title)]


def aggregate(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Tables and figures of every finished job under ``sweep_dir``, written to ``out_dir``."""
    out_dir = Path(out_dir)
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for res in collect_results(sweep_dir):
        groups[(res["report"], res["experiment"], res.get("table_key", ""))].append(res)
    written: list[Path] = []
    for (report, experiment, _), results in sorted(groups.items()):
        if report == "table":
            written += write_accuracy_tables(experiment, results, out_dir)
        elif report == "region":
            written += region_outputs(results, out_dir)
        elif report == "simplex":
            written += simplex_outputs(results, out_dir)
        elif report == "spectrum":
            written += spectrum_outputs(results, out_dir)
    return written


def _arguments(profile: str, name: str, sweeps: Path, overrides: Sequence[str]) -> list[str]:
    """The ``phis.selfdistill.sweep`` arguments of one experiment of a profile."""
    return [f"sd_experiment={name}", f"hydra.sweep.dir={sweeps / name}", *PROFILES[profile][name], *overrides]


def _profile_experiments(profile: str) -> list[str]:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    return [name for name in (*EXPERIMENTS, *PAPER_EXPERIMENTS) if name in PROFILES[profile]]


def check_data(profile: str, sweeps: Path, overrides: Sequence[str] = ()) -> list[str]:
    """One line per experiment whose features are neither cached nor extractable (empty: all ready)."""
    problems = []
    for name in _profile_experiments(profile):
        base, _ = sweep_plan(_arguments(profile, name, sweeps, overrides))
        try:
            check_source(base["sd"]["features"], base["cache_dir"])
        except FileNotFoundError as err:
            problems.append(f"{name}: {err}")
    return problems


def dry_run(profile: str, sweeps: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> int:
    """List every job of the profile's sweeps (composing one config per experiment, validated) and
    whether each experiment's data is ready; runs nothing. 0 when every experiment composes."""
    sweeps = Path(sweeps) if sweeps else Path("multirun") / "selfdistill" / profile
    total = 0
    for name in _profile_experiments(profile):
        base, jobs = sweep_plan(_arguments(profile, name, sweeps, overrides))
        validate(base)
        try:
            check_source(base["sd"]["features"], base["cache_dir"])
            data = "features cached or extractable"
        except FileNotFoundError as err:
            data = f"NOT READY: {err}"
        print(f"[sd] {name}: {len(jobs)} jobs -> {sweeps / name}; {data}")
        for job in jobs:
            print("    " + " ".join(o for o in job if not o.startswith("sd_experiment=")))
        total += len(jobs)
    print(f"[sd] dry run: {total} jobs in profile {profile!r}; nothing ran")
    return 0


def run_study(
    profile: str,
    out: str | os.PathLike,
    sweeps: str | os.PathLike | None = None,
    lanes: int = 2,
    overrides: Sequence[str] = (),
) -> int:
    """Launch the profile's multiruns (``lanes`` at a time, ``overrides`` added to each), aggregate,
    write SUMMARY.md; 0 if all ran. Missing data fails before anything runs."""
    queue = _profile_experiments(profile)
    out = Path(out)
    sweeps = Path(sweeps) if sweeps else Path("multirun") / "selfdistill" / profile
    problems = check_data(profile, sweeps, overrides)
    if problems:
        raise FileNotFoundError("features cannot be read or extracted:\n" + "\n".join(problems))
    sweeps.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    status: dict[str, dict] = {}
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < lanes:
            name = queue.pop(0)
            cmd = [sys.executable, "-m", "phis.selfdistill.sweep"]
            cmd += [*_arguments(profile, name, sweeps, overrides), f"tables_dir={out}"]
            log = open(sweeps / f"{name}.log", "w")  # closed when the process ends
            print(f"[sd] start {name}: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            running[name] = (proc, time.perf_counter(), log)
        time.sleep(0.5)
        for name, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                status[name] = {
                    "returncode": proc.returncode,
                    "wall_s": round(time.perf_counter() - start, 1),
                }
                print(f"[sd] done  {name}: rc={proc.returncode} in {status[name]['wall_s']} s", flush=True)
                del running[name]
    written = aggregate(sweeps, out)
    total = round(time.perf_counter() - t0, 1)
    timings = {"profile": profile, "lanes": lanes, "total_wall_s": total, "experiments": status}
    atomic_write_json(out / "timings.json", timings)
    write_summary(out, timings)
    print(f"[sd] {len(written)} tables/figures in {out}; total {total} s", flush=True)
    return 0 if all(s["returncode"] == 0 for s in status.values()) else 1


def write_summary(out: Path, timings: dict) -> Path:
    """SUMMARY.md: wall times, then every markdown table in out, figures listed."""
    parts = [f"# SD-PLL study ({timings['profile']} profile)\n"]
    parts.append(
        f"Total wall time {timings['total_wall_s']} s with {timings['lanes']} sweeps side by side.\n"
    )
    if (out / NOTES).is_file():
        parts.append(f"What the tables report and what changed in them: {NOTES}.\n")
    parts.append("| experiment | wall s | return code |\n|---|---|---|")
    parts += [f"| {k} | {v['wall_s']} | {v['returncode']} |" for k, v in timings["experiments"].items()]
    parts.append("")
    for md in sorted(out.glob("*.md")):
        if md.name not in ("SUMMARY.md", NOTES):
            parts.append(md.read_text())
    parts.append("Figures: " + ", ".join(sorted(p.name for p in out.glob("*.png"))) + "\n")
    return atomic_write_text(out / "SUMMARY.md", "\n".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.selfdistill.study", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="launch every SD-PLL experiment's sweep, then aggregate")
    dry = sub.add_parser("dry-run", help="list every job of a profile and whether its data is ready")
    for cmd in (run, dry):
        cmd.add_argument("--profile", choices=sorted(PROFILES), default="mini")
        cmd.add_argument("--sweeps", default=None, help="sweep root (default multirun/selfdistill/<profile>)")
        cmd.add_argument("overrides", nargs="*", help="Hydra overrides added to every experiment's sweep")
    run.add_argument("--out", default="experiments/results/selfdistill", help="tables and figures")
    run.add_argument("--lanes", type=int, default=2, help="sweeps run side by side (one core each)")
    agg = sub.add_parser("aggregate", help="tables/figures from the finished jobs of a (partial) sweep")
    agg.add_argument("sweep_dir")
    agg.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.command == "dry-run":
        return dry_run(args.profile, args.sweeps, args.overrides)
    if args.command == "run":
        try:
            return run_study(args.profile, args.out, args.sweeps, args.lanes, args.overrides)
        except FileNotFoundError as err:
            print(f"[sd] {err}", file=sys.stderr)
            return 2
    written = aggregate(args.sweep_dir, args.out_dir)
    print(json.dumps([str(p) for p in written], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
