"""Streaming first and second moments of teacher features, exact in float64 and mergeable across ranks.

Teacher activations can sit far from zero (SAM channel means near -60 with stds of a few units), so the
textbook E[yyᵀ] - μμᵀ cancels catastrophically in float32. Each batch (in chunks of at most 64 MiB) is
instead centred on its own mean in float64, an exact two-pass computation, and chunks, batches and ranks
are combined with the parallel update of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,   δ = μ_b - μ_a,   μ = μ_a + δ n_b / n,   M2 = M2_a + M2_b + δ δᵀ n_a n_b / n.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Rows per float64 chunk are chosen so one centred chunk stays near 64 MiB whatever the width.
_CHUNK_ELEMENTS = 1 << 23


def _combine(
    a: tuple[float, Tensor, Tensor] | None, b: tuple[float, Tensor, Tensor]
) -> tuple[float, Tensor, Tensor]:
    """Chan et al.'s merge of two (count, mean [C], scatter [C, C]) summaries; ``a = None`` means empty."""
    if a is None or a[0] == 0:
        return b
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if n_b == 0:
        return a
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)


class StreamingMoments(nn.Module):
    """Running token count, mean [C] and scatter matrix about the mean [C, C], all float64 buffers."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"StreamingMoments needs dim >= 1, got {dim}")
        self.dim = dim
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dim, dtype=torch.float64))

    @property
    def covariance(self) -> Tensor:
        """Population covariance [C, C] (scatter / count); zeros before any token was seen."""
        return self.m2 / self.count.clamp_min(1.0)

    @property
    def variance(self) -> Tensor:
        """Population per-channel variance [C]."""
        return self.covariance.diagonal().clone()

    def reset(self) -> None:
        """Forget every token seen so far."""
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()

    @torch.no_grad()
    def update(self, y: Tensor, mask: Tensor | None = None) -> None:
        """Fold in the tokens of ``y: [..., C]`` (any float dtype); ``mask: [...]`` bool keeps True tokens.

        A batch with no (unmasked) tokens is a no-op; a non-finite value among the kept tokens raises
        ``ValueError`` before anything is changed.
        """
        if y.shape[-1:] != (self.dim,):
            raise ValueError(f"expected features with last dim {self.dim}, got shape {tuple(y.shape)}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
            if mask.shape != y.shape[:-1]:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} must equal the token shape {tuple(y.shape[:-1])}"
                )
            tokens = y[mask.to(y.device)]
        else:
            tokens = y.reshape(-1, self.dim)
        n = tokens.shape[0]
        if n == 0:
            return
        dev = self.mean.device
        batch: tuple[float, Tensor, Tensor] | None = None
        for chunk in tokens.split(max(1, _CHUNK_ELEMENTS // self.dim)):
            centred = chunk.to(device=dev, dtype=torch.float64, copy=True)
            mean = centred.mean(0)
            # Any NaN/inf in the chunk makes its float64 mean non-finite (finite float32 cannot overflow).
            if not torch.isfinite(mean).all():
                bad = int((~torch.isfinite(tokens)).any(dim=-1).sum())
                raise ValueError(f"non-finite values (NaN/inf) in {bad} of {n} feature tokens; not updating")
            centred -= mean
            batch = _combine(batch, (float(centred.shape[0]), mean, centred.T @ centred))
        count, mean, m2 = batch
        # gemm does not promise a bit-symmetric XᵀX; keep the stored matrix exactly symmetric.
        self._merge(count, mean, 0.5 * (m2 + m2.T))

    def _merge(self, n_b: float, mean_b: Tensor, m2_b: Tensor) -> None:
        count, mean, m2 = _combine((float(self.count), self.mean, self.m2), (n_b, mean_b, m2_b))
        self.count.fill_(count)
        self.mean.copy_(mean)
        self.m2.copy_(m2)

    @torch.no_grad()
    def merge_(self, other: StreamingMoments) -> StreamingMoments:
        """Absorb another accumulator's statistics (as if its tokens had been fed here); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
        dev = self.mean.device
        self._merge(float(other.count), other.mean.to(dev), other.m2.to(dev))
        return self

    @torch.no_grad()
    def all_reduce_(self) -> StreamingMoments:
        """Replace local statistics by those of all ranks' tokens together (no-op without a process group).

        Exact in float64: the global mean comes from all-reduced sums of n and n·μ, then each rank
        contributes its scatter about that global mean, M2_r + n_r (μ_r - μ)(μ_r - μ)ᵀ, and those are
        summed. Afterwards every rank holds the global statistics, so a second call after more local
        updates would count the earlier tokens once per rank; use :meth:`all_reduced` for periodic refits.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        sums = torch.cat([self.count[None], self.mean * self.count])  # [1 + C]: n and n·μ
        dist.all_reduce(sums)
        n_sum = sums[0]
        if float(n_sum) == 0:
            return self
        mean = sums[1:] / n_sum
        delta = self.mean - mean
        m2 = self.m2 + torch.outer(delta, delta) * self.count
        dist.all_reduce(m2)
        self.count.copy_(n_sum)
        self.mean.copy_(mean)
        self.m2.copy_(0.5 * (m2 + m2.T))
        return self

    def all_reduced(self) -> StreamingMoments:
        """A new accumulator with the statistics of all ranks; this one keeps its local statistics."""
        out = StreamingMoments(self.dim).to(self.mean.device)
        out.load_state_dict(self.state_dict())
        return out.all_reduce_()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, count={int(self.count)}"
