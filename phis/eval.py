"""Evaluation of a distilled student: teacher-space MSE, kNN, zero-shot, linear-probe segmentation, RankMe.

The metric primitives live in ``phis.metrics``. ``evaluate_module`` runs them on a trained
``DistillModule`` with the offline sets of ``phis.evaldata`` (or a user's datasets) and appends one JSON
line per evaluation; ``python -m phis.eval CHECKPOINT [--out DIR]`` does the same for a saved checkpoint.

Metric names (``phis.ranks`` groups them by these): ``tmse/<teacher>`` (teacher-space MSE, lower is
better) with ``tmse_explained/<teacher>`` = 1 − MSE / Var, ``knn/<set>``, ``zero_shot/<teacher>/<set>``
(accuracy against labels), ``zero_shot_agreement/<teacher>/<set>`` (classifier-type teachers: the
teacher's head on the student's predicted summary agrees with the teacher's own top-1),
``knn_spatial/<set>`` (the same kNN on the mean of the trunk's patch features instead of its summary
token), ``seg/<set>`` / ``ade20k`` / ``voc`` (linear-probe mIoU), ``rankme/<set>``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from phis.build import build_datamodule, teacher_set
from phis.cache import ensure_all
from phis.evalconfig import EvalConfig, class_names, prompts
from phis.evaldata import (
    classification_set,
    segmentation_set,
)
from phis.metrics import (
    classifier_zero_shot,
    knn_accuracy,
    linear_probe_segmentation,
    rankme,
    teacher_metric_names,
    text_classifier,
    zero_shot_accuracy,
)
from phis.results import RESULTS_FILE, append_jsonl, atomic_write_json, is_finished, markdown_table, read_json

# ----------------------------------------------------------------------------------------------------
# Running the evaluation on a trained DistillModule

# Teacher families whose summary can be scored zero-shot: a text tower, or the teacher's own classifier.
TEXT_FAMILIES = ("open_clip", "hf_clip", "hf_siglip")
CLASSIFIER_FAMILIES = ("efficientnet_lite", "timm")
SEG_METRIC = {"collage": "seg/collage", "ade20k": "ade20k", "voc": "voc"}


def _is_train_config(cfg: Any) -> bool:
    return isinstance(cfg, Mapping) and "teachers" in cfg and "data" in cfg


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _resolution(module: Any, ecfg: EvalConfig) -> int:
    """Evaluation image size: configured, else the current training stage's, else the student's."""
    if ecfg.image_size:
        return int(ecfg.image_size)
    stage = int(getattr(module, "stage_resolution", -1))
    return stage if stage > 0 else int(module.student.img_size)


class _Embedded(NamedTuple):
    summaries: Tensor  # [N, D] trunk summary tokens
    targets: Tensor  # [N] labels or [N, H, W] masks
    spatial: Tensor  # [n, D, h, w] patch features of the first ``spatial_limit`` items ([0] if none)
    pooled: Tensor  # [N, D] the mean of each item's patch features


@torch.no_grad()
def _embed(module: Any, data: Dataset, batch_size: int, spatial_limit: int = 0) -> _Embedded:
    """Trunk summaries, labels/masks, pooled patch features, and the spatial features of the first
    ``spatial_limit`` items."""
    dev = _device(module)
    summaries, targets, spatial, pooled, kept = [], [], [], [], 0
    for images, y in DataLoader(data, batch_size=batch_size):
        s, f = module.embed(images.to(dev))  # [B, D], [B, D, h, w]
        summaries.append(s.float().cpu())
        pooled.append(f.float().mean((2, 3)).cpu())
        targets.append(torch.as_tensor(y))
        if kept < spatial_limit:
            spatial.append(f[: spatial_limit - kept].float().cpu())
            kept += len(spatial[-1])
    feats = torch.cat(spatial) if spatial else torch.empty(0)
    return _Embedded(torch.cat(summaries), torch.cat(targets), feats, torch.cat(pooled))


@torch.no_grad()
def _summaries(fn: Callable[[Tensor], Tensor], data: Dataset, batch_size: int, dev: torch.device) -> Tensor:
    """``fn(images) -> [B, Cs]`` over a labelled set, concatenated on the CPU."""
    return torch.cat(
        [fn(images.to(dev)).float().cpu() for images, _ in DataLoader(data, batch_size=batch_size)]
    )


class _TeacherSource:
    """Teachers for evaluation: given ones first, else built on first use from the training config."""

    def __init__(self, given: Mapping[str, nn.Module] | None, train_cfg: Any, device: torch.device) -> None:
        self.given, self.device, self.built = dict(given or {}), device, {}
        self.cfgs: dict[str, dict] = {}
        if train_cfg is not None:
            self.cfgs = teacher_set(train_cfg)

    def family(self, name: str) -> str | None:
        return self.cfgs.get(name, {}).get("family")

    def available(self, name: str) -> bool:
        return name in self.given or name in self.cfgs

    def __call__(self, name: str) -> nn.Module:
        if not self.available(name):
            raise ValueError(f"teacher {name!r} is neither given nor in the training config's teacher set")
        if name in self.given:
            return self.given[name].to(self.device)
        if name not in self.built:
            from phis.teachers import build_teacher

            self.built[name] = build_teacher(self.cfgs[name]).to(self.device)
        return self.built[name]


def _heldout_loader(
    train_cfg: Any, teachers: _TeacherSource, batch_size: int, split: str = "auto", limit: int | None = None
) -> tuple[str, DataLoader]:
    """A held-out split of the run's data (``auto``: ``test`` if configured, else ``val``; its first
    ``limit`` images if given) with cached teacher targets."""
    dm = build_datamodule(train_cfg)
    split = _resolve_split(split, dm.sets)
    entries = [(cache, lambda n=name: teachers(n)) for name, cache in dm.caches.get(split, {}).items()]
    ensure_all(entries, dm.cache_batch_size, dm.num_workers)  # built only if missing
    return split, DataLoader(dm.dataset(split, limit), batch_size=batch_size)


def teacher_metrics(
    module: Any, batches: Iterable[Mapping[str, Any]], teachers: Callable[[str], nn.Module] | None = None
) -> dict[str, float]:
    """Held-out teacher-space MSE, explained fraction, error-variance ranges and summary cosine per teacher,
    under their metric names (``module.heldout_metrics`` computes them).

    Batches hold ``images`` and, from the teacher cache, ``targets``; without targets the teachers are
    run on the images. The normalized-space error compares ``predict_normalized`` with the normalizer
    applied to the targets (PHI-S Table 5 reports both spaces).
    """
    return teacher_metric_names(module.heldout_metrics(batches, teachers=teachers))


def _resolve_split(choice: str, available: Iterable[str]) -> str:
    """The held-out split eval.heldout_split names among ``available`` (auto: test if there, else val)."""
    available = set(available)
    split = ("test" if "test" in available else "val") if choice == "auto" else choice
    if split not in available:
        raise ValueError(f"eval.heldout_split={choice!r}, but the run's data has only {sorted(available)}")
    return split


def _zero_shot(
    module: Any, name: str, teacher: nn.Module, set_name: str, test: Any, ecfg: EvalConfig
) -> dict[str, float]:
    """Zero-shot metrics of one teacher's summary head on (a spread subset of) a labelled test set."""
    dev = _device(module)
    labels, data = test.labels, test
    if ecfg.zero_shot_images and len(test) > ecfg.zero_shot_images:
        keep = torch.linspace(0, len(test) - 1, ecfg.zero_shot_images).round().long().unique()
        labels, data = labels[keep], Subset(test, keep.tolist())
    student = _summaries(lambda x: module.predict(x)[name].summary, data, ecfg.batch_size, dev)
    own = _summaries(lambda x: teacher(x).summary, data, ecfg.batch_size, dev)
    if getattr(teacher, "has_text", False):
        text = text_classifier(teacher.encode_text, test.class_names, prompts(ecfg, set_name)).cpu()
        return {
            f"zero_shot/{name}/{set_name}": zero_shot_accuracy(student, text, labels),
            f"teacher_zero_shot/{name}/{set_name}": zero_shot_accuracy(own, text, labels),
        }
    head, own = teacher.classify_summary, own.to(dev)
    # labels only mean something to the head when they are ImageNet-1k indices
    scored = labels.to(dev) if set_name == "image_folder" and ecfg.imagenet_labels else None
    res = classifier_zero_shot(student.to(dev), head, scored, own)
    out = {f"zero_shot_agreement/{name}/{set_name}": res["agreement"]}
    if scored is not None:
        out[f"zero_shot/{name}/{set_name}"] = res["accuracy"]
        out[f"teacher_zero_shot/{name}/{set_name}"] = classifier_zero_shot(own, head, scored)["accuracy"]
    return out


