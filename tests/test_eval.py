"""Evaluation metrics against brute-force / closed-form references, and hostile inputs."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score
from torch import nn

from phis.eval import evaluate_module
from phis.evalconfig import EvalConfig
from phis.evaldata import (
    ImageFolderSet,
    ade20k_set,
    classification_set,
    collage_set,
    digits_set,
    photo_crops_set,
    voc_set,
)
from phis.metrics import (
    TeacherErrorMeter,
    class_prompts,
    classifier_zero_shot,
    confusion_matrix,
    knn_accuracy,
    knn_predict,
    linear_probe_segmentation,
    miou,
    rankme,
    teacher_mse,
    text_classifier,
    zero_shot_accuracy,
)
from phis.teachers import TeacherOutput

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_knn(train_x, train_y, test_x, k, temperature):
    """Reference: float64 loops over every test point."""
    tr = train_x.double().numpy()
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    preds = []
    for q in test_x.double().numpy():
        q = q / np.linalg.norm(q)
        sims = tr @ q
        order = np.argsort(-sims, kind="stable")[:k]
        votes: dict[int, float] = {}
        for i in order:
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + math.exp(sims[i] / temperature)
        preds.append(max(sorted(votes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 16, generator=gen)
    train_y = torch.randint(0, 5, (300,), generator=gen)
    test_y = torch.randint(0, 5, (80,), generator=gen)
    train_x = centres[train_y] + 1.2 * torch.randn(300, 16, generator=gen)
    test_x = centres[test_y] + 1.2 * torch.randn(80, 16, generator=gen)
    for k, t in ((20, 0.07), (1, 0.07), (7, 1.0)):
        ours = knn_predict(train_x, train_y, test_x, k=k, temperature=t, chunk_size=17)
        assert torch.equal(ours, brute_force_knn(train_x, train_y, test_x, k, t)), (k, t)
    acc = knn_accuracy(train_x, train_y, test_x, test_y)
    assert acc == pytest.approx(
        float((brute_force_knn(train_x, train_y, test_x, 20, 0.07) == test_y).float().mean())
    )
    assert 0.5 < acc <= 1.0  # clusters are separable enough to beat chance (0.2) by far


def test_knn_votes_are_similarity_weighted() -> None:
    # one very close neighbour of class 1 outweighs two distant ones of class 0 at T = 0.07
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    train_y = torch.tensor([1, 0, 0])
    test_x = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train_x, train_y, test_x, k=3).item() == 1
    # with a huge temperature the weights flatten and the majority wins
    assert knn_predict(train_x, train_y, test_x, k=3, temperature=1e6).item() == 0


def test_knn_hostile_inputs() -> None:
    x, y = torch.randn(10, 4), torch.arange(10) % 2
    with pytest.raises(ValueError, match="k=20 must be between 1 and the number of training samples"):
        knn_accuracy(x, y, x, y, k=20)
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(x[:0], y[:0], x, y, k=1)
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(x, y, x[:0], y[:0], k=1)
    bad = x.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        knn_accuracy(bad, y, x, y, k=3)
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(x, y[:5], x, y, k=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(x, y, x, y, k=3, temperature=0.0)


def test_zero_shot_accuracy_and_text_classifier() -> None:
    text = torch.eye(3)
    images = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.2, 0.1], [0.0, 0.0, -1.0], [0.1, 0.0, 3.0]])
    # predictions 0, 1, 0 (first of the tied maxima), 2
    assert zero_shot_accuracy(images, text, torch.tensor([0, 1, 2, 2])) == pytest.approx(0.75)
    assert class_prompts(["cat", "dog"]) == ["a photo of a cat.", "a photo of a dog."]
    with pytest.raises(ValueError, match="slot"):
        class_prompts(["cat"], "a photo")
    with pytest.raises(ValueError, match="only 3 class embeddings"):
        zero_shot_accuracy(images, text, torch.tensor([0, 1, 2, 3]))

    calls = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(texts)
        scale = 2.0 if texts[0].startswith("a photo") else 1.0
        return scale * torch.tensor([[1.0, 0.0], [0.0, 1.0]]) + torch.tensor([[0.0, 1.0], [0.0, 0.0]])

    emb = text_classifier(encode, ["cat", "dog"], templates=("a photo of a {c}.", "art of a {c}"))
    assert calls == [["a photo of a cat.", "a photo of a dog."], ["art of a cat", "art of a dog"]]
    # class 0: mean of normalize([2, 1]) and normalize([1, 1]), renormalized
    ref = torch.nn.functional.normalize(
        torch.tensor([2.0, 1.0]) / math.sqrt(5) + torch.tensor([1.0, 1.0]) / math.sqrt(2), dim=0
    )
    assert torch.allclose(emb[0], ref, atol=1e-6) and torch.allclose(emb[1], torch.tensor([0.0, 1.0]))


def test_classifier_zero_shot_agreement_and_accuracy() -> None:
    head = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
    teacher = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0], [0, 0, 3.0, 0]])
    student = torch.tensor([[2.0, 1, 0, 0], [0, 0, 1.0, 0], [0, 0, 2.0, 0], [1.0, 0, 0, 0]])
    out = classifier_zero_shot(student, head, labels=torch.tensor([0, 1, 2, 0]), teacher_summary=teacher)
    assert out == {"accuracy": pytest.approx(0.75), "agreement": pytest.approx(0.5)}
    assert set(classifier_zero_shot(student, head, teacher_summary=teacher)) == {"agreement"}
    with pytest.raises(ValueError, match="needs labels"):
        classifier_zero_shot(student, head)


def test_teacher_mse_against_float64_reference_on_offset_features() -> None:
    gen = torch.Generator().manual_seed(2)
    # SAM-like: channel means near -60, std ~5, in float32
    target = (-60.0 + 5.0 * torch.randn(6, 32, 4, 4, generator=gen, dtype=torch.float64)).float()
    pred = target + 0.7 * torch.randn(target.shape, generator=gen)
    y = target.double().permute(0, 2, 3, 1).reshape(-1, 32)
    e = pred.double().permute(0, 2, 3, 1).reshape(-1, 32) - y
    mse_ref = float((e**2).mean())
    var_ref = float(y.var(0, unbiased=False).mean())
    err_var = e.var(0, unbiased=False)
    out = teacher_mse(pred, target)
    assert out["mse"] == pytest.approx(mse_ref, rel=1e-9)
    assert out["variance"] == pytest.approx(var_ref, rel=1e-9)
    assert out["explained"] == pytest.approx(1 - mse_ref / var_ref, rel=1e-9)
    assert out["error_variance_range"] == pytest.approx(float(err_var.max() - err_var.min()), rel=1e-9)
    # streamed in uneven batches: the same numbers
    meter = TeacherErrorMeter()
    for sl in (slice(0, 1), slice(1, 4), slice(4, 6)):
        meter.update(pred[sl], target[sl])
    assert meter.result()["mse"] == pytest.approx(mse_ref, rel=1e-9)
    assert meter.result()["variance"] == pytest.approx(var_ref, rel=1e-9)
    # perfect prediction explains everything; predicting the channel means explains nothing
    assert teacher_mse(target, target)["explained"] == 1.0
    means = target.double().mean(dim=(0, 2, 3), keepdim=True).expand_as(target)
    assert teacher_mse(means, target.double())["explained"] == pytest.approx(0.0, abs=1e-9)


def test_teacher_mse_hostile_inputs() -> None:
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        teacher_mse(x, x[:, :2])
    bad = x.clone()
    bad[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        teacher_mse(bad, x)
    with pytest.raises(ValueError, match="empty"):
        teacher_mse(x[:0], x[:0])


def test_confusion_matrix_and_miou_against_sklearn() -> None:
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (4, 10, 10), generator=gen)
    target[0, :3] = 255
    target[target == 3] = 4  # class 3 never occurs in ground truth ...
    pred = torch.randint(0, 5, (4, 10, 10), generator=gen)
    pred[pred == 2] = 1  # ... and class 2 is never predicted
    conf = confusion_matrix(pred, target, 5)
    keep = target != 255
    assert int(conf.sum()) == int(keep.sum())
    mean, iou = miou(conf)
    ref = jaccard_score(target[keep].numpy(), pred[keep].numpy(), labels=[0, 1, 2, 3, 4], average=None)
    present = [c for c in range(5) if (target[keep] == c).any() or (pred[keep] == c).any()]
    assert np.allclose(iou.numpy()[present], ref[present])
    assert mean == pytest.approx(float(np.mean(ref[present])))
    # a class absent from both prediction and truth is NaN and left out of the mean
    conf2 = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 3)
    m2, iou2 = miou(conf2)
    assert math.isnan(iou2[2]) and m2 == pytest.approx((1 / 2 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="mask labels must lie in 0..2"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3)
    with pytest.raises(ValueError, match="no labelled pixels"):
        miou(torch.zeros(3, 3, dtype=torch.int64))


def _seg_problem(n: int, informative: bool, gen: torch.Generator):
    """Masks of 4 classes in 2x2-patch blocks on an 8x8 patch grid (x4 pixels); features one-hot + noise
    or pure noise. Blocks keep bilinear upsampling of the logits from blurring most pixels."""
    grid = torch.randint(0, 4, (n, 4, 4), generator=gen).repeat_interleave(2, 1).repeat_interleave(2, 2)
    masks = grid.repeat_interleave(4, 1).repeat_interleave(4, 2)
    masks[:, 0, :] = 255
    noise = 0.3 * torch.randn(n, 12, 8, 8, generator=gen)
    onehot = torch.nn.functional.one_hot(grid, 12).permute(0, 3, 1, 2).float()
    return (onehot + noise if informative else noise), masks


def test_linear_probe_segmentation_learns_separable_features_only() -> None:
    gen = torch.Generator().manual_seed(4)
    good_tr, m_tr = _seg_problem(16, True, gen)
    good_te, m_te = _seg_problem(6, True, gen)
    out = linear_probe_segmentation(
        good_tr, m_tr, good_te, m_te, num_classes=4, epochs=8, lr=5e-2, batch_size=4
    )
    # an oracle reaches ~0.94 pixel accuracy here (bilinear logits blur block corners)
    assert out["miou"] > 0.75 and out["pixel_accuracy"] > 0.85 and len(out["per_class_iou"]) == 4
    bad_tr, _ = _seg_problem(16, False, gen)
    bad_te, _ = _seg_problem(6, False, gen)
    chance = linear_probe_segmentation(
        bad_tr, m_tr, bad_te, m_te, num_classes=4, epochs=8, lr=5e-2, batch_size=4
    )
    assert chance["miou"] < 0.35
    # deterministic for a fixed seed
    again = linear_probe_segmentation(
        good_tr, m_tr, good_te, m_te, num_classes=4, epochs=8, lr=5e-2, batch_size=4
    )
    assert again["miou"] == out["miou"]


def test_linear_probe_segmentation_hostile_inputs() -> None:
    f, m = torch.randn(2, 3, 2, 2), torch.zeros(2, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="masks"):
        linear_probe_segmentation(f, m[:1], f, m, num_classes=2)
    with pytest.raises(ValueError, match="no labelled pixel"):
        linear_probe_segmentation(f, m + 255, f, m, num_classes=2)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        linear_probe_segmentation(f, m, f, m, num_classes=1)
    bad = f.clone()
    bad[1, 2, 1, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        linear_probe_segmentation(f, m, bad, m, num_classes=2)


def test_rankme_known_answers() -> None:
    q, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    for r in (1, 5, 17):
        x = q[:, :r] @ torch.eye(r, 8 * 4, dtype=torch.float64) * 3.0  # r equal singular values
        assert rankme(x, eps=0.0) == pytest.approx(r, rel=1e-9)
        assert rankme(x) == pytest.approx(r, rel=1e-4)  # the default eps adds (D - r) tiny terms
    x = torch.randn(40, 6, dtype=torch.float64) * torch.tensor([5.0, 3, 1, 0.5, 0.1, 0.01])
    s = np.linalg.svd(x.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(x) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    # spatial [B, D, h, w]: every position is a sample
    spatial = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    flat = spatial.permute(0, 2, 3, 1).reshape(-1, 6)
    assert rankme(spatial) == pytest.approx(rankme(flat), rel=1e-12)


def test_rankme_hostile_inputs() -> None:
    with pytest.raises(ValueError, match="all zero"):
        rankme(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="empty"):
        rankme(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="non-finite"):
        rankme(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="2-D or 4-D"):
        rankme(torch.zeros(5))


# ----------------------------------------------------------------------------------------------------
# Evaluation sets (phis.evaldata)


def test_digits_set_split_and_range() -> None:
    train, test = digits_set("train", 16), digits_set("test", 16)
    assert len(train) + len(test) == 1797 and len(test) == 540
    assert (
        train.images.shape[1:] == (3, 16, 16)
        and 0.0 <= float(train.images.min()) <= float(train.images.max()) <= 1.0
    )
    assert sorted(train.labels.unique().tolist()) == list(range(10)) and train.class_names[7] == "seven"
    assert len(digits_set("test", 16, limit=30)) == 30
    with pytest.raises(ValueError, match="unknown split 'val'"):
        digits_set("val")


def test_photo_crops_never_cross_the_split_cells(monkeypatch) -> None:
    import phis.evaldata as ed

    # a synthetic photo whose value encodes its 3x3 cell: crops of a split may only contain its cells
    cell = torch.arange(9, dtype=torch.float32).reshape(3, 3) / 10
    fake = cell.repeat_interleave(40, 0).repeat_interleave(50, 1).expand(3, -1, -1)
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        allowed = {round(float(cell[r, c]), 4) for r, c in ed._cells(split)}
        for _ in range(30):
            crop = ed._photo_crop(fake, split, 8, gen)
            assert {round(v, 4) for v in crop.unique().tolist()} <= allowed
    assert not set(ed._cells("train")) & set(ed._cells("test"))
    assert sorted(r for r, _ in ed._cells("test")) == [0, 1, 2] == sorted(c for _, c in ed._cells("test"))
    a, b = photo_crops_set("test", 16, per_class=2), photo_crops_set("test", 16, per_class=2)
    assert torch.equal(a.images, b.images) and len(a) == 2 * len(a.class_names)


def test_collage_masks_label_every_pixel_with_a_source() -> None:
    data = collage_set("train", 32, count=6)
    assert data.images.shape == (6, 3, 32, 32) and data.masks.shape == (6, 32, 32)
    assert int(data.masks.min()) >= 0 and int(data.masks.max()) < data.num_classes
    assert all(len(m.unique()) >= 2 for m in data.masks)


def _write_image(path, size=(20, 12), color=(128, 128, 128)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)


def _write_mask(path, array, palette=False) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8), mode="L")
    if palette:
        img = img.convert("P")
    img.save(path)


def test_image_folder_loader_and_errors(tmp_path) -> None:
    for cls, n in (("n02", 2), ("n01", 1)):
        for i in range(n):
            _write_image(tmp_path / "train" / cls / f"{i}.jpg")
    data = ImageFolderSet(tmp_path / "train", size=8)
    assert data.class_names == ["n01", "n02"] and data.labels.tolist() == [0, 1, 1]
    assert ImageFolderSet(tmp_path / "train", size=8, limit=2).labels.tolist() == [0, 1]
    image, label = data[0]
    assert image.shape == (3, 8, 8) and label == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSet(tmp_path / "missing")
    with pytest.raises(ValueError, match="1 class names given for 2 class folders"):
        ImageFolderSet(tmp_path / "train", class_names=["x"])
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderSet(tmp_path / "empty")
    with pytest.raises(ValueError, match="needs root"):
        classification_set("image_folder", "train", 8)
    with pytest.raises(ValueError, match="unknown classification set"):
        classification_set("imagenet", "train", 8)


def test_ade20k_loader_remaps_labels(tmp_path) -> None:
    _write_image(tmp_path / "images" / "validation" / "a.jpg", size=(16, 16))
    mask = np.zeros((16, 16))
    mask[:, 8:] = 1
    mask[:4] = 150
    _write_mask(tmp_path / "annotations" / "validation" / "a.png", mask)
    data = ade20k_set(tmp_path, "test", size=16)
    _, m = data[0]
    assert data.num_classes == 150
    assert set(m[8:, :8].unique().tolist()) == {255} and set(m[8:, 8:].unique().tolist()) == {0}
    assert set(m[:4].unique().tolist()) == {149}
    with pytest.raises(FileNotFoundError, match="images/<split>"):
        ade20k_set(tmp_path, "train")
    (tmp_path / "annotations" / "validation" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="annotation .*a.png"):
        ade20k_set(tmp_path, "test")


def test_voc_loader_keeps_ignore_border_and_checks_lists(tmp_path) -> None:
    _write_image(tmp_path / "JPEGImages" / "2007_1.jpg", size=(16, 16))
    mask = np.zeros((16, 16))
    mask[4:12, 4:12] = 15
    mask[4, 4:12] = 255
    _write_mask(tmp_path / "SegmentationClass" / "2007_1.png", mask, palette=True)
    lists = tmp_path / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2007_1\n")
    data = voc_set(tmp_path, "test", size=16)
    _, m = data[0]
    assert data.num_classes == 21 and set(m.unique().tolist()) == {0, 15, 255}
    with pytest.raises(FileNotFoundError, match="train.txt"):
        voc_set(tmp_path, "train")
    (lists / "train.txt").write_text("2007_2\n")
    with pytest.raises(FileNotFoundError, match="2007_2.jpg"):
        voc_set(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        voc_set(tmp_path / "nowhere", "test")


# ----------------------------------------------------------------------------------------------------
# evaluate_module on a real (tiny) DistillModule with stand-in teachers, and the command line


class PooledTeacher(nn.Module):
    """Deterministic stand-in teacher: summary and features are fixed linear maps of pooled pixels."""

    def __init__(self, summary_dim: int | None, feature_dim: int, grid: int, seed: int, offset: float = 0.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.grid, self.summary_dim, self.feature_dim = grid, summary_dim, feature_dim
        self.register_buffer("f", torch.randn(feature_dim, 3, generator=gen))
        self.register_buffer("s", torch.randn(summary_dim or 1, 12, generator=gen))
        self.offset = offset

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, self.grid)  # [B, 3, g, g]
        feats = torch.einsum("fc,bchw->bfhw", self.f, pooled) * 3 + self.offset
        small = torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)  # [B, 12]
        summary = small @ self.s.T if self.summary_dim else None
        return TeacherOutput(summary, feats)


class TextTeacher(PooledTeacher):
    has_text = True

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        import zlib

        rows = [
            torch.randn(self.summary_dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
            for t in texts
        ]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


class ClassifierTeacher(PooledTeacher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = nn.Linear(self.summary_dim, 5)

    def classify_summary(self, summary: torch.Tensor) -> torch.Tensor:
        return self.head(summary)


SPECS = {
    "clip": {"summary_dim": 8, "feature_dim": 12, "grid": [2, 2]},
    "sam": {"summary_dim": None, "feature_dim": 8, "grid": [4, 4]},
    "cls": {"summary_dim": 6, "feature_dim": 4, "grid": [2, 2]},
}


def tiny_module(specs: dict | None = None):
    from phis.module import DistillModule

    return DistillModule(
        teachers=specs or SPECS,
        student={
            "model": "vit_tiny_patch16_224",
            "img_size": 32,
            "num_registers": 1,
            "head_hidden_dim": 16,
            "trunk_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
        },
        normalizer={"name": "phi_s"},
        loss={"name": "mse"},
        distill={
            "summary_weight": 1.0, "feature_weight": 1.0, "adaloss": False, "adaloss_momentum": 0.99,
            "normalizer_fit": "cache", "estimate_steps": 0, "refit_every": 100, "freeze_trunk_steps": 0,
            "resample_to": "student", "resample_mode": "bilinear",
        },
        optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 1,
               "min_lr_ratio": 0.01},
        max_steps=1,
    )  # fmt: skip


def stand_in_teachers() -> dict:
    return {
        "clip": TextTeacher(8, 12, 2, seed=1),
        "sam": PooledTeacher(None, 8, 4, seed=2, offset=-60.0),
        "cls": ClassifierTeacher(6, 4, 2, seed=3),
    }


def cached_batches(teachers: dict, images: torch.Tensor | None = None) -> list[dict]:
    """Held-out batches in the DistillDataset layout (features channels-last, as the teacher cache stores)."""
    if images is None:
        images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    out = []
    for batch in images.split(4):
        targets = {}
        for name, t in teachers.items():
            o = t(batch)
            targets[name] = {"features": o.features.permute(0, 2, 3, 1)}
            if o.summary is not None:
                targets[name]["summary"] = o.summary
        out.append({"images": batch, "targets": targets})
    return out


def fit_normalizers(module, teachers: dict) -> None:
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for name, t in teachers.items():
        norm = module.normalizers[name]
        norm.update(t(images).features.permute(0, 2, 3, 1))
        norm.fit()


SMALL = {
    "knn_sets": ["photos"],
    "knn_limit": 42,
    "zero_shot_images": 20,
    "seg_sets": ["collage"],
    "probe_epochs": 2,
    "batch_size": 32,
}


def test_heldout_metrics_match_a_brute_force_reference() -> None:
    """The one held-out teacher-error path against float64 arithmetic on the concatenated batches."""
    module, teachers = tiny_module(), stand_in_teachers()
    fit_normalizers(module, teachers)
    batches = cached_batches(teachers)
    res = module.heldout_metrics(batches, per_channel=True)
    module.eval()
    for name, spec in SPECS.items():
        dim = spec["feature_dim"]
        with torch.no_grad():
            pred = torch.cat([module.predict(b["images"])[name].features for b in batches])
            pred_n = torch.cat([module.predict_normalized(b["images"])[name].features for b in batches])
            y = torch.cat([b["targets"][name]["features"] for b in batches])  # [B, h, w, C]
            y_n = module.normalizers[name](y)
        err = (pred.permute(0, 2, 3, 1).double() - y.double()).reshape(-1, dim)
        err_n = (pred_n.permute(0, 2, 3, 1).double() - y_n.double()).reshape(-1, dim)
        channel_mse = err.square().mean(0)
        variance = float(y.double().reshape(-1, dim).var(0, unbiased=False).mean())
        r = res[name]
        assert r["tokens"] == err.shape[0]
        torch.testing.assert_close(r["channel_mse"], channel_mse, rtol=1e-9, atol=1e-12)
        assert r["mse_teacher"] == pytest.approx(float(channel_mse.mean()), rel=1e-9)
        assert r["variance"] == pytest.approx(variance, rel=1e-9)
        assert r["explained"] == pytest.approx(1 - float(channel_mse.mean()) / variance, rel=1e-9)
        ev, ev_n = err.var(0, unbiased=False), err_n.var(0, unbiased=False)
        assert r["error_variance_range"] == pytest.approx(float(ev.max() - ev.min()), rel=1e-6, abs=1e-12)
        assert r["error_variance_range_normalized"] == pytest.approx(
            float(ev_n.max() - ev_n.min()), rel=1e-6, abs=1e-12
        )
        if "summary" in batches[0]["targets"][name]:
            with torch.no_grad():
                s = torch.cat([module.predict(b["images"])[name].summary for b in batches]).double()
            s_t = torch.cat([b["targets"][name]["summary"] for b in batches]).double()
            cos = torch.nn.functional.cosine_similarity(s, s_t, dim=1).mean()
            assert r["summary_cosine"] == pytest.approx(float(cos), rel=1e-9)
        else:
            assert r["summary_cosine"] is None
    assert "channel_mse" not in module.heldout_metrics(batches)["sam"]


def test_evaluate_module_end_to_end(tmp_path) -> None:
    module, teachers = tiny_module(), stand_in_teachers()
    fit_normalizers(module, teachers)
    batches = cached_batches(teachers)
    rec = evaluate_module(module, SMALL, teachers=teachers, heldout=batches, out_dir=tmp_path)
    m = rec["metrics"]
    # the metric names map the module's held-out metrics (checked against brute force below)
    ref = module.heldout_metrics(batches)
    for name in SPECS:
        assert m[f"tmse/{name}"] == pytest.approx(ref[name]["mse_teacher"], rel=1e-6)
        assert m[f"tmse_explained/{name}"] == pytest.approx(ref[name]["explained"], rel=1e-6, abs=1e-9)
        assert m[f"err_var_range/{name}"] >= 0 and m[f"err_var_range_norm/{name}"] >= 0
    assert m["summary_cos/clip"] == pytest.approx(ref["clip"]["summary_cosine"], rel=1e-6)
    assert "summary_cos/sam" not in m
    for key in ("knn/photos", "zero_shot/clip/photos", "teacher_zero_shot/clip/photos",
                "zero_shot_agreement/cls/photos", "seg/collage"):  # fmt: skip
        assert 0.0 <= m[key] <= 1.0, key
    assert "zero_shot/cls/photos" not in m  # photo classes are not the classifier's label space
    assert float(m["zero_shot/clip/photos"] * 20).is_integer()  # scored on 20 of the 42 test images
    # RankMe of the first rankme_images test images' patch tokens, recomputed from SVD in float64
    test_set = classification_set("photos", "test", 32, None, SMALL["knn_limit"], 0, None)
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    assert module.training  # evaluate_module restored training mode (checked again below)
    with torch.no_grad():
        feats = module.eval().embed(images)[1]  # [N, D, h, w]; N = 42 < rankme_images
    module.train()
    sigma = torch.linalg.svdvals(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double())
    p = sigma / sigma.sum() + 1e-7
    assert m["rankme/photos"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    assert rec["details"]["knn/photos"]["k"] == 20 and rec["image_size"] == 32
    assert len(rec["details"]["seg/collage"]["per_class_iou"]) == 14
    assert not rec["skipped"] and module.training  # training mode restored
    assert rec["details"]["tmse"] == {"heldout": "given"}
    # teachers only: held-out images are the offline pool's unseen photos, targets from the teachers
    from phis.photos import OfflineImagePool

    only = evaluate_module(module, {"knn_sets": [], "seg_sets": [], "heldout_images": 8}, teachers=teachers)
    pool = torch.stack([OfflineImagePool("test", 32, 8)[i] for i in range(8)])
    ref = module.heldout_metrics(cached_batches(teachers, images=pool))
    assert only["metrics"]["tmse/sam"] == pytest.approx(ref["sam"]["mse_teacher"], rel=1e-6)
    evaluate_module(
        module, {**SMALL, "teacher_mse": False, "zero_shot": False, "seg_sets": []}, out_dir=tmp_path
    )
    lines = (tmp_path / "eval.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["metrics"].keys() == {"knn/photos", "rankme/photos"}


def test_evaluate_module_reports_what_it_skipped() -> None:
    rec = evaluate_module(tiny_module(), {**SMALL, "knn_sets": [], "seg_sets": []})
    assert set(rec["skipped"]) == {"tmse", "zero_shot"} and rec["metrics"] == {}
    with pytest.raises(ValueError, match=r"unknown eval option\(s\) \['knn_sets_typo'\]"):
        evaluate_module(tiny_module(), {"knn_sets_typo": []})
    with pytest.raises(ValueError, match="unknown eval set"):
        evaluate_module(tiny_module(), {"seg_sets": ["coco"]})


class PixelStudent(nn.Module):
    """Stand-in student whose features are pooled pixel statistics (sees the content) or noise (blind)."""

    def __init__(self, blind: bool) -> None:
        super().__init__()
        self.blind, self.anchor = blind, nn.Parameter(torch.zeros(1))
        self.teacher_names, self.teacher_specs = [], {}

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.nn.functional.avg_pool2d
        mean = pool(images, 8)
        feats = torch.cat([mean, (pool(images**2, 8) - mean**2).clamp_min(0).sqrt()], 1)  # [B, 6, S/8, S/8]
        summary = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)  # [B, 48]
        if self.blind:
            return torch.randn_like(summary), torch.randn_like(feats)
        return summary, feats


def test_offline_sets_reward_a_student_that_sees_the_images() -> None:
    cfg = EvalConfig(image_size=32, knn_sets=("photos", "digits"), knn_limit=420, teacher_mse=False,
                     zero_shot=False, probe_epochs=10, probe_lr=5e-2, knn_spatial=True)  # fmt: skip
    seeing = evaluate_module(PixelStudent(blind=False), cfg)["metrics"]
    blind = evaluate_module(PixelStudent(blind=True), cfg)["metrics"]
    assert seeing["knn/photos"] > 0.25 > 0.15 > blind["knn/photos"]  # 14 classes: chance 0.07
    assert seeing["knn/digits"] > 0.7 > 0.2 > blind["knn/digits"]  # 10 classes: chance 0.1
    assert seeing["seg/collage"] > blind["seg/collage"] + 0.08
    # pooled patch features keep the photos' colour statistics (digits differ in shape, not in them)
    assert seeing["knn_spatial/photos"] > 0.25 > 0.15 > blind["knn_spatial/photos"]


def test_spatial_knn_is_the_knn_of_mean_pooled_patch_features() -> None:
    from phis.evaldata import classification_set

    student = PixelStudent(blind=False)
    cfg = EvalConfig(image_size=32, knn_sets=("photos",), knn_limit=42, knn_spatial=True, knn_k=5,
                     teacher_mse=False, zero_shot=False, seg_sets=(), rankme_images=0)  # fmt: skip
    m = evaluate_module(student, cfg)["metrics"]
    assert set(m) == {"knn/photos", "knn_spatial/photos"}
    split = {s: classification_set("photos", s, 32, None, 42, 0, None) for s in ("train", "test")}
    feats, labels = {}, {}
    for s, data in split.items():
        images = torch.stack([data[i][0] for i in range(len(data))])
        labels[s] = torch.tensor([int(data[i][1]) for i in range(len(data))])
        summary, spatial = student.embed(images)
        feats[s] = (summary, spatial.double().mean((2, 3)).float())
    for key, j in (("knn/photos", 0), ("knn_spatial/photos", 1)):
        ref = knn_accuracy(feats["train"][j], labels["train"], feats["test"][j], labels["test"], 5, 0.07)
        assert m[key] == pytest.approx(ref), key


def test_cli_on_a_checkpoint(tmp_path, capsys) -> None:
    import lightning

    from phis.eval import main

    module = tiny_module()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
             "pytorch-lightning_version": lightning.__version__}  # fmt: skip
    torch.save(state, ckpt)
    (rec,) = main([str(ckpt), "--set", "knn_sets=[photos]", "knn_limit=28", "seg_sets=[]"])
    assert "no config_resolved.yaml" in capsys.readouterr().out
    assert set(rec["metrics"]) == {"knn/photos", "rankme/photos"} and set(rec["skipped"]) == {
        "tmse",
        "zero_shot",
    }
    assert json.loads((run / "eval.jsonl").read_text())["metrics"] == rec["metrics"]
    main(
        [
            str(ckpt),
            "--out",
            str(tmp_path / "elsewhere"),
            "--no-teachers",
            "--set",
            "knn_sets=[]",
            "seg_sets=[]",
        ]
    )
    assert (tmp_path / "elsewhere" / "eval.jsonl").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.ckpt")])


def test_cli_updates_a_finished_runs_results(tmp_path, capsys) -> None:
    """--update-results replaces results.json's eval block (keeping the old one), keeps training's held-out
    teacher MSE, and skips a run already evaluated with the same settings."""
    import lightning

    from phis.eval import main
    from phis.results import RESULTS_FILE, atomic_write_json, read_json, run_metrics

    module = tiny_module()
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                 "pytorch-lightning_version": lightning.__version__}  # fmt: skip
        torch.save(state, run / "checkpoints" / "last.ckpt")
        runs.append(run)
    heldout = {"val": {"sam": {"mse_teacher": 0.25, "explained": 0.5, "tokens": 9}}}
    old_eval = {"metrics": {"knn/photos": 0.125}, "config": {"knn_limit": 128}}
    atomic_write_json(runs[0] / RESULTS_FILE, {"status": "finished", "heldout": heldout, "eval": old_eval})
    ckpts = [str(r / "checkpoints" / "last.ckpt") for r in runs]
    settings = ["--set", "knn_sets=[photos]", "knn_limit=28", "knn_spatial=true", "seg_sets=[]",
                "teacher_mse=true", "zero_shot=false"]  # fmt: skip
    with pytest.raises(SystemExit):  # run b has no results.json: nothing is evaluated
        main([*ckpts, "--update-results", *settings])
    assert "needs finished runs" in capsys.readouterr().err
    assert "eval_previous" not in read_json(runs[0] / RESULTS_FILE)
    (rec,) = main([ckpts[0], "--update-results", *settings])
    res = read_json(runs[0] / RESULTS_FILE)
    assert res["eval_previous"] == old_eval and res["eval"]["metrics"] == rec["metrics"]
    assert set(rec["metrics"]) == {"knn/photos", "knn_spatial/photos", "rankme/photos"}
    assert rec["details"]["tmse"] == {"heldout": "val", "stored_in": "heldout.val"}
    assert run_metrics(res)["tmse/sam"] == 0.25  # training's held-out teacher MSE, not re-measured
    assert main([ckpts[0], "--update-results", *settings]) == []  # same settings: skipped
    assert "skipped" in capsys.readouterr().out
    assert read_json(runs[0] / RESULTS_FILE)["eval_previous"] == old_eval


def test_evaluate_module_from_a_training_config(tmp_path) -> None:
    """The end-of-training call: held-out targets from the teacher cache, teachers rebuilt from the config."""
    from omegaconf import OmegaConf

    from phis.build import build_datamodule

    pool = {"_target_": "phis.photos.OfflineImagePool", "size": 32, "count": 8}
    cfg = OmegaConf.create(
        {
            "teachers": {
                "clip": {"family": "open_clip", "tiny": True},
                "cnn": {"family": "timm", "model": "resnet10t", "pretrained": False, "input_size": 64,
                        "feature_tap": -2, "model_kwargs": {"channels": [16, 16, 24, 32], "stem_width": 8,
                                                            "num_classes": 10}},
            },
            "data": {"train": {**pool, "split": "train"}, "val": {**pool, "split": "val"},
                     "test": {**pool, "split": "test"}, "batch_size": 4, "num_workers": 0},
            "cache": {"enabled": True, "dir": str(tmp_path / "cache"), "dtype": "float32", "batch_size": 8},
            "seed": 0,
            "output_dir": str(tmp_path / "run"),
            "eval": {"enabled": True, "knn_sets": ["photos"], "knn_limit": 28, "seg_sets": []},
        }
    )  # fmt: skip
    dm = build_datamodule(cfg)
    specs = {n: {**s, "grid": list(s["grid"])} for n, s in dm.teacher_specs().items()}
    module = tiny_module(specs)
    dm.prepare_data()
    module.fit_normalizers(dm.caches["train"], 32)
    rec = evaluate_module(module, cfg)
    m = rec["metrics"]
    ref = module.heldout_metrics(dm.heldout_dataloader("test"))  # the final held-out split
    for n in specs:
        assert m[f"tmse/{n}"] == pytest.approx(ref[n]["mse_teacher"], rel=1e-6)
    assert 0 <= m["zero_shot/clip/photos"] <= 1 and 0 <= m["teacher_zero_shot/clip/photos"] <= 1
    assert 0 <= m["zero_shot_agreement/cnn/photos"] <= 1 and not rec["skipped"]
    assert rec["details"]["tmse"] == {"heldout": "test"}
    assert json.loads((tmp_path / "run" / "eval.jsonl").read_text())["metrics"] == m


def test_evaluate_module_on_a_users_image_folder(tmp_path) -> None:
    for split in ("train", "val"):
        for cls, color in (("n01", (200, 30, 30)), ("n02", (30, 30, 200))):
            for i in range(4):
                _write_image(tmp_path / split / cls / f"{i}.png", size=(24 + i, 16), color=color)
    names = tmp_path / "names.txt"
    names.write_text("dark\nbright\n")
    root, names = str(tmp_path), str(names)
    cfg = {"knn_sets": ["image_folder"], "image_folder_root": root, "image_folder_names": names, "knn_k": 3,
           "seg_sets": [], "teacher_mse": False, "zero_shot": False, "image_size": 16}  # fmt: skip
    rec = evaluate_module(PixelStudent(blind=False), cfg)
    assert rec["metrics"]["knn/image_folder"] == 1.0 and rec["details"]["knn/image_folder"]["test"] == 8
    with pytest.raises(FileNotFoundError, match="image_folder_names"):
        evaluate_module(PixelStudent(blind=False), {**cfg, "image_folder_names": str(tmp_path / "none.txt")})


def test_eval_group_lists_every_option_with_the_dataclass_default() -> None:
    """conf/eval/default.yaml (what `--cfg job` shows) and EvalConfig's defaults are the same settings."""
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    yaml_cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "eval" / "default.yaml")
    assert yaml_cfg.pop("enabled") is True  # training's switch, not an EvalConfig field
    assert EvalConfig.from_mapping(yaml_cfg) == EvalConfig()
    assert set(yaml_cfg) == {f.name for f in dataclasses.fields(EvalConfig)}


