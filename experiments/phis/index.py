"""PHI-S paper layer, the results index: README.md of the tables and figures present, and why each
missing one is missing."""

from __future__ import annotations

import os
from pathlib import Path

from phis.results import (
    atomic_write_json,
    atomic_write_text,
    read_json,
)

MISSING_FILE = "missing.json"  # why a table or figure of the index was not made


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
    "claims": "the paper's claims tested on this sweep: agree / disagree / inconclusive, paired tests",
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
            "Metric groups that entered the rank tables here (each benchmark the runs did not score is"
            " listed as omitted):",
            "",
            *[f"- {u}" for u in used],
        ]
    return atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
