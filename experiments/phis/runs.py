"""PHI-S paper layer, loading: a sweep's finished runs (method, seed, flat metrics, results), the
paper's reference rows, and what the analyses read from a run: its teacher features (cache or teachers),
its per-channel held-out error and its PHI-S transform."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phis.results import (
    collect_results,
    run_metrics,
)

REFERENCE = Path(__file__).resolve().parents[1] / "reference"


# Rows of PHI-S Tables 1/3 (ten methods) and Table 12 (plus the two AdaLoss rows), paper order.
METHODS_10 = (
    "mse",
    "cosine",
    "hyb_mse",
    "hyb_smooth_l1",
    "global_standardize",
    "standardize",
    "phi_s",
    "pca_whiten",
    "zca_whiten",
    "hadamard_whiten",
)


METHODS_12 = (*METHODS_10, "ada_mse", "ada_phi_s")


# Rows of Table 5 (the normalizations trained with MSE).
METHODS_5 = tuple(m for m in METHODS_10 if m not in ("cosine", "hyb_mse", "hyb_smooth_l1"))


LABELS = {
    "mse": "MSE",
    "cosine": "Cosine",
    "hyb_mse": "Hyb MSE",
    "hyb_smooth_l1": "Hyb SmL1",
    "global_standardize": "Global Stdze",
    "standardize": "Standardize",
    "phi_s": "PHI-S",
    "pca_whiten": "PCA-W",
    "zca_whiten": "ZCA",
    "hadamard_whiten": "HCA",
    "ada_mse": "Ada-MSE",
    "ada_phi_s": "Ada-PHI-S",
}


MAX_TOKENS = 20000  # teacher tokens per teacher for the eigen-analyses (subsampled evenly)


SAMPLE_IMAGES = 1024  # without a teacher cache: the training images the teacher-feature sample is drawn from


@dataclass
class Run:
    """One finished job: its method (the ``method`` group choice), seed, directory and flat metrics."""

    method: str
    seed: int
    dir: Path
    metrics: dict[str, float]
    results: dict[str, Any]


def tmse_split(grouped: Mapping[str, Sequence[Run]]) -> str:
    """Which held-out split the runs' ``tmse/*`` metrics were measured on (as phis.eval recorded it)."""
    splits = {
        ((r.results.get("eval") or {}).get("details") or {}).get("tmse", {}).get("heldout", "test")
        for rs in grouped.values()
        for r in rs
    }
    return ", ".join(sorted(splits))


def _seed(res: Mapping[str, Any], run_dir: Path) -> int:
    if "seed" in res:
        return int(res["seed"])
    config = run_dir / "config_resolved.yaml"
    if config.is_file():
        for line in config.read_text().splitlines():
            if line.startswith("seed:"):
                return int(line.split(":", 1)[1])
    return 0


def load_runs(sweep_dir: str | os.PathLike) -> list[Run]:
    """Every finished job under ``sweep_dir`` (recursively); the method is the run's ``method`` choice."""
    runs = []
    for res in collect_results(sweep_dir):
        method = (res.get("choices") or {}).get("method")
        if method is None:
            raise ValueError(
                f"{res['_dir']}/results.json has no 'choices.method'; was it written by phis.train?"
            )
        run_dir = Path(res["_dir"])
        runs.append(Run(method, _seed(res, run_dir), run_dir, run_metrics(res), res))
    return runs


def by_method(runs: Sequence[Run], methods: Sequence[str]) -> dict[str, list[Run]]:
    """Runs grouped per method, in ``methods`` order, keeping only methods that have runs."""
    grouped = {m: [r for r in runs if r.method == m] for m in methods}
    return {m: rs for m, rs in grouped.items() if rs}


