"""PHI-S paper layer: a method sweep's results.json files → tables (markdown + CSV) and figures.

    python -m experiments.phis_tables aggregate <sweep_dir> <out_dir>   # Tables 1, 3, 12, downstream
    python -m experiments.phis_tables analyses <sweep_dir> <out_dir>    # Tables 5-9, Figs. 1, 2, 3, 9
    python -m experiments.phis_tables dry-run --profile paper [--launcher slurm]
    python -m experiments.phis_tables index <out_dir>

``aggregate`` and ``aggregate_analyses`` are also the ``on_multirun_end`` hooks of
conf/experiment/phis_methods.yaml and phis_analyses.yaml; run by hand they turn whatever finished under
a sweep directory into tables (a partial sweep gives partial tables). Our numbers are means ± sample
standard deviations over seeds; the paper's numbers (experiments/reference/, ViT-B/16, teachers DFN
CLIP / SigLIP / DINOv2 / SAM) are printed in separate, labelled columns beside them, never merged.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phis.ranks import RankTable, metric_group, rank_table
from phis.results import (
    atomic_write_json,
    atomic_write_text,
    collect_results,
    mean_std,
    read_json,
    run_metrics,
    write_table,
)
from phis.stats import TABLE7_KEYS

REFERENCE = Path(__file__).resolve().parent / "reference"
CONF = Path(__file__).resolve().parents[1] / "conf"

# Rows of PHI-S Tables 1/3 (ten methods) and Table 12 (plus the two AdaLoss rows), paper order.
METHODS_10 = (
    "mse",
    "cosine",
    "hyb_mse",
    "hyb_smooth_l1",
    "global_standardize",
    "standardize",
    "phi_s",
    "pca_whiten",
    "zca_whiten",
    "hadamard_whiten",
)
METHODS_12 = (*METHODS_10, "ada_mse", "ada_phi_s")
# Rows of Table 5 (the normalizations trained with MSE).
METHODS_5 = tuple(m for m in METHODS_10 if m not in ("cosine", "hyb_mse", "hyb_smooth_l1"))
LABELS = {
    "mse": "MSE",
    "cosine": "Cosine",
    "hyb_mse": "Hyb MSE",
    "hyb_smooth_l1": "Hyb SmL1",
    "global_standardize": "Global Stdze",
    "standardize": "Standardize",
    "phi_s": "PHI-S",
    "pca_whiten": "PCA-W",
    "zca_whiten": "ZCA",
    "hadamard_whiten": "HCA",
    "ada_mse": "Ada-MSE",
    "ada_phi_s": "Ada-PHI-S",
}
EXPERIMENTS = ("phis_methods", "phis_analyses")
PROFILES = ("smoke", "mini", "paper")
MAX_TOKENS = 20000  # teacher tokens per teacher for the eigen-analyses (subsampled evenly)
SAMPLE_IMAGES = 1024  # without a teacher cache: the training images the teacher-feature sample is drawn from
MISSING_FILE = "missing.json"  # why a table or figure of the index was not made


# ----------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Run:
    """One finished job: its method (the ``method`` group choice), seed, directory and flat metrics."""

    method: str
    seed: int
    dir: Path
    metrics: dict[str, float]
    results: dict[str, Any]


def tmse_split(grouped: Mapping[str, Sequence[Run]]) -> str:
    """Which held-out split the runs' ``tmse/*`` metrics were measured on (as phis.eval recorded it)."""
    splits = {
        ((r.results.get("eval") or {}).get("details") or {}).get("tmse", {}).get("heldout", "test")
        for rs in grouped.values()
        for r in rs
    }
    return ", ".join(sorted(splits))


def _seed(res: Mapping[str, Any], run_dir: Path) -> int:
    if "seed" in res:
        return int(res["seed"])
    config = run_dir / "config_resolved.yaml"
    if config.is_file():
        for line in config.read_text().splitlines():
            if line.startswith("seed:"):
                return int(line.split(":", 1)[1])
    return 0


