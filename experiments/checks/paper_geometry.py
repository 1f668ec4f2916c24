"""The paper's geometry through the training module on this CPU: every teacher at its own input size.

    python -m experiments.checks.paper_geometry [--out experiments/results/paper_geometry.md]
    python -m experiments.checks.paper_geometry --tiny        # the same checks on tiny random models

Builds the ``phis`` teacher set (DFN CLIP ViT-H/14-378, SigLIP SO400M/14-384, DINOv2-g/14-reg, SAM
ViT-H) at its real architectures with random weights (the loaders' ``random_init``: nothing is
downloaded; the text towers are dropped after building, the check runs images only) as
``profile=paper`` configures it, and the ViT-B/16 student (CPE, 4 registers) at 256 px
with random weights. It trains two steps with the statistics estimation schedule (estimate, refit) and
one partition per teacher, then one step of a 432 px stage. Every teacher call is recorded: the images
it got, the side its encoder read, its feature grid and widths. The run fails (exit status 1) when any
of them differs from the paper's geometry, when the student's token grid is wrong, when the stage
change does not reset the statistics and restart the learning rate, or when a loss is not finite.

Expected (SPEC §2): DFN CLIP 378 px → 27×27 × 1280 (summary 1024), SigLIP 384 px → 27×27 × 1152 (1152),
DINOv2-g 224 px → 16×16 × 1536 (1536), SAM the student's image zero-padded to 1024 → its own grid
(256 px → 16×16, 432 px → 27×27) × 1280, no summary; the student 16×16 at 256 px, 27×27 at 432 px.
The table (printed and written to ``--out``) gives them with the losses, seconds per step and the
process's peak resident memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from phis.build import build_module, teacher_set
from phis.results import atomic_write_text, markdown_table
from phis.teachers import Teacher, build_teacher

CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class Geometry:
    """What one teacher should see and return."""

    input: int | None  # side the teacher reads the image at; None: the student's image as it comes
    encoder: int  # side of the encoder's input (SAM: the image zero-padded to 1024)
    patch: int
    width: int
    summary: int | None

    def side(self, size: int) -> int:
        return self.input or size

    def grid(self, size: int) -> int:
        return self.side(size) // self.patch


@dataclass(frozen=True)
class Setup:
    """A teacher set with its expected geometry, the student's patch size, the stage sizes and batch."""

    overrides: tuple[str, ...]
    teachers: Mapping[str, Geometry]
    student_patch: int
    sizes: tuple[int, int]  # stage 1, stage 2
    batch: int


SCHEDULE = (
    "distill.normalizer_fit=schedule",
    "distill.estimate_steps=2",
    "distill.refit_every=1",
    "distill.freeze_trunk_steps=1",
)
PAPER = Setup(
    overrides=(
        "+profile=paper",
        "+teachers.dfn_clip.random_init=true",
        "+teachers.siglip.random_init=true",
        "+teachers.dinov2.random_init=true",
        "+teachers.sam.random_init=true",
        "student.pretrained=false",
        *SCHEDULE,
    ),
    teachers={
        "dfn_clip": Geometry(378, 378, 14, 1280, 1024),
        "siglip": Geometry(384, 384, 14, 1152, 1152),
        "dinov2": Geometry(224, 224, 14, 1536, 1536),
        "sam": Geometry(None, 1024, 16, 1280, None),
    },
    student_patch=16,
    sizes=(256, 432),
    batch=4,
)
TINY = Setup(
    overrides=(
        "teachers=tiny",
        "teachers.sam.image_size=${student.img_size}",
        "+teachers.sam.pad_input=true",
        "student.img_size=32",
        "student.num_registers=4",
        "student.head_hidden_dim=32",
        "student.cpe=true",
        "student.cpe_max_size=64",
        "student.spectral_reparam=true",
        "++student.trunk_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
        "optim.name=lamb",
        "optim.warmup_steps=100",
        *SCHEDULE,
    ),
    teachers={
        "clip": Geometry(32, 32, 8, 32, 16),
        "siglip": Geometry(32, 32, 8, 32, 32),
        "dinov2": Geometry(32, 32, 8, 48, 48),
        "sam": Geometry(None, 128, 16, 16, None),
    },
    student_patch=8,
    sizes=(32, 48),
    batch=4,
)


