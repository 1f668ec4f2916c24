"""Evaluation of a distilled student: teacher-space MSE, kNN, zero-shot, linear-probe segmentation, RankMe.

The metric functions are pure (tensors in, numbers out) and checked against brute-force references in
``tests/test_eval.py``. ``evaluate_module`` runs them on a trained ``DistillModule`` with the offline
sets of ``phis.evaldata`` (or a user's datasets) and appends one JSON line per evaluation;
``python -m phis.eval CHECKPOINT [--out DIR]`` does the same for a saved checkpoint.

Metric names (``phis.ranks`` groups them by these): ``tmse/<teacher>`` (teacher-space MSE, lower is
better) with ``tmse_explained/<teacher>`` = 1 − MSE / Var, ``knn/<set>``, ``zero_shot/<teacher>/<set>``
(accuracy against labels), ``zero_shot_agreement/<teacher>/<set>`` (classifier-type teachers: the
teacher's head on the student's predicted summary agrees with the teacher's own top-1),
``seg/<set>`` / ``ade20k`` / ``voc`` (linear-probe mIoU), ``rankme/<set>``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from phis.evaldata import (
    CLASSIFICATION_SETS,
    IGNORE_INDEX,
    SEGMENTATION_SETS,
    classification_set,
    segmentation_set,
)
from phis.results import append_jsonl, markdown_table

DEFAULT_TEMPLATE = "a photo of a {c}."


def _check_features(name: str, x: Tensor, ndim: int | tuple[int, ...]) -> None:
    """Refuse empty, wrongly shaped or non-finite features with a message naming them."""
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in dims:
        raise ValueError(
            f"{name}: expected a {' or '.join(f'{d}-D' for d in dims)} tensor, got {tuple(x.shape)}"
        )
    if x.numel() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name}: empty tensor {tuple(x.shape)}; evaluation needs at least one sample")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {bad} non-finite values (NaN/inf) of {x.numel()}; refusing to evaluate")


def _check_labels(name: str, labels: Tensor, n: int) -> None:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels [N], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name}: negative label {int(labels.min())}")


# ----------------------------------------------------------------------------------------------------
# Teacher-space MSE


class ChannelMoments:
    """Per-channel token count, mean [C] and sum of squared deviations [C], merged exactly in float64.

    Batches are combined with Chan et al.'s parallel update, so large channel offsets (SAM means near
    −60) do not cancel catastrophically as E[y²] − E[y]² would.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, y: Tensor) -> None:
        """Fold in tokens ``y: [N, C]``."""
        y = y.detach().to(torch.float64)
        n = y.shape[0]
        if n == 0:
            return
        mean_b = y.mean(0)
        m2_b = ((y - mean_b) ** 2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean_b, m2_b
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> Tensor:
        """Population variance per channel [C]."""
        if self.m2 is None:
            raise ValueError("no tokens were accumulated")
        return self.m2 / self.count

    @property
    def mean_square(self) -> Tensor:
        """E[y²] per channel [C] (variance plus squared mean)."""
        return self.variance + self.mean**2


def tokens(features: Tensor) -> Tensor:
    """Spatial ``features: [B, C, h, w]`` (or already ``[N, C]``) as a token matrix ``[B*h*w, C]``."""
    if features.ndim == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if features.ndim == 2:
        return features
    raise ValueError(f"expected features [B, C, h, w] or [N, C], got shape {tuple(features.shape)}")


class TeacherErrorMeter:
    """Streams prediction errors and targets of one teacher; gives MSE, target variance and their ratio."""

    def __init__(self) -> None:
        self.error = ChannelMoments()
        self.target = ChannelMoments()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``, ``target``: [B, C, h, w] (or [N, C]) in the same space."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
            )
        _check_features("prediction", pred, (2, 4))
        _check_features("target", target, (2, 4))
        y = tokens(target).to(torch.float64)
        self.error.update(tokens(pred).to(torch.float64) - y)
        self.target.update(y)

    def result(self) -> dict[str, float]:
        """``mse`` (mean over tokens and channels), ``variance`` (mean per-channel target variance),
        ``explained`` = 1 − mse / variance, and the per-channel error-variance range (PHI-S Table 5)."""
        mse = float(self.error.mean_square.mean())
        var = float(self.target.variance.mean())
        err_var = self.error.variance
        return {
            "mse": mse,
            "variance": var,
            "explained": 1.0 - mse / var if var > 0 else math.nan,
            "error_variance_range": float(err_var.max() - err_var.min()),
        }


