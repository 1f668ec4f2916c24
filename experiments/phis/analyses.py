"""The PHI-S paper's analyses of teachers and students, from plain tensors (and a run's metrics CSV).

Each function returns its table as a list of row dicts and, where the paper has a figure, writes it as
a PNG when given a path:

- ``error_variance_table``  Table 5: max − min of the per-channel error variance, normalized and teacher space
- ``rankme_table``          Table 6: RankMe of spatial features
- ``activation_stats_table`` Table 7 / Fig. 2: teacher activation statistics and histograms
- ``alpha_table``           Table 8: α of global standardization (1/σ_g) vs α of PHI-S
- ``hadamard_alignment_table`` Table 9: |H Uᵀ| after Hungarian matching
- ``loss_curves``           Fig. 3: per-teacher teacher-space loss over training (Lightning metrics.csv)
- ``channel_loss_histograms`` Fig. 9: distribution of per-channel teacher-space MSE
- ``pca_before_after``      Fig. 1: every teacher's features in 2-D PCA before and after PHI-S

All statistics are computed in float64 with centred (two-pass) formulas: teacher activations have
large offsets (SAM channel means near −60) where E[y²] − E[y]² loses most digits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from phis.hadamard import hadamard_matrix
from phis.metrics import TeacherErrorMeter, rankme, tokens
from phis.results import write_table
from phis.stats import TABLE7_KEYS, activation_stats, token_moments

Rows = list[dict[str, Any]]
F64 = torch.float64


def write_rows(stem: str | os.PathLike, rows: Rows, title: str = "") -> tuple[Path, Path]:
    """Write a list of row dicts as ``<stem>.md`` and ``<stem>.csv`` (columns from the first row)."""
    if not rows:
        raise ValueError(f"no rows to write for {stem}")
    header = list(rows[0])
    cells = [[f"{r[h]:.4g}" if isinstance(r[h], float) else r[h] for h in header] for r in rows]
    return write_table(stem, header, cells, title=title)


def _token_matrix(name: str, features: Tensor) -> Tensor:
    """``[B, C, h, w]`` or ``[N, C]`` → float64 ``[tokens, C]``, refusing empty or non-finite input."""
    y = tokens(features).to(F64)
    if y.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 feature tokens, got {y.shape[0]}")
    if not torch.isfinite(y).all():
        raise ValueError(f"{name}: features contain NaN/inf")
    return y


def _save(fig: Figure, path: str | os.PathLike | None) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------
# Table 5: per-channel error variance


def error_variance_range(pred_norm: Tensor, target: Tensor, normalizer: Any) -> dict[str, float]:
    """max − min over channels of Var(error), in normalized space and in teacher space.

    ``pred_norm``: the student's normalized-space prediction, ``target``: teacher features (both
    ``[B, C, h, w]`` or ``[N, C]``); ``normalizer`` maps ``[..., C]`` forward and has ``denormalize``.
    """
    x, y = tokens(pred_norm), tokens(target)
    out = {}
    for space, (p, t) in {
        "normalized": (x, normalizer(y)),
        "denormalized": (normalizer.denormalize(x), y),
    }.items():
        meter = TeacherErrorMeter()
        meter.update(p, t)
        out[space] = meter.result()["error_variance_range"]
    return out


def error_variance_table(ranges: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Rows:
    """Table 5 rows (method, space, one column per teacher) from ``ranges[method][teacher][space]``."""
    rows = []
    for method, per_teacher in ranges.items():
        for space in ("normalized", "denormalized"):
            rows.append({"method": method, "space": space, **{t: r[space] for t, r in per_teacher.items()}})
    return rows


# ----------------------------------------------------------------------------------------------------
# Table 6: RankMe


def rankme_table(features: Mapping[str, Tensor]) -> Rows:
    """RankMe of each method's spatial features ``[B, D, h, w]`` (or tokens ``[N, D]``)."""
    return [{"method": m, "rankme": rankme(f)} for m, f in features.items()]


