"""A table's sweep with batched probes: its SGD jobs trained together, then its Hydra multirun.

    python -m phis.selfdistill.sweep sd_experiment=digits_table [hydra.sweep.dir=...] [overrides]

takes the arguments of ``python -m phis.selfdistill.run -m``. It lists the multirun's jobs as Hydra's
basic sweeper does (the experiment's ``hydra.sweeper.params``, then the sweeps of the command line),
composes each job's config, and runs the SGD self-distillation jobs with ``run_jobs_batched`` (every
(η, seed) of a table trained as one batch), each writing its results file into the directory its
multirun job owns. Then it runs the multirun itself: those jobs find their results finished and skip,
the others run as usual, and the end-of-multirun hook aggregates the tables as before.
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
from omegaconf import OmegaConf, open_dict
from threadpoolctl import threadpool_limits

from phis.selfdistill.run import batchable, run_jobs_batched

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "selfdistill"


def sweep_jobs(arguments: Sequence[str]) -> list[tuple[dict[str, Any], Path]]:
    """Every job of ``run -m <arguments>``: its resolved config (as the job sees it) and output dir."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(arguments))
    hydra_args = [a for a, o in zip(arguments, parsed) if o.is_hydra_override()]
    task_args = [a for a, o in zip(arguments, parsed) if not o.is_hydra_override()]
    jobs = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        fixed = [a for a, o in zip(task_args, parser.parse_overrides(task_args)) if not o.is_sweep_override()]
        base = compose(CONFIG_NAME, overrides=[*fixed, *hydra_args], return_hydra_config=True)
        params = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items()]
        (combinations,) = BasicSweeper.split_arguments(parser.parse_overrides(params + task_args), None)
        for job in combinations:
            cfg = compose(CONFIG_NAME, overrides=[*job, *hydra_args], return_hydra_config=True)
            out_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            with open_dict(cfg):
                del cfg["hydra"]
                cfg.pop("logger", None)  # resolves against the job's runtime; no part of its results
            jobs.append((OmegaConf.to_container(cfg, resolve=True), out_dir))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    """Batch the sweep's SGD jobs, then run its multirun; the multirun's return code."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    arguments = list(sys.argv[1:] if argv is None else argv)
    jobs = [(cfg, out_dir) for cfg, out_dir in sweep_jobs(arguments) if batchable(cfg)]
    if jobs:
        threads = int(jobs[0][0]["threads"])
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            run_jobs_batched(jobs)
    return subprocess.call([sys.executable, "-m", "phis.selfdistill.run", "-m", *arguments])


if __name__ == "__main__":
    sys.exit(main())
