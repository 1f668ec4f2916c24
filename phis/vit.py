"""A plain ViT trunk that holds timm's VisionTransformer weights under timm's names, built without timm.

The student trains a timm trunk (``phis.student``); a released student (``phis.model``) rebuilds the
same computation here so that loading it needs only torch. ``TrunkSpec`` is everything that decides
the computation; ``describe_trunk`` reads it off a timm trunk and refuses the parts this file does
not rebuild (gated attention, GLU MLPs, a normalized patch embedding, ...), naming them. Exports check
the rebuilt trunk against the original on real inputs, so a variant that slipped through would fail
there, not in a user's hands.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GELU_APPROXIMATIONS = ("none", "tanh")


@dataclass(frozen=True)
class TrunkSpec:
    """The shape and options of a pre-norm ViT trunk (patch embedding, blocks, final norm)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden_dim: int
    qkv_bias: bool = True
    proj_bias: bool = True  # attention output and MLP layers
    patch_bias: bool = True
    qk_norm: bool = False  # LayerNorm of each head's queries and keys
    attn_norm: bool = False  # LayerNorm of the attention output before its projection
    mlp_norm: bool = False  # LayerNorm between the MLP's two layers
    layer_scale: bool = False
    pre_norm: bool = False  # LayerNorm of the token sequence before the first block
    norm_eps: float = 1e-6
    gelu: str = "none"  # GELU approximation: none (exact erf) or tanh

    def __post_init__(self) -> None:
        if self.gelu not in GELU_APPROXIMATIONS:
            raise ValueError(f"trunk gelu={self.gelu!r} is not valid; choose one of {GELU_APPROXIMATIONS}")
        sizes = (
            self.patch_size,
            self.embed_dim,
            self.depth,
            self.num_heads,
            self.head_dim,
            self.mlp_hidden_dim,
        )
        if min(sizes) < 1:
            raise ValueError(f"trunk sizes must be positive, got {asdict(self)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrunkSpec:
        """From a config's ``trunk`` entry, rejecting unknown keys (a newer format) by name."""
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown trunk option(s) {unknown}; this phis version knows {[f.name for f in fields(cls)]}"
            )
        return cls(**values)


