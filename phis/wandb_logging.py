"""W&B mirror of jobs and sweeps (``logger=wandb``): one run per Hydra job, one table run per sweep.

A job's run is opened when the job starts (or resumed: its id is kept in ``<output_dir>/wandb_run.json``)
and finished when the job ends, with the exit status recorded, so the next job of a multirun never
attaches to it. It is named after the job's sweep overrides (``phi_s/seed_1``), grouped by experiment
and tagged with the axes a table compares; at the end it gets every number of ``results.json`` in its
summary and the job's results as a ``wandb.Table``. After a multirun, :class:`SweepMirror` (a Hydra
callback on the launching host) logs the sweep's per-job table and the aggregated paper tables and
figures as one more run in the same group.

The results files stay the record: every W&B call is guarded, and a failure (no credentials, full disk)
is a warning that turns the mirror off, never a lost job.
"""

from __future__ import annotations

import csv
import html
import logging
import os
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from phis.results import RESULTS_FILE, atomic_write_json, read_json, run_metrics

log = logging.getLogger(__name__)

RUN_FILE = "wandb_run.json"  # in a job's output directory: the id its W&B run resumes under
SWEEP_RUN_FILE = "wandb_sweep_run.json"  # in a sweep directory: the id of its table run
SWEEP_KEYS_ENV = "PHIS_SWEEP_KEYS"  # command-line sweep keys, passed from the launching host to its jobs
CONTEXT_KEYS = ("logger", "launcher", "hydra")  # overrides that never name a run
SKIPPED = ("config", "choices")  # results.json subtrees that are configuration, not results


def wandb_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``logger.wandb`` settings (project, entity, group, mode), or None when W&B is off."""
    logger = cfg.get("logger")
    if not logger or "wandb" not in logger:
        return None
    node = logger.wandb
    settings = {k: node.get(k) for k in ("project", "entity", "group", "mode")}
    if settings["mode"] not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.wandb.mode={settings['mode']!r}; choose one of online, offline, disabled")
    return None if settings["mode"] == "disabled" else settings


def _new_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _parse(overrides: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(key, value as typed, is a sweep) per command-line override."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [(o.key_or_group, o.input_line.split("=", 1)[-1], o.is_sweep_override()) for o in parsed]


def run_name(
    overrides: Sequence[str], swept: Sequence[str] | None, groups: Sequence[str], fallback: str
) -> str:
    """A job's run name from its overrides: a group choice as its value, any other key as key_value.

    ``swept`` lists the keys a multirun varies (only those name the run); None (a single run) keeps
    every override but the logger/launcher/hydra ones. ``method=phi_s seed=1`` gives ``phi_s/seed_1``.
    """
    parts = []
    for key, value, _ in _parse(overrides):
        if swept is not None and key not in swept:
            continue
        if swept is None and key.split(".")[0].split("/")[0] in CONTEXT_KEYS:
            continue
        parts.append(value if key in groups else f"{key.rsplit('.', 1)[-1]}_{value}")
    return "/".join(parts) or fallback


def job_name(fallback: str) -> str:
    """The current Hydra job's run name (see :func:`run_name`); ``fallback`` outside Hydra."""
    if not HydraConfig.initialized():
        return fallback
    hc = HydraConfig.get()
    swept = None
    if hc.mode == RunMode.MULTIRUN:
        swept = list((hc.sweeper.get("params") or {}).keys())
        swept += [k for k in os.environ.get(SWEEP_KEYS_ENV, "").split(",") if k]
    # A multirun whose sweep keys did not reach the job (a launcher that drops the environment):
    # every override but the context ones names it, as in a single run.
    return run_name(list(hc.overrides.task), swept or None, list(hc.runtime.choices), fallback)


def choices() -> dict[str, str]:
    """The job's config-group choices (hydra's own groups left out)."""
    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}


def profile(config: DictConfig | None = None) -> str:
    """The ``profile`` group choice (smoke, mini, paper), ``default`` when none: the W&B job_type.

    Read from ``config``'s hydra node when given (a multirun's config), else from the current job.
    """
    picked = config.hydra.runtime.choices if config is not None else choices()
    return picked.get("profile") or "default"