def teacher_mse(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Teacher-space MSE of ``pred`` vs ``target`` ([B, C, h, w] or [N, C]) and the explained fraction."""
    meter = TeacherErrorMeter()
    meter.update(pred, target)
    return meter.result()


# ----------------------------------------------------------------------------------------------------
# kNN


def knn_predict(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN labels [M] for ``test_x: [M, D]`` against ``train_x: [N, D]``, ``train_y: [N]``.

    Features are L2-normalized; each of the k nearest neighbours (by cosine similarity) votes for its
    class with weight exp(sim / temperature), the usual protocol for self-supervised features.
    """
    _check_features("kNN train features", train_x, 2)
    _check_features("kNN test features", test_x, 2)
    _check_labels("kNN train labels", train_y, train_x.shape[0])
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"kNN: train dim {train_x.shape[1]} != test dim {test_x.shape[1]}")
    n = train_x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kNN: k={k} must be between 1 and the number of training samples ({n})")
    if temperature <= 0:
        raise ValueError(f"kNN: temperature must be > 0, got {temperature}")
    num_classes = num_classes or int(train_y.max()) + 1
    train = F.normalize(train_x.float(), dim=1)
    preds = []
    for chunk in F.normalize(test_x.float(), dim=1).split(chunk_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(chunk.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (in [0, 1]) of ``knn_predict`` on labelled test features."""
    _check_labels("kNN test labels", test_y, test_x.shape[0])
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature)
    return float((pred == test_y).float().mean())


# ----------------------------------------------------------------------------------------------------
# Zero-shot


def class_prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class from a template with a ``{c}`` slot."""
    if "{c}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{c}}' slot for the class name")
    return [template.format(c=c) for c in class_names]


def zero_shot_accuracy(image_emb: Tensor, text_emb: Tensor, labels: Tensor) -> float:
    """Accuracy of assigning each image ``[N, C]`` to the class embedding ``[K, C]`` of highest cosine."""
    _check_features("zero-shot image embeddings", image_emb, 2)
    _check_features("zero-shot text embeddings", text_emb, 2)
    _check_labels("zero-shot labels", labels, image_emb.shape[0])
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"zero-shot: image dim {image_emb.shape[1]} != text dim {text_emb.shape[1]}")
    if int(labels.max()) >= text_emb.shape[0]:
        raise ValueError(
            f"zero-shot: label {int(labels.max())} but only {text_emb.shape[0]} class embeddings"
        )
    sim = F.normalize(image_emb.float(), dim=1) @ F.normalize(text_emb.float(), dim=1).T
    return float((sim.argmax(dim=1) == labels).float().mean())


def text_classifier(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
) -> Tensor:
    """Class embeddings ``[K, C]`` from a text tower: the renormalized mean over prompt templates."""
    if not class_names or not templates:
        raise ValueError("zero-shot needs at least one class name and one prompt template")
    with torch.no_grad():
        embs = torch.stack(
            [F.normalize(encode_text(class_prompts(class_names, t)).float(), dim=1) for t in templates]
        )
    return F.normalize(embs.mean(0), dim=1)


