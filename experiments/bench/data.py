"""Data path benchmark: the project's JPEG decoding and shard loader against open_clip_train's, on the
same shards, in one run.

    python -m experiments.bench.data                         # 5 repeats at 256 and 1,024 px
    python -m experiments.bench.data --quick --out /tmp/b    # seconds: a handful of images, one repeat

Shards: JPEGs (quality 95, 4:2:0 chroma, as img2dataset writes them) of 384–1,024 px a side, cut from
the offline photos (``phis.data.SOURCES``) at random aspect ratios and resized, with a caption each.

(a) Decode: the bytes of every image to the crop, one process, one thread, in turn:
- ours, ``decode=reduced`` (the default) and ``decode=exact``: ``phis.shards.decode_sample``;
- open_clip: webdataset's ``pilrgb`` decoder, as open_clip_train's pipeline calls it, then
  ``open_clip.transform.image_transform(size, is_train=False)`` (resize, centre crop, to tensor,
  normalize);
- with CUDA, ours with ``decode_device=cuda`` (``phis.images.decode_jpegs``, batches of 32).
Each also gets its mean and max |pixel difference| (in 1/255 levels) to the exact reference: full
decode, one bicubic resize of the whole image, centre crop (open_clip's pixels before its normalize).

(b) Loader: batches through DataLoader workers. Ours: ``phis.shards.ShardStream`` (resampled, shuffle
buffer 1,000) in ``phis.shards.StreamLoader``; open_clip: ``open_clip_train.data.get_wds_dataset``
(resampled, its shuffle buffer of 5,000 with 1,000 initial, training transform
``image_transform(size, is_train=True)``; a caption passed through for the tokenizer). Images/s are
counted after the first 2·workers batches (worker start and prefetch), per worker: one core each.

Both parts run at the student size and the high-resolution partition's; every figure is the median of
``--repeats`` repeats, pipelines interleaved within a repeat so load changes hit them alike. Writes
<out>.json (every repeat), <out>.md and <out>.csv, with the CPU, the date and the load average.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image, features

from phis.images import decode_jpegs
from phis.photos import SOURCES, load_source
from phis.results import atomic_write_json, atomic_write_text, markdown_table
from phis.shards import ShardStream, StreamLoader, decode_sample

SIDES = (384, 1024)  # pixels a side of the benchmark JPEGs, inclusive
QUALITY = 95
PER_SHARD = 64
BASELINE = "open_clip"
BOUND = 2.0  # mean |pixel difference| to the exact reference the reduced path must stay within (levels)
TARGET = 1.5  # decode speed over open_clip's the reduced path must reach at the student size


def bench_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of 384–1,024 px a side: random crops of the offline photos, resized to size."""
    rng = np.random.default_rng(seed)
    names = list(SOURCES)
    out = []
    for i in range(count):
        photo = load_source(names[i % len(names)])
        height, width = photo.shape[:2]
        w, h = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
        # The largest crop of the target's aspect ratio, then 70-100 % of it at a random position.
        cw, ch = (width, width * h / w) if width * h / w <= height else (height * w / h, height)
        f = rng.uniform(0.7, 1.0)
        cw, ch = max(1, round(cw * f)), max(1, round(ch * f))
        x, y = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
        image = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=QUALITY)
        out.append(buf.getvalue())
    return out


