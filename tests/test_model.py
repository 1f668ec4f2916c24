"""The released student: a finished run exports it, the export computes what the trained module computes,
it loads without the training stack and through torch.hub, keeps its input contract, and a new run can
start from it."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from test_train import cache_dir, make_cfg  # noqa: F401 - the teacher-cache fixture

import phis
from phis.export import export_program
from phis.export import main as export_main
from phis.model import PhisModel
from phis.module import DistillModule
from phis.student import MultiTeacherViT
from phis.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# The tiny run of test_train with CPE (a 64 px table at 32 px training size) and spectral reparametrization.
RUN = ("student.cpe=true", "student.cpe_max_size=64", "student.spectral_reparam=true")
SIZES = ((32, 32), (48, 48), (24, 40), (80, 48))  # training size, inside the CPE table, non-square, past it


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir) -> dict:  # noqa: F811
    """One finished tiny run (it exports its student) and what phis logged."""
    out = tmp_path_factory.mktemp("run")
    messages, logger = Messages(), logging.getLogger("phis")
    level = logger.level
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    try:
        results = train(make_cfg(out, cache_dir, *RUN))
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)
    return {"out": out, "results": results, "log": messages.lines}


def images(*size: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def reference(module: DistillModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the trained module computes: trunk summary/patches and each teacher in teacher space."""
    with torch.no_grad():
        summary, spatial = module.embed(x)
        out = module.student(x)
    ref = {"summary": summary, "spatial": spatial}
    for n in module.teacher_names:
        ref[f"{n}/features"] = module.normalizers[n].denormalize(out.features[n])  # [B, h*w, C]
        if n in out.summaries:
            ref[f"{n}/summary"] = out.summaries[n]
    return ref


