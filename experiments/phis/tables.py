"""PHI-S paper layer: a method sweep's results.json files → tables (markdown + CSV) and figures.

    python -m experiments.phis.tables aggregate <sweep_dir> <out_dir>   # Tables 1, 3, 12, downstream
    python -m experiments.phis.tables analyses <sweep_dir> <out_dir>    # Tables 5-9, Figs. 1, 2, 3, 9
    python -m experiments.phis.tables dry-run --profile paper [--launcher slurm]
    python -m experiments.phis.tables index <out_dir>

``aggregate`` and ``aggregate_analyses`` are also the ``on_multirun_end`` hooks of
conf/experiment/phis_methods.yaml and phis_analyses.yaml; run by hand they turn whatever finished under
a sweep directory into tables (a partial sweep gives partial tables). Our numbers are means ± sample
standard deviations over seeds; the paper's numbers (experiments/reference/, ViT-B/16, teachers DFN
CLIP / SigLIP / DINOv2 / SAM) are printed in separate, labelled columns beside them, never merged.

The work is split by job: ``runs`` (loading runs and their teacher data), ``table_writers`` (tables),
``figures`` (figures), ``index`` (the results index) and ``dry_run``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.phis.dry_run import PROFILES, dry_run
from experiments.phis.figures import channel_loss_outputs, loss_curve_outputs, teacher_feature_outputs
from experiments.phis.index import write_index
from experiments.phis.runs import METHODS_5, METHODS_10, METHODS_12, by_method, load_runs, teacher_features
from experiments.phis.table_writers import (
    downstream_table,
    error_variance_outputs,
    rank_outputs,
    rankme_outputs,
    teacher_mse_table,
    teacher_stats_outputs,
)


def aggregate(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Tables 1, 3, 12 and the raw downstream table from a method sweep; also refreshes the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(sweep_dir)
    if not runs:
        print(f"[phis_tables] no finished runs under {sweep_dir}; nothing to aggregate")
        return []
    written = []
    g10, g12 = by_method(runs, METHODS_10), by_method(runs, METHODS_12)
    if rank_outputs(g10, "phis_table1_ranks_vitb", out, "table1_ranks", "Table 1: average ranks, 10 methods"):
        written.append(out / "table1_ranks.md")
    if rank_outputs(
        g12, "phis_table12_ranks_vitb", out, "table12_ranks", "Table 12: average ranks, 12 methods"
    ):
        written.append(out / "table12_ranks.md")
    written.append(teacher_mse_table(g12, out))
    down = downstream_table(g12, out)
    if down is not None:
        written.append(down)
    written.append(write_index(out))
    for path in written:
        print(f"[phis_tables] wrote {path}")
    return written


def aggregate_analyses(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Tables 5-9 and Figs. 1, 2, 3, 9 from the Table 5 methods' runs under ``sweep_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(sweep_dir)
    grouped = by_method(runs, METHODS_5)
    if not grouped:
        print(f"[phis_tables] no finished runs of {METHODS_5} under {sweep_dir}; no analyses")
        return []
    written = [
        p
        for p in (error_variance_outputs(grouped, out), rankme_outputs(by_method(runs, METHODS_12), out))
        if p
    ]
    first = {m: min(rs, key=lambda r: r.seed) for m, rs in grouped.items()}  # lowest seed per method
    ref = first.get("phi_s") or next(iter(first.values()))
    feats = teacher_features(ref.dir)  # Table 9 and Figs. 1-2; Tables 7-8 too when no run kept a cache
    written += teacher_stats_outputs(runs, out, feats)
    written += loss_curve_outputs(first, out)
    written += teacher_feature_outputs(ref, out, feats)
    written += channel_loss_outputs(first, out)
    written.append(write_index(out))
    for path in written:
        print(f"[phis_tables] wrote {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PHI-S tables and figures from sweep results (phis_tables).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("aggregate", "analyses"):
        p = sub.add_parser(name)
        p.add_argument("sweep_dir")
        p.add_argument("out_dir")
    dry = sub.add_parser("dry-run", help="compose every job's config of a profile without running it")
    dry.add_argument("--profile", choices=PROFILES, default="paper")
    dry.add_argument("--launcher", choices=("slurm",), default=None)
    dry.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    idx = sub.add_parser("index")
    idx.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.command in ("aggregate", "analyses"):
        if not Path(args.sweep_dir).is_dir():
            parser.error(f"sweep directory {args.sweep_dir} does not exist")
        fn = aggregate if args.command == "aggregate" else aggregate_analyses
        fn(args.sweep_dir, args.out_dir)
        return 0
    if args.command == "dry-run":
        return dry_run(args.profile, args.launcher, args.overrides)
    print(write_index(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
