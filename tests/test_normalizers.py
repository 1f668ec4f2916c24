"""PHI-S §2 identities for every normalizer, against float64 / closed-form references."""

import math

import numpy as np
import pytest
import torch
from test_stats import sam_like
from torch import nn

from phis.hadamard import hadamard_matrix
from phis.losses import mse
from phis.normalizers import (
    NORMALIZERS,
    EstimationSchedule,
    Normalizer,
    align_hadamard,
    fix_signs,
    make_normalizer,
)

F64 = torch.float64
WHITENINGS = ("pca_whiten", "zca_whiten", "hadamard_whiten")
FITTED = tuple(n for n in NORMALIZERS if n != "identity")


def make_exact(name: str, dim: int, **cfg) -> Normalizer:
    """A normalizer with float64 statistics: these tests check identities to ~1e-10."""
    return make_normalizer(name, dim, stats_dtype="float64", **cfg)


def fitted(name: str, y: torch.Tensor, **cfg) -> Normalizer:
    norm = make_exact(name, y.shape[-1], **cfg)
    norm.update(y)
    norm.fit()
    return norm


def np_cov(y: torch.Tensor) -> np.ndarray:
    return np.cov(y.reshape(-1, y.shape[-1]).double().numpy(), rowvar=False, bias=True)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    """Hostile float32 features: 2,000 tokens, 20 channels (a Paley order), offsets ±60."""
    return sam_like(2000, 20, seed=11)


@pytest.mark.parametrize("name", NORMALIZERS)
def test_roundtrip_and_inverse(name, data):
    norm = fitted(name, data)
    y = data.double()
    torch.testing.assert_close(norm.denormalize(norm(y)), y, rtol=1e-12, atol=1e-10)
    x = torch.randn(7, 20, dtype=F64)
    torch.testing.assert_close(norm(norm.denormalize(x)), x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(norm.inverse @ norm.weight, torch.eye(20, dtype=F64), rtol=0, atol=1e-12)
    out = norm(data)  # float32 in, float32 out, close to the float64 transform despite the offsets
    assert out.dtype == torch.float32 and norm(data.to(torch.bfloat16)).dtype == torch.bfloat16
    ref = norm(y)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * max(1.0, ref.abs().max().item()))
    assert norm.fitted


def test_identity_is_exact_passthrough(data):
    norm = make_exact("identity", 20)
    assert norm.fitted
    assert torch.equal(norm(data), data) and torch.equal(norm.denormalize(data), data)
    assert norm.step(data, 0) is False and norm.stats.count.item() == 0


@pytest.mark.parametrize("name", FITTED)
def test_unfitted_is_identity_and_fit_needs_data(name, data):
    norm = make_exact(name, 20)
    assert not norm.fitted
    assert torch.equal(norm(data), data) and torch.equal(norm.denormalize(data), data)
    with pytest.raises(RuntimeError, match="no statistics"):
        norm.fit()


def test_normalized_covariances(data):
    """Whitenings give Cov(x) = I; standardize and PHI-S unit diagonal; global unit mean second moment."""
    y = data.double()
    for name in WHITENINGS:
        np.testing.assert_allclose(np_cov(fitted(name, data)(y)), np.eye(20), atol=1e-9)
    for name in ("standardize", "phi_s"):
        np.testing.assert_allclose(np.diag(np_cov(fitted(name, data)(y))), np.ones(20), rtol=1e-10)
    x = fitted("global_standardize", data)(y)
    assert abs(x.square().mean().item() - 1) < 1e-12 and abs(x.mean().item()) < 1e-12


