"""Training entry point: ``python -m phis.train [group=choice ...]`` (Hydra; config in conf/train.yaml).

A run writes into its output directory: ``checkpoints/last.ckpt``, the resolved config (Hydra's
``.hydra/`` and ``config_resolved.yaml``), ``csv/metrics.csv`` and ``results.json``. Running again into
a directory whose results.json is finished does nothing; with a ``checkpoints/last.ckpt`` the run
resumes from it (same data order and randomness, so it ends where an uninterrupted run would).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Set before torch loads its OpenMP runtime: when several processes share a few CPU cores, spinning
# OpenMP workers stall each other (training steps measured 10x slower); passive waiting costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import math
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from phis.build import build_datamodule, build_module, check_resume, stage_plan
from phis.config import CONF_DIR
from phis.data import DistillDataModule
from phis.eval import evaluate_module
from phis.evalconfig import EvalConfig
from phis.export import export_finished_run
from phis.module import DistillModule
from phis.results import (
    RESULTS_FILE,
    atomic_write_json,
    atomic_write_text,
    is_finished,
    markdown_table,
    read_json,
)
from phis.student import check_pretrained
from phis.wandb_logging import JobMirror, train_tables, train_tags

log = logging.getLogger("phis.train")


class LastCheckpoint(Callback):
    """Rewrites ``last.ckpt`` atomically every n epochs / n steps / m minutes, on a signal and at the end.

    The file is written beside the old one and renamed over it: a run killed at any moment leaves
    either the previous complete checkpoint or the new one. (The data order depends only on the global
    step, see ``phis.data.StepBatchSampler`` and ``phis.shards.ShardStream``, so resuming from any step
    replays the same batches.) Time and signal checkpoints are agreed on by all ranks at the end of a
    step. ``signals`` (e.g. ``SIGUSR2``, which submitit sends before a SLURM time limit) mark the run:
    at the end of the current step the checkpoint is written, then the signal goes on to the handler
    that was installed before (submitit's, which requeues the job).
    """

    def __init__(
        self,
        path: Path,
        every_n_epochs: int = 1,
        every_n_steps: int = 0,
        every_n_minutes: float = 0.0,
        signals: Sequence[str] = (),
    ) -> None:
        if every_n_epochs < 0 or every_n_steps < 0 or every_n_minutes < 0:
            raise ValueError(
                f"checkpoint intervals must be >= 0 (0: off), got every_n_epochs={every_n_epochs}, "
                f"every_n_steps={every_n_steps}, every_n_minutes={every_n_minutes}"
            )
        valid = [n for n in dir(signal) if n.startswith("SIG") and not n.startswith("SIG_")]
        bad = [n for n in signals if n not in valid]
        if bad:
            raise ValueError(f"unknown signal(s) {bad} in checkpoint.on_signal; e.g. SIGUSR2, SIGTERM")
        self.path, self.every_n_epochs = Path(path), every_n_epochs
        self.every_n_steps, self.every_n_minutes = every_n_steps, every_n_minutes
        self.signals = [getattr(signal, n) for n in signals]
        self._saved_step = -1
        self._saved_at = time.monotonic()
        self._received: int | None = None
        self._previous: dict[int, Any] = {}

    def _save(self, trainer: pl.Trainer) -> None:
        self._saved_at = time.monotonic()
        if trainer.global_step == self._saved_step:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # full state: optimizer and loops, to resume
        if trainer.is_global_zero:
            tmp.replace(self.path)
        self._saved_step = trainer.global_step

    def _mark(self, signum: int, frame: Any) -> None:
        log.warning("received %s: writing %s at the end of this step", signal.Signals(signum).name, self.path)
        self._received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's own handlers: it restores every signal it saw at the start of fit.
        self._saved_at = time.monotonic()
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._mark)

    def _restore_handlers(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _pass_on(self, signum: int) -> None:
        """Hand the signal to the handler that was there before ours (default action if there was none)."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore_handlers()
        if callable(previous):
            previous(signum, None)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        due = bool(self.every_n_steps) and trainer.global_step % self.every_n_steps == 0
        if self.every_n_minutes or self.signals:
            minutes = (time.monotonic() - self._saved_at) / 60
            late = bool(self.every_n_minutes) and minutes >= self.every_n_minutes
            # One rank's clock or signal decides for all: every rank must take part in the save.
            due = trainer.strategy.reduce_boolean_decision(
                due or late or self._received is not None, all=False
            )
        if due:
            self._save(trainer)
        if self._received is not None:
            signum, self._received = self._received, None
            self._pass_on(signum)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)


def heldout_results(
    module: DistillModule,
    dm: DistillDataModule,
    split: str,
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, dict[str, Any]]:
    """Per teacher on a held-out split (its first ``limit`` images if given, spread over ``world_size``
    ranks, every rank calling): teacher-space MSE, explained fraction, summary cosine.

    With the cache and the whole split, ``explained_train_mean`` adds the explained fraction of the
    trivial predictor that outputs the training-set mean feature everywhere, the baseline a student has
    to beat.
    """
    loader = dm.heldout_dataloader(split, limit, rank, world_size)
    res = module.heldout_metrics(loader, distributed=world_size > 1)
    whole = limit is None or limit >= len(dm.sets[split])
    if dm.cache_enabled and whole:
        for n, r in res.items():
            held, train = dm.caches[split][n].moments(), dm.caches["train"][n].moments()
            # Its MSE is Var_held + (μ_held − μ_train)², averaged over channels.
            base = float((held.variance + (held.mean - train.mean).square()).mean())
            r["explained_train_mean"] = 1.0 - base / r["variance"]
    return res


