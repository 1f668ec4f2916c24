"""segment-anything image encoder as a teacher: no summary; features = the ViT trunk tokens before the
256-channel neck (1280-d for ViT-H), or the neck output when `use_neck`.

SAM's encoder only runs at its native size (1024): its absolute and windowed relative position
embeddings are fixed. A smaller image is therefore resized to `image_size`, zero-padded (after
normalization, as SAM itself does) at the bottom/right up to 1024, and the feature map is cropped to
the `image_size / 16` cells that see the image. With `pad_input` an image is padded as it comes, not
resized, whenever it fits (square, a multiple of 16, at most 1024 px): the paper's geometry, where a
256 px student image gives SAM 16x16 features, a 432 px one 27x27 and a 1024 px one 64x64."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import Tensor, nn

from phis.teachers import Teacher, check_local_path, weights_unavailable

# Encoder shapes of segment_anything.build_sam (vit_h / vit_l / vit_b), plus a tiny random one.
VARIANTS = {
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
}
CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
TINY = {
    "img_size": 128,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": (1,),
    "window_size": 4,
    "mlp_ratio": 2.0,
    "out_chans": 16,
}
# SAM's pixel statistics, given on the 0-255 scale in segment_anything.modeling.Sam.
SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class SamTeacher(Teacher):
    """SAM ViT image encoder from a local checkpoint (full SAM or encoder-only state dict)."""

    def __init__(
        self,
        name: str = "sam",
        variant: str = "vit_h",
        checkpoint: str | None = None,
        image_size: int | None = None,
        use_neck: bool = False,
        pad_input: bool = False,
        tiny: bool = False,
        random_init: bool = False,
    ) -> None:
        if tiny:
            dims = dict(TINY)
        elif variant in VARIANTS:
            dims = {
                "img_size": 1024,
                "window_size": 14,
                "mlp_ratio": 4.0,
                "out_chans": 256,
                **VARIANTS[variant],
            }
        else:
            raise ValueError(
                f"teacher '{name}': SAM variant {variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        if not tiny and not random_init and checkpoint is None:
            # SAM weights are not on the hub: there is nothing to download automatically.
            raise weights_unavailable(
                name, f"sam_{variant}", "checkpoint", f"/path/to/{CHECKPOINTS[variant]}"
            )
        encoder_size = dims["img_size"]
        image_size = image_size or encoder_size
        patch = 16
        if image_size > encoder_size or image_size % patch:
            raise ValueError(
                f"teacher '{name}': image_size={image_size} must be a multiple of {patch} and at most the "
                f"encoder size {encoder_size}"
            )
        super().__init__(name, image_size, SAM_MEAN, SAM_STD)
        self.encoder = ImageEncoderViT(
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            **dims,
        )
        if checkpoint is not None:
            state = torch.load(
                check_local_path(name, "checkpoint", checkpoint), map_location="cpu", weights_only=True
            )
            prefix = "image_encoder."
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            self.encoder.load_state_dict(state, strict=True)
        self.encoder_size = encoder_size
        self.use_neck = use_neck
        self.pad_input = pad_input
        self.patch_size = patch
        self.grid = image_size // patch
        self.summary_dim = None
        self.feature_dim = dims["out_chans"] if use_neck else dims["embed_dim"]
        self._freeze()

    def content_size(self, images: Tensor) -> int:
        """Side in pixels of the image inside SAM's padded input: the image's own side with `pad_input`
        when it fits, else `image_size`."""
        h, w = images.shape[-2:]
        fits = h == w and w <= self.encoder_size and w % self.patch_size == 0
        return int(w) if self.pad_input and fits else self.input_size

    def preprocess(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> [B, 3, S, S] normalized, S = content_size (padded in encode)."""
        return super().preprocess(images, self.content_size(images))

    def encode(self, x: Tensor) -> tuple[None, Tensor]:
        """x [B, 3, S, S] normalized -> features [B, C, S/16, S/16] (zero-padded to the encoder size)."""
        enc = self.encoder
        grid = x.shape[-1] // self.patch_size
        pad = self.encoder_size - x.shape[-1]
        x = F.pad(x, (0, pad, 0, pad)) if pad else x
        tokens = enc.patch_embed(x)  # [B, H/16, W/16, C]
        if enc.pos_embed is not None:
            tokens = tokens + enc.pos_embed
        for block in enc.blocks:
            tokens = block(tokens)
        feats = tokens.permute(0, 3, 1, 2)  # [B, C, H/16, W/16]
        if self.use_neck:
            feats = enc.neck(feats)
        return None, feats[:, :, :grid, :grid].contiguous()
