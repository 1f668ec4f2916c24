"""SD-PLL at paper scale: dataset roots and weights from the environment, layout checks, the feature
cache, the paper grid's experiment files, and the whole paper sweep on stand-in folders."""

from __future__ import annotations

import csv
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import sd_standins
import torch

from experiments.selfdistill import study
from phis.results import RESULTS_FILE, collect_results
from phis.selfdistill import features as feat
from phis.selfdistill import sweep
from phis.selfdistill.run import finished

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = ROOT / "experiments" / "reference" / "sdpll_hparams_from_official_code.csv"  # official recipe
ENV_VARS = [feat.SD_DATA_ROOT_ENV, feat.WEIGHTS_ENV, *(feat.root_env(n) for n in feat.TORCHVISION_SETS)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No dataset or weights variable set, and an empty torch hub folder."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return monkeypatch


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, list[int]]]]:
    """All six stand-in datasets under one common root (<root>/<dataset>), and their labels."""
    root = tmp_path_factory.mktemp("sd_data")
    labels = {name: build(root / name) for name, build in sd_standins.BUILDERS.items()}
    return root, labels


# ----------------------------------------------------------------------------------------------------
# Roots, layouts and weights


def test_dataset_root_comes_from_config_then_own_variable_then_common_root(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        feat.dataset_root("food101")
    message = str(err.value)
    assert "PHIS_FOOD101_ROOT" in message and "PHIS_SD_DATA_ROOT" in message
    assert "<root>/food-101/meta/train.json" in message and "never downloads" in message
    clean_env.setenv("PHIS_SD_DATA_ROOT", str(tmp_path / "common"))
    assert feat.dataset_root("food101") == (tmp_path / "common" / "food101", "PHIS_SD_DATA_ROOT")
    clean_env.setenv("PHIS_FOOD101_ROOT", str(tmp_path / "own"))
    assert feat.dataset_root("food101") == (tmp_path / "own", "PHIS_FOOD101_ROOT")
    assert feat.dataset_root("food101", tmp_path / "cfg") == (tmp_path / "cfg", "sd.features.root")
    assert feat.root_env("stanford_cars") == "PHIS_STANFORD_CARS_ROOT"
    with pytest.raises(ValueError, match=r"sd.features.dataset='imagenet'.*'cifar100'"):
        feat.dataset_root("imagenet")
    assert time.perf_counter() - t0 < 5  # no download attempt


@pytest.mark.parametrize("name", feat.TORCHVISION_SETS)
def test_layout_check_names_every_missing_path_and_passes_the_standin(
    name: str, standins: tuple[Path, dict], tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError) as err:
        feat.check_layout(name, tmp_path, "PHIS_X_ROOT")
    message = str(err.value)
    assert "from PHIS_X_ROOT" in message
    for path in feat.LAYOUTS[name]:
        assert f"'{path}'" in message  # listed as missing
    root, _ = standins
    feat.check_layout(name, root / name, "PHIS_SD_DATA_ROOT")


def test_caltech101_without_its_background_folder_fails_the_layout_check(
    standins: tuple[Path, dict], tmp_path: Path
) -> None:
    (tmp_path / "caltech101" / "101_ObjectCategories" / "cat0").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"lacks \['caltech101/101_ObjectCategories/BACKGROUND_Google/'\]"
    ):
        feat.check_layout("caltech101", tmp_path, "sd.features.root")


def test_weights_from_config_variable_or_hub_and_a_clear_error(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError) as err:
        feat.resnet34_weights()
    message = str(err.value)
    assert "PHIS_RESNET34_WEIGHTS" in message and "sd.features.weights=" in message
    assert str(tmp_path / "hub" / "checkpoints" / feat.HUB_WEIGHTS) in message
    hub = tmp_path / "hub" / "checkpoints" / feat.HUB_WEIGHTS
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"w")
    assert feat.resnet34_weights() == hub
    clean_env.setenv("PHIS_RESNET34_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"missing.pth' \(from PHIS_RESNET34_WEIGHTS\)"):
        feat.resnet34_weights()
    assert feat.resnet34_weights(hub) == hub


# ----------------------------------------------------------------------------------------------------
# Stand-ins read through torchvision, as the paper splits them


@pytest.mark.parametrize("name", feat.TORCHVISION_SETS)
def test_standin_is_read_by_torchvision_with_the_papers_split(name: str, standins: tuple[Path, dict]) -> None:
    root, labels = standins
    for split in feat.SPLITS[name]:
        data = feat.torchvision_split(name, root / name, split, feat.imagenet_transform(16), False)
        assert [data[i][1] for i in range(len(data))] == labels[name][split]
        assert data[0][0].shape == (3, 16, 16)
    if name == "flowers102":  # trains on the larger published 'test' split ('tstid')
        assert len(labels[name]["train"]) == 2 * len(labels[name]["test"])


def test_published_checksums_are_verified_unless_disabled(standins: tuple[Path, dict]) -> None:
    root, _ = standins
    for name in ("cifar100", "flowers102"):
        with pytest.raises(FileNotFoundError, match=r"verify_checksums=false"):
            feat.torchvision_split(name, root / name, "train", feat.imagenet_transform(16))


# ----------------------------------------------------------------------------------------------------
# The feature cache


class _CountingExtractor(torch.nn.Module):
    """A tiny stand-in for the ResNet34 trunk (mean colour per image) that counts its builds."""

    builds = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).builds += 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # [B, 3]


