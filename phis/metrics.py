"""Metric primitives of the evaluation, pure functions from tensors to numbers: teacher-space error
(MSE, explained fraction, per-channel error variance), kNN, zero-shot classification, confusion
matrices and mIoU, the linear segmentation probe, RankMe.

Each is checked against a brute-force or closed-form reference in ``tests/test_eval.py``;
``phis.eval`` runs them on a trained module and writes the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phis.evaldata import IGNORE_INDEX
from phis.stats import ChannelMoments

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


def tokens(features: Tensor) -> Tensor:
    """Spatial ``features: [B, C, h, w]`` (or already ``[N, C]``) as a token matrix ``[B*h*w, C]``."""
    if features.ndim == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if features.ndim == 2:
        return features
    raise ValueError(f"expected features [B, C, h, w] or [N, C], got shape {tuple(features.shape)}")


class TeacherErrorMeter:
    """Streams prediction errors and targets of one teacher; gives MSE, target variance and their ratio.

    The one held-out teacher-error computation: the module's held-out metrics, the evaluation and the
    paper tables (Table 5, Fig. 9) all read it. ``dim`` (and ``device``) are needed only to merge
    meters over ranks with :meth:`all_reduce_`. ``strict`` refuses non-finite or empty input; without
    it a diverged prediction gives a NaN MSE (a run's final metrics report it instead of failing).
    """

    def __init__(
        self, dim: int | None = None, device: torch.device | str | None = None, strict: bool = True
    ) -> None:
        self.error = ChannelMoments(dim, device)
        self.target = ChannelMoments(dim, device)
        self.strict = strict

    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``, ``target``: [B, C, h, w] (or [N, C]) in the same space."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
            )
        if self.strict:
            _check_features("prediction", pred, (2, 4))
            _check_features("target", target, (2, 4))
        y = tokens(target).to(torch.float64)
        self.error.update(tokens(pred).to(torch.float64) - y)
        self.target.update(y)

    def all_reduce_(self) -> TeacherErrorMeter:
        """Merge every rank's errors and targets (no-op without a process group); returns self."""
        self.error.all_reduce_()
        self.target.all_reduce_()
        return self

    @property
    def tokens(self) -> int:
        return int(self.target.count)

    @property
    def channel_mse(self) -> Tensor:
        """Teacher-space MSE per channel ``[C]`` (float64; PHI-S Fig. 9)."""
        return self.error.mean_square

    def result(self) -> dict[str, float]:
        """``mse`` (mean over tokens and channels), ``variance`` (mean per-channel target variance),
        ``explained`` = 1 − mse / variance, and the per-channel error-variance range (PHI-S Table 5)."""
        if self.tokens == 0:
            raise ValueError("no held-out tokens were measured")
        mse = float(self.channel_mse.mean())
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


def teacher_metric_names(per_teacher: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``heldout_metrics`` results (teacher → numbers) under the metric names ``phis.ranks`` reads."""
    out = {}
    for n, r in per_teacher.items():
        out[f"tmse/{n}"] = r["mse_teacher"]
        if r.get("explained") is not None:
            out[f"tmse_explained/{n}"] = r["explained"]
        if "error_variance_range" in r:
            out[f"err_var_range/{n}"] = r["error_variance_range"]
            out[f"err_var_range_norm/{n}"] = r["error_variance_range_normalized"]
        if r.get("summary_cosine") is not None:
            out[f"summary_cos/{n}"] = r["summary_cosine"]
    return out


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
