"""Hydra entry point of the SD-PLL study: one job = one feature set × one label-corruption draw.

    python -m phis.selfdistill.run                                  # defaults: block model, η = 0
    python -m phis.selfdistill.run -m sd_experiment=block_table     # a table's η × seed sweep

A job writes ``results.json`` (``"status": "finished"``, its resolved config, one entry per model:
last-epoch and best-over-epochs test accuracy, training accuracy w.r.t. the true and the given labels)
into its own directory, and skips itself when that file already holds a finished run of the same
config. Block-model jobs also record the theory's predictions for their realized label fractions.

``run_jobs_batched`` runs many SGD jobs at once (``phis.selfdistill.sweep`` hands it a table's sweep):
jobs that share features and settings train their probes together, and each job's results file is
the one its own run would write, up to float32 round-off.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from phis.config import CONF_DIR, check_choice
from phis.results import RESULTS_FILE, atomic_write_json, is_finished, read_json
from phis.selfdistill import theory
from phis.selfdistill.corruption import (
    NOISE_KINDS,
    corrupt_labels,
    corruption_matrix,
    find_superclasses,
    realized_matrix,
)
from phis.selfdistill.features import FeatureSet, atomic_savez, check_source, load_features, validation_rows
from phis.selfdistill.probe import PLL_LOSSES, SOLVERS, SGDRecipe
from phis.selfdistill.rounds import TEACHER_CHECKPOINTS, SDRun, self_distill, self_distill_batched
from phis.wandb_logging import RUN_FILE, JobMirror, selfdistill_tables, selfdistill_tags

log = logging.getLogger(__name__)

TASKS = ("distill", "spectrum")
REPORTS = ("table", "region", "simplex", "spectrum")
SUPERCLASS_SOURCES = ("cluster", "features")
OUTPUTS_FILE = "outputs.npz"
# Config keys that cannot change a job's results: a finished job is reused whatever their values.
NON_RESULT_KEYS = ("tables_dir", "threads", "cache_dir", "logger")


def validate(cfg: Mapping[str, Any]) -> None:
    """Fail before any work on a config choice the code does not know, listing the valid ones."""
    check_choice("task", cfg["task"], TASKS)
    check_choice("report", cfg["report"], REPORTS)
    sd = cfg["sd"]
    check_choice("sd.corruption.kind", sd["corruption"]["kind"], NOISE_KINDS)
    if sd["corruption"]["kind"] == "superclass":
        check_choice(
            "sd.corruption.superclasses", sd["corruption"].get("superclasses", "cluster"), SUPERCLASS_SOURCES
        )
    check_choice("sd.solver.name", sd["solver"]["name"], SOLVERS)
    for loss in sd["pll"]["losses"]:
        check_choice("sd.pll.losses[]", loss, PLL_LOSSES)
    checkpoint = sd.get("teacher_checkpoint", "last")
    check_choice("sd.teacher_checkpoint", checkpoint, TEACHER_CHECKPOINTS)
    split = {"best_val": "validation", "best_test": "test"}.get(checkpoint)
    if split and sd["solver"]["name"] != "sgd":
        raise ValueError(
            f"sd.teacher_checkpoint={checkpoint} picks an SGD epoch by {split} accuracy; it needs "
            f"sd/solver=sgd, got sd.solver.name={sd['solver']['name']!r}"
        )
    fraction = sd["solver"].get("val_fraction", 0.0)
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"sd.solver.val_fraction={fraction} must lie in [0, 1) (0: no validation split)")
    if fraction and sd["solver"]["name"] != "sgd":
        raise ValueError(
            f"sd.solver.val_fraction={fraction}: the {sd['solver']['name']!r} solver has no epochs to "
            "select; a validation split is for sd/solver=sgd"
        )
    if checkpoint == "best_val" and not fraction:
        raise ValueError(
            "sd.teacher_checkpoint=best_val needs a validation split: set sd.solver.val_fraction > 0"
        )
    if int(sd["rounds"]) < 1:
        raise ValueError(f"sd.rounds={sd['rounds']} must be ≥ 1 (round 1 is the teacher)")
    if not float(sd["lam"]) > 0:
        raise ValueError(f"sd.lam={sd['lam']} must be > 0")


def superclasses_for(feats: FeatureSet, ccfg: Mapping[str, Any]) -> np.ndarray:
    """Superclass id per class [K]: the block model's own, or clustered from the training features."""
    if ccfg.get("superclasses", "cluster") == "features":
        if feats.superclass is None:
            raise ValueError(
                f"sd.corruption.superclasses=features, but features {feats.name!r} have no superclasses; "
                "use sd.corruption.superclasses=cluster, or three-level block features "
                "(sd/features=block_superclass)"
            )
        return np.asarray(feats.superclass)
    return find_superclasses(feats.X_train, feats.y_train, feats.num_classes, cut=float(ccfg.get("cut", 0.8)))


