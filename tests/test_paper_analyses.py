"""Paper analyses on plain tensors, against float64 / brute-force references."""

import itertools
import math

import numpy as np
import pytest
import torch

from experiments.phis.analyses import (
    activation_stats_table,
    alpha_table,
    channel_loss_histograms,
    error_variance_range,
    error_variance_table,
    hadamard_alignment,
    hadamard_alignment_table,
    loss_curves,
    pca_before_after,
    rankme_table,
    teacher_tables,
)
from phis.hadamard import hadamard_matrix
from phis.metrics import rankme
from phis.normalizers import make_normalizer
from phis.stats import TABLE7_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def offset_features(n: int, c: int, seed: int, offset: float = -60.0, scale: float = 5.0) -> torch.Tensor:
    """SAM-like tokens [N, C]: large channel offsets, correlated channels, float32."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=gen, dtype=F64) / math.sqrt(c)
    mu = offset + 20 * torch.rand(c, generator=gen, dtype=F64)
    return (mu + scale * torch.randn(n, c, generator=gen, dtype=F64) @ mix).float()


class Scale:
    """A diagonal stand-in normalizer: x = s (y - m), y = x / s + m."""

    def __init__(self, s: torch.Tensor, m: torch.Tensor) -> None:
        self.s, self.m = s, m

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.m) * self.s

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.s + self.m


def test_error_variance_range_in_both_spaces() -> None:
    y = offset_features(500, 6, 0).double()
    norm = Scale(torch.tensor([1.0, 2, 3, 4, 5, 10], dtype=F64), y.mean(0))
    gen = torch.Generator().manual_seed(1)
    pred_norm = norm(y) + torch.randn(500, 6, generator=gen, dtype=F64)  # isotropic error in normalized space
    out = error_variance_range(pred_norm, y, norm)
    e_norm = pred_norm - norm(y)
    e_teacher = norm.denormalize(pred_norm) - y
    for space, e in (("normalized", e_norm), ("denormalized", e_teacher)):
        v = e.var(0, unbiased=False)
        assert out[space] == pytest.approx(float(v.max() - v.min()), rel=1e-9)
    # spatial maps [B, C, h, w] are the same tokens
    maps = pred_norm.reshape(5, 10, 10, 6).permute(0, 3, 1, 2)
    targets = y.reshape(5, 10, 10, 6).permute(0, 3, 1, 2)
    assert error_variance_range(maps, targets, norm)["normalized"] == pytest.approx(out["normalized"])
    rows = error_variance_table({"phi_s": {"sam": out, "dino": out}})
    assert rows[0] == {
        "method": "phi_s",
        "space": "normalized",
        "sam": out["normalized"],
        "dino": out["normalized"],
    }
    assert rows[1]["space"] == "denormalized"


def test_isotropic_normalized_error_stays_even_across_channels_only_for_phi_s() -> None:
    # Table 5's point: the same isotropic normalized-space error (variance s²) becomes ≈ s²/α² in every
    # teacher channel with PHI-S (α·rotation), but s²·σ_c² (uneven) with per-channel standardization
    y = offset_features(4000, 8, 2).double()
    var = y.var(0, unbiased=False)
    gen = torch.Generator().manual_seed(3)
    noise = 0.5 * torch.randn(4000, 8, generator=gen, dtype=F64)
    ranges = {}
    for name in ("phi_s", "standardize"):
        norm = make_normalizer(name, 8)
        norm.update(y)
        norm.fit()
        ranges[name] = error_variance_range(norm(y) + noise, y, norm)
    alpha_sq = 1 / float(var.mean())
    assert ranges["phi_s"]["denormalized"] < 0.15 * 0.25 / alpha_sq  # sampling noise only
    spread = 0.25 * float(var.max() - var.min())
    assert ranges["standardize"]["denormalized"] == pytest.approx(spread, rel=0.15)
    assert ranges["standardize"]["denormalized"] > 3 * ranges["phi_s"]["denormalized"]


def test_activation_stats_table_matches_numpy_on_offset_features(tmp_path) -> None:
    feats = offset_features(300, 5, 4)
    ref = feats.double().numpy()
    maps = feats.reshape(3, 10, 10, 5).permute(0, 3, 1, 2)
    rows = activation_stats_table({"sam": maps}, figure=tmp_path / "hist.png")
    s = rows[0]
    assert s["teacher"] == "sam" and list(s)[1:] == list(TABLE7_KEYS)
    assert s["global_mean"] == pytest.approx(ref.mean(), rel=1e-12)
    assert s["global_std"] == pytest.approx(ref.std(), rel=1e-10)
    assert s["channel_mean_min"] == pytest.approx(ref.mean(0).min(), rel=1e-12)
    assert s["channel_std_max"] == pytest.approx(ref.std(0).max(), rel=1e-10)
    assert (tmp_path / "hist.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="NaN"):
        activation_stats_table({"bad": torch.tensor([[1.0, math.nan], [0.0, 1.0]])})
    with pytest.raises(ValueError, match="at least 2"):
        activation_stats_table({"one": torch.zeros(1, 3)})


def test_alpha_table_matches_normalizers_and_is_rotation_invariant() -> None:
    y = offset_features(800, 16, 5)
    rows = alpha_table({"t": y})
    # float64 statistics: the table's α's are exact, so the normalizers' must be too to agree to 1e-9.
    phis, gs = (make_normalizer(n, 16, stats_dtype="float64") for n in ("phi_s", "global_standardize"))
    for n in (phis, gs):
        n.update(y)
        n.fit()
    assert rows[0]["alpha_phi_s"] == pytest.approx(phis.alpha, rel=1e-9)
    assert rows[0]["alpha_global_standardize"] == pytest.approx(gs.alpha, rel=1e-9)
    assert rows[0]["alpha_global_standardize"] <= rows[0]["alpha_phi_s"]
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=F64))
    rotated = alpha_table({"t": y.double() @ q.T})[0]
    assert rotated["alpha_phi_s"] == pytest.approx(rows[0]["alpha_phi_s"], rel=1e-9)


def test_hadamard_alignment_matches_brute_force_and_limits() -> None:
    gen = torch.Generator().manual_seed(6)
    H = hadamard_matrix(4)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64))
    m = (H @ q.T).abs().numpy()
    best = max(itertools.permutations(range(4)), key=lambda p: sum(m[i, p[i]] for i in range(4)))
    matched = np.array([m[i, best[i]] for i in range(4)])
    out = hadamard_alignment(H, q)
    assert out["matched_mean"] == pytest.approx(matched.mean()) and out["matched_min"] == pytest.approx(
        matched.min()
    )
    # U = H with shuffled, sign-flipped columns: H Uᵀ is a signed permutation, every match is 1
    H8 = hadamard_matrix(8)
    signs = torch.tensor([1.0, -1, 1, 1, -1, 1, -1, 1], dtype=F64)[:, None]
    U = H8[torch.randperm(8, generator=gen)] * signs  # then H Uᵀ = (signed permutation)ᵀ
    perm = hadamard_alignment(H8, U)
    assert perm["matched_min"] == pytest.approx(1.0) and perm["inv_sqrt_dim"] == pytest.approx(8**-0.5)
    # U = I: H itself, every entry 1/√C
    eye = hadamard_alignment(H8, torch.eye(8, dtype=F64))
    assert eye["matched_max"] == pytest.approx(8**-0.5)
    rows = hadamard_alignment_table({"t": offset_features(200, 8, 7)})
    assert (
        rows[0]["dim"] == 8 and 8**-0.5 - 1e-9 <= rows[0]["matched_min"] <= rows[0]["matched_max"] <= 1 + 1e-9
    )
    with pytest.raises(ValueError, match="square"):
        hadamard_alignment(H8, torch.eye(4))


def test_rankme_table() -> None:
    f = torch.randn(2, 6, 3, 3)
    assert rankme_table({"phi_s": f}) == [{"method": "phi_s", "rankme": rankme(f)}]


def test_loss_curves_from_lightning_metrics_csv(tmp_path) -> None:
    lines = [
        "epoch,step,train/a/mse_teacher,train/b/mse_teacher,train/a/mse_norm,val/a/mse_teacher,train/loss"
    ]
    for step in range(20):
        lines.append(f"0,{step},{1.0 / (step + 1)},{2.0 + step},0.5,,{step}")
    lines.append("0,19,,,,0.3,")  # a validation row: other columns empty
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join(lines) + "\n")
    rows = loss_curves({"phi_s": path}, figure=tmp_path / "curves.png")
    by = {(r["method"], r["teacher"]): r for r in rows}
    assert set(by) == {("phi_s", "a"), ("phi_s", "b")}
    assert by[("phi_s", "a")]["final"] == pytest.approx((1 / 19 + 1 / 20) / 2)  # last 10 % = 2 points
    assert by[("phi_s", "b")]["min"] == 2.0
    assert (tmp_path / "curves.png").is_file()
    assert loss_curves({"x": path}, split="val")[0]["final"] == pytest.approx(0.3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loss_curves({"x": tmp_path / "none.csv"})
    with pytest.raises(ValueError, match="no 'train/<teacher>/nope' columns"):
        loss_curves({"x": path}, metric="nope")


def test_channel_loss_histograms(tmp_path) -> None:
    v = torch.tensor([0.01, 1.0, 9.0], dtype=F64)
    rows = channel_loss_histograms({"sam": {"mse": v, "phi_s": v / 2}}, figure=tmp_path / "h.png")
    assert rows[0]["max_over_min"] == pytest.approx(900.0) and rows[1]["median"] == pytest.approx(0.5)
    assert (tmp_path / "h.png").is_file()


def test_pca_before_after_scales_by_alpha_and_teacher_tables(tmp_path) -> None:
    feats = {"small": offset_features(400, 8, 8, offset=0.0, scale=0.03), "big": offset_features(400, 8, 9)}
    norms = {}
    for t, y in feats.items():
        norms[t] = make_normalizer("phi_s", 8)
        norms[t].update(y)
        norms[t].fit()
    rows = pca_before_after(feats, norms, figure=tmp_path / "pca.png")
    for r in rows:
        alpha = norms[r["teacher"]].alpha
        # PHI-S = α·rotation, so principal-axis spreads scale by exactly α
        assert r["pc1_std_after"] == pytest.approx(alpha * r["pc1_std_before"], rel=1e-4)
        assert r["pc2_std_after"] == pytest.approx(alpha * r["pc2_std_before"], rel=1e-4)
    before = [r["pc1_std_before"] for r in rows]
    after = [r["pc1_std_after"] for r in rows]
    assert max(before) / min(before) > 50 and max(after) / min(after) < 3
    with pytest.raises(ValueError, match="no normalizer"):
        pca_before_after(feats, {"small": norms["small"]})
    tables = teacher_tables(feats, tmp_path / "teachers")
    assert set(tables) == {"table7_teacher_stats", "table8_alpha", "table9_hadamard_alignment", "fig1_pca"}
    assert (
        (tmp_path / "teachers" / "table8_alpha.csv")
        .read_text()
        .startswith("teacher,alpha_global_standardize")
    )
    assert (tmp_path / "teachers" / "fig1_pca_before_after.png").is_file()
