"""Labelled evaluation sets: offline ones built from installed packages, and loaders for users' datasets.

Offline sets (no download; deterministic for a given seed):

- ``digits``: scikit-learn's ``load_digits()`` (1,797 handwritten 8×8 digits, 10 classes), drawn as
  dark ink on white, upsampled bilinearly to the requested size and repeated to RGB. A stratified
  70/30 split (fixed seed) gives train/test. Class names are the number words ("zero" …), so CLIP-type
  zero-shot prompts read "a photo of a seven.".
- ``photos``: square crops of 14 photos shipped with scikit-image, scikit-learn and matplotlib (read
  with ``phis.photos.load_source``), each labelled by its source photo ("cat", "rocket", "brick wall",
  …). Every photo is cut into a 3×3 grid of cells; one cell per row and column (a Latin-square
  pattern) is held out for ``test``, the other six give ``train``, and a crop always lies inside a
  single cell, so train and test pixels never overlap. Crops take 60–100 % of the cell's shorter side
  at a random position (train crops are also flipped at random) and are resized with antialiasing.
  The training pool of ``phis.data`` crops some of the same photos (without labels), so the student
  may have seen these pixels; the labels were never used in training.
- ``collage`` (segmentation): each image is a Voronoi partition into 3–5 regions, every region filled
  with a crop of a different source photo (from the same train/test cells as ``photos``); the mask is
  the source index per pixel. Region shapes are random and unrelated to the content, so the only way
  to label a pixel is to recognise the texture/content around it.

User datasets (lazy loading; images resized so the shorter side is ``size`` and centre-cropped to
``size × size``, masks with nearest-neighbour; JPEGs decoded at a reduced scale unless ``decode="exact"``,
see ``phis.images``):

- ImageNet-style class folders ``root/<class>/<image>`` (classes sorted by folder name; for the
  ImageNet-1k folders this is the standard class-index order, which the classifier-head zero-shot needs).
- ADE20k (SceneParsing): ``root/images/{training,validation}/*.jpg`` and
  ``root/annotations/{training,validation}/*.png``; 150 classes, label 0 ("other") becomes ignore (255)
  and label k becomes class k − 1.
- Pascal VOC 2012: ``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass/<id>.png`` (palette indices;
  255 marks object borders and is ignored) and ``root/ImageSets/Segmentation/{train,val}.txt``; 21 classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from phis.images import IMAGE_EXTENSIONS, check_decode, decode_crop, list_images, resize_crop

IGNORE_INDEX = 255
SPLITS = ("train", "test")
CLASSIFICATION_SETS = ("digits", "photos", "image_folder")
SEGMENTATION_SETS = ("collage", "ade20k", "voc")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
    "tv monitor",
)  # fmt: skip
ADE20K_NUM_CLASSES = 150

# Latin-square test cells of the 3x3 grid: one per row and one per column.
_TEST_CELLS = frozenset({(0, 1), (1, 2), (2, 0)})


# (class name used in prompts, photo in phis.photos.SOURCES); the order fixes the label indices.
PHOTO_SOURCES: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut"),
    ("cat", "chelsea"),
    ("cup of coffee", "coffee"),
    ("rocket", "rocket"),
    ("galaxy", "hubble_deep_field"),
    ("stained tissue", "immunohistochemistry"),
    ("retina", "retina"),
    ("motorcycle", "motorcycle_left"),
    ("brick wall", "brick"),
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("temple", "china"),
    ("flower", "flower"),
    ("woman in uniform", "grace_hopper"),
)
PHOTO_CLASSES = tuple(name for name, _ in PHOTO_SOURCES)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")


def _check_size(size: int) -> None:
    if size < 8:
        raise ValueError(f"image size must be >= 8 pixels, got {size}")


@cache
def _photo(index: int) -> Tensor:
    """Source photo ``index`` as float RGB [3, H, W] in [0, 1]."""
    from phis.photos import load_source

    img = load_source(PHOTO_SOURCES[index][1])  # uint8 [H, W, 3]
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0


def _cells(split: str) -> list[tuple[int, int]]:
    return [(r, c) for r in range(3) for c in range(3) if ((r, c) in _TEST_CELLS) == (split == "test")]


def _photo_crop(photo: Tensor, split: str, size: int, gen: torch.Generator) -> Tensor:
    """A random square crop [3, size, size] lying inside one of the split's grid cells of ``photo``."""
    _, h, w = photo.shape
    cells = _cells(split)
    r, c = cells[int(torch.randint(len(cells), (1,), generator=gen))]
    top, bottom, left, right = r * h // 3, (r + 1) * h // 3, c * w // 3, (c + 1) * w // 3
    short = min(bottom - top, right - left)
    side = max(1, int(short * (0.6 + 0.4 * float(torch.rand((), generator=gen)))))
    y0 = top + int(torch.randint(bottom - top - side + 1, (1,), generator=gen))
    x0 = left + int(torch.randint(right - left - side + 1, (1,), generator=gen))
    crop = photo[None, :, y0 : y0 + side, x0 : x0 + side]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if split == "train" and bool(torch.rand((), generator=gen) < 0.5):
        out = out.flip(-1)  # flip after resizing: flipping the large strided crop is slow
    return out.clamp(0.0, 1.0)


