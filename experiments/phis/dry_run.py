"""PHI-S paper layer, the dry run: compose and resolve every job of every PHI-S experiment of a profile
without running any."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[2] / "conf"


EXPERIMENTS = ("phis_methods", "phis_analyses")


PROFILES = ("smoke", "mini", "paper", "paper_tiny")

# Experiments that bring their profile with them, composed as they are under that profile's dry run.
STANDALONE = {"paper": ("three_stage",)}


def stages_line(cfg: Any) -> str:
    """One line per job: each stage's steps, image size, global batch and its share per GPU (where the
    trainer's nodes x devices are known before launch), partitions and high-resolution partition."""
    from phis.build import stage_plan, teacher_set
    from phis.stages import rank_batches

    plan = stage_plan(cfg)
    nodes, devices = cfg.trainer.num_nodes, cfg.trainer.devices
    known = isinstance(devices, int) and devices > 0
    per_gpu = rank_batches(plan, nodes, devices, len(teacher_set(cfg))) if known else None
    parts = []
    for i, s in enumerate(plan.stages):
        share = f"{per_gpu[i][0]}/GPU on {nodes}x{devices}" if per_gpu else "/GPU: divided at launch"
        text = f"{s.name}: {s.steps} steps, {s.image_size}px, global batch {s.batch_size} ({share})"
        text += f", {s.partitions}"
        if s.hires is not None:
            extra = f", {per_gpu[i][1]}/GPU" if per_gpu else ""
            text += (
                f", hires {s.hires.batch_size}{extra} at {s.hires.image_size}px for {list(s.hires.teachers)}"
            )
        parts.append(text)
    return "; ".join(parts)


def sweep_points(params: Mapping[str, Any]) -> list[list[str]]:
    """Hydra basic-sweeper ``params`` (``key: a,b,c``) → the override list of every job (cartesian)."""
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(p) for p in itertools.product(*axes)]


def dry_run(profile: str, launcher: str | None = None, extra: Sequence[str] = ()) -> int:
    """Compose and fully resolve every job of every PHI-S experiment under ``profile``; 0 if all resolve."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    base = [f"+profile={profile}", *([f"launcher={launcher}"] if launcher else []), *extra]
    failures, jobs = [], 0
    GlobalHydra.instance().clear()
    own = [*([f"launcher={launcher}"] if launcher else []), *extra]
    runs = [(exp, base) for exp in EXPERIMENTS] + [(exp, own) for exp in STANDALONE.get(profile, ())]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for exp, common in runs:
            head = compose("train", overrides=[f"experiment={exp}", *common], return_hydra_config=True)
            for point in sweep_points(head.hydra.sweeper.params or {}):
                overrides = [f"experiment={exp}", *common, *point]
                jobs += 1
                try:
                    cfg = compose("train", overrides=overrides, return_hydra_config=True)
                    HydraConfig.instance().set_config(cfg)
                    job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                    OmegaConf.set_readonly(cfg.hydra, False)
                    with open_dict(cfg):
                        cfg.hydra.runtime.output_dir = str(job_dir)
                        cfg.hydra.runtime.cwd = os.getcwd()
                    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                    OmegaConf.to_container(job, resolve=True, throw_on_missing=True)
                    for key in ("launcher", "callbacks"):  # what the job is sent with
                        OmegaConf.to_container(cfg.hydra[key], resolve=True, throw_on_missing=True)
                    stages = stages_line(job)
                    print(f"[dry-run] ok   {exp} {' '.join(point)} -> {job_dir}\n[dry-run]        {stages}")
                except Exception as err:  # report every broken job, not just the first
                    failures.append(f"{exp} {' '.join(point)}: {type(err).__name__}: {err}")
                    print(f"[dry-run] FAIL {failures[-1]}")
    GlobalHydra.instance().clear()
    print(f"[dry-run] {jobs - len(failures)}/{jobs} job configs of profile {profile!r} resolve")
    return 1 if failures else 0
