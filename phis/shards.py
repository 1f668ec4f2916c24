"""WebDataset shards (img2dataset layout) as a deterministic, resumable stream of training batches.

A shard is a tar file of samples ``<key>.jpg|jpeg|png|webp`` with optional ``<key>.txt``/``<key>.json``
(ignored here: distillation needs no labels). URL lists are brace-expanded and several lists may be
joined with ``::`` (``/data/a-{00000..00999}.tar::/data/b-{0000..0099}.tar``); any URL ``webdataset``
opens works (local paths, ``pipe:`` commands, http).

The stream is cut into virtual epochs of ``epoch_steps`` batches per rank. Every batch is a function of
(seed, epoch, rank, lane, position), never of the process that happens to produce it, so a run that
resumes at global step s replays exactly the batches an uninterrupted run sees from s on:

- lanes: with W dataloader workers, step s of epoch k (steps kE..kE+E-1) belongs to lane (s - kE) mod W,
  whichever worker serves it; rank r's lane l is stream unit r·W + l of R·W units;
- shards: ``resampled`` units draw shards with replacement from all shards (any number of units, the
  usual choice for step-based training); otherwise each pass permutes all shards the same way on every
  unit and unit u takes every (R·W)-th shard from u, so one pass sees every sample exactly once;
- samples: a shuffle buffer per unit; batches are ``batch_size`` consecutive buffer outputs. Resuming
  mid-epoch skips the raw (undecoded) batches that were already trained on.

Images are decoded to the stream's size by ``phis.images`` (reduced-scale JPEG decoding unless
``decode="exact"``). Undecodable samples and unreadable shards are skipped, counted and logged, never
fatal; a batch keeps its decodable images (it is smaller by the skipped ones, so the positions of later
batches never move).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from phis.images import check_decode, decode_crop, decode_jpegs, list_images

log = logging.getLogger(__name__)

SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DECODE_DEVICES = ("cpu", "cuda")
MAX_EMPTY_SHARDS = 8  # consecutive shards without a sample before a stream gives up


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern (several joined with ``::``) or a list of such patterns."""
    from webdataset.shardlists import expand_urls as wds_expand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = [u for p in patterns for u in wds_expand(str(p)) if u]
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}; give e.g. data.urls=/data/shards-{{00000..00099}}.tar")
    return out


def decode_sample(sample: dict[str, Any], size: int, decode: str = "reduced") -> Tensor:
    """The image of one shard sample as uint8 ``[3, S, S]`` (``phis.images.decode_crop``); raises
    ValueError when there is none."""
    ext = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
    if ext is None:
        keys = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"sample has no image (.{'/.'.join(SHARD_IMAGE_KEYS)}), only {keys}")
    return decode_crop(io.BytesIO(sample[ext]), size, decode)


