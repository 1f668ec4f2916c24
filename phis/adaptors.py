"""Per-teacher adaptor heads (AM-RADIO "MLP2"): map student tokens into one teacher's space."""

from __future__ import annotations

from torch import Tensor, nn


class _Residual(nn.Module):
    """h + Linear(GELU(LN(h))): one inner block of MLP2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        self.linear = nn.Linear(dim, dim)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.linear(self.act(self.norm(h)))


class MLP2(nn.Module):
    """Linear → [LN, GELU, Linear residual]×num_inner → LN → GELU → Linear (``.final``, for folding)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, num_inner: int = 0) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim) < 1 or num_inner < 0:
            raise ValueError(
                f"MLP2 needs positive dims and num_inner >= 0, got in_dim={in_dim}, out_dim={out_dim}, "
                f"hidden_dim={hidden_dim}, num_inner={num_inner}"
            )
        self.in_dim, self.out_dim = in_dim, out_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.Sequential(*[_Residual(hidden_dim) for _ in range(num_inner)])
        self.norm = nn.LayerNorm(hidden_dim)
        self.act = nn.GELU()
        self.final = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [..., in_dim]`` → ``[..., out_dim]``."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"MLP2 expects inputs with last dim {self.in_dim}, got shape {tuple(x.shape)}")
        return self.final(self.act(self.norm(self.blocks(self.fc1(x)))))