def test_closed_forms_against_numpy(data):
    cov = np_cov(data)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], vec[:, ::-1]
    H = hadamard_matrix(20).numpy()
    pca = fitted("pca_whiten", data).weight.numpy()
    zca = fitted("zca_whiten", data).weight.numpy()
    hca = fitted("hadamard_whiten", data).weight.numpy()
    phis = fitted("phi_s", data)
    W = phis.weight.numpy()
    inv_sqrt = vec @ np.diag(lam**-0.5) @ vec.T  # Σ^-½, unique
    np.testing.assert_allclose(zca, inv_sqrt, atol=1e-10)
    for w in (pca, hca):  # W = R Σ^-½ with R orthogonal (PCA: Uᵀ, HCA: H Uᵀ)
        np.testing.assert_allclose(w.T @ w, np.linalg.inv(cov), atol=1e-10)
    # PCA = Λ^-½ Uᵀ: rows of Uᵀ are eigenvectors of descending λ, largest |entry| positive.
    np.testing.assert_allclose(np.abs(pca), np.abs(np.diag(lam**-0.5) @ vec.T), atol=1e-8)
    ut = pca * np.sqrt(lam)[:, None]
    np.testing.assert_allclose(ut @ cov @ ut.T, np.diag(lam), atol=1e-8)
    assert (ut[np.arange(20), np.abs(ut).argmax(1)] > 0).all()
    # HCA = D H Λ^-½ Uᵀ with D = diag(±1): M = HCA · PCA⁻¹ is H with some rows negated.
    M = hca @ (ut.T * np.sqrt(lam))
    np.testing.assert_allclose(np.abs(M @ H.T), np.eye(20), atol=1e-10)
    assert (np.diag(M @ ut) >= 0).all()  # sign rule: diag(H Uᵀ) ≥ 0
    # PHI-S = α D H Uᵀ with the same U and D.
    alpha = (np.trace(cov) / 20) ** -0.5
    assert phis.alpha == pytest.approx(alpha, rel=1e-12)
    np.testing.assert_allclose(W, alpha * M @ ut, atol=1e-10)
    np.testing.assert_allclose(W @ W.T, alpha**2 * np.eye(20), atol=1e-10)
    std = fitted("standardize", data)
    np.testing.assert_allclose(std.inverse.diagonal().numpy(), np.sqrt(np.diag(cov)), rtol=1e-11)
    np.testing.assert_allclose(std.mu.numpy(), data.double().mean(0).numpy(), atol=1e-11)


def test_global_standardize_sigma_and_alpha_order(data):
    gs, phis = fitted("global_standardize", data), fitted("phi_s", data)
    flat = data.double().numpy().ravel()
    lam = np.linalg.eigvalsh(np_cov(data))
    mu_c = data.double().mean(0).numpy()
    assert gs.sigma_g == pytest.approx(flat.std(), rel=1e-11)
    assert gs.sigma_g**2 == pytest.approx(lam.mean() + mu_c.var(), rel=1e-11)
    assert gs.mu[0].item() == pytest.approx(flat.mean(), abs=1e-11)
    assert gs.alpha == pytest.approx(1 / flat.std(), rel=1e-11)
    assert gs.alpha < phis.alpha
    d = phis.describe()
    assert d["alpha_phis"] == pytest.approx(phis.alpha) and d["alpha_gs"] == pytest.approx(gs.alpha)
    assert d["count"] == 2000 and d["n_clamped"] == 0 and d["sigma_g"] == pytest.approx(gs.sigma_g)


DIMS = (192, 256, 384, 512, 768, 1024, 1152, 1280, 1408, 1536)


@pytest.mark.parametrize("dim", DIMS)
def test_theorem_2_1_unit_diagonal(dim):
    """diag Cov[α H Uᵀ (y - μ)] = 1 exactly, on the fitted covariance and on the data itself."""
    y = sam_like(300, dim, seed=dim)  # fewer tokens than channels for most dims: Σ is rank-deficient
    norm = fitted("phi_s", y)
    diag = (norm.weight @ norm.stats.covariance * norm.weight).sum(dim=1)  # diag(W Σ Wᵀ)
    torch.testing.assert_close(diag, torch.ones(dim, dtype=F64), rtol=0, atol=1e-11)
    var = norm(y.double()).var(dim=0, correction=0)
    torch.testing.assert_close(var, torch.ones(dim, dtype=F64), rtol=0, atol=1e-10)


def test_alpha_invariant_to_rotation(data):
    q = torch.linalg.qr(torch.randn(20, 20, dtype=F64))[0]
    y = data.double()
    a, b = fitted("phi_s", y), fitted("phi_s", y @ q.T)
    assert a.alpha == pytest.approx(b.alpha, rel=1e-12)
    x = b(y @ q.T)
    np.testing.assert_allclose(np.diag(np_cov(x)), np.ones(20), rtol=1e-10)


