"""Any timm model as a teacher. ViTs: summary = the model's own pooled pre-logits, features = patch tokens
of a block (prefix tokens split off). CNNs: summary = global-pooled final features, features = a stage
output or the final map."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from torch import Tensor

from phis.teachers import Teacher, check_local_path, hub_offline, tokens_to_map, weights_unavailable


def _cached_weights(name: str, model: str) -> str:
    """Local file of timm's pretrained weights for `model`, from the HF hub cache or torch's hub
    checkpoint folder (offline mode)."""
    cfg = timm.models.get_pretrained_cfg(model)
    repo = getattr(cfg, "hf_hub_id", None)
    if repo:
        names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
        for filename in filter(None, names):
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return path
    url = getattr(cfg, "url", None)
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if os.path.isfile(path):
            return path
    raise weights_unavailable(name, model, "checkpoint", "/path/to/model.safetensors")


class TimmTeacher(Teacher):
    """A timm model. `feature_tap`: 'head' (final map / final normed patch tokens) or an index into the
    model's `forward_intermediates` (blocks for ViTs, stages for CNNs; negative counts from the end);
    `feature_norm` applies a ViT's final norm to such an intermediate tap. A ViT run off its native
    size needs `model_kwargs: {img_size: ...}` (timm resamples the position embedding on load)."""

    def __init__(
        self,
        name: str = "timm",
        model: str = "vit_base_patch16_224",
        pretrained: bool = False,
        checkpoint: str | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_tap: str | int = "head",
        feature_norm: bool = True,
        model_kwargs: Mapping | None = None,
    ) -> None:
        if feature_tap != "head" and not isinstance(feature_tap, int):
            raise ValueError(f"teacher '{name}': feature_tap {feature_tap!r}; use 'head' or a layer index")
        kwargs = dict(model_kwargs or {})
        if checkpoint is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": check_local_path(name, "checkpoint", checkpoint)}
        elif pretrained and hub_offline():
            # timm would first initialize the whole model, then fail on the hub: look before building.
            kwargs["pretrained_cfg_overlay"] = {"file": _cached_weights(name, model)}
        try:
            net = timm.create_model(model, pretrained=pretrained or checkpoint is not None, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"teacher '{name}': {err}") from err
            raise
        cfg = net.pretrained_cfg
        patch_embed = getattr(net, "patch_embed", None)
        native = patch_embed.img_size[0] if patch_embed is not None else cfg["input_size"][-1]
        super().__init__(name, input_size or native, mean or cfg["mean"], std or cfg["std"])
        self.model = net
        self.feature_tap = feature_tap
        self.feature_norm = feature_norm
        self.num_prefix = getattr(net, "num_prefix_tokens", 0)
        info = net.feature_info
        if feature_tap != "head" and not -len(info) <= feature_tap < len(info):
            raise ValueError(
                f"teacher '{name}': feature_tap {feature_tap} out of range for {model}; "
                f"use 'head' or an index in [{-len(info)}, {len(info) - 1}]"
            )
        self.patch_size = info[-1 if feature_tap == "head" else feature_tap]["reduction"]
        self._freeze()
        self._probe()

    def _final_map(self, final: Tensor) -> Tensor:
        if final.ndim == 4:
            return final
        side = self.input_size // self.patch_size
        return tokens_to_map(final[:, self.num_prefix :], (side, side))  # [B, N, C] tokens of a ViT

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.feature_tap == "head":
            final = self.model.forward_features(x)
            feats = self._final_map(final)
        else:
            final, inter = self.model.forward_intermediates(
                x, indices=[self.feature_tap], norm=self.feature_norm
            )
            feats = inter[0]  # [B, C, h, w]
        return self.model.forward_head(final, pre_logits=True), feats  # [B, Cs], [B, C, h, w]

    def classify_summary(self, summary: Tensor) -> Tensor:
        """summary: [B, Cs] -> logits [B, num_classes] through the model's own classifier."""
        if self.model.num_classes == 0:
            raise ValueError(
                f"teacher '{self.name}': {self.model.default_cfg['architecture']} has no classifier head"
            )
        return self.model.get_classifier()(summary)
