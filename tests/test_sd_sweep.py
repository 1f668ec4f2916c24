"""The SD-PLL Hydra layer: the real CLI multirun into tmp_path, aggregation, skipping finished jobs,
and config errors that list the valid choices."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict

from experiments.selfdistill import study
from phis.results import collect_results
from phis.selfdistill.run import validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["sd.features.n=6", "sd.features.n_test=2", "sd.corruption.eta=0.0,0.5", "seed=0,1"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "phis.selfdistill.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("results.json"))


def test_cli_multirun_aggregates_and_reruns_skip_finished_jobs(tmp_path: Path) -> None:
    sweep, tables = tmp_path / "sweep", tmp_path / "tables"
    args = ("-m", "sd_experiment=block_table", f"hydra.sweep.dir={sweep}", f"tables_dir={tables}", *TINY)
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = _job_dirs(sweep)
    assert len(jobs) == 4  # η × seed
    assert all(json.loads((j / "results.json").read_text())["status"] == "finished" for j in jobs)
    assert {j.name for j in jobs} == {
        f"sd.corruption.eta={e},sd.features.n=6,sd.features.n_test=2,seed={s}"
        for e in (0.0, 0.5)
        for s in (0, 1)
    }

    # the on_multirun_end hook wrote the tables: rows Teacher, 2..5, PLL, PLL-CE × η columns
    with open(tables / "block_table_train_acc_true.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["model", "η=0", "η=0.5"]
    assert [r[0] for r in rows[1:]] == ["Teacher", "2", "3", "4", "5", "PLL", "PLL-CE"]
    assert rows[1][1] == "100.0 ± 0.0"  # clean labels: the teacher fits every training instance
    md = (tables / "block_table_test_acc.md").read_text()
    assert "Exact solver: no epochs to select" in md and "seeds [0, 1]" in md
    assert (tables / "block_table_gain.png").stat().st_size > 10_000

    # re-run (tables elsewhere: not part of a job's identity): every job is skipped; break one job and
    # only that one runs again
    stamps = {j: (j / "results.json").stat().st_mtime_ns for j in jobs}
    broken = jobs[0] / "results.json"
    broken.write_text(json.dumps({"status": "failed"}))
    second = _cli(
        *[a for a in args if not a.startswith("tables_dir=")],
        f"tables_dir={tmp_path / 'again'}",
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    job_logs = "".join((j / "run.log").read_text() for j in jobs)  # appended to by the second run
    assert job_logs.count("already finished") == 3
    for j in jobs[1:]:
        assert (j / "results.json").stat().st_mtime_ns == stamps[j]
    assert json.loads(broken.read_text())["status"] == "finished"

    # the same aggregation as a command, on a partial sweep (one job's results removed)
    (jobs[-1] / "results.json").unlink()
    out = tmp_path / "partial"
    assert study.main(["aggregate", str(sweep), str(out)]) == 0
    with open(out / "block_table_train_acc_true.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 8 and all(cell for row in rows for cell in row)


@pytest.mark.slow
def test_batched_sweep_fills_the_multiruns_jobs_with_the_same_results(tmp_path: Path) -> None:
    """``phis.selfdistill.sweep``: an SGD table's jobs trained as batches of probes land in the
    directories of the multirun's jobs, with the configs those jobs see (so the multirun run after it
    skips every one), and report what the multirun alone reports, up to float32 round-off."""
    sgd = ["sd/solver=sgd", "sd.solver.epochs=3", "sd.solver.batch_size=16", "sd/pll=both", *TINY]
    plain, batched = tmp_path / "plain", tmp_path / "batched"
    alone = _cli("-m", "sd_experiment=block_table", f"hydra.sweep.dir={plain}", *sgd, cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["sd_experiment=block_table", f"hydra.sweep.dir={batched}", *sgd]
    run = subprocess.run(
        [sys.executable, "-m", "phis.selfdistill.sweep", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = _job_dirs(batched)
    names = [j.relative_to(batched) for j in jobs]
    assert names == [j.relative_to(plain) for j in _job_dirs(plain)] and len(names) == 4
    assert all("already finished" in (j / "run.log").read_text() for j in jobs)
    for name in names:
        got, want = (json.loads((root / name / "results.json").read_text()) for root in (batched, plain))
        assert got["config"] == want["config"]
        assert [m["name"] for m in got["models"]] == ["Teacher", "2", "3", "4", "5", "PLL", "PLL-CE"]
        for m, w in zip(got["models"], want["models"]):
            for key in (
                "test_acc_last",
                "test_acc_best_val",
                "test_acc_best_test",
                "train_acc_true",
                "train_acc_given",
                "train_tied",
            ):
                assert m[key] == w[key], (name, m["name"], key)
        assert got["C_realized"] == want["C_realized"] and got["theory"] == want["theory"]


def test_a_failing_job_records_failure_and_the_sweep_reports_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    bad = _cli("-m", f"hydra.sweep.dir={sweep}", "sd.features.n=4", "sd.lam=0.001,-1.0", cwd=tmp_path)
    assert bad.returncode != 0
    assert "sd.lam=-1.0 must be > 0" in bad.stderr
    status = {j.name: json.loads((j / "results.json").read_text())["status"] for j in _job_dirs(sweep)}
    assert status == {"sd.features.n=4,sd.lam=-1.0": "failed", "sd.features.n=4,sd.lam=0.001": "finished"}
    assert len(collect_results(sweep)) == 1  # aggregation only ever sees finished jobs


def test_bad_group_choice_lists_the_options() -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(MissingConfigException) as err:
            compose("selfdistill", overrides=["sd/solver=adam"])
    message = str(err.value)
    assert "sd/solver" in message and "exact" in message and "sgd" in message


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "sd_experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("selfdistill", overrides=[f"sd_experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"{experiment} declares no sweep"
    with open_dict(cfg):
        del cfg["hydra"]
    plain = OmegaConf.to_container(cfg, resolve=True)
    validate(plain)
    assert plain["experiment"].startswith(experiment.split("_")[0])


def test_study_driver_rejects_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown profile 'huge'.*\['smoke', 'mini', 'paper'\]"):
        study.run_study("huge", tmp_path)


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path: Path) -> None:
    """The driver's smoke profile: every block-model experiment's sweep, then all tables/figures."""
    out = tmp_path / "out"
    assert study.run_study("smoke", out, tmp_path / "sweeps") == 0
    names = {p.name for p in out.iterdir()}
    assert {"region.png", "simplex.png", "eigen_decay.png", "block_table_gain.png", "SUMMARY.md"} <= names
    assert "| Teacher |" in (out / "SUMMARY.md").read_text()