def test_features_are_extracted_once_per_split_and_keyed_by_weights(
    clean_env: pytest.MonkeyPatch, standins: tuple[Path, dict], tmp_path: Path
) -> None:
    root, labels = standins
    clean_env.setenv("PHIS_SD_DATA_ROOT", str(root))
    clean_env.setattr(feat, "resnet34_extractor", lambda weights: _CountingExtractor())
    _CountingExtractor.builds = 0
    weights = tmp_path / "w1.pth"
    weights.write_bytes(b"first weights")
    cfg = {
        "kind": "torchvision",
        "dataset": "cifar100",
        "size": 16,
        "num_workers": 0,
        "weights": str(weights),
    }
    cfg["verify_checksums"] = False
    cache = tmp_path / "cache"
    first = feat.load_features(cfg, cache)
    assert _CountingExtractor.builds == 1
    np.testing.assert_array_equal(first.y_train, labels["cifar100"]["train"])
    np.testing.assert_array_equal(first.y_test, labels["cifar100"]["test"])
    folder = cache / f"resnet34_{feat.weights_tag(weights)}"
    assert sorted(p.name for p in folder.iterdir()) == ["cifar100_test_16px.npz", "cifar100_train_16px.npz"]

    again = feat.load_features(cfg, cache)  # every split from the cache
    assert _CountingExtractor.builds == 1
    np.testing.assert_array_equal(first.X_train, again.X_train)

    other = tmp_path / "w2.pth"
    other.write_bytes(b"other weights")
    feat.load_features({**cfg, "weights": str(other)}, cache)  # new weights: new cache, new extraction
    assert _CountingExtractor.builds == 2
    assert len(list(cache.iterdir())) == 2

    caltech = feat.load_features({**cfg, "dataset": "caltech101", "test_fraction": 0.2}, cache)
    assert (folder / "caltech101_all_16px.npz").is_file()
    assert caltech.num_classes == sd_standins.K  # background dropped
    np.testing.assert_array_equal(np.bincount(caltech.y_test), np.ones(sd_standins.K))  # 1 of 5 per class


# ----------------------------------------------------------------------------------------------------
# The paper grid


def _official_recipe() -> dict[str, dict[str, str]]:
    with open(HPARAMS) as f:
        return {r["dataset"].replace("stanfordcars", "stanford_cars"): r for r in csv.DictReader(f)}


@pytest.mark.parametrize("name", feat.TORCHVISION_SETS)
def test_paper_experiment_is_the_full_grid_with_the_official_recipe(name: str, tmp_path: Path) -> None:
    recipe = _official_recipe()[name]
    base, jobs = sweep.sweep_plan([f"sd_experiment=paper_{name}", f"hydra.sweep.dir={tmp_path}"])
    assert base["experiment"] == f"paper_{name}" and base["sd"]["features"]["dataset"] == name
    assert base["sd"]["solver"]["lr"] == pytest.approx(float(recipe["lr"]))
    assert base["sd"]["lam"] == pytest.approx(float(recipe["wd_main_fig2_fig6"]))  # a single run
    assert base["sd"]["solver"] | {"lr": None} == {
        "name": "sgd",
        "epochs": 200,
        "batch_size": 128,
        "lr": None,
        "momentum": 0.9,
        "lr_decay": 0.98,
        "val_fraction": 0.1,  # epochs selected on 10 % of each class of the training set, never on test
        "val_seed": 0,
    }
    assert base["sd"]["rounds"] == 5 and base["sd"]["pll"]["losses"] == ["gce"]
    grid = {
        tuple(o.split("=", 1)[1] for o in sorted(job) if not o.startswith("sd_experiment")) for job in jobs
    }
    # sorted keys: sd.corruption.eta, sd.corruption.kind, sd.lam, seed
    etas = ["0.0", "0.1", "0.3", "0.5", "0.6", "0.7", "0.8", "0.9"]
    expected = set(itertools.product(etas, ["sym", "asym", "superclass"], ["5e-05", "0.0005"], "012"))
    assert len(jobs) == 144 and grid == expected
    assert float(recipe["wd_main_fig2_fig6"]) in (5e-5, 5e-4)  # both λ settings hold the recipe's


