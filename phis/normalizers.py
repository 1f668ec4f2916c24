"""Teacher-feature normalizations of PHI-S §2: affine maps x = W (y - μ) with inverse y = Θ x + μ.

One base class owns the statistics, the buffers, the forward/inverse maps, folding and the estimation
schedule; each method only turns (μ, Σ) into (μ, W, Θ):

    identity            W = I                   Θ = I               (μ = 0)
    global_standardize  W = I / σ_g             Θ = σ_g I           (μ = μ_g·1, σ_g² = mean λ + Var_c μ_c)
    standardize         W = diag(1/σ_c)         Θ = diag(σ_c)
    pca_whiten          W = Λ^-½ Uᵀ             Θ = U Λ^½
    zca_whiten          W = U Λ^-½ Uᵀ           Θ = U Λ^½ Uᵀ
    hadamard_whiten     W = H Λ^-½ Uᵀ           Θ = U Λ^½ Hᵀ
    phi_s               W = α H Uᵀ              Θ = α⁻¹ U Hᵀ        (α = (tr Σ / C)^-½)

Conventions that make refits reproducible:
- Eigenvalues are sorted in descending order (column k of U belongs to the k-th largest λ); negative
  round-off eigenvalues are clamped to 0.
- Eigenvector signs are fixed: each column of U is negated when its entry of largest magnitude is
  negative. PCA whitening then does not depend on the order of the teacher channels. Eigenvectors of
  repeated eigenvalues stay ambiguous: no sign rule can fix them.
- The Hadamard methods also negate the rows k of H with (H Uᵀ)_kk < 0, so the rotation H Uᵀ has a
  non-negative diagonal (the fix PHI-S Fig. 4 suggests; for PHI-S, output channel k is positively
  aligned with teacher channel k). A row-negated H is still a normalized Hadamard matrix, so
  Theorem 2.1 holds.
  (Eigenvector signs alone cannot do this: the sign of u_j enters every diagonal entry of H Uᵀ.)
  Permuting the teacher channels then changes PHI-S outputs only by per-channel signs.
- Epsilon policy: standardize clamps σ_c² and the whitenings clamp λ at
  ``floor = eps_rel · max + eps_abs`` (the max over σ_c², or over λ; defaults 1e-6 and 1e-12).
  float32 features carry rounding noise near 1e-7 of their magnitude, so directions with less
  variance than the floor are mostly noise and are not amplified further; zero-variance channels or
  directions map to finite values. W and Θ use the same clamped values, so Θ W = I always holds.
  global_standardize and phi_s divide only by the total variance and need no epsilon; every method
  refuses statistics with tr Σ = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from phis.hadamard import hadamard_matrix
from phis.stats import PRODUCT_DTYPES, StreamingMoments

NORMALIZERS = (
    "identity",
    "global_standardize",
    "standardize",
    "pca_whiten",
    "zca_whiten",
    "hadamard_whiten",
    "phi_s",
)

# Scalars recorded at each fit (buffer ``fit_summary``), so describe()/alpha need no collective call.
_SUMMARY_FIELDS = ("count", "mean_eigenvalue", "var_channel_means", "n_clamped")


@dataclass
class EstimationSchedule:
    """Estimate statistics during the first ``estimate_steps`` steps, refitting every ``refit_every``.

    ``estimate_steps = 0`` means the statistics are fitted from outside (e.g. from a teacher cache)
    before training; the schedule then only freezes the transform.
    """

    estimate_steps: int = 3000
    refit_every: int = 100

    def __post_init__(self) -> None:
        if self.estimate_steps < 0:
            raise ValueError(f"estimate_steps must be >= 0, got {self.estimate_steps}")
        if self.refit_every < 1:
            raise ValueError(f"refit_every must be >= 1, got {self.refit_every}")


def _sorted_eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues [C] in descending order (clamped at 0) and eigenvectors U [C, C] as columns."""
    lam, U = torch.linalg.eigh(cov)
    return lam.flip(0).clamp_min(0.0), U.flip(1)


