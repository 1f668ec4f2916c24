"""reproduce.sh end to end (smoke profile, rerun, paper dry run, bad arguments) and the PHI-S aggregation."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.phis import tables as phis_tables
from experiments.phis.dry_run import dry_run, sweep_points
from experiments.phis.table_writers import fmt
from phis.ranks import spearman

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "reproduce.sh"


def _reproduce(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run reproduce.sh in its own process group, so a timeout ends its training jobs too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r["method"]: r for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------------------------------
# Aggregation on hand-made results.json files


def _job(root: Path, method: str, seed: int, tmse: dict[str, float], knn: float) -> None:
    """A results.json shaped like phis.train writes it (heldout + eval metrics + teacher stats)."""
    d = root / method / f"seed_{seed}"
    d.mkdir(parents=True)
    (d / "config_resolved.yaml").write_text(f"name: phis_methods\nseed: {seed}\n")
    stats = {
        "channel_mean_min": -1.0,
        "channel_mean_max": 2.0,
        "channel_std_min": 0.5,
        "channel_std_max": 3.0,
        "global_mean": 0.1,
        "global_std": 1.5,
        "alpha_gs": 0.6,
        "alpha_phis": 0.7,
    }
    res = {
        "status": "finished",
        "choices": {"method": method},
        "heldout": {"test": {t: {"mse_teacher": v, "explained": 1 - v} for t, v in tmse.items()}},
        "eval": {"metrics": {"knn/digits": knn, "rankme/digits": 5.0 + seed, "summary_cos/a": 0.9}},
        "teacher_stats": {"a": stats, "b": stats},
    }
    (d / "results.json").write_text(json.dumps(res))


@pytest.fixture
def hand_sweep(tmp_path: Path) -> Path:
    """Three methods x two seeds. Means: tmse/a mse 1, phi_s 0.5, cosine 0.5 (a tie); tmse/b 2, 1, 3;
    knn 0.5, 0.7, 0.9. A failed job and a job of an unknown method must not change anything."""
    root = tmp_path / "sweep"
    for seed, d in ((0, -0.25), (1, 0.25)):
        _job(root, "mse", seed, {"a": 1.0, "b": 2.0}, 0.5)
        _job(root, "phi_s", seed, {"a": 0.5 + d, "b": 1.0}, 0.7 + d / 10)
        _job(root, "cosine", seed, {"a": 0.5, "b": 3.0}, 0.9)
    failed = root / "hyb_mse" / "seed_0"
    failed.mkdir(parents=True)
    (failed / "results.json").write_text(json.dumps({"status": "failed", "choices": {"method": "hyb_mse"}}))
    return root


def test_rank_tables_from_hand_made_results(hand_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    phis_tables.aggregate(hand_sweep, out)
    t1 = _csv(out / "table1_ranks.csv")
    assert list(t1) == ["MSE", "Cosine", "PHI-S"]  # paper row order, failed hyb_mse absent
    # by hand: tmse/a ranks mse 3, phi_s 1, cosine 1 (tie shares the minimum); tmse/b 2, 1, 3;
    # TMSE = 2.5, 1, 2; Cls (knn) = 3, 2, 1; Avg = 2.75, 1.5, 1.5
    expected = {"MSE": (2.5, 3, 2.75), "PHI-S": (1.0, 2, 1.5), "Cosine": (2.0, 1, 1.5)}
    for label, (tm, cls, avg) in expected.items():
        row = t1[label]
        assert float(row["ours TMSE"]) == tm and float(row["ours Cls"]) == cls
        assert float(row["ours Avg"]) == avg
    assert t1["PHI-S"]["ours place"] == t1["Cosine"]["ours place"] == "1" and t1["MSE"]["ours place"] == "3"
    # the paper's numbers sit beside ours, untouched
    assert t1["MSE"]["paper Avg"] == "7.83" and t1["PHI-S"]["paper TMSE"] == "2.00"
    assert t1["Cosine"]["paper place"] == "2"  # among these three: PHI-S 2.92 < Cosine 5.81 < MSE 7.83
    t12 = _csv(out / "table12_ranks.csv")
    assert t12["MSE"]["paper Avg"] == "9.40"
    md = (out / "table1_ranks.md").read_text()
    assert "TMSE: tmse/a, tmse/b" in md and "Cls: knn/digits" in md and "not run (omitted): Seg" in md


def test_mean_std_and_paper_columns_in_teacher_mse_table(hand_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    phis_tables.aggregate(hand_sweep, out)
    t3 = _csv(out / "table3_teacher_mse.csv")
    assert t3["MSE"]["ours a"] == "1 ± 0"
    assert t3["PHI-S"]["ours a"] == f"0.5 ± {math.sqrt(0.125):.2g}"  # sample std of {0.25, 0.75}
    assert t3["PHI-S"]["paper sam"] == "8.3330" and t3["MSE"]["paper dfn_clip_x1e-4"] == "5.0883"
    down = _csv(out / "downstream_raw.csv")
    assert down["PHI-S"]["ours knn/digits"] == f"0.7 ± {math.sqrt(2 * 0.025**2):.2g}"
    assert down["MSE"]["paper knn"] == "71.54"
    index = (out / "README.md").read_text()
    assert "table1_ranks.md" in index and "downstream_raw.md" in index


def test_fmt_and_spearman_against_closed_forms() -> None:
    assert fmt([]) == "—" and fmt([math.nan]) == "—"
    assert fmt([2.0]) == "2"
    assert fmt([1.0, 2.0, 3.0]) == "2 ± 1"
    assert spearman({"x": 1, "y": 2, "z": 3}, {"x": 10, "y": 20, "z": 30}) == pytest.approx(1.0)
    assert spearman({"x": 1, "y": 2, "z": 3}, {"x": 3, "y": 2, "z": 1}) == pytest.approx(-1.0)


def test_sweep_points_are_the_cartesian_product() -> None:
    pts = sweep_points({"method": "mse, phi_s", "seed": "0,1,2"})
    assert len(pts) == 6 and ["method=phi_s", "seed=2"] in pts


# ----------------------------------------------------------------------------------------------------
# reproduce.sh


def test_bad_profile_names_the_choices() -> None:
    proc = _reproduce("--profile", "huge")
    assert proc.returncode == 2
    assert "unknown profile 'huge'" in proc.stderr and "smoke mini paper" in proc.stderr
    proc = _reproduce("--launcher", "pbs")
    assert proc.returncode == 2 and "local slurm" in proc.stderr
    proc = _reproduce("--only", "matched")
    assert proc.returncode == 2 and "all phis phis_matched sd" in proc.stderr


def test_matched_sweep_composes_and_is_refused_at_paper_scale() -> None:
    proc = _reproduce("--only", "phis_matched", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "statistics-matched" in proc.stdout and "SD-PLL" not in proc.stdout
    proc = _reproduce("--profile", "paper", "--only", "phis_matched")
    assert proc.returncode == 2 and "run it with --profile mini" in proc.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One PHI-S smoke reproduction into a temporary runs/results root."""
    base = tmp_path_factory.mktemp("reproduce")
    runs, results = base / "runs", base / "results"
    proc = _reproduce("--profile", "smoke", "--only", "phis", "--runs", str(runs), "--results", str(results))
    return runs, results, proc


