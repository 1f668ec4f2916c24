"""Builders from a Hydra training config to the objects of a run: the teacher set, the data module, the
LightningModule, and the check that a checkpoint may be resumed by it.

Training, evaluation, the experiment drivers and the benchmarks all build through here, so a config
means the same objects everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from phis.config import plain
from phis.data import DistillDataModule
from phis.module import DistillModule
from phis.stages import StagePlan


def teacher_set(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Teacher name → teacher config of the chosen set (the name is the set's key)."""
    teachers = OmegaConf.to_container(cfg.teachers, resolve=True) if cfg.get("teachers") else None
    if not isinstance(teachers, dict) or not teachers:
        raise ValueError("the teacher set is empty; choose one with teachers=<set> (see conf/teachers/)")
    out = {}
    for key, tcfg in teachers.items():
        if not isinstance(tcfg, dict) or "family" not in tcfg:
            raise ValueError(f"teachers.{key} is not a teacher config (it needs a 'family'); got {tcfg!r}")
        out[key] = {**tcfg, "name": key}
    return out


def stage_plan(cfg: DictConfig) -> StagePlan:
    """The run's stages (``stages:``; none: one stage of ``trainer.max_steps`` at the training set's size
    and ``data.batch_size``, the global batch)."""
    return StagePlan.from_config(
        plain(cfg.get("stages")),
        max_steps=cfg.trainer.get("max_steps"),
        image_size=int(cfg.data.train.size),
        batch_size=int(cfg.data.batch_size),
        partitions=cfg.distill.get("partitions", "shared"),
        teachers=list(teacher_set(cfg)),
    )


def build_datamodule(cfg: DictConfig, plan: StagePlan | None = None) -> DistillDataModule:
    """Image sets of the data group plus the teacher set, served with cached targets; the training set
    is also built at every other image size the stages use.

    ``plan``: the run's stages, built once by the caller (training) and shared with ``build_module``;
    without it the stages of ``cfg`` are built here, and a config without stages gets one open-ended
    stage (evaluation needs no trainer config)."""
    if plan is None and cfg.get("stages"):
        plan = stage_plan(cfg)
    train = instantiate(cfg.data.train)
    sizes = set()
    if plan is not None:
        sizes = {s.image_size for s in plan.stages} | {s.hires.image_size for s in plan.stages if s.hires}
    return DistillDataModule(
        train=train,
        val=instantiate(cfg.data.val),
        test=instantiate(cfg.data.test) if cfg.data.get("test") else None,
        teachers=teacher_set(cfg),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        cache_enabled=cfg.cache.enabled,
        cache_dir=cfg.cache.dir,
        cache_dtype=cfg.cache.dtype,
        cache_batch_size=cfg.cache.batch_size,
        seed=cfg.seed,
        plan=plan,
        stage_sets={size: instantiate(cfg.data.train, size=size) for size in sizes - {int(train.size)}},
    )


def build_module(
    cfg: DictConfig, specs: dict[str, dict[str, Any]], plan: StagePlan | None = None
) -> DistillModule:
    """The LightningModule for the chosen student, method and optimizer (``plan``: the run's stages, as
    handed to ``build_datamodule``; built from ``cfg`` when not given)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    plan = plan or stage_plan(cfg)
    return DistillModule(
        teachers={n: {**s, "grid": list(s["grid"])} for n, s in specs.items()},
        student=values["student"],
        normalizer=values["normalizer"],
        loss=values["loss"],
        distill=values["distill"],
        optim=values["optim"],
        max_steps=plan.total_steps,
        seed=cfg.seed,
        stages=plan.to_config(),
        plan=plan,
    )


def check_resume(path: Path, module: DistillModule) -> None:
    """Refuse to resume a checkpoint trained for other teachers, teacher widths or another student."""
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["hyper_parameters"]
    if set(saved["teachers"]) != set(module.teacher_specs):
        raise ValueError(
            f"cannot resume {path}: it was trained for teachers {sorted(saved['teachers'])}, this run has "
            f"{sorted(module.teacher_specs)}; use a new output directory"
        )
    for n, spec in module.teacher_specs.items():
        for key in ("feature_dim", "summary_dim"):
            if saved["teachers"][n].get(key) != spec[key]:
                raise ValueError(
                    f"cannot resume {path}: teacher {n!r} has {key}={spec[key]} now but "
                    f"{saved['teachers'][n].get(key)} in the checkpoint; use a new output directory"
                )
    # The initial weights (student.pretrained) no longer matter once there is a checkpoint.
    saved_student = {k: v for k, v in saved["student"].items() if k != "pretrained"}
    student = {k: v for k, v in dict(module.hparams.student).items() if k != "pretrained"}
    if saved_student != student:
        raise ValueError(
            f"cannot resume {path}: the student config differs ({saved_student} there, "
            f"{student} now); use a new output directory"
        )
