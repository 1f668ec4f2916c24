"""Training stages and teacher partitions: the step → stage map, per-stage LR restart, statistics reset and
trunk freeze through a tiny three-stage run (with a resume mid-stage 2), partitions against a by-hand
reference, and the errors for bad partition counts and batches that do not divide."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from test_shards import shard_dir  # noqa: F401 - the shard fixture
from test_train import CrashAt, final_state, make_cfg

from phis.build import build_datamodule
from phis.module import DistillModule
from phis.stages import StagePlan, per_rank_batch, rank_batches
from phis.teachers import TeacherOutput
from phis.train import train

TEACHER_NAMES = ["clip", "siglip", "dinov2", "sam"]


def plan(stages, max_steps=None, batch=16, partitions="shared") -> StagePlan:
    return StagePlan.from_config(
        stages,
        max_steps=max_steps,
        image_size=32,
        batch_size=batch,
        partitions=partitions,
        teachers=TEACHER_NAMES,
    )


def test_steps_map_to_stages_and_the_lr_restarts_per_stage() -> None:
    p = plan([{"steps": 3}, {"steps": 5, "image_size": 48}, {"steps": 2, "batch_size": 8}])
    assert [s.start for s in p.stages] == [0, 3, 8] and p.total_steps == 10
    assert [p.index(g) for g in range(12)] == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]  # past the end: the last
    assert [s.image_size for s in p.stages] == [32, 48, 32] and [s.batch_size for s in p.stages] == [
        16,
        16,
        8,
    ]
    assert [s.name for s in p.stages] == ["stage1", "stage2", "stage3"]

    def reference(local: int, steps: int, warmup: int = 2, floor: float = 0.1) -> float:
        if local < warmup:
            return (local + 1) / warmup
        return floor + (1 - floor) * (1 + math.cos(math.pi * (local - warmup) / (steps - warmup))) / 2

    expected = [reference(i, 3) for i in range(3)] + [reference(i, 5) for i in range(5)] + [0.5, 1.0]
    assert [p.lr_factor(g, 2, 0.1) for g in range(10)] == pytest.approx(expected)
    assert p.lr_factor(3, 2, 0.1) == 0.5  # the second stage warms up again
    # No stages: one stage of trainer.max_steps; the LR factor equals the single-schedule formula.
    single = plan(None, max_steps=7)
    assert len(single.stages) == 1 and single.total_steps == 7
    assert [single.lr_factor(g, 2, 0.1) for g in range(7)] == pytest.approx(
        [reference(i, 7) for i in range(7)]
    )
    assert plan(p.to_config()).stages == p.stages


def test_stage_config_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"trainer.max_steps=480 contradicts the stages.*8 \(3 \+ 5\)"):
        plan([{"steps": 3}, {"steps": 5}], max_steps=480)
    assert plan([{"steps": 3}, {"steps": 5}], max_steps=8).total_steps == 8
    with pytest.raises(ValueError, match=r"stages\[1\].partitions='mixed' is not valid; choose one of"):
        plan([{"steps": 3}, {"steps": 5, "partitions": "mixed"}])
    with pytest.raises(ValueError, match=r"distill.partitions='halves'"):
        plan(None, max_steps=3, partitions="halves")
    with pytest.raises(ValueError, match=r"batch of 18 images over 4 teachers.*multiple of 4"):
        plan([{"steps": 3, "batch_size": 18}], partitions="per_teacher")
    with pytest.raises(ValueError, match=r"stages\[0\] has unknown keys \['lr'\]"):
        plan([{"steps": 3, "lr": 1.0}])
    with pytest.raises(ValueError, match=r"stages\[0\].steps=0 is not valid"):
        plan([{"steps": 0}])
    with pytest.raises(
        ValueError, match=r"hires.teachers=\['mae'\] must name one or more of the run's teachers"
    ):
        plan([{"steps": 3, "hires": {"teachers": ["mae"], "image_size": 64, "batch_size": 4}}])
    with pytest.raises(
        ValueError, match=r"global batch of 1000 images does not divide over 32 ranks \(4 nodes x 8"
    ):
        per_rank_batch(1000, 4, 8)
    assert per_rank_batch(1024, 4, 8) == 32
    three = plan(
        [{"steps": 1, "batch_size": 1024, "hires": {"teachers": "sam", "image_size": 64, "batch_size": 128}}]
    )
    assert rank_batches(three, 4, 8, 4) == [(32, 4)]
    with pytest.raises(ValueError, match=r"ranks gets 8 images, which do not split into 3 per-teacher"):
        rank_batches(plan([{"steps": 1, "batch_size": 64}], partitions="per_teacher"), 1, 8, 3)


# ----------------------------------------------------------------------------------------------------
# Partitions in the module, against a by-hand reference

SPECS = {
    "clip": {"summary_dim": 12, "feature_dim": 20, "grid": [2, 2]},
    "sam": {"summary_dim": None, "feature_dim": 8, "grid": [2, 2]},
    "dino": {"summary_dim": 16, "feature_dim": 24, "grid": [2, 2]},
}


def module(partitions: str = "per_teacher", stages=None) -> DistillModule:
    distill = {
        "summary_weight": 0.7,
        "feature_weight": 1.3,
        "adaloss": False,
        "adaloss_momentum": 0.99,
        "normalizer_fit": "cache",
        "estimate_steps": 0,
        "refit_every": 1,
        "freeze_trunk_steps": 0,
        "partitions": partitions,
        "resample_to": "student",
        "resample_mode": "bilinear",
    }
    optim = {
        "name": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "warmup_steps": 1,
        "min_lr_ratio": 0.0,
    }
    student = {
        "img_size": 32,
        "num_registers": 1,
        "head_hidden_dim": 16,
        "trunk_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    }
    return DistillModule(
        SPECS, student, {"name": "identity"}, {"name": "mse"}, distill, optim, 10, stages=stages
    )


def cached_batch(b: int, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(b)
    targets = {
        n: {"features": torch.randn(b, 2, 2, s["feature_dim"], generator=g) * 3 + 1}
        | ({"summary": torch.randn(b, s["summary_dim"], generator=g)} if s["summary_dim"] else {})
        for n, s in SPECS.items()
    }
    return {"images": torch.rand(b, 3, size, size, generator=g), "targets": targets}


def by_hand(mod: DistillModule, batch: dict, slices: dict[str, slice]) -> float:
    """Σ_t 1.3 · mean squared error + 0.7 · mean(1 − cos) of teacher t, on its own rows only."""
    out = mod.student(batch["images"])
    total = 0.0
    for n, r in slices.items():
        t = batch["targets"][n]
        pred = out.features[n][r]  # [b, 4, C]
        total += 1.3 * float(((pred - t["features"][r].flatten(1, 2)) ** 2).mean())
        if "summary" in t:
            total += 0.7 * float(
                (1 - F.cosine_similarity(out.summaries[n][r], t["summary"][r], dim=-1)).mean()
            )
    return total


def test_per_teacher_partitions_match_a_by_hand_reference() -> None:
    torch.manual_seed(0)
    mod = module().train()
    batch = cached_batch(6)
    loss, logs = mod.distill_loss(batch, step=0)
    slices = {"clip": slice(0, 2), "sam": slice(2, 4), "dino": slice(4, 6)}
    assert float(loss.detach()) == pytest.approx(by_hand(mod, batch, slices), rel=1e-5)
    assert float(logs["sam/feat_loss"]) == pytest.approx(
        float(
            (
                (
                    mod.student(batch["images"]).features["sam"][2:4]
                    - batch["targets"]["sam"]["features"][2:4].flatten(1, 2)
                )
                ** 2
            ).mean()
        ),
        rel=1e-5,
    )
    shared = module("shared")
    shared.load_state_dict(mod.state_dict())
    everything = {n: slice(None) for n in SPECS}
    assert float(shared.distill_loss(batch, step=0)[0]) == pytest.approx(
        by_hand(mod, batch, everything), rel=1e-5
    )
    assert by_hand(mod, batch, everything) != pytest.approx(by_hand(mod, batch, slices), rel=1e-3)
    with pytest.raises(ValueError, match=r"a batch of 5 images does not split over 3 teachers"):
        mod.distill_loss(cached_batch(5), step=1)


class Recording(torch.nn.Module):
    """An online stand-in teacher: features from pooled pixels, recording the batch sizes it sees."""

    def __init__(self, summary_dim: int | None, feature_dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3, feature_dim, generator=g)
        self.summary_proj = None if summary_dim is None else torch.randn(3, summary_dim, generator=g)
        self.seen: list[int] = []

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        self.seen.append(len(images))
        cells = F.adaptive_avg_pool2d(images, 2)  # [B, 3, 2, 2]
        feats = torch.einsum("bchw,cf->bfhw", cells, self.proj)
        summary = None if self.summary_proj is None else images.mean((2, 3)) @ self.summary_proj
        return TeacherOutput(summary, feats)


def test_online_teachers_run_on_their_partition_only() -> None:
    torch.manual_seed(0)
    mod = module().train()
    teachers = {n: Recording(s["summary_dim"], s["feature_dim"], i) for i, (n, s) in enumerate(SPECS.items())}
    mod.attach_teachers(teachers)
    images = torch.rand(6, 3, 32, 32)
    loss, _ = mod.distill_loss({"images": images}, step=0)
    assert all(t.seen == [2] for t in teachers.values())  # each teacher ran once, on its 2 images
    # The same loss from targets computed on the whole batch and sliced by hand.
    with torch.no_grad():
        full = {n: t(images) for n, t in teachers.items()}
    cached = {
        "images": images,
        "targets": {
            n: {"features": o.features.permute(0, 2, 3, 1)}
            | ({"summary": o.summary} if o.summary is not None else {})
            for n, o in full.items()
        },
    }
    slices = {"clip": slice(0, 2), "sam": slice(2, 4), "dino": slice(4, 6)}
    assert float(loss.detach()) == pytest.approx(by_hand(mod, cached, slices), rel=1e-5)


def test_hires_partition_adds_its_teachers_terms_on_its_own_images() -> None:
    torch.manual_seed(0)
    stages = [
        {
            "name": "s",
            "steps": 10,
            "image_size": 32,
            "batch_size": 6,
            "partitions": "shared",
            "hires": {"teachers": ["sam"], "image_size": 64, "batch_size": 2},
        }
    ]
    mod = module("shared", stages).train()
    batch = cached_batch(6)
    with pytest.raises(
        ValueError, match=r"high-resolution partition for \['sam'\] but the batch has no 'hires'"
    ):
        mod.distill_loss(batch, step=0)
    g = torch.Generator().manual_seed(7)
    hires = {
        "images": torch.rand(2, 3, 64, 64, generator=g),
        "targets": {"sam": {"features": torch.randn(2, 4, 4, 8, generator=g)}},
    }
    loss, logs = mod.distill_loss({**batch, "hires": hires}, step=0)
    out = mod.student(hires["images"])  # 64 px: a 4x4 student grid, the teacher's own
    term = 1.3 * float(
        ((out.features["sam"] - hires["targets"]["sam"]["features"].flatten(1, 2)) ** 2).mean()
    )
    base = by_hand(mod, batch, {n: slice(None) for n in SPECS})
    assert float(loss.detach()) == pytest.approx(base + term, rel=1e-5)
    assert float(logs["sam/hires_feat_loss"]) == pytest.approx(term / 1.3, rel=1e-5)
    assert "clip/hires_feat_loss" not in logs


# ----------------------------------------------------------------------------------------------------
# A tiny three-stage run through the real config

STAGES = (
    "stages=[{name: s1, steps: 4, image_size: 32, batch_size: 16},"
    "{name: s2, steps: 4, image_size: 48, batch_size: 16},"
    "{name: s3, steps: 4, image_size: 48, batch_size: 16,"
    " hires: {teachers: [sam], image_size: 64, batch_size: 4}}]"
)
THREE = (
    STAGES,
    "trainer.max_steps=null",
    "trainer.check_val_every_n_epoch=1000",
    "distill.partitions=per_teacher",
    "distill.normalizer_fit=schedule",
    "distill.estimate_steps=3",
    "distill.refit_every=1",
    "distill.freeze_trunk_steps=2",
    "optim.warmup_steps=2",
    "optim.min_lr_ratio=0.01",
    "checkpoint.every_n_steps=3",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher_cache")


class StageRecorder(Callback):
    """Per step: the LR it trains with, the trunk weight before it, statistics token counts after it."""

    def __init__(self) -> None:
        self.lr, self.trunk, self.count, self.sam_count, self.rows = [], [], [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.trunk.append(module.student.trunk.patch_embed.proj.weight.detach().clone())
        self.rows.append(
            (
                tuple(batch["images"].shape),
                tuple(batch["hires"]["images"].shape) if "hires" in batch else None,
            )
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.count.append(int(module.normalizers["clip"].stats.count))
        self.sam_count.append(int(module.normalizers["sam"].stats.count))


def test_three_stages_restart_lr_statistics_and_freeze_and_resume_mid_stage(tmp_path, cache_dir) -> None:
    # Teacher caches first: building them draws random tiny teachers, which would shift the student's
    # initialization between a run that builds them and one that finds them.
    build_datamodule(make_cfg(tmp_path / "caches", cache_dir, *THREE)).prepare_data()
    rec = StageRecorder()
    whole = train(make_cfg(tmp_path / "whole", cache_dir, *THREE), callbacks=[rec])
    assert whole["status"] == "finished" and whole["steps"] == 12
    assert whole["final_train"]["train/stage"] == 2.0 and "train/sam/hires_feat_loss" in whole["final_train"]
    # Each stage's image size and batch; the third adds 4 SAM images at 64 px.
    assert (
        rec.rows
        == [((16, 3, 32, 32), None)] * 4
        + [((16, 3, 48, 48), None)] * 4
        + [((16, 3, 48, 48), (4, 3, 64, 64))] * 4
    )
    # LR: warmup over 2 steps, then cosine to 1% over the stage's remaining 2, in every stage.
    per_stage = [0.5, 1.0, 1.0, 0.01 + 0.99 * 0.5]
    assert rec.lr == pytest.approx([1e-3 * f for f in per_stage * 3])
    # Statistics restart per stage and cover 3 steps of the teacher's own partition (4 of 16 images):
    # 16 tokens per image at 32 px, 36 at 48 px; SAM's also count its 4 high-resolution images (64 tokens).
    assert rec.count == [64, 128, 192, 192, 144, 288, 432, 432, 144, 288, 432, 432]
    assert rec.sam_count[8:] == [400, 800, 1200, 1200]
    # The trunk is frozen for the first 2 steps of every stage.
    for start in (0, 4, 8):
        t = rec.trunk
        assert torch.equal(t[start], t[start + 1]) and torch.equal(t[start + 1], t[start + 2])
        assert not torch.equal(t[start + 2], t[start + 3])
    assert not torch.equal(rec.trunk[3], rec.trunk[4])  # the trunk trained at the end of stage 1

    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(broken, cache_dir, *THREE), callbacks=[CrashAt(7)])
    saved = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6 and int(saved["state_dict"]["stage_index"]) == 1  # mid-stage 2
    resumed = train(make_cfg(broken, cache_dir, *THREE))
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 12
    a, b = final_state(tmp_path / "whole"), final_state(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["heldout"] == whole["heldout"]


class Shapes(Callback):
    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        hires = batch.get("hires")
        self.rows.append(
            (tuple(batch["images"].shape), None if hires is None else tuple(hires["images"].shape))
        )
        assert batch["images"].is_floating_point() and (hires is None or hires["images"].is_floating_point())


def test_shard_streams_switch_size_and_batch_per_stage(shard_dir, tmp_path) -> None:  # noqa: F811
    """On WebDataset shards: stage 1 at 32 px, stage 2 at 48 px plus 2 SAM images at 64 px per step."""
    from test_shards import make_cfg as shards_cfg

    stages = (
        "stages=[{name: a, steps: 3, image_size: 32, batch_size: 4},"
        "{name: b, steps: 3, image_size: 48, batch_size: 4,"
        " hires: {teachers: [sam], image_size: 64, batch_size: 2}}]"
    )
    rec = Shapes()
    cfg = shards_cfg(tmp_path, shard_dir, stages, "trainer.max_steps=null", "distill.partitions=per_teacher")
    res = train(cfg, callbacks=[rec])
    assert res["status"] == "finished" and res["steps"] == 6
    assert rec.rows == [((4, 3, 32, 32), None)] * 3 + [((4, 3, 48, 48), (2, 3, 64, 64))] * 3