def test_mse_in_phis_space_is_alpha_squared_teacher_mse(data):
    norm = fitted("phi_s", data)
    y = data.double()
    pred = y + 3 * torch.randn_like(y) + 1.5
    assert mse(norm(pred), norm(y)).item() == pytest.approx(norm.alpha**2 * mse(pred, y).item(), rel=1e-11)


def test_denormalized_error_covariance_for_isotropic_error(data):
    """Θ (s² I) Θᵀ: s²Σ for whitenings, s² diag σ_c² standardize, s² σ_g² I global, s² mean(λ) I PHI-S."""
    s2 = 0.3
    cov = np_cov(data)
    expected = {name: s2 * cov for name in WHITENINGS}
    expected["standardize"] = s2 * np.diag(np.diag(cov))
    expected["global_standardize"] = s2 * data.double().numpy().var() * np.eye(20)
    expected["phi_s"] = s2 * np.linalg.eigvalsh(cov).mean() * np.eye(20)
    for name, want in expected.items():
        theta = fitted(name, data).inverse.numpy()
        np.testing.assert_allclose(s2 * theta @ theta.T, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_hca_columns_and_paper_phi():
    lam = torch.tensor([3.8356, 0.0894], dtype=F64)
    pts = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64) * lam.sqrt()
    norm = fitted("hadamard_whiten", pts)  # four points with covariance exactly diag(Λ)
    norms = norm.inverse.norm(dim=0)
    torch.testing.assert_close(norms, torch.full((2,), 1.400892, dtype=F64), rtol=0, atol=1e-6)
    y = sam_like(500, 20, seed=12).double()
    hca = fitted("hadamard_whiten", y)
    want = math.sqrt(np.linalg.eigvalsh(np_cov(y)).mean())
    want_norms = torch.full((20,), want, dtype=F64)
    torch.testing.assert_close(hca.inverse.norm(dim=0), want_norms, rtol=1e-11, atol=0)


@pytest.mark.parametrize("eps", [1e-2, 1e-6, 1e-12, 0.0])
def test_rank_deficient_sigma(eps):
    """Σ = diag(1, ε): α → √2, and every method stays finite (whitening clamps, PHI-S needs nothing)."""
    pts = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    pts = pts * torch.tensor([1.0, math.sqrt(eps)], dtype=F64) + torch.tensor([-60.0, 40.0], dtype=F64)
    for name in FITTED:
        norm = fitted(name, pts)
        for t in (norm.weight, norm.inverse, norm(pts), norm.denormalize(torch.randn(3, 2, dtype=F64))):
            assert torch.isfinite(t).all(), name
        torch.testing.assert_close(norm.denormalize(norm(pts)), pts, rtol=1e-12, atol=1e-9)
        if name in WHITENINGS + ("standardize",):
            assert norm.describe()["n_clamped"] == int(eps <= 1e-6), name
    phis = fitted("phi_s", pts)
    assert phis.alpha == pytest.approx((2 / (1 + eps)) ** 0.5, rel=1e-12)
    np.testing.assert_allclose(np.diag(np_cov(phis(pts))), [1.0, 1.0], rtol=1e-10)


def test_eps_policy_is_configurable():
    pts = torch.tensor([[1.0, 1e-3], [1.0, -1e-3], [-1.0, 1e-3], [-1.0, -1e-3]], dtype=F64)  # λ = 1, 1e-6
    loose = fitted("pca_whiten", pts, eps_rel=1e-4)
    tight = fitted("pca_whiten", pts, eps_rel=1e-9)
    assert loose.describe()["n_clamped"] == 1 and tight.describe()["n_clamped"] == 0
    assert loose.weight.abs().max().item() == pytest.approx(1e2, rel=1e-7)  # (1e-4)^-½
    assert tight.weight.abs().max().item() == pytest.approx(1e3, rel=1e-7)