def write_bench_shards(folder: Path, jpegs: Sequence[bytes]) -> str:
    """img2dataset-style shards (``.jpg`` + ``.txt``) of ``jpegs``; their brace-pattern URL."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-len(jpegs) // PER_SHARD)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"bench-{s:05d}.tar")) as sink:
            for n in range(s * PER_SHARD, min(len(jpegs), (s + 1) * PER_SHARD)):
                sink.write({"__key__": f"{n:06d}", "jpg": jpegs[n], "txt": f"photo {n}"})
    return str(folder / f"bench-{{00000..{shards - 1:05d}}}.tar")


def open_clip_decoders(size: int) -> tuple[Callable[[bytes], Any], Callable[[bytes], torch.Tensor]]:
    """open_clip's per-image work (webdataset ``pilrgb`` decode + its evaluation transform), and the
    same without the final normalize, as uint8 ``[3, S, S]`` pixels."""
    from open_clip.transform import image_transform
    from torchvision.transforms import Compose
    from webdataset.autodecode import imagehandler

    pilrgb = imagehandler("pilrgb")
    transform = image_transform(size, is_train=False)
    unnormalized = Compose(transform.transforms[:-1])

    def full(data: bytes) -> Any:
        return transform(pilrgb("jpg", data))

    def pixels(data: bytes) -> torch.Tensor:
        return (unnormalized(pilrgb("jpg", data)) * 255).round().to(torch.uint8)

    return full, pixels


def _ours(decode: str, size: int) -> Callable[[bytes], torch.Tensor]:
    return lambda data: decode_sample({"jpg": data}, size, decode)


def _cuda_batches(size: int) -> Callable[[Sequence[bytes]], list[torch.Tensor]]:
    def run(jpegs: Sequence[bytes]) -> list[torch.Tensor]:
        out = [t for i in range(0, len(jpegs), 32) for t in decode_jpegs(jpegs[i : i + 32], size)]
        torch.cuda.synchronize()
        return out

    return run


def _difference(crops: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Mean and max |difference| in levels over every pixel of every image."""
    diffs = [(a.to(torch.int16) - b.to(torch.int16)).abs() for a, b in zip(crops, reference)]
    total = sum(int(d.sum()) for d in diffs)
    return total / sum(d.numel() for d in diffs), max(int(d.max()) for d in diffs)


def bench_decode(jpegs: Sequence[bytes], size: int, repeats: int) -> list[dict[str, Any]]:
    """Part (a) at one size: ms per image of each pipeline (every repeat) and its pixel difference."""
    oc_full, oc_pixels = open_clip_decoders(size)
    one_by_one: dict[str, tuple[Callable, Callable]] = {
        "ours, decode=reduced": (_ours("reduced", size), _ours("reduced", size)),
        "ours, decode=exact": (_ours("exact", size), _ours("exact", size)),
        BASELINE: (oc_full, oc_pixels),
    }
    batched: dict[str, Callable] = {}
    if torch.cuda.is_available():
        batched["ours, decode_device=cuda"] = _cuda_batches(size)
    reference = [_ours("exact", size)(j) for j in jpegs]
    rows = {name: {"size": size, "pipeline": name, "ms": []} for name in [*one_by_one, *batched]}
    for _ in range(repeats):
        for name, (run, _) in one_by_one.items():
            start = time.perf_counter()
            for j in jpegs:
                run(j)
            rows[name]["ms"].append(1000 * (time.perf_counter() - start) / len(jpegs))
        for name, run in batched.items():
            start = time.perf_counter()
            run(jpegs)
            rows[name]["ms"].append(1000 * (time.perf_counter() - start) / len(jpegs))
    for name, (_, pixels) in one_by_one.items():
        rows[name]["mean_diff"], rows[name]["max_diff"] = _difference([pixels(j) for j in jpegs], reference)
    for name, run in batched.items():
        crops = [t.cpu() for t in run(jpegs)]
        rows[name]["mean_diff"], rows[name]["max_diff"] = _difference(crops, reference)
    base = statistics.median(rows[BASELINE]["ms"])
    for row in rows.values():
        row["median_ms"] = statistics.median(row["ms"])
        row["images_s"] = 1000 / row["median_ms"]
        row["vs_open_clip"] = base / row["median_ms"]
    return list(rows.values())


def _loader_rate(loader: Any, workers: int, batches: int) -> float:
    """Images/s of ``loader`` over its batches after the first 2·workers (start-up and prefetch)."""
    skip = 2 * max(1, workers)
    arrivals, counts = [], []
    for i, batch in enumerate(loader):
        arrivals.append(time.perf_counter())
        counts.append(len(batch["images"] if isinstance(batch, dict) else batch[0]))
        if i + 1 == batches:
            break
    if len(arrivals) <= skip + 1:
        raise ValueError(f"{len(arrivals)} batches arrived; need more than {skip + 1} to time the loader")
    return sum(counts[skip + 1 :]) / (arrivals[-1] - arrivals[skip])


def _our_loader(urls: str, size: int, batch: int, workers: int, batches: int) -> Any:
    stream = ShardStream(urls, size, batch, seed=0, resampled=True, shuffle_buffer=1000, epoch_steps=batches)
    return StreamLoader(stream, lambda: 0, num_workers=workers)


