"""Frozen teacher models: one interface over open_clip, transformers, segment-anything, timm and the
offline EfficientNet-Lite weights, so distillation code never sees a library's own calling convention."""

from __future__ import annotations

import importlib
import inspect
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phis.config import plain

# family -> (module, class); modules are imported on demand so that e.g. transformers is only loaded
# when a transformers teacher is built.
_FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "open_clip": ("phis.teachers.open_clip", "OpenClipTeacher"),
    "hf_clip": ("phis.teachers.hf", "HFClipTeacher"),
    "hf_siglip": ("phis.teachers.hf", "HFSiglipTeacher"),
    "hf_dinov2": ("phis.teachers.hf", "HFDinov2Teacher"),
    "sam": ("phis.teachers.sam", "SamTeacher"),
    "timm": ("phis.teachers.timm", "TimmTeacher"),
    "efficientnet_lite": ("phis.teachers.efficientnet_lite", "EfficientNetLiteTeacher"),
    "stats_matched": ("phis.teachers.matched", "StatsMatchedTeacher"),
}
TEACHER_FAMILIES: tuple[str, ...] = tuple(_FAMILY_CLASSES)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TeacherOutput:
    """What every teacher returns: a summary vector (None for SAM) and a spatial feature map."""

    summary: Tensor | None  # [B, Cs]
    features: Tensor  # [B, Cf, h, w]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found locally or downloaded."""


def hub_offline() -> bool:
    """True when the Hugging Face hub is switched off (no download attempts, no retries)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def weights_unavailable(
    name: str,
    weights: str,
    key: str,
    example: str,
    cause: BaseException | None = None,
    kind: str = "pretrained weights",
) -> WeightsUnavailableError:
    """Error naming the teacher, the missing files and the config key that takes a local path."""
    where = "offline" if hub_offline() else "here"
    msg = (
        f"teacher '{name}': {kind} '{weights}' are not available {where}; download them on a "
        f"machine with network and set teachers.{name}.{key}={example}"
    )
    if cause is not None:
        first_line = (str(cause).splitlines() or [""])[0]
        msg += f" (cause: {type(cause).__name__}: {first_line})"
    return WeightsUnavailableError(msg)


def check_local_path(name: str, key: str, path: str) -> str:
    """Return `path` if it exists, else raise naming the teacher and key that gave it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher '{name}': {key}={path!r} does not exist")
    return path


class Teacher(nn.Module):
    """Frozen vision model: images in [0, 1] -> TeacherOutput at the teacher's own resolution.

    Subclasses build their network, set `summary_dim`, `feature_dim`, `patch_size`, `grid`, call
    `_freeze()` and implement `encode(x)` on already resized and normalized images.
    """

    name: str
    summary_dim: int | None
    feature_dim: int
    input_size: int
    patch_size: int  # feature stride in input pixels
    grid: int  # side of the feature map at input_size
    has_text: bool = False

    def __init__(self, name: str, input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"teacher '{name}': mean/std need 3 RGB values, got mean={mean}, std={std}")
        self.name = name
        self.input_size = int(input_size)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def _probe(self) -> None:
        """Read summary_dim, feature_dim and grid off one blank image: convolution padding rules (e.g.
        TF 'same' rounds 240 / 32 up to 8) make the grid of a CNN tap awkward to predict."""
        blank = torch.zeros(1, 3, self.input_size, self.input_size, dtype=self.mean.dtype)
        with torch.no_grad():
            summary, features = self.encode(blank.to(self.mean.device))
        self.summary_dim = None if summary is None else summary.shape[1]
        self.feature_dim = features.shape[1]
        self.grid = features.shape[-1]

    def spec(self) -> dict[str, object]:
        """What a student and the cache need of this teacher: widths, grid (h, w), input size, stride."""
        return {
            "summary_dim": self.summary_dim,
            "feature_dim": self.feature_dim,
            "grid": (self.grid, self.grid),
            "input_size": self.input_size,
            "patch_size": self.patch_size,
        }

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode even when a parent module switches to training."""
        return super().train(False)

    def preprocess(self, images: Tensor, size: int | None = None) -> Tensor:
        """images: [B, 3, H, W] RGB in [0, 1] -> [B, 3, S, S] resized to ``size`` (default input_size) and
        normalized."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"teacher '{self.name}' expects float images [B, 3, H, W] in [0, 1], "
                f"got {tuple(images.shape)} {images.dtype}"
            )
        x = images.to(self.mean.dtype)
        size = size or self.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std

    def encode(self, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """x: [B, 3, S, S] normalized -> (summary [B, Cs] | None, features [B, Cf, h, w])."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> TeacherOutput:
        with torch.no_grad():
            summary, features = self.encode(self.preprocess(images))
        return TeacherOutput(summary=summary, features=features)


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """tokens: [B, h*w, C] in row-major order -> [B, C, h, w]."""
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(b, c, h, w).contiguous()


def build_teacher(cfg: Mapping) -> Teacher:
    """Build a frozen teacher from a plain config: `family` picks the loader, the other keys go to it."""
    kwargs = dict(plain(cfg))
    family = kwargs.pop("family", None)
    if family not in _FAMILY_CLASSES:
        raise ValueError(f"unknown teacher family {family!r}; choose one of {', '.join(TEACHER_FAMILIES)}")
    module, cls_name = _FAMILY_CLASSES[family]
    cls = getattr(importlib.import_module(module), cls_name)
    kwargs.setdefault("name", family)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"teacher '{kwargs['name']}' ({family}): unknown config keys {unknown}; "
            f"valid keys: family, {', '.join(accepted)}"
        )
    # Weights not loaded from a checkpoint (tiny, random_init, pretrained=false, new heads) are drawn
    # from a seed of the teacher's name: every build (training, a resumed run, the analyses, another
    # process) gets the same teacher, and the caller's random stream is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{family}/{kwargs['name']}".encode()))
        return cls(**kwargs)