def block_theory(
    fcfg: Mapping[str, Any], noise: str, eta: float, lam: float, rounds: int, C_real: np.ndarray
) -> dict:
    """The theory's predictions for a block-model job (linearized dynamics): r, the thresholds η_t, the
    first round with every training instance right at the population level, and per round whether
    every instance is right given the realized label fractions."""
    K, n, c, d = int(fcfg["K"]), int(fcfg["n"]), float(fcfg["c"]), float(fcfg["d"])
    e, m = fcfg.get("e"), fcfg.get("m")
    superclass = None if m is None else np.arange(K) // int(m)
    sigmas = theory.block_sigmas(K, n, c, d, lam, e=e, m=m)
    thresholds, first = None, None
    if noise != "superclass" or (m is not None and int(m) >= 2):  # the population theory applies
        thresholds = [theory.threshold(K, n, c, d, lam, t, noise, m=m) for t in range(1, rounds + 1)]
        first = theory.rounds_to_full_accuracy(K, n, c, d, lam, eta, noise, m=m, e=e, max_rounds=rounds)
    return {
        "r": theory.sigma_ratio(K, n, c, d, lam),
        "thresholds": thresholds,
        "rounds_to_full": first,
        "all_correct_realized": [
            theory.block_all_correct(C_real, sigmas, t, superclass if e is not None else None)
            for t in range(1, rounds + 1)
        ],
    }


def _validation_mask(cfg: Mapping[str, Any], feats: FeatureSet) -> np.ndarray:
    """Boolean [N] over the training rows: the job's validation split (``validation_rows``)."""
    scfg = cfg["sd"]["solver"]
    return validation_rows(feats.y_train, float(scfg.get("val_fraction", 0.0)), int(scfg.get("val_seed", 0)))


def _given_labels(cfg: Mapping[str, Any], feats: FeatureSet) -> dict[str, Any]:
    """The job's data: the training rows it trains on with their true and given (corrupted) labels, the
    validation split carved from the training set with its given labels, and the corruption.

    Labels are corrupted over the whole training set first, so the validation labels are as noisy as
    the training labels: epochs are selected on what a user holding only noisy labels could use."""
    ccfg, K = cfg["sd"]["corruption"], feats.num_classes
    superclass = superclasses_for(feats, ccfg) if ccfg["kind"] == "superclass" else None
    if superclass is not None and float(ccfg["eta"]) > 0 and len(np.unique(superclass)) == K:
        log.warning(
            "superclass noise on %s: the clustering left every one of its %d classes alone, so the labels "
            "stay clean (noise_realized = 0); a larger sd.corruption.cut merges more classes",
            feats.name,
            K,
        )
    C = corruption_matrix(ccfg["kind"], K, float(ccfg["eta"]), superclass)
    y_given = corrupt_labels(feats.y_train, C, int(cfg["seed"]), exact=bool(ccfg.get("exact", False)))
    is_val = _validation_mask(cfg, feats)
    train, any_val = ~is_val, bool(is_val.any())
    val_noise = float(np.mean(y_given[is_val] != feats.y_train[is_val])) if any_val else None
    return {
        "X_train": feats.X_train[train],
        "y_true": feats.y_train[train],
        "y_given": y_given[train],
        "X_val": feats.X_train[is_val] if any_val else None,
        "y_val": y_given[is_val] if any_val else None,
        "noise_realized_val": val_noise,
        "C": C,
        "C_realized": realized_matrix(feats.y_train[train], y_given[train], K),
        "superclass": superclass,
    }


