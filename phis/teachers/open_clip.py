"""open_clip teachers (DFN CLIP, OpenAI CLIP, SigLIP): summary = projected image embedding, features =
final patch tokens of the visual trunk before the projection."""

from __future__ import annotations

from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phis.teachers import CLIP_MEAN, CLIP_STD, Teacher, check_local_path, weights_unavailable

# A randomly initialized CLIP ViT of the real architecture, small enough for unit tests.
TINY_EMBED_DIM = 16
TINY_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "width": 32,
    "layers": 2,
    "head_width": 16,
    "mlp_ratio": 2.0,
}
TINY_TEXT = {
    "context_length": 16,
    "vocab_size": 49408,
    "width": 32,
    "heads": 2,
    "layers": 1,
    "mlp_ratio": 2.0,
}


def _text_projection_dim(clip: nn.Module) -> int:
    """Joint embedding width, read off the text projection (both towers project to it)."""
    proj = clip.text_projection if hasattr(clip, "text_projection") else clip.text.text_projection
    return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]


def _resolve_weights(
    name: str, model: str, pretrained: str | None, checkpoint: str | None, tag_cfg: dict
) -> str | None:
    """Local weight file for create_model, downloaded from the tag if needed; None when `model` is a
    'local-dir:' / 'hf-hub:' source that carries its own weights."""
    if checkpoint is not None:
        return check_local_path(name, "checkpoint", checkpoint)
    if ":" in model:
        return None
    if pretrained is None:
        raise ValueError(
            f"teacher '{name}': set `pretrained` (an open_clip tag), `checkpoint` (a local file), "
            "a 'local-dir:' model, or `tiny: true`"
        )
    if not tag_cfg:
        raise ValueError(
            f"teacher '{name}': open_clip has no pretrained tag {pretrained!r} for {model!r}; "
            f"tags: {open_clip.list_pretrained_tags_by_model(model)}"
        )
    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # hub and url failures come in many types
        raise weights_unavailable(
            name, f"{model}:{pretrained}", "checkpoint", "/path/to/open_clip_pytorch_model.bin", err
        ) from err


class OpenClipTeacher(Teacher):
    """An open_clip model; `model` is an open_clip name (or 'local-dir:' / 'hf-hub:' source)."""

    has_text = True

    def __init__(
        self,
        name: str = "open_clip",
        model: str = "ViT-B-16",
        pretrained: str | None = None,
        checkpoint: str | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_norm: bool = True,
        tokenizer: str | None = None,
        tiny: bool = False,
        random_init: bool = False,
    ) -> None:
        use_tag = pretrained is not None and not tiny and ":" not in model
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) if use_tag else {}
        if tiny:
            vision = {**TINY_VISION, "image_size": input_size or TINY_VISION["image_size"]}
            clip = open_clip.CLIP(TINY_EMBED_DIM, vision, TINY_TEXT, quick_gelu=True)
        elif random_init:  # the real architecture, untrained: for benchmarks, nothing is downloaded
            clip = open_clip.create_model(model, pretrained=None, force_image_size=input_size)
        else:
            weights = _resolve_weights(name, model, pretrained, checkpoint, tag_cfg)
            try:
                clip = open_clip.create_model(model, pretrained=weights, force_image_size=input_size)
            except RuntimeError as err:
                if model.startswith("hf-hub:"):  # config and weights are fetched inside create_model
                    raise weights_unavailable(
                        name, model, "model", "local-dir:/path/to/model_dir", err
                    ) from err
                raise
        visual = clip.visual
        native = visual.image_size[0] if isinstance(visual.image_size, Sequence) else visual.image_size
        super().__init__(
            name,
            input_size or native,
            mean or tag_cfg.get("mean", CLIP_MEAN),
            std or tag_cfg.get("std", CLIP_STD),
        )
        self.model = clip
        self.feature_norm = feature_norm
        self._tokenizer_source = None if tiny else (tokenizer or model)
        self._tokenizer = (
            open_clip.SimpleTokenizer(context_length=TINY_TEXT["context_length"]) if tiny else None
        )
        if hasattr(visual, "trunk"):  # timm trunk (SigLIP)
            self.feature_dim = visual.trunk.num_features
            self.patch_size = visual.trunk.patch_embed.patch_size[0]
        else:
            self.feature_dim = visual.transformer.width
            self.patch_size = visual.patch_size[0]
        self.summary_dim = _text_projection_dim(clip)
        self.grid = self.input_size // self.patch_size
        self._freeze()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.visual.forward_intermediates(
            x, indices=1, normalize_intermediates=self.feature_norm, output_fmt="NCHW"
        )
        return out["image_features"], out["image_intermediates"][0]  # [B, Cs], [B, C, h, w]

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """texts -> token ids [N, context_length]; the tokenizer is built on first use."""
        if self._tokenizer is None:
            try:
                self._tokenizer = open_clip.get_tokenizer(self._tokenizer_source)
            except Exception as err:  # hub tokenizers fail offline with various error types
                raise weights_unavailable(
                    self.name,
                    self._tokenizer_source,
                    "tokenizer",
                    "local-dir:/path/to/model_dir",
                    err,
                    kind="tokenizer files",
                ) from err
        return self._tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """texts -> L2-normalized text embeddings [N, Cs] from the model's own text tower."""
        tokens = self.tokenize(texts).to(self.mean.device)
        with torch.no_grad():
            return F.normalize(self.model.encode_text(tokens), dim=-1)