def summary_table(heldout: dict[str, dict[str, dict]], stats: dict[str, dict] | None) -> str:
    """Markdown: per teacher, activation statistics (PHI-S Table 7 columns, α's) and per-split results."""
    header = ["teacher"]
    if stats:
        header += ["global mean", "global std", "channel mean", "channel std", "α_gs", "α_phis"]
    # Held-out splits also show the explained fraction of predicting the training mean everywhere.
    baseline = {split: "explained_train_mean" in next(iter(pt.values())) for split, pt in heldout.items()}
    for split in heldout:
        header += [f"{split} MSE", f"{split} explained"] + (
            [f"{split} explained by train mean"] if baseline[split] else []
        )
    rows = []
    for n in next(iter(heldout.values())):
        row = [n]
        if stats:
            s = stats[n]
            row += [
                f"{s['global_mean']:.3g}",
                f"{s['global_std']:.3g}",
                f"[{s['channel_mean_min']:.3g}, {s['channel_mean_max']:.3g}]",
                f"[{s['channel_std_min']:.3g}, {s['channel_std_max']:.3g}]",
                f"{s['alpha_gs']:.3g}",
                f"{s['alpha_phis']:.3g}",
            ]
        for split, per_teacher in heldout.items():
            r = per_teacher[n]
            row += [f"{r['mse_teacher']:.4g}", f"{r['explained']:.3f}"]
            row += [f"{r['explained_train_mean']:.3f}"] if baseline[split] else []
        rows.append(row)
    return markdown_table(header, rows)