def fix_signs(U: Tensor) -> Tensor:
    """Negate eigenvector columns of U [C, C] whose entry of largest magnitude is negative."""
    key = U.gather(0, U.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    return U * torch.where(key < 0, -1.0, 1.0).to(U.dtype)


def align_hadamard(H: Tensor, U: Tensor) -> Tensor:
    """Negate the rows k of H [C, C] with (H Uᵀ)_kk < 0, so the rotation H Uᵀ has a non-negative diagonal."""
    diag = (H * U).sum(dim=1)  # (H Uᵀ)_kk = Σ_j H_kj U_kj
    return H * torch.where(diag < 0, -1.0, 1.0).to(H.dtype)[:, None]


class Normalizer(nn.Module):
    """Affine teacher-feature normalization with streaming statistics, an exact inverse and folding."""

    name: ClassVar[str] = ""
    diagonal: ClassVar[bool] = False  # W, Θ diagonal: forward is elementwise
    uses_statistics: ClassVar[bool] = True
    uses_hadamard: ClassVar[bool] = False

    def __init__(
        self,
        dim: int,
        schedule: EstimationSchedule | None = None,
        eps_rel: float = 1e-6,
        eps_abs: float = 1e-12,
        stats_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if eps_rel < 0 or eps_abs < 0:
            raise ValueError(f"eps_rel and eps_abs must be >= 0, got {eps_rel}, {eps_abs}")
        if stats_dtype not in PRODUCT_DTYPES:
            choices = ", ".join(PRODUCT_DTYPES)
            raise ValueError(f"unknown stats_dtype {stats_dtype!r}; choose one of {choices}")
        self.dim = dim
        self.schedule = schedule if schedule is not None else EstimationSchedule()
        self.eps_rel = eps_rel
        self.eps_abs = eps_abs
        # float32: products XᵀX in float32 (~1e-7 of max |Σ|, fast); float64: exact (see phis.stats).
        self.stats = StreamingMoments(dim, stats_dtype)
        f64 = torch.float64
        self.register_buffer("mu", torch.zeros(dim, dtype=f64))
        self.register_buffer("weight", torch.eye(dim, dtype=f64))
        self.register_buffer("inverse", torch.eye(dim, dtype=f64))
        self.register_buffer("_fitted", torch.tensor(not self.uses_statistics))
        self.register_buffer("_frozen", torch.tensor(False))
        self.register_buffer("_start_step", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("fit_summary", torch.full((len(_SUMMARY_FIELDS),), math.nan, dtype=f64))
        if self.uses_hadamard:
            self.register_buffer("hadamard", hadamard_matrix(dim), persistent=False)

    @property
    def fitted(self) -> bool:
        """Whether a transform has been fitted (before that, forward and denormalize are identities)."""
        return bool(self._fitted)

    @property
    def frozen(self) -> bool:
        """Whether the schedule has ended estimation, making step() a no-op until reset()."""
        return bool(self._frozen)

    def transform(self, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """(μ [C], W [C, C], Θ [C, C], number of clamped variances) from float64 mean [C] and Σ [C, C]."""
        raise NotImplementedError

    def floor(self, values: Tensor) -> float:
        """Smallest variance a whitening/standardization divides by (the epsilon policy)."""
        return self.eps_rel * float(values.max()) + self.eps_abs

    def update(self, y: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate the tokens of ``y: [..., C]`` (``mask: [...]`` bool) into the statistics."""
        self.stats.update(y, mask)

    @torch.no_grad()
    def fit(self) -> None:
        """Recompute (μ, W, Θ) from the statistics of all ranks (a collective call under DDP)."""
        if not self.uses_statistics:
            self._fitted.fill_(True)
            return
        stats = self.stats.all_reduced()
        if float(stats.count) == 0:
            raise RuntimeError(
                f"{self.name}: no statistics yet; call update() with teacher features before fit()"
            )
        mean, cov = stats.mean, stats.covariance
        trace = float(cov.diagonal().sum())
        if not trace > 0:
            raise ValueError(
                f"{self.name}: teacher features have zero total variance (tr Σ = {trace}) over "
                f"{int(stats.count)} tokens; there is nothing to normalize"
            )
        mu, weight, inverse, n_clamped = self.transform(mean, cov)
        self.mu.copy_(mu)
        self.weight.copy_(weight)
        self.inverse.copy_(inverse)
        summary = (
            float(stats.count),
            trace / self.dim,
            float(mean.var(unbiased=False)),
            float(n_clamped),
        )
        self.fit_summary.copy_(torch.tensor(summary, dtype=torch.float64))
        self._fitted.fill_(True)

    def _work_dtype(self, t: Tensor) -> torch.dtype:
        # Half-precision inputs are transformed in float32 and cast back.
        return torch.promote_types(t.dtype, torch.float32)

    def forward(self, y: Tensor) -> Tensor:
        """Normalize teacher features ``y: [..., C]`` → ``x: [..., C]`` in the input dtype."""
        dt = self._work_dtype(y)
        centred = y.to(dt) - self.mu.to(dt)
        if self.diagonal:
            x = centred * self.weight.diagonal().to(dt)
        else:
            x = centred @ self.weight.to(dt).T
        return x.to(y.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """Map normalized predictions ``x: [..., C]`` back to teacher space ``y = Θ x + μ``."""
        dt = self._work_dtype(x)
        if self.diagonal:
            y = x.to(dt) * self.inverse.diagonal().to(dt)
        else:
            y = x.to(dt) @ self.inverse.to(dt).T
        return (y + self.mu.to(dt)).to(x.dtype)

    @torch.no_grad()
    def fold_into(self, linear: nn.Linear) -> nn.Linear:
        """A new Linear computing denormalize(linear(h)): A' = Θ A, b' = Θ b + μ (same dtype/device)."""
        if linear.out_features != self.dim:
            raise ValueError(
                f"cannot fold a Linear with out_features={linear.out_features} into dim {self.dim}"
            )
        ref = linear.weight
        theta = self.inverse.to(ref.device)
        weight = theta @ ref.to(torch.float64)
        bias = self.mu.to(ref.device).clone()
        if linear.bias is not None:
            bias += theta @ linear.bias.to(torch.float64)
        out = nn.Linear(linear.in_features, self.dim, bias=True, device=ref.device, dtype=ref.dtype)
        out.weight.copy_(weight.to(ref.dtype))
        out.bias.copy_(bias.to(ref.dtype))
        return out

    @torch.no_grad()
    def normalize_into(self, linear: nn.Linear) -> nn.Linear:
        """A new Linear computing forward(linear(h)): A' = W A, b' = W (b - μ). The inverse of
        ``fold_into``: a head that outputs teacher space re-expressed in this normalized space."""
        if linear.out_features != self.dim:
            raise ValueError(
                f"cannot normalize a Linear with out_features={linear.out_features} into dim {self.dim}"
            )
        ref = linear.weight
        w = self.weight.to(ref.device)
        bias = -self.mu.to(ref.device)
        if linear.bias is not None:
            bias += linear.bias.to(torch.float64)
        out = nn.Linear(linear.in_features, self.dim, bias=True, device=ref.device, dtype=ref.dtype)
        out.weight.copy_((w @ ref.to(torch.float64)).to(ref.dtype))
        out.bias.copy_((w @ bias).to(ref.dtype))
        return out

    def reset(self) -> None:
        """Back to the freshly built state: no statistics, identity transform, schedule restarts."""
        self.stats.reset()
        self.mu.zero_()
        self.weight.copy_(torch.eye(self.dim, dtype=torch.float64))
        self.inverse.copy_(torch.eye(self.dim, dtype=torch.float64))
        self._fitted.fill_(not self.uses_statistics)
        self._frozen.fill_(False)
        self._start_step.fill_(-1)
        self.fit_summary.fill_(math.nan)

    @torch.no_grad()
    def step(self, y: Tensor, global_step: int, mask: Tensor | None = None) -> bool:
        """Follow the schedule for one training step; returns whether the transform was refitted.

        Steps count from the first call after construction or reset(). Steps 0 … estimate_steps-1
        update the statistics; a refit follows the update at every multiple of refit_every and at the
        last estimation step; from step estimate_steps on the transform is frozen and this is a no-op.
        Several calls with the same step (gradient accumulation) all update, and refit on refit steps.
        """
        if self.frozen or not self.uses_statistics:
            return False
        sched = self.schedule
        if sched.estimate_steps == 0:
            if not self.fitted:
                raise RuntimeError(
                    f"{self.name}: estimate_steps=0 means the statistics come from outside; call "
                    "update() and fit() (e.g. over a teacher cache) before training"
                )
            self._frozen.fill_(True)
            return False
        if int(self._start_step) < 0:
            self._start_step.fill_(global_step)
        local = global_step - int(self._start_step)
        if local < 0:
            raise ValueError(
                f"global_step {global_step} precedes the start of estimation ({int(self._start_step)})"
            )
        if local >= sched.estimate_steps:
            self._frozen.fill_(True)
            return False
        self.update(y, mask)
        if local % sched.refit_every == 0 or local == sched.estimate_steps - 1:
            self.fit()
            return True
        return False

    def _summary(self, field: str) -> float:
        if not self.fitted or not self.uses_statistics:
            raise RuntimeError(f"{self.name}: not fitted yet; call fit() (or step()) first")
        return float(self.fit_summary[_SUMMARY_FIELDS.index(field)])

    def describe(self) -> dict[str, Any]:
        """Scalar statistics of the last fit (α's, global std, clamping) for logs and analysis tables."""
        out: dict[str, Any] = {"method": self.name, "dim": self.dim, "fitted": self.fitted}
        if not self.fitted or not self.uses_statistics:
            return out
        mean_lam = self._summary("mean_eigenvalue")
        sigma_g = math.sqrt(mean_lam + self._summary("var_channel_means"))
        out.update(
            count=int(self._summary("count")),
            mean_eigenvalue=mean_lam,
            var_channel_means=self._summary("var_channel_means"),
            sigma_g=sigma_g,
            alpha_gs=1.0 / sigma_g,
            alpha_phis=1.0 / math.sqrt(mean_lam),
            n_clamped=int(self._summary("n_clamped")),
        )
        return out

    def extra_repr(self) -> str:
        s = self.schedule
        return f"dim={self.dim}, estimate_steps={s.estimate_steps}, refit_every={s.refit_every}"


class Identity(Normalizer):
    """No normalization (the MSE / cosine baselines)."""

    name = "identity"
    diagonal = True
    uses_statistics = False


class GlobalStandardize(Normalizer):
    """One mean and one std over all channels and tokens: x = (y - μ_g) / σ_g."""

    name = "global_standardize"
    diagonal = True

    def transform(self, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        # σ_g² = E over channels and tokens of (y - μ_g)² = mean_c Σ_cc + Var_c(μ_c) (population).
        sigma_g = torch.sqrt(cov.diagonal().mean() + mean.var(unbiased=False))
        eye = torch.eye(self.dim, dtype=torch.float64, device=cov.device)
        return mean.mean().expand(self.dim), eye / sigma_g, eye * sigma_g, 0

    @property
    def sigma_g(self) -> float:
        """Global standard deviation σ_g of the last fit."""
        return math.sqrt(self._summary("mean_eigenvalue") + self._summary("var_channel_means"))

    @property
    def alpha(self) -> float:
        """α_gs = 1 / σ_g, the global scale (≤ α of PHI-S on the same data)."""
        return 1.0 / self.sigma_g


class Standardize(Normalizer):
    """Per-channel standardization: x_c = (y_c - μ_c) / σ_c."""

    name = "standardize"
    diagonal = True

    def transform(self, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        var = cov.diagonal()
        floor = self.floor(var)
        std = var.clamp_min(floor).sqrt()
        return mean, torch.diag(1.0 / std), torch.diag(std), int((var < floor).sum())


class _Eigen(Normalizer):
    """Methods built on the eigendecomposition Σ = U Λ Uᵀ with sign-fixed U."""

    def eigen(self, cov: Tensor) -> tuple[Tensor, Tensor, int]:
        """Clamped eigenvalues (descending), sign-fixed U, and how many eigenvalues hit the floor."""
        lam, U = _sorted_eigh(cov)
        floor = self.floor(lam)
        return lam.clamp_min(floor), fix_signs(U), int((lam < floor).sum())

    def _aligned_hadamard(self, U: Tensor) -> Tensor:
        return align_hadamard(self.hadamard.to(U.device), U)


class PCAWhiten(_Eigen):
    """PCA whitening x = Λ^-½ Uᵀ (y - μ): decorrelated, unit variance, rotated to the eigenbasis."""

    name = "pca_whiten"

    def transform(self, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        lam, U, n = self.eigen(cov)
        return mean, lam.rsqrt()[:, None] * U.T, U * lam.sqrt(), n


class ZCAWhiten(_Eigen):
    """ZCA whitening x = U Λ^-½ Uᵀ (y - μ): whitened while staying closest to the teacher's channels."""

    name = "zca_whiten"

    def transform(self, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        lam, U, n = self.eigen(cov)
        return mean, (U * lam.rsqrt()) @ U.T, (U * lam.sqrt()) @ U.T, n


class HadamardWhiten(_Eigen):
    """Hadamard whitening (HCA) x = H Λ^-½ Uᵀ (y - μ): whitened, then spread evenly over channels."""

    name = "hadamard_whiten"
    uses_hadamard = True

    def transform(self, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        lam, U, n = self.eigen(cov)
        H = self._aligned_hadamard(U)
        return mean, H @ (lam.rsqrt()[:, None] * U.T), (U * lam.sqrt()) @ H.T, n


class PHIS(_Eigen):
    """PHI-S x = α H Uᵀ (y - μ): an isotropic rotation giving every output channel unit variance."""

    name = "phi_s"
    uses_hadamard = True

    def transform(self, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        U = fix_signs(_sorted_eigh(cov)[1])
        H = self._aligned_hadamard(U)
        # Theorem 2.1: diag(H Λ Hᵀ) = tr Σ / C because every H_ij² = 1/C; no epsilon needed.
        alpha = cov.diagonal().mean().rsqrt()
        return mean, alpha * (H @ U.T), (U @ H.T) / alpha, 0

    @property
    def alpha(self) -> float:
        """α = (tr Σ / C)^-½ of the last fit."""
        return 1.0 / math.sqrt(self._summary("mean_eigenvalue"))


_REGISTRY: dict[str, type[Normalizer]] = {
    cls.name: cls
    for cls in (Identity, GlobalStandardize, Standardize, PCAWhiten, ZCAWhiten, HadamardWhiten, PHIS)
}
_CFG_KEYS = ("estimate_steps", "refit_every", "eps_rel", "eps_abs", "stats_dtype")


def make_normalizer(name: str, dim: int, **cfg: Any) -> Normalizer:
    """Build a normalizer by config name; cfg may hold estimate_steps, refit_every, eps_rel, eps_abs,
    stats_dtype."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; choose one of {', '.join(NORMALIZERS)}")
    unknown = sorted(set(cfg) - set(_CFG_KEYS))
    if unknown:
        raise ValueError(f"unknown normalizer option(s) {unknown}; valid options are {list(_CFG_KEYS)}")
    sched = {k: int(cfg.pop(k)) for k in ("estimate_steps", "refit_every") if k in cfg}
    return _REGISTRY[name](dim, schedule=EstimationSchedule(**sched), **cfg)
