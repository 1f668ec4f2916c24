"""WebDataset shards: URL lists, splitting over ranks x workers, determinism, resumption, broken samples,
held-out sets, and training on shards end to end (including a killed and requeued run)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from torch.utils.data import DataLoader

from phis.data import heldout_set
from phis.photos import OfflineImagePool
from phis.shards import HeldoutImages, ShardStream, expand_urls

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 6


def _image_bytes(pixels: torch.Tensor, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(folder: Path, prefix: str, shards: int, seed: int = 0) -> list[str]:
    """img2dataset-style shards of offline photo crops (jpg, png and webp, with .txt and .json); the keys."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    pool = OfflineImagePool("train", size=40, count=shards * PER_SHARD, seed=seed)
    keys = []
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{prefix}-{s:05d}.tar")) as sink:
            for i in range(PER_SHARD):
                n = s * PER_SHARD + i
                key = f"{prefix}{n:06d}"
                ext, fmt = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")][n % 3]
                sample = {"__key__": key, ext: _image_bytes(pool.images[n], fmt), "txt": f"caption {n}"}
                sample["json"] = json.dumps({"key": key, "width": 40}).encode()
                sink.write(sample)
                keys.append(key)
    return keys


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """5 training shards of 6 samples and 1 held-out shard."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, "train", 5)
    write_shards(root, "held", 1, seed=1)
    return root


def train_urls(root: Path) -> str:
    return str(root / "train-{00000..00004}.tar")


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_url_lists_expand_braces_and_joins(shard_dir: Path) -> None:
    urls = expand_urls(f"{shard_dir}/train-{{00000..00002}}.tar::{shard_dir}/held-00000.tar")
    assert [Path(u).name for u in urls] == [*(f"train-{i:05d}.tar" for i in range(3)), "held-00000.tar"]
    assert expand_urls(["a-{0..1}.tar", "b.tar"]) == ["a-0.tar", "a-1.tar", "b.tar"]
    with pytest.raises(ValueError, match="no shard URLs"):
        expand_urls("")


def test_one_pass_with_workers_sees_every_sample_once(shard_dir: Path) -> None:
    stream = ShardStream(train_urls(shard_dir), 16, 4, resampled=False, shuffle_buffer=5, epoch_steps=None)
    batches = list(DataLoader(stream, batch_size=None, num_workers=2))
    keys = keys_of(batches)
    assert sorted(keys) == [f"train{i:06d}" for i in range(30)]
    assert keys != sorted(keys)  # shards and samples were shuffled
    assert all(b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 16, 16) for b in batches)
    with pytest.raises(ValueError, match="5 shards cannot be split over 6 readers"):
        list(DataLoader(stream, batch_size=None, num_workers=6))


def _pass_on_rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    stream = ShardStream(out.rsplit("|", 1)[0], 16, 4, resampled=False, shuffle_buffer=3, epoch_steps=None)
    stream.place(dist.get_rank(), dist.get_world_size())
    mine = keys_of(DataLoader(stream, batch_size=None, num_workers=2))
    gathered: list = [None, None]
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out.rsplit("|", 1)[1]).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_with_two_workers_each_see_every_sample_exactly_once(shard_dir, tmp_path) -> None:
    result = tmp_path / "keys.json"
    mp.start_processes(
        _pass_on_rank,
        args=(f"file://{tmp_path / 'init'}", f"{train_urls(shard_dir)}|{result}"),
        nprocs=2,
        start_method="spawn",
    )
    per_rank = json.loads(result.read_text())
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == [f"train{i:06d}" for i in range(30)]  # all 30, none twice


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_a_function_of_the_step(shard_dir: Path, workers: int) -> None:
    """A resampled stream started at any step yields what a stream started at its epoch's start yields
    from that step on; epochs differ; the seed changes everything."""

    def run(start: int, seed: int = 0) -> list[list[str]]:
        stream = ShardStream(train_urls(shard_dir), 16, 4, seed=seed, shuffle_buffer=8, epoch_steps=7)
        stream.place(0, 1, start)
        return [b["keys"] for b in DataLoader(stream, batch_size=None, num_workers=workers)]

    epoch0 = run(0)
    assert len(epoch0) == 7 and all(len(k) == 4 for k in epoch0)
    assert run(0) == epoch0
    for start in (3, 4, 6):
        assert run(start) == epoch0[start:]
    epoch1 = run(7)
    assert len(epoch1) == 7 and epoch1 != epoch0 and run(10) == epoch1[3:]
    assert run(0, seed=1) != epoch0


def _corrupt_shard(path: Path) -> None:
    """Samples: a good png, a truncated jpeg, a sample with only a caption, another good png."""
    pool = OfflineImagePool("test", size=24, count=2)
    files = {
        "bad000000.png": _image_bytes(pool.images[0], "PNG"),
        "bad000001.jpg": _image_bytes(pool.images[1], "JPEG")[:40],
        "bad000002.txt": b"only a caption",
        "bad000003.png": _image_bytes(pool.images[1], "PNG"),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_broken_samples_and_shards_are_skipped_and_counted(shard_dir, tmp_path, caplog) -> None:
    _corrupt_shard(tmp_path / "bad.tar")
    good = (shard_dir / "train-00000.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(good[: len(good) // 2])
    urls = f"{tmp_path}/bad.tar::{tmp_path}/truncated.tar::{tmp_path}/missing.tar"
    stream = ShardStream(urls, 16, 2, resampled=False, shuffle_buffer=0, epoch_steps=None)
    with caplog.at_level(logging.WARNING, logger="phis.shards"):
        batches = list(stream)
    keys = keys_of(batches)
    assert {"bad000000", "bad000003"} <= set(keys) and not {"bad000001", "bad000002"} & set(keys)
    assert {k for k in keys if k.startswith("train")}  # the readable half of the truncated shard
    assert sum(b["skipped"] for b in batches) == 2
    assert sum(len(b["keys"]) + b["skipped"] for b in batches[:2]) == 4  # skipped samples keep positions
    messages = [r.getMessage() for r in caplog.records]
    assert any("'bad000001'" in m for m in messages) and any("'bad000002'" in m for m in messages)
    assert any("missing.tar" in m for m in messages)  # an unreadable shard is skipped, counted
    assert len(messages) == 3 and messages[-1].endswith("(3 skipped by this process)")


def test_a_stream_of_only_unreadable_shards_stops_with_a_clear_error(tmp_path: Path) -> None:
    stream = ShardStream(f"{tmp_path}/typo-{{0..2}}.tar", 16, 2, epoch_steps=3)
    with pytest.raises(RuntimeError, match="8 shards in a row gave no samples.*check data.urls"):
        next(iter(stream))


def test_heldout_sets_are_capped_and_named(shard_dir, tmp_path) -> None:
    held = HeldoutImages(str(shard_dir / "held-00000.tar"), 16, limit=4, name="held")
    assert len(held) == 4 and held[0].shape == (3, 16, 16) and held[0].dtype == torch.float32
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, img in enumerate(OfflineImagePool("test", size=20, count=3).images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    assert len(HeldoutImages(str(folder), 16, limit=10)) == 3
    fallback = heldout_set(None, 16, limit=5)
    assert isinstance(fallback, OfflineImagePool) and fallback.split == "test" and len(fallback) == 5
    with pytest.raises(FileNotFoundError, match="held-out set 'empty'"):
        len(HeldoutImages(str(tmp_path / "none.tar"), 16, name="empty"))


# ----------------------------------------------------------------------------------------------------
# Training on shards through the real config

TINY_SHARDS = [
    "data=webdataset",
    "teachers=tiny",
    "student.img_size=32",
    "student.num_registers=2",
    "student.head_hidden_dim=32",
    "++student.trunk_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "data.batch_size=4",
    "data.num_workers=2",
    "data.train.shuffle_buffer=8",
    "data.train.epoch_steps=5",
    "data.heldout_limit=8",
    "eval.heldout_limit=8",
    "trainer.max_steps=12",
    "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "optim.warmup_steps=2",
    "distill.estimate_steps=6",
    "distill.refit_every=2",
    "eval.enabled=false",
    "checkpoint.every_n_steps=3",
]


def make_cfg(out: Path, root: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *TINY_SHARDS,
                f"data.urls='{train_urls(root)}'",
                f"data.heldout={root / 'held-00000.tar'}",
                f"output_dir={out}",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def test_data_webdataset_composes_a_streaming_run(shard_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, shard_dir)
    assert cfg.cache.enabled is False and cfg.distill.normalizer_fit == "schedule"
    assert cfg.data.train._target_ == "phis.shards.ShardStream" and cfg.data.train.batch_size == 4
    from phis.build import build_datamodule

    dm = build_datamodule(cfg)
    assert dm.streaming and dm.sets["val"].name == "heldout" and len(dm.sets["val"]) == 6
    assert len(dm.dataset("train", 5)) == 5  # the training fit is measured on a capped sample
    train, val = dm.sets["train"], dm.sets["val"]
    assert (train.decode, train.decode_device, val.decode) == ("reduced", "cpu", "reduced")
    hires = "{teachers: [sam], image_size: 48, batch_size: 2}"
    hires = f"+stages=[{{steps: 12, image_size: 32, batch_size: 4, hires: {hires}}}]"
    exact = build_datamodule(make_cfg(tmp_path, shard_dir, "data.decode=exact", hires))
    assert [s.decode for s in exact.size_sets.values()] == ["exact", "exact"]  # incl. the high-res stream
    assert exact.sets["val"].decode == exact.dataset("train", 5).images.decode == "exact"
    with pytest.raises(ValueError, match="set cache.enabled=false"):
        build_datamodule(make_cfg(tmp_path, shard_dir, "cache.enabled=true"))


class SendSignalAt(Callback):
    """Sends this process a signal during a step, as SLURM does before a time limit."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class Requeued(Exception):
    pass