def _distill_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``self_distill`` keyword arguments a job's config sets (all but labels and seed)."""
    sd, scfg = cfg["sd"], cfg["sd"]["solver"]
    recipe = None
    if scfg["name"] == "sgd":
        keys = ("epochs", "batch_size", "lr", "momentum", "lr_decay")
        recipe = SGDRecipe(**{k: scfg[k] for k in keys})
    return {
        "rounds": int(sd["rounds"]),
        "solver": scfg["name"],
        "recipe": recipe,
        "pll_losses": list(sd["pll"]["losses"]),
        "q": float(sd["pll"]["q"]),
        "tol": float(scfg.get("tol", 1e-8)),
        "keep_outputs": bool(cfg["save_outputs"]),
        "teacher_checkpoint": sd.get("teacher_checkpoint", "last"),
    }


def _distill_result(
    cfg: Mapping[str, Any], feats: FeatureSet, labels: Mapping[str, Any], run: SDRun, out_dir: Path
) -> dict:
    """Log a job's models, save its outputs if asked, and return its report."""
    for rep in run.reports:
        log.info(
            "%-8s test %.4f (epoch best on validation %.4f, on test %.4f)  train/true %.4f  "
            "train/given %.4f  %.1fs",
            rep.name,
            rep.test_acc_last,
            rep.test_acc_best_val,
            rep.test_acc_best_test,
            rep.train_acc_true,
            rep.train_acc_given,
            rep.seconds,
        )
    y_given, y_true = labels["y_given"], labels["y_true"]
    if run.outputs:
        atomic_savez(out_dir / OUTPUTS_FILE, y_true=y_true, y_given=y_given, **run.outputs)
    sd = cfg["sd"]
    result = {
        "models": [asdict(rep) for rep in run.reports],
        "C": labels["C"],
        "C_realized": labels["C_realized"],
        "noise_realized": float(np.mean(y_given != y_true)),
        "noise_realized_val": labels["noise_realized_val"],
        "superclass": labels["superclass"],
        "pll_top2": run.top2,
    }
    if sd["features"]["kind"] == "block":
        ccfg = sd["corruption"]
        result["theory"] = block_theory(
            sd["features"],
            ccfg["kind"],
            float(ccfg["eta"]),
            float(sd["lam"]),
            int(sd["rounds"]),
            labels["C_realized"],
        )
    return result


def run_distill(cfg: Mapping[str, Any], feats: FeatureSet, out_dir: Path) -> dict:
    """Corrupt the labels, train teacher + students + PLL students, and report every model."""
    labels = _given_labels(cfg, feats)
    run = self_distill(
        labels["X_train"],
        labels["y_given"],
        labels["y_true"],
        feats.X_test,
        feats.y_test,
        float(cfg["sd"]["lam"]),
        feats.num_classes,
        seed=int(cfg["seed"]),
        X_val=labels["X_val"],
        y_val=labels["y_val"],
        **_distill_settings(cfg),
    )
    return _distill_result(cfg, feats, labels, run, out_dir)


