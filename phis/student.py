"""The multi-teacher student: a timm ViT trunk with one summary token per teacher, registers and heads.

Token layout (AM-RADIO): ``[summary_0 … summary_{T-1}, register_0 … register_{R-1}, patch tokens]``.
The timm trunk is built with no class token, no registers and no position table (``pos_embed='none'``);
this module owns those tokens and the position table and runs timm's patch embedding, blocks and final
norm itself, so the number of summary tokens and the position-embedding policy are free. Teacher ``t``
(in configuration order) reads summary token ``t``; every teacher gets one, including teachers without a
summary output (SAM), whose token is simply not supervised. The trunk summary used for probes is
summary token 0 (the first teacher's, a CLIP model in the paper-scale sets, as RADIO exposes).

Initial weights (``pretrained``): random, timm's hub weights of ``model``, or a local timm/ImageNet file.
What applies is mapped into the trunk (patch embedding, blocks, final norm) and the file's position
embedding is resampled into the table (with CPE, the 14×14 ImageNet table becomes the large CPE table);
the class token, the classifier and the summary/register tokens are not loaded. Loading happens when a
run starts fresh (``load_pretrained``), never when a checkpoint is restored. With ``spectral_reparam``
every linear layer of the trunk is spectrally reparametrized (``phis.spectral``); the heads stay plain
so that a normalizer can be folded into their last layer.

Position embeddings are learned on a ``[G, G]`` table. Without CPE, G = img_size / patch and other
grids resample the table bilinearly. With CPE (cropped position embedding), G is larger
(``cpe_max_size / patch``); training uses a random ``[h, w]`` window per sample, evaluation the centre
window, so the student sees a consistent embedding at every resolution up to ``cpe_max_size``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phis.adaptors import MLP2
from phis.spectral import apply_spectral_reparam, reset_spectral_reparams
from phis.teachers import WeightsUnavailableError, hub_offline

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")

log = logging.getLogger(__name__)


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
        pretrained: bool | str | None = False,
        spectral_reparam: bool = False,
    ) -> None:
        super().__init__()
        if not (pretrained is None or isinstance(pretrained, (bool, str))):
            raise ValueError(
                f"student.pretrained={pretrained!r}; use false, true (timm's hub weights of {model!r}) "
                "or the path of a local weight file"
            )
        if not teachers:
            raise ValueError("MultiTeacherViT needs at least one teacher")
        for name in teachers:
            if not name.isidentifier():
                raise ValueError(f"teacher name {name!r} must be a Python identifier (used as a module key)")
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        self.teacher_names = list(teachers)
        self.model_name = model
        self.trunk_kwargs = dict(trunk_kwargs or {})
        self.pretrained = pretrained or False
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
        if spectral_reparam:
            apply_spectral_reparam(self.trunk)

    def load_pretrained(self) -> dict[str, Any]:
        """Load ``self.pretrained`` into the trunk and position table; returns (and logs) what was loaded
        and what was not. A no-op without ``pretrained``."""
        if not self.pretrained:
            return {}
        state = timm_weights(self.model_name, self.pretrained, self.trunk_kwargs)
        target = self.trunk.state_dict()
        mapped: dict[str, Tensor] = {}
        unused, mismatched = [], []
        for key, value in state.items():
            # A spectrally reparametrized weight lives at <layer>.parametrizations.weight.original.
            dest = key if key in target else key.replace(".weight", ".parametrizations.weight.original")
            if key == "pos_embed" or dest not in target:
                unused.append(key)
            elif target[dest].shape != value.shape:
                mismatched.append(f"{key} {tuple(value.shape)} (trunk: {tuple(target[dest].shape)})")
            else:
                mapped[dest] = value
        source = "hub" if self.pretrained is True else self.pretrained
        if mismatched or not any(k.startswith("blocks.") for k in mapped):
            raise ValueError(
                f"student.pretrained={source!r} does not fit the trunk {self.model_name!r} "
                f"(trunk_kwargs={self.trunk_kwargs}): mismatched shapes {mismatched or 'none'}, "
                f"{sum(k.startswith('blocks.') for k in mapped)} block tensors matched"
            )
        self.trunk.load_state_dict(mapped, strict=False)
        reset_spectral_reparams(self.trunk)
        if "pos_embed" in state:
            with torch.no_grad():
                self.pos_table.copy_(resample_position_grid(position_grid(state), self.pos_table.shape[1]))
            unused.remove("pos_embed")
        derived = ".parametrizations.weight.0."  # spectral-norm vectors and scales, set from the weights
        not_loaded = [k for k in target if k not in mapped and derived not in k] + ["prefix"]
        if "pos_embed" not in state:
            not_loaded.append("pos_table")
        report = {"source": source, "loaded": len(mapped), "not_loaded": not_loaded, "unused": unused}
        log.info(
            "student initialized from %s: %d trunk tensors and %s; not loaded: %s; unused in the file: %s",
            source,
            len(mapped),
            "the position table" if "pos_embed" in state else "no position table",
            ", ".join(not_loaded),
            ", ".join(unused) or "none",
        )
        return report

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


def check_pretrained(model: str, pretrained: bool | str | None) -> None:
    """Fail at once when the student's initial weights cannot be had (before any teacher is built)."""
    if not pretrained:
        return
    if pretrained is True:
        if hub_offline():
            raise WeightsUnavailableError(
                f"student.pretrained=true downloads timm's {model!r} weights, but the hub is switched off "
                "(HF_HUB_OFFLINE); download them on a machine with network and set "
                "student.pretrained=/path/to/model.safetensors (or PHIS_STUDENT_WEIGHTS=...), or "
                "student.pretrained=false"
            )
        return
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f"student.pretrained={pretrained!r} does not exist")
    if not pretrained.endswith(WEIGHT_FILE_SUFFIXES):
        raise ValueError(
            f"student.pretrained={pretrained!r}: not a weight file timm reads; use one of "
            f"{', '.join(WEIGHT_FILE_SUFFIXES)}"
        )