class _Skips:
    """Counts and logs what a stream had to skip (per process: each dataloader worker has its own)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, what: str, err: BaseException) -> None:
        self.count += 1
        log.warning(
            "skipped %s: %s: %s (%d skipped by this process)", what, type(err).__name__, err, self.count
        )

    def handler(self, err: BaseException) -> bool:
        """webdataset exception handler: count, log, continue."""
        self(f"unreadable shard data ({err.args[-1] if err.args else '?'})", err)
        return True


def shard_samples(url: str, skips: _Skips) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (``__key__``, ``__url__`` and one bytes entry per file extension)."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        stream = gopen(url)
    except Exception as err:  # a missing or unreachable shard is skipped like a corrupt one
        skips(f"shard {url}", err)
        return
    with stream:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream, handler=skips.handler))
        try:
            yield from group_by_keys(files, handler=skips.handler)
        except Exception as err:  # e.g. a damaged tar header: the rest of this shard is lost
            skips(f"the rest of shard {url}", err)


def shuffled(samples: Iterator[Any], buffer: int, rng: np.random.Generator) -> Iterator[Any]:
    """Buffer shuffle: each new sample replaces a uniformly drawn buffered one, which is emitted."""
    if buffer <= 1:
        yield from samples
        return
    pool: list[Any] = []
    for s in samples:
        if len(pool) < buffer:
            pool.append(s)
            continue
        j = int(rng.integers(buffer))
        yield pool[j]
        pool[j] = s
    for j in rng.permutation(len(pool)):
        yield pool[j]


class ShardStream(IterableDataset):
    """Batches of uint8 images ``[B, 3, S, S]`` from WebDataset shards (see the module docstring).

    ``epoch_steps=None`` makes one pass (not resampled) over this unit's shards and ends; otherwise
    every iteration runs from the start step set by ``place`` to the end of that virtual epoch. Each
    batch is ``{"images": uint8 [B, 3, S, S], "keys": [B keys], "skipped": samples dropped from it}``.

    ``decode`` is a ``phis.images.DECODE_MODES`` mode. ``decode_device="cuda"`` decodes the JPEGs on the
    GPU instead (in full, with nvJPEG; other formats on the CPU) and yields CUDA batches; CUDA cannot
    start in forked loader workers, so that stream runs in the training process (no workers).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        size: int,
        batch_size: int,
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        epoch_steps: int | None = 1000,
        decode: str = "reduced",
        decode_device: str = "cpu",
    ) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"size and batch_size must be positive, got {size}, {batch_size}")
        if epoch_steps is not None and epoch_steps < 1:
            raise ValueError(f"epoch_steps must be positive or None (one pass), got {epoch_steps}")
        if epoch_steps is None and resampled:
            raise ValueError("a resampled stream never ends; give epoch_steps or set resampled=false")
        self.urls = expand_urls(urls)
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        self.resampled, self.shuffle_buffer = bool(resampled), int(shuffle_buffer)
        self.epoch_steps = epoch_steps
        self.decode, self.decode_device = check_decode(decode), decode_device
        if decode_device not in DECODE_DEVICES:
            raise ValueError(
                f"unknown decode_device {decode_device!r}; choose one of {', '.join(DECODE_DEVICES)}"
            )
        if decode_device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "decode_device=cuda decodes JPEGs on the GPU, but torch sees no CUDA device here; "
                "use decode_device=cpu (data.decode_device=cpu)"
            )
        self.rank, self.world_size, self.start_step = 0, 1, 0
        self.stop_step: int | None = None

    def place(
        self, rank: int = 0, world_size: int = 1, start_step: int = 0, stop_step: int | None = None
    ) -> None:
        """Set this rank's place in the data-parallel group, the step the next iteration starts at and,
        if given, the step it stops before even within a virtual epoch (the end of a training stage)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.rank, self.world_size, self.start_step = int(rank), int(world_size), int(start_step)
        self.stop_step = stop_step

    def __len__(self) -> int:
        """Batches per virtual epoch on each rank."""
        if self.epoch_steps is None:
            raise TypeError("a one-pass shard stream has no length known in advance")
        return self.epoch_steps

    def _shard_order(self, epoch: int, unit: int, units: int) -> Iterator[str]:
        """Endless shard URLs of one unit in one virtual epoch."""
        n = len(self.urls)
        if self.resampled:
            rng = np.random.default_rng([self.seed, epoch, unit, 0])
            while True:
                yield self.urls[int(rng.integers(n))]
        if n < units:
            raise ValueError(
                f"{n} shards cannot be split over {units} readers ({self.world_size} ranks x workers) "
                "without duplicates; use more shards, fewer workers, or resampled=true"
            )
        cycle = 0
        while True:
            for i in np.random.default_rng([self.seed, epoch, cycle]).permutation(n)[unit::units]:
                yield self.urls[int(i)]
            if self.epoch_steps is None:
                return
            cycle += 1

    def _samples(self, epoch: int, unit: int, units: int, skips: _Skips) -> Iterator[dict[str, Any]]:
        """Raw samples of one unit's shards; a run of unreadable shards means the URLs are wrong."""
        empty = 0
        for url in self._shard_order(epoch, unit, units):
            got = False
            for s in shard_samples(url, skips):
                got = True
                yield s
            empty = 0 if got else empty + 1
            if empty == MAX_EMPTY_SHARDS:
                raise RuntimeError(
                    f"{empty} shards in a row gave no samples (the last: {url}); check data.urls "
                    f"({self.urls[0]} ... {self.urls[-1]}, {len(self.urls)} shards)"
                )

    def _raw_batches(self, epoch: int, unit: int, units: int, skips: _Skips) -> Iterator[list[dict]]:
        """Undecoded batches of one unit: shards in order, buffer-shuffled samples, ``batch_size`` each."""
        samples = self._samples(epoch, unit, units, skips)
        rng = np.random.default_rng([self.seed, epoch, unit, 1])
        batch: list[dict] = []
        for s in shuffled(samples, self.shuffle_buffer, rng):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _crops(self, raw: list[dict]) -> list[Tensor | Exception]:
        """Each sample's image at this stream's size, or the error that kept it from decoding."""
        crops: dict[int, Tensor | Exception] = {}
        jpegs: dict[int, bytes] = {}  # decoded together on the GPU with decode_device=cuda
        for i, s in enumerate(raw):
            jpeg = next((s[k] for k in ("jpg", "jpeg") if k in s), None)
            if self.decode_device == "cuda" and jpeg is not None:
                jpegs[i] = jpeg
                continue
            try:
                crops[i] = decode_sample(s, self.size, self.decode).to(self.decode_device)
            except Exception as err:  # a broken image must not end a days-long run
                crops[i] = err
        if jpegs:
            crops.update(zip(jpegs, decode_jpegs(list(jpegs.values()), self.size, self.decode_device)))
        return [crops[i] for i in range(len(raw))]

    def _decode(self, raw: list[dict], skips: _Skips) -> dict[str, Any] | None:
        images, keys = [], []
        for s, crop in zip(raw, self._crops(raw)):
            if isinstance(crop, Exception):
                skips(f"sample {s.get('__key__')!r} of {s.get('__url__')}", crop)
                continue
            images.append(crop)
            keys.append(s["__key__"])
        if not images:
            return None
        return {"images": torch.stack(images), "keys": keys, "skipped": len(raw) - len(images)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and self.decode_device == "cuda":
            raise RuntimeError(
                "decode_device=cuda decodes in the training process (CUDA cannot start in forked loader "
                "workers); set data.num_workers=0"
            )
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = self.world_size * workers
        skips = _Skips()
        if self.epoch_steps is None:
            for raw in self._raw_batches(0, self.rank * workers + worker, units, skips):
                if (batch := self._decode(raw, skips)) is not None:
                    yield batch
            return
        e = self.epoch_steps
        epoch = self.start_step // e
        # This worker serves steps start + worker, start + worker + W, ... up to the epoch's end.
        offset = self.start_step + worker - epoch * e
        end = e if self.stop_step is None else min(e, self.stop_step - epoch * e)
        if offset >= end:
            return
        lane, skip = offset % workers, offset // workers
        todo = len(range(offset, end, workers))
        raw_batches = self._raw_batches(epoch, self.rank * workers + lane, units, skips)
        for _ in range(skip):
            next(raw_batches)
        while todo:
            batch = self._decode(next(raw_batches), skips)
            if batch is None:  # only when every sample of a batch is broken: take the lane's next batch
                continue
            todo -= 1
            yield batch


class StreamLoader(DataLoader):
    """DataLoader of a ``ShardStream`` that starts every iteration at the trainer's current step.

    Workers are started anew per iteration (not persistent) so each one receives the start step.
    """

    def __init__(
        self, stream: ShardStream, step_source: Callable[[], int], num_workers: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False, **kwargs)
        self.step_source = step_source

    def __iter__(self):  # noqa: ANN204 - DataLoader's own iterator type
        stream = self.dataset
        stream.place(stream.rank, stream.world_size, self.step_source())
        return super().__iter__()


class HeldoutImages(Dataset):
    """A small, named held-out set: the first ``limit`` images of shards (URL order) or of a folder.

    Images are decoded once (``decode``: a ``phis.images.DECODE_MODES`` mode), on first access, and kept
    in memory as uint8 ``[N, 3, S, S]``.
    """

    def __init__(
        self,
        source: str | Sequence[str],
        size: int,
        limit: int = 1024,
        name: str = "heldout",
        decode: str = "reduced",
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self.source, self.size, self.limit, self.name = source, int(size), int(limit), name
        self.decode = check_decode(decode)
        self._images: Tensor | None = None

    def _load(self) -> Tensor:
        skips, images = _Skips(), []
        if isinstance(self.source, str) and os.path.isdir(self.source):
            root = Path(self.source)
            for path in list_images(root, recursive=True):
                try:
                    images.append(decode_crop(path, self.size, self.decode))
                except Exception as err:
                    skips(f"image {path}", err)
                if len(images) == self.limit:
                    break
        else:
            for url in expand_urls(self.source):
                for s in shard_samples(url, skips):
                    try:
                        images.append(decode_sample(s, self.size, self.decode))
                    except Exception as err:
                        skips(f"sample {s.get('__key__')!r} of {url}", err)
                    if len(images) == self.limit:
                        break
                if len(images) == self.limit:
                    break
        if not images:
            raise FileNotFoundError(f"held-out set {self.name!r}: no decodable images in {self.source!r}")
        where = (
            self.source
            if isinstance(self.source, str)
            else f"{self.source[0]} ... ({len(self.source)} shards)"
        )
        log.info("held-out set %r: %d images from %s", self.name, len(images), where)
        return torch.stack(images)

    @property
    def images(self) -> Tensor:
        """All items as uint8 ``[N, 3, S, S]`` (decoded on first use)."""
        if self._images is None:
            self._images = self._load()
        return self._images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        """Float ``[3, S, S]`` in [0, 1]."""
        return self.images[index].float() / 255.0