# ----------------------------------------------------------------------------------------------------
# Table 7 / Fig. 2: teacher activation statistics


def _teacher_stats(name: str, features: Tensor) -> dict[str, float]:
    """:func:`phis.stats.activation_stats` of one teacher's features ``[B, C, h, w]`` or ``[N, C]``."""
    return activation_stats(token_moments(_token_matrix(name, features)))


def activation_stats_table(
    features: Mapping[str, Tensor], figure: str | os.PathLike | None = None, bins: int = 100
) -> Rows:
    """Table 7 per teacher; with ``figure``, Fig. 2: a histogram of all activation values per teacher."""
    rows = []
    for t, f in features.items():
        stats = _teacher_stats(t, f)
        rows.append({"teacher": t, **{k: stats[k] for k in TABLE7_KEYS}})
    if figure is not None:
        fig = Figure(figsize=(4 * len(rows), 3.2), layout="constrained")
        axes = fig.subplots(1, len(rows), squeeze=False)[0]
        for ax, (t, f), row in zip(axes, features.items(), rows):
            values = tokens(f).to(torch.float32).reshape(-1).numpy()
            ax.hist(values, bins=bins, log=True, color="tab:blue")
            ax.set_title(f"{t}: mean {row['global_mean']:.3g}, std {row['global_std']:.3g}", fontsize=9)
            ax.set_xlabel("activation value")
        axes[0].set_ylabel("count (log)")
        _save(fig, figure)
    return rows


# ----------------------------------------------------------------------------------------------------
# Table 8: α of global standardization vs PHI-S