def outputs(model: PhisModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        summary, spatial = model(x)
        teachers = model.forward_teachers(x, feature_fmt="NLC")
    out = {"summary": summary, "spatial": spatial}
    for n, o in teachers.items():
        out[f"{n}/features"] = o.features
        if o.summary is not None:
            out[f"{n}/summary"] = o.summary
    return out


def assert_round_off(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tag: str = "") -> None:
    """Equal to float32 round-off: every difference within 1e-5 of the tensor's largest value."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        worst = float((a[k] - b[k]).abs().max() / a[k].abs().max())
        assert worst <= 1e-5, f"{tag} {k}: {worst:.3g}"


def trained_module(run: dict) -> DistillModule:
    return DistillModule.load_from_checkpoint(
        run["out"] / "checkpoints" / "last.ckpt", map_location="cpu"
    ).eval()


def test_a_finished_run_exports_its_student_and_says_where(run) -> None:
    student = run["out"] / "student"
    assert run["results"]["export"] == str(student)
    assert json.loads((run["out"] / "results.json").read_text())["export"] == str(student)
    assert {p.name for p in student.iterdir()} == {
        "config.json",
        "model.safetensors",
        "provenance.json",
        "README.md",
    }
    assert any(f"exported the student to {student}" in line for line in run["log"])
    config = json.loads((student / "config.json").read_text())
    assert list(config["teachers"]) == ["clip", "siglip", "dinov2", "sam"]
    assert config["teachers"]["sam"] | {"source": None} == {
        "summary_dim": None, "feature_dim": 16, "grid": [4, 4], "normalizer": "phi_s", "source": None,
    }  # fmt: skip
    assert config["teachers"]["clip"]["source"]["family"] == "open_clip"
    prov = json.loads((student / "provenance.json").read_text())
    assert prov["steps"] == 8 and prov["config"]["student"]["cpe"] is True
    assert prov["heldout"] == run["results"]["heldout"]
    card = (student / "README.md").read_text()
    assert "| dinov2 | 48 | 48 | 4x4 |" in card and "phis.load(" in card


def test_a_failed_export_is_reported_and_the_run_keeps_its_results(
    tmp_path,
    cache_dir,  # noqa: F811
    monkeypatch,
    caplog,
) -> None:
    import phis.export

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phis.export, "export_module", fail)
    with caplog.at_level(logging.ERROR, logger="phis.export"):
        results = train(make_cfg(tmp_path, cache_dir, "trainer.max_steps=2"))
    assert results["status"] == "finished" and results["export_error"] == "RuntimeError: disk full"
    assert (
        "export" not in results
        and json.loads((tmp_path / "results.json").read_text())["status"] == "finished"
    )
    assert f"retry with: python -m phis.export {tmp_path} {tmp_path / 'student'}" in caplog.text


def test_export_and_reload_equal_the_module_at_any_size(run, tmp_path) -> None:
    module = trained_module(run)
    model = phis.load(run["out"] / "student")
    assert isinstance(model, PhisModel) and not model.training
    for size in SIZES:
        x = images(*size)
        ref, got = reference(module, x), outputs(model, x)
        assert got["spatial"].shape == (3, 32, size[0] // 8, size[1] // 8)
        assert_round_off(ref, got)
    # the command line, from the checkpoint alone, writes the same weights the run wrote
    out = export_main([str(run["out"] / "checkpoints" / "last.ckpt"), str(tmp_path / "cli")])
    a, b = (
        load_file(str(run["out"] / "student" / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "provenance.json").read_text())["checkpoint"].endswith("last.ckpt")
    # a run directory without an export is converted in memory by phis.load
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)
    (tmp_path / "bare" / "checkpoints" / "last.ckpt").symlink_to(run["out"] / "checkpoints" / "last.ckpt")
    assert_round_off(outputs(model, images(24, 40)), outputs(phis.load(tmp_path / "bare"), images(24, 40)))
    with pytest.raises(FileExistsError, match="not a phis model directory"):
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "notes.txt").write_text("mine")
        export_main([str(run["out"]), str(tmp_path / "taken")])


def test_the_loader_needs_neither_lightning_nor_hydra_nor_timm(run, tmp_path) -> None:
    """A fresh interpreter in which importing the training stack fails runs the export and its
    torch.export program (before phis is even imported) and gets the in-process outputs."""
    program = export_program(phis.load(run["out"] / "student"), tmp_path / "model.pt2")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning", "hydra", "omegaconf", "timm"):
                    raise ImportError("the training stack is not installed: " + name)
        sys.meta_path.insert(0, Refuse())
        import torch
        x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
        program = torch.export.load({str(program)!r}).module()(x)
        assert "phis" not in sys.modules
        import phis
        model = phis.load({str(run["out"] / "student")!r})
        summary, spatial = model(x)
        teachers = model.forward_teachers(x)
        heavy = [m for m in sys.modules if m.split(".")[0] in ("lightning", "hydra", "omegaconf", "timm")]
        assert not heavy, heavy
        torch.save({{"summary": summary, "spatial": spatial, "sam": teachers["sam"].features,
                    "program": program}}, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, env=env)
    got = torch.load(tmp_path / "out.pt")
    model = phis.load(run["out"] / "student")
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        summary, spatial = model(x)
        sam = model.forward_teachers(x)["sam"].features
    assert torch.equal(got["summary"], summary) and torch.equal(got["spatial"], spatial)
    assert torch.equal(got["sam"], sam)
    # the program: dynamic batch and size, the same outputs as the model
    assert got["program"].keys() >= {"summary", "features", "clip/summary", "clip/features", "sam/features"}
    assert "sam/summary" not in got["program"]
    torch.testing.assert_close(got["program"]["summary"], summary, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        got["program"]["sam/features"], sam, rtol=0, atol=1e-5 * float(sam.abs().max())
    )


def test_torch_hub_loads_the_student_from_a_local_checkout(run) -> None:
    hub = torch.hub.load(str(ROOT), "phis_student", path=str(run["out"] / "student"), source="local")
    x = images(32, 32)
    assert_round_off(outputs(phis.load(run["out"] / "student"), x), outputs(hub, x))


def test_input_contract_and_resolutions(run) -> None:
    model = phis.load(run["out"] / "student")
    assert model.preferred_resolution == (32, 32) and model.patch_size == 8
    assert (model.min_resolution, model.max_resolution) == (8, 128)  # 32 / 4 .. 4 x 32 (the table is 64)
    assert model.get_nearest_supported_resolution(30, 1000) == (32, 128)
    assert model.get_nearest_supported_resolution(3, 44) == (8, 48)
    x = images(32, 48)
    with pytest.raises(ValueError, match=r"span \[.*255.*divide 0-255 images by 255"):
        model(x * 255)
    with pytest.raises(ValueError, match=r"span \[-2"):
        model((x - 0.5) / 0.25)  # normalized outside: caught
    with pytest.raises(TypeError, match="float images"):
        model((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8; resize to e.g. 32x48"):
        model(images(30, 47))
    with pytest.raises(ValueError, match="feature_fmt"):
        model(x, feature_fmt="NHWC")
    with pytest.raises(ValueError, match=r"unknown teacher\(s\) \['dino'\]"):
        model.forward_teachers(x, names=["dino"])
    with pytest.warns(UserWarning, match="outside the supported 8..128"):
        model(images(8, 256, batch=1))
    strict = PhisModel.from_pretrained(run["out"] / "student", resolution_policy="error")
    with pytest.raises(ValueError, match="outside the supported"):
        strict(images(8, 256, batch=1))
    quiet = phis.load(run["out"] / "student", resolution_policy="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(images(8, 256, batch=1))
    with pytest.raises(ValueError, match="resolution_policy"):
        phis.load(run["out"] / "student", resolution_policy="sometimes")
    # NLC is NCHW flattened; per-teacher features come at the input's own grid
    summary, spatial = model(x)
    assert torch.equal(model(x, feature_fmt="NLC").features, spatial.flatten(2).transpose(1, 2))
    assert model.forward_teachers(x)["dinov2"].features.shape == (3, 48, 4, 6)
    # external preprocessing: the model takes the conditioner's output and computes the same
    pre = model.make_preprocessor_external()
    normalized = pre(x)
    external = model(normalized)
    assert torch.equal(external.summary, summary) and torch.equal(external.features, spatial)
    assert float(normalized.min()) < -0.5  # would have been refused as [0, 1] input


def trunk_student(**trunk) -> MultiTeacherViT:
    teachers = {"clip": {"summary_dim": 6, "feature_dim": 10}, "sam": {"summary_dim": None, "feature_dim": 4}}
    arch = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2} | trunk
    return MultiTeacherViT(
        teachers, img_size=32, num_registers=1, head_hidden_dim=16, trunk_kwargs=arch
    ).eval()


@pytest.mark.parametrize(
    "trunk",
    [
        {},
        {"qk_norm": True, "init_values": 0.1},
        {"qkv_bias": False, "act_layer": "gelu_tanh"},
        {"pre_norm": True},
    ],
)
def test_timm_trunk_variants_are_rebuilt_exactly(trunk: dict) -> None:
    student = trunk_student(**trunk)
    with torch.no_grad():
        for p in student.parameters():  # layer norms and scales away from their initial 1 / 0
            p.add_(0.05 * torch.randn_like(p))
    model = student.to_phis_model()
    x = images(24, 40)
    with torch.no_grad():
        ref, (summary, spatial) = student(x), model(x, feature_fmt="NLC")
    assert torch.equal(summary, ref.trunk_summary) and torch.equal(spatial, ref.trunk_features)


def test_trunks_the_plain_model_cannot_rebuild_are_refused_by_name() -> None:
    with pytest.raises(
        ValueError, match=r"cannot be rebuilt without timm: blocks.0.mlp.act is SiLU \(supported: GELU\)"
    ):
        trunk_student(act_layer="silu").to_phis_model()


def test_forward_intermediates_follow_our_trunk() -> None:
    student = trunk_student()
    model = student.to_phis_model()
    x = images(24, 40, batch=2)
    with torch.no_grad():  # the student's own token path, block by block
        t = student.trunk
        tokens = t.patch_embed((x - student.pixel_mean) / student.pixel_std)
        tokens = tokens + student.position_embedding(2, 3, 5)
        tokens = torch.cat([student.prefix.expand(2, -1, -1), tokens.flatten(1, 2)], 1)
        per_block = []
        for block in t.blocks:
            tokens = block(tokens)
            per_block.append(tokens)
        final, inter = model.forward_intermediates(x, indices=[0, -1], return_prefix_tokens=True)
        last_two = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    assert [i for i, _ in enumerate(inter)] == [0, 1]
    for (patches, prefix), ref in zip(inter, (per_block[0], per_block[2])):
        assert torch.equal(prefix, ref[:, :3]) and torch.equal(
            patches, ref[:, 3:].unflatten(1, (3, 5)).permute(0, 3, 1, 2)
        )
    assert torch.equal(last_two[0], per_block[1][:, 3:]) and torch.equal(last_two[1], per_block[2][:, 3:])
    assert torch.equal(normed[0], model(x).features) and torch.equal(final.features, model(x).features)
    with pytest.raises(ValueError, match="out of range for a trunk of 3 blocks"):
        model.forward_intermediates(x, indices=[3])
    ran = []
    model.trunk.blocks[2].register_forward_hook(lambda *a: ran.append(2))
    model.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert ran == []  # blocks after the last one asked for are not run


class Probe(Callback):
    """The module's teacher-space outputs on fixed images before training and at the start of the second
    step (after the normalizers were fitted at the first), evaluated without touching the training state."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.seen = x, {}

    def _record(self, tag: str, module: DistillModule) -> None:
        was = module.training
        module.eval()
        self.seen[tag] = reference(module, self.x)
        module.train(was)

    def on_train_start(self, trainer, module) -> None:
        self._record("start", module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self._record("fitted", module)


@pytest.mark.parametrize("fit", ["cache", "schedule"])
def test_a_run_started_from_an_export_begins_with_its_outputs(run, tmp_path, cache_dir, fit: str) -> None:  # noqa: F811
    """Trunk, registers, summary tokens and heads come from the export; once the new run has fitted its
    normalizers, the heads are re-expressed in their space and still compute the export's outputs."""
    export = run["out"] / "student"
    model = phis.load(export)
    x = images(32, 32)
    expected = outputs(model, x)
    probe = Probe(x)
    # Without spectral reparametrization here: with it, each training forward refines the σ estimates
    # by a power-iteration step, which moves the trunk's outputs by ~1e-4 before any update.
    # LR 0: the first step's update leaves the weights, so only the normalizers' fit could change them.
    overrides = [f"student.pretrained={export}", "trainer.max_steps=2", "export_student=false", "optim.lr=0"]
    overrides.append("student.spectral_reparam=false")
    if fit == "schedule":
        overrides += ["distill.normalizer_fit=schedule", "distill.estimate_steps=2", "distill.refit_every=1"]
    train(make_cfg(tmp_path, cache_dir, *RUN, *overrides), callbacks=[probe])
    for tag in ("start", "fitted"):
        got = probe.seen[tag]
        got["spatial"] = got["spatial"].flatten(2).transpose(1, 2)
        expected_nlc = {**expected, "spatial": expected["spatial"].flatten(2).transpose(1, 2)}
        assert_round_off(expected_nlc, got, tag)
    assert not (tmp_path / "student").exists()  # export_student=false


def test_a_student_takes_what_matches_from_a_checkpoint(run, caplog) -> None:
    """From a .ckpt: the shared teacher's token and heads, the trunk and registers; the rest is named.
    With the run's own layout the student then computes exactly what the export computes."""
    ckpt = run["out"] / "checkpoints" / "last.ckpt"
    model = phis.load(run["out"] / "student")
    arch = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    same = {"img_size": 32, "num_registers": 2, "head_hidden_dim": 32, "trunk_kwargs": arch, "cpe": True}
    specs = {n: {k: t[k] for k in ("summary_dim", "feature_dim")} for n, t in model.teachers.items()}
    student = MultiTeacherViT(specs, **same, cpe_max_size=64, spectral_reparam=True, pretrained=str(ckpt))
    assert student.load_pretrained()["not_loaded"] == []
    x = images(24, 40)
    with torch.no_grad():
        out = student.eval()(x)
    ref = outputs(model, x)
    got = {"summary": out.trunk_summary, "spatial": out.trunk_features.transpose(1, 2).unflatten(2, (3, 5))}
    got |= {f"{n}/features": f for n, f in out.features.items()}
    got |= {f"{n}/summary": s for n, s in out.summaries.items()}
    assert_round_off(ref, got)

    teachers = {
        "clip": {"summary_dim": 16, "feature_dim": 32},
        "new": {"summary_dim": None, "feature_dim": 8},
    }
    other = MultiTeacherViT(teachers, **same | {"num_registers": 3, "cpe": False}, pretrained=str(ckpt))
    with caplog.at_level(logging.INFO, logger="phis.student"):
        report = other.load_pretrained()
    assert report["unused"] == ["siglip", "dinov2", "sam"] and other.teacher_space_heads == {"clip"}
    assert "not loaded: registers 2..2, teacher new (not a teacher of the model)" in caplog.text
    assert torch.equal(other.prefix[:, 0], model.prefix[:, 0])  # clip's summary token
    assert torch.equal(other.prefix[:, 2:4], model.prefix[:, 4:6])  # the two registers there are
    assert torch.equal(other.pos_table, model.pos_table[:, 2:6, 2:6])  # the centre of the CPE table
    for name, head in (
        ("feature_heads", other.feature_heads["clip"]),
        ("summary_heads", other.summary_heads["clip"]),
    ):
        theirs = getattr(model, name)["clip"].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in head.state_dict().items()), name
    qkv = other.trunk.blocks[0].attn.qkv.weight
    assert torch.equal(qkv, model.trunk.blocks[0].attn.qkv.weight)
    deeper = MultiTeacherViT(teachers, img_size=32, trunk_kwargs=arch | {"depth": 2}, pretrained=str(ckpt))
    with pytest.raises(ValueError, match="has another trunk .*depth: 1 vs 2"):
        deeper.load_pretrained()


def test_a_hub_repository_id_loads_through_the_hub_cache(run, tmp_path) -> None:
    """``phis.load("<user>/<repo>")`` goes through huggingface_hub; offline it reads the hub's cache,
    here filled by hand in the hub's layout with an exported directory."""
    snapshot = tmp_path / "hub" / "models--someone--phis-tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in (run["out"] / "student").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    model = phis.load("someone/phis-tiny", cache_dir=str(tmp_path / "hub"), local_files_only=True)
    assert model.provenance["steps"] == 8
    x = images(32, 32)
    assert_round_off(outputs(phis.load(run["out"] / "student"), x), outputs(model, x))


def test_phis_models_are_accepted_as_initial_weights_and_other_folders_refused(run, tmp_path) -> None:
    from phis.student import check_pretrained

    for source in (run["out"], run["out"] / "student", run["out"] / "checkpoints" / "last.ckpt"):
        check_pretrained("vit_tiny_patch16_224", str(source))
    with pytest.raises(ValueError, match="is a directory but no phis model"):
        check_pretrained("vit_tiny_patch16_224", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is no phis model"):
        phis.load(tmp_path)