def classifier_zero_shot(
    student_summary: Tensor,
    classify: Callable[[Tensor], Tensor],
    labels: Tensor | None = None,
    teacher_summary: Tensor | None = None,
) -> dict[str, float]:
    """Zero-shot through a classifier teacher's own head applied to the student's predicted summary.

    ``accuracy`` scores the head's top-1 against ``labels`` (indices in the head's label space, e.g.
    ImageNet-1k class folders); ``agreement`` is the fraction of images where it equals the top-1 of
    the same head on the teacher's real summary — label-free, so it works on any image set.
    """
    _check_features("student summary", student_summary, 2)
    if labels is None and teacher_summary is None:
        raise ValueError("classifier zero-shot needs labels, teacher_summary or both")
    with torch.no_grad():
        pred = classify(student_summary).argmax(dim=1)
        out = {}
        if labels is not None:
            _check_labels("zero-shot labels", labels, student_summary.shape[0])
            out["accuracy"] = float((pred == labels.to(pred.device)).float().mean())
        if teacher_summary is not None:
            _check_features("teacher summary", teacher_summary, 2)
            if teacher_summary.shape[0] != student_summary.shape[0]:
                raise ValueError(
                    f"teacher summary has {teacher_summary.shape[0]} rows, student {student_summary.shape[0]}"
                )
            out["agreement"] = float((pred == classify(teacher_summary).argmax(dim=1)).float().mean())
    return out


# ----------------------------------------------------------------------------------------------------
# Linear-probe semantic segmentation


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """``[K, K]`` int64 counts (rows = ground truth, columns = prediction) over pixels not ignored."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"mask labels must lie in 0..{num_classes - 1} or be {ignore_index}; "
            f"found {int(t.min())}..{int(t.max())}"
        )
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou(conf: Tensor) -> tuple[float, Tensor]:
    """Mean IoU over classes that occur in ground truth or prediction, and per-class IoU [K] (NaN if absent).

    IoU_c = TP / (TP + FP + FN) from the confusion matrix accumulated over the whole test set (not
    averaged per image), the usual semantic-segmentation protocol.
    """
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    present = ~iou.isnan()
    if not present.any():
        raise ValueError("mIoU: no labelled pixels in the evaluation set")
    return float(iou[present].mean()), iou


class LinearSegHead(nn.Module):
    """BatchNorm + 1×1 conv on frozen spatial features ``[B, C, h, w]`` → logits ``[B, K, h, w]``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, feats: Tensor) -> Tensor:
        return self.conv(self.norm(feats))


def _upsampled_logits(head: nn.Module, feats: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(head(feats.float()), size=size, mode="bilinear", align_corners=False)


def linear_probe_segmentation(
    train_feats: Tensor,
    train_masks: Tensor,
    test_feats: Tensor,
    test_masks: Tensor,
    num_classes: int,
    epochs: int = 30,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    ignore_index: int = IGNORE_INDEX,
    seed: int = 0,
) -> dict[str, float | list[float]]:
    """Train a linear segmentation probe on frozen features and return test mIoU (in [0, 1]).

    Features ``[N, C, h, w]``, masks ``[N, H, W]`` int (``ignore_index`` unlabelled). Logits are
    upsampled bilinearly to the mask resolution before the cross-entropy and before the argmax, so
    labels are never downsampled. AdamW with a cosine learning-rate decay over all steps.
    """
    for name, f, m in (("train", train_feats, train_masks), ("test", test_feats, test_masks)):
        _check_features(f"{name} segmentation features", f, 4)
        if m.ndim != 3 or m.shape[0] != f.shape[0]:
            raise ValueError(f"{name} masks: expected [{f.shape[0]}, H, W], got {tuple(m.shape)}")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train feature dim {train_feats.shape[1]} != test {test_feats.shape[1]}")
    if num_classes < 2:
        raise ValueError(f"segmentation needs num_classes >= 2, got {num_classes}")
    if not (train_masks != ignore_index).any():
        raise ValueError("segmentation probe: the training masks contain no labelled pixel")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = LinearSegHead(train_feats.shape[1], num_classes)
    n = train_feats.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    size = tuple(train_masks.shape[-2:])
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            logits = _upsampled_logits(head, train_feats[idx], size)
            loss = F.cross_entropy(logits, train_masks[idx].long(), ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    test_size = tuple(test_masks.shape[-2:])
    with torch.no_grad():
        for idx in torch.arange(test_feats.shape[0]).split(batch_size):
            pred = _upsampled_logits(head, test_feats[idx], test_size).argmax(dim=1)
            conf += confusion_matrix(pred, test_masks[idx], num_classes, ignore_index)
    mean_iou, iou = miou(conf)
    labelled = conf.sum()
    return {
        "miou": mean_iou,
        "pixel_accuracy": float(conf.diagonal().sum() / labelled) if labelled else math.nan,
        "per_class_iou": iou.tolist(),
    }


# ----------------------------------------------------------------------------------------------------
# RankMe


def rankme(features: Tensor, eps: float = 1e-7) -> float:
    """RankMe effective rank (Garrido et al., 2023): exp of the entropy of the normalized singular values.

    ``features``: tokens ``[N, D]`` or spatial ``[B, D, h, w]`` (every position a sample). With
    singular values σ of the (uncentred) token matrix, p_k = σ_k / Σσ + eps, RankMe = exp(−Σ p log p).
    σ² are the eigenvalues of the D×D Gram matrix, accumulated in float64 chunks so N can be large.
    """
    _check_features("RankMe features", features, (2, 4))
    x = tokens(features)
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for chunk in x.split(8192):
        c = chunk.to(torch.float64)
        gram += c.T @ c
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    total = sigma.sum()
    if total == 0:
        raise ValueError("RankMe: features are all zero; the effective rank is undefined")
    p = sigma / total + eps
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))  # xlogy: 0 log 0 = 0 when eps = 0


