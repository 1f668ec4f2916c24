"""End-to-end training through the real Hydra config: every method, resume, NaN stop, bad choices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict

from phis.train import summary_table, train

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))

# Tiny random teachers (4x4 grids at 32 px) and a one-block student with 8-px patches (4x4 grid);
# 64 training images in batches of 16 make 4-step epochs.
TINY = [
    "teachers=tiny",
    "student.img_size=32",
    "student.num_registers=2",
    "student.head_hidden_dim=32",
    "++student.trunk_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "data.train.count=64",
    "data.val.count=16",
    "data.test.count=16",
    "data.batch_size=16",
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "optim.warmup_steps=2",
    "eval.enabled=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One teacher cache for the whole session: the tiny teachers run once per image set."""
    return tmp_path_factory.mktemp("teacher_cache")


def make_cfg(out: Path, cache: Path, *overrides: str) -> DictConfig:
    """The real conf/train.yaml composed with tiny overrides, as Hydra would hand it to main()."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*TINY, f"output_dir={out}", f"cache.dir={cache}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_one_stage_plan_is_built_per_run_and_shared(tmp_path, cache_dir, monkeypatch) -> None:
    """The run's stages are read from the config once and the same plan serves data, module and trainer."""
    from phis.stages import StagePlan

    built, seen = [], {}
    real = StagePlan.from_config.__func__

    def counting(cls, *args, **kwargs):
        built.append(kwargs.get("max_steps"))
        return real(cls, *args, **kwargs)

    class Record(Callback):
        def on_train_start(self, trainer, module) -> None:
            seen["module"], seen["data"] = module.plan, trainer.datamodule.plan

    monkeypatch.setattr(StagePlan, "from_config", classmethod(counting))
    train(make_cfg(tmp_path, cache_dir, "trainer.max_steps=2"), callbacks=[Record()])
    assert built == [2]
    assert seen["module"] is seen["data"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reports(method: str, tmp_path, cache_dir) -> None:
    # one run also caps the training-fit diagnostic (eval.train_fit_limit); held-out splits stay whole
    capped = ["eval.train_fit_limit=4"] if method == "mse" else []
    res = train(make_cfg(tmp_path, cache_dir, f"method={method}", *capped))
    assert len(METHODS) == 12
    assert res["status"] == "finished" and res["steps"] == 8 and res["choices"]["method"] == method
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["method"] == res["method"]
    assert res["method"]["adaloss"] == method.startswith("ada_")
    for split in ("val", "test"):
        per_teacher = res["heldout"][split]
        assert set(per_teacher) == {"clip", "siglip", "dinov2", "sam"}
        for r in per_teacher.values():
            assert r["mse_teacher"] >= 0 and r["variance"] > 0 and r["explained"] < 1
        assert (
            per_teacher["sam"]["summary_cosine"] is None and -1 <= per_teacher["clip"]["summary_cosine"] <= 1
        )
    assert set(res["teacher_stats"]["sam"]) >= {"channel_mean_min", "global_std", "alpha_phis"}
    assert set(res["train_fit"]) == {"clip", "siglip", "dinov2", "sam"}
    per_image = res["heldout"]["val"]["clip"]["tokens"] // 16  # data.val.count=16
    assert res["train_fit"]["clip"]["tokens"] == (4 if capped else 64) * per_image
    assert all(r["mse_teacher"] >= 0 and r["explained"] < 1 for r in res["train_fit"].values())
    lines = summary_table({"train": res["train_fit"], **res["heldout"]}, res["teacher_stats"]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "train explained by train mean" not in header and "test explained by train mean" in header
    assert len(lines) == 2 + 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    sam_row = next(line for line in lines if line.startswith("| sam"))
    sam = dict(zip(header, (c.strip() for c in sam_row.strip("|").split("|"))))
    assert float(sam["val explained"]) == pytest.approx(res["heldout"]["val"]["sam"]["explained"], abs=5e-4)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (
        tmp_path / "config_resolved.yaml"
    ).is_file()
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()


class Recorder(Callback):
    """Copies of the trunk's first weight and of one head's weight before every step."""

    def __init__(self) -> None:
        self.trunk, self.head = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.trunk.append(module.student.trunk.patch_embed.proj.weight.detach().clone())
        self.head.append(module.student.feature_heads["clip"].final.weight.detach().clone())


def test_schedule_estimation_and_trunk_freeze(tmp_path, cache_dir) -> None:
    """Statistics estimated while training (refit every 2 steps, frozen after 4); trunk frozen for 3 steps."""
    rec = Recorder()
    res = train(
        make_cfg(
            tmp_path,
            cache_dir,
            "distill.normalizer_fit=schedule",
            "distill.estimate_steps=4",
            "distill.refit_every=2",
            "distill.freeze_trunk_steps=3",
        ),
        callbacks=[rec],
    )
    assert res["status"] == "finished"
    assert all(torch.equal(rec.trunk[0], w) for w in rec.trunk[1:4]) and not torch.equal(
        rec.trunk[3], rec.trunk[4]
    )
    assert not torch.equal(rec.head[0], rec.head[1])  # heads train from the first step
    state = final_state(tmp_path)
    assert int(state["normalizers.clip.stats.count"]) == 4 * 16 * 16  # 4 steps x 16 images x 16 tokens
    assert bool(state["normalizers.clip._frozen"])


def test_uncached_teachers_run_every_step(tmp_path, cache_dir) -> None:
    res = train(
        make_cfg(
            tmp_path,
            cache_dir,
            "cache.enabled=false",
            "distill.normalizer_fit=schedule",
            "trainer.max_steps=4",
        )
    )
    assert res["status"] == "finished" and res["teacher_stats"] is None
    assert res["heldout"]["val"]["dinov2"]["variance"] > 0


def test_paper_analyses_work_without_a_teacher_cache(tmp_path, cache_dir) -> None:
    """cache.enabled=false (the paper profile's setting): Tables 7-9 and Figs. 1, 2, 9 come from the
    teachers on a capped training sample, and the index says why each missing table is missing."""
    from experiments.phis import tables as phis_tables
    from experiments.phis.runs import teacher_features
    from phis.stats import activation_stats, token_moments

    run = tmp_path / "sweep" / "phi_s" / "seed_0"
    off = ["eval.enabled=true", "eval.knn_sets=[]", "eval.seg_sets=[]", "eval.zero_shot=false"]
    cacheless = ["cache.enabled=false", "distill.normalizer_fit=schedule", "trainer.max_steps=4"]
    assert train(make_cfg(run, cache_dir, *cacheless, *off))["teacher_stats"] is None
    out = tmp_path / "tables"
    phis_tables.aggregate_analyses(tmp_path / "sweep", out)
    tables = ("table5_error_variance", "table7_teacher_stats", "table8_alpha", "table9_hadamard_alignment")
    for stem in tables:
        assert (out / f"{stem}.md").is_file(), stem
    for fig in ("fig1_pca_before_after", "fig2_activation_histograms", "fig3_loss_curves"):
        assert (out / f"{fig}.png").is_file(), fig
    assert (out / "fig9_channel_loss_histograms.png").is_file()  # the teachers ran on the held-out split
    table7 = (out / "table7_teacher_stats.csv").read_text().splitlines()
    assert "kept no teacher cache" in (out / "table7_teacher_stats.md").read_text()
    sample = teacher_features(run)  # the same deterministic sample, recomputed
    for name, y in sample.items():
        row = next(r.split(",") for r in table7 if r.startswith(f"ours: {name},"))
        expected = activation_stats(token_moments(y))["global_std"]
        assert float(row[-1]) == pytest.approx(expected, rel=1e-3), name  # printed to 4 digits
    index = (out / "README.md").read_text()
    assert "Not made here:" in index and "- table6_rankme: no run has rankme metrics" in index
    assert "- table1_ranks: its experiment did not run" in index
    assert "[table7_teacher_stats.md]" in index


@pytest.mark.parametrize("split", ["val", "test"])
def test_end_of_training_evaluation_measures_the_chosen_split(split: str, tmp_path, cache_dir) -> None:
    """The evaluation names the split whose teacher MSE training stored (once, under heldout); the
    tables read it from there, and phis.eval on the checkpoint (its own loader) measures the same."""
    from phis.eval import main as eval_main
    from phis.results import run_metrics

    off = ["eval.enabled=true", "eval.knn_sets=[]", "eval.seg_sets=[]", "eval.zero_shot=false"]
    res = train(make_cfg(tmp_path, cache_dir, "trainer.max_steps=4", *off, f"eval.heldout_split={split}"))
    assert res["eval"]["details"]["tmse"] == {"heldout": split, "stored_in": f"heldout.{split}"}
    assert not any(k.startswith(("tmse", "err_var_range", "summary_cos")) for k in res["eval"]["metrics"])
    flat = run_metrics(res)
    ckpt, sets = tmp_path / "checkpoints" / "last.ckpt", ["knn_sets=[]", "seg_sets=[]", "zero_shot=false"]
    again_dir = str(tmp_path / "again")
    (again,) = eval_main([str(ckpt), "--out", again_dir, "--set", f"heldout_split={split}", *sets])
    assert again["details"]["tmse"] == {"heldout": split}
    for teacher, r in res["heldout"][split].items():
        assert flat[f"tmse/{teacher}"] == r["mse_teacher"]
        assert flat[f"err_var_range/{teacher}"] == r["error_variance_range"]
        assert again["metrics"][f"tmse/{teacher}"] == pytest.approx(r["mse_teacher"], rel=1e-5)
        assert again["metrics"][f"tmse_explained/{teacher}"] == pytest.approx(r["explained"], abs=1e-5)
    with pytest.raises(ValueError, match=r"heldout_split 'train'.*\('auto', 'test', 'val'\)"):
        train(make_cfg(tmp_path / "bad", cache_dir, "trainer.max_steps=1", *off, "eval.heldout_split=train"))
    assert not (tmp_path / "bad").exists()  # refused before anything ran or was written


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_killed_run_resumes_to_the_same_result(tmp_path, cache_dir) -> None:
    """Crash at step 6 (checkpoint at 4), rerun: weights and metrics equal an uninterrupted run's."""
    overrides = ("trainer.max_steps=12", "student.cpe=true", "student.cpe_max_size=64", "method=ada_phi_s")
    whole = train(make_cfg(tmp_path / "whole", cache_dir, *overrides))
    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(broken, cache_dir, *overrides), callbacks=[CrashAt(6)])
    assert not (broken / "results.json").exists()
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    resumed = train(make_cfg(broken, cache_dir, *overrides))
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 12
    a, b = final_state(tmp_path / "whole"), final_state(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["heldout"] == whole["heldout"]


def test_finished_run_is_skipped(tmp_path, cache_dir) -> None:
    cfg = make_cfg(tmp_path, cache_dir, "trainer.max_steps=4")
    first = train(cfg)
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    assert train(cfg) == first and (tmp_path / "results.json").stat().st_mtime_ns == stamp


class PoisonAt(Callback):
    """Makes the student's weights NaN before a given step, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.student.trunk.patch_embed.proj.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir) -> None:
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at step 5.*last.ckpt"):
        train(make_cfg(tmp_path, cache_dir), callbacks=[PoisonAt(5)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and "non-finite" in res["error"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_dimension_mismatches_are_clear_errors(tmp_path, cache_dir) -> None:
    with pytest.raises(ValueError, match="img_size 36 is not a multiple of the patch size 8"):
        train(make_cfg(tmp_path / "a", cache_dir, "student.img_size=36"))
    train(make_cfg(tmp_path / "b", cache_dir, "trainer.max_steps=4", "trainer.check_val_every_n_epoch=5"))
    (tmp_path / "b" / "results.json").unlink()  # unfinished: a rerun would resume
    swapped = "teachers/teacher@teachers.sam=tiny_timm_cnn"  # same slot, 24-d features instead of 16
    with pytest.raises(ValueError, match="teacher 'sam' has feature_dim=24 now but 16 in the checkpoint"):
        train(make_cfg(tmp_path / "b", cache_dir, swapped))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "phis.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_group_choice_names_the_choices(tmp_path) -> None:
    proc = _cli("method=phi_z", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'method/phi_z'" in proc.stderr
    for choice in ("phi_s", "ada_phi_s", "hadamard_whiten", "hyb_smooth_l1"):
        assert choice in proc.stderr


@pytest.mark.slow
def test_cli_multirun_writes_one_result_per_method(tmp_path, cache_dir) -> None:
    sweep = tmp_path / "sweep"
    proc = _cli(
        "-m", *TINY, f"cache.dir={cache_dir}", "method=phi_s,mse", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        res = json.loads((sweep / job / "results.json").read_text())
        assert res["status"] == "finished"
        assert (sweep / job / ".hydra" / "config.yaml").is_file()


@pytest.mark.parametrize("choice", ["launcher=slurm", "experiment=example", "logger=wandb", "trainer=ddp"])
def test_other_group_choices_compose(choice: str, tmp_path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[choice, f"output_dir={tmp_path}"], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    if choice == "launcher=slurm":
        assert "submitit" in cfg.hydra.launcher._target_
        assert cfg.trainer.devices == cfg.hydra.launcher.tasks_per_node == 8 and cfg.trainer.num_nodes == 1
        assert cfg.trainer.strategy.broadcast_buffers is False and cfg.trainer.strategy.find_unused_parameters
    elif choice == "experiment=example":
        assert cfg.name == "example" and cfg.normalizer.name == "identity" and cfg.trainer.max_steps == 96
    elif choice == "logger=wandb":
        assert cfg.logger.wandb.group == "default" and cfg.logger.csv._target_.endswith("CSVLogger")
        assert cfg.hydra.callbacks.wandb._target_ == "phis.wandb_logging.SweepMirror"
    else:
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == -1
        assert cfg.trainer.strategy._target_.endswith("DDPStrategy")


def test_ddp_on_two_cpu_ranks_fits_normalizers_on_every_rank_s_tokens(tmp_path, cache_dir) -> None:
    """trainer=ddp on 2 CPU processes (gloo): the estimated statistics cover both ranks' tokens.

    64 images in global batches of 32 (16 per rank) are one 2-step epoch, so after estimating for 2 steps the
    all-reduced mean must equal the mean over the whole training cache. With buffers broadcast from
    rank 0 at every forward, rank 1's statistics would be overwritten and the mean would be rank 0's.
    """
    run = tmp_path / "run"
    overrides = [
        *TINY,
        f"cache.dir={cache_dir}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=32",  # global: 16 per rank
        "trainer.precision=32-true",
        "trainer.max_steps=4",
        "method=ada_phi_s",
        "distill.normalizer_fit=schedule",
        "distill.estimate_steps=2",
        "distill.refit_every=100",
        f"hydra.run.dir={run}",
    ]
    proc = _cli(*overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "finished" and res["steps"] == 4
    state = final_state(run)
    cfg = make_cfg(run, cache_dir, *(o for o in overrides if o.startswith(("distill", "method"))))
    from phis.build import build_datamodule

    dm = build_datamodule(cfg)
    for name in ("clip", "dinov2"):
        cache = dm.caches["train"][name]
        assert cache.features.shape[1:3] == (4, 4)  # the student's grid: no resampling to account for
        assert int(state[f"normalizers.{name}.fit_summary"][0]) == 64 * 16  # every image's 16 tokens
        torch.testing.assert_close(
            state[f"normalizers.{name}.mu"], cache.moments().mean, rtol=1e-6, atol=1e-6
        )
    # AdaLoss: one running estimate per term, identical on both ranks, so rank 0's is the average
    assert int(state["adaloss.clip_features.steps"]) == 4


@pytest.mark.slow
def test_pretrained_student_is_loaded_when_a_run_starts_never_on_resume(tmp_path, cache_dir) -> None:
    """A timm file of the tiny student's architecture, LR 0: the trained trunk is the file's; the resumed
    run does not need the file any more. Spectral reparametrization rides along through the checkpoint."""
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2
    )
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    out = tmp_path / "run"
    overrides = (f"student.pretrained={weights}", "student.spectral_reparam=true", "optim.lr=0")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(out, cache_dir, "trainer.max_steps=8", *overrides), callbacks=[CrashAt(6)])
    state = final_state(out)  # step 4
    qkv = "student.trunk.blocks.0.attn.qkv.parametrizations.weight.original"
    assert torch.equal(state[qkv], ref.blocks[0].attn.qkv.weight.detach())
    assert torch.equal(state["student.pos_table"][0], ref.pos_embed[0, 1:].detach().reshape(4, 4, 32))
    assert "student.trunk.blocks.0.attn.qkv.parametrizations.weight.0.u" in state
    weights.unlink()
    resumed = train(make_cfg(out, cache_dir, "trainer.max_steps=8", *overrides))
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 8


def test_kept_normalized_targets_train_like_recomputed_ones(tmp_path, cache_dir, monkeypatch) -> None:
    """distill.target_memo_mb: from the second epoch the dense normalizers are not run on cached
    targets again, and training ends where recomputing them every step ends (up to round-off)."""
    from phis.normalizers import Normalizer

    calls, forward = [], Normalizer.forward

    def counted(self, y):
        calls.append(len(y))
        return forward(self, y)

    monkeypatch.setattr(Normalizer, "forward", counted)
    train(make_cfg(tmp_path / "warm", cache_dir, "method=phi_s"))  # builds the teacher cache if missing
    counts, states = {}, {}
    for memo in (0, 64):
        calls.clear()
        out = tmp_path / f"memo{memo}"
        train(make_cfg(out, cache_dir, "method=phi_s", f"distill.target_memo_mb={memo}"))
        counts[memo], states[memo] = len(calls), final_state(out)
    # 8 steps over 64 images in batches of 16: the second epoch's 4 steps x 4 teachers read them back
    assert counts[0] - counts[64] == 16
    for k, v in states[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(states[64][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_run_that_builds_the_teacher_cache_trains_like_one_that_reads_it(tmp_path) -> None:
    """Building a missing cache entry makes teachers (random draws of their own); the student's
    initialization and training must not depend on whether the cache existed."""
    cold, hot = tmp_path / "cold", tmp_path / "hot"
    train(make_cfg(cold, tmp_path / "cache", "method=mse"))  # builds every entry
    train(make_cfg(hot, tmp_path / "cache", "method=mse"))  # reads them
    a, b = final_state(cold), final_state(hot)
    assert a.keys() == b.keys()
    for k in a:  # bit for bit (fit_summary of an identity normalizer is NaN)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