def test_smoke_profile_produces_every_phis_table(smoke) -> None:
    runs, results, proc = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = results / "phis"
    for stem in (
        "table1_ranks",
        "table12_ranks",
        "table3_teacher_mse",
        "downstream_raw",
        "table5_error_variance",
        "table6_rankme",
        "table7_teacher_stats",
        "table8_alpha",
        "table9_hadamard_alignment",
    ):
        assert (out / f"{stem}.md").is_file() and (out / f"{stem}.csv").is_file(), stem
    for fig in (
        "fig1_pca_before_after",
        "fig2_activation_histograms",
        "fig3_loss_curves",
        "fig9_channel_loss_histograms",
    ):
        assert (out / f"{fig}.png").stat().st_size > 1000, fig
    t12 = _csv(out / "table12_ranks.csv")
    assert len(t12) == 12 and all(1 <= float(r["ours Avg"]) <= 12 for r in t12.values())
    assert len(list((runs / "smoke" / "phis_methods").glob("*/seed_0/results.json"))) == 12
    assert "PHI-S tables and figures:" in proc.stdout


def test_rerun_skips_finished_jobs(smoke) -> None:
    runs, results, first = smoke
    assert first.returncode == 0
    done = sorted((runs / "smoke" / "phis_methods").glob("*/seed_0/results.json"))
    before = {p: p.stat().st_mtime_ns for p in done}
    proc = _reproduce("--profile", "smoke", "--only", "phis", "--runs", str(runs), "--results", str(results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in done} == before  # no job ran again
    assert proc.stdout.count("is finished; skipping") + proc.stderr.count("is finished; skipping") >= 12


def test_smoke_profile_runs_the_selfdistill_study(tmp_path: Path) -> None:
    proc = _reproduce(
        "--profile",
        "smoke",
        "--only",
        "sd",
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "results" / "selfdistill"
    assert list(out.glob("*.md")) and list(out.glob("*.png"))


def test_paper_dry_run_composes_every_job(tmp_path: Path) -> None:
    proc = _reproduce("--profile", "paper", "--dry-run", "--launcher", "slurm", "--runs", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "58/58 job configs of profile 'paper' resolve" in proc.stdout
    # One 256 px stage of a global batch of 1,024 (128 per GPU on one 8-GPU node), one partition per teacher.
    stage1 = "stage1: 300000 steps, 256px, global batch 1024 (128/GPU on 1x8), per_teacher"
    assert proc.stdout.count(stage1) == 57
    three = "stage3_432px_hires_sam: 300000 steps, 432px, global batch 1024 (128/GPU on 1x8), per_teacher, "
    assert f"{three}hires 128, 16/GPU at 1024px for ['sam']" in proc.stdout
    assert "[sd] dry run: 864 jobs in profile 'paper'" in proc.stdout  # 6 datasets × 144
    assert not (tmp_path / "paper").exists()  # nothing ran


@pytest.mark.slow
def test_dry_run_fails_on_an_unresolvable_job() -> None:
    assert dry_run("smoke", extra=["data.train.count=${no.such.key}"]) == 1
    with pytest.raises(ValueError, match="choose one of"):
        dry_run("large")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