# ----------------------------------------------------------------------------------------------------
# Running the evaluation on a trained DistillModule

# Teacher families whose summary can be scored zero-shot: a text tower, or the teacher's own classifier.
TEXT_FAMILIES = ("open_clip", "hf_clip", "hf_siglip")
CLASSIFIER_FAMILIES = ("efficientnet_lite", "timm")
HELDOUT_SPLITS = ("auto", "test", "val")
SEG_METRIC = {"collage": "seg/collage", "ade20k": "ade20k", "voc": "voc"}


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
    zero_shot: bool = True
    zero_shot_images: int | None = 256  # evenly spaced test images per set (teachers run on each)
    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    image_folder_root: str | None = None  # root/train and root/test (or val) class folders
    image_folder_names: str | None = None  # text file, one class name per line in sorted-folder order
    imagenet_labels: bool = False  # image_folder classes are all of ImageNet-1k in standard order
    ade20k_root: str | None = None
    voc_root: str | None = None
    jsonl: str = "eval.jsonl"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> EvalConfig:
        """Build from a plain/OmegaConf mapping, rejecting unknown keys with the list of valid ones."""
        values = dict(_plain(cfg) or {})
        values.pop("enabled", None)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown eval option(s) {unknown}; valid options: {sorted(valid)}")
        for key in ("knn_sets", "seg_sets", "templates"):
            if key in values:
                values[key] = (values[key],) if isinstance(values[key], str) else tuple(values[key])
        out = cls(**values)
        if out.heldout_split not in HELDOUT_SPLITS:
            raise ValueError(
                f"unknown eval.heldout_split {out.heldout_split!r}; choose one of {HELDOUT_SPLITS}"
            )
        bad = [s for s in out.knn_sets if s not in CLASSIFICATION_SETS]
        bad += [s for s in out.seg_sets if s not in SEGMENTATION_SETS]
        if bad:
            raise ValueError(
                f"unknown eval set(s) {bad}; kNN: {CLASSIFICATION_SETS}, segmentation: {SEGMENTATION_SETS}"
            )
        return out