def timm_weights(model: str, pretrained: bool | str, trunk_kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """State dict of timm's VisionTransformer ``model``: its hub weights (True) or a local file."""
    check_pretrained(model, pretrained)
    if pretrained is True:
        try:
            return timm.create_model(model, pretrained=True, **trunk_kwargs).state_dict()
        except Exception as err:  # hub failures come in many types
            raise WeightsUnavailableError(
                f"student.pretrained=true: timm's {model!r} weights could not be downloaded ({err}); set "
                "student.pretrained=/path/to/model.safetensors"
            ) from err
    if pretrained.endswith(".npz"):
        # Google's JAX checkpoints: timm's own reader maps them into its VisionTransformer.
        ref = timm.create_model(model, pretrained=False, **trunk_kwargs)
        ref.load_pretrained(pretrained)
        return ref.state_dict()
    return timm.models.load_state_dict(pretrained)


def position_grid(state: Mapping[str, Tensor]) -> Tensor:
    """The patch part of a timm ``pos_embed`` ``[1, P + g*g, D]`` as ``[1, g, g, D]`` (P: class/register
    positions, absent when the model does not embed them)."""
    pos = state["pos_embed"]
    prefix = int("cls_token" in state) + (state["reg_tokens"].shape[1] if "reg_tokens" in state else 0)
    n = pos.shape[1]
    for p in (prefix, 0):
        g = math.isqrt(n - p)
        if g * g == n - p:
            return pos[:, p:].reshape(1, g, g, pos.shape[2])
    raise ValueError(f"pos_embed with {n} positions is not {prefix} prefix positions plus a square grid")


def resample_position_grid(grid: Tensor, size: int) -> Tensor:
    """``[1, g, g, D]`` → ``[1, size, size, D]``, bicubic and antialiased as timm resamples its tables."""
    if grid.shape[1] == size:
        return grid
    out = F.interpolate(
        grid.permute(0, 3, 1, 2).float(),
        size=(size, size),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    return out.permute(0, 2, 3, 1).to(grid.dtype)
