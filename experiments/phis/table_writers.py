"""PHI-S paper layer, the tables: ranks (Tables 1, 12), teacher MSE (Table 3), raw downstream scores,
error variance (Table 5), RankMe (Table 6) and teacher statistics (Tables 7, 8), each as markdown and
CSV with the paper's numbers in separate columns beside ours."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.phis.index import note_missing
from experiments.phis.runs import LABELS, REFERENCE, Run, paper_rows, teacher_names, tmse_split
from phis.ranks import RankTable, metric_group, ordinal, rank_table, spearman
from phis.results import (
    atomic_write_text,
    format_mean_std,
    mean_std,
    write_table,
)
from phis.stats import TABLE7_KEYS


def fmt(values: Sequence[float], digits: int = 4) -> str:
    """``'m ± s'`` over seeds, ``digits`` significant figures (``'m'`` for one value, ``'—'`` for none)."""
    return format_mean_std(values, digits, significant=True)


def write_paper_table(
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
    write_paper_table(out, stem, header, rows, title, notes)
    return table


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
    return write_paper_table(out, "table3_teacher_mse", header, rows, "Table 3: teacher-space MSE", notes)


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
        " the labelled sets named in each column (phis/evaldata.py); RankMe of trunk patch features;"
        " summary_cos: cosine of the student's summary head with the teacher's summary."
        " teacher_zero_shot is the teacher itself."
        " Paper (Table 13, %): ImageNet zero-shot / kNN, ADE20k / VOC mIoU.\n" + _seeds_note(grouped)
    )
    return write_paper_table(out, "downstream_raw", header, rows, "Raw downstream scores", notes)


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
    return write_paper_table(
        out, "table5_error_variance", header, rows, "Table 5: error variance range", notes
    )


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
    return write_paper_table(
        out,
        "table6_rankme",
        ["method", *[f"ours {k}" for k in keys]],
        rows,
        "Table 6: RankMe",
        notes + _seeds_note(grouped),
    )


def teacher_stats_outputs(
    runs: Sequence[Run], out: Path, sample: Mapping[str, Any] | None = None
) -> list[Path]:
    """Tables 7 and 8 from a run's ``teacher_stats`` (the training-set cache moments), paper rows beside;
    without a cache, from ``sample``: teacher tokens of a capped training sample (``teacher_features``)."""
    stats = next((r.results["teacher_stats"] for r in runs if r.results.get("teacher_stats")), None)
    source = "Over all training-set feature tokens (float64 moments of the teacher cache)."
    if not stats and sample:
        from phis.stats import activation_stats, token_moments

        stats = {n: activation_stats(token_moments(y)) for n, y in sample.items()}
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
    p7 = write_paper_table(
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
    p8 = write_paper_table(
        out,
        "table8_alpha",
        ["teacher", "alpha_global_standardize", "alpha_phi_s"],
        rows,
        "Table 8: α of global standardization (1/σ_g) vs PHI-S",
        "α_gs ≤ α_phis always (σ_g² = mean λ + Var_c(μ_c)). Paper rows: PHI-S Table 8.",
    )
    return [p7, p8]
