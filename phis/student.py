"""The multi-teacher student: a timm ViT trunk with one summary token per teacher, registers and heads.

Token layout (AM-RADIO): ``[summary_0 … summary_{T-1}, register_0 … register_{R-1}, patch tokens]``.
The timm trunk is built with no class token, no registers and no position table (``pos_embed='none'``);
this module owns those tokens and the position table and runs timm's patch embedding, blocks and final
norm itself, so the number of summary tokens and the position-embedding policy are free. Teacher ``t``
(in configuration order) reads summary token ``t``; every teacher gets one, including teachers without a
summary output (SAM), whose token is simply not supervised. The trunk summary used for probes is
summary token 0 (the first teacher's, a CLIP model in the paper-scale sets, as RADIO exposes).

Position embeddings are learned on a ``[G, G]`` table. Without CPE, G = img_size / patch and other
grids resample the table bilinearly. With CPE (cropped position embedding), G is larger
(``cpe_max_size / patch``); training uses a random ``[h, w]`` window per sample, evaluation the centre
window, so the student sees a consistent embedding at every resolution up to ``cpe_max_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phis.adaptors import MLP2


@dataclass
class StudentOutput:
    """Per-teacher head outputs plus the raw trunk tokens they were computed from."""

    summaries: dict[str, Tensor]  # name → [B, Cs] (teachers with a summary only)
    features: dict[str, Tensor]  # name → [B, h*w, Cf]
    grid: tuple[int, int]  # (h, w) patch grid of the student
    trunk_summary: Tensor  # [B, D]
    trunk_features: Tensor  # [B, h*w, D]


def teacher_spec(summary_dim: int | None, feature_dim: int) -> dict[str, int | None]:
    """The per-teacher facts a student needs (and checkpoints keep): output widths."""
    return {"summary_dim": None if summary_dim is None else int(summary_dim), "feature_dim": int(feature_dim)}


class MultiTeacherViT(nn.Module):
    """ViT trunk + per-teacher summary/feature MLP2 heads; ``teachers`` maps name → teacher_spec."""

    def __init__(
        self,
        teachers: Mapping[str, Mapping[str, Any]],
        model: str = "vit_tiny_patch16_224",
        img_size: int = 64,
        num_registers: int = 4,
        cpe: bool = False,
        cpe_max_size: int | None = None,
        head_hidden_dim: int = 512,
        head_num_inner: int = 0,
        trunk_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("MultiTeacherViT needs at least one teacher")
        for name in teachers:
            if not name.isidentifier():
                raise ValueError(f"teacher name {name!r} must be a Python identifier (used as a module key)")
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        self.teacher_names = list(teachers)
        self.trunk = timm.create_model(
            model,
            pretrained=False,
            num_classes=0,
            global_pool="",
            class_token=False,
            reg_tokens=0,
            pos_embed="none",
            dynamic_img_size=True,
            img_size=img_size,
            **dict(trunk_kwargs or {}),
        )
        if not hasattr(self.trunk, "patch_embed") or not hasattr(self.trunk, "blocks"):
            raise ValueError(f"student model {model!r} is not a timm VisionTransformer")
        dim = self.trunk.embed_dim
        self.embed_dim = dim
        self.patch_size = int(self.trunk.patch_embed.patch_size[0])
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {self.patch_size}")
        self.img_size = img_size
        self.num_summary = len(teachers)
        self.num_registers = num_registers
        self.cpe = cpe
        table_size = img_size
        if cpe:
            table_size = cpe_max_size or 2 * img_size
            if table_size < img_size or table_size % self.patch_size:
                raise ValueError(
                    f"cpe_max_size {table_size} must be >= img_size {img_size} and a multiple of the "
                    f"patch size {self.patch_size}"
                )
        g = table_size // self.patch_size
        self.pos_table = nn.Parameter(torch.empty(1, g, g, dim))
        self.prefix = nn.Parameter(torch.empty(1, self.num_summary + num_registers, dim))
        nn.init.trunc_normal_(self.pos_table, std=0.02)
        nn.init.normal_(self.prefix, std=1e-6)
        cfg = self.trunk.pretrained_cfg
        self.register_buffer("pixel_mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), False)

        self.summary_heads = nn.ModuleDict()
        self.feature_heads = nn.ModuleDict()
        for name, spec in teachers.items():
            if spec.get("summary_dim"):
                self.summary_heads[name] = MLP2(
                    dim, int(spec["summary_dim"]), head_hidden_dim, head_num_inner
                )
            self.feature_heads[name] = MLP2(dim, int(spec["feature_dim"]), head_hidden_dim, head_num_inner)

    @property
    def num_prefix(self) -> int:
        return self.num_summary + self.num_registers

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an input of the given pixel size."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the student patch size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def position_embedding(
        self, batch: int, h: int, w: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Position embeddings ``[B, h, w, D]``: the resampled table, or a CPE window (random in training)."""
        table = self.pos_table  # [1, G, G, D]
        g = table.shape[1]
        if not self.cpe or h > g or w > g:
            if (h, w) != (g, g):
                table = F.interpolate(
                    table.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False
                ).permute(0, 2, 3, 1)
            return table.expand(batch, -1, -1, -1)
        if not self.training:
            top, left = (g - h) // 2, (g - w) // 2
            return table[:, top : top + h, left : left + w].expand(batch, -1, -1, -1)
        dev = table.device
        top = torch.randint(0, g - h + 1, (batch,), generator=generator).to(dev)
        left = torch.randint(0, g - w + 1, (batch,), generator=generator).to(dev)
        rows = top[:, None] + torch.arange(h, device=dev)  # [B, h]
        cols = left[:, None] + torch.arange(w, device=dev)  # [B, w]
        return table[0][rows[:, :, None], cols[:, None, :]]  # [B, h, w, D]

    def forward_trunk(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, tuple]:
        """``images: [B, 3, H, W]`` in [0, 1] → normed tokens ``[B, T + R + h*w, D]`` and the grid (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        h, w = self.grid_for(images.shape[2], images.shape[3])
        x = self.trunk.patch_embed((images - self.pixel_mean) / self.pixel_std)  # [B, h, w, D]
        x = x + self.position_embedding(x.shape[0], h, w, generator)
        x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        x = self.trunk.norm_pre(x)
        x = self.trunk.blocks(x)
        return self.trunk.norm(x), (h, w)

    def heads(self, tokens: Tensor, grid: tuple[int, int]) -> StudentOutput:
        """Apply every teacher's heads to the trunk tokens ``[B, T + R + h*w, D]``."""
        patches = tokens[:, self.num_prefix :]
        summaries = {
            name: self.summary_heads[name](tokens[:, i])
            for i, name in enumerate(self.teacher_names)
            if name in self.summary_heads
        }
        features = {name: head(patches) for name, head in self.feature_heads.items()}
        return StudentOutput(summaries, features, grid, tokens[:, 0], patches)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> StudentOutput:
        """``images: [B, 3, H, W]`` RGB in [0, 1] → per-teacher predictions."""
        tokens, grid = self.forward_trunk(images, generator)
        return self.heads(tokens, grid)
