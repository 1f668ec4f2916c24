"""A paper-size training step on one GPU: images/s, where the time goes, peak memory, student MFU.

    python -m experiments.bench.gpu [--batch-sizes 32 max] [--steps 20] [--warmup 5] [--out PATH]
    python -m experiments.bench.gpu --tiny --device cpu          # the same code at toy sizes (tests)

The PHI-S teacher set (DFN CLIP ViT-H/14-378, SigLIP SO400M/14-384, DINOv2-g/14-reg, SAM ViT-H) at
its real architectures with random weights (``random_init``: nothing is downloaded), the ViT-B/16
student at 256 px, bf16 autocast, LAMB, PHI-S statistics being estimated (the first, most expensive
phase of a stage). Each step is timed in four parts, synchronizing the device in between:

- teachers: ``DistillModule.targets`` (inference mode, weights cast once to bfloat16 on CUDA);
- statistics: the normalizers' streaming float64 mean/covariance update on the aligned targets;
- student: forward, loss and backward;
- optimizer: step and zero_grad.

``max`` in ``--batch-sizes`` doubles the batch from the last given size until the step runs out of
memory and reports the largest that ran. Every batch size is measured with and without
``torch.compile`` (``distill.compile=[teachers, student]``; CUDA only). MFU counts the student trunk's
matmul and attention FLOPs (forward + backward = 3x forward) against ``--peak-tflops`` (default: the
device's dense bf16 peak when known). Results: a markdown table printed and written to ``<out>.md``.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from phis.build import build_module, teacher_set
from phis.module import resample_grid
from phis.results import atomic_write_text, markdown_table
from phis.teachers import build_teacher

CONF = Path(__file__).resolve().parents[2] / "conf"
PARTS = ("teachers", "statistics", "student", "optimizer")
# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

PAPER = [
    "teachers=phis",
    "student=vit_b16",
    "+teachers.dfn_clip.random_init=true",
    "+teachers.siglip.random_init=true",
    "+teachers.dinov2.random_init=true",
    "+teachers.sam.random_init=true",
    "optim.name=lamb",
]
TINY = [
    "teachers=tiny",
    "student.img_size=32",
    "student.num_registers=2",
    "student.head_hidden_dim=32",
    "++student.trunk_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
]


def config(overrides: Sequence[str]) -> Any:
    """The real training config with the benchmark's overrides (statistics estimated while training)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "output_dir=.",
                "cache.dir=.",
                "cache.enabled=false",
                "distill.normalizer_fit=schedule",
                "distill.estimate_steps=1000000",
                "distill.refit_every=1000000",
                *overrides,
            ],
        )


