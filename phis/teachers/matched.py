"""Statistics-matched teachers: a real teacher followed by a fixed per-channel affine map, chosen so the
teacher's activation statistics equal one row of PHI-S Table 7 (a controlled experiment).

The PHI-S teachers' activations differ by two orders of magnitude (global std 0.029 for DFN CLIP, 5.47
for SAM); small offline teachers differ far less. ``StatsMatchedTeacher`` maps each feature channel
``y_c ↦ a_c · y_c + b_c`` (``a_c > 0``, so the map is invertible and keeps the channel's spatial pattern)
such that, over the feature tokens of a fixed image pool, the mapped channels have

- channel means spanning exactly the row's [channel_mean_min, channel_mean_max],
- channel stds spanning exactly [channel_std_min, channel_std_max],
- the row's global mean and global std (σ_g² = mean_c σ_c² + Var_c μ_c, as ``activation_stats``).

Target channel stds follow the base channels' std ranks on a log scale, ``s_c = s_lo (s_hi/s_lo)^(u_c^p)``
(u = rank / (C − 1)); target means follow the ranks of the base means, stretched about a centre m0 with
an exponent q towards the two extremes. The share of σ_g² carried by the channel means is the base
teacher's own share, kept inside what the ranges allow; p, q and m0 are then found by bisection. The
summary output is left unchanged (the map is of the feature map, what the PHI-S normalizers act on).

The map is estimated once per (base teacher, row, pool) and kept as a small file under ``memo_dir`` (a
teacher-cache directory), so every job of a sweep reuses it; it is part of the teacher's config and
hence of its cache key.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from phis.stats import TABLE7_KEYS, ChannelMoments
from phis.teachers import Teacher, build_teacher

log = logging.getLogger(__name__)

REFERENCE = Path(__file__).resolve().parents[2] / "experiments" / "reference"
TABLE7_FILE = REFERENCE / "phis_table7_teacher_stats.csv"
MAP_VERSION = 2  # bump when the fitting changes: stored maps of another version are refitted


def table7_rows(path: Path = TABLE7_FILE) -> dict[str, dict[str, float]]:
    """PHI-S Table 7 as teacher → {statistic: value}."""
    with open(path, newline="") as f:
        return {r["teacher"]: {k: float(r[k]) for k in TABLE7_KEYS} for r in csv.DictReader(f)}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Rank of each entry in [0, 1] (ties broken by position, which only matters for exact ties)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r / max(1, len(x) - 1)


def _bisect(f: Any, lo: float, hi: float, what: str) -> float:
    """Root of a monotone f on [lo, hi]; a clear error when the target is out of its reach."""
    if f(lo) * f(hi) > 0:
        raise ValueError(f"statistics matching: no {what} in [{lo:g}, {hi:g}] hits the target")
    return brentq(f, lo, hi, xtol=1e-12, rtol=1e-12, maxiter=500)


def target_channel_stats(
    mean: np.ndarray, std: np.ndarray, row: Mapping[str, float]
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Target per-channel means and stds with exactly the row's ranges, global mean and global std,
    ordered like the base channels' own means and stds. Returns (means, stds, the fitted shape)."""
    c = len(mean)
    if c < 3:
        raise ValueError(f"statistics matching needs at least 3 channels, got {c}")
    m_lo, m_hi = row["channel_mean_min"], row["channel_mean_max"]
    s_lo, s_hi = row["channel_std_min"], row["channel_std_max"]
    g_mean, g_var = row["global_mean"], row["global_std"] ** 2
    if not (m_lo < g_mean < m_hi and 0 < s_lo < s_hi):
        raise ValueError(f"statistics matching: inconsistent Table 7 row {dict(row)}")

    u = _ranks(std)
    log_ratio = math.log(s_hi / s_lo)

    def stds(p: float) -> np.ndarray:
        return s_lo * np.exp(log_ratio * u**p)

    # Signed position of each channel mean among the others: −1 (lowest) … 0 (median) … +1 (highest).
    v = 2.0 * _ranks(mean) - 1.0

    def means(q: float, m0: float) -> np.ndarray:
        w = np.abs(v) ** q
        return np.where(v >= 0, m0 + (m_hi - m0) * w, m0 - (m0 - m_lo) * w)

    def centred(q: float) -> tuple[float, np.ndarray] | None:
        # The mean over channels is linear in the centre m0: solve for the row's global mean; None when
        # that centre falls outside the mean range (q too small piles the channels on the extremes).
        w = np.abs(v) ** q
        a, b = w[v >= 0].sum() / c, w[v < 0].sum() / c
        if 1 - a - b <= 1e-12:
            return None
        m0 = (g_mean - m_hi * a - m_lo * b) / (1 - a - b)
        return (m0, means(q, m0)) if m_lo <= m0 <= m_hi else None

    def fits(log_q: float, var_target: float) -> bool:
        found = centred(math.exp(log_q))
        return found is not None and float(np.var(found[1])) <= var_target

    q_hi = 1e4
    extremes = centred(q_hi)
    if extremes is None:
        raise ValueError(f"statistics matching: the row {dict(row)} has no centre for its channel means")
    var_min = float(np.var(extremes[1]))  # the extremes alone
    mean_sq_min = float(np.mean(stds(1e6) ** 2))  # every std at s_lo but the top one(s)
    mean_sq_max = float(np.mean(stds(1e-6) ** 2))
    base_share = float(np.var(mean) / (np.var(mean) + np.mean(std**2)))
    # The channel means carry the base teacher's share of σ_g², within what the ranges allow.
    var_means = min(max(base_share * g_var, var_min, g_var - mean_sq_max), g_var - mean_sq_min)
    if not var_min <= var_means < g_var:
        raise ValueError(
            f"statistics matching: the row {dict(row)} cannot be met by {c} channels "
            f"(the mean extremes alone give Var μ = {var_min:.4g} ≥ σ_g² = {g_var:.4g})"
        )
    # The smallest stretch q whose means are feasible and carry at most var_means (both hold for all
    # larger q: the variance of the means falls as q grows).
    lo, hi = math.log(1e-3), math.log(q_hi)
    if fits(lo, var_means):
        hi = lo
    for _ in range(200):
        if hi - lo < 1e-13:
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fits(mid, var_means) else (mid, hi)
    q = math.exp(hi)
    m0, mu = centred(q)  # type: ignore[misc]
    target_sq = g_var - float(np.var(mu))
    p = math.exp(
        _bisect(
            lambda lp: np.mean(stds(math.exp(lp)) ** 2) - target_sq,
            math.log(1e-6),
            math.log(1e6),
            "std exponent p",
        )
    )
    return mu, stds(p), {"p": p, "q": q, "m0": float(m0), "mean_share": float(np.var(mu)) / g_var}