def partitions(setup: Setup) -> str:
    """One partition per teacher when the batch divides over the teachers, else every teacher on all."""
    return "shared" if setup.batch % len(setup.teachers) else "per_teacher"


def config(setup: Setup) -> Any:
    """The real training config with the check's overrides: two stages of 2 and 1 steps."""
    stages = ", ".join(
        f"{{name: stage{i + 1}, steps: {steps}, image_size: {size}, batch_size: {setup.batch}, "
        f"partitions: {partitions(setup)}}}"
        for i, (steps, size) in enumerate(zip((2, 1), setup.sizes, strict=True))
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "output_dir=.",
                "cache.dir=.",
                "cache.enabled=false",
                *setup.overrides,
                f"stages=[{stages}]",
                "trainer.max_steps=null",
            ],
        )


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def drop_text_tower(teacher: Teacher) -> None:
    """Free an image-text teacher's text side, which the check never runs (3.2 GB of float32 for DFN
    CLIP and SigLIP); the image side is the loader's, untouched."""
    model = getattr(teacher, "model", None)
    if not teacher.has_text or model is None or not hasattr(model, "visual"):
        return
    for name, _ in list(model.named_children()):
        if name != "visual":
            delattr(model, name)
    for name, _ in list(model.named_parameters(recurse=False)):
        delattr(model, name)
    gc.collect()