def _set_root(ecfg: EvalConfig, name: str) -> str | None:
    roots = {"image_folder": ecfg.image_folder_root, "ade20k": ecfg.ade20k_root, "voc": ecfg.voc_root}
    return roots.get(name)


def _capped(data: Dataset, limit: int | None) -> Dataset:
    return Subset(data, range(min(limit, len(data)))) if limit else data


def _classification_metrics(
    module: Any,
    set_name: str,
    size: int,
    ecfg: EvalConfig,
    source: _TeacherSource,
    zs_names: Sequence[str],
    metrics: dict[str, float],
    details: dict[str, Any],
    skipped: dict[str, str],
) -> None:
    """kNN, RankMe and zero-shot on one labelled set; results go into the three dicts."""
    root = _set_root(ecfg, set_name)
    names = class_names(ecfg) if set_name == "image_folder" else None
    train = classification_set(set_name, "train", size, root, ecfg.knn_limit, ecfg.seed, names, ecfg.decode)
    test = classification_set(set_name, "test", size, root, ecfg.knn_limit, ecfg.seed, names, ecfg.decode)
    tr = _embed(module, train, ecfg.batch_size)
    te = _embed(module, test, ecfg.batch_size, ecfg.rankme_images)
    k = min(ecfg.knn_k, len(tr.targets))  # a capped small set may hold fewer than k samples
    sizes = {"k": k, "train": len(tr.targets), "test": len(te.targets)}
    features = {"knn": (tr.summaries, te.summaries)}
    if ecfg.knn_spatial:
        features["knn_spatial"] = (tr.pooled, te.pooled)
    for metric, (train_x, test_x) in features.items():
        acc = knn_accuracy(train_x, tr.targets, test_x, te.targets, k, ecfg.knn_temperature)
        metrics[f"{metric}/{set_name}"] = acc
        details[f"{metric}/{set_name}"] = sizes
    if te.spatial.numel():
        metrics[f"rankme/{set_name}"] = rankme(te.spatial)
    for n in zs_names if ecfg.zero_shot else ():
        teacher = source(n)
        if getattr(teacher, "has_text", False) or hasattr(teacher, "classify_summary"):
            metrics.update(_zero_shot(module, n, teacher, set_name, test, ecfg))
        else:
            skipped[f"zero_shot/{n}"] = "teacher has neither a text tower nor a classifier head"


