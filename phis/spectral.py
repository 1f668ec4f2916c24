"""Spectral reparametrization of linear layers (Zhai et al. 2023, σReparam), used by the PHI-S student.

A weight is trained as ``W = γ · W̄ / σ(W̄)``: ``W̄`` is the free matrix, ``σ(W̄)`` its largest singular
value estimated by power iteration (one step per training forward; the vectors are buffers, so a
checkpoint resumes the same estimate) and ``γ`` a learned scalar. ``γ`` starts at the estimate of
``σ`` for the initial weight, so reparametrizing leaves the function unchanged. ``γ`` is weight-decayed
(``DistillModule.configure_optimizers``), which bounds the layer's spectral norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

INIT_ITERATIONS = 15


class SpectralReparam(nn.Module):
    """Parametrization ``W̄ → scale · W̄ / σ(W̄)`` of a 2-D weight; ``u``, ``v`` are the singular vectors."""

    def __init__(self, weight: Tensor, eps: float = 1e-12) -> None:
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(
                f"spectral reparametrization needs a 2-D weight, got shape {tuple(weight.shape)}"
            )
        self.eps = eps
        out_features, in_features = weight.shape
        dev = weight.device
        self.register_buffer("u", F.normalize(torch.randn(out_features, device=dev), dim=0, eps=eps))
        self.register_buffer("v", F.normalize(torch.randn(in_features, device=dev), dim=0, eps=eps))
        self.scale = nn.Parameter(torch.ones((), device=dev, dtype=weight.dtype))
        self.reset_(weight)

    @torch.no_grad()
    def power_step_(self, weight: Tensor, iterations: int = 1) -> None:
        """Refine ``u``, ``v`` toward the top singular pair of ``weight`` (float32 even under autocast)."""
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.float()
            for _ in range(iterations):
                self.v.copy_(F.normalize(torch.mv(w.T, self.u), dim=0, eps=self.eps))
                self.u.copy_(F.normalize(torch.mv(w, self.v), dim=0, eps=self.eps))

    def sigma(self, weight: Tensor) -> Tensor:
        """The current estimate ``uᵀ W v`` of the largest singular value (differentiable in ``weight``)."""
        # Clones: the buffers change in place at the next training forward, autograd keeps these.
        u, v = self.u.clone(), self.v.clone()
        with torch.autocast(weight.device.type, enabled=False):
            return torch.dot(u, torch.mv(weight.float(), v))

    @torch.no_grad()
    def reset_(self, weight: Tensor, iterations: int = INIT_ITERATIONS) -> None:
        """Re-estimate σ for ``weight`` and set ``scale`` to it: the layer computes ``weight`` exactly."""
        self.power_step_(weight, iterations)
        self.scale.copy_(self.sigma(weight))

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            self.power_step_(weight.detach())
        return (self.scale * weight / self.sigma(weight)).to(weight.dtype)


def apply_spectral_reparam(module: nn.Module) -> int:
    """Reparametrize the weight of every ``nn.Linear`` inside ``module``; returns how many."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for linear in linears:
        parametrize.register_parametrization(linear, "weight", SpectralReparam(linear.weight.detach()))
    return len(linears)


def spectral_reparams(module: nn.Module) -> list[SpectralReparam]:
    """Every spectral reparametrization inside ``module``."""
    return [m for m in module.modules() if isinstance(m, SpectralReparam)]


@torch.no_grad()
def reset_spectral_reparams(module: nn.Module) -> None:
    """After new weights were loaded into ``module``: re-estimate every σ and reset every ``scale``."""
    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, SpectralReparam):
                    p.reset_(m.parametrizations.weight.original)