def test_missing_data_fails_before_anything_runs_naming_every_variable(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError) as err:
        study.run_study("paper", tmp_path / "out", tmp_path / "sweeps")
    message = str(err.value)
    for name in feat.TORCHVISION_SETS:
        assert f"paper_{name}: " in message and feat.root_env(name) in message
    assert "PHIS_RESNET34_WEIGHTS" in message
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "out").exists()

    # one sweep by hand fails the same way, before training its job
    one_job = ["sd.corruption.kind=sym", "sd.lam=5e-4", "sd.corruption.eta=0.0", "seed=0"]
    with pytest.raises(FileNotFoundError, match="PHIS_FLOWERS102_ROOT"):
        sweep.main(["sd_experiment=paper_flowers102", f"hydra.sweep.dir={tmp_path / 'one'}", *one_job])
    assert not list(tmp_path.rglob(RESULTS_FILE))


# ----------------------------------------------------------------------------------------------------
# The whole paper sweep on the stand-ins


TINY = [
    "sd.features.size=32",
    "sd.features.batch_size=16",
    "sd.features.num_workers=0",
    "sd.features.verify_checksums=false",
    "sd.solver.epochs=20",
    "sd.solver.batch_size=8",
    "sd.corruption.eta=0.5",
    "seed=0",
]


@pytest.mark.slow
def test_paper_sd_sweep_end_to_end_on_standins(
    clean_env: pytest.MonkeyPatch, standins: tuple[Path, dict], tmp_path: Path
) -> None:
    """``run --profile paper``: all six datasets × 3 corruptions × 2 λ (one η, one seed, 20 epochs),
    features from random ResNet34 weights saved as the weights file; a rerun skips every job."""
    import torchvision

    root, labels = standins
    weights = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), weights)
    clean_env.setenv("PHIS_SD_DATA_ROOT", str(root))
    clean_env.setenv("PHIS_FOOD101_ROOT", str(root / "food101"))  # a dataset's own variable works too
    clean_env.setenv("PHIS_RESNET34_WEIGHTS", str(weights))
    clean_env.setenv("PHIS_CACHE_DIR", str(tmp_path / "cache"))
    out, sweeps = tmp_path / "tables", tmp_path / "sweeps"

    assert study.run_study("paper", out, sweeps, lanes=2, overrides=TINY) == 0

    results = collect_results(sweeps)
    assert len(results) == 6 * 3 * 2
    cache = tmp_path / "cache" / "selfdistill" / f"resnet34_{feat.weights_tag(weights)}"
    kinds, lams = ["sym", "asym", "superclass"], ["5e-05", "0.0005"]
    for name in feat.TORCHVISION_SETS:
        ours = [r for r in results if r["experiment"] == f"paper_{name}"]
        assert {(r["noise"], r["lam"]) for r in ours} == set(itertools.product(kinds, [5e-5, 5e-4]))
        n_train = len(labels[name]["train"]) if "train" in labels[name] else len(labels[name]["all"]) * 4 // 5
        # the probes train on the training set less the validation split (10 % of each class)
        assert {(r["n_train"] + r["n_val"], r["dim"], r["num_classes"]) for r in ours} == {
            (n_train, 512, sd_standins.K)
        }
        assert all(abs(r["n_val"] - 0.1 * n_train) <= sd_standins.K / 2 for r in ours)
        assert {p.name for p in cache.glob(f"{name}_*")} == {
            f"{name}_{s}_32px.npz" for s in feat.SPLITS[name]
        }
        recipe_lam = float(_official_recipe()[name]["wd_main_fig2_fig6"])
        for kind, lam in itertools.product(kinds, lams):
            stem = out / f"paper_{name}_kind_{kind}__lam_{lam}"
            md = Path(f"{stem}_test_acc.md").read_text()
            rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
            assert rows == ["model"] + [m for m in ("Teacher", "2", "3", "4", "5", "PLL") for _ in range(3)]
            assert ("official recipe's λ" in md) == (float(lam) == recipe_lam)
            assert Path(f"{stem}_test_acc.csv").is_file() and Path(f"{stem}_gain.png").is_file()
            assert Path(f"{stem}_pll_top2.csv").is_file()
    # the stand-ins' classes differ in colour: even random ResNet34 features carry the labels
    teacher_test = [m["test_acc_last"] for r in results for m in r["models"] if m["name"] == "Teacher"]
    assert np.mean(teacher_test) > 1 / sd_standins.K + 0.1
    assert json.loads((out / "timings.json").read_text())["experiments"].keys() == {
        f"paper_{name}" for name in feat.TORCHVISION_SETS
    }

    # rerun of one dataset's sweep: every job is found finished; nothing is retrained or rewritten
    stamps = {r["_dir"]: (Path(r["_dir"]) / RESULTS_FILE).stat().st_mtime_ns for r in results}
    args = ["sd_experiment=paper_caltech256", f"hydra.sweep.dir={sweeps / 'paper_caltech256'}", *TINY]
    jobs = sweep.sweep_jobs(args)
    assert len(jobs) == 6 and all(finished(cfg, out_dir) for cfg, out_dir in jobs)
    assert sweep.main([*args, f"tables_dir={out}"]) == 0
    assert {d: (Path(d) / RESULTS_FILE).stat().st_mtime_ns for d in stamps} == stamps
