"""Training throughput: teacher cache vs teachers run every step, and Lightning vs a bare PyTorch loop.

    python -m experiments.bench.train [--steps 30] [--warmup 5] [--out outputs/bench_train] [overrides ...]

Everything is built from the real config (conf/train.yaml; trailing Hydra overrides apply, default:
the offline teacher set and the tiny student). Three measurements on the same model and batch size:

1. Lightning, targets read from the teacher cache (the default training path);
2. Lightning, cache disabled: the frozen teachers run on every batch;
3. a bare PyTorch loop (same module, same cached batches, same optimizer and loss, no Trainer).

All use ``normalizer_fit=schedule`` with the transform fitted at step 0 and then only updated, so the
three do identical work apart from what is being compared. Steps/s are timed after ``warmup`` steps.
Prints a markdown table and writes it as <out>.md/.csv.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from phis.build import build_datamodule, build_module
from phis.results import write_table

CONF = Path(__file__).resolve().parents[2] / "conf"


class StepTimer(Callback):
    """Wall-clock time at the end of every training batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def rate(ends: list[float], warmup: int) -> float:
    """Steps per second over the steps after ``warmup``."""
    timed = ends[warmup - 1 :]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def config(overrides: list[str], out: str, cache: bool, steps: int) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"output_dir={out}",
                f"cache.dir={os.environ.get('PHIS_CACHE_DIR', Path('.cache/phis').resolve())}",
                f"cache.enabled={cache}",
                "distill.normalizer_fit=schedule",
                f"distill.estimate_steps={steps}",
                f"distill.refit_every={10 * steps}",
                f"trainer.max_steps={steps}",
                "trainer.check_val_every_n_epoch=1000",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "trainer.log_every_n_steps=1",
                *overrides,
            ],
        )
    return cfg


def lightning_rate(cfg: DictConfig, warmup: int) -> float:
    """Steps/s of the real training path (Trainer + DistillModule + DistillDataModule)."""
    pl.seed_everything(cfg.seed)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.teacher_specs())
    timer = StepTimer()
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return rate(timer.ends, warmup)


def bare_rate(cfg: DictConfig, warmup: int) -> float:
    """Steps/s of a plain loop over the same cached batches: forward, loss, backward, clip, step."""
    pl.seed_everything(cfg.seed)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.teacher_specs())
    module.train()
    opts = module.configure_optimizers()
    opt, sched = opts["optimizer"], opts["lr_scheduler"]["scheduler"]
    ends: list[float] = []
    batches = iter(dm.train_dataloader())
    for step in range(cfg.trainer.max_steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        opt.zero_grad(set_to_none=True)
        loss, _ = module.distill_loss(batch, step)  # the step drives the normalizers' schedule
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        sched.step()
        ends.append(time.perf_counter())
    return rate(ends, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="outputs/bench_train")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cached = config(args.overrides, tmp + "/a", True, args.steps)
        results = {
            "Lightning, teacher cache": lightning_rate(cached, args.warmup),
            "Lightning, teachers every step": lightning_rate(
                config(args.overrides, tmp + "/b", False, args.steps), args.warmup
            ),
            "bare PyTorch loop, teacher cache": bare_rate(cached, args.warmup),
        }
    base = results["Lightning, teacher cache"]
    bare = results["bare PyTorch loop, teacher cache"]
    rows = [[name, f"{r:.3f}", f"{1000 / r:.0f}", f"{r / base:.2f}x"] for name, r in results.items()]
    title = (
        f"Training throughput ({cached.student.model} {dict(cached.student.trunk_kwargs or {})} at "
        f"{cached.student.img_size} px, batch "
        f"{cached.data.batch_size}, {len(cached.teachers)} teachers, {args.threads} threads, "
        f"{args.steps - args.warmup} timed steps). Lightning overhead per step vs the bare loop: "
        f"{1000 / base - 1000 / bare:.1f} ms ({100 * (bare / base - 1):.1f}%)"
    )
    md, _ = write_table(args.out, ["setup", "steps/s", "ms/step", "vs cached Lightning"], rows, title=title)
    print(md.read_text())


if __name__ == "__main__":
    main()