def _submitit_like(signum, frame) -> None:
    raise Requeued(f"requeued on signal {signum}")


@pytest.mark.slow
def test_run_on_shards_killed_by_requeue_signal_resumes_to_the_same_result(shard_dir, tmp_path) -> None:
    """SIGUSR2 during step 6: last.ckpt is written at step 7 (mid-epoch, off the 3-step grid), the
    previous handler runs (here it raises, as submitit exits); the rerun ends as an uninterrupted run."""
    from phis.train import train

    whole = train(make_cfg(tmp_path / "whole", shard_dir))
    assert whole["status"] == "finished" and whole["steps"] == 12
    assert whole["heldout"]["val"]["clip"]["tokens"] == 6 * 16  # the 6 held-out images, 4x4 teacher grid
    assert whole["train_fit"]["clip"]["tokens"] == 8 * 16  # capped by eval.heldout_limit
    broken = tmp_path / "broken"
    cfg = make_cfg(broken, shard_dir, "checkpoint.on_signal=[SIGUSR2]")
    previous = signal.signal(signal.SIGUSR2, _submitit_like)
    try:
        with pytest.raises(Requeued):
            train(cfg, callbacks=[SendSignalAt(6, signal.SIGUSR2)])
        assert signal.getsignal(signal.SIGUSR2) is _submitit_like  # handed back
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 7
    resumed = train(make_cfg(broken, shard_dir))
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 12
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["heldout"] == whole["heldout"] and resumed["final_train"] == whole["final_train"]


