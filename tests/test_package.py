"""phis as an installable package: ``pip install .`` and ``pip install -e .`` give an importable ``phis``
(with its Hydra configs) outside the repository.

The throwaway environments see the test interpreter's packages through a ``.pth`` file and install phis
alone (``--no-deps --no-build-isolation``), so nothing is downloaded and the shared environment is not
touched.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("phis", "conf", "pyproject.toml", "README.md", "requirements.txt")


def test_every_subpackage_and_config_is_packaged() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "phis").rglob("__init__.py")}
    assert packages | {"phis.conf"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"phis.conf": "conf"}


def throwaway_env(where: Path) -> Path:
    """A venv whose only own package will be phis; the rest comes from this interpreter's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def copy_sources(dest: Path) -> Path:
    """The files a build reads, without caches (the build writes its own folders there, not here)."""
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def run_elsewhere(python: Path, code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random student, saved as a model directory."""
    from phis.student import MultiTeacherViT

    student = MultiTeacherViT(
        {"t": {"summary_dim": 4, "feature_dim": 6}},
        img_size=32,
        trunk_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
    )
    out = tmp_path_factory.mktemp("model")
    student.to_phis_model().save_pretrained(out)
    return out


@pytest.mark.parametrize("editable", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pip_install_then_import_from_another_directory(tmp_path, model_dir, editable: bool) -> None:
    src = copy_sources(tmp_path / "src")
    python = throwaway_env(tmp_path / "env")
    target = ["-e", str(src)] if editable else [str(src)]
    pip = [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        *target,
    ]
    subprocess.run(pip, check=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"""
import phis, phis.config, torch
print(phis.__file__)
print(phis.config.CONF_DIR)
print("x".join(map(str, phis.load({str(model_dir)!r})(torch.rand(1, 3, 32, 64)).features.shape)))
"""
    file, conf, shape = run_elsewhere(python, code, elsewhere).split()
    installed = src if editable else tmp_path / "env"
    assert Path(file).is_relative_to(installed) and Path(file).name == "__init__.py"
    assert Path(conf) == (src / "conf" if editable else Path(file).parent / "conf")
    assert (Path(conf) / "train.yaml").is_file() and (Path(conf) / "teachers" / "offline.yaml").is_file()
    assert shape == "1x32x2x4"
    if not editable:  # only the library was installed: no conf/, experiments/ or tests/ at the top
        site = Path(file).parents[1]
        assert sorted(p.name for p in site.iterdir() if not p.name.endswith((".pth", "dist-info"))) == [
            "phis"
        ]
        shipped = {p.relative_to(Path(conf)) for p in Path(conf).rglob("*.yaml")}
        assert shipped == {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}


@pytest.mark.slow
def test_installed_entry_points_find_their_configs(tmp_path) -> None:
    """``python -m phis.train`` from another directory composes the shipped train config."""
    src = copy_sources(tmp_path / "src")
    python = throwaway_env(tmp_path / "env")
    pip = [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        str(src),
    ]
    subprocess.run(pip, check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(python), "-m", "phis.train", "--cfg", "job", "student=vit_b16", "hydra.output_subdir=null"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "model: vit_base_patch16_224" in done.stdout and "export_student: true" in done.stdout
