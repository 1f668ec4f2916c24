"""transformers teachers: CLIP (CLIPModel), SigLIP (SiglipModel) and DINOv2 with registers
(Dinov2WithRegistersModel). Features are the patch tokens only (CLS and registers dropped)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
)

from phis.teachers import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Teacher,
    check_local_path,
    hub_offline,
    tokens_to_map,
    weights_unavailable,
)

# Tiny random configs of the real architectures (unit tests); widths are Hadamard orders.
_TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 127,
}


# Hub configs of DINOv2 models, for random initialization without the hub (benchmarks).
DINOV2_ARCHITECTURES: dict[str, dict] = {
    "facebook/dinov2-with-registers-giant": {
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "mlp_ratio": 4,
        "use_swiglu_ffn": True,
        "patch_size": 14,
        "image_size": 518,
        "num_register_tokens": 4,
    },
}


def _load(cls, name: str, model: str, checkpoint: str | None):
    """from_pretrained from `checkpoint` (a local snapshot folder) or the hub id `model`, failing at once
    when offline and not cached."""
    source = check_local_path(name, "checkpoint", checkpoint) if checkpoint else model
    try:
        return cls.from_pretrained(source, local_files_only=hub_offline())
    except OSError as err:
        raise weights_unavailable(name, model, "checkpoint", "/path/to/snapshot_folder", err) from err


def char_tokens(texts: Sequence[str], context_length: int, vocab_size: int) -> dict[str, Tensor]:
    """Character-level ids for the tiny random text towers: [bos, chars..., eos, pad...]."""
    bos, eos, pad = 1, vocab_size - 1, 0
    ids = torch.full((len(texts), context_length), pad, dtype=torch.long)
    for i, text in enumerate(texts):
        chars = [2 + ord(c) % (vocab_size - 3) for c in text][: context_length - 2]
        row = [bos, *chars, eos]
        ids[i, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "attention_mask": (ids != pad).long()}


class _HFImageTextTeacher(Teacher):
    """Shared loading and text encoding for CLIP and SigLIP."""

    has_text = True
    _model_cls: type
    _config_cls: type
    _default_mean: tuple[float, float, float]
    _default_std: tuple[float, float, float]
    _use_attention_mask: bool

    def __init__(
        self,
        name: str,
        model: str,
        checkpoint: str | None,
        input_size: int | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        tiny: bool,
    ) -> None:
        if tiny:
            net = self._model_cls(
                self._config_cls(text_config=_TINY_TEXT, vision_config=_TINY_VISION, projection_dim=16)
            )
        else:
            net = _load(self._model_cls, name, model, checkpoint)
        vcfg = net.config.vision_config
        super().__init__(
            name, input_size or vcfg.image_size, mean or self._default_mean, std or self._default_std
        )
        self.model = net
        self.interpolate = self.input_size != vcfg.image_size
        self.patch_size = vcfg.patch_size
        self.grid = self.input_size // self.patch_size
        self.feature_dim = vcfg.hidden_size
        self.context_length = net.config.text_config.max_position_embeddings
        self._tiny = tiny
        self._tokenizer_source = checkpoint or model
        self._tokenizer = None

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """texts -> model inputs padded to the context length; the tokenizer is built on first use."""
        if self._tiny:
            return char_tokens(texts, self.context_length, self.model.config.text_config.vocab_size)
        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self._tokenizer_source, local_files_only=hub_offline()
                )
            except OSError as err:
                raise weights_unavailable(
                    self.name,
                    self._tokenizer_source,
                    "checkpoint",
                    "/path/to/snapshot_folder",
                    err,
                    kind="tokenizer files",
                ) from err
        return self._tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
            return_attention_mask=self._use_attention_mask,
        )

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """texts -> L2-normalized text embeddings [N, Cs] from the model's own text tower."""
        inputs = {k: v.to(self.mean.device) for k, v in self.tokenize(texts).items()}
        if not self._use_attention_mask:
            inputs.pop("attention_mask", None)
        with torch.no_grad():
            return F.normalize(self.model.get_text_features(**inputs).pooler_output, dim=-1)