def test_paper_profile_trains_on_shards_with_step_checkpoints_requeue_and_capped_evaluation(
    monkeypatch, tmp_path
) -> None:
    """Every paper job (here one phis_methods point) reads its shards from PHIS_DATA_URLS."""
    monkeypatch.setenv("PHIS_DATA_URLS", "/cluster/dc1b/{00000..00009}.tar::/cluster/extra/{0..1}.tar")
    overrides = ["experiment=phis_methods", "+profile=paper", "launcher=slurm", f"output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    assert cfg.data.train._target_ == "phis.shards.ShardStream" and cfg.cache.enabled is False
    assert len(expand_urls(cfg.data.train.urls)) == 12 and cfg.data.heldout_limit > 0
    assert cfg.checkpoint.every_n_steps > 0 and cfg.checkpoint.every_n_minutes > 0
    assert list(cfg.checkpoint.on_signal) == ["SIGUSR2", "SIGTERM"] and cfg.hydra.launcher.max_num_timeout > 0
    assert cfg.trainer.plugins[0].auto_requeue is False  # submitit requeues, not Lightning as well
    assert cfg.eval.heldout_limit and cfg.distill.normalizer_fit == "schedule"


def _module_and_batches(parts: dict) -> tuple:
    """A tiny student for two teachers and 5 held-out batches with stored targets (large offsets)."""
    from phis.module import DistillModule

    torch.manual_seed(0)
    specs = {
        "a": {"summary_dim": 4, "feature_dim": 6, "grid": [2, 2]},
        "b": {"feature_dim": 5, "grid": [3, 3]},
    }
    module = DistillModule(specs, **parts, max_steps=10)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(5):
        targets = {
            "a": {
                "features": 3 * torch.randn(3, 2, 2, 6, generator=gen) - 40,
                "summary": torch.randn(3, 4, generator=gen),
            },
            "b": {"features": torch.randn(3, 3, 3, 5, generator=gen) + 7},
        }
        batches.append({"images": torch.rand(3, 3, 32, 32, generator=gen), "targets": targets})
    return module, batches


def _heldout_on_rank(rank: int, init: str, parts: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    module, batches = _module_and_batches(parts)
    shared = module.heldout_metrics(batches[rank::2], distributed=True)  # 3 batches on rank 0, 2 on rank 1
    if rank == 0:
        Path(out).write_text(json.dumps({"shared": shared, "whole": module.heldout_metrics(batches)}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_final_heldout_metrics_spread_over_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, tmp_path, "method=mse")
    parts = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        for k in ("student", "normalizer", "loss", "distill", "optim")
    }
    out = tmp_path / "heldout.json"
    mp.start_processes(
        _heldout_on_rank,
        args=(f"file://{tmp_path / 'init'}", parts, str(out)),
        nprocs=2,
        start_method="spawn",
    )
    res = json.loads(out.read_text())
    for name in ("a", "b"):
        shared, whole = res["shared"][name], res["whole"][name]
        assert shared["tokens"] == whole["tokens"] == 5 * 3 * (4 if name == "a" else 9)
        for key in ("mse_teacher", "variance", "explained"):
            assert shared[key] == pytest.approx(whole[key], rel=1e-9), (name, key)
    assert res["shared"]["a"]["summary_cosine"] == pytest.approx(
        res["whole"]["a"]["summary_cosine"], rel=1e-9
    )
    assert res["shared"]["b"]["summary_cosine"] is None