def fit_affine_map(
    moments: ChannelMoments, row: Mapping[str, float]
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Per-channel (scale, shift) mapping features with these moments onto the row's statistics."""
    mean = moments.mean.double().cpu().numpy()
    std = moments.variance.clamp_min(0).sqrt().double().cpu().numpy()
    if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)):
        raise ValueError("statistics matching: the base teacher's features are not finite")
    dead = std <= 1e-12 * max(1.0, float(np.abs(mean).max()))
    if dead.any():
        # An affine map cannot give a constant channel a spread, so channel_std_min could not be met.
        raise ValueError(
            f"statistics matching: {int(dead.sum())} of {len(std)} channels of the base teacher are "
            "constant over the pool (e.g. after a ReLU); use a pre-activation tap or a larger pool"
        )
    mu_t, sd_t, shape = target_channel_stats(mean, std, row)
    scale = sd_t / std
    shift = mu_t - scale * mean
    return torch.from_numpy(scale), torch.from_numpy(shift), shape


class StatsMatchedTeacher(Teacher):
    """A base teacher whose feature map goes through a fixed per-channel affine map (see the module)."""

    def __init__(
        self,
        name: str,
        base: Mapping[str, Any],
        row: str,
        pool: Mapping[str, Any],
        memo_dir: str | None = None,
        batch_size: int = 128,
    ) -> None:
        rows = table7_rows()
        if row not in rows:
            raise ValueError(f"teacher '{name}': Table 7 row {row!r}; choose one of {', '.join(rows)}")
        inner = build_teacher({**dict(base), "name": f"{name}_base"})
        super().__init__(name, inner.input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.base = inner
        self.row_name, self.row = row, rows[row]
        self.summary_dim, self.feature_dim = inner.summary_dim, inner.feature_dim
        self.patch_size, self.grid = inner.patch_size, inner.grid
        self.has_text = getattr(inner, "has_text", False)
        if hasattr(inner, "classify_summary"):  # the summary is unchanged, so is its classifier
            self.classify_summary = inner.classify_summary
        material = {"version": MAP_VERSION, "base": dict(base), "row": self.row, "pool": dict(pool)}
        digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
        memo = Path(memo_dir) / "stats_match" / f"{name}-{digest}.pt" if memo_dir else None
        if memo is not None and memo.exists():
            saved = torch.load(memo, map_location="cpu", weights_only=True)
            scale, shift, self.shape = saved["scale"], saved["shift"], saved["shape"]
        else:
            moments = self.base_moments(pool, batch_size)
            scale, shift, self.shape = fit_affine_map(moments, self.row)
            if memo is not None:
                memo.parent.mkdir(parents=True, exist_ok=True)
                tmp = memo.with_suffix(f".tmp{id(self)}")
                torch.save({"scale": scale, "shift": shift, "shape": self.shape, "material": material}, tmp)
                tmp.replace(memo)
        self.register_buffer("scale", scale.float().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.float().view(1, -1, 1, 1), persistent=False)
        self._freeze()
        log.info(
            "teacher %s: %s features matched to PHI-S Table 7 row %s (p=%.3g, q=%.3g, mean share %.3g)",
            name,
            base.get("family"),
            row,
            self.shape["p"],
            self.shape["q"],
            self.shape["mean_share"],
        )

    @torch.no_grad()
    def base_moments(self, pool: Mapping[str, Any], batch_size: int) -> ChannelMoments:
        """Float64 per-channel moments of the base teacher's feature tokens over the image pool."""
        from phis.photos import OfflineImagePool

        images = OfflineImagePool(**dict(pool))
        moments = ChannelMoments(self.base.feature_dim, torch.device("cpu"))
        for start in range(0, len(images), batch_size):
            batch = images.images[start : start + batch_size].float() / 255.0
            feats = self.base(batch).features  # [B, C, h, w]
            moments.update(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
        return moments

    def preprocess(self, images: Tensor) -> Tensor:
        return images  # the base teacher resizes and normalizes

    def encode(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        out = self.base(x)
        feats = out.features * self.scale.to(out.features.dtype) + self.shift.to(out.features.dtype)
        return out.summary, feats