def _plain(cfg: Any) -> Any:
    """OmegaConf containers → plain Python (other values unchanged)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _is_train_config(cfg: Any) -> bool:
    return isinstance(cfg, Mapping) and "teachers" in cfg and "data" in cfg


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _resolution(module: Any, ecfg: EvalConfig) -> int:
    """Evaluation image size: configured, else the current training stage's, else the student's."""
    if ecfg.image_size:
        return int(ecfg.image_size)
    stage = int(getattr(module, "stage_resolution", -1))
    return stage if stage > 0 else int(module.student.img_size)


@torch.no_grad()
def _embed(
    module: Any, data: Dataset, batch_size: int, spatial_limit: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Trunk summaries [N, D], labels/masks, and spatial features of the first ``spatial_limit`` items."""
    dev = _device(module)
    summaries, targets, spatial, kept = [], [], [], 0
    for images, y in DataLoader(data, batch_size=batch_size):
        s, f = module.embed(images.to(dev))  # [B, D], [B, D, h, w]
        summaries.append(s.float().cpu())
        targets.append(torch.as_tensor(y))
        if kept < spatial_limit:
            spatial.append(f[: spatial_limit - kept].float().cpu())
            kept += len(spatial[-1])
    feats = torch.cat(spatial) if spatial else torch.empty(0)
    return torch.cat(summaries), torch.cat(targets), feats


@torch.no_grad()
def _summaries(fn: Callable[[Tensor], Tensor], data: Dataset, batch_size: int, dev: torch.device) -> Tensor:
    """``fn(images) -> [B, Cs]`` over a labelled set, concatenated on the CPU."""
    return torch.cat(
        [fn(images.to(dev)).float().cpu() for images, _ in DataLoader(data, batch_size=batch_size)]
    )


class _TeacherSource:
    """Teachers for evaluation: given ones first, else built on first use from the training config."""

    def __init__(self, given: Mapping[str, nn.Module] | None, train_cfg: Any, device: torch.device) -> None:
        self.given, self.device, self.built = dict(given or {}), device, {}
        self.cfgs: dict[str, dict] = {}
        if train_cfg is not None:
            from phis.train import teacher_set

            self.cfgs = teacher_set(train_cfg)

    def family(self, name: str) -> str | None:
        return self.cfgs.get(name, {}).get("family")

    def available(self, name: str) -> bool:
        return name in self.given or name in self.cfgs

    def __call__(self, name: str) -> nn.Module:
        if not self.available(name):
            raise ValueError(f"teacher {name!r} is neither given nor in the training config's teacher set")
        if name in self.given:
            return self.given[name].to(self.device)
        if name not in self.built:
            from phis.teachers import build_teacher

            self.built[name] = build_teacher(self.cfgs[name]).to(self.device)
        return self.built[name]


def _heldout_loader(
    train_cfg: Any, teachers: _TeacherSource, batch_size: int, split: str = "auto", limit: int | None = None
) -> tuple[str, DataLoader]:
    """A held-out split of the run's data (``auto``: ``test`` if configured, else ``val``; its first
    ``limit`` images if given) with cached teacher targets."""
    from phis.train import build_datamodule

    dm = build_datamodule(train_cfg)
    if split == "auto":
        split = "test" if "test" in dm.sets else "val"
    elif split not in dm.sets:
        raise ValueError(f"eval.heldout_split={split!r}, but the run's data has only {sorted(dm.sets)}")
    for name, cache in dm.caches.get(split, {}).items():
        cache.ensure(lambda n=name: teachers(n), dm.cache_batch_size, dm.num_workers)  # built only if missing
    return split, DataLoader(dm.dataset(split, limit), batch_size=batch_size)


