"""Image sets: determinism, honest held-out splits, folders, epoch samplers and the data module."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phis.data import DistillDataModule, ImageFolder, StepBatchSampler
from phis.photos import SOURCES, TEST_SOURCES, OfflineImagePool, load_source, split_sources


def test_pool_is_deterministic_and_index_stable() -> None:
    a = OfflineImagePool("train", size=32, count=40, seed=3)
    b = OfflineImagePool("train", size=32, count=40, seed=3)
    assert torch.equal(a.images, b.images)
    shorter = OfflineImagePool("train", size=32, count=10, seed=3)
    assert torch.equal(shorter.images, a.images[:10])  # item i does not depend on the pool size
    other = OfflineImagePool("train", size=32, count=40, seed=4)
    assert (other.images != a.images).any(dim=(1, 2, 3)).all()
    x = a[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert x.std() > 0.01


def test_items_are_the_crops_their_boxes_describe() -> None:
    """Each item matches its crop box resampled independently (torch, antialiased), not other items' boxes."""
    pool = OfflineImagePool("test", size=16, count=8, seed=0)
    refs = []
    for i in range(8):
        photo = load_source(pool.source_names[pool.source(i)])
        top, left, side, flip = pool.crop_box(i)
        crop = torch.from_numpy(photo[top : top + side, left : left + side].copy()).permute(2, 0, 1).float()
        ref = F.interpolate(crop[None], size=(16, 16), mode="bilinear", antialias=True)[0]
        refs.append(ref.flip(-1) if flip else ref)
    for i in range(8):
        errors = [float((pool.images[i].float() - ref).abs().mean()) for ref in refs]
        assert errors[i] < 8 and errors[i] < 0.5 * min(e for j, e in enumerate(errors) if j != i)


def test_test_split_holds_out_whole_photos() -> None:
    train, test = set(split_sources("train")), set(split_sources("test"))
    assert test == set(TEST_SOURCES) and not train & test and train | test == set(SOURCES)
    assert set(split_sources("val")) == train
    assert {"motorcycle_left", "motorcycle_right"} <= train  # one scene, two views: same side
    pool = OfflineImagePool("test", size=16, count=12)
    assert {pool.source_names[pool.source(i)] for i in range(12)} == test
    with pytest.raises(ValueError, match="choose one of train, val, test"):
        OfflineImagePool("holdout")


def test_val_crops_never_share_a_pixel_with_train_crops() -> None:
    """Every crop lies inside its split's region; the val band and the train region do not overlap."""
    train = OfflineImagePool("train", size=8, count=200, seed=1, min_scale=0.1)
    val = OfflineImagePool("val", size=8, count=200, seed=1, min_scale=0.1)
    covered: dict[str, list[np.ndarray]] = {}
    for pool in (train, val):
        masks = {}
        for i in range(pool.count):
            name = pool.source_names[pool.source(i)]
            h, w = load_source(name).shape[:2]
            top, left, side, _ = pool.crop_box(i)
            assert 0 <= top and top + side <= h and 0 <= left and left + side <= w
            m = masks.setdefault(name, np.zeros((h, w), bool))
            m[top : top + side, left : left + side] = True
        for name, m in masks.items():
            covered.setdefault(name, []).append(m)
    for name, (t, v) in covered.items():
        assert not (t & v).any(), name
        assert t.any() and v.any()


def test_pool_fingerprint_tracks_every_pixel_setting() -> None:
    base = OfflineImagePool("train", 32, 10, 0).fingerprint()
    for kw in ({"size": 48}, {"count": 11}, {"seed": 1}, {"split": "val"}, {"min_scale": 0.5}):
        args = {"split": "train", "size": 32, "count": 10, "seed": 0} | kw
        assert OfflineImagePool(**args).fingerprint() != base


def _write_images(root, names_sizes) -> None:
    rng = np.random.default_rng(0)
    for rel, (w, h) in names_sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_image_folder_recursive_split_and_centre_crop(tmp_path) -> None:
    files = {f"d{i % 3}/sub/img{i}.png": (40 + i, 24 + 2 * i) for i in range(30)}
    _write_images(tmp_path, files)
    (tmp_path / "notes.txt").write_text("not an image")
    all_ = ImageFolder(tmp_path, size=16, split="all")
    train = ImageFolder(tmp_path, size=16, split="train", val_fraction=0.3)
    val = ImageFolder(tmp_path, size=16, split="val", val_fraction=0.3)
    assert len(all_) == 30 and not set(train.files) & set(val.files)
    assert sorted(train.files + val.files) == sorted(all_.files) and len(val) > 0
    x = train[0]
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1
    # A tall image keeps its horizontal centre: the crop equals resize-then-centre-crop by hand.
    rel = all_.files[0]
    with Image.open(tmp_path / rel) as im:
        w, h = im.size
        s = 16 / min(w, h)
        im = im.convert("RGB").resize(
            (max(16, round(w * s)), max(16, round(h * s))), Image.Resampling.BICUBIC
        )
        left, top = (im.width - 16) // 2, (im.height - 16) // 2
        ref = np.asarray(im.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 255
    np.testing.assert_allclose(all_[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    before = train.fingerprint()
    _write_images(tmp_path, {str(train.files[0]): (64, 64)})
    assert ImageFolder(tmp_path, size=16, split="train", val_fraction=0.3).fingerprint() != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty", size=16)


def test_step_batches_depend_only_on_the_global_step() -> None:
    step = [0]
    s = StepBatchSampler(50, batch_size=8, seed=7, step_source=lambda: step[0])  # 6 steps per epoch
    epoch0 = list(s)
    assert len(epoch0) == len(s) == 6 and all(len(b) == 8 for b in epoch0)
    flat = sum(epoch0, [])
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))  # no repeats within an epoch
    step[0] = 3  # resumed mid-epoch: the rest of the same epoch
    assert list(s) == epoch0[3:]
    step[0] = 6
    epoch1 = list(s)
    assert epoch1 == [s.batch(g) for g in range(6, 12)] and epoch1 != epoch0
    # Two ranks split every global batch of 2 x 4 without overlap.
    r0, r1 = (StepBatchSampler(50, 4, 7, lambda: 0, rank=r, world_size=2) for r in (0, 1))
    for b0, b1 in zip(r0, r1):
        assert not set(b0) & set(b1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(7, 4, world_size=2)


def test_datamodule_serves_images_with_cached_targets(tmp_path) -> None:
    teacher = {
        "family": "efficientnet_lite",
        "variant": 0,
        "pretrained": False,
        "input_size": 64,
        "feature_tap": "stage3",
    }
    dm = DistillDataModule(
        OfflineImagePool("train", 32, 12),
        OfflineImagePool("val", 32, 5),
        {"t0": teacher},
        batch_size=4,
        cache_dir=tmp_path,
    )
    specs = dm.teacher_specs()
    assert specs["t0"]["grid"] == (4, 4) and specs["t0"]["summary_dim"] == 1280
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32)
    feats = batch["targets"]["t0"]["features"]
    assert feats.shape == (4, 4, 4, specs["t0"]["feature_dim"]) and feats.dtype == torch.float16
    expected = dm.caches["train"]["t0"].item(int(batch["index"][2]))["features"]
    assert torch.equal(feats[2], expected)
    assert len(dm.train_dataloader()) == 3  # drop_last
    val = next(iter(dm.val_dataloader()))
    assert val["targets"]["t0"]["summary"].shape == (4, 1280)
