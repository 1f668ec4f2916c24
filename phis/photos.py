"""The photos that ship inside installed packages, and the offline image pool cut from them.

``OfflineImagePool`` makes a training pool out of the natural photos of scikit-image, scikit-learn and
matplotlib, so the whole pipeline runs without a network. Two held-out levels (no held-out pixel is
ever seen in training):

- ``val``: disjoint regions of the training photos. Each photo is cut along its long side into a
  two-thirds training region and a one-third held-out band (left/right or top/bottom end, alternating
  between photos); every crop lies inside one region. This measures generalization to unseen parts of
  the scenes the student was trained on, the situation of a web-scale training set.
- ``test``: whole photos never used in training (``TEST_SOURCES``: coffee, rocket, china, camera),
  a much harder transfer with 14 training photos. The stereo motorcycle pair (two views of one scene)
  stays together on the training side.

The module sits below the data module and the teachers: both read the photos through it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

# name → (package, path inside the package). Grayscale photos are replicated to three channels.
SOURCES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "motorcycle_left": ("skimage", "data/motorcycle_left.png"),
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "brick": ("skimage", "data/brick.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
TEST_SOURCES = ("coffee", "rocket", "china", "camera")
SPLITS = ("train", "val", "test")
_POOL_VERSION = 3


def split_sources(split: str) -> tuple[str, ...]:
    """Names of the source photos a split crops from (train and val share photos, not pixels)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test":
        return TEST_SOURCES
    return tuple(n for n in SOURCES if n not in TEST_SOURCES)


def split_region(split: str, source_index: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of a photo a split may crop from.

    Train gets two thirds of the long side and val the remaining band, at the end that alternates with
    the photo's index; test photos are used whole.
    """
    if split == "test":
        return 0, 0, height, width
    long_is_width = width >= height
    long = width if long_is_width else height
    band = long // 3
    band_first = source_index % 2 == 1
    if split == "val":
        start, length = (0, band) if band_first else (long - band, band)
    else:
        start, length = (band, long - band) if band_first else (0, long - band)
    return (0, start, height, length) if long_is_width else (start, 0, length, width)


@functools.cache
def load_source(name: str) -> np.ndarray:
    """One packaged photo as uint8 RGB ``[H, W, 3]``."""
    if name not in SOURCES:
        raise ValueError(f"unknown source photo {name!r}; choose one of {', '.join(SOURCES)}")
    package, rel = SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"source photo {name!r} needs the package {package!r}, which is not installed"
        )
    path = Path(spec.submodule_search_locations[0]) / rel
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class OfflineImagePool(Dataset):
    """Deterministic random square crops (scale, position, flip) of the packaged photos of one split.

    Item ``i`` depends only on (seed, split, i): its source is ``i mod n_sources`` (every photo equally
    often), its crop side a uniform fraction in [min_scale, max_scale] of min(short side, long side / 3)
    of that photo (the largest square that fits the held-out band), at a uniform position inside the
    split's region. Images are rendered once, on first access, and kept in memory as uint8.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 64,
        count: int = 1024,
        seed: int = 0,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
    ) -> None:
        if count < 1 or size < 1:
            raise ValueError(f"count and size must be positive, got count={count}, size={size}")
        if not 0 < min_scale <= max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}")
        self.split = split
        self.source_names = split_sources(split)
        self.size, self.count, self.seed = int(size), int(count), int(seed)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self._images: Tensor | None = None  # [N, 3, S, S] uint8

    def __len__(self) -> int:
        return self.count

    def source(self, index: int) -> int:
        """Index into ``source_names`` of the photo item ``index`` was cropped from."""
        return index % len(self.source_names)

    def crop_box(self, index: int) -> tuple[int, int, int, bool]:
        """(top, left, side, flip) of item ``index`` in its source photo."""
        src = self.source(index)
        photo = load_source(self.source_names[src])
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        h, w = photo.shape[:2]
        r_top, r_left, r_h, r_w = split_region(self.split, src, h, w)
        # Crop sides are fractions of one unit per photo that fits every split's region, so train, val
        # and test crops of a photo share one scale distribution.
        unit = min(h, w, max(h, w) // 3)
        side = max(1, round(rng.uniform(self.min_scale, self.max_scale) * unit))
        top = r_top + int(rng.integers(0, r_h - side + 1))
        left = r_left + int(rng.integers(0, r_w - side + 1))
        return top, left, side, bool(rng.random() < 0.5)

    def render(self, index: int) -> Tensor:
        """Item ``index`` as uint8 ``[3, S, S]``, computed from scratch."""
        photo = load_source(self.source_names[self.source(index)])
        top, left, side, flip = self.crop_box(index)
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = crop.resize((self.size, self.size), Image.Resampling.BICUBIC, reducing_gap=2.0)
        return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)

    @property
    def images(self) -> Tensor:
        """All items as uint8 ``[N, 3, S, S]`` (rendered on first use)."""
        if self._images is None:
            self._images = torch.stack([self.render(i) for i in range(self.count)])
        return self._images

    def __getitem__(self, index: int) -> Tensor:
        """Float ``[3, S, S]`` in [0, 1]."""
        return self.images[index].float() / 255.0

    def fingerprint(self) -> dict[str, Any]:
        """Everything the pixels depend on (for cache keys)."""
        return {
            "kind": "offline_pool",
            "version": _POOL_VERSION,
            "split": self.split,
            "sources": list(self.source_names),
            "size": self.size,
            "count": self.count,
            "seed": self.seed,
            "scale": [self.min_scale, self.max_scale],
        }