def _norm(on: bool, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if on else nn.Identity()


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        inner = spec.num_heads * spec.head_dim
        self.qkv = nn.Linear(spec.embed_dim, 3 * inner, bias=spec.qkv_bias)
        self.q_norm = _norm(spec.qk_norm, spec.head_dim, spec.norm_eps)
        self.k_norm = _norm(spec.qk_norm, spec.head_dim, spec.norm_eps)
        self.norm = _norm(spec.attn_norm, inner, spec.norm_eps)
        self.proj = nn.Linear(inner, spec.embed_dim, bias=spec.proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, N, D]`` → ``[B, N, D]``."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(self.norm(x.transpose(1, 2).reshape(b, n, -1)))


class Mlp(nn.Module):
    """Linear → GELU → (LayerNorm) → Linear."""

    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.embed_dim, spec.mlp_hidden_dim, bias=spec.proj_bias)
        self.act = nn.GELU(approximate=spec.gelu)
        self.norm = _norm(spec.mlp_norm, spec.mlp_hidden_dim, spec.norm_eps)
        self.fc2 = nn.Linear(spec.mlp_hidden_dim, spec.embed_dim, bias=spec.proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        dim, eps = spec.embed_dim, spec.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(spec)
        self.ls1 = LayerScale(dim) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(spec)
        self.ls2 = LayerScale(dim) if spec.layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches → ``[B, h, w, D]`` tokens (channels last, as the student adds positions)."""

    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        p = spec.patch_size
        self.proj = nn.Conv2d(3, spec.embed_dim, kernel_size=p, stride=p, bias=spec.patch_bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).permute(0, 2, 3, 1)


class ViTTrunk(nn.Module):
    """Patch embedding, optional pre-norm, blocks and final norm; state-dict names are timm's."""

    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.norm_pre = _norm(spec.pre_norm, spec.embed_dim, spec.norm_eps)
        self.blocks = nn.Sequential(*[Block(spec) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)


def _layer_norm(module: nn.Module, where: str, problems: list[str]) -> tuple[bool, float | None]:
    """(whether ``module`` is a LayerNorm, its eps); anything but LayerNorm or Identity is a problem."""
    if type(module).__name__ == "Identity":
        return False, None
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.bias is not None:
        return True, float(module.eps)
    problems.append(f"{where} is {type(module).__name__}")
    return False, None


def _block_spec(block: nn.Module, i: int, problems: list[str]) -> dict[str, Any]:
    """The options of one timm ``Block``, noting what the plain trunk cannot rebuild."""
    where = f"blocks.{i}"
    names = {"block": type(block).__name__}
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    names |= {"attn": type(attn).__name__, "mlp": type(mlp).__name__}
    if names != {"block": "Block", "attn": "Attention", "mlp": "Mlp"}:
        problems.append(f"{where} is {names} (supported: timm's Block with Attention and Mlp)")
        return {}
    if getattr(attn, "gate", None) is not None:
        problems.append(f"{where}.attn is gated")
    # torch's GELU, and timm's GELU / GELUTanh (the same functions as modules of their own)
    gelu = {"GELU": getattr(mlp.act, "approximate", "none"), "GELUTanh": "tanh"}.get(type(mlp.act).__name__)
    if gelu is None:
        problems.append(f"{where}.mlp.act is {type(mlp.act).__name__} (supported: GELU)")
    eps = set()
    for name in ("norm1", "norm2"):
        on, e = _layer_norm(getattr(block, name), f"{where}.{name}", problems)
        if not on:
            problems.append(f"{where}.{name} is not a LayerNorm")
        eps.add(e)
    qk, e_q = _layer_norm(attn.q_norm, f"{where}.attn.q_norm", problems)
    attn_norm, e_a = _layer_norm(attn.norm, f"{where}.attn.norm", problems)
    mlp_norm, e_m = _layer_norm(mlp.norm, f"{where}.mlp.norm", problems)
    eps |= {e for e in (e_q, e_a, e_m) if e is not None}
    if len(eps - {None}) > 1:
        problems.append(f"{where} mixes LayerNorm eps values {sorted(eps - {None})}")
    ls = [type(getattr(block, n)).__name__ for n in ("ls1", "ls2")]
    if set(ls) - {"Identity", "LayerScale"} or len(set(ls)) > 1:
        problems.append(f"{where} layer scales are {ls}")
    return {
        "num_heads": int(attn.num_heads),
        "head_dim": int(attn.head_dim),
        "mlp_hidden_dim": int(mlp.fc1.out_features),
        "qkv_bias": attn.qkv.bias is not None,
        "proj_bias": attn.proj.bias is not None,
        "qk_norm": qk,
        "attn_norm": attn_norm,
        "mlp_norm": mlp_norm,
        "layer_scale": ls[0] == "LayerScale",
        "norm_eps": next(iter(eps - {None})),
        "gelu": gelu or "none",
    }


def describe_trunk(trunk: nn.Module) -> TrunkSpec:
    """The ``TrunkSpec`` of a timm VisionTransformer trunk; a ValueError names every part the plain
    trunk does not rebuild."""
    problems: list[str] = []
    pe = trunk.patch_embed
    proj = pe.proj
    p = proj.kernel_size[0]
    if type(pe.norm).__name__ != "Identity" or getattr(pe, "dynamic_img_pad", False):
        problems.append("the patch embedding normalizes or pads its input")
    if tuple(proj.kernel_size) != (p, p) or tuple(proj.stride) != (p, p) or tuple(proj.padding) != (0, 0):
        problems.append(f"the patch projection is not a {p}x{p} stride-{p} convolution")
    pre, e_pre = _layer_norm(trunk.norm_pre, "norm_pre", problems)
    final, e_final = _layer_norm(trunk.norm, "norm", problems)
    if not final:
        problems.append("the trunk has no final LayerNorm")
    blocks = [_block_spec(b, i, problems) for i, b in enumerate(trunk.blocks)]
    if blocks and any(b != blocks[0] for b in blocks):
        problems.append("the blocks differ from each other")
    eps = {e for e in (e_pre, e_final, blocks[0].get("norm_eps") if blocks else None) if e is not None}
    if len(eps) > 1:
        problems.append(f"LayerNorm eps values differ: {sorted(eps)}")
    if not blocks:
        problems.append("the trunk has no blocks")
    if problems:
        raise ValueError(
            "the student trunk cannot be rebuilt without timm: "
            + "; ".join(problems)
            + ". Supported: timm's VisionTransformer with Block/Attention/Mlp, GELU, LayerNorm"
        )
    return TrunkSpec(
        patch_size=int(p),
        embed_dim=int(proj.out_channels),
        depth=len(blocks),
        patch_bias=proj.bias is not None,
        pre_norm=pre,
        **blocks[0],
    )


def spec_differences(a: TrunkSpec, b: TrunkSpec) -> list[str]:
    """``field: a vs b`` for every option in which two trunks differ."""
    return [
        f"{f.name}: {getattr(a, f.name)} vs {getattr(b, f.name)}"
        for f in fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def block_indices(depth: int, indices: int | Iterable[int] | None) -> list[int]:
    """Sorted block indices from ``indices``: None (all), n (the last n) or a list (negatives count from
    the end); out-of-range entries are a ValueError naming the depth."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices}: take the last 1..{depth} blocks")
        return list(range(depth - indices, depth))
    out = []
    for i in indices:
        j = int(i) + depth if int(i) < 0 else int(i)
        if not 0 <= j < depth:
            raise ValueError(f"block index {i} is out of range for a trunk of {depth} blocks")
        out.append(j)
    return sorted(set(out))
