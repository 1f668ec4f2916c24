"""The settings of an evaluation (the ``eval`` config group) and what they imply: prompts, class names.

Training checks them before it starts (a typo fails at once, not after hours); ``phis.eval`` runs them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from phis.config import plain
from phis.evaldata import (
    CLASSIFICATION_SETS,
    PROMPT_SETS,
    SEGMENTATION_SETS,
    imagenet_class_names,
    prompt_templates,
)
from phis.images import DECODE_MODES
from phis.metrics import DEFAULT_TEMPLATE

HELDOUT_SPLITS = ("auto", "test", "val")


@dataclass
class EvalConfig:
    """Settings of ``evaluate_module``: the keys of the ``eval`` config group (``enabled`` is training's)."""

    image_size: int | None = None  # default: the resolution the module was trained at
    batch_size: int = 64
    seed: int = 0
    knn_sets: tuple[str, ...] = ("photos", "digits")  # phis.evaldata.CLASSIFICATION_SETS
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_limit: int | None = None  # cap on images per split of each kNN set (None: the whole set)
    # also a kNN on the mean of the trunk's patch features (knn_spatial/<set>): the dense features the
    # teachers' feature losses shape, which the summary token only sees through attention
    knn_spatial: bool = False
    seg_sets: tuple[str, ...] = ("collage",)  # phis.evaldata.SEGMENTATION_SETS
    seg_limit: int | None = None  # cap on images per split of ade20k/voc (features are kept in memory)
    probe_epochs: int = 30
    probe_lr: float = 1e-2
    rankme_images: int = 256  # test images of each kNN set whose spatial tokens enter RankMe
    teacher_mse: bool = True
    # Training split the teacher MSE is measured on: test (unseen photos; the default when the data has
    # one), val (unseen regions of the training photos), or auto (test if configured, else val).
    heldout_split: str = "auto"
    heldout_images: int = 64  # OfflineImagePool("test") images when only teachers are given
    heldout_limit: int | None = None  # cap on the held-out images of the teacher MSE (None: the whole split)
    train_fit_limit: int | None = None  # training images of train_fit, a diagnostic (None: heldout_limit's)
    zero_shot: bool = True
    zero_shot_images: int | None = 256  # evenly spaced test images per set (teachers run on each)
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    # A named prompt ensemble (phis.evaldata.PROMPT_SETS) used instead of templates; with imagenet_labels
    # the default is openai_imagenet (CLIP's 80 prompts), as the papers' ImageNet zero-shot.
    prompt_set: str | None = None
    image_folder_root: str | None = None  # root/train and root/test (or val) class folders
    image_folder_names: str | None = None  # text file, one class name per line in sorted-folder order
    # image_folder classes are all of ImageNet-1k in standard order: labels are the classifier heads'
    # indices, and the prompts use the readable class names (unless image_folder_names is given)
    imagenet_labels: bool = False
    ade20k_root: str | None = None
    voc_root: str | None = None
    decode: str = "reduced"  # JPEGs of the image_folder/ade20k/voc sets: phis.images.DECODE_MODES
    jsonl: str = "eval.jsonl"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> EvalConfig:
        """Build from a plain/OmegaConf mapping, rejecting unknown keys with the list of valid ones."""
        values = dict(plain(cfg) or {})
        values.pop("enabled", None)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown eval option(s) {unknown}; valid options: {sorted(valid)}")
        for key in ("knn_sets", "seg_sets", "templates"):
            if key in values:
                values[key] = (values[key],) if isinstance(values[key], str) else tuple(values[key])
        out = cls(**values)
        if out.decode not in DECODE_MODES:
            raise ValueError(f"unknown eval.decode {out.decode!r}; choose one of {DECODE_MODES}")
        if out.heldout_split not in HELDOUT_SPLITS:
            raise ValueError(
                f"unknown eval.heldout_split {out.heldout_split!r}; choose one of {HELDOUT_SPLITS}"
            )
        if out.prompt_set is not None and out.prompt_set not in PROMPT_SETS:
            raise ValueError(
                f"unknown eval.prompt_set {out.prompt_set!r}; choose one of {PROMPT_SETS} or null"
            )
        bad = [s for s in out.knn_sets if s not in CLASSIFICATION_SETS]
        bad += [s for s in out.seg_sets if s not in SEGMENTATION_SETS]
        if bad:
            raise ValueError(
                f"unknown eval set(s) {bad}; kNN: {CLASSIFICATION_SETS}, segmentation: {SEGMENTATION_SETS}"
            )
        return out


def class_names(ecfg: EvalConfig) -> list[str] | None:
    """Readable class names for zero-shot prompts on an image folder: the eval.image_folder_names file,
    else ImageNet-1k's with eval.imagenet_labels, else None (the folder names)."""
    if ecfg.image_folder_names is None:
        return imagenet_class_names() if ecfg.imagenet_labels else None
    path = Path(ecfg.image_folder_names)
    if not path.is_file():
        raise FileNotFoundError(f"eval.image_folder_names={path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def prompts(ecfg: EvalConfig, set_name: str) -> tuple[str, ...]:
    """The prompt templates of zero-shot on ``set_name``: eval.prompt_set's ensemble if set; CLIP's
    80-prompt ImageNet ensemble on an ImageNet image folder; else eval.templates."""
    if ecfg.prompt_set is not None:
        return prompt_templates(ecfg.prompt_set)
    if set_name == "image_folder" and ecfg.imagenet_labels:
        return prompt_templates("openai_imagenet")
    return ecfg.templates
