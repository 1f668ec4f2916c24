"""Export a trained student as a self-contained model directory: ``python -m phis.export SOURCE OUT``.

SOURCE is a training checkpoint (``.ckpt``) or a run directory (its ``checkpoints/last.ckpt``). OUT
receives what ``phis.load`` / ``PhisModel.from_pretrained`` / ``torch.hub.load(..., 'phis_student')``
read, with torch and safetensors only:

- ``config.json``: the architecture and, per teacher, its widths, the grid it was trained against, the
  normalizer folded into its head and the teacher's own config (``source``);
- ``model.safetensors``: the weights (normalizers folded into the feature heads, spectral
  reparametrizations as plain weights);
- ``provenance.json``: the run's resolved config, its step, the checkpoint and the held-out metrics of
  its ``results.json``; ``README.md``: a short model card;
- with ``--program``, ``model.pt2``: a ``torch.export`` program (dynamic batch, height and width) that
  loads with ``torch.export.load`` and no phis at all. It returns a dict of tensors: ``summary``,
  ``features`` (NCHW) and ``<teacher>/summary``, ``<teacher>/features``; inputs are RGB in [0, 1] and
  unchecked; a CPE student's program covers sizes up to its position table.

Every export is reloaded and compared with the student it came from (summary, spatial features and each
teacher's teacher-space output at the training size and a non-square one) before it replaces OUT, so a
directory that exists is one that computes what the run trained. A training run writes one into
``<run>/student`` when it finishes.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from phis import __version__
from phis.config import plain
from phis.model import CONFIG_FILE, PROGRAM_FILE, PhisModel
from phis.results import RESULTS_FILE, read_json
from phis.student import MultiTeacherViT, read_checkpoint

log = logging.getLogger(__name__)

CHECK_TOLERANCE = 1e-4  # largest |difference| / max |reference| an export may show against its student


def teacher_facts(
    specs: Mapping[str, Mapping[str, Any]], normalizer: str, run_config: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """Per teacher, what the model config records besides widths: grid, folded normalizer, its config."""
    sources = (run_config or {}).get("teachers") or {}
    return {
        n: {"grid": list(s["grid"]), "normalizer": normalizer, "source": dict(sources.get(n) or {})}
        for n, s in specs.items()
    }


def provenance(
    *,
    run_config: Mapping[str, Any] | None,
    results: Mapping[str, Any] | None,
    steps: int,
    checkpoint: str | None,
    normalizer: str,
    loss: str | None,
) -> dict[str, Any]:
    """Where an export came from: run name, config, step, checkpoint, held-out metrics and evaluation."""
    results = dict(results or {})
    out: dict[str, Any] = {
        "name": (run_config or {}).get("name"),
        "steps": int(steps),
        "normalizer": normalizer,
        "loss": loss,
        "checkpoint": checkpoint,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "phis_version": __version__,
        "heldout": results.get("heldout"),
        "eval": (results.get("eval") or {}).get("metrics"),
        "results_status": results.get("status"),
        "config": dict(run_config or {}),
    }
    return out


@torch.no_grad()
def check_export(student: MultiTeacherViT, model: PhisModel, seed: int = 0) -> float:
    """Largest relative difference between ``model`` and the (folded) ``student`` on random images at
    the training size and a non-square size; a RuntimeError when it exceeds ``CHECK_TOLERANCE``."""
    was_training = student.training
    student.eval()
    p, s = model.patch_size, model.img_size
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    dev = student.pos_table.device
    for size in ((s, s), (s, max(p, s - 2 * p) if s > 2 * p else s + p)):
        images = torch.rand(2, 3, *size, generator=gen).to(dev)
        tokens, grid = model.encode(images)
        ref, out = student(images), model.teacher_outputs(tokens, grid, feature_fmt="NLC")
        summary, spatial = model.backbone_output(tokens, grid, "NLC")
        pairs = [(ref.trunk_summary, summary), (ref.trunk_features, spatial)]
        for n in student.teacher_names:
            pairs.append((ref.features[n], out[n].features))
            if n in ref.summaries:
                pairs.append((ref.summaries[n], out[n].summary))
        for a, b in pairs:
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    student.train(was_training)
    if not worst <= CHECK_TOLERANCE:
        raise RuntimeError(
            f"the exported model differs from the trained student by {worst:.3g} (relative; allowed "
            f"{CHECK_TOLERANCE}); nothing was written"
        )
    return worst


class _Program(nn.Module):
    """``PhisModel`` as one graph for ``torch.export``: unchecked input, a flat dict of outputs."""

    def __init__(self, model: PhisModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        m = self.model
        grid = (images.shape[2] // m.patch_size, images.shape[3] // m.patch_size)
        tokens = m._tokens(images, grid)[0]
        summary, features = m.backbone_output(tokens, grid)
        out = {"summary": summary, "features": features}
        for n, o in m.teacher_outputs(tokens, grid).items():
            out[f"{n}/features"] = o.features
            if o.summary is not None:
                out[f"{n}/summary"] = o.summary
        return out


def export_program(model: PhisModel, path: Path) -> Path:
    """Write a ``torch.export`` program of ``model`` with dynamic batch, height and width."""
    from torch.export import Dim

    p, s = model.patch_size, model.img_size
    table = model.pos_table.shape[1]
    top = table if model.cpe else model.max_resolution // p  # the CPE window branch stays in the table
    h, w = Dim("grid_h", min=1, max=top), Dim("grid_w", min=1, max=top)
    shapes = {"images": {0: Dim("batch", min=1, max=4096), 2: p * h, 3: p * w}}
    example = torch.rand(2, 3, s, s, device=model.pos_table.device)
    program = torch.export.export(_Program(model).eval(), (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def _claim(out: Path) -> None:
    """Refuse an output directory that holds something other than a phis model."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file()):
        raise FileExistsError(
            f"{out} exists and is not a phis model directory; choose another output directory"
        )


