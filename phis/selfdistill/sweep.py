"""A table's sweep with batched probes: its SGD jobs trained together, then its Hydra multirun.

    python -m phis.selfdistill.sweep sd_experiment=digits_table [hydra.sweep.dir=...] [overrides]

takes the arguments of ``python -m phis.selfdistill.run -m``. It lists the multirun's jobs as Hydra's
basic sweeper does (the experiment's ``hydra.sweeper.params``, then the sweeps of the command line),
composes each job's config, checks that every unfinished job's features can be read or extracted
(a missing dataset fails here, before any training, naming the variable to set), and runs the SGD
self-distillation jobs with ``run_jobs_batched`` (every (η, seed) of a table trained as one batch),
each writing its results file into the directory its multirun job owns. Then it runs the multirun
itself: those jobs find their results finished and skip, the others run as usual, and the
end-of-multirun hook aggregates the tables as before.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from threadpoolctl import threadpool_limits

from phis.config import CONF_DIR
from phis.selfdistill.run import batchable, check_sources, run_jobs_batched

log = logging.getLogger(__name__)

CONFIG_NAME = "selfdistill"


def _plan(parser: OverridesParser, arguments: Sequence[str]) -> tuple[DictConfig, list[list[str]], list[str]]:
    """Inside a Hydra context: the multirun's base config, every job's task overrides, the hydra ones."""
    parsed = parser.parse_overrides(list(arguments))
    hydra_args = [a for a, o in zip(arguments, parsed) if o.is_hydra_override()]
    task_args = [a for a, o in zip(arguments, parsed) if not o.is_hydra_override()]
    fixed = [a for a, o in zip(task_args, parser.parse_overrides(task_args)) if not o.is_sweep_override()]
    base = compose(CONFIG_NAME, overrides=[*fixed, *hydra_args], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items()]
    (combinations,) = BasicSweeper.split_arguments(parser.parse_overrides(params + task_args), None)
    return base, combinations, hydra_args


def _job_dict(cfg: DictConfig) -> dict[str, Any]:
    """A composed config as the job sees it: resolved, without the hydra node and the logger."""
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.pop("logger", None)  # resolves against the job's runtime; no part of its results
    return OmegaConf.to_container(cfg, resolve=True)


def sweep_plan(arguments: Sequence[str]) -> tuple[dict[str, Any], list[list[str]]]:
    """The sweep's base config (its fixed overrides, no sweep values) and every job's overrides,
    composing only once: a quick listing of a large sweep (a paper dry run)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base, combinations, _ = _plan(OverridesParser.create(), arguments)
        return _job_dict(base), combinations


def sweep_jobs(arguments: Sequence[str]) -> list[tuple[dict[str, Any], Path]]:
    """Every job of ``run -m <arguments>``: its resolved config (as the job sees it) and output dir."""
    jobs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        _, combinations, hydra_args = _plan(OverridesParser.create(), arguments)
        for job in combinations:
            cfg = compose(CONFIG_NAME, overrides=[*job, *hydra_args], return_hydra_config=True)
            out_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            jobs.append((_job_dict(cfg), out_dir))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    """Batch the sweep's SGD jobs, then run its multirun; the multirun's return code."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    arguments = list(sys.argv[1:] if argv is None else argv)
    every = sweep_jobs(arguments)
    check_sources(every)
    jobs = [(cfg, out_dir) for cfg, out_dir in every if batchable(cfg)]
    if jobs:
        threads = int(jobs[0][0]["threads"])
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            run_jobs_batched(jobs)
    return subprocess.call([sys.executable, "-m", "phis.selfdistill.run", "-m", *arguments])


if __name__ == "__main__":
    sys.exit(main())