@torch.no_grad()
def teacher_metrics(
    module: Any, batches: Iterable[Mapping[str, Any]], teachers: Callable[[str], nn.Module] | None = None
) -> dict[str, float]:
    """Held-out teacher-space MSE, explained fraction, error-variance ranges and summary cosine per teacher.

    Batches hold ``images`` and, from the teacher cache, ``targets``; without targets the teachers are
    run on the images. The normalized-space error compares ``predict_normalized`` with the normalizer
    applied to the targets (PHI-S Table 5 reports both spaces).
    """
    dev = _device(module)
    names = list(module.teacher_names)
    meters = {n: (TeacherErrorMeter(), TeacherErrorMeter()) for n in names}
    cos = {n: [0.0, 0] for n in names}
    for batch in batches:
        images = batch["images"].to(dev)
        if "targets" in batch:
            targets = module.targets({**batch, "images": images})  # features [B, h, w, C]
        elif teachers is not None:
            outs = {n: teachers(n)(images) for n in names}
            targets = {n: (o.summary, o.features.permute(0, 2, 3, 1)) for n, o in outs.items()}
        else:
            raise ValueError("held-out batches carry no cached targets and no teachers are available")
        pred, pred_norm = module.predict(images), module.predict_normalized(images)
        for n in names:
            summary, y = targets[n]
            y = y.to(dev).float()
            meters[n][0].update(pred[n].features, y.permute(0, 3, 1, 2))
            meters[n][1].update(pred_norm[n].features, module.normalizers[n](y).permute(0, 3, 1, 2))
            if summary is not None and pred[n].summary is not None:
                c = F.cosine_similarity(pred[n].summary.double(), summary.to(dev).double(), dim=1)
                cos[n][0] += float(c.sum())
                cos[n][1] += len(c)
    out = {}
    for n, (teacher_space, normalized) in meters.items():
        r = teacher_space.result()
        out[f"tmse/{n}"] = r["mse"]
        out[f"tmse_explained/{n}"] = r["explained"]
        out[f"err_var_range/{n}"] = r["error_variance_range"]
        out[f"err_var_range_norm/{n}"] = normalized.result()["error_variance_range"]
        if cos[n][1]:
            out[f"summary_cos/{n}"] = cos[n][0] / cos[n][1]
    return out


def _zero_shot(
    module: Any, name: str, teacher: nn.Module, set_name: str, test: Any, ecfg: EvalConfig
) -> dict[str, float]:
    """Zero-shot metrics of one teacher's summary head on (a spread subset of) a labelled test set."""
    dev = _device(module)
    labels, data = test.labels, test
    if ecfg.zero_shot_images and len(test) > ecfg.zero_shot_images:
        keep = torch.linspace(0, len(test) - 1, ecfg.zero_shot_images).round().long().unique()
        labels, data = labels[keep], Subset(test, keep.tolist())
    student = _summaries(lambda x: module.predict(x)[name].summary, data, ecfg.batch_size, dev)
    own = _summaries(lambda x: teacher(x).summary, data, ecfg.batch_size, dev)
    if getattr(teacher, "has_text", False):
        text = text_classifier(teacher.encode_text, test.class_names, ecfg.templates).cpu()
        return {
            f"zero_shot/{name}/{set_name}": zero_shot_accuracy(student, text, labels),
            f"teacher_zero_shot/{name}/{set_name}": zero_shot_accuracy(own, text, labels),
        }
    head, own = teacher.classify_summary, own.to(dev)
    # labels only mean something to the head when they are ImageNet-1k indices
    scored = labels.to(dev) if set_name == "image_folder" and ecfg.imagenet_labels else None
    res = classifier_zero_shot(student.to(dev), head, scored, own)
    out = {f"zero_shot_agreement/{name}/{set_name}": res["agreement"]}
    if scored is not None:
        out[f"zero_shot/{name}/{set_name}"] = res["accuracy"]
        out[f"teacher_zero_shot/{name}/{set_name}"] = classifier_zero_shot(own, head, scored)["accuracy"]
    return out


def _set_root(ecfg: EvalConfig, name: str) -> str | None:
    roots = {"image_folder": ecfg.image_folder_root, "ade20k": ecfg.ade20k_root, "voc": ecfg.voc_root}
    return roots.get(name)