def load_runs(sweep_dir: str | os.PathLike) -> list[Run]:
    """Every finished job under ``sweep_dir`` (recursively); the method is the run's ``method`` choice."""
    runs = []
    for res in collect_results(sweep_dir):
        method = (res.get("choices") or {}).get("method")
        if method is None:
            raise ValueError(
                f"{res['_dir']}/results.json has no 'choices.method'; was it written by phis.train?"
            )
        run_dir = Path(res["_dir"])
        runs.append(Run(method, _seed(res, run_dir), run_dir, run_metrics(res), res))
    return runs


def by_method(runs: Sequence[Run], methods: Sequence[str]) -> dict[str, list[Run]]:
    """Runs grouped per method, in ``methods`` order, keeping only methods that have runs."""
    grouped = {m: [r for r in runs if r.method == m] for m in methods}
    return {m: rs for m, rs in grouped.items() if rs}


def paper_rows(name: str) -> dict[str, dict[str, str]]:
    """A reference CSV (``experiments/reference/<name>.csv``) as first-column key → column → cell."""
    with open(REFERENCE / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    key = next(iter(rows[0]))
    return {r[key]: {k: v for k, v in r.items() if k != key} for r in rows}


# ----------------------------------------------------------------------------------------------------
# Formatting


def fmt(values: Sequence[float], digits: int = 4) -> str:
    """``'m ± s'`` with ``digits`` significant digits (``'m'`` for one value, ``'—'`` for none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "—"
    m, s = mean_std(vals)
    return f"{m:.{digits}g}" if len(vals) == 1 else f"{m:.{digits}g} ± {s:.2g}"


def _write(
    out: Path, stem: str, header: Sequence[str], rows: Sequence[Sequence[Any]], title: str, notes: str
) -> Path:
    """``<stem>.md`` (title, table, notes) and ``<stem>.csv``; returns the markdown path."""
    md, _ = write_table(out / stem, header, rows, title=title)
    if notes:
        atomic_write_text(md, md.read_text() + "\n" + notes.strip() + "\n")
    return md


def _seeds_note(grouped: Mapping[str, Sequence[Run]]) -> str:
    seeds = sorted({r.seed for rs in grouped.values() for r in rs})
    counts = {len(rs) for rs in grouped.values()}
    per = f"{min(counts)}" if len(counts) == 1 else f"{min(counts)}-{max(counts)}"
    return f"Ours: mean ± sample std over seeds {seeds} ({per} run(s) per method)."


# ----------------------------------------------------------------------------------------------------
# Rank tables (Tables 1 and 12)


def mean_scores(grouped: Mapping[str, Sequence[Run]]) -> dict[str, dict[str, float]]:
    """Per method, each metric averaged over its seeds (the rank tables rank these means)."""
    out = {}
    for method, rs in grouped.items():
        names = dict.fromkeys(k for r in rs for k in r.metrics)
        out[method] = {k: mean_std([r.metrics[k] for r in rs if k in r.metrics])[0] for k in names}
    return out


def seed_rank_tables(grouped: Mapping[str, Sequence[Run]]) -> dict[int, RankTable]:
    """One rank table per seed that every method has (to show how stable the ranks are)."""
    seeds = set.intersection(*({r.seed for r in rs} for rs in grouped.values()))
    tables = {}
    for seed in sorted(seeds):
        scores = {m: next(r.metrics for r in rs if r.seed == seed) for m, rs in grouped.items()}
        tables[seed] = rank_table(scores)
    return tables


def ordinal(values: Mapping[str, float]) -> dict[str, int]:
    """Competition ranks of average ranks (1 = lowest average rank)."""
    return {m: 1 + sum(o < v for o in values.values()) for m, v in values.items()}


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman correlation of two scorings of the same methods (Pearson of their average-tie ranks)."""
    keys = [k for k in a if k in b]

    def ranks(d: Mapping[str, float]) -> list[float]:
        vals = [d[k] for k in keys]
        return [sum(o < v for o in vals) + (sum(o == v for o in vals) + 1) / 2 for v in vals]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else math.nan


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def rank_outputs(
    grouped: Mapping[str, Sequence[Run]], paper: str, out: Path, stem: str, title: str
) -> RankTable | None:
    """A rank table over ``grouped``'s methods with the paper's ranks (``paper`` CSV) beside it."""
    if len(grouped) < 2:
        return None
    table = rank_table(mean_scores(grouped))
    per_seed = seed_rank_tables(grouped)
    ref = paper_rows(paper)
    ref_cols = list(next(iter(ref.values())))
    ours_avg = table.summaries["Avg"]
    paper_avg = {m: float(ref[m]["Avg"]) for m in grouped if m in ref}
    ours_pos, paper_pos = ordinal(ours_avg), ordinal(paper_avg)
    header = (
        ["method"]
        + [f"ours {c}" for c in table.columns]
        + ["ours Avg per seed", "ours place", "paper place"]
        + [f"paper {c}" for c in ref_cols]
    )
    rows = []
    for m in grouped:
        per = [t.summaries["Avg"][m] for t in per_seed.values()]
        rows.append(
            [LABELS.get(m, m)]
            + [f"{table.value(m, c):.2f}" for c in table.columns]
            + [fmt(per, 3), ours_pos[m], paper_pos.get(m, "—")]
            + [ref.get(m, {}).get(c, "—") for c in ref_cols]
        )
    rho = spearman(ours_avg, paper_avg)
    per_group = [
        f"{c} {spearman({m: table.value(m, c) for m in grouped}, paper_c):.2f}"
        for c in table.columns
        if (paper_c := {m: float(ref[m][c]) for m in grouped if m in ref and _is_number(ref[m].get(c))})
    ]
    notes = "\n".join(
        [
            "Ranks: 1 = best per metric (ties share the minimum rank), averaged within a group, then over"
            " groups (PHI-S Tables 1/12; phis/ranks.py). Ours rank the per-method means over seeds;"
            " 'ours Avg per seed' ranks each seed's runs separately (mean ± std).",
            f"'place' orders methods by Avg. Spearman correlation of our Avg with the paper's: {rho:.2f}"
            f" (per column: {', '.join(per_group)}).",
            _seeds_note(grouped),
            "Our teachers and benchmarks differ from the paper's (see README.md), so the columns are not the"
            " same measurements; groups and metrics used here:",
            "",
            *[
                f"- {line}"
                for line in table.describe().splitlines()
                if "not part of any rank group" not in line
            ],
        ]
    )
    _write(out, stem, header, rows, title, notes)
    return table


# ----------------------------------------------------------------------------------------------------
# Table 3 and the raw downstream table


def teacher_names(grouped: Mapping[str, Sequence[Run]]) -> list[str]:
    return list(
        dict.fromkeys(
            k.split("/", 1)[1]
            for rs in grouped.values()
            for r in rs
            for k in r.metrics
            if k.startswith("tmse/")
        )
    )


def teacher_mse_table(grouped: Mapping[str, Sequence[Run]], out: Path) -> Path:
    """Table 3: held-out teacher-space MSE per teacher (ours) beside the paper's (different teachers)."""
    teachers = teacher_names(grouped)
    ref = paper_rows("phis_table3_teacher_mse_vitb")
    ref_cols = list(next(iter(ref.values())))
    split = tmse_split(grouped)
    # The other held-out split's explained fraction too (training's numbers), when the runs have it.
    other = "test" if split == "val" else "val"
    has_other = any(
        f"explained_{other}/{t}" in r.metrics for rs in grouped.values() for r in rs for t in teachers
    )
    header = ["method"] + [f"ours {t}" for t in teachers] + [f"ours explained {t}" for t in teachers]
    header += [f"ours explained ({other}) {t}" for t in teachers] if has_other else []
    header += [f"paper {c}" for c in ref_cols]
    rows = []
    for m, rs in grouped.items():
        row = [LABELS.get(m, m)]
        row += [fmt([r.metrics.get(f"tmse/{t}", math.nan) for r in rs]) for t in teachers]
        row += [fmt([r.metrics.get(f"tmse_explained/{t}", math.nan) for r in rs], 3) for t in teachers]
        if has_other:
            row += [fmt([r.metrics.get(f"explained_{other}/{t}", math.nan) for r in rs], 3) for t in teachers]
        rows.append(row + [ref.get(m, {}).get(c, "—") for c in ref_cols])
    notes = (
        f"Teacher-space MSE of the denormalized student prediction on the held-out '{split}' split (lower is"
        " better; val: unseen regions of the training photos, test: unseen photos) and the explained fraction"
        " 1 − MSE / (tr Σ / C). Our teachers are "
        f"{', '.join(teachers)}; the paper's are DFN CLIP (×1e-4), SigLIP, DINOv2, SAM: side by side, not"
        " comparable cell by cell.\n" + _seeds_note(grouped)
    )
    return _write(out, "table3_teacher_mse", header, rows, "Table 3: teacher-space MSE", notes)


DOWNSTREAM_PAPER = ("zero_shot", "knn", "ade20k", "voc")


def downstream_table(grouped: Mapping[str, Sequence[Run]], out: Path) -> Path | None:
    """Raw downstream scores (kNN, zero-shot, segmentation mIoU, RankMe, summary cosine) beside Table 13."""
    metrics = list(
        dict.fromkeys(
            k
            for rs in grouped.values()
            for r in rs
            for k in r.metrics
            if metric_group(k) in ("Cls", "Seg", "COCO", "LLaVA", "P3D")
            or k.startswith(("rankme/", "summary_cos/", "teacher_zero_shot/"))
        )
    )
    if not metrics:
        return None
    ref = paper_rows("phis_table13_raw_vitb")
    header = ["method"] + [f"ours {k}" for k in metrics] + [f"paper {c}" for c in DOWNSTREAM_PAPER]
    rows = [
        [LABELS.get(m, m)]
        + [fmt([r.metrics.get(k, math.nan) for r in rs], 3) for k in metrics]
        + [ref.get(m, {}).get(c, "—") for c in DOWNSTREAM_PAPER]
        for m, rs in grouped.items()
    ]
    notes = (
        "Ours: fractions in [0, 1] (kNN, zero-shot, zero-shot agreement with the teacher's own head, mIoU) on"
        " the offline labelled sets of phis/evaldata.py; RankMe of trunk patch features; summary_cos: cosine"
        " of the student's summary head with the teacher's summary. teacher_zero_shot is the teacher itself."
        " Paper (Table 13, %): ImageNet zero-shot / kNN, ADE20k / VOC mIoU.\n" + _seeds_note(grouped)
    )
    return _write(out, "downstream_raw", header, rows, "Raw downstream scores", notes)


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


# ----------------------------------------------------------------------------------------------------
# Analyses (Tables 5-9, Figs. 1, 2, 3, 9)


def error_variance_outputs(grouped: Mapping[str, Sequence[Run]], out: Path) -> Path | None:
    """Table 5 from the runs' ``err_var_range[_norm]/<teacher>`` metrics, beside the paper's."""
    teachers = teacher_names(grouped)
    if not any(f"err_var_range/{t}" in r.metrics for rs in grouped.values() for r in rs for t in teachers):
        note_missing(out, "table5_error_variance", "no run has err_var_range metrics (eval.teacher_mse off)")
        return None
    with open(REFERENCE / "phis_table5_error_variance_range.csv") as f:
        ref_rows = {(r["method"], r["space"]): r for r in csv.DictReader(f)}
    ref_cols = ["dfn_clip", "siglip", "dinov2", "sam"]
    header = ["method", "space"] + [f"ours {t}" for t in teachers] + [f"paper {c}" for c in ref_cols]
    rows = []
    for m, rs in grouped.items():
        for space, key in (("normalized", "err_var_range_norm"), ("denormalized", "err_var_range")):
            paper = ref_rows.get((m, space), {})
            rows.append(
                [LABELS.get(m, m), space]
                + [fmt([r.metrics.get(f"{key}/{t}", math.nan) for r in rs]) for t in teachers]
                + [paper.get(c, "—") for c in ref_cols]
            )
    notes = (
        "max − min over channels of the variance of the student's error on held-out images, in the"
        " normalized space the loss saw and in teacher space (PHI-S Table 5). Small in normalized space"
        " means the loss spreads its error evenly over channels.\n" + _seeds_note(grouped)
    )
    return _write(out, "table5_error_variance", header, rows, "Table 5: error variance range", notes)


def rankme_outputs(grouped: Mapping[str, Sequence[Run]], out: Path) -> Path | None:
    """Table 6: RankMe of the student's spatial features per method (no paper CSV available)."""
    keys = list(
        dict.fromkeys(k for rs in grouped.values() for r in rs for k in r.metrics if k.startswith("rankme/"))
    )
    if not keys:
        note_missing(out, "table6_rankme", "no run has rankme metrics (no eval.knn_sets)")
        return None
    rows = [
        [LABELS.get(m, m)] + [fmt([r.metrics.get(k, math.nan) for r in rs]) for k in keys]
        for m, rs in grouped.items()
    ]
    notes = "RankMe (effective rank) of trunk patch features on each labelled set's test images.\n"
    return _write(
        out,
        "table6_rankme",
        ["method", *[f"ours {k}" for k in keys]],
        rows,
        "Table 6: RankMe",
        notes + _seeds_note(grouped),
    )


def teacher_stats_outputs(
    runs: Sequence[Run], out: Path, sampled: Callable[[], Mapping[str, Any]] | None = None
) -> list[Path]:
    """Tables 7 and 8 from a run's ``teacher_stats`` (the training-set cache moments), paper rows beside;
    without a cache, from ``sampled()``: teacher tokens of a capped training sample (``teacher_features``)."""
    stats = next((r.results["teacher_stats"] for r in runs if r.results.get("teacher_stats")), None)
    source = "Over all training-set feature tokens (float64 moments of the teacher cache)."
    if not stats and sampled is not None:
        from phis.stats import activation_stats, token_moments

        feats = sampled()
        stats = {n: activation_stats(token_moments(y)) for n, y in feats.items()}
        count = sum(int(s["tokens"]) for s in stats.values()) // max(len(stats), 1)
        source = (
            f"The runs kept no teacher cache: over about {count:,} feature tokens per teacher, evenly"
            " spaced over a capped sample of the training images (float64 moments)."
        )
    if not stats:
        note_missing(out, "table7_teacher_stats", "no run recorded teacher statistics")
        note_missing(out, "table8_alpha", "no run recorded teacher statistics")
        return []
    cols7 = list(TABLE7_KEYS)
    ref7 = paper_rows("phis_table7_teacher_stats")
    rows = [[f"ours: {t}"] + [f"{s[c]:.4g}" for c in cols7] for t, s in stats.items()]
    rows += [[f"paper: {t}"] + [r[c] for c in cols7] for t, r in ref7.items()]
    p7 = _write(
        out,
        "table7_teacher_stats",
        ["teacher", *cols7],
        rows,
        "Table 7: teacher activation statistics",
        source + " Paper rows: PHI-S Table 7.",
    )
    ref8 = paper_rows("phis_table8_alpha")
    rows = [[f"ours: {t}", f"{s['alpha_gs']:.4g}", f"{s['alpha_phis']:.4g}"] for t, s in stats.items()]
    rows += [[f"paper: {t}", r["alpha_global_standardize"], r["alpha_phi_s"]] for t, r in ref8.items()]
    p8 = _write(
        out,
        "table8_alpha",
        ["teacher", "alpha_global_standardize", "alpha_phi_s"],
        rows,
        "Table 8: α of global standardization (1/σ_g) vs PHI-S",
        "α_gs ≤ α_phis always (σ_g² = mean λ + Var_c(μ_c)). Paper rows: PHI-S Table 8.",
    )
    return [p7, p8]


def _train_config(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config_resolved.yaml")


def teacher_features(run_dir: Path) -> dict[str, Any]:
    """Training-set teacher feature tokens ``[N, C]`` (float32, ≤ MAX_TOKENS, evenly spaced) per teacher.

    From the run's teacher cache (rebuilt if missing); a run without one (``cache.enabled=false``) runs
    its teachers on evenly spaced images among the first ``SAMPLE_IMAGES`` training images instead.
    """
    import numpy as np
    import torch

    from phis.build import build_datamodule

    dm = build_datamodule(_train_config(run_dir))
    feats = {}
    if not dm.cache_enabled:
        data = dm.dataset("train", SAMPLE_IMAGES)
        for name, spec in dm.teacher_specs().items():
            h, w = spec["grid"]
            picks = np.unique(
                np.linspace(0, len(data) - 1, max(1, MAX_TOKENS // (h * w))).round().astype(int)
            )
            images = torch.stack([data[int(i)]["images"] for i in picks])
            teacher = dm.teacher(name)
            with torch.inference_mode():
                out = [teacher(b).features.float() for b in images.split(dm.cache_batch_size)]
            feats[name] = torch.cat(out).permute(0, 2, 3, 1).reshape(-1, out[0].shape[1]).clone()
        return feats
    dm.prepare_data()  # a cache entry deleted (or re-keyed) since training is rebuilt by its teacher
    for name, cache in dm.caches["train"].items():
        arr = cache.features  # [N, h, w, C], memory-mapped
        per_image = arr.shape[1] * arr.shape[2]
        images = np.unique(np.linspace(0, len(arr) - 1, max(1, MAX_TOKENS // per_image)).round().astype(int))
        y = torch.from_numpy(np.array(arr[images], dtype=np.float32))
        feats[name] = y.reshape(-1, y.shape[-1])
    return feats


def channel_losses(run_dir: Path) -> dict[str, Any]:
    """Per teacher, held-out teacher-space MSE per channel ``[C]`` of the run's final checkpoint."""
    from phis.build import build_datamodule
    from phis.module import DistillModule

    module = DistillModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    dm = build_datamodule(_train_config(run_dir))
    dm.prepare_data()
    split = "test" if "test" in dm.sets else "val"
    teachers = None if dm.cache_enabled else dm.teacher  # no stored targets: run the teachers
    metrics = module.heldout_metrics(dm.heldout_dataloader(split), teachers=teachers, per_channel=True)
    return {n: r["channel_mse"] for n, r in metrics.items()}


def metrics_csv(run_dir: Path) -> Path | None:
    """The run's Lightning metrics CSV; a resumed run's versions are joined (in order) into one file."""
    import pandas as pd

    versions = sorted(
        run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])
    )
    paths = [p for p in (run_dir / "csv" / "metrics.csv", *versions) if p.is_file()]
    if len(paths) <= 1:
        return paths[0] if paths else None
    merged = run_dir / "csv" / "metrics_all_versions.csv"
    pd.concat([pd.read_csv(p) for p in paths], ignore_index=True).to_csv(merged, index=False)
    return merged


def loss_curve_outputs(first: Mapping[str, Run], out: Path) -> list[Path]:
    """Fig. 3 from the runs' metrics CSVs (needs no teacher cache or checkpoint)."""
    from experiments import paper_analyses as analyses

    curves = {LABELS.get(m, m): path for m, r in first.items() if (path := metrics_csv(r.dir)) is not None}
    if not curves:
        note_missing(out, "fig3_loss_curves", "no run wrote a metrics CSV (logger=csv)")
        return []
    rows = analyses.loss_curves(curves, out / "fig3_loss_curves.png", smooth=5)
    analyses.write_rows(
        out / "fig3_loss_curves", rows, title="Fig. 3: final / min training teacher-space MSE"
    )
    return [out / "fig3_loss_curves.png"]


def teacher_feature_outputs(ref: Run, out: Path, feats: Mapping[str, Any]) -> list[Path]:
    """Table 9 and Figs. 1, 2 from ``ref``'s teacher features (``teacher_features(ref.dir)``)."""
    from experiments import paper_analyses as analyses

    rows = analyses.hadamard_alignment_table(feats)
    table9 = _write(
        out,
        "table9_hadamard_alignment",
        list(rows[0]),
        [[f"{v:.4g}" if isinstance(v, float) else v for v in r.values()] for r in rows],
        "Table 9: |H Uᵀ| after Hungarian matching",
        "Matched entries of |H Uᵀ| (1 = H Uᵀ is a signed permutation; 1/√C = fully spread)."
        " U from each teacher's training-set feature covariance.",
    )
    analyses.activation_stats_table(feats, out / "fig2_activation_histograms.png")
    norms = {n: ref_normalizer(ref.dir, n, feats[n]) for n in feats}
    rows = analyses.pca_before_after(feats, norms, out / "fig1_pca_before_after.png")
    analyses.write_rows(out / "fig1_pca", rows, title="Fig. 1: std along the top-2 PCs before/after PHI-S")
    return [table9, out / "fig1_pca_before_after.png", out / "fig2_activation_histograms.png"]


def channel_loss_outputs(first: Mapping[str, Run], out: Path) -> list[Path]:
    """Fig. 9 from each run's final checkpoint on its held-out split."""
    from experiments import paper_analyses as analyses

    losses: dict[str, dict[str, Any]] = {}
    for m, r in first.items():
        if (r.dir / "checkpoints" / "last.ckpt").is_file():
            for teacher, v in channel_losses(r.dir).items():
                losses.setdefault(teacher, {})[LABELS.get(m, m)] = v
    if not losses:
        note_missing(out, "fig9_channel_loss_histograms", "no run kept its final checkpoint")
        return []
    rows = analyses.channel_loss_histograms(losses, out / "fig9_channel_loss_histograms.png")
    analyses.write_rows(out / "fig9_channel_losses", rows, title="Fig. 9: per-channel held-out teacher MSE")
    return [out / "fig9_channel_loss_histograms.png"]


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
    feats: dict[str, Any] = {}

    def sampled() -> dict[str, Any]:  # teacher tokens of the reference run, computed once
        if not feats:
            feats.update(teacher_features(ref.dir))
        return feats

    written += teacher_stats_outputs(runs, out, sampled)
    written += loss_curve_outputs(first, out)
    written += teacher_feature_outputs(ref, out, sampled())
    written += channel_loss_outputs(first, out)
    written.append(write_index(out))
    for path in written:
        print(f"[phis_tables] wrote {path}")
    return written


def ref_normalizer(run_dir: Path, teacher: str, sample: Any) -> Any:
    """The PHI-S transform of ``teacher`` fitted on the run's training cache (for Fig. 1), or on the
    ``sample`` tokens ``[N, C]`` when the run kept no cache."""
    from phis.build import build_datamodule
    from phis.normalizers import make_normalizer

    dm = build_datamodule(_train_config(run_dir))
    norm = make_normalizer("phi_s", sample.shape[-1])
    for y in dm.caches["train"][teacher].feature_batches() if dm.cache_enabled else [sample]:
        norm.update(y)
    norm.fit()
    return norm


# ----------------------------------------------------------------------------------------------------
# Index


INDEX_FILES = {
    "table1_ranks": "Table 1: average ranks of the 10 methods, paper's Table 1 beside",
    "table12_ranks": "Table 12: average ranks of all 12 methods (with AdaLoss rows), paper's beside",
    "table3_teacher_mse": "Table 3: teacher-space MSE per teacher and method, paper's beside",
    "downstream_raw": "raw downstream scores (kNN, zero-shot, segmentation mIoU, RankMe), Table 13 beside",
    "table5_error_variance": "Table 5: per-channel error-variance range, normalized and teacher space",
    "table6_rankme": "Table 6: RankMe per method",
    "table7_teacher_stats": "Table 7: teacher activation statistics",
    "table8_alpha": "Table 8: α of global standardization vs PHI-S",
    "table9_hadamard_alignment": "Table 9: |H Uᵀ| after Hungarian matching",
    "fig1_pca_before_after": "Fig. 1: teachers' features in 2-D PCA before/after PHI-S",
    "fig1_pca": "numbers behind Fig. 1: std along PC1/PC2 before and after PHI-S",
    "fig2_activation_histograms": "Fig. 2: teacher activation histograms",
    "fig3_loss_curves": "Fig. 3: per-teacher training loss curves (the .md: final and minimum values)",
    "fig9_channel_loss_histograms": "Fig. 9: per-channel teacher-MSE histograms",
    "fig9_channel_losses": "numbers behind Fig. 9: min / median / max per-channel MSE",
}


def note_missing(out: Path, stem: str, why: str) -> None:
    """Record why ``stem`` (a table or figure of the index) was not made; the index lists it."""
    path = Path(out) / MISSING_FILE
    reasons = read_json(path) if path.is_file() else {}
    atomic_write_json(path, {**reasons, stem: why})


def write_index(out_dir: str | os.PathLike) -> Path:
    """``README.md`` in ``out_dir``: a link per table/figure present and the metric groups that were run."""
    out = Path(out_dir)
    lines = ["# PHI-S tables and figures", ""]
    intro = out / "INTRO.md"
    if intro.is_file():
        lines += [intro.read_text().strip(), ""]
    lines += ["| file | what |", "|---|---|"]
    for stem, what in INDEX_FILES.items():
        for ext in (".md", ".png"):
            if (out / f"{stem}{ext}").is_file():
                extra = f" ([csv]({stem}.csv))" if (out / f"{stem}.csv").is_file() else ""
                lines.append(f"| [{stem}{ext}]({stem}{ext}){extra} | {what} |")
    missing = [
        stem for stem in INDEX_FILES if not any((out / f"{stem}{e}").is_file() for e in (".md", ".png"))
    ]
    if missing:
        why = read_json(out / MISSING_FILE) if (out / MISSING_FILE).is_file() else {}
        lines += ["", "Not made here:", ""]
        lines += [
            f"- {stem}: {why.get(stem, 'its experiment did not run or has no finished runs')}"
            for stem in missing
        ]
    rank_md = out / "table12_ranks.md"
    if rank_md.is_file():
        used = [ln[2:] for ln in rank_md.read_text().splitlines() if ln.startswith("- ")]
        lines += [
            "",
            "Metric groups that entered the rank tables here (the rest could not be run on this"
            " machine: no ImageNet, ADE20k, VOC, COCO, LLaVA or Probe3D):",
            "",
            *[f"- {u}" for u in used],
        ]
    return atomic_write_text(out / "README.md", "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------
# Dry run: compose every job's config


def sweep_points(params: Mapping[str, Any]) -> list[list[str]]:
    """Hydra basic-sweeper ``params`` (``key: a,b,c``) → the override list of every job (cartesian)."""
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(p) for p in itertools.product(*axes)]


def dry_run(profile: str, launcher: str | None = None, extra: Sequence[str] = ()) -> int:
    """Compose and fully resolve every job of every PHI-S experiment under ``profile``; 0 if all resolve."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    base = [f"+profile={profile}", *([f"launcher={launcher}"] if launcher else []), *extra]
    failures, jobs = [], 0
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for exp in EXPERIMENTS:
            head = compose("train", overrides=[f"experiment={exp}", *base], return_hydra_config=True)
            for point in sweep_points(head.hydra.sweeper.params or {}):
                overrides = [f"experiment={exp}", *base, *point]
                jobs += 1
                try:
                    cfg = compose("train", overrides=overrides, return_hydra_config=True)
                    HydraConfig.instance().set_config(cfg)
                    job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                    OmegaConf.set_readonly(cfg.hydra, False)
                    with open_dict(cfg):
                        cfg.hydra.runtime.output_dir = str(job_dir)
                        cfg.hydra.runtime.cwd = os.getcwd()
                    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                    OmegaConf.to_container(job, resolve=True, throw_on_missing=True)
                    for key in ("launcher", "callbacks"):  # what the job is sent with
                        OmegaConf.to_container(cfg.hydra[key], resolve=True, throw_on_missing=True)
                    print(f"[dry-run] ok   {exp} {' '.join(point)} -> {job_dir}")
                except Exception as err:  # report every broken job, not just the first
                    failures.append(f"{exp} {' '.join(point)}: {type(err).__name__}: {err}")
                    print(f"[dry-run] FAIL {failures[-1]}")
    GlobalHydra.instance().clear()
    print(f"[dry-run] {jobs - len(failures)}/{jobs} job configs of profile {profile!r} resolve")
    return 1 if failures else 0


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
