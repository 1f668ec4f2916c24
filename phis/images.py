"""Image files: which suffixes count as images, listing them (training folders, shard held-out folders and
labelled evaluation folders all read images through here), and decoding one to the size it is used at.

Decoding has two modes (``DECODE_MODES``). ``exact``: full decode, one bicubic resize of the whole image
(short side to the target size), centre crop. ``reduced``: the JPEG decoder first scales by 1/2, 1/4
or 1/8 in the DCT (``PIL.Image.draft``), at the smallest such scale whose pixels still cover the resized
image, then one bicubic resize maps the crop's box in those pixels to the target. The decoder does a
fraction of the work; the pixels are 0.44/255 from the exact ones on average at 256 px
(experiments/results/bench_data.md). Other formats (PNG, WebP) have no scaled decoding: they decode in
full, and in reduced mode only the crop's box is resized.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DECODE_MODES = ("reduced", "exact")


def is_image(path: Path) -> bool:
    """True for a file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files of ``folder`` (and its subfolders if ``recursive``), sorted by path."""
    return sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if is_image(p))


def check_decode(decode: str) -> str:
    """``decode`` itself if it names a decode mode; a ValueError naming the choices otherwise."""
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE_MODES)}")
    return decode


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) of a ``width`` x ``height`` image whose short side is resized to ``size``."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def open_rgb(
    fp: str | Path | IO[bytes], size: int, decode: str = "reduced"
) -> tuple[Image.Image, tuple[int, int], tuple[float, float]]:
    """An image file as a loaded RGB image that will be resized to short side ``size``; also its size on
    disk (width, height) and the extent (width, height) that spans in the returned pixels (the decoder
    pads a side its scale does not divide to whole pixels, so the extent may be less than the image)."""
    check_decode(decode)
    with Image.open(fp) as im:
        width, height = im.size
        extent = (float(width), float(height))
        if decode == "reduced" and (drafted := im.draft("RGB", resized_size(width, height, size))):
            extent = (float(drafted[1][2]), float(drafted[1][3]))
        im.load()
    return (im if im.mode == "RGB" else im.convert("RGB")), (width, height), extent


def decode_crop(
    fp: str | Path | IO[bytes],
    size: int,
    decode: str = "reduced",
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Tensor:
    """An image file as uint8 ``[3, S, S]``: short side resized to ``size`` (``resample``, bicubic by
    default), centre square kept.

    ``exact`` resizes the whole image and crops; ``reduced`` resizes only the crop's box of the
    decoder-scaled pixels (the same sampling positions, a fraction of the work).
    """
    image, (width, height), extent = open_rgb(fp, size, decode)
    w, h = resized_size(width, height, size)
    left, top = (w - size) // 2, (h - size) // 2
    if decode == "exact":
        crop = image.resize((w, h), resample).crop((left, top, left + size, top + size))
    else:
        sx, sy = extent[0] / w, extent[1] / h
        source = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        crop = image.resize((size, size), resample, box=source)
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_jpegs(
    encoded: Sequence[bytes], size: int, device: str | torch.device = "cuda"
) -> list[Tensor | Exception]:
    """JPEG files decoded on ``device`` (nvJPEG on CUDA), each as uint8 ``[3, S, S]`` there: short side
    resized to ``size`` (bicubic, antialiased), centre square kept; an undecodable one gives its error."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    try:
        decoded: list[Tensor | Exception] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole batched call: decode one by one to find it
        decoded = []
        for d in data:
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                decoded.append(err)
    return [
        img if isinstance(img, Exception) else resize_crop(img, size).round().clamp(0, 255).to(torch.uint8)
        for img in decoded
    ]


def resize_crop(image: Tensor, size: int, mode: str = "bicubic") -> Tensor:
    """``image: [C, H, W]`` resized on its device so the shorter side is ``size``, centre square kept, as
    float: ``nearest`` (label masks) or antialiased ``bilinear`` / ``bicubic`` (torch's antialiased
    filters use PIL's kernels, bicubic's a = -0.5, with pixel-centre alignment)."""
    _, h, w = image.shape
    nw, nh = resized_size(w, h, size)
    if mode == "nearest":
        out = F.interpolate(image[None].float(), size=(nh, nw), mode="nearest")[0]
    else:
        out = F.interpolate(
            image[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False
        )[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top : top + size, left : left + size]