def _class_names(ecfg: EvalConfig) -> list[str] | None:
    """Readable class names for zero-shot prompts on an image folder (folder names otherwise)."""
    if ecfg.image_folder_names is None:
        return None
    path = Path(ecfg.image_folder_names)
    if not path.is_file():
        raise FileNotFoundError(f"eval.image_folder_names={path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _capped(data: Dataset, limit: int | None) -> Dataset:
    return Subset(data, range(min(limit, len(data)))) if limit else data


def _classification_metrics(
    module: Any,
    set_name: str,
    size: int,
    ecfg: EvalConfig,
    source: _TeacherSource,
    zs_names: Sequence[str],
    metrics: dict[str, float],
    details: dict[str, Any],
    skipped: dict[str, str],
) -> None:
    """kNN, RankMe and zero-shot on one labelled set; results go into the three dicts."""
    root = _set_root(ecfg, set_name)
    names = _class_names(ecfg) if set_name == "image_folder" else None
    train = classification_set(set_name, "train", size, root, ecfg.knn_limit, ecfg.seed, names)
    test = classification_set(set_name, "test", size, root, ecfg.knn_limit, ecfg.seed, names)
    train_x, train_y, _ = _embed(module, train, ecfg.batch_size)
    test_x, test_y, spatial = _embed(module, test, ecfg.batch_size, ecfg.rankme_images)
    k = min(ecfg.knn_k, len(train_y))  # a capped small set may hold fewer than k samples
    metrics[f"knn/{set_name}"] = knn_accuracy(train_x, train_y, test_x, test_y, k, ecfg.knn_temperature)
    details[f"knn/{set_name}"] = {"k": k, "train": len(train_y), "test": len(test_y)}
    if spatial.numel():
        metrics[f"rankme/{set_name}"] = rankme(spatial)
    for n in zs_names if ecfg.zero_shot else ():
        teacher = source(n)
        if getattr(teacher, "has_text", False) or hasattr(teacher, "classify_summary"):
            metrics.update(_zero_shot(module, n, teacher, set_name, test, ecfg))
        else:
            skipped[f"zero_shot/{n}"] = "teacher has neither a text tower nor a classifier head"


def _segmentation_probe(module: Any, set_name: str, size: int, ecfg: EvalConfig) -> dict[str, Any]:
    """Linear-probe segmentation on frozen trunk patch features of one set (mIoU and details)."""
    root = _set_root(ecfg, set_name)
    limit = ecfg.seg_limit if set_name != "collage" else None
    train = _capped(segmentation_set(set_name, "train", size, root, seed=ecfg.seed), limit)
    test = _capped(segmentation_set(set_name, "test", size, root, seed=ecfg.seed), limit)
    _, train_m, train_f = _embed(module, train, ecfg.batch_size, len(train))
    _, test_m, test_f = _embed(module, test, ecfg.batch_size, len(test))
    num_classes = (train.dataset if isinstance(train, Subset) else train).num_classes
    return linear_probe_segmentation(
        train_f,
        train_m,
        test_f,
        test_m,
        num_classes,
        epochs=ecfg.probe_epochs,
        lr=ecfg.probe_lr,
        seed=ecfg.seed,
    )


def evaluate_module(
    module: Any,
    cfg: Any = None,
    *,
    teachers: Mapping[str, nn.Module] | None = None,
    heldout: Iterable[Mapping[str, Any]] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a trained ``DistillModule``; append the record to ``<out_dir>/eval.jsonl`` and return it.

    ``cfg`` is the training config (its ``eval`` group holds ``EvalConfig`` keys; its ``teachers``,
    ``data`` and ``cache`` give the held-out set, cached targets and the teachers to rebuild), an
    ``EvalConfig`` / eval mapping, or None. ``teachers`` (name → Teacher) and ``heldout`` (batches with
    ``images`` and optionally cached ``targets``) override what the config would build. The record holds
    ``metrics`` (flat name → number, names as in the module docstring), ``details`` (per-class IoU …),
    ``skipped`` (what could not run, and why), the settings and timing.
    """
    start = time.perf_counter()
    train_cfg = cfg if _is_train_config(cfg) else None
    if isinstance(cfg, EvalConfig):
        ecfg = cfg
    else:
        ecfg = EvalConfig.from_mapping(cfg.get("eval") if train_cfg is not None else cfg)
    dev = _device(module)
    size = _resolution(module, ecfg)
    source = _TeacherSource(teachers, train_cfg, dev)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    was_training = module.training
    module.eval()
    try:
        if ecfg.teacher_mse:
            split = "given"
            if heldout is None and train_cfg is not None:
                split, heldout = _heldout_loader(
                    train_cfg, source, ecfg.batch_size, ecfg.heldout_split, ecfg.heldout_limit
                )
            elif heldout is None and teachers:
                from phis.data import OfflineImagePool

                split = "offline_test"
                pool = OfflineImagePool("test", size, ecfg.heldout_images, ecfg.seed)
                heldout = ({"images": x} for x in DataLoader(pool, batch_size=ecfg.batch_size))
            details["tmse"] = {"heldout": split}
            if heldout is None:
                skipped["tmse"] = "no held-out batches, teachers or training config to build them from"
            else:
                metrics.update(teacher_metrics(module, heldout, source))

        zs_names = [
            n
            for n in module.teacher_names
            if module.teacher_specs[n].get("summary_dim")
            and source.available(n)
            and source.family(n) in (None, *TEXT_FAMILIES, *CLASSIFIER_FAMILIES)
        ]
        if ecfg.zero_shot and not zs_names:
            skipped["zero_shot"] = "no teacher with a text tower or classifier head is available"
        for set_name in ecfg.knn_sets:
            _classification_metrics(module, set_name, size, ecfg, source, zs_names, metrics, details, skipped)
        for set_name in ecfg.seg_sets:
            res = _segmentation_probe(module, set_name, size, ecfg)
            metrics[SEG_METRIC[set_name]] = res.pop("miou")
            details[SEG_METRIC[set_name]] = res
    finally:
        module.train(was_training)

    record = {
        "step": int(getattr(module, "global_step", 0)),
        "image_size": size,
        "metrics": metrics,
        "details": details,
        "skipped": skipped,
        "config": asdict(ecfg),
        "time_s": round(time.perf_counter() - start, 2),
    }
    if out_dir is None and train_cfg is not None and train_cfg.get("output_dir"):
        out_dir = train_cfg.get("output_dir")
    if out_dir is not None:
        append_jsonl(Path(out_dir) / ecfg.jsonl, record)
    return record


# ----------------------------------------------------------------------------------------------------
# Command line


def find_run_config(checkpoint: Path) -> Path | None:
    """The training run's ``config_resolved.yaml`` next to the checkpoint folder, if there is one."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / "config_resolved.yaml"
        if path.is_file():
            return path
    return None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m phis.eval CHECKPOINT [--out DIR] [--config YAML] [--set key=value ...]``."""
    import argparse

    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description="Evaluate a distilled student checkpoint (phis.eval).")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, help="where eval.jsonl goes (default: the run directory)")
    parser.add_argument(
        "--config", type=Path, help="training config (default: the run's config_resolved.yaml)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="EvalConfig overrides")
    parser.add_argument("--no-teachers", action="store_true", help="skip everything that needs teachers")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")

    from phis.module import DistillModule

    module = DistillModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    config_path = args.config or find_run_config(args.checkpoint)
    overrides = OmegaConf.from_dotlist(list(args.set))
    if args.no_teachers:
        overrides.merge_with({"teacher_mse": False, "zero_shot": False})
    cfg: Any = overrides
    if config_path is not None and not args.no_teachers:
        cfg = OmegaConf.load(config_path)
        cfg.eval = OmegaConf.merge(cfg.get("eval") or {}, overrides)
    elif config_path is None:
        print(f"no config_resolved.yaml near {args.checkpoint}: no teachers or held-out set to rebuild")
    record = evaluate_module(module, cfg, out_dir=args.out or args.checkpoint.parent.parent)
    rows = [[k, f"{v:.4f}"] for k, v in sorted(record["metrics"].items())]
    print(markdown_table(["metric", "value"], rows))
    for what, why in record["skipped"].items():
        print(f"skipped {what}: {why}")
    return record


if __name__ == "__main__":
    main()
