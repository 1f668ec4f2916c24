"""The normalization report (`python -m experiments.phis.normalization_report`): figures and report are
written, its checks pass, and they can fail."""

import math

import pytest
import torch

from experiments.phis import hadamard_coverage as coverage
from experiments.phis import normalization_report as report
from experiments.phis.hadamard_coverage import coverage_summary
from experiments.phis.normalization_report import (
    Check,
    exact_moment_points,
    fit_normalizer,
    numeric_checks,
    parse_check_table,
    radius_profile,
    random_orthogonal,
    run_analysis,
    theorem21_check,
)
from phis.hadamard import hadamard_matrix
from phis.normalizers import make_normalizer

FIGURES = (
    "fig_normalized_2d.png",
    "fig_error_ellipses.png",
    "fig_error_radius.png",
    "fig_hadamard_coverage.png",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_complete(out, widths) -> list[tuple[str, float, float, str]]:
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    report = (out / "report.md").read_text()
    rows = parse_check_table(report)
    failing = [r for r in rows if r[3] != "pass" or not r[1] <= r[2]]
    assert not failing, failing
    theorem_rows = [r[0] for r in rows if r[0].startswith("Theorem 2.1")]
    assert theorem_rows == [f"Theorem 2.1: diag Cov[PHI-S(y)] = 1, C = {c}" for c in widths]
    for name in FIGURES:
        assert f"]({name})" in report
    return rows


def test_analysis_writes_figures_and_a_passing_report(tmp_path) -> None:
    widths = (192, 256)
    checks = run_analysis(tmp_path, widths=widths)
    rows = _assert_complete(tmp_path, widths)
    assert len(rows) == len(checks) >= len(widths) + 15
    report = (tmp_path / "report.md").read_text()
    assert "| this code: prime-power q, any Kronecker product | 372 | 140 |" in report
    assert "| 1280 | paley1(q=1279) |" in report


@pytest.mark.slow
def test_cli_covers_every_teacher_width(tmp_path) -> None:
    assert report.main(["--out", str(tmp_path)]) == 0
    _assert_complete(tmp_path, report.TEACHER_WIDTHS)


def test_theorem_check_flags_a_random_orthogonal_substitute() -> None:
    gen = torch.Generator().manual_seed(1)
    c = 192
    y = report.offset_features(2 * c, c, gen)
    norm = fit_normalizer(make_normalizer, "phi_s", y)
    assert theorem21_check(norm, y).passed
    # W = α H Uᵀ  →  α R Uᵀ, what a silent random stand-in for H produces.
    norm.weight.copy_(random_orthogonal(c, gen) @ hadamard_matrix(c).T @ norm.weight)
    bad = theorem21_check(norm, y)
    assert not bad.passed and bad.error > 0.05


def test_checks_flag_wrong_transforms() -> None:
    def over_floored(name: str, dim: int):
        # A floor at half the largest variance clamps real directions: Θ Θᵀ is no longer Σ.
        return make_normalizer(name, dim, eps_rel=0.5)

    checks = {c.identity: c for c in numeric_checks(over_floored, widths=(12,))}
    failed = {k for k, c in checks.items() if not c.passed}
    for label in ("Standardize", "PCA-W", "ZCA-W", "HCA"):
        assert any(label in k and k.startswith("denormalized error cov") for k in failed), label
    assert not any("PHI-S" in k or "Theorem" in k for k in failed), failed

    def forgets_mean(name: str, dim: int):
        norm = make_normalizer(name, dim)
        theta_only = norm.fold_into
        norm.fold_into = lambda linear: _drop_mean(theta_only(linear), norm.mu)
        return norm

    checks = {c.identity: c for c in numeric_checks(forgets_mean, widths=(12,))}
    failed = {k for k, c in checks.items() if not c.passed}
    assert failed == {"fold_into: folded(h) = denormalize(head(h)), all 7 methods (relative)"}


def _drop_mean(linear: torch.nn.Linear, mu: torch.Tensor) -> torch.nn.Linear:
    with torch.no_grad():
        linear.bias.sub_(mu.to(linear.bias.dtype))
    return linear


def test_check_verdicts() -> None:
    assert Check("x", 1e-13, 1e-12).passed
    assert not Check("x", 2e-12, 1e-12).passed
    assert not Check("x", math.nan, 1.0).passed
    assert Check("x", 0.0, 0.0).passed


def test_exact_moment_points_and_radius_profile() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    cov = a @ a.T  # rank 3 of 5: rank-deficient on purpose
    mean = torch.randn(5, generator=gen, dtype=torch.float64) * 50
    pts = exact_moment_points(mean, cov)
    assert pts.shape == (10, 5)
    centred = pts - pts.mean(0)
    assert torch.allclose(pts.mean(0), mean, atol=1e-12, rtol=0)
    assert torch.allclose(centred.T @ centred / 10, cov, atol=1e-12, rtol=0)

    angles = torch.tensor([0.0, math.pi / 2, math.pi / 4], dtype=torch.float64)
    r = radius_profile(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)), angles)
    # Ellipse x²/9 + y² = 1 along 45°: r = (1/18 + 1/2)^-½.
    expected = torch.tensor([3.0, 1.0, (1 / 18 + 1 / 2) ** -0.5], dtype=torch.float64)
    assert torch.allclose(r, expected, atol=1e-12, rtol=0)


def test_reference_rule_reproduces_354() -> None:
    cov = coverage_summary()
    assert len(cov["orders"]) == 512
    assert len(cov["reference"]) == coverage.REFERENCE_COVERAGE
    assert set(cov["reference"]) < set(cov["ours"])
    assert len(cov["ours"]) > coverage.REFERENCE_COVERAGE
    assert sum(cov["families"].values()) == len(cov["ours"])
    assert 668 in cov["missing"] and 52 not in cov["reference"] and 52 in cov["ours"]