def write_model(
    student: MultiTeacherViT,
    out: str | Path,
    teachers: Mapping[str, Mapping[str, Any]],
    prov: Mapping[str, Any],
    program: bool = False,
) -> Path:
    """Export a folded ``student`` (heads in teacher space) into ``out`` after checking the copy; the
    directory is swapped in whole, so an interrupted export leaves the previous one (or none)."""
    out = Path(out).resolve()
    _claim(out)
    model = student.to_phis_model(teachers)
    model.provenance = dict(prov)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        check_export(student, PhisModel.from_pretrained(tmp, map_location=student.pos_table.device))
        if program:
            export_program(model, tmp / PROGRAM_FILE)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_module(
    module: Any,
    out: str | Path,
    run_config: Any = None,
    results: Mapping[str, Any] | None = None,
    program: bool = False,
) -> Path:
    """Export a trained ``DistillModule`` (as a training run ends); ``run_config``: its resolved config,
    ``results``: what the run writes to results.json."""
    hp, run_config = module.hparams, plain(run_config)
    normalizer = hp["normalizer"]["name"]
    prov = provenance(
        run_config=run_config,
        results=results,
        steps=int(module.global_step),
        checkpoint=None,
        normalizer=normalizer,
        loss=hp["loss"]["name"],
    )
    teachers = teacher_facts(module.teacher_specs, normalizer, run_config)
    return write_model(module.fold_normalizers(), out, teachers, prov, program)


def export_finished_run(
    module: Any, out: Path, run_config: Any, results: Mapping[str, Any]
) -> dict[str, str]:
    """``export_module`` as a training run ends: ``{"export": path}``; a failure is logged as an error and
    returned as ``{"export_error": ...}``, so it never costs the run its results (the checkpoint stays,
    and ``python -m phis.export`` retries from it)."""
    try:
        path = export_module(module, out, run_config, results)
    except Exception as err:  # whatever fails, the finished run keeps its results
        run_dir = Path(out).parent
        log.error(
            "could not export the student (%s: %s); retry with: python -m phis.export %s %s",
            type(err).__name__,
            err,
            run_dir,
            out,
        )
        return {"export_error": f"{type(err).__name__}: {err}"}
    return {"export": str(path)}


def export_checkpoint(source: str | Path, out: str | Path, program: bool = False) -> Path:
    """Export the student of a checkpoint or run directory; its run's config_resolved.yaml and
    results.json (next to ``checkpoints/``) go into the provenance when they exist."""
    path = Path(source)
    path = path if path.is_file() else path / "checkpoints" / "last.ckpt"
    if not (path.is_file() and path.suffix == ".ckpt"):
        raise FileNotFoundError(
            f"{source} is neither a .ckpt file nor a run directory with checkpoints/last.ckpt"
        )
    _claim(Path(out).resolve())
    run_dir = path.parent.parent
    run_config = None
    if (run_dir / "config_resolved.yaml").is_file():
        from omegaconf import OmegaConf

        run_config = plain(OmegaConf.load(run_dir / "config_resolved.yaml"))
    results = read_json(run_dir / RESULTS_FILE) if (run_dir / RESULTS_FILE).is_file() else None
    ckpt = read_checkpoint(path)
    normalizer = ckpt.hparams["normalizer"]["name"]
    prov = provenance(
        run_config=run_config,
        results=results,
        steps=ckpt.step,
        checkpoint=str(path.resolve()),
        normalizer=normalizer,
        loss=ckpt.hparams["loss"]["name"],
    )
    teachers = teacher_facts(ckpt.hparams["teachers"], normalizer, run_config)
    return write_model(ckpt.student, out, teachers, prov, program)


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m phis.export SOURCE OUT [--program]``; returns the directory written."""
    parser = argparse.ArgumentParser(description="Export a trained phis student as a model directory.")
    parser.add_argument("source", type=Path, help="a training checkpoint (.ckpt) or a run directory")
    parser.add_argument("out", type=Path, help="the model directory to write (replaced if it holds one)")
    parser.add_argument(
        "--program", action="store_true", help="also write model.pt2, a torch.export program (no phis needed)"
    )
    args = parser.parse_args(argv)
    out = export_checkpoint(args.source, args.out, args.program)
    print(f"exported the student of {args.source} to {out}")
    print(f"load it with: import phis; model = phis.load({str(out)!r})")
    return out


if __name__ == "__main__":
    main()