def run_spectrum(cfg: Mapping[str, Any], feats: FeatureSet) -> dict:
    """Eigenvalues μ_i of the training Gram and σ_i^t for rounds t = 1..rounds (theory.eigen_decay)."""
    X = feats.X_train
    G = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X  # same non-zero spectrum
    rounds, lam = int(cfg["sd"]["rounds"]), float(cfg["sd"]["lam"])
    sigma_t = theory.eigen_decay(G, feats.num_classes, X.shape[0], lam, list(range(1, rounds + 1)))
    return {"mu": np.sort(np.clip(np.linalg.eigvalsh(G), 0.0, None))[::-1], "sigma_t": sigma_t}


def _select(cfg: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a nested config dict."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"table_by names {dotted!r}, which is not a config key")
        node = node[part]
    return node


def _job_info(cfg: Mapping[str, Any], feats: FeatureSet) -> dict:
    """What a job's results say about its data and settings, before any result."""
    n_val = int(_validation_mask(cfg, feats).sum()) if cfg["task"] == "distill" else 0
    return {
        "experiment": cfg["experiment"],
        "report": cfg["report"],
        "table_key": ", ".join(f"{key.split('.')[-1]}={_select(cfg, key)}" for key in cfg["table_by"]),
        "features": feats.name,
        "features_kind": cfg["sd"]["features"]["kind"],
        "num_classes": feats.num_classes,
        "n_train": int(len(feats.y_train) - n_val),  # the rows the probes train on
        "n_val": n_val,  # the validation split carved from the training set
        "n_test": len(feats.y_test),
        "dim": feats.X_train.shape[1],
        "eta": float(cfg["sd"]["corruption"]["eta"]),
        "noise": cfg["sd"]["corruption"]["kind"],
        "seed": int(cfg["seed"]),
        "lam": float(cfg["sd"]["lam"]),
        "solver": cfg["sd"]["solver"]["name"],
        "teacher_checkpoint": cfg["sd"].get("teacher_checkpoint", "last"),
    }


def run_job(cfg: Mapping[str, Any], out_dir: Path) -> dict:
    """Everything one job reports, as a JSON-ready dict (without status/config)."""
    validate(cfg)
    t0 = time.perf_counter()
    feats = load_features(cfg["sd"]["features"], cfg["cache_dir"])
    info = _job_info(cfg, feats)
    body = run_spectrum(cfg, feats) if cfg["task"] == "spectrum" else run_distill(cfg, feats, out_dir)
    return {**info, **body, "wall_s": time.perf_counter() - t0}


def batchable(cfg: Mapping[str, Any]) -> bool:
    """Whether a job's probes can train in a batch with other jobs' (SGD self-distillation)."""
    return cfg["task"] == "distill" and cfg["sd"]["solver"]["name"] == "sgd"


def _batch_key(cfg: Mapping[str, Any]) -> str:
    """Jobs with equal keys share features and training settings; only labels and seed differ."""
    shared = {k: v for k, v in cfg.items() if k not in ("seed", *NON_RESULT_KEYS)}
    shared["sd"] = {k: v for k, v in cfg["sd"].items() if k != "corruption"}
    return json.dumps(shared, sort_keys=True, default=str)


def run_jobs_batched(jobs: Sequence[tuple[Mapping[str, Any], Path]], device: str | None = None) -> list[Path]:
    """Run SGD self-distillation jobs, those that share features and settings as one batch
    (``self_distill_batched``), writing each job's results file as ``main`` would; jobs already
    finished with their config are skipped. Returns the results files written.

    A job's reports equal its run alone up to float32 round-off; its ``wall_s`` (and each model's
    ``seconds``) is its share of the batch's time.
    """
    groups: dict[str, list[tuple[Mapping[str, Any], Path]]] = {}
    for cfg, out_dir in jobs:
        validate(cfg)
        if not batchable(cfg):
            raise ValueError(
                f"job {out_dir} is not batchable (task={cfg['task']!r}, sd.solver.name="
                f"{cfg['sd']['solver']['name']!r}); only task='distill' with sd.solver.name='sgd' is"
            )
        if finished(cfg, out_dir):
            log.info("already finished: %s", out_dir)
            continue
        groups.setdefault(_batch_key(cfg), []).append((cfg, out_dir))
    written = []
    for group in groups.values():
        t0 = time.perf_counter()
        first = group[0][0]
        feats = load_features(first["sd"]["features"], first["cache_dir"])
        labels = [_given_labels(cfg, feats) for cfg, _ in group]
        log.info("training the probes of %d jobs under %s together", len(group), group[0][1].parent)
        # The jobs of a group share the validation split (it depends on the solver settings only)
        # and so their training rows; only the labels differ.
        runs = self_distill_batched(
            labels[0]["X_train"],
            [lab["y_given"] for lab in labels],
            labels[0]["y_true"],
            feats.X_test,
            feats.y_test,
            float(first["sd"]["lam"]),
            feats.num_classes,
            seeds=[int(cfg["seed"]) for cfg, _ in group],
            X_val=labels[0]["X_val"],
            y_val=None if labels[0]["X_val"] is None else [lab["y_val"] for lab in labels],
            device=device,
            **_distill_settings(first),
        )
        share = (time.perf_counter() - t0) / len(group)
        for (cfg, out_dir), lab, run in zip(group, labels, runs):
            body = _distill_result(cfg, feats, lab, run, out_dir)
            result = {**_job_info(cfg, feats), **body, "wall_s": share}
            written.append(
                atomic_write_json(out_dir / RESULTS_FILE, {**result, "config": cfg, "status": "finished"})
            )
    return written


def finished(cfg: Mapping[str, Any], out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a finished run of this job's config (a rerun skips it)."""
    return is_finished(out_dir) and _same_job(read_json(out_dir / RESULTS_FILE).get("config"), cfg)


def check_sources(jobs: Sequence[tuple[Mapping[str, Any], Path]]) -> None:
    """Fail before any training when an unfinished job's features are neither cached nor extractable
    (dataset root unset or not in torchvision's layout, weights missing), naming what to set."""
    seen: set[str] = set()
    for cfg, out_dir in jobs:
        key = json.dumps([cfg["sd"]["features"], cfg["cache_dir"]], sort_keys=True, default=str)
        if key not in seen and not finished(cfg, out_dir):
            seen.add(key)
            check_source(cfg["sd"]["features"], cfg["cache_dir"])


def _same_job(stored: Mapping[str, Any] | None, config: Mapping[str, Any]) -> bool:
    """Whether a stored config describes the same computation (keys in NON_RESULT_KEYS ignored)."""
    if stored is None:
        return False
    keys = (set(stored) | set(config)) - set(NON_RESULT_KEYS)
    return all(stored.get(k) == config.get(k) for k in keys)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="selfdistill")
def main(cfg: DictConfig) -> None:
    """Run one job into Hydra's output directory unless it already finished with this config."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    if is_finished(out_dir):
        done = read_json(out_dir / RESULTS_FILE)
        if _same_job(done.get("config"), config):
            log.info("already finished: %s", out_dir)
            # A job trained in a batch (phis.selfdistill.sweep) gets its W&B run here, once.
            if not (out_dir / RUN_FILE).is_file():
                with JobMirror(cfg, selfdistill_tags(cfg), out_dir) as mirror:
                    mirror.open()
                    mirror.record(done, selfdistill_tables(done))
            return
    torch.set_num_threads(int(cfg.threads))
    with JobMirror(cfg, selfdistill_tags(cfg), out_dir) as mirror:  # logger=wandb: this job's run
        mirror.open()
        try:
            with threadpool_limits(int(cfg.threads)):
                result = run_job(config, out_dir)
        except Exception as err:
            failure = {"status": "failed", "error": f"{type(err).__name__}: {err}", "config": config}
            atomic_write_json(out_dir / RESULTS_FILE, failure)
            raise
        final = {**result, "config": config, "status": "finished"}
        atomic_write_json(out_dir / RESULTS_FILE, final)
        mirror.record(final, selfdistill_tables(final))


if __name__ == "__main__":
    main()