class TensorClassificationSet(Dataset):
    """In-memory labelled images: ``images: [N, 3, S, S]`` in [0, 1], ``labels: [N]`` int64."""

    def __init__(self, name: str, images: Tensor, labels: Tensor, class_names: Sequence[str]) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or len(images) != len(labels):
            raise ValueError(
                f"expected images [N, 3, S, S] and labels [N], got {tuple(images.shape)}, "
                f"{tuple(labels.shape)}"
            )
        self.name, self.images, self.labels = name, images, labels.long()
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


class TensorSegmentationSet(Dataset):
    """In-memory images ``[N, 3, S, S]`` with masks ``[N, S, S]`` int64 (``IGNORE_INDEX`` = unlabelled)."""

    def __init__(self, name: str, images: Tensor, masks: Tensor, class_names: Sequence[str]) -> None:
        if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"expected images [N, 3, S, S] and masks [N, S, S], got {tuple(images.shape)}, "
                f"{tuple(masks.shape)}"
            )
        self.name, self.images, self.masks = name, images, masks.long()
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.masks[i]


def digits_set(
    split: str, size: int = 64, limit: int | None = None, seed: int = 0
) -> TensorClassificationSet:
    """scikit-learn digits as dark-on-white RGB images (stratified 70/30 split, optional per-split cap)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_split(split)
    _check_size(size)
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(idx, test_size=0.3, stratify=digits.target, random_state=seed)
    chosen = np.sort(train_idx if split == "train" else test_idx)[:limit]
    ink = torch.from_numpy(digits.images[chosen]).float() / 16.0  # [N, 8, 8], 16 is full ink
    img = F.interpolate((1.0 - ink)[:, None], size=(size, size), mode="bilinear", align_corners=False)
    images = img.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target[chosen]).long()
    return TensorClassificationSet("digits", images, labels, DIGIT_NAMES)


def photo_crops_set(
    split: str, size: int = 64, per_class: int | None = None, seed: int = 0
) -> TensorClassificationSet:
    """Crops labelled by source photo, train and test from disjoint grid cells (see module docstring)."""
    _check_split(split)
    _check_size(size)
    per_class = per_class or (40 if split == "train" else 20)
    gen = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    images, labels = [], []
    for k in range(len(PHOTO_SOURCES)):
        photo = _photo(k)
        images += [_photo_crop(photo, split, size, gen) for _ in range(per_class)]
        labels += [k] * per_class
    return TensorClassificationSet("photos", torch.stack(images), torch.tensor(labels), PHOTO_CLASSES)


def collage_set(split: str, size: int = 64, count: int | None = None, seed: int = 0) -> TensorSegmentationSet:
    """Voronoi collages of 3–5 photo crops; the mask labels every pixel with its source photo."""
    _check_split(split)
    _check_size(size)
    count = count or (64 if split == "train" else 32)
    gen = torch.Generator().manual_seed(1000 + seed * 2 + (split == "test"))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pix = torch.stack([yy, xx], -1).reshape(-1, 2).float() + 0.5  # [S*S, 2] pixel centres
    images, masks = [], []
    for _ in range(count):
        n = int(torch.randint(3, 6, (1,), generator=gen))
        sources = torch.randperm(len(PHOTO_SOURCES), generator=gen)[:n]
        seeds = torch.rand(n, 2, generator=gen) * size
        region = (
            (pix[:, None] - seeds[None]).pow(2).sum(-1).argmin(dim=1).reshape(size, size)
        )  # [S, S] region
        img = torch.zeros(3, size, size)
        for j, src in enumerate(sources.tolist()):
            img = torch.where(region == j, _photo_crop(_photo(src), split, size, gen), img)
        images.append(img)
        masks.append(sources[region])
    return TensorSegmentationSet("collage", torch.stack(images), torch.stack(masks), PHOTO_CLASSES)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory {path} does not exist")
    return path


def _load_rgb(path: Path, size: int, decode: str) -> Tensor:
    """An image as float ``[3, S, S]`` in [0, 1]: exact, an antialiased bilinear resize of the full decode
    in float; reduced, ``phis.images.decode_crop``'s reduced path with the same (PIL's) filter."""
    if decode == "reduced":
        return decode_crop(path, size, decode, Image.Resampling.BILINEAR).float() / 255.0
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    return resize_crop(img, size, "bilinear").clamp(0.0, 1.0)


def _load_mask(path: Path, size: int) -> Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im)  # palette PNGs give indices, label PNGs give values
    if arr.ndim != 2:
        raise ValueError(f"segmentation mask {path} has shape {arr.shape}; expected a single-channel PNG")
    return resize_crop(torch.from_numpy(arr.astype(np.int64))[None], size, "nearest")[0].long()


class ImageFolderSet(Dataset):
    """ImageNet-style ``root/<class>/<image>`` folders; label = index of the class folder in sorted order.

    ``limit`` keeps that many evenly spaced images of the class-sorted list; ``decode``: one of
    ``phis.images.DECODE_MODES``.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 224,
        class_names: Sequence[str] | None = None,
        limit: int | None = None,
        decode: str = "reduced",
    ) -> None:
        _check_size(size)
        self.decode = check_decode(decode)
        self.root = _require_dir(Path(root), "image-folder dataset")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise FileNotFoundError(f"image-folder dataset: no class sub-folders in {self.root}")
        if class_names is not None and len(class_names) != len(folders):
            raise ValueError(
                f"{len(class_names)} class names given for {len(folders)} class folders in {self.root}"
            )
        self.name, self.size = self.root.name, size
        self.class_names = list(class_names) if class_names is not None else [p.name for p in folders]
        self.samples = [(p, k) for k, folder in enumerate(folders) for p in list_images(folder)]
        if not self.samples:
            exts = ", ".join(IMAGE_EXTENSIONS)
            raise FileNotFoundError(f"image-folder dataset: no images ({exts}) under {self.root}")
        if limit is not None and limit < len(self.samples):
            # evenly spaced over the class-sorted list, so every class keeps about its share
            keep = torch.linspace(0, len(self.samples) - 1, limit).round().long().unique().tolist()
            self.samples = [self.samples[i] for i in keep]
        self.labels = torch.tensor([k for _, k in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return _load_rgb(path, self.size, self.decode), label


@dataclass
class _SegPair:
    image: Path
    mask: Path


class SegmentationFolderSet(Dataset):
    """Image/mask pairs from disk with a label remapping (``remap: [256]`` lookup table); images decoded
    with ``decode`` (one of ``phis.images.DECODE_MODES``), masks in full."""

    def __init__(
        self,
        name: str,
        pairs: list[_SegPair],
        size: int,
        remap: Tensor,
        class_names: Sequence[str],
        decode: str = "reduced",
    ) -> None:
        if not pairs:
            raise FileNotFoundError(f"{name}: no image/mask pairs found")
        self.name, self.pairs, self.size, self.remap = name, pairs, size, remap
        self.decode = check_decode(decode)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        pair = self.pairs[i]
        mask = _load_mask(pair.mask, self.size)
        if int(mask.max()) >= len(self.remap) or int(mask.min()) < 0:
            raise ValueError(f"{self.name}: mask {pair.mask} has labels outside 0..{len(self.remap) - 1}")
        return _load_rgb(pair.image, self.size, self.decode), self.remap[mask]


def ade20k_set(
    root: str | Path, split: str, size: int = 256, decode: str = "reduced"
) -> SegmentationFolderSet:
    """ADE20k SceneParsing (150 classes; label 0 is ignored, label k becomes class k − 1)."""
    _check_split(split)
    _check_size(size)
    sub = "training" if split == "train" else "validation"
    root = Path(root)
    img_dir = _require_dir(root / "images" / sub, "ADE20k images (expected root/images/<split>)")
    ann_dir = _require_dir(root / "annotations" / sub, "ADE20k masks (expected root/annotations/<split>)")
    pairs = []
    for img in list_images(img_dir):
        mask = ann_dir / f"{img.stem}.png"
        if not mask.is_file():
            raise FileNotFoundError(f"ADE20k: annotation {mask} for image {img} does not exist")
        pairs.append(_SegPair(img, mask))
    remap = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    remap[1 : ADE20K_NUM_CLASSES + 1] = torch.arange(ADE20K_NUM_CLASSES)
    names = [f"class_{k}" for k in range(ADE20K_NUM_CLASSES)]
    return SegmentationFolderSet("ade20k", pairs, size, remap, names, decode)


def voc_set(root: str | Path, split: str, size: int = 256, decode: str = "reduced") -> SegmentationFolderSet:
    """Pascal VOC 2012 segmentation (21 classes, 255 ignored); ``test`` reads the ``val`` list."""
    _check_split(split)
    _check_size(size)
    root = Path(root)
    img_dir = _require_dir(root / "JPEGImages", "VOC images (expected root/JPEGImages)")
    ann_dir = _require_dir(root / "SegmentationClass", "VOC masks (expected root/SegmentationClass)")
    listing = root / "ImageSets" / "Segmentation" / f"{'train' if split == 'train' else 'val'}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"VOC: split list {listing} does not exist")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    pairs = []
    for i in ids:
        img, mask = img_dir / f"{i}.jpg", ann_dir / f"{i}.png"
        for p in (img, mask):
            if not p.is_file():
                raise FileNotFoundError(f"VOC: {p} listed in {listing.name} does not exist")
        pairs.append(_SegPair(img, mask))
    remap = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    remap[: len(VOC_CLASSES)] = torch.arange(len(VOC_CLASSES))
    return SegmentationFolderSet("voc", pairs, size, remap, VOC_CLASSES, decode)


def classification_set(
    name: str,
    split: str,
    size: int,
    root: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    decode: str = "reduced",
) -> Dataset:
    """A kNN / zero-shot set by name; ``limit`` caps the images per split, spread over all classes.

    ``image_folder`` reads class folders from ``root/train`` and ``root/test`` (or ``root/val``), named
    by ``class_names`` (default: the folder names), decoded with ``decode``; a limit keeps evenly spaced
    images of the sorted list, so every class stays represented.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 image per split, got {limit}")
    if name == "digits":
        return digits_set(split, size, limit=limit, seed=seed)
    if name == "photos":
        per_class = max(1, limit // len(PHOTO_SOURCES)) if limit else None
        return photo_crops_set(split, size, per_class=per_class, seed=seed)
    if name == "image_folder":
        if root is None:
            raise ValueError("image_folder needs root=<folder with train/ and test/ (or val/) class folders>")
        sub = Path(root) / split
        if split == "test" and not sub.is_dir():
            sub = Path(root) / "val"
        return ImageFolderSet(sub, size, class_names=class_names, limit=limit, decode=decode)
    raise ValueError(f"unknown classification set {name!r}; choose one of {CLASSIFICATION_SETS}")


def segmentation_set(
    name: str,
    split: str,
    size: int,
    root: str | Path | None = None,
    count: int | None = None,
    seed: int = 0,
    decode: str = "reduced",
) -> Dataset:
    """Build a segmentation set by name (``SEGMENTATION_SETS``); ade20k/voc need ``root`` and decode their
    images with ``decode``."""
    if name == "collage":
        return collage_set(split, size, count=count, seed=seed)
    if name in ("ade20k", "voc"):
        if root is None:
            raise ValueError(f"{name} needs root=<dataset folder>; see phis.evaldata for the expected layout")
        return (ade20k_set if name == "ade20k" else voc_set)(root, split, size, decode)
    raise ValueError(f"unknown segmentation set {name!r}; choose one of {SEGMENTATION_SETS}")


# ----------------------------------------------------------------------------------------------------
# ImageNet-1k class names and prompt ensembles for zero-shot classification

PROMPT_SETS = ("openai_imagenet", "simple_imagenet")  # CLIP's 80-prompt ensemble, its 7-prompt subset


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in the standard index order (readable names for prompts, e.g.
    "great white shark" for n01484850), from the ``open_clip`` package's zero-shot metadata."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def prompt_templates(name: str) -> tuple[str, ...]:
    """A named prompt ensemble as ``{c}`` templates: ``openai_imagenet`` (the 80 prompts CLIP's authors
    used on ImageNet) or ``simple_imagenet`` (7 of them), from the ``open_clip`` package."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    sets = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}
    if name not in sets:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {PROMPT_SETS}")
    return tuple(template("{c}") for template in sets[name])