def test_imagenet_class_names_and_prompt_ensembles(tmp_path) -> None:
    from phis.evalconfig import class_names, prompts
    from phis.evaldata import PROMPT_SETS, imagenet_class_names, prompt_templates

    names = imagenet_class_names()
    # the standard index order: n01440764 tench, n01443537 goldfish, n01484850 great white shark, ...
    assert len(names) == 1000 and len(set(names)) == 998  # "missile" and "sunglasses" name two synsets each
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet paper"
    ensembles = {name: prompt_templates(name) for name in PROMPT_SETS}
    assert len(set(ensembles["openai_imagenet"])) == 80 and len(ensembles["simple_imagenet"]) == 7
    for templates in ensembles.values():
        assert all(t.count("{c}") == 1 for t in templates)
    assert set(ensembles["simple_imagenet"]) <= set(ensembles["openai_imagenet"])
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        prompt_templates("nope")
    with pytest.raises(ValueError, match=r"eval.prompt_set 'nope'.*openai_imagenet"):
        EvalConfig.from_mapping({"prompt_set": "nope"})

    plain, imagenet = EvalConfig(), EvalConfig(imagenet_labels=True)
    assert prompts(plain, "image_folder") == ("a photo of a {c}.",) and class_names(plain) is None
    assert prompts(imagenet, "image_folder") == ensembles["openai_imagenet"]
    assert prompts(imagenet, "photos") == imagenet.templates  # other sets keep eval.templates
    assert prompts(EvalConfig(prompt_set="simple_imagenet"), "digits") == ensembles["simple_imagenet"]
    assert class_names(imagenet) == names
    for cls in ("n01", "n02"):
        _write_image(tmp_path / "train" / cls / "0.jpg")
    with pytest.raises(ValueError, match="1000 class names given for 2 class folders"):
        classification_set("image_folder", "train", 8, str(tmp_path), None, 0, class_names(imagenet))


def test_a_setting_added_later_at_its_default_keeps_a_run_evaluated(tmp_path) -> None:
    """--update-results skips a run evaluated before a setting existed, unless the setting is changed."""
    from phis.eval import _evaluated_with

    older = dataclasses.asdict(EvalConfig())
    older.pop("train_fit_limit")  # as written before that setting existed
    (tmp_path / "results.json").write_text(json.dumps({"eval": {"config": older}}))
    assert _evaluated_with(tmp_path, EvalConfig())
    assert not _evaluated_with(tmp_path, EvalConfig(train_fit_limit=256))
    assert not _evaluated_with(tmp_path, EvalConfig(knn_k=5))
    (tmp_path / "results.json").write_text(json.dumps({"eval": {"config": {**older, "gone": 1}}}))
    assert not _evaluated_with(tmp_path, EvalConfig())
    (tmp_path / "results.json").write_text(json.dumps({"status": "finished"}))
    assert not _evaluated_with(tmp_path, EvalConfig())
