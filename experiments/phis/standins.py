"""Stand-in data for the paper profile at tiny sizes (``+profile=paper_tiny``): WebDataset shards in place
of DataComp and small labelled folders in the layouts of ImageNet, ADE20k and Pascal VOC, all written
from the photos and labels that ship with the installed packages.

    python -m experiments.phis.standins DIR   # writes DIR (reused when complete), prints the PHIS_* variables

The shards hold crops of the training photos (``phis.photos.OfflineImagePool``) in the img2dataset layout,
the held-out shard crops of the unseen test photos. The ImageNet stand-in has ImageNet-1k's 1,000 class
folders (so ``eval.imagenet_labels=true`` applies), class ``k`` showing crops of photo ``k mod 14``
(``phis.evaldata.photo_crops_set``); the segmentation stand-ins are collages of photo crops
(``phis.evaldata.collage_set``) with the source photo as the label, written as ADE20k label PNGs (0 =
other) and VOC palette PNGs (255 = object border).
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from phis.evaldata import PHOTO_SOURCES, collage_set, imagenet_class_names, photo_crops_set
from phis.photos import OfflineImagePool
from phis.results import atomic_write_json

IMAGE_SIZE = 40  # pixels on disk; the loaders resize to the profile's resolution
TRAIN_SHARDS = 4
PER_SHARD = 16
HELDOUT_IMAGES = 16
SEG_IMAGES = {"train": 8, "test": 8}
DONE = "standins.json"


def _uint8(image: Tensor) -> np.ndarray:
    """``image: [3, S, S]`` (float in [0, 1] or uint8) as an HWC uint8 array."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()


def _encoded(image: Tensor, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_uint8(image)).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(folder: Path, prefix: str, images: Tensor, per_shard: int) -> list[Path]:
    """img2dataset-style shards (``<key>.jpg`` + ``<key>.txt``) of ``images: [N, 3, S, S]``; the paths."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(-(-len(images) // per_shard)):
        paths.append(folder / f"{prefix}-{s:05d}.tar")
        with wds.TarWriter(str(paths[-1])) as sink:
            for n in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
                key = f"{prefix}{n:06d}"
                sink.write({"__key__": key, "jpg": _encoded(images[n], "JPEG"), "txt": f"stand-in {n}"})
    return paths


def write_imagenet(root: Path) -> None:
    """``root/{train,val}/<class>/<image>.png``: ImageNet-1k's class count, one image per class and split."""
    classes = len(imagenet_class_names())
    per_photo = -(-classes // len(PHOTO_SOURCES))
    for split, sub in (("train", "train"), ("test", "val")):
        crops = photo_crops_set(split, IMAGE_SIZE, per_class=per_photo).images  # [14 * per_photo, 3, S, S]
        for k in range(classes):
            folder = root / sub / f"class{k:04d}"
            folder.mkdir(parents=True)
            image = crops[(k % len(PHOTO_SOURCES)) * per_photo + k // len(PHOTO_SOURCES)]
            Image.fromarray(_uint8(image)).save(folder / f"{sub}_{k:04d}.png")


def _borders(mask: np.ndarray) -> np.ndarray:
    """Pixels with a differently labelled 4-neighbour (VOC marks object borders with 255)."""
    edge = np.zeros(mask.shape, dtype=bool)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    return edge


def write_ade20k(root: Path) -> None:
    """``root/images/<split>/*.jpg`` + ``root/annotations/<split>/*.png``; label = source photo + 1."""
    for split, sub in (("train", "training"), ("test", "validation")):
        data = collage_set(split, IMAGE_SIZE, count=SEG_IMAGES[split])
        (root / "images" / sub).mkdir(parents=True)
        (root / "annotations" / sub).mkdir(parents=True)
        for i, (image, mask) in enumerate(zip(data.images, data.masks, strict=True)):
            Image.fromarray(_uint8(image)).save(root / "images" / sub / f"ade_{sub}_{i:04d}.jpg")
            labels = (mask.numpy() + 1).astype(np.uint8)
            Image.fromarray(labels).save(root / "annotations" / sub / f"ade_{sub}_{i:04d}.png")


def write_voc(root: Path) -> None:
    """VOC folders: ``JPEGImages``, palette PNGs in ``SegmentationClass``, the split lists."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    palette = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8).reshape(-1).tolist()
    for split, listing in (("train", "train"), ("test", "val")):
        data = collage_set(split, IMAGE_SIZE, count=SEG_IMAGES[split], seed=1)
        ids = []
        for i, (image, mask) in enumerate(zip(data.images, data.masks, strict=True)):
            ids.append(f"2007_{listing}{i:04d}")
            Image.fromarray(_uint8(image)).save(root / "JPEGImages" / f"{ids[-1]}.jpg")
            labels = (mask.numpy() + 1).astype(np.uint8)
            labels[_borders(labels)] = 255
            png = Image.fromarray(labels, mode="P")
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{ids[-1]}.png")
        (root / "ImageSets" / "Segmentation" / f"{listing}.txt").write_text("\n".join(ids) + "\n")


def environment(root: Path) -> dict[str, str]:
    """The paper profile's data variables, pointed at the stand-ins under ``root``."""
    return {
        "PHIS_DATA_URLS": str(root / "shards" / f"train-{{00000..{TRAIN_SHARDS - 1:05d}}}.tar"),
        "PHIS_HELDOUT_URLS": str(root / "shards" / "heldout-00000.tar"),
        "PHIS_IMAGENET_ROOT": str(root / "imagenet"),
        "PHIS_ADE20K_ROOT": str(root / "ade20k"),
        "PHIS_VOC_ROOT": str(root / "voc2012"),
    }


def build(root: str | Path) -> dict[str, str]:
    """Write every stand-in under ``root`` unless a complete set is there; the variables pointing at it."""
    root = Path(root)
    if not (root / DONE).is_file():
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        train = OfflineImagePool("train", size=IMAGE_SIZE, count=TRAIN_SHARDS * PER_SHARD).images
        write_shards(partial / "shards", "train", train, PER_SHARD)
        held = OfflineImagePool("test", size=IMAGE_SIZE, count=HELDOUT_IMAGES).images
        write_shards(partial / "shards", "heldout", held, HELDOUT_IMAGES)
        write_imagenet(partial / "imagenet")
        write_ade20k(partial / "ade20k")
        write_voc(partial / "voc2012")
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
        atomic_write_json(root / DONE, environment(root))
    return environment(root)


def main(argv: list[str] | None = None) -> None:
    """CLI: build the stand-ins and print ``export NAME=value`` lines for a shell to evaluate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder for the stand-ins (reused when complete)")
    env = build(parser.parse_args(argv).root.resolve())
    print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))


if __name__ == "__main__":
    main()
