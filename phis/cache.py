"""Teacher outputs computed once per (teacher config, resolution, image set) and memory-mapped from disk.

Layout of one entry, ``<root>/<teacher name>-<key>/``:

    meta.json      widths, grid, count, the full key material (teacher config, resolution, image set)
    features.npy   [N, h, w, Cf] channels-last, float16 by default (np.load(mmap_mode="r"))
    summary.npy    [N, Cs] (absent for teachers without a summary output, e.g. SAM)
    moments.pt     float64 StreamingMoments of the stored features (for statistics tables and fitting)

The key is a hash of everything that changes the outputs, so changing any of it builds a new entry. An
entry is written into a temporary directory and renamed into place only when complete, so a killed
build leaves no half-written entry behind and two processes building the same entry cannot corrupt it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from phis.stats import StreamingMoments, activation_stats

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DTYPES = ("float16", "float32")


def cache_key(
    teacher_cfg: Mapping[str, Any], resolution: int, image_set: Mapping[str, Any], dtype: str
) -> str:
    """Stable 16-hex-digit hash of everything a cached teacher output depends on."""
    material = {
        "version": CACHE_VERSION,
        "teacher": teacher_cfg,
        "resolution": int(resolution),
        "images": image_set,
        "dtype": dtype,
    }
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _entry_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Exclusive advisory lock on ``path``; yields whether this process holds it. ``wait=False`` does not
    block: it yields False while another process (or open file) holds the lock. Where flock is
    unavailable the lock is a no-op that yields True."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield True
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held elsewhere and wait=False
            yield False
            return
        except OSError:  # e.g. a file system without locks
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_all(
    entries: Sequence[tuple[TeacherCache, Callable[[], Any]]], batch_size: int = 64, num_workers: int = 0
) -> None:
    """``ensure`` every (cache, make_teacher) entry, sharing the work with jobs started alongside.

    Entries another job is building are skipped while free ones remain, so side-by-side jobs (parallel
    lanes, array jobs) build different entries at once instead of queueing on the same lock; when only
    entries held elsewhere are left, this job waits for the first of them and then looks again.
    """
    pending = list(entries)
    while pending:
        left = [(c, mk) for c, mk in pending if not c.ensure(mk, batch_size, num_workers, wait=False).ready]
        if left and len(left) == len(pending):
            cache, make = left.pop(0)
            log.info("teacher cache %s is being built by another job; waiting for it", cache.path)
            cache.ensure(make, batch_size, num_workers)
        pending = left


class TeacherCache:
    """One teacher's outputs over one image set (``images`` must have ``fingerprint()`` and ``size``)."""

    def __init__(
        self,
        root: str | os.PathLike,
        name: str,
        teacher_cfg: Mapping[str, Any],
        images: Dataset,
        dtype: str = "float16",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.name = name
        self.images = images
        self.dtype = dtype
        self.resolution = int(images.size)
        self.material = {
            "teacher": dict(teacher_cfg),
            "resolution": self.resolution,
            "images": images.fingerprint(),
            "dtype": dtype,
        }
        self.key = cache_key(teacher_cfg, self.resolution, self.material["images"], dtype)
        self.root = Path(root)
        self.path = self.root / f"{name}-{self.key}"

    @property
    def ready(self) -> bool:
        """Whether the entry exists on disk (meta.json is written last, so it marks completion)."""
        return (self.path / "meta.json").is_file()

    def ensure(
        self, make_teacher: Callable[[], Any], batch_size: int = 64, num_workers: int = 0, wait: bool = True
    ) -> TeacherCache:
        """Build the entry unless it exists; ``make_teacher`` is only called when a build is needed.

        Jobs started side by side (parallel lanes, array jobs) take an advisory lock per entry, so one
        builds while the others wait and then read it (``wait=False``: return at once, not ready, while
        another job holds the lock; see ``ensure_all``). Where locks are not supported the builds race
        harmlessly: each writes its own temporary directory and the first rename wins.
        """
        if not self.ready:
            locks = self.root / ".locks"
            locks.mkdir(parents=True, exist_ok=True)
            with _entry_lock(locks / self.path.name, wait=wait) as held:
                if not held:
                    return self
                if not self.ready:
                    self.build(make_teacher(), batch_size=batch_size, num_workers=num_workers)
                    return self
        log.info("teacher cache hit: %s", self.path)
        return self

    @torch.no_grad()
    def build(self, teacher: Any, batch_size: int = 64, num_workers: int = 0) -> None:
        """Run ``teacher`` over every image and write the entry atomically (tmp dir, then rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{self.path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        n = len(self.images)
        start = time.perf_counter()
        try:
            feats = summ = None
            moments: StreamingMoments | None = None
            loader = DataLoader(self.images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            done = 0
            device = next(iter(teacher.parameters()), torch.empty(0)).device
            with tqdm(total=n, desc=f"caching teacher {self.name}", unit="img", dynamic_ncols=True) as bar:
                for images in loader:
                    out = teacher(images.to(device))
                    y = out.features.permute(0, 2, 3, 1).to(self.dtype_torch).cpu()  # [b, h, w, C]
                    if feats is None:
                        feats = np.lib.format.open_memmap(
                            tmp / "features.npy", mode="w+", dtype=self.dtype, shape=(n, *y.shape[1:])
                        )
                        moments = StreamingMoments(y.shape[-1], torch.float64)  # exact, built once
                        if out.summary is not None:
                            summ = np.lib.format.open_memmap(
                                tmp / "summary.npy",
                                mode="w+",
                                dtype=self.dtype,
                                shape=(n, out.summary.shape[1]),
                            )
                    self._check_finite(y, "features")
                    feats[done : done + len(y)] = y.numpy()
                    moments.update(y.float())
                    if summ is not None:
                        s = out.summary.to(self.dtype_torch).cpu()
                        self._check_finite(s, "summary")
                        summ[done : done + len(s)] = s.numpy()
                    done += len(y)
                    bar.update(len(y))
            if feats is None:
                raise ValueError(f"cannot cache teacher {self.name!r} over an empty image set")
            feats.flush()
            if summ is not None:
                summ.flush()
            torch.save(moments.state_dict(), tmp / "moments.pt")
            meta = {
                "name": self.name,
                "key": self.key,
                "count": n,
                "feature_dim": int(feats.shape[-1]),
                "summary_dim": None if summ is None else int(summ.shape[1]),
                "grid": [int(feats.shape[1]), int(feats.shape[2])],
                "input_size": getattr(teacher, "input_size", None),
                "patch_size": getattr(teacher, "patch_size", None),
                "build_seconds": round(time.perf_counter() - start, 2),
                **self.material,
            }
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True, default=str)
            del feats, summ
            try:
                os.rename(tmp, self.path)
            except OSError:
                if not self.ready:  # not a lost race with another process building the same entry
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "cached teacher %s over %d images in %.1fs: %s", self.name, n, meta["build_seconds"], self.path
        )

    @property
    def dtype_torch(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def _check_finite(self, t: Tensor, what: str) -> None:
        if not torch.isfinite(t).all():
            hint = " (values overflow float16; set cache.dtype=float32)" if self.dtype == "float16" else ""
            raise FloatingPointError(f"teacher {self.name!r} produced non-finite {what}{hint}")

    def _require_ready(self) -> None:
        if not self.ready:
            raise FileNotFoundError(f"teacher cache {self.path} is not built; call ensure() or build() first")

    @cached_property
    def meta(self) -> dict[str, Any]:
        """The entry's meta.json."""
        self._require_ready()
        with open(self.path / "meta.json") as f:
            return json.load(f)

    @cached_property
    def features(self) -> np.ndarray:
        """Memory-mapped features ``[N, h, w, Cf]``."""
        self._require_ready()
        return np.load(self.path / "features.npy", mmap_mode="r")

    @cached_property
    def summary(self) -> np.ndarray | None:
        """Memory-mapped summaries ``[N, Cs]``, or None when the teacher has none."""
        self._require_ready()
        path = self.path / "summary.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def moments(self) -> StreamingMoments:
        """Float64 moments of all stored feature tokens (computed once, at build time)."""
        self._require_ready()
        m = StreamingMoments(self.meta["feature_dim"], torch.float64)
        m.load_state_dict(torch.load(self.path / "moments.pt", weights_only=True))
        return m

    def activation_stats(self) -> dict[str, float]:
        """PHI-S Table 7/8 statistics of the stored features (see :func:`phis.stats.activation_stats`)."""
        return activation_stats(self.moments())

    @property
    def spec(self) -> dict[str, Any]:
        """What a student needs to know about the teacher: widths and the feature grid."""
        m = self.meta
        return {
            "summary_dim": m["summary_dim"],
            "feature_dim": m["feature_dim"],
            "grid": tuple(m["grid"]),
            "input_size": m["input_size"],
            "patch_size": m["patch_size"],
        }

    def __len__(self) -> int:
        return int(self.meta["count"])

    def item(self, index: int) -> dict[str, Tensor]:
        """Stored outputs of one image: ``features [h, w, Cf]`` and, if any, ``summary [Cs]``."""
        out = {"features": torch.from_numpy(np.array(self.features[index]))}
        if self.summary is not None:
            out["summary"] = torch.from_numpy(np.array(self.summary[index]))
        return out

    def feature_batches(self, batch_size: int = 256) -> Iterator[Tensor]:
        """Stream the stored features in order as float32 ``[b, h, w, Cf]`` chunks."""
        for i in range(0, len(self), batch_size):
            yield torch.from_numpy(np.array(self.features[i : i + batch_size], dtype=np.float32))


# ---------------------------------------------------------------------------------------------------
# Inspecting and clearing the caches: python -m phis.cache [FOLDER ...] [--clear]

# What the runs store in a cache folder: teacher entries (<name>-<key>) and their build leftovers,
# matched-teacher maps, and the self-distillation feature files (conf/selfdistill.yaml's cache_dir).
_ENTRY = re.compile(
    r"^([A-Za-z_]\w*-[0-9a-f]{16}|\.tmp-.+|\.locks|stats_match|selfdistill|resnet34_.+|.+\.npz)$"
)


def default_folders() -> list[Path]:
    """The cache folders of the default configs: ``$PHIS_CACHE_DIR`` (teacher outputs; the feature files
    of the self-distillation study in its ``selfdistill/``), else ``.cache/phis`` and ``.cache/selfdistill``
    under the current directory, where runs started from the repository keep them."""
    env = os.environ.get("PHIS_CACHE_DIR")
    return [Path(env)] if env else [Path(".cache/phis"), Path(".cache/selfdistill")]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """List the entries of the cache folders with their sizes; ``--clear`` removes them. Only what the
    runs write there is touched (anything else in a folder is named and left alone). A removed entry is
    rebuilt by the next run that needs it."""
    parser = argparse.ArgumentParser(prog="python -m phis.cache", description=main.__doc__)
    parser.add_argument("folders", nargs="*", type=Path, help="default: the default configs' cache folders")
    parser.add_argument("--clear", action="store_true", help="remove the listed entries")
    args = parser.parse_args(argv)
    total = 0
    for folder in args.folders or default_folders():
        if not folder.is_dir():
            print(f"{folder}: no cache here")
            continue
        print(f"{folder}:")
        for entry in sorted(folder.iterdir()):
            if not _ENTRY.match(entry.name):
                print(f"  {entry.name}: not a cache entry, left alone")
                continue
            size = _size(entry)
            total += size
            print(f"  {entry.name}  {size / 2**20:.1f} MiB")
            if args.clear and entry.is_dir():
                shutil.rmtree(entry)
            elif args.clear:
                entry.unlink()
    verb = "removed" if args.clear else "in all (--clear removes them)"
    print(f"{total / 2**20:.1f} MiB {verb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
