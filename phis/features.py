"""Student features of an image folder or WebDataset shards, to disk:
``python -m phis.features MODEL SOURCE OUT``.

MODEL is anything ``phis.load`` reads (an exported directory, a run directory, a ``.ckpt``). SOURCE is
an image folder (every image below it, in sorted order; key: the path relative to the folder) or shard
URLs as training reads them (brace patterns, several joined with ``::``; key: each sample's
``__key__``). Each image is resized on its short side to ``--size`` (default: the student's training
size) and centre-cropped, as training and the held-out sets do.

OUT receives numbered shards ``features-00000.safetensors`` (or ``.npz``), each covering the next
``--shard-size`` input images, with arrays

- ``summary`` ``[n, D]``: the student's summary token; ``spatial``: its patch features, mean-pooled
  ``[n, D]`` (``--spatial mean``), whole ``[n, D, h, w]`` (``full``) or absent (``none``);
- with ``--teachers``, ``teachers/<name>/summary`` and ``teachers/<name>/features`` (pooled like
  ``spatial``) in that teacher's space;
- ``index`` ``[n]``: each row's position in the input order; the keys are the ``keys`` array of an npz
  and the ``keys`` metadata (JSON) of a safetensors file.

``manifest.json`` records the settings and every finished shard with the images it skipped (undecodable
files or samples are counted, logged and left out, never fatal). A rerun with the same settings
continues after the last finished shard; ``read_features(OUT)`` gathers all shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from phis.images import DECODE_MODES, decode_crop, list_images
from phis.model import PhisModel
from phis.results import atomic_write_json, read_json
from phis.shards import _Skips, decode_sample, expand_urls, shard_samples

log = logging.getLogger(__name__)

SPATIAL = ("mean", "full", "none")
FORMATS = ("safetensors", "npz")
DTYPES = ("float32", "float16")
MANIFEST = "manifest.json"
MAX_LISTED_SKIPS = 100  # per shard; the count is always complete


@dataclass(frozen=True)
class FeatureSettings:
    """What decides the content of the output; a resumed extraction must use the same."""

    model: str
    source: str
    size: int
    spatial: str = "mean"
    teachers: tuple[str, ...] = ()
    format: str = "safetensors"
    shard_size: int = 4096
    dtype: str = "float32"
    decode: str = "reduced"  # phis.images.DECODE_MODES, as training decodes

    def __post_init__(self) -> None:
        for key, value, choices in (
            ("spatial", self.spatial, SPATIAL),
            ("format", self.format, FORMATS),
            ("dtype", self.dtype, DTYPES),
            ("decode", self.decode, DECODE_MODES),
        ):
            if value not in choices:
                raise ValueError(f"{key}={value!r} is not valid; choose one of {choices}")
        if self.shard_size < 1 or self.size < 1:
            raise ValueError(f"shard_size and size must be positive, got {self.shard_size}, {self.size}")


Item = tuple[str, Callable[[], Tensor]]  # key, and how to decode it into uint8 [3, S, S]


def _folder_items(root: Path, size: int, decode: str) -> Iterator[Item]:
    for path in list_images(root, recursive=True):
        yield path.relative_to(root).as_posix(), (lambda p=path: decode_crop(p, size, decode))


def _shard_items(urls: Sequence[str], size: int, decode: str, skips: _Skips) -> Iterator[Item]:
    for url in urls:
        for sample in shard_samples(url, skips):
            yield str(sample.get("__key__")), (lambda s=sample: decode_sample(s, size, decode))


def source_items(
    source: str, size: int, skips: _Skips, decode: str = "reduced"
) -> tuple[Iterator[Item], int | None]:
    """The input images of ``source`` in order (decoded as training decodes them: ``decode`` is a
    ``phis.images.DECODE_MODES`` entry), and their number when known (a folder)."""
    if os.path.isdir(source):
        files = list_images(Path(source), recursive=True)
        if not files:
            raise FileNotFoundError(f"no images under {source}")
        return _folder_items(Path(source), size, decode), len(files)
    urls = expand_urls(source)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if len(local) == len(urls) and not any(os.path.exists(u) for u in urls):
        raise FileNotFoundError(f"{source!r} is neither an image folder nor existing shard files")
    return _shard_items(urls, size, decode, skips), None


def _decode(item: Item) -> Tensor | Exception:
    try:
        return item[1]()
    except Exception as err:  # any undecodable image is skipped, whatever the decoder raises
        return err


def _pool(x: Tensor, spatial: str) -> Tensor:
    return x.float().mean((2, 3)) if spatial == "mean" else x.float()


@torch.inference_mode()
def batch_features(model: PhisModel, images: Tensor, settings: FeatureSettings) -> dict[str, Tensor]:
    """Arrays of one batch of float images in [0, 1] (names as in the module docstring)."""
    tokens, grid = model.encode(images)
    summary, spatial = model.backbone_output(tokens, grid)
    out = {"summary": summary.float()}
    if settings.spatial != "none":
        out["spatial"] = _pool(spatial, settings.spatial)
    for name, o in model.teacher_outputs(tokens, grid, settings.teachers).items():
        if o.summary is not None:
            out[f"teachers/{name}/summary"] = o.summary.float()
        if settings.spatial != "none":
            out[f"teachers/{name}/features"] = _pool(o.features, settings.spatial)
    return out


def _write_shard(path: Path, arrays: dict[str, np.ndarray], keys: list[str], fmt: str) -> None:
    """Write one shard so that a crash leaves either nothing or the whole file."""
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "npz":
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype=str), **arrays)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(tmp), metadata={"keys": json.dumps(keys)})
    os.replace(tmp, path)


def _start(out: Path, settings: FeatureSettings) -> dict[str, Any]:
    """The manifest to continue (same settings) or a new one; other settings are an error."""
    path = out / MANIFEST
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out} holds files but no {MANIFEST}; choose an empty output directory")
        return {"settings": asdict(settings), "shards": [], "complete": False}
    manifest = read_json(path)
    before = {**manifest["settings"], "teachers": tuple(manifest["settings"]["teachers"])}
    changed = {k: (before.get(k), v) for k, v in asdict(settings).items() if before.get(k) != v}
    if changed:
        raise ValueError(
            f"{out} holds features made with other settings ({changed}: before vs now); use those settings "
            "to continue, or another output directory"
        )
    return manifest


def extract(
    model: PhisModel,
    settings: FeatureSettings,
    out: str | Path,
    batch_size: int = 64,
    workers: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the features of ``settings.source`` into ``out`` (continuing a partial run); returns the
    manifest."""
    from tqdm import tqdm

    out = Path(out)
    manifest = _start(out, settings)
    if manifest["complete"]:
        log.info("%s is complete (%d shards)", out, len(manifest["shards"]))
        return manifest
    unknown = [t for t in settings.teachers if t not in model.teacher_names]
    if unknown:
        raise ValueError(f"unknown teacher(s) {unknown}; this student has {model.teacher_names}")
    if settings.size % model.patch_size:
        near = model.get_nearest_supported_resolution(settings.size, settings.size).height
        raise ValueError(
            f"size={settings.size} is not a multiple of the patch size {model.patch_size}; e.g. {near}"
        )
    out.mkdir(parents=True, exist_ok=True)
    dev = model.pos_table.device
    skips = _Skips()
    items, total = source_items(settings.source, settings.size, skips, settings.decode)
    done = sum(s["items"] for s in manifest["shards"])
    items = islice(items, done, None)
    bar = tqdm(total=total, initial=done, unit="img", disable=not progress, desc="features")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        while True:
            shard = list(islice(items, settings.shard_size))
            if not shard:
                break
            index = len(manifest["shards"])
            keys, rows, parts, skipped = [], [], [], []
            for i in range(0, len(shard), batch_size):
                chunk = shard[i : i + batch_size]
                good = []
                for j, (item, image) in enumerate(zip(chunk, pool.map(_decode, chunk))):
                    if isinstance(image, Exception):
                        skips(f"image {item[0]!r}", image)
                        skipped.append({"key": item[0], "error": f"{type(image).__name__}: {image}"})
                    else:
                        good.append((done + i + j, item[0], image))
                if good:
                    images = torch.stack([g[2] for g in good]).to(dev).float() / 255.0
                    arrays = batch_features(model, images, settings)
                    parts.append({k: v.to(getattr(torch, settings.dtype)).cpu() for k, v in arrays.items()})
                    rows += [g[0] for g in good]
                    keys += [g[1] for g in good]
                bar.update(len(chunk))
            entry: dict[str, Any] = {"file": None, "first": done, "items": len(shard), "written": len(keys)}
            if keys:
                arrays = {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}
                arrays["index"] = np.asarray(rows, dtype=np.int64)
                name = f"features-{index:05d}.{'npz' if settings.format == 'npz' else 'safetensors'}"
                _write_shard(out / name, arrays, keys, settings.format)
                entry["file"] = name
            entry["skipped"] = len(skipped)
            entry["skipped_items"] = skipped[:MAX_LISTED_SKIPS]
            manifest["shards"].append(entry)
            done += len(shard)
            atomic_write_json(out / MANIFEST, manifest)
    bar.close()
    manifest["complete"] = True
    manifest["images"] = done
    manifest["written"] = sum(s["written"] for s in manifest["shards"])
    manifest["skipped"] = sum(s["skipped"] for s in manifest["shards"])
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def read_features(out: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """All keys and arrays of a feature directory, shards concatenated in input order."""
    out = Path(out)
    keys: list[str] = []
    parts: dict[str, list[np.ndarray]] = {}
    for shard in read_json(out / MANIFEST)["shards"]:
        if shard["file"] is None:
            continue
        path = out / shard["file"]
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                keys += [str(k) for k in f["keys"]]
                arrays = {k: f[k] for k in f.files if k != "keys"}
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                keys += json.loads(f.metadata()["keys"])
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    return keys, {k: np.concatenate(v) for k, v in parts.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m phis.features MODEL SOURCE OUT [options]``; returns the manifest."""
    import phis

    parser = argparse.ArgumentParser(description="Write student features of images to disk (phis.features).")
    parser.add_argument("model", help="exported model directory, run directory or .ckpt")
    parser.add_argument("source", help="image folder, or shard URLs (brace patterns, joined with ::)")
    parser.add_argument("out", type=Path, help="output directory (rerun the same command to continue)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the training size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--spatial", choices=SPATIAL, default="mean", help="patch features: mean-pooled, all, none"
    )
    parser.add_argument("--teachers", default="", help="comma-separated teacher names, or 'all'")
    parser.add_argument("--format", choices=FORMATS, default="safetensors")
    parser.add_argument("--shard-size", type=int, default=4096, help="input images per output shard")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument(
        "--decode", choices=DECODE_MODES, default="reduced", help="JPEG decoding, as data.decode in training"
    )
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = phis.load(args.model, map_location=args.device)
    teachers = model.teacher_names if args.teachers == "all" else [t for t in args.teachers.split(",") if t]
    settings = FeatureSettings(
        model=str(Path(args.model).resolve()) if os.path.exists(args.model) else args.model,
        source=args.source,
        size=args.size or model.img_size,
        spatial=args.spatial,
        teachers=tuple(teachers),
        format=args.format,
        shard_size=args.shard_size,
        dtype=args.dtype,
        decode=args.decode,
    )
    manifest = extract(model, settings, args.out, args.batch_size, args.workers, not args.no_progress)
    print(
        f"{manifest['written']} of {manifest['images']} images written to {args.out}; {manifest['skipped']} "
        f"could not be decoded (listed in {args.out / MANIFEST})"
    )
    return manifest


if __name__ == "__main__":
    main()