@pytest.mark.parametrize("name", ["global_standardize", "standardize", "pca_whiten", "phi_s"])
def test_single_token_or_constant_features_refuse_to_fit(name):
    norm = make_exact(name, 4)
    norm.update(torch.tensor([[60.0, -62.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="zero total variance"):
        norm.fit()


def test_nan_features_raise(data):
    bad = data.clone()
    bad[5, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        make_exact("phi_s", 20).update(bad)


@pytest.mark.parametrize("name", NORMALIZERS)
@pytest.mark.parametrize("bias", [True, False])
def test_fold_into_linear(name, bias, data):
    norm = fitted(name, data)
    lin = nn.Linear(12, 20, bias=bias)
    folded = norm.fold_into(lin)
    assert folded.weight.dtype == torch.float32 and folded.bias is not None
    h = torch.randn(9, 12)
    ref = norm.denormalize(lin(h).double())
    scale = ref.abs().max().item()
    torch.testing.assert_close(folded(h).double(), ref, rtol=0, atol=1e-5 * scale)
    lin64 = nn.Linear(12, 20, bias=bias, dtype=F64)
    torch.testing.assert_close(norm.fold_into(lin64)(h.double()), norm.denormalize(lin64(h.double())))
    with pytest.raises(ValueError, match="out_features"):
        norm.fold_into(nn.Linear(12, 19))


@pytest.mark.parametrize("name", NORMALIZERS)
def test_normalize_into_is_the_inverse_of_fold_into(name, data):
    """A head folded into teacher space and re-expressed in the normalized space is the head again."""
    norm = fitted(name, data)
    lin64 = nn.Linear(12, 20, dtype=F64)
    h = torch.randn(9, 12, dtype=F64)
    torch.testing.assert_close(norm.normalize_into(lin64)(h), norm(lin64(h)))
    back = norm.normalize_into(norm.fold_into(lin64))
    torch.testing.assert_close(back.weight, lin64.weight)
    torch.testing.assert_close(back.bias, lin64.bias)
    with pytest.raises(ValueError, match="out_features"):
        norm.normalize_into(nn.Linear(12, 19))


@pytest.mark.parametrize("name", FITTED)
def test_refits_are_bit_identical_and_sign_stable(name, data):
    a = fitted(name, data)
    a.fit()
    w1 = a.weight.clone()
    a.fit()
    assert torch.equal(a.weight, w1)
    b = make_exact(name, 20)
    for chunk in data.flip(0).split(333):  # other order, other batching: same transform up to round-off
        b.update(chunk)
    b.fit()
    torch.testing.assert_close(b.weight, w1, rtol=0, atol=1e-8 * w1.abs().max().item())


def test_sign_rules():
    U = torch.linalg.qr(torch.randn(12, 12, dtype=F64))[0]
    flips = torch.where(torch.rand(12) < 0.5, -1.0, 1.0).to(F64)
    fixed = fix_signs(U)
    assert torch.equal(fix_signs(U * flips), fixed)  # whatever signs eigh returns
    assert (fixed.gather(0, fixed.abs().argmax(0, keepdim=True)) > 0).all()
    H = hadamard_matrix(12)
    A = align_hadamard(H, fixed)
    assert (torch.diagonal(A @ fixed.T) >= 0).all()
    assert torch.equal(A.abs(), H.abs()) and torch.equal((A / H).std(dim=1), torch.zeros(12, dtype=F64))


def test_channel_permutation(data):
    perm = torch.randperm(20)
    y = data.double()
    a, b = fitted("pca_whiten", y), fitted("pca_whiten", y[:, perm])
    torch.testing.assert_close(b(y[:, perm]), a(y), rtol=0, atol=1e-8)
    s1, s2 = fitted("standardize", y), fitted("standardize", y[:, perm])
    torch.testing.assert_close(s2(y[:, perm]), s1(y)[:, perm], rtol=0, atol=1e-12)
    p1, p2 = fitted("phi_s", y), fitted("phi_s", y[:, perm])  # PHI-S: the same up to output signs
    x1, x2 = p1(y), p2(y[:, perm])
    signs = torch.sign((x1 * x2).sum(0))
    torch.testing.assert_close(x2, x1 * signs, rtol=0, atol=1e-9)


def test_schedule_updates_refits_then_freezes(data):
    norm = make_exact("phi_s", 20, estimate_steps=5, refit_every=2)
    batches = data.split(100)
    refits, counts = [], []
    for i in range(8):
        refits.append(norm.step(batches[i], global_step=100 + i))
        counts.append(int(norm.stats.count))
    assert refits == [True, False, True, False, True, False, False, False]
    assert counts == [100, 200, 300, 400, 500, 500, 500, 500]
    assert norm.frozen
    ref = fitted("phi_s", data[:500])
    torch.testing.assert_close(norm.weight, ref.weight, rtol=0, atol=1e-12)
    frozen_w = norm.weight.clone()
    norm.step(data[500:], 200)
    assert torch.equal(norm.weight, frozen_w)
    # A resolution change: reset clears statistics, unfreezes, and estimation restarts from that step.
    norm.reset()
    assert not norm.fitted and not norm.frozen and norm.stats.count.item() == 0
    assert torch.equal(norm.weight, torch.eye(20, dtype=F64))
    assert norm.step(batches[10], 300) is True and int(norm.stats.count) == 100
    with pytest.raises(ValueError, match="precedes"):
        norm.step(batches[11], 299)


def test_schedule_last_step_refit_and_accumulation(data):
    norm = make_exact("standardize", 20, estimate_steps=3, refit_every=10)
    flags = [norm.step(b, s) for b, s in zip(data.split(100)[:5], [0, 1, 2, 2, 3])]
    assert flags == [True, False, True, True, False]  # step 2 is the last: both micro-batches refit
    torch.testing.assert_close(norm.weight, fitted("standardize", data[:400]).weight, rtol=1e-12, atol=0)


def test_schedule_external_fit(data):
    norm = make_exact("zca_whiten", 20, estimate_steps=0)
    with pytest.raises(RuntimeError, match="estimate_steps=0"):
        norm.step(data, 0)
    norm.update(data)  # e.g. from a teacher cache
    norm.fit()
    w = norm.weight.clone()
    assert norm.step(data[:10] * 5, 0) is False
    assert norm.frozen and torch.equal(norm.weight, w) and int(norm.stats.count) == 2000


def test_state_dict_roundtrip(data):
    norm = make_exact("phi_s", 20, estimate_steps=2, refit_every=1)
    for i, b in enumerate(data.split(500)[:3]):
        norm.step(b, i)
    fresh = make_exact("phi_s", 20, estimate_steps=2, refit_every=1)
    fresh.load_state_dict(norm.state_dict())
    assert fresh.fitted and fresh.frozen and fresh.alpha == norm.alpha
    assert torch.equal(fresh(data), norm(data))
    assert "hadamard" not in norm.state_dict()


def test_make_normalizer_errors():
    with pytest.raises(ValueError, match="phi_s"):
        make_normalizer("phis", 8)
    with pytest.raises(ValueError, match="eps_rel"):
        make_normalizer("phi_s", 8, eps=1e-3)
    with pytest.raises(ValueError, match="refit_every"):
        make_normalizer("phi_s", 8, refit_every=0)
    with pytest.raises(ValueError, match="668"):
        make_normalizer("phi_s", 668)
    with pytest.raises(RuntimeError, match="not fitted"):
        _ = make_normalizer("phi_s", 8).alpha
    assert EstimationSchedule() == EstimationSchedule(3000, 100)


@pytest.mark.parametrize("name", FITTED)
def test_default_float32_statistics_fit_the_float64_transform(name):
    # Hostile offsets: the default float32-product statistics give the exact transform to ~1e-6.
    g = torch.Generator().manual_seed(21)
    # Well-conditioned mixing: whitening multiplies any statistics error by λ_max / λ_min.
    mix = torch.eye(24) + 0.3 * torch.randn(24, 24, generator=g) / 24**0.5
    y = (torch.randn(4000, 24, generator=g) @ mix) * (2 + 28 * torch.rand(24, generator=g)) + 60
    fast = make_normalizer(name, 24)
    fast.update(y)
    fast.fit()
    exact = fitted(name, y)
    assert fast.stats.dtype == torch.float32 and exact.stats.dtype == F64
    torch.testing.assert_close(fast.mu, exact.mu, rtol=0, atol=1e-6)  # ~1e-7 of the channel stds (2-30)
    # Eigenvectors of close eigenvalues may turn by more than the statistics' error, so compare what the
    # transform does: the covariance of the normalized features (the identity for the whitenings).
    cov = torch.from_numpy(np_cov(y))
    out_fast, out_exact = (n.weight @ cov @ n.weight.T for n in (fast, exact))
    torch.testing.assert_close(out_fast, out_exact, rtol=0, atol=1e-5 * out_exact.abs().max())


def test_unknown_stats_dtype():
    with pytest.raises(ValueError, match="stats_dtype 'float16'; choose one of float32, float64"):
        make_normalizer("phi_s", 8, stats_dtype="float16")
