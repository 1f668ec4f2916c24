"""Feature-matching losses of the PHI-S baselines (PHI-S §2.1, AM-RADIO) and AdaLoss.

Prediction ``x`` and target ``y`` are channels-last ``[..., C]``; each loss is first computed per token
(over channels), then averaged over tokens, or over the tokens where ``mask: [...]`` is True. An empty
mask gives a zero loss that still backpropagates (zero) gradients.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[..., Tensor]


def _check(x: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if x.shape != y.shape:
        raise ValueError(f"prediction shape {tuple(x.shape)} differs from target shape {tuple(y.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the token shape {tuple(x.shape[:-1])}"
            )
    # Half-precision losses are computed in float32.
    dt = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dt), y.to(dt)


def _token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_token: [...]`` over all tokens, or over the masked ones."""
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"hybrid loss weight beta must lie in [0, 1], got {beta}")


def _mse_tokens(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).square().mean(dim=-1)


def _cosine_tokens(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=1e-8)


def mse(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over channels and tokens."""
    x, y = _check(x, y, mask)
    return _token_mean(_mse_tokens(x, y), mask)


def cosine(x: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of 1 - cos(x, y), the cosine taken over channels."""
    x, y = _check(x, y, mask)
    return _token_mean(_cosine_tokens(x, y), mask)


def hyb_mse(x: Tensor, y: Tensor, mask: Tensor | None = None, beta: float = 0.9) -> Tensor:
    """β·cosine + (1 - β)·MSE (PHI-S 'Hyb MSE')."""
    _check_beta(beta)
    x, y = _check(x, y, mask)
    return _token_mean(beta * _cosine_tokens(x, y) + (1 - beta) * _mse_tokens(x, y), mask)


def hyb_smooth_l1(
    x: Tensor, y: Tensor, mask: Tensor | None = None, beta: float = 0.9, smooth_l1_beta: float = 1.0
) -> Tensor:
    """β·cosine + (1 - β)·SmoothL1 (AM-RADIO's feature loss); the SmoothL1 threshold is configurable."""
    _check_beta(beta)
    x, y = _check(x, y, mask)
    sl1 = F.smooth_l1_loss(x, y, reduction="none", beta=smooth_l1_beta).mean(dim=-1)
    return _token_mean(beta * _cosine_tokens(x, y) + (1 - beta) * sl1, mask)


LOSSES: dict[str, LossFn] = {"mse": mse, "cosine": cosine, "hyb_mse": hyb_mse, "hyb_smooth_l1": hyb_smooth_l1}


def make_loss(name: str, **cfg: float) -> LossFn:
    """The loss ``name`` with its options bound, called as ``loss(x, y, mask=None)``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    fn = LOSSES[name]
    options = [p for p in inspect.signature(fn).parameters if p not in ("x", "y", "mask")]
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; valid options are {options}")
    if "beta" in cfg:
        _check_beta(cfg["beta"])
    return functools.partial(fn, **cfg)


class AdaLoss(nn.Module):
    """Divide a loss term by a detached running estimate of itself (PHI-S appendix, 'Ada-' rows).

    The estimate is a bias-corrected EMA, ema_t / (1 - momentum^t), so the first call returns exactly 1
    and later calls return the term relative to its recent scale. It is updated only in training mode;
    non-finite values (e.g. an overflowing AMP step) are not folded in. State lives in buffers. Under
    data parallelism the term is averaged over ranks before the update, so all ranks scale alike.
    """

    def __init__(self, momentum: float = 0.99, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"AdaLoss momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def estimate(self) -> Tensor:
        """The bias-corrected running estimate (0 before any update)."""
        if int(self.steps) == 0:
            return torch.zeros((), dtype=torch.float64, device=self.ema.device)
        return self.ema / (1.0 - self.momentum ** int(self.steps))

    def forward(self, loss: Tensor) -> Tensor:
        """``loss`` (scalar) divided by the detached running estimate."""
        if loss.numel() != 1:
            raise ValueError(f"AdaLoss expects a scalar loss, got shape {tuple(loss.shape)}")
        value = loss.detach().to(torch.float64)
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # One estimate for all ranks (a non-finite term on any rank skips the update everywhere).
            value = value.clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        if self.training and torch.isfinite(value):
            self.ema.mul_(self.momentum).add_((1.0 - self.momentum) * value)
            self.steps += 1
        scale = self.estimate if int(self.steps) > 0 else value
        return loss / scale.clamp_min(self.eps).to(loss.dtype)