def _segmentation_probe(module: Any, set_name: str, size: int, ecfg: EvalConfig) -> dict[str, Any]:
    """Linear-probe segmentation on frozen trunk patch features of one set (mIoU and details)."""
    root = _set_root(ecfg, set_name)
    limit = ecfg.seg_limit if set_name != "collage" else None
    train, test = (
        _capped(segmentation_set(set_name, split, size, root, seed=ecfg.seed, decode=ecfg.decode), limit)
        for split in ("train", "test")
    )
    tr = _embed(module, train, ecfg.batch_size, len(train))
    te = _embed(module, test, ecfg.batch_size, len(test))
    num_classes = (train.dataset if isinstance(train, Subset) else train).num_classes
    return linear_probe_segmentation(
        tr.spatial,
        tr.targets,
        te.spatial,
        te.targets,
        num_classes,
        epochs=ecfg.probe_epochs,
        lr=ecfg.probe_lr,
        seed=ecfg.seed,
    )


def evaluate_module(
    module: Any,
    cfg: Any = None,
    *,
    teachers: Mapping[str, nn.Module] | None = None,
    heldout: Iterable[Mapping[str, Any]] | None = None,
    measured: Mapping[str, Mapping[str, Any]] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a trained ``DistillModule``; append the record to ``<out_dir>/eval.jsonl`` and return it.

    ``cfg`` is the training config (its ``eval`` group holds ``EvalConfig`` keys; its ``teachers``,
    ``data`` and ``cache`` give the held-out set, cached targets and the teachers to rebuild), an
    ``EvalConfig`` / eval mapping, or None. ``teachers`` (name → Teacher) and ``heldout`` (batches with
    ``images`` and optionally cached ``targets``) override what the config would build. ``measured``
    (split → ``heldout_metrics`` results, as training stores them under ``heldout``) holds the teacher
    MSE already: it is not measured again nor copied into ``metrics``; ``details["tmse"]`` names the
    split it is stored under. The record holds
    ``metrics`` (flat name → number, names as in the module docstring), ``details`` (per-class IoU …),
    ``skipped`` (what could not run, and why), the settings and timing.
    """
    start = time.perf_counter()
    train_cfg = cfg if _is_train_config(cfg) else None
    if isinstance(cfg, EvalConfig):
        ecfg = cfg
    else:
        ecfg = EvalConfig.from_mapping(cfg.get("eval") if train_cfg is not None else cfg)
    dev = _device(module)
    size = _resolution(module, ecfg)
    source = _TeacherSource(teachers, train_cfg, dev)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    was_training = module.training
    module.eval()
    try:
        if ecfg.teacher_mse and measured is not None:
            split = _resolve_split(ecfg.heldout_split, measured)
            details["tmse"] = {"heldout": split, "stored_in": f"heldout.{split}"}
        elif ecfg.teacher_mse:
            split = "given"
            if heldout is None and train_cfg is not None:
                split, heldout = _heldout_loader(
                    train_cfg, source, ecfg.batch_size, ecfg.heldout_split, ecfg.heldout_limit
                )
            elif heldout is None and teachers:
                from phis.photos import OfflineImagePool

                split = "offline_test"
                pool = OfflineImagePool("test", size, ecfg.heldout_images, ecfg.seed)
                heldout = ({"images": x} for x in DataLoader(pool, batch_size=ecfg.batch_size))
            details["tmse"] = {"heldout": split}
            if heldout is None:
                skipped["tmse"] = "no held-out batches, teachers or training config to build them from"
            else:
                metrics.update(teacher_metrics(module, heldout, source))

        zs_names = [
            n
            for n in module.teacher_names
            if module.teacher_specs[n].get("summary_dim")
            and source.available(n)
            and source.family(n) in (None, *TEXT_FAMILIES, *CLASSIFIER_FAMILIES)
        ]
        if ecfg.zero_shot and not zs_names:
            skipped["zero_shot"] = "no teacher with a text tower or classifier head is available"
        for set_name in ecfg.knn_sets:
            _classification_metrics(module, set_name, size, ecfg, source, zs_names, metrics, details, skipped)
        for set_name in ecfg.seg_sets:
            res = _segmentation_probe(module, set_name, size, ecfg)
            metrics[SEG_METRIC[set_name]] = res.pop("miou")
            details[SEG_METRIC[set_name]] = res
    finally:
        module.train(was_training)

    record = {
        "step": int(getattr(module, "global_step", 0)),
        "image_size": size,
        "metrics": metrics,
        "details": details,
        "skipped": skipped,
        "config": asdict(ecfg),
        "time_s": round(time.perf_counter() - start, 2),
    }
    if out_dir is None and train_cfg is not None and train_cfg.get("output_dir"):
        out_dir = train_cfg.get("output_dir")
    if out_dir is not None:
        append_jsonl(Path(out_dir) / ecfg.jsonl, record)
    return record


# ----------------------------------------------------------------------------------------------------
# Command line


def find_run_config(checkpoint: Path) -> Path | None:
    """The training run's ``config_resolved.yaml`` next to the checkpoint folder, if there is one."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        path = folder / "config_resolved.yaml"
        if path.is_file():
            return path
    return None


def _evaluated_with(run_dir: Path, ecfg: EvalConfig) -> bool:
    """Whether the run's ``results.json`` already holds an evaluation with exactly these settings (a setting
    added to ``EvalConfig`` after that evaluation counts as unchanged while it has its default value)."""
    stored = (read_json(run_dir / RESULTS_FILE).get("eval") or {}).get("config")
    if not isinstance(stored, dict):
        return False
    now, defaults = (json.loads(json.dumps(asdict(c))) for c in (ecfg, EvalConfig()))
    return set(stored) <= set(now) and all(stored.get(k, defaults[k]) == v for k, v in now.items())


def _update_results(run_dir: Path, evaluate: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Re-evaluate a finished run into its ``results.json`` (``--update-results``), keeping the previous
    evaluation as ``eval_previous``; the held-out teacher MSE stays the one training measured."""
    path = run_dir / RESULTS_FILE
    results = read_json(path)
    record = evaluate(measured=results["heldout"])
    if "eval" in results:
        results["eval_previous"] = results["eval"]
    results["eval"] = record
    atomic_write_json(path, results)
    return record


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``python -m phis.eval CHECKPOINT ... [--out DIR] [--config YAML] [--set key=value ...]
    [--update-results]``; returns the records evaluated (runs skipped by ``--update-results`` have none)."""
    import argparse

    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description="Evaluate distilled student checkpoints (phis.eval).")
    parser.add_argument("checkpoint", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="where eval.jsonl goes (default: the run directory)")
    parser.add_argument(
        "--config", type=Path, help="training config (default: the run's config_resolved.yaml)"
    )
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="EvalConfig overrides")
    parser.add_argument("--no-teachers", action="store_true", help="skip everything that needs teachers")
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="write each evaluation into its run's results.json, where the tables read it (the previous "
        "one is kept as eval_previous; the teacher MSE stays training's); runs whose evaluation already "
        "used these settings are skipped, so an interrupted pass resumes",
    )
    args = parser.parse_args(argv)
    missing = [str(c) for c in args.checkpoint if not c.is_file()]
    if missing:
        parser.error(f"checkpoint(s) {missing} do not exist")
    if args.update_results and (args.out or args.no_teachers):
        parser.error(
            "--update-results writes into each run's folder with its teachers: drop --out/--no-teachers"
        )

    unfinished = [str(c) for c in args.checkpoint if args.update_results and not is_finished(c.parent.parent)]
    if unfinished:
        parser.error(f"--update-results needs finished runs (results.json); these are not: {unfinished}")

    from phis.module import DistillModule

    overrides = OmegaConf.from_dotlist(list(args.set))
    if args.no_teachers:
        overrides.merge_with({"teacher_mse": False, "zero_shot": False})
    records = []
    for i, checkpoint in enumerate(args.checkpoint, 1):
        run_dir = checkpoint.parent.parent
        config_path = args.config or find_run_config(checkpoint)
        cfg: Any = overrides
        if config_path is not None and not args.no_teachers:
            cfg = OmegaConf.load(config_path)
            cfg.eval = OmegaConf.merge(cfg.get("eval") or {}, overrides)
        elif config_path is None:
            print(f"no config_resolved.yaml near {checkpoint}: no teachers or held-out set to rebuild")
        where = f"[{i}/{len(args.checkpoint)}] {checkpoint}"
        ecfg = EvalConfig.from_mapping(cfg.get("eval") if _is_train_config(cfg) else cfg)
        if args.update_results and _evaluated_with(run_dir, ecfg):
            print(f"{where}: results.json already holds an evaluation with these settings; skipped")
            continue
        start = time.perf_counter()
        module = DistillModule.load_from_checkpoint(checkpoint, map_location="cpu")
        evaluate = partial(evaluate_module, module, cfg, out_dir=args.out or run_dir)
        record = _update_results(run_dir, evaluate) if args.update_results else evaluate()
        print(f"{where}: evaluated in {time.perf_counter() - start:.1f} s")
        rows = [[k, f"{v:.4f}"] for k, v in sorted(record["metrics"].items())]
        print(markdown_table(["metric", "value"], rows))
        for what, why in record["skipped"].items():
            print(f"skipped {what}: {why}")
        records.append(record)
    return records


if __name__ == "__main__":
    main()
