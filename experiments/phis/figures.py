"""PHI-S paper layer, the figures: loss curves (Fig. 3), teacher features before/after PHI-S with
Table 9 (Figs. 1, 2) and per-channel held-out error (Fig. 9)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.phis.index import note_missing
from experiments.phis.runs import LABELS, Run, channel_losses, metrics_csv, ref_normalizer
from experiments.phis.table_writers import write_paper_table


def loss_curve_outputs(first: Mapping[str, Run], out: Path) -> list[Path]:
    """Fig. 3 from the runs' metrics CSVs (needs no teacher cache or checkpoint)."""
    from experiments.phis import analyses

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
    from experiments.phis import analyses

    rows = analyses.hadamard_alignment_table(feats)
    table9 = write_paper_table(
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
    from experiments.phis import analyses

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