def _open_clip_loader(urls: str, size: int, batch: int, workers: int, batches: int) -> Any:
    import open_clip_train.data as oc_data
    from open_clip.transform import image_transform
    from webdataset.tariterators import tar_file_expander

    # webdataset 1.0 ends every shard with an empty marker that open_clip_train's own sample grouping
    # does not expect (KeyError 'fname'); without markers (eof_value=None) it reads shards as it used to.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)

    args = argparse.Namespace(
        train_data=urls,
        train_num_samples=batches * batch,
        dataset_resampled=True,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch,
        world_size=1,
        workers=workers,
    )
    info = oc_data.get_wds_dataset(
        args, image_transform(size, is_train=True), True, tokenizer=lambda text: [text]
    )
    return info.dataloader


def bench_loader(
    urls: str, size: int, batch: int, workers: int, batches: int, repeats: int
) -> list[dict[str, Any]]:
    """Part (b) at one size: images/s of each whole loader (every repeat)."""
    loaders = {"ours, decode=reduced": _our_loader, BASELINE: _open_clip_loader}
    rows = {name: {"size": size, "pipeline": name, "images_s": []} for name in loaders}
    for _ in range(repeats):
        for name, make in loaders.items():
            loader = make(urls, size, batch, workers, batches)
            rows[name]["images_s"].append(_loader_rate(loader, workers, batches))
            del loader  # open_clip's workers persist until their loader goes
            gc.collect()
    base = statistics.median(rows[BASELINE]["images_s"])
    for row in rows.values():
        row["median_images_s"] = statistics.median(row["images_s"])
        row["per_worker"] = row["median_images_s"] / max(1, workers)
        row["vs_open_clip"] = row["median_images_s"] / base
    return list(rows.values())


