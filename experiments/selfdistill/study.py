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
    "test_acc_best": "test accuracy (%), best over epochs (chosen on the test set, as the official code)",
    "train_acc_true": "training accuracy w.r.t. the true labels (%)",
}
PLL_ROWS = ("PLL", "PLL-CE")


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


def accuracy_table(results: Sequence[dict], metric: str) -> tuple[list[str], list[list[str]], dict]:
    """Rows (model) × η columns of mean ± std (over seeds, in %) of one metric; also the raw values."""
    etas = sorted({r["eta"] for r in results})
    values: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in results:
        for name, m in _models(r).items():
            values[(name, r["eta"])].append(m[metric])
    names = sorted({name for name, _ in values}, key=_row_key)
    header = ["model"] + [f"η={e:g}" for e in etas]
    rows = [
        [name] + [format_mean_std(values.get((name, e), []), digits=1, scale=100) for e in etas]
        for name in names
    ]
    return header, rows, {"etas": etas, "names": names, "values": values}


def write_accuracy_tables(experiment: str, results: Sequence[dict], out_dir: Path) -> list[Path]:
    """One markdown + CSV table per metric, and the gain-over-teacher bar figure."""
    written: list[Path] = []
    key = results[0].get("table_key", "")
    stem = experiment + (f"_{_slug(key)}" if key else "")
    solvers = sorted({r["solver"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    first = results[0]
    context = (
        f"{first['features']} features (K={first['num_classes']}, N={first['n_train']} train / "
        f"{first['n_test']} test, D={first['dim']}), {first['noise']} noise"
        + (f" ({key})" if key else "")
        + f", λ={first['lam']:g}, solver {'/'.join(solvers)}, seeds {seeds}; mean ± std over seeds"
    )
    recipe_lam = first.get("config", {}).get("sd", {}).get("features", {}).get("paper_lam")
    if recipe_lam is not None and math.isclose(float(recipe_lam), first["lam"]):
        context += " (the official recipe's λ for this dataset)"
    if first.get("teacher_checkpoint", "last") == "best_test":
        context += "; each round taught by its best-test-accuracy epoch (the official protocol)"
    metrics = list(METRICS)
    if solvers == ["exact"]:
        metrics.remove("test_acc_best")  # no epochs: identical to the last-epoch table
    for metric in metrics:
        header, rows, _ = accuracy_table(results, metric)
        title = f"{experiment}: {METRICS[metric]}. {context}"
        if metric == "test_acc_last" and solvers == ["exact"]:
            title += ". Exact solver: best-over-epochs = last"
        # explicit suffix: a stem with a dot (lam_0.0005) would otherwise lose its tail to with_suffix
        written += list(write_table(out_dir / f"{stem}_{metric}.md", header, rows, title=title))
    block = first.get("features_kind") == "block"
    metric = "train_acc_true" if block else "test_acc_last"
    written.append(gain_figure(results, metric, out_dir / f"{stem}_gain.png", f"{experiment}: {context}"))
    return written


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
    """The (η, t) figure and a table of the first round with 100 % training accuracy per η."""
    results = sorted(results, key=lambda r: r["eta"])
    etas = np.array([r["eta"] for r in results])
    names = [n for n in sorted(_models(results[0]), key=_row_key) if n == "Teacher" or n.isdigit()]
    rounds = np.arange(1, len(names) + 1)
    simulated = np.array([[_models(r)[n]["train_acc_true"] == 1.0 for n in names] for r in results])
    theory = results[0].get("theory") or {}
    thresholds = None if theory.get("thresholds") is None else np.array(theory["thresholds"], dtype=float)
    realized = np.array([r["theory"]["all_correct_realized"] for r in results]) if theory else None
    first = results[0]
    title = (
        f"100% training accuracy (true labels) per noise η and round t: {first['features']} "
        f"(K={first['num_classes']}, N={first['n_train']}), λ={first['lam']:g}, "
        f"r={theory.get('r', math.nan):.4f}, exact-proportion noise"
    )
    fig = plots.region(
        etas, rounds, simulated, out_dir / "region.png", _wrap(title, 80), thresholds, realized
    )

    def first_round(flags: Sequence[bool]) -> str:
        hits = [int(t) for t, ok in zip(rounds, flags) if ok]
        return str(hits[0]) if hits else f"> {rounds[-1]}"

    rows = []
    for i, (e, r) in enumerate(zip(etas, results)):
        population = r["theory"].get("rounds_to_full") if theory else None
        by_theory = f"> {rounds[-1]}" if population is None else str(population)
        by_realized = "—" if realized is None else first_round(realized[i])
        rows.append([f"{e:g}", first_round(simulated[i]), by_theory, by_realized])
    header = ["η", "simulation", "theory (population)", "theory (realized labels)"]
    table = write_table(
        out_dir / "region", header, rows, title="First round t with 100 % training accuracy. " + title
    )
    return [fig, *table]


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
    parts.append("| experiment | wall s | return code |\n|---|---|---|")
    parts += [f"| {k} | {v['wall_s']} | {v['returncode']} |" for k, v in timings["experiments"].items()]
    parts.append("")
    for md in sorted(out.glob("*.md")):
        if md.name != "SUMMARY.md":
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
