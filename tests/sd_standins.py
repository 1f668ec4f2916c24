"""Tiny stand-in copies of the SD-PLL paper's six datasets, in the folder layout torchvision reads.

Each class's images are noise around a class colour, so features of a random network still separate
the classes a little. Labels and splits are written as each dataset publishes them (1-based ids in
the .mat files, CIFAR's pickles, Food-101's meta json); files are not the published ones, so
CIFAR-100 and Flowers-102 need ``sd.features.verify_checksums=false``.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

K = 4  # classes per stand-in dataset
SIZE = 20  # image side


def _image(rng: np.random.Generator, k: int) -> np.ndarray:
    """[SIZE, SIZE, 3] uint8: noise around class k's colour."""
    colour = np.array([(k * 67) % 256, (k * 141 + 60) % 256, (k * 29 + 120) % 256], dtype=float)
    return np.clip(colour + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _jpg(path: Path, rng: np.random.Generator, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image(rng, k)).save(path, quality=95)


def cifar100(root: Path, n_train: int = 6, n_test: int = 3, seed: int = 0) -> dict[str, list[int]]:
    """cifar-100-python/{train,test,meta} pickles; returns the labels of each split."""
    rng, folder = np.random.default_rng(seed), root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = [k for k in range(K) for _ in range(n)]
        data = np.stack([_image(rng, k).transpose(2, 0, 1) for k in y])  # [N, 3, H, W]
        data = np.pad(data, ((0, 0), (0, 0), (0, 32 - SIZE), (0, 32 - SIZE))).reshape(len(y), -1)
        entry = {"data": data, "fine_labels": y, "coarse_labels": [k // 2 for k in y]}
        (folder / split).write_bytes(pickle.dumps(entry))
        labels[split] = y
    meta = {"fine_label_names": [f"c{k}" for k in range(K)], "coarse_label_names": ["a", "b"]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return labels


def caltech101(root: Path, per_class: int = 5, seed: int = 0) -> dict[str, list[int]]:
    """caltech101/101_ObjectCategories/<category>/image_%04d.jpg with BACKGROUND_Google (dropped)."""
    rng, folder = np.random.default_rng(seed), root / "caltech101" / "101_ObjectCategories"
    for i in range(2):
        _jpg(folder / "BACKGROUND_Google" / f"image_{i + 1:04d}.jpg", rng, K)
    for k in range(K):
        for i in range(per_class):
            _jpg(folder / f"cat{k}" / f"image_{i + 1:04d}.jpg", rng, k)
    return {"all": [k for k in range(K) for _ in range(per_class)]}


def caltech256(root: Path, per_class: int = 5, seed: int = 0) -> dict[str, list[int]]:
    """caltech256/256_ObjectCategories/<nnn>.<name>/<nnn>_%04d.jpg with 257.clutter (dropped)."""
    rng, folder = np.random.default_rng(seed), root / "caltech256" / "256_ObjectCategories"
    for k in range(K):
        for i in range(per_class):
            _jpg(folder / f"{k + 1:03d}.cat{k}" / f"{k + 1:03d}_{i + 1:04d}.jpg", rng, k)
    for i in range(2):
        _jpg(folder / "257.clutter" / f"257_{i + 1:04d}.jpg", rng, K)
    return {"all": [k for k in range(K) for _ in range(per_class)]}


def flowers102(
    root: Path, per_split: tuple[int, int, int] = (3, 2, 6), seed: int = 0
) -> dict[str, list[int]]:
    """flowers-102/jpg/image_%05d.jpg, imagelabels.mat (1-based labels), setid.mat (trnid/valid/tstid).

    Returns the labels of the paper's splits: it trains on 'tstid' (the larger) and tests on 'trnid'."""
    rng, folder = np.random.default_rng(seed), root / "flowers-102"
    ids: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    labels: list[int] = []
    for key, n in zip(ids, per_split):
        for k in range(K):
            for _ in range(n):
                labels.append(k)
                ids[key].append(len(labels))
                _jpg(folder / "jpg" / f"image_{len(labels):05d}.jpg", rng, k)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array(labels) + 1})
    scipy.io.savemat(folder / "setid.mat", {k: np.array(v) for k, v in ids.items()})
    by_id = dict(enumerate(labels, 1))
    return {"train": [by_id[i] for i in ids["tstid"]], "test": [by_id[i] for i in ids["trnid"]]}


def food101(root: Path, n_train: int = 6, n_test: int = 3, seed: int = 0) -> dict[str, list[int]]:
    """food-101/images/<class>/<id>.jpg and meta/{train,test}.json (what torchvision 0.29 reads) with
    the matching {train,test}.txt lists the dataset also ships."""
    rng, folder = np.random.default_rng(seed), root / "food-101"
    (folder / "meta").mkdir(parents=True)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        meta = {f"dish{k}": [f"dish{k}/{split}{i}" for i in range(n)] for k in range(K)}
        for k, paths in enumerate(meta.values()):
            for rel in paths:
                _jpg(folder / "images" / f"{rel}.jpg", rng, k)
        (folder / "meta" / f"{split}.json").write_text(json.dumps(meta))
        (folder / "meta" / f"{split}.txt").write_text("".join(p + "\n" for v in meta.values() for p in v))
        labels[split] = [k for k in range(K) for _ in range(n)]
    return labels


def _car_annotations(fnames: list[str], labels: list[int]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    annos = np.zeros(len(fnames), dtype=[(f, "O") for f in fields])
    for i, (name, k) in enumerate(zip(fnames, labels)):
        annos[i] = (1, 1, SIZE, SIZE, k + 1, name)  # 1-based class ids
    return annos


def stanford_cars(root: Path, n_train: int = 6, n_test: int = 3, seed: int = 0) -> dict[str, list[int]]:
    """stanford_cars/{cars_train,cars_test}/*.jpg, devkit/cars_meta.mat, devkit/cars_train_annos.mat and
    cars_test_annos_withlabels.mat (struct arrays with fname and 1-based class)."""
    rng, folder = np.random.default_rng(seed), root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = [k for _ in range(n) for k in range(K)]  # classes interleaved, as in the real files
        names = [f"{i + 1:05d}.jpg" for i in range(len(y))]
        for name, k in zip(names, y):
            _jpg(folder / f"cars_{split}" / name, rng, k)
        annos = "devkit/cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        scipy.io.savemat(folder / annos, {"annotations": _car_annotations(names, y)})
        labels[split] = y
    names = np.array([f"car model {k}" for k in range(K)], dtype=object)
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names})
    return labels


BUILDERS = {
    "cifar100": cifar100,
    "caltech101": caltech101,
    "caltech256": caltech256,
    "flowers102": flowers102,
    "food101": food101,
    "stanford_cars": stanford_cars,
}