def machine() -> dict[str, Any]:
    """CPU model, core count, library versions and the date."""
    cpu = platform.processor() or "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.is_file():
        models = [
            ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    turbo = "libjpeg-turbo " if features.check_feature("libjpeg_turbo") else "libjpeg "
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "libjpeg": turbo + str(features.version("jpg")),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _levels(value: float) -> str:
    return f"{value:.2f}/255" if isinstance(value, float) else f"{value}/255"


def report(results: dict[str, Any], out: Path) -> str:
    """Write <out>.json, <out>.csv and <out>.md; the markdown."""
    atomic_write_json(out.with_suffix(".json"), results)
    s, m = results["settings"], results["machine"]
    decode_rows = [
        [
            r["size"],
            r["pipeline"],
            f"{r['median_ms']:.2f}",
            f"{r['images_s']:.0f}",
            f"{r['vs_open_clip']:.2f}x",
            _levels(r["mean_diff"]),
            _levels(r["max_diff"]),
        ]
        for r in results["decode"]
    ]
    loader_rows = [
        [
            r["size"],
            r["pipeline"],
            f"{r['median_images_s']:.0f}",
            f"{r['per_worker']:.0f}",
            f"{r['vs_open_clip']:.2f}x",
        ]
        for r in results["loader"]
    ]
    lines = [
        "### Data path: decoding and the shard loader, ours vs open_clip_train's, on the same shards",
        "",
        f"{s['images']} JPEGs of {SIDES[0]}-{SIDES[1]} px a side (quality {QUALITY}) in {s['shards']} "
        f"shard{'s' if s['shards'] > 1 else ''}; median of {s['repeats']} repeats. Pixel differences are to "
        "the exact reference (full decode, one bicubic resize of the whole image, centre crop), over every "
        "pixel of every image.",
        "",
        "(a) Decode to the crop: one process, one thread.",
        "",
        markdown_table(
            ["px", "pipeline", "ms/image", "images/s per core", "vs open_clip", "mean |diff|", "max |diff|"],
            decode_rows,
        ),
        "",
        f"(b) Whole loader: {s['workers']} workers, batch {s['batch']}, shuffle buffers, collation; images/s "
        "after the first 2·workers batches.",
        "",
        markdown_table(["px", "pipeline", "images/s", "per worker", "vs open_clip"], loader_rows),
        "",
    ]
    for v in results["verdict"]:
        met = "met" if v["met"] else "NOT met"
        lines.append(
            f"- {v['size']} px, decode=reduced: {v['speedup']:.2f}x open_clip's decode per core (goal >= "
            f"{TARGET}x), mean |diff| {_levels(v['mean_diff'])} (goal <= {_levels(BOUND)}): {met}; whole "
            f"loader {v['loader_speedup']:.2f}x."
        )
    load = results["load"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['date']}; torch {m['torch']}, Pillow {m['pillow']} "
        f"({m['libjpeg']}){'; GPU ' + m['cuda'] if m['cuda'] else ''}. Load average (1 min) "
        f"{load[0]:.2f} at the start, {load[1]:.2f} at the end.",
    ]
    if s["note"]:
        lines += ["", s["note"]]
    md = "\n".join(lines) + "\n"
    atomic_write_text(out.with_suffix(".md"), md)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "part",
            "px",
            "pipeline",
            "ms/image",
            "images/s",
            "images/s per core",
            "vs open_clip",
            "mean |diff| (levels)",
            "max |diff| (levels)",
        ]
    )
    for r in results["decode"]:
        writer.writerow(
            [
                "decode",
                r["size"],
                r["pipeline"],
                f"{r['median_ms']:.3f}",
                f"{r['images_s']:.1f}",
                f"{r['images_s']:.1f}",
                f"{r['vs_open_clip']:.3f}",
                f"{r['mean_diff']:.3f}",
                r["max_diff"],
            ]
        )
    for r in results["loader"]:
        writer.writerow(
            [
                "loader",
                r["size"],
                r["pipeline"],
                "",
                f"{r['median_images_s']:.1f}",
                f"{r['per_worker']:.1f}",
                f"{r['vs_open_clip']:.3f}",
                "",
                "",
            ]
        )
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    return md


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both parts at every size; the results as ``report`` writes them."""
    load_start, host = os.getloadavg()[0], machine()
    jpegs = bench_jpegs(args.images, args.seed)
    decode, loader, verdict = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_bench_shards(Path(tmp), jpegs)
        for size, batches in zip(args.sizes, args.batches):
            decode += bench_decode(jpegs, size, args.repeats)
            loader += bench_loader(urls, size, args.batch, args.workers, batches, args.repeats)
            ours = next(r for r in decode if r["size"] == size and r["pipeline"] == "ours, decode=reduced")
            whole = next(r for r in loader if r["size"] == size and r["pipeline"] == "ours, decode=reduced")
            met = ours["vs_open_clip"] >= TARGET and ours["mean_diff"] <= BOUND
            verdict.append(
                {
                    "size": size,
                    "speedup": ours["vs_open_clip"],
                    "mean_diff": ours["mean_diff"],
                    "loader_speedup": whole["vs_open_clip"],
                    "met": met,
                }
            )
    settings = {
        k: getattr(args, k)
        for k in ("images", "repeats", "batch", "workers", "sizes", "batches", "seed", "note")
    }
    settings["shards"] = -(-args.images // PER_SHARD)
    return {
        "machine": host,
        "settings": settings,
        "load": [load_start, os.getloadavg()[0]],
        "decode": decode,
        "loader": loader,
        "verdict": verdict,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of images, small sizes, one repeat")
    parser.add_argument("--images", type=int, help="JPEGs in the shards (default 192; quick: 8)")
    parser.add_argument("--sizes", type=int, nargs="+", help="crop sizes (default 256 1024; quick: 64 128)")
    parser.add_argument(
        "--batches", type=int, nargs="+", help="loader batches per size (default 40 12; quick: 6 6)"
    )
    parser.add_argument("--repeats", type=int, help="repeats of every measurement (default 5; quick: 1)")
    parser.add_argument("--batch", type=int, help="loader batch size (default 32; quick: 4)")
    parser.add_argument("--workers", type=int, help="loader workers (default 2; quick: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a line for the report, e.g. what else ran on the machine")
    parser.add_argument("--out", default="experiments/results/bench_data", help="<out>.md/.json/.csv")
    args = parser.parse_args(argv)
    defaults = (
        {"images": 8, "sizes": [64, 128], "batches": [6, 6], "repeats": 1, "batch": 4, "workers": 1}
        if args.quick
        else {
            "images": 192,
            "sizes": [256, 1024],
            "batches": [40, 12],
            "repeats": 5,
            "batch": 32,
            "workers": 2,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.batches) != len(args.sizes):
        raise ValueError(f"--batches needs one count per size {args.sizes}, got {args.batches}")
    torch.set_num_threads(1)
    results = run(args)
    print(report(results, Path(args.out)))
    return results


if __name__ == "__main__":
    main()