def trunk_flops_per_image(module: Any) -> float:
    """Student trunk forward FLOPs per image: per block 24·T·D² (qkv, proj, MLP) + 4·T²·D (attention)."""
    student = module.student
    trunk = student.trunk
    d, depth = trunk.embed_dim, len(trunk.blocks)
    grid = student.grid_for(student.img_size, student.img_size)
    tokens = student.num_prefix + grid[0] * grid[1]
    mlp_ratio = trunk.blocks[0].mlp.fc1.out_features / d
    per_block = 2 * tokens * (4 * d * d + 2 * mlp_ratio * d * d) + 4 * tokens * tokens * d
    return float(depth * per_block)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(cfg: Any, device: torch.device, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) at one batch size; parts in ms per step."""
    teachers = {n: build_teacher(c) for n, c in teacher_set(cfg).items()}
    specs = {n: t.spec() for n, t in teachers.items()}
    module = build_module(cfg, specs).to(device)
    module.attach_teachers(teachers)
    module.prepare_teachers()
    module.train()
    opt = module.configure_optimizers()["optimizer"]
    size = int(cfg.student.img_size)
    grid, mode = module.student.grid_for(size, size), cfg.distill.resample_mode
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = {p: 0.0 for p in PARTS}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        x = images.to(device, non_blocking=True).float().div_(255.0)
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            targets = module.targets({"images": x})
        _sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            for n in module.teacher_names:
                y = resample_grid(targets[n][1], grid, mode).flatten(1, 2)  # [B, h*w, C]
                module.normalizers[n].step(y, step)
        _sync(device)
        t2 = time.perf_counter()
        with autocast:
            out = module.student.heads(*module.student.forward_trunk(x))
            loss, _ = module._terms(out, targets, None, teacher_space=False)
        loss.backward()
        _sync(device)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t4 = time.perf_counter()
        if step >= warmup:
            for part, (a, b) in zip(PARTS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True):
                times[part] += b - a
    step_s = sum(times.values()) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's peak resident memory (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    flops = 3 * trunk_flops_per_image(module) * batch / step_s
    del module, teachers, opt, targets, out, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "batch": batch,
        "images_s": batch / step_s,
        "step_ms": 1000 * step_s,
        **{f"{p}_ms": 1000 * times[p] / steps for p in PARTS},
        "peak_gib": peak,
        "student_tflops": flops / 1e12,
    }


def measure(cfg: Any, device: torch.device, batch: int, steps: int, warmup: int) -> dict[str, Any] | None:
    """``run_case``, or None when the batch does not fit in device memory."""
    try:
        return run_case(cfg, device, batch, steps, warmup)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return None


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", default=["32", "max"], help="sizes, 'max' last")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random teachers and student (CPU tests)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default="experiments/results/bench_gpu")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of conf/train.yaml")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = [int(b) for b in args.batch_sizes if b != "max"]
    search = "max" in args.batch_sizes
    if not sizes or any(b < 1 for b in sizes):
        parser.error(f"--batch-sizes needs at least one positive size before 'max', got {args.batch_sizes}")
    base = [*(TINY if args.tiny else PAPER), *args.overrides]
    modes = [("eager", "distill.compile=[]")]
    if not args.no_compile and device.type == "cuda":
        modes.append(("compiled", "distill.compile=[teachers,student]"))
    peak = peak_tflops(device, args.peak_tflops)
    rows: list[dict[str, Any]] = []
    for mode, choice in modes:
        cfg = config([*base, choice])
        for b in sizes:
            res = measure(cfg, device, b, args.steps, args.warmup)
            if res is None:
                print(f"[bench_gpu] {mode} batch {b}: out of memory")
                continue
            rows.append({"mode": mode, **res})
        if search and rows and rows[-1]["mode"] == mode:
            b = rows[-1]["batch"] * 2
            while (res := measure(cfg, device, b, args.steps, args.warmup)) is not None:
                rows.append({"mode": mode, **res, "largest": True})
                b *= 2
            print(f"[bench_gpu] {mode}: batch {b} does not fit")
    for r in rows:
        r["mfu"] = r["student_tflops"] / peak if peak else None
        r["statistics_share"] = r["statistics_ms"] / r["step_ms"]
    header = ["mode", "batch", "images/s", "step ms", *(f"{p} ms" for p in PARTS)]
    header += ["statistics share", "peak GiB", "student TFLOP/s", "MFU"]
    table = markdown_table(
        header,
        [
            [
                r["mode"],
                str(r["batch"]),
                f"{r['images_s']:.1f}",
                f"{r['step_ms']:.1f}",
                *(f"{r[f'{p}_ms']:.1f}" for p in PARTS),
                f"{r['statistics_share']:.1%}",
                f"{r['peak_gib']:.2f}",
                f"{r['student_tflops']:.3g}",
                "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
            ]
            for r in rows
        ],
    )
    what = (
        "tiny random models" if args.tiny else "PHI-S teachers (random weights) + ViT-B/16 student at 256 px"
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    memory = "torch peak allocated" if device.type == "cuda" else "process peak RSS"
    text = (
        f"# Training step on one device: {what}\n\n"
        f"Device: {name}; {args.steps} timed steps after {args.warmup} warm-up; bf16 autocast on CUDA; "
        f"peak memory: {memory}; MFU against {peak or 'n/a'} TFLOP/s (student trunk FLOPs).\n"
        f"Overrides: {' '.join(base)}\n\n{table}\n"
    )
    print(text)
    atomic_write_text(Path(f"{args.out}.md"), text)
    atomic_write_text(Path(f"{args.out}.yaml"), OmegaConf.to_yaml({"rows": rows}))
    return rows


if __name__ == "__main__":
    main()