def _choices() -> dict[str, Any]:
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def train(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run (or resume, or skip) one distillation job; returns what it wrote to results.json.

    With ``logger=wandb`` the job's W&B run mirrors it and is finished when the job ends, however it ends.
    """
    with JobMirror(cfg, train_tags(cfg), cfg.output_dir) as mirror:
        results = _train(cfg, callbacks, mirror)
        mirror.record(results, train_tables(results))
        return results


@dataclass
class FitOutcome:
    """What fitting leaves for the report: the trained objects, where it resumed from and its timings."""

    trainer: pl.Trainer
    module: DistillModule
    dm: DistillDataModule
    resume: Path | None
    cache_s: float
    fit_s: float


def _train(cfg: DictConfig, callbacks: Sequence[Callback], mirror: JobMirror) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    if is_finished(out):
        log.info(
            "%s is finished; skipping (delete it or pick another output dir to rerun)", out / RESULTS_FILE
        )
        return read_json(out / RESULTS_FILE)
    if cfg.eval.enabled:
        EvalConfig.from_mapping(cfg.eval)  # a typo in the eval options fails now, not after hours of training
    atomic_write_text(out / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return report(cfg, fit(cfg, callbacks, mirror))


def fit(cfg: DictConfig, callbacks: Sequence[Callback], mirror: JobMirror) -> FitOutcome:
    """Build the data, teachers and module of ``cfg`` and train (resuming from ``last.ckpt`` if present)."""
    out = Path(cfg.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    # Pretrained CNN teachers produce subnormal floats that make CPU inference ~3x slower; flush them.
    torch.set_flush_denormal(True)

    last = out / "checkpoints" / "last.ckpt"
    resume = last if last.is_file() else None
    if resume is None:  # missing initial weights fail now, not after the teachers are built
        check_pretrained(cfg.student.model, cfg.student.get("pretrained"))
    start = time.perf_counter()
    plan = stage_plan(cfg)  # one plan for the data module, the module and the trainer
    dm = build_datamodule(cfg, plan)
    specs = dm.teacher_specs()
    cache_s = time.perf_counter() - start
    # Teachers built for missing cache entries draw from the global generators; seed again so that the
    # student's initialization (and all that follows) does not depend on whether the cache existed.
    pl.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, specs, plan)
    if resume is not None:
        check_resume(resume, module)
        log.info("resuming from %s", resume)
    else:
        module.student.load_pretrained()

    ck = cfg.checkpoint
    checkpoint = LastCheckpoint(
        last,
        ck.every_n_epochs,
        ck.get("every_n_steps", 0),
        ck.get("every_n_minutes", 0),
        list(ck.get("on_signal") or []),
    )
    if mirror.configured:
        logger = mirror.trainer_loggers()
    else:
        logger = instantiate(cfg.logger) if cfg.get("logger") else False
    bars = [TQDMProgressBar()] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        max_steps=plan.total_steps,  # trainer.max_steps, or the stages' sum
        logger=logger,
        callbacks=[checkpoint, *bars, *callbacks],
        default_root_dir=str(out),
    )
    fit_start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    except FloatingPointError as err:
        msg = f"{err}. Last good checkpoint: {last if last.is_file() else 'none yet'}"
        log.error(msg)
        if trainer.is_global_zero:
            atomic_write_json(out / RESULTS_FILE, {"status": "failed", "error": msg, "choices": _choices()})
        raise FloatingPointError(msg) from err
    return FitOutcome(trainer, module, dm, resume, cache_s, time.perf_counter() - fit_start)


def report(cfg: DictConfig, fitted: FitOutcome) -> dict[str, Any]:
    """Evaluate a fitted run (every rank takes a share), then write and log ``results.json`` on rank 0;
    returns the results (an empty dict on the other ranks)."""
    out = Path(cfg.output_dir)
    trainer, module, dm = fitted.trainer, fitted.module, fitted.dm
    eval_start = time.perf_counter()
    # Lightning's teardown leaves the module on the CPU; the (unmoved) teachers are on the device.
    module.to(trainer.strategy.root_device)
    limit = cfg.eval.get("heldout_limit")  # images per split: the final evaluation stays bounded
    ranks = {"rank": trainer.global_rank, "world_size": trainer.world_size}  # every rank takes a share
    heldout = {
        split: heldout_results(module, dm, split, limit, **ranks) for split in dm.sets if split != "train"
    }
    # The same numbers on the training crops: far above the held-out ones means overfitting, close to
    # them and low means the student is still underfitting (train longer or wider).
    fit_limit = cfg.eval.get("train_fit_limit") or limit
    fit_loader = dm.heldout_dataloader("train", fit_limit, **ranks)
    train_fit = module.heldout_metrics(fit_loader, distributed=trainer.world_size > 1)
    if not trainer.is_global_zero:
        return {}
    stats = {n: c.activation_stats() for n, c in dm.caches["train"].items()} if dm.cache_enabled else None
    # The held-out teacher MSE is stored once, under heldout: the evaluation names its split.
    external = evaluate_module(module, cfg, measured=heldout) if cfg.eval.enabled else None
    steps = int(trainer.global_step)
    results: dict[str, Any] = {
        "name": cfg.name,
        "choices": _choices(),
        "method": {"normalizer": cfg.normalizer.name, "loss": cfg.loss.name, "adaloss": cfg.distill.adaloss},
        "heldout": heldout,
        "train_fit": train_fit,
        "teacher_stats": stats,
        "steps": steps,
        "resumed_from": str(fitted.resume) if fitted.resume else None,
        "timing_s": {
            "teacher_cache": round(fitted.cache_s, 2),
            "fit": round(fitted.fit_s, 2),
            "evaluation": round(time.perf_counter() - eval_start, 2),
        },
        "final_train": {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/") and v.numel() == 1
        },
    }
    if external is not None:
        results["eval"] = external
    finite = all(math.isfinite(r["mse_teacher"]) for split in heldout.values() for r in split.values())
    results["status"] = "finished" if finite else "failed"
    if finite and cfg.get("export_student", True):  # before results.json: a finished run has its export
        results |= export_finished_run(module, out / "student", cfg, results)
    atomic_write_json(out / RESULTS_FILE, results)
    log.info(
        "results per teacher (explained = 1 - MSE / the split's variance, teacher space):\n%s",
        summary_table({"train": train_fit, **heldout}, stats),
    )
    log.info("wrote %s", out / RESULTS_FILE)
    if "export" in results:
        log.info(
            "exported the student to %s; use it with: phis.load(%r)", results["export"], results["export"]
        )
    return results


def starts_processes_in_sweep(cfg: DictConfig) -> bool:
    """Whether this is a multirun job run inside the sweep's process (Hydra's basic launcher) whose
    trainer starts processes of its own (a multi-device strategy, e.g. trainer=ddp on one machine)."""
    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    in_process = str(hc.launcher.get("_target_", "")).endswith("BasicLauncher")
    strategy, devices = cfg.trainer.get("strategy", "auto"), cfg.trainer.get("devices", 1)
    return hc.mode == RunMode.MULTIRUN and in_process and strategy not in (None, "auto") and devices != 1


def run_job_in_fresh_process() -> None:
    """Run the current multirun job as a single run of its own process, in its output directory.

    Lightning starts the other local ranks by rerunning the command line: from a sweep's process that
    reruns the whole sweep in each of them, and a second job in the same process finds the first job's
    rank variables and process group. A fresh process per job starts clean, and its ranks run this job.
    """
    hc = HydraConfig.get()
    out = hc.runtime.output_dir
    cmd = [sys.executable, "-m", "phis.train", *hc.overrides.task, f'hydra.run.dir="{out}"']
    log.info("%s: a multi-process trainer; running the job in a fresh process", out)
    status = subprocess.run([*cmd, "hydra.output_subdir=null"], check=False).returncode
    if status != 0:
        raise RuntimeError(f"job {out} failed (exit status {status}); its log is above")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    if starts_processes_in_sweep(cfg) and not is_finished(Path(cfg.output_dir)):
        run_job_in_fresh_process()
    else:
        train(cfg)


if __name__ == "__main__":
    main()