def alpha_table(features: Mapping[str, Tensor]) -> Rows:
    """α_gs = 1/σ_g (σ_g over all values) and α_phis = (tr Σ / C)^-½ per teacher; α_gs ≤ α_phis always."""
    rows = []
    for t, f in features.items():
        stats = _teacher_stats(t, f)
        rows.append(
            {"teacher": t, "alpha_global_standardize": stats["alpha_gs"], "alpha_phi_s": stats["alpha_phis"]}
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# Table 9: |H Uᵀ| after Hungarian matching


def eigenvectors(features: Tensor) -> Tensor:
    """Eigenvectors U ``[C, C]`` (columns, eigenvalues descending) of the feature covariance, float64."""
    y = _token_matrix("eigenvectors", features)
    c = y - y.mean(0)
    _, U = torch.linalg.eigh(c.T @ c / y.shape[0])
    return U.flip(1)


def hadamard_alignment(H: Tensor, U: Tensor) -> dict[str, float]:
    """How far the PHI-S rotation H Uᵀ is from a signed permutation.

    ``linear_sum_assignment`` pairs rows and columns of |H Uᵀ| to maximize the matched magnitude; a
    signed permutation would give 1 everywhere, a rotation that spreads every eigenvector evenly over
    all channels gives about 1/√C. Returns mean/min/max of the matched entries and 1/√C.
    """
    if H.shape != U.shape or H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(
            f"H and U must be square and of equal shape, got {tuple(H.shape)} and {tuple(U.shape)}"
        )
    m = (H.to(F64) @ U.to(F64).T).abs()
    rows, cols = linear_sum_assignment(m.numpy(), maximize=True)
    matched = m[torch.as_tensor(rows), torch.as_tensor(cols)]
    return {
        "dim": H.shape[0],
        "matched_mean": float(matched.mean()),
        "matched_min": float(matched.min()),
        "matched_max": float(matched.max()),
        "inv_sqrt_dim": 1 / math.sqrt(H.shape[0]),
    }


def hadamard_alignment_table(features: Mapping[str, Tensor]) -> Rows:
    """Table 9 per teacher, with U from the teacher's feature covariance and H of its width."""
    rows = []
    for t, f in features.items():
        U = eigenvectors(f)
        rows.append({"teacher": t, **hadamard_alignment(hadamard_matrix(U.shape[0]), U)})
    return rows


# ----------------------------------------------------------------------------------------------------
# Fig. 3: per-teacher loss curves from a Lightning CSVLogger metrics.csv


def loss_curves(
    runs: Mapping[str, str | os.PathLike],
    figure: str | os.PathLike | None = None,
    metric: str = "mse_teacher",
    split: str = "train",
    smooth: int = 1,
) -> Rows:
    """Per teacher, the ``<split>/<teacher>/<metric>`` columns of each run's metrics.csv over steps.

    ``runs`` maps a label (method) to a metrics.csv path. Rows give, per (method, teacher), the final
    value (mean of the last 10 % of logged points) and the minimum; the figure has one log-scale panel
    per teacher with one line per method (moving average over ``smooth`` points).
    """
    import pandas as pd

    curves: dict[str, dict[str, Any]] = {}
    for label, path in runs.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file {path} for run {label!r} does not exist")
        df = pd.read_csv(path)
        if "step" not in df.columns:
            raise ValueError(f"{path} has no 'step' column; expected a Lightning CSVLogger metrics.csv")
        prefix, suffix = f"{split}/", f"/{metric}"
        cols = [c for c in df.columns if c.startswith(prefix) and c.endswith(suffix) and c.count("/") == 2]
        if not cols:
            raise ValueError(
                f"{path} has no '{prefix}<teacher>{suffix}' columns; columns: {list(df.columns)}"
            )
        for c in cols:
            s = df[["step", c]].dropna().groupby("step")[c].mean()
            curves.setdefault(c[len(prefix) : -len(suffix)], {})[label] = s
    rows = []
    for teacher, per_run in curves.items():
        for label, s in per_run.items():
            tail = s.iloc[-max(1, len(s) // 10) :]
            rows.append(
                {"method": label, "teacher": teacher, "final": float(tail.mean()), "min": float(s.min())}
            )
    if figure is not None:
        fig = Figure(figsize=(4.2 * len(curves), 3.4), layout="constrained")
        axes = fig.subplots(1, len(curves), squeeze=False)[0]
        for ax, (teacher, per_run) in zip(axes, curves.items()):
            for label, s in per_run.items():
                ax.plot(s.index, s.rolling(smooth, min_periods=1).mean(), label=label, lw=1.2)
            ax.set_yscale("log")
            ax.set_title(f"{teacher}: {split} {metric}", fontsize=9)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=7)
        _save(fig, figure)
    return rows


# ----------------------------------------------------------------------------------------------------
# Fig. 9: per-channel loss histograms


def channel_loss_histograms(
    losses: Mapping[str, Mapping[str, Tensor]], figure: str | os.PathLike | None = None, bins: int = 40
) -> Rows:
    """Per-channel loss summary from ``losses[teacher][method]: [C]``; figure: log-x histograms."""
    rows = []
    for teacher, per_method in losses.items():
        for method, v in per_method.items():
            v = v.to(F64)
            rows.append(
                {
                    "teacher": teacher,
                    "method": method,
                    "min": float(v.min()),
                    "median": float(v.median()),
                    "max": float(v.max()),
                    "max_over_min": float(v.max() / v.min()) if v.min() > 0 else math.inf,
                }
            )
    if figure is not None:
        fig = Figure(figsize=(4.2 * len(losses), 3.4), layout="constrained")
        axes = fig.subplots(1, len(losses), squeeze=False)[0]
        for ax, (teacher, per_method) in zip(axes, losses.items()):
            positive = torch.cat([v.to(F64) for v in per_method.values()])
            positive = positive[positive > 0]
            lo, hi = (float(positive.min()), float(positive.max())) if len(positive) else (1e-12, 1.0)
            edges = torch.logspace(math.log10(lo), math.log10(hi * (1 + 1e-9)), bins + 1).numpy()
            for method, v in per_method.items():
                ax.hist(v.to(F64).clamp_min(lo).numpy(), bins=edges, histtype="step", label=method)
            ax.set_xscale("log")
            # Plain labels at 1 and 3 per decade: on a range under a decade matplotlib's default labels
            # every minor tick (2x10^0, 3x10^0, ...) and they run into each other.
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{teacher}: per-channel MSE", fontsize=9)
            ax.set_xlabel("per-channel teacher-space MSE (log)", fontsize=8)
        axes[0].legend(fontsize=7)
        _save(fig, figure)
    return rows


# ----------------------------------------------------------------------------------------------------
# Fig. 1: teachers before and after PHI-S, 2-D PCA


def pca_2d(y: Tensor) -> Tensor:
    """Projection ``[N, 2]`` of centred tokens ``y: [N, C]`` onto their two leading principal axes."""
    c = y - y.mean(0)
    _, _, vh = torch.linalg.svd(c, full_matrices=False)
    return c @ vh[:2].T


def pca_before_after(
    features: Mapping[str, Tensor],
    normalizers: Mapping[str, Callable[[Tensor], Tensor]],
    figure: str | os.PathLike | None = None,
    max_points: int = 2000,
    seed: int = 0,
) -> Rows:
    """Each teacher's tokens projected on its top-2 principal axes, raw and after its normalizer.

    Rows give the standard deviation along PC1/PC2 before and after; the figure shows all teachers on
    shared axes, where raw teachers differ in scale by orders of magnitude and PHI-S evens them out.
    """
    missing = set(features) - set(normalizers)
    if missing:
        raise ValueError(f"no normalizer for teachers {sorted(missing)}")
    gen = torch.Generator().manual_seed(seed)
    rows, points = [], {}
    for t, f in features.items():
        y = _token_matrix(t, f)
        if y.shape[0] > max_points:
            y = y[torch.randperm(y.shape[0], generator=gen)[:max_points]]
        before = pca_2d(y)
        after = pca_2d(normalizers[t](y).to(F64))
        points[t] = (before, after)
        sb, sa = before.std(0, unbiased=False), after.std(0, unbiased=False)
        rows.append(
            {
                "teacher": t,
                "pc1_std_before": float(sb[0]),
                "pc2_std_before": float(sb[1]),
                "pc1_std_after": float(sa[0]),
                "pc2_std_after": float(sa[1]),
            }
        )
    if figure is not None:
        fig = Figure(figsize=(10, 4.6), layout="constrained")
        axes = fig.subplots(1, 2)
        for t, (before, after) in points.items():
            axes[0].scatter(before[:, 0], before[:, 1], s=2, alpha=0.4, label=t)
            axes[1].scatter(after[:, 0], after[:, 1], s=2, alpha=0.4, label=t)
        axes[0].set_title("teacher features (top-2 PCs)")
        axes[1].set_title("after normalization (top-2 PCs)")
        for ax in axes:
            ax.set_aspect("equal", adjustable="datalim")
        axes[0].legend(markerscale=4, fontsize=8)
        _save(fig, figure)
    return rows


def teacher_tables(
    features: Mapping[str, Tensor], out_dir: str | os.PathLike, normalizer: str = "phi_s"
) -> dict[str, Rows]:
    """Tables 7–9 and Figs. 1–2 for a set of teachers' features, written into ``out_dir``."""
    from phis.normalizers import make_normalizer

    out = Path(out_dir)
    norms = {}
    for t, f in features.items():
        y = tokens(f)
        norms[t] = make_normalizer(normalizer, y.shape[1])
        norms[t].update(y)
        norms[t].fit()
    tables = {
        "table7_teacher_stats": activation_stats_table(features, out / "fig2_activation_histograms.png"),
        "table8_alpha": alpha_table(features),
        "table9_hadamard_alignment": hadamard_alignment_table(features),
        "fig1_pca": pca_before_after(features, norms, out / "fig1_pca_before_after.png"),
    }
    for name, rows in tables.items():
        write_rows(out / name, rows, title=name)
    return tables