def paper_rows(name: str) -> dict[str, dict[str, str]]:
    """A reference CSV (``experiments/reference/<name>.csv``) as first-column key → column → cell."""
    with open(REFERENCE / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    key = next(iter(rows[0]))
    return {r[key]: {k: v for k, v in r.items() if k != key} for r in rows}


def teacher_names(grouped: Mapping[str, Sequence[Run]]) -> list[str]:
    return list(
        dict.fromkeys(
            k.split("/", 1)[1]
            for rs in grouped.values()
            for r in rs
            for k in r.metrics
            if k.startswith("tmse/")
        )
    )


def _train_config(run_dir: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config_resolved.yaml")


def teacher_features(run_dir: Path) -> dict[str, Any]:
    """Training-set teacher feature tokens ``[N, C]`` (float32, ≤ MAX_TOKENS, evenly spaced) per teacher.

    From the run's teacher cache (rebuilt if missing); a run without one (``cache.enabled=false``) runs
    its teachers on evenly spaced images among the first ``SAMPLE_IMAGES`` training images instead.
    """
    import numpy as np
    import torch

    from phis.build import build_datamodule

    dm = build_datamodule(_train_config(run_dir))
    feats = {}
    if not dm.cache_enabled:
        data = dm.dataset("train", SAMPLE_IMAGES)
        for name, spec in dm.teacher_specs().items():
            h, w = spec["grid"]
            picks = np.unique(
                np.linspace(0, len(data) - 1, max(1, MAX_TOKENS // (h * w))).round().astype(int)
            )
            images = torch.stack([data[int(i)]["images"] for i in picks])
            teacher = dm.teacher(name)
            with torch.inference_mode():
                out = [teacher(b).features.float() for b in images.split(dm.cache_batch_size)]
            feats[name] = torch.cat(out).permute(0, 2, 3, 1).reshape(-1, out[0].shape[1]).clone()
        return feats
    dm.prepare_data()  # a cache entry deleted (or re-keyed) since training is rebuilt by its teacher
    for name, cache in dm.caches["train"].items():
        arr = cache.features  # [N, h, w, C], memory-mapped
        per_image = arr.shape[1] * arr.shape[2]
        images = np.unique(np.linspace(0, len(arr) - 1, max(1, MAX_TOKENS // per_image)).round().astype(int))
        y = torch.from_numpy(np.array(arr[images], dtype=np.float32))
        feats[name] = y.reshape(-1, y.shape[-1])
    return feats


def channel_losses(run_dir: Path) -> dict[str, Any]:
    """Per teacher, held-out teacher-space MSE per channel ``[C]`` of the run's final checkpoint."""
    from phis.build import build_datamodule
    from phis.module import DistillModule

    module = DistillModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    dm = build_datamodule(_train_config(run_dir))
    dm.prepare_data()
    split = "test" if "test" in dm.sets else "val"
    teachers = None if dm.cache_enabled else dm.teacher  # no stored targets: run the teachers
    metrics = module.heldout_metrics(dm.heldout_dataloader(split), teachers=teachers, per_channel=True)
    return {n: r["channel_mse"] for n, r in metrics.items()}


def ref_normalizer(run_dir: Path, teacher: str, sample: Any) -> Any:
    """The PHI-S transform of ``teacher`` fitted on the run's training cache (for Fig. 1), or on the
    ``sample`` tokens ``[N, C]`` when the run kept no cache."""
    from phis.build import build_datamodule
    from phis.normalizers import make_normalizer

    cfg = _train_config(run_dir)
    norm = make_normalizer("phi_s", sample.shape[-1])
    cached = cfg.cache.enabled  # the data module (and its caches) is built only when there is a cache
    for y in build_datamodule(cfg).caches["train"][teacher].feature_batches() if cached else [sample]:
        norm.update(y)
    norm.fit()
    return norm


def metrics_csv(run_dir: Path) -> Path | None:
    """The run's Lightning metrics CSV; a resumed run's versions are joined (in order) into one file."""
    import pandas as pd

    versions = sorted(
        run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])
    )
    paths = [p for p in (run_dir / "csv" / "metrics.csv", *versions) if p.is_file()]
    if len(paths) <= 1:
        return paths[0] if paths else None
    merged = run_dir / "csv" / "metrics_all_versions.csv"
    pd.concat([pd.read_csv(p) for p in paths], ignore_index=True).to_csv(merged, index=False)
    return merged
