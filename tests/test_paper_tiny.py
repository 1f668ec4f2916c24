"""The paper profile at toy sizes (``paper_tiny``): its stand-in data in the layouts the real loaders read,
its composition (the paper profile changed only in sizes), and ``./reproduce.sh --profile paper_tiny``
end to end: DDP training on two gloo processes, every evaluation, every PHI-S table and figure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from experiments.phis import standins
from experiments.phis.index import INDEX_FILES
from phis.evaldata import IGNORE_INDEX, ade20k_set, collage_set, voc_set
from phis.shards import HeldoutImages, ShardStream

ROOT = Path(__file__).resolve().parents[1]


def _compose(profile: str) -> dict:
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=phis_methods", f"+profile={profile}"])
    return OmegaConf.to_container(cfg, resolve=False)


def _leaves(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}".lstrip(".")).items()}


def test_paper_tiny_is_the_paper_profile_changed_only_in_sizes() -> None:
    paper, tiny = _leaves(_compose("paper")), _leaves(_compose("paper_tiny"))
    changed = {k for k in paper.keys() | tiny.keys() if paper.get(k, "absent") != tiny.get(k, "absent")}
    # sizes, the teachers' stand-ins and the hardware of this machine; nothing else
    allowed_prefixes = ("teachers.", "student.", "data.train.", "trainer.", "hydra.")
    allowed = {
        "reproduce.profile",
        "data.heldout_limit",
        "data.batch_size",
        "data.num_workers",
        "checkpoint.every_n_steps",
        "optim.warmup_steps",
        "distill.estimate_steps",
        "distill.refit_every",
        "distill.freeze_trunk_steps",
        "eval.seg_limit",
        "eval.heldout_limit",
        "eval.rankme_images",
        "eval.zero_shot_images",
        "eval.probe_epochs",
        "eval.prompt_set",
    }
    assert {k for k in changed if not k.startswith(allowed_prefixes)} <= allowed
    for key in ("cache.enabled", "distill.normalizer_fit", "optim.name", "eval.knn_sets", "eval.seg_sets"):
        assert tiny[key] == paper[key], key
    assert tiny["eval.imagenet_labels"] is True and tiny["distill.compile"] == paper["distill.compile"]
    assert tiny["trainer.strategy._target_"] == paper["trainer.strategy._target_"]
    assert tiny["trainer.devices"] == 2 and tiny["trainer.accelerator"] == "cpu"
    assert tiny["student.cpe"] is True and tiny["student.model"] == paper["student.model"]
    assert set(_compose("paper_tiny")["teachers"]) == {"clip", "siglip", "dinov2", "sam"}


@pytest.mark.parametrize(
    ("profile", "extra", "fresh"),
    [
        ("paper_tiny", [], True),
        ("paper_tiny", ["trainer.devices=1"], False),
        ("paper_tiny", ["launcher=slurm"], False),  # submitit: every job is a process already
        ("smoke", [], False),
    ],
)
def test_local_multi_process_jobs_of_a_sweep_run_in_fresh_processes(
    profile: str, extra: list[str], fresh: bool
) -> None:
    """Lightning starts a DDP run's other ranks by rerunning the command line: from a multirun's process
    that reruns the whole sweep. Only such jobs (basic launcher, a multi-device strategy) get a process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from phis.train import starts_processes_in_sweep

    overrides = ["experiment=phis_methods", f"+profile={profile}", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    assert starts_processes_in_sweep(cfg) is fresh
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.mode = RunMode.RUN  # a single run: Lightning's own launcher reruns just this job
    HydraConfig().set_config(cfg)
    assert starts_processes_in_sweep(cfg) is False


def test_segmentation_standins_read_back_as_the_collages_they_were_drawn_from(tmp_path: Path) -> None:
    standins.write_ade20k(tmp_path / "ade20k")
    standins.write_voc(tmp_path / "voc")
    size = standins.IMAGE_SIZE  # no resizing: masks compare pixel for pixel
    ade = ade20k_set(tmp_path / "ade20k", "test", size)
    truth = collage_set("test", size, count=standins.SEG_IMAGES["test"])
    assert len(ade) == len(truth) and ade.num_classes == 150
    for i in range(len(ade)):
        assert torch.equal(ade[i][1], truth.masks[i])  # label k + 1 on disk is class k again
    voc = voc_set(tmp_path / "voc", "test", size)
    truth = collage_set("test", size, count=standins.SEG_IMAGES["test"], seed=1)
    image, mask = voc[0]
    assert image.shape == (3, size, size) and 0 < (mask == IGNORE_INDEX).float().mean() < 0.5  # borders
    inside = mask != IGNORE_INDEX
    assert torch.equal(mask[inside], truth.masks[0][inside] + 1)  # VOC's class 0 is background
    assert len(voc_set(tmp_path / "voc", "train", size)) == standins.SEG_IMAGES["train"]


def test_shard_standins_stream_every_image(tmp_path: Path) -> None:
    ramp = torch.linspace(0, 200, 24)  # smooth images survive JPEG closely; image n is offset by 5n
    images = (ramp[None, None, None, :] + 5 * torch.arange(10.0)[:, None, None, None]).expand(10, 3, 24, 24)
    images = images.round().to(torch.uint8)
    paths = standins.write_shards(tmp_path, "train", images, per_shard=4)
    assert [p.name for p in paths] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    stream = ShardStream(f"{tmp_path}/train-{{00000..00002}}.tar", 24, 5, resampled=False, epoch_steps=None)
    keys = [k for b in DataLoader(stream, batch_size=None) for k in b["keys"]]
    assert sorted(keys) == [f"train{i:06d}" for i in range(10)]
    held = HeldoutImages(str(paths[0]), 24, limit=3)
    assert len(held) == 3
    assert (held[0] * 255 - images[0].float()).abs().mean() < 3  # the first image, through JPEG


def _reproduce(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """Run reproduce.sh in its own process group, so a timeout ends its training processes too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [str(ROOT / "reproduce.sh"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_paper_tiny_says_it_skips_the_sd_paper_sweep(tmp_path: Path) -> None:
    proc = _reproduce("--profile", "paper_tiny", "--only", "sd", "--runs", str(tmp_path), timeout=60)
    assert proc.returncode == 0 and "SD-PLL paper sweep has no tiny stand-in here: skipped" in proc.stdout
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_paper_tiny_reproduction_makes_every_phis_table_and_figure(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    proc = _reproduce("--profile", "paper_tiny", "--only", "phis", "--runs", str(runs), "--results",
                      str(results), timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:]
    data = runs / "paper_tiny" / "data"
    assert len(list((data / "imagenet" / "val").iterdir())) == 1000  # ImageNet-1k's classes, readable names
    jobs = sorted((runs / "paper_tiny" / "phis_methods").glob("*/seed_0/results.json"))
    assert len(jobs) == 12
    for path in jobs:
        res = json.loads(path.read_text())
        assert res["status"] == "finished" and res["steps"] == 8, path
        assert res["teacher_stats"] is None  # no cache: the teachers ran on every batch
        # the held-out images were spread over both DDP ranks and all-reduced: 16 images x 4x4 tokens
        # 16 held-out images on each teacher's own grid: 4x4, except SAM, which pads the 32 px image to
        # its encoder size and crops its features to 32 / 16 = 2x2 cells (SPEC §2).
        tokens = {t: r["tokens"] for t, r in res["heldout"]["val"].items()}
        assert tokens == {"clip": 16 * 16, "siglip": 16 * 16, "dinov2": 16 * 16, "sam": 16 * 4}, path
        metrics, skipped = res["eval"]["metrics"], res["eval"]["skipped"]
        assert not skipped, (path, skipped)
        for key in ("knn/image_folder", "rankme/image_folder", "zero_shot/clip/image_folder", "voc"):
            assert np.isfinite(metrics[key]), (path, key)
        assert np.isfinite(metrics["ade20k"]), path
    out = results / "phis"
    index = (out / "README.md").read_text()
    assert "Not made here" not in index, index
    assert "- Seg: ade20k, voc" in index and "Cls: knn/image_folder, zero_shot/clip/image_folder" in index
    for stem in INDEX_FILES:
        made = [out / f"{stem}{ext}" for ext in (".md", ".png") if (out / f"{stem}{ext}").is_file()]
        assert made and all(p.stat().st_size > 100 for p in made), stem
        assert all(f"]({p.name})" in index for p in made), stem
    assert (out / "fig1_pca_before_after.png").stat().st_size > 1000