def train_tags(cfg: DictConfig) -> dict[str, str]:
    """Tag axes of a distillation job: method, normalizer, loss, teacher set, student, profile."""
    ch = choices()
    return {
        "method": ch.get("method") or "custom",
        "normalizer": cfg.normalizer.name,
        "loss": cfg.loss.name,
        "teachers": ch.get("teachers") or "custom",
        "student": ch.get("student") or "custom",
        "profile": profile(),
    }


def selfdistill_tags(cfg: DictConfig) -> dict[str, str]:
    """Tag axes of a self-distillation job: experiment, features, noise, solver, PLL losses, profile."""
    sd = cfg.sd
    return {
        "experiment": cfg.experiment,
        "features": choices().get("sd/features") or sd.features.kind,
        "noise": sd.corruption.kind,
        "solver": sd.solver.name,
        "pll": "+".join(sd.pll.losses) or "none",
        "profile": profile(),
    }


def flat_numbers(results: Mapping[str, Any]) -> dict[str, float]:
    """Every scalar number of a results.json, keyed as W&B summary keys.

    A training run's metrics keep their flat names (``tmse/clip``, from ``eval.metrics`` and the
    held-out split the evaluation names, ``phis.results.run_metrics``); everything else is keyed by its path
    (``heldout/test/clip/mse_teacher``), lists of named records by their names (``models/teacher/...``).
    Vectors and matrices are left to the tables; configuration subtrees are skipped.
    """
    out: dict[str, float] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, bool):
            return
        if isinstance(node, int | float):
            out[path] = node
        elif isinstance(node, Mapping):
            for key, value in node.items():
                if key not in SKIPPED and path + key != "eval/metrics":
                    walk(value, f"{path}{key}/")
        elif isinstance(node, list) and node and all(isinstance(x, Mapping) and "name" in x for x in node):
            for x in node:
                walk({k: v for k, v in x.items() if k != "name"}, f"{path}{x['name']}/")

    walk(results, "")
    out = {k.rstrip("/"): v for k, v in out.items()}
    if "heldout" in results or "eval" in results:  # a training run: its metrics under their flat names
        out.update(run_metrics(results))
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def train_tables(results: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """``results/per_teacher``: one row per teacher × split (training crops and each held-out split),
    the split's teacher-space MSE, explained fraction etc., with the teacher's activation statistics."""
    splits = {"train": results.get("train_fit") or {}, **(results.get("heldout") or {})}
    stats = results.get("teacher_stats") or {}
    fields = list(dict.fromkeys(k for per in splits.values() for r in per.values() for k in r))
    stat_fields = list(dict.fromkeys(k for s in stats.values() for k, v in s.items() if _number(v)))
    teachers = list(dict.fromkeys(t for per in splits.values() for t in per))
    rows = [
        [t, split]
        + [splits[split][t].get(f) for f in fields]
        + [(stats.get(t) or {}).get(f) for f in stat_fields]
        for t in teachers
        for split in splits
        if t in splits[split]
    ]
    return {"results/per_teacher": (["teacher", "split", *fields, *stat_fields], rows)}


def selfdistill_tables(results: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """``results/models``: one row per model (teacher, students per round, PLL students)."""
    models = results.get("models") or []
    if not models:
        return {}
    columns = list(dict.fromkeys(k for m in models for k in m))
    return {"results/models": (columns, [[m.get(c) for c in columns] for m in models])}


def _figures(root: Path) -> list[Path]:
    """PNG figures under ``root`` (W&B's own files left out)."""
    return sorted(p for p in root.rglob("*.png") if "wandb" not in p.relative_to(root).parts)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    import wandb

    return wandb.Table(columns=list(columns), data=[list(r) for r in rows], allow_mixed_types=True)


class JobMirror:
    """The W&B run of one job, as a context manager: finished (with the exit status) when the block
    exits, however it exits. Does nothing unless ``logger=wandb``, and nothing on ranks other than 0."""

    def __init__(self, cfg: DictConfig, tags: Mapping[str, str], out_dir: str | os.PathLike) -> None:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        self.cfg, self.tags, self.out_dir = cfg, dict(tags), Path(out_dir)
        logger = cfg.get("logger")
        self.configured = bool(logger) and "wandb" in logger  # logger=wandb chosen, on any rank
        self.settings = wandb_settings(cfg) if rank_zero_only.rank == 0 else None
        self.run: Any = None
        self.exit_code = 0

    @property
    def enabled(self) -> bool:
        """Whether this process mirrors to W&B (logger=wandb, not disabled, rank 0, no failure yet)."""
        return self.settings is not None

    def __enter__(self) -> JobMirror:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.finish(1 if exc_type is not None else self.exit_code)

    def _failed(self, what: str, err: Exception) -> None:
        log.warning(
            "W&B %s failed (%s: %s); W&B is off for this job, its results files are unaffected",
            what,
            type(err).__name__,
            err,
        )
        run, self.settings, self.run = self.run, None, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # already reported above; the run is abandoned either way
                log.debug("could not finish the W&B run after a failure", exc_info=True)

    def open(self) -> Any:
        """Open (or resume, under the id kept in the output directory) this job's run; None if off."""
        if self.run is not None or not self.enabled:
            return self.run
        assert self.settings is not None
        try:
            import wandb

            id_file = self.out_dir / RUN_FILE
            run_id = read_json(id_file)["id"] if id_file.is_file() else _new_id()
            name = job_name(str(self.settings["group"] or "job"))
            # Written before the run starts, so a job killed at any point resumes this id.
            atomic_write_json(id_file, {"id": run_id, "name": name, **self.settings})
            config = OmegaConf.to_container(self.cfg, resolve=True)
            self.run = wandb.init(
                project=self.settings["project"],
                entity=self.settings["entity"],
                group=self.settings["group"],
                job_type=profile(),
                name=name,
                tags=[f"{k}:{v}" for k, v in self.tags.items()],
                config={**config, "choices": choices()},
                id=run_id,
                resume="allow",
                dir=str(self.out_dir),
                mode=self.settings["mode"],
                reinit="create_new",
            )
        except Exception as err:  # a mirror: any failure only turns it off
            self._failed("init", err)
        return self.run

    def trainer_loggers(self) -> list[Any]:
        """The Lightning loggers of logger=wandb: the CSV record of ``logger.csv`` on every rank, plus
        W&B where this process mirrors and the run opened."""
        from hydra.utils import instantiate

        loggers = [instantiate(self.cfg.logger.csv)] if self.cfg.logger.get("csv") else []
        run = self.open()
        if run is not None:
            try:
                run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
                loggers.append(_guarded_logger(run, self))
            except Exception as err:
                self._failed("setting up the Lightning logger", err)
        return loggers

    def record(
        self, results: Mapping[str, Any], tables: Mapping[str, tuple[list[str], list[list[Any]]]]
    ) -> None:
        """Mirror a finished job: its numbers into the summary, its tables and figures into the run."""
        if self.run is None:
            return
        if results.get("status") != "finished":
            self.exit_code = 1
        try:
            import wandb

            self.run.summary.update({**flat_numbers(results), "status": results.get("status")})
            payload: dict[str, Any] = {k: _table(*v) for k, v in tables.items()}
            payload.update({f"figures/{p.stem}": wandb.Image(str(p)) for p in _figures(self.out_dir)})
            if payload:
                self.run.log(payload)
        except Exception as err:
            self._failed("logging the results", err)

    def finish(self, exit_code: int) -> None:
        """Finish the run with ``exit_code`` (0: the job succeeded)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:
            self._failed("finish", err)


def _guarded_logger(run: Any, mirror: JobMirror) -> Any:
    """Lightning's WandbLogger on ``run``, whose logging failures are warnings, not training failures."""
    from lightning.pytorch.loggers import WandbLogger

    class MirrorLogger(WandbLogger):
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            """Nothing: the run's config already is the job's whole resolved config."""

        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            if mirror.run is None:
                return
            try:
                super().log_metrics(metrics, step)
            except Exception as err:
                mirror._failed("logging metrics", err)

    return MirrorLogger(experiment=run, log_model=False)


def _swept_on_command_line(config: DictConfig) -> list[str]:
    return [key for key, _, sweep in _parse(list(config.hydra.overrides.task)) if sweep]


def job_rows(sweep_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """One row per job under ``sweep_dir``: directory, status, W&B run id and name, every number."""
    jobs = []
    for path in sorted(sweep_dir.rglob(RESULTS_FILE)):
        try:
            res = read_json(path)
        except (OSError, ValueError):
            continue
        id_file = path.parent / RUN_FILE
        run = read_json(id_file) if id_file.is_file() else {}
        jobs.append((str(path.parent.relative_to(sweep_dir)), res.get("status"), run, flat_numbers(res)))
    keys = list(dict.fromkeys(k for *_, nums in jobs for k in nums))
    rows = [[d, s, run.get("id"), run.get("name"), *[nums.get(k) for k in keys]] for d, s, run, nums in jobs]
    return ["job", "status", "wandb_id", "wandb_name", *keys], rows


class SweepMirror(Callback):
    """Hydra callback of ``logger=wandb``: names jobs by the command line's sweep keys, and after the
    multirun logs its per-job table plus the aggregated tables (CSV → wandb.Table, markdown as text)
    and figures as one run in the sweep's group.

    Hydra calls ``on_multirun_end`` hooks in reverse order, and the ``aggregate`` callback of an
    experiment file comes after the logger's in the config, so the aggregated files exist by then.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_KEYS_ENV] = ",".join(_swept_on_command_line(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEEP_KEYS_ENV, None)
        settings = wandb_settings(config)
        if settings is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        aggregate = config.hydra.callbacks.get("aggregate")
        tables_dir = Path(aggregate.get("out_dir") or sweep_dir) if aggregate else None
        try:
            self._log(settings, sweep_dir, tables_dir, profile(config))
        except Exception as err:
            log.warning(
                "W&B table run of %s failed (%s: %s); the tables on disk are unaffected",
                sweep_dir,
                type(err).__name__,
                err,
            )

    def _log(
        self, settings: dict[str, Any], sweep_dir: Path, tables_dir: Path | None, job_profile: str
    ) -> None:
        import wandb

        id_file = sweep_dir / SWEEP_RUN_FILE
        run_id = read_json(id_file)["id"] if id_file.is_file() else _new_id()
        group = str(settings["group"] or sweep_dir.name)
        atomic_write_json(id_file, {"id": run_id, "name": f"{group}/tables", **settings})
        run = wandb.init(
            project=settings["project"],
            entity=settings["entity"],
            group=settings["group"],
            job_type="tables",
            name=f"{group}/tables",
            tags=["sweep-tables", f"profile:{job_profile}"],
            id=run_id,
            resume="allow",
            dir=str(sweep_dir),
            mode=settings["mode"],
            reinit="create_new",
        )
        try:
            payload: dict[str, Any] = {"sweep/jobs": _table(*job_rows(sweep_dir))}
            files = sorted(tables_dir.glob("*")) if tables_dir and tables_dir.is_dir() else []
            artifact = wandb.Artifact(f"{group.replace('/', '-')}-tables", type="sweep-tables")
            added = False
            for path in files:
                if path.suffix == ".csv":
                    header, *rows = _csv_rows(path) or [[]]
                    payload[f"tables/{path.stem}"] = wandb.Table(columns=header, data=rows)
                elif path.suffix == ".md":
                    payload[f"text/{path.stem}"] = wandb.Html(f"<pre>{html.escape(path.read_text())}</pre>")
                elif path.suffix == ".png":
                    payload[f"figures/{path.stem}"] = wandb.Image(str(path))
                else:
                    continue
                artifact.add_file(str(path))
                added = True
            run.log(payload)
            if added:  # the markdown/CSV/PNG files themselves, to download beside the dashboard
                run.log_artifact(artifact)
            run.finish(exit_code=0)
        except BaseException:
            run.finish(exit_code=1)
            raise


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))