class HFClipTeacher(_HFImageTextTeacher):
    """transformers CLIP: summary = projected image embedding, features = patch tokens (post-LN if
    feature_norm)."""

    _model_cls = CLIPModel
    _config_cls = CLIPConfig
    _default_mean = CLIP_MEAN
    _default_std = CLIP_STD
    _use_attention_mask = True

    def __init__(
        self,
        name: str = "hf_clip",
        model: str = "openai/clip-vit-large-patch14-336",
        checkpoint: str | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_norm: bool = True,
        tiny: bool = False,
    ) -> None:
        super().__init__(name, model, checkpoint, input_size, mean, std, tiny)
        self.feature_norm = feature_norm
        self.summary_dim = self.model.config.projection_dim
        self._freeze()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.get_image_features(pixel_values=x, interpolate_pos_encoding=self.interpolate)
        tokens = out.last_hidden_state[:, 1:]  # [B, h*w, C], CLS dropped
        if self.feature_norm:
            tokens = self.model.vision_model.post_layernorm(tokens)
        return out.pooler_output, tokens_to_map(tokens, (self.grid, self.grid))


class HFSiglipTeacher(_HFImageTextTeacher):
    """transformers SigLIP: summary = attention-pool output, features = post-LN patch tokens."""

    _model_cls = SiglipModel
    _config_cls = SiglipConfig
    _default_mean = (0.5, 0.5, 0.5)
    _default_std = (0.5, 0.5, 0.5)
    _use_attention_mask = False  # SigLIP's text tower was trained on max-length padding without a mask

    def __init__(
        self,
        name: str = "hf_siglip",
        model: str = "google/siglip-so400m-patch14-384",
        checkpoint: str | None = None,
        input_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        tiny: bool = False,
    ) -> None:
        super().__init__(name, model, checkpoint, input_size, mean, std, tiny)
        self.summary_dim = self.feature_dim
        self._freeze()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.get_image_features(pixel_values=x, interpolate_pos_encoding=self.interpolate)
        return out.pooler_output, tokens_to_map(out.last_hidden_state, (self.grid, self.grid))


class HFDinov2Teacher(Teacher):
    """transformers DINOv2 with registers: summary = CLS token, features = patch tokens (registers
    dropped), both after the final LayerNorm."""

    def __init__(
        self,
        name: str = "hf_dinov2",
        model: str = "facebook/dinov2-with-registers-giant",
        checkpoint: str | None = None,
        input_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        tiny: bool = False,
        random_init: bool = False,
    ) -> None:
        if random_init:  # the real architecture, untrained: for benchmarks, nothing is downloaded
            if model not in DINOV2_ARCHITECTURES:
                raise ValueError(
                    f"teacher '{name}': random_init knows the architectures {sorted(DINOV2_ARCHITECTURES)}, "
                    f"not {model!r}"
                )
            net = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINOV2_ARCHITECTURES[model]))
        elif tiny:
            cfg = Dinov2WithRegistersConfig(
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=input_size,
                patch_size=8,
                num_register_tokens=2,
            )
            net = Dinov2WithRegistersModel(cfg)
        else:
            net = _load(Dinov2WithRegistersModel, name, model, checkpoint)
        super().__init__(name, input_size, mean, std)
        self.model = net
        self.patch_size = net.config.patch_size
        self.grid = self.input_size // self.patch_size
        self.feature_dim = self.summary_dim = net.config.hidden_size
        self.num_prefix = 1 + net.config.num_register_tokens
        self._freeze()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model(pixel_values=x).last_hidden_state  # [B, 1 + R + h*w, C]
        return hidden[:, 0], tokens_to_map(hidden[:, self.num_prefix :], (self.grid, self.grid))
