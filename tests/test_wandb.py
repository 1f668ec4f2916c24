"""The W&B mirror (logger=wandb): one run per job, names and tags, summaries and tables, the sweep's
table run, resuming a killed job's run, and W&B failures that stay warnings.

Runs are written offline and read back from their ``.wandb`` files: wandb's record protos
(``wandb.proto.wandb_internal_pb2.Record``) framed in wandb's LevelDB-style log (32 KiB blocks, each
record a 7-byte header: CRC32, length, chunk type). No network is used.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from phis import wandb_logging as wbl
from phis.results import run_metrics

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline run file says: the run record, the summary as last written, the exit code."""

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None

    def table(self, key: str) -> dict:
        """The JSON of the wandb.Table logged under ``key`` (columns, data)."""
        assert self.summary[key]["_type"] == "table-file", self.summary[key]
        return json.loads((self.path.parent / "files" / self.summary[key]["path"]).read_text())


def _chunks(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""  # header: ":W&B", magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record cut off by a killed writer
            return
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def read_run(path: Path) -> OfflineRun:
    """Parse one ``run-<id>.wandb`` file with wandb's record protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = OfflineRun(path)
    for chunk in _chunks(path):
        rec = pb.Record.FromString(chunk)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.run_id, out.name, out.group, out.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            out.tags = list(r.tags)
            out.config = {u.key: json.loads(u.value_json) for u in r.config.update}
        elif kind == "summary":
            for u in rec.summary.update:
                keys = list(u.nested_key) or [u.key]
                node = out.summary
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(u.value_json)
        elif kind == "exit":
            out.exit_code = rec.exit.exit_code
    return out


def runs_under(root: Path) -> list[OfflineRun]:
    return [read_run(p) for p in sorted(root.rglob("run-*.wandb"))]


# ----------------------------------------------------------------------------------------------------
# Unit checks (no W&B process)


def test_run_name_from_the_swept_overrides() -> None:
    overrides = ["method=phi_s", "seed=1", "+profile=smoke", "logger=wandb", "sd.corruption.eta=0.5"]
    groups = ["method", "profile", "logger"]
    assert wbl.run_name(overrides, ["method", "seed"], groups, "x") == "phi_s/seed_1"
    assert wbl.run_name(overrides, ["sd.corruption.eta"], groups, "x") == "eta_0.5"
    # a single run: every override names it except the logger's
    assert wbl.run_name(overrides, None, groups, "x") == "phi_s/seed_1/smoke/eta_0.5"
    assert wbl.run_name(["logger=wandb"], None, groups, "fallback") == "fallback"


def test_sweep_keys_of_the_command_line_reach_the_jobs(monkeypatch) -> None:
    monkeypatch.delenv(wbl.SWEEP_KEYS_ENV, raising=False)
    task = ["method=mse,phi_s", "seed=0", "+profile=smoke", "sd.corruption.eta=range(0,1,0.5)"]
    config = OmegaConf.create({"hydra": {"overrides": {"task": task}}})
    wbl.SweepMirror().on_multirun_start(config)
    assert os.environ[wbl.SWEEP_KEYS_ENV] == "method,sd.corruption.eta"


def test_flat_numbers_keeps_every_scalar_under_its_path() -> None:
    results = {
        "status": "finished",
        "steps": 4,
        "choices": {"seed": 3},
        "heldout": {"test": {"clip": {"mse_teacher": 0.5, "summary_cosine": None, "tokens": 8}}},
        "eval": {"metrics": {"tmse/clip": 0.5, "knn/digits": 0.25}, "config": {"knn_k": 20}},
        "models": [{"name": "Teacher", "test_acc_last": 0.9}, {"name": "PLL", "test_acc_last": 1.0}],
        "theory": {"thresholds": [0.1, 0.2], "ok": True},
    }
    assert wbl.flat_numbers(results) == {
        "steps": 4,
        "heldout/test/clip/mse_teacher": 0.5,
        "heldout/test/clip/tokens": 8,
        "tmse/clip": 0.5,
        "knn/digits": 0.25,
        "models/Teacher/test_acc_last": 0.9,
        "models/PLL/test_acc_last": 1.0,
    }


def test_per_teacher_table_has_a_row_per_teacher_and_split() -> None:
    results = {
        "train_fit": {"a": {"mse_teacher": 1.0}, "b": {"mse_teacher": 2.0}},
        "heldout": {"test": {"a": {"mse_teacher": 3.0, "explained": 0.1}, "b": {"mse_teacher": 4.0}}},
        "teacher_stats": {"a": {"alpha_phis": 2.0}, "b": {"alpha_phis": 0.5}},
    }
    columns, rows = wbl.train_tables(results)["results/per_teacher"]
    assert columns == ["teacher", "split", "mse_teacher", "explained", "alpha_phis"]
    assert rows == [
        ["a", "train", 1.0, None, 2.0],
        ["a", "test", 3.0, 0.1, 2.0],
        ["b", "train", 2.0, None, 0.5],
        ["b", "test", 4.0, None, 0.5],
    ]


def _cfg(tmp_path: Path, mode: str = "offline") -> OmegaConf:
    return OmegaConf.create(
        {
            "name": "unit",
            "logger": {
                "wandb": {"project": "phis-test", "entity": None, "group": "unit", "mode": mode},
                "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path)},
            },
        }
    )


def test_settings_off_unless_wandb_and_bad_mode_lists_the_choices(tmp_path: Path) -> None:
    assert wbl.wandb_settings(OmegaConf.create({"logger": {"_target_": "CSVLogger"}})) is None
    assert wbl.wandb_settings(_cfg(tmp_path, "disabled")) is None
    assert wbl.wandb_settings(_cfg(tmp_path))["project"] == "phis-test"
    with pytest.raises(ValueError, match="online, offline, disabled"):
        wbl.wandb_settings(_cfg(tmp_path, "offlne"))


def test_a_wandb_failure_is_a_warning_and_the_csv_record_stays(tmp_path, monkeypatch, caplog) -> None:
    import wandb

    def no_credentials(**kwargs):
        raise wandb.errors.UsageError("No API key configured")

    monkeypatch.setattr(wandb, "init", no_credentials)
    with caplog.at_level(logging.WARNING), wbl.JobMirror(_cfg(tmp_path), {}, tmp_path) as mirror:
        loggers = mirror.trainer_loggers()
        mirror.record({"status": "finished", "x": 1.0}, {})
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    assert not mirror.enabled
    assert "W&B init failed (UsageError: No API key configured)" in caplog.text


@pytest.mark.slow
def test_exit_status_is_recorded_and_a_rerun_resumes_the_id(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RuntimeError), wbl.JobMirror(_cfg(tmp_path), {"method": "m"}, tmp_path) as mirror:
        mirror.open()
        raise RuntimeError("the job crashed")
    with wbl.JobMirror(_cfg(tmp_path), {"method": "m"}, tmp_path) as mirror:
        mirror.open()
        mirror.record({"status": "failed", "heldout": {"test": {"a": {"mse_teacher": float("inf")}}}}, {})
    crashed, failed = runs_under(tmp_path)
    assert crashed.run_id == failed.run_id == json.loads((tmp_path / wbl.RUN_FILE).read_text())["id"]
    assert crashed.exit_code == 1 and failed.exit_code == 1
    assert crashed.tags == ["method:m"] and crashed.group == "unit"
    assert failed.summary["status"] == "failed"


# ----------------------------------------------------------------------------------------------------
# End to end: the real CLI, offline runs read back


def _env() -> dict[str, str]:
    """A job's environment: offline W&B with its own wandb-core (an in-process test's service, named
    in WANDB_SERVICE, would otherwise serve the jobs too and outlive a killed one)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_train_multirun_gives_one_named_tagged_run_per_job_and_a_table_run(tmp_path: Path) -> None:
    sweep, tables = tmp_path / "sweep", tmp_path / "tables"
    proc = _cli(
        "phis.train",
        "-m",
        "experiment=phis_methods",
        "+profile=smoke",
        "teachers=tiny",
        "method=mse,phi_s",
        "seed=0",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        f"reproduce.tables={tables}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {r.name: r for r in runs_under(sweep) if r.job_type != "tables"}
    table_runs = [r for r in runs_under(sweep) if r.job_type == "tables"]
    assert sorted(jobs) == ["mse/seed_0", "phi_s/seed_0"]
    assert len({r.run_id for r in jobs.values()}) == 2
    assert len(table_runs) == 1 and table_runs[0].group == "phis_methods"

    teachers = ["clip", "dinov2", "sam", "siglip"]  # conf/teachers/tiny.yaml
    for method, normalizer in (("mse", "identity"), ("phi_s", "phi_s")):
        run = jobs[f"{method}/seed_0"]
        assert run.group == "phis_methods" and run.job_type == "smoke" and run.exit_code == 0
        assert set(run.tags) == {
            f"method:{method}",
            f"normalizer:{normalizer}",
            "loss:mse",
            "teachers:tiny",
            "student:tiny",
            "profile:smoke",
        }
        assert run.config["choices"]["method"] == method and run.config["normalizer"]["name"] == normalizer
        # the summary holds results.json's numbers, under its keys
        results = json.loads((sweep / method / "seed_0" / "results.json").read_text())
        for t in teachers:
            assert run.summary[f"heldout/test/{t}/mse_teacher"] == pytest.approx(
                results["heldout"]["test"][t]["mse_teacher"]
            )
            assert run.summary[f"tmse/{t}"] == pytest.approx(run_metrics(results)[f"tmse/{t}"])
        table = run.table("results/per_teacher")
        assert sorted({row[0] for row in table["data"]}) == teachers
        assert len(table["data"]) == len(teachers) * 3  # train, val, test
        # the CSV metrics stay the record beside W&B
        assert list((sweep / method / "seed_0" / "csv").rglob("metrics.csv"))

    sweep_run = table_runs[0]
    jobs_table = sweep_run.table("sweep/jobs")
    assert sorted(row[3] for row in jobs_table["data"]) == ["mse/seed_0", "phi_s/seed_0"]
    table3 = sweep_run.table("tables/table3_teacher_mse")
    assert table3["data"] and any("paper" in c.lower() for c in table3["columns"])
    assert sweep_run.exit_code == 0


@pytest.mark.slow
def test_selfdistill_multirun_gives_one_run_per_job_and_a_table_run(tmp_path: Path) -> None:
    sweep, tables = tmp_path / "sweep", tmp_path / "tables"
    proc = _cli(
        "phis.selfdistill.run",
        "-m",
        "sd/pll=both",
        "sd.features.n=6",
        "sd.features.n_test=2",
        "sd.corruption.eta=0.0,0.5",  # swept on the command line only: the names come from here
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        f"tables_dir={tables}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_under(sweep)
    jobs = {r.name: r for r in runs if r.job_type != "tables"}
    assert sorted(jobs) == ["eta_0.0", "eta_0.5"]
    assert len({r.run_id for r in jobs.values()}) == 2
    for run in jobs.values():
        assert run.group == "adhoc" and run.exit_code == 0
        assert {"experiment:adhoc", "noise:sym", "solver:exact", "pll:gce+ce"} <= set(run.tags)
        rows = {row[0]: row for row in run.table("results/models")["data"]}
        assert list(rows) == ["Teacher", "2", "3", "4", "5", "PLL", "PLL-CE"]
        assert run.summary["models/PLL/train_acc_true"] == pytest.approx(rows["PLL"][3])
    # job directories are named without the logger choice, so logger=wandb reuses finished jobs
    assert not any("logger" in p.name for p in sweep.iterdir())
    (table_run,) = [r for r in runs if r.job_type == "tables"]
    assert table_run.group == "adhoc"
    assert table_run.table("tables/adhoc_train_acc_true")["data"]
    assert "figures/adhoc_gain" in table_run.summary


@pytest.mark.slow
def test_a_killed_job_resumes_its_own_run(tmp_path: Path) -> None:
    job = tmp_path / "job"
    args = [
        sys.executable,
        "-m",
        "phis.train",
        "+profile=smoke",
        "teachers=tiny",
        "logger=wandb",
        "trainer.max_steps=40",
        f"hydra.run.dir={job}",
    ]
    env = _env()
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300

    def started() -> bool:  # the run record is in the run file: the job's W&B run is live
        return any(read_run(f).run_id for f in job.glob("wandb/offline-run-*/run-*.wandb"))

    while not started():
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before its W&B run started"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its wandb-core process
    proc.wait()
    assert not (job / "results.json").exists()
    first_id = json.loads((job / "wandb_run.json").read_text())["id"]

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    runs = runs_under(job)
    assert len(runs) == 2 and {r.run_id for r in runs} == {first_id}
    finished = [r for r in runs if r.exit_code is not None]
    assert len(finished) == 1 and finished[0].exit_code == 0
    assert "heldout/test/clip/mse_teacher" in finished[0].summary


@pytest.mark.slow
def test_batched_selfdistill_sweep_mirrors_every_job(tmp_path: Path) -> None:
    # phis.selfdistill.sweep trains the SGD jobs in one batch; the multirun then finds them finished
    # and each job still gets its own finished W&B run.
    sweep, tables = tmp_path / "sweep", tmp_path / "tables"
    proc = _cli(
        "phis.selfdistill.sweep",
        "sd/solver=sgd",
        "sd.solver.epochs=2",
        "sd.features.n=6",
        "sd.features.n_test=2",
        "sd.corruption.eta=0.0,0.5",
        "logger=wandb",
        f"hydra.sweep.dir={sweep}",
        f"tables_dir={tables}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already finished") + proc.stderr.count("already finished") == 2
    runs = runs_under(sweep)
    jobs = {r.name: r for r in runs if r.job_type != "tables"}
    assert sorted(jobs) == ["eta_0.0", "eta_0.5"]
    teacher_acc = {}
    for path in sweep.rglob("results.json"):  # job dirs are named by their overrides, "/" included
        results = json.loads(path.read_text())
        eta = results["config"]["sd"]["corruption"]["eta"]
        teacher_acc[f"eta_{eta}"] = results["models"][0]["test_acc_last"]
    for name, run in jobs.items():
        assert run.exit_code == 0 and "solver:sgd" in run.tags
        table = run.table("results/models")
        rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
        assert rows["Teacher"]["test_acc_last"] == pytest.approx(teacher_acc[name])
    assert [r.job_type for r in runs].count("tables") == 1