class Recorder:
    """Wraps each teacher's ``encode`` to record the batch, the side it read, its outputs' shapes."""

    def __init__(self, teachers: Mapping[str, Teacher]) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {n: [] for n in teachers}
        self.padded: dict[str, int] = {}
        for name, teacher in teachers.items():
            teacher.encode = self._wrap(name, teacher.encode)
            encoder = getattr(teacher, "encoder", None)  # SAM: the padded input reaches patch_embed
            if encoder is not None:
                encoder.patch_embed.register_forward_pre_hook(self._padded(name))

    def _wrap(self, name: str, encode: Callable) -> Callable:
        def recorded(x: torch.Tensor) -> tuple:
            summary, feats = encode(x)
            self.calls[name].append(
                {
                    "batch": x.shape[0],
                    "side": (x.shape[-2], x.shape[-1]),
                    "encoder": x.shape[-1],
                    "grid": tuple(feats.shape[-2:]),
                    "width": feats.shape[1],
                    "summary": None if summary is None else summary.shape[1],
                }
            )
            return summary, feats

        return recorded

    def _padded(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            self.padded[name] = args[0].shape[-1]

        return hook

    def take(self) -> dict[str, dict[str, Any]]:
        """The one call per teacher since the last take (SAM's encoder side from its patch embedding)."""
        out = {}
        for name, calls in self.calls.items():
            if len(calls) != 1:
                raise RuntimeError(f"teacher {name!r} ran {len(calls)} times in one step; expected once")
            out[name] = calls.pop()
            if name in self.padded:
                out[name]["encoder"] = self.padded.pop(name)
        return out


def run(setup: Setup, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, train 2 + 1 steps, and compare everything observed with ``setup``; returns the report."""
    torch.manual_seed(0)
    cfg = config(setup)
    t0 = time.perf_counter()
    teachers: dict[str, Teacher] = {}
    build_s = {}
    for name, tcfg in teacher_set(cfg).items():  # one at a time, to see what each costs
        start = time.perf_counter()
        teachers[name] = build_teacher(tcfg)
        drop_text_tower(teachers[name])
        build_s[name] = time.perf_counter() - start
        log(f"built {name} in {build_s[name]:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")
    specs = {n: t.spec() for n, t in teachers.items()}
    module = build_module(cfg, specs)
    module.attach_teachers(teachers)
    module.prepare_teachers()
    module.train()
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    recorder = Recorder(teachers)
    tokens_seen: list[int] = []
    module.student.trunk.blocks[0].register_forward_pre_hook(lambda m, a: tokens_seen.append(a[0].shape[1]))
    log(f"built everything in {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_gib():.2f} GiB")

    gen = torch.Generator().manual_seed(0)
    steps = []
    for step in range(module.plan.total_steps):
        size = module.plan.at(step).image_size
        images = torch.rand(setup.batch, 3, size, size, generator=gen)
        lr = opt.param_groups[0]["lr"]
        start = time.perf_counter()
        loss, logs = module.distill_loss({"images": images}, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        seconds = time.perf_counter() - start
        counts = {n: int(norm.stats.count) for n, norm in module.normalizers.items()}
        steps.append(
            {
                "step": step,
                "stage": module.plan.at(step).name,
                "partitions": module.plan.at(step).partitions,
                "size": size,
                "lr": lr,
                "seconds": seconds,
                "loss": float(logs["loss"]),
                "terms": {k: float(v) for k, v in logs.items() if "/" in k},
                "trunk_frozen": bool(logs["trunk_frozen"]),
                "teachers": recorder.take(),
                "student_tokens": tokens_seen.pop(),
                "counts": counts,
            }
        )
        log(f"step {step} at {size} px: loss {float(logs['loss']):.4g}, {seconds:.1f} s")
    report = {
        "steps": steps,
        "build_s": build_s,
        "peak_rss_gib": peak_rss_gib(),
        "student_prefix": module.student.num_prefix,
    }
    report["failures"] = check(setup, report)
    return report


def check(setup: Setup, report: Mapping[str, Any]) -> list[str]:
    """Every difference between what ran and the paper's geometry and stage mechanics."""
    fail = []
    prefix = report["student_prefix"]
    steps = report["steps"]
    small, large = setup.sizes
    ran = [(s["stage"], s["size"]) for s in steps]
    if ran != [("stage1", small), ("stage1", small), ("stage2", large)]:
        fail.append(
            f"stages and sizes {ran}, expected 2 steps of stage1 at {small} px, 1 of stage2 at {large}"
        )
    for s in steps:
        size = s["size"]
        per_teacher = setup.batch // len(setup.teachers) if s["partitions"] == "per_teacher" else setup.batch
        if s["partitions"] != partitions(setup):
            fail.append(f"step {s['step']}: partitions {s['partitions']}, expected {partitions(setup)}")
        g = size // setup.student_patch
        if s["student_tokens"] != prefix + g * g:
            fail.append(f"step {s['step']}: student saw {s['student_tokens']} tokens, not {prefix} + {g}x{g}")
        if not math.isfinite(s["loss"]) or not all(math.isfinite(v) for v in s["terms"].values()):
            fail.append(f"step {s['step']}: non-finite loss {s['loss']} ({s['terms']})")
        for name, exp in setup.teachers.items():
            seen = s["teachers"][name]
            want = {
                "batch": per_teacher,
                "side": (exp.side(size), exp.side(size)),
                "encoder": exp.encoder,
                "grid": (exp.grid(size), exp.grid(size)),
                "width": exp.width,
                "summary": exp.summary,
            }
            for key, value in want.items():
                if seen[key] != value:
                    fail.append(f"step {s['step']} ({size} px), {name}: {key} {seen[key]}, expected {value}")
    first, second, stage2 = steps
    g1, g2 = (size // setup.student_patch for size in setup.sizes)
    for name in setup.teachers:
        want = [per_teacher * g1 * g1, 2 * per_teacher * g1 * g1, per_teacher * g2 * g2]
        got = [s["counts"][name] for s in steps]
        if got != want:
            fail.append(f"{name}: statistics token counts {got}, expected {want} (reset at the new stage)")
    if not first["trunk_frozen"] or second["trunk_frozen"] or not stage2["trunk_frozen"]:
        fail.append(
            "trunk freeze per stage: frozen at steps "
            f"{[s['step'] for s in steps if s['trunk_frozen']]}, expected [0, 2] (1 step of each stage)"
        )
    if not (second["lr"] > first["lr"] and stage2["lr"] == first["lr"]):
        fail.append(f"learning rate {[s['lr'] for s in steps]}: does not restart at the new stage")
    return fail


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def table(setup: Setup, report: Mapping[str, Any]) -> str:
    """Markdown: per stage and teacher what ran, then the steps."""
    rows = []
    for s in report["steps"]:
        if s["step"] == 1:
            continue  # same geometry as step 0
        size = s["size"]
        g = size // setup.student_patch
        rows.append([f"{size} px", "student", s["student_tokens"], f"{size} px", f"{g}×{g}", "", ""])
        for name, seen in s["teachers"].items():
            side = f"{seen['side'][0]} px" + (
                f" → {seen['encoder']} padded" if seen["encoder"] != seen["side"][0] else ""
            )
            rows.append(
                [
                    f"{size} px",
                    name,
                    seen["batch"],
                    side,
                    "×".join(map(str, seen["grid"])),
                    seen["width"],
                    seen["summary"] if seen["summary"] is not None else "—",
                ]
            )
    geometry = markdown_table(
        ["stage", "model", "images (student: tokens)", "input", "grid", "width", "summary width"], rows
    )
    steps = markdown_table(
        ["step", "stage", "size", "partitions", "lr", "trunk frozen", "loss", "seconds", "statistics tokens"],
        [
            [
                s["step"],
                s["stage"],
                s["size"],
                s["partitions"],
                f"{s['lr']:.3g}",
                s["trunk_frozen"],
                f"{s['loss']:.4g}",
                f"{s['seconds']:.1f}",
                ", ".join(f"{n} {c}" for n, c in s["counts"].items()),
            ]
            for s in report["steps"]
        ],
    )
    names = list(report["steps"][0]["teachers"])
    terms = markdown_table(
        ["step", *(f"{n} features" for n in names), *(f"{n} summary" for n in names)],
        [
            [
                s["step"],
                *(f"{s['terms'][f'{n}/feat_loss']:.4g}" for n in names),
                *(_fmt(s["terms"].get(f"{n}/summary_loss")) for n in names),
            ]
            for s in report["steps"]
        ],
    )
    builds = ", ".join(f"{n} {t:.0f} s" for n, t in report["build_s"].items())
    verdict = (
        "PASS" if not report["failures"] else "FAIL:\n" + "\n".join(f"- {f}" for f in report["failures"])
    )
    return (
        f"{geometry}\n\n{steps}\n\nPer-teacher terms:\n\n{terms}\n\n"
        f"Teachers built in: {builds}. Peak resident memory: {report['peak_rss_gib']:.2f} GiB.\n\n{verdict}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random teachers and student (tests)")
    parser.add_argument("--out", default="experiments/results/paper_geometry.md")
    parser.add_argument(
        "--batch", type=int, default=None, help="images per step (default 4: one per teacher)"
    )
    args = parser.parse_args(argv)
    setup = TINY if args.tiny else PAPER
    if args.batch is not None:
        setup = dataclasses.replace(setup, batch=args.batch)
    report = run(setup)
    what = (
        "tiny random models" if args.tiny else "the phis teacher set at real size (random weights), ViT-B/16"
    )
    text = (
        f"# Paper geometry check: {what}\n\n"
        f"{torch.get_num_threads()} CPU threads, float32; batch {setup.batch}, stages at "
        f"{setup.sizes[0]} px (2 steps) and {setup.sizes[1]} px (1 step).\n\n{table(setup, report)}"
    )
    print(text)
    atomic_write_text(Path(args.out), text)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
