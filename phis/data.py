"""Label-free image sets and the LightningDataModule that pairs images with (cached) teacher outputs.

Image folders (``ImageFolder``) and held-out sources live here; the offline pool of packaged photos
(``OfflineImagePool``, with its ``val`` and ``test`` levels of held-out data) is in ``phis.photos``.
The data module serves training batches fixed by the global step (``StepBatchSampler``,
``StageBatches``), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, default_collate

from phis.cache import TeacherCache, ensure_all
from phis.images import IMAGE_EXTENSIONS, check_decode, decode_crop, is_image
from phis.photos import OfflineImagePool
from phis.stages import StagePlan, per_rank_batch, rank_batches

log = logging.getLogger(__name__)


class ImageFolder(Dataset):
    """Every image under ``root`` (recursively), resized on the short side and centre-cropped
    (``phis.images.decode_crop``; ``decode``: one of ``phis.images.DECODE_MODES``).

    The held-out split is chosen per file by a hash of its relative path, so it is stable when files are
    added and never shares an image with the training split.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 224,
        split: str = "train",
        val_fraction: float = 0.05,
        decode: str = "reduced",
    ):
        if split not in ("train", "val", "all"):
            raise ValueError(f"unknown split {split!r}; choose one of train, val, all")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.size, self.split, self.val_fraction = int(size), split, float(val_fraction)
        self.decode = check_decode(decode)
        files = sorted(p.relative_to(self.root) for p in self.root.rglob("*") if is_image(p))
        self.files = [f for f in files if split == "all" or (self._is_val(f) == (split == "val"))]
        if not self.files:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r} under {self.root}"
            )

    def _is_val(self, rel: Path) -> bool:
        digest = hashlib.sha1(str(rel).encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.val_fraction

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        """Float ``[3, S, S]`` in [0, 1]."""
        return decode_crop(self.root / self.files[index], self.size, self.decode).float() / 255.0

    def fingerprint(self) -> dict[str, Any]:
        """Root, split and a digest of every file's path, size and modification time."""
        digest = hashlib.sha256()
        for rel in self.files:
            st = (self.root / rel).stat()
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {
            "kind": "image_folder",
            "root": str(self.root),
            "split": self.split,
            "val_fraction": self.val_fraction,
            "size": self.size,
            "decode": self.decode,
            "files": digest.hexdigest(),
        }


class StepBatchSampler(Sampler[list[int]]):
    """Batches fixed by the global step alone, so a run resumed from any checkpoint sees the same data.

    Step g draws batch ``g mod E`` of the shuffle for virtual epoch ``g // E`` (E = steps per epoch),
    the shuffle depending only on (seed, epoch). Each iteration starts at the trainer's current step
    (``step_source``) and ends with that virtual epoch, so resuming mid-epoch needs no loop state.
    Under data parallelism every rank takes its ``batch_size`` slice of the global batch. ``stream``
    keys further shuffles of the same set (a later stage, a high-resolution partition); the first
    stage's main batches use none, as a run without stages always did.
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int = 0,
        step_source: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        stream: Sequence[int] = (),
    ) -> None:
        self.global_batch = batch_size * world_size
        if length < self.global_batch:
            raise ValueError(
                f"training set has {length} images, fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.step_source, self.rank = step_source, rank
        self.stream = tuple(int(k) for k in stream)
        self.steps_per_epoch = length // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """The shuffle of virtual epoch ``epoch`` (of this ``stream``: one per stage and partition)."""
        return np.random.default_rng([self.seed, *self.stream, epoch]).permutation(self.length)

    def batch(self, step: int) -> list[int]:
        """This rank's indices for global step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + self.rank * self.batch_size
        return self.order(epoch)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        first = self.step_source()
        epoch = first // self.steps_per_epoch
        for step in range(first, (epoch + 1) * self.steps_per_epoch):
            yield self.batch(step)

    def __len__(self) -> int:
        return self.steps_per_epoch


class StageBatches(Dataset):
    """Item ``b`` is this rank's whole batch number ``b``, collated: its stage's images (and cached
    targets) at the stage's size and batch, plus ``hires`` (images, and targets of the partition's
    teachers) in a stage with a high-resolution partition.

    ``b`` counts batches (optimizer steps × ``accumulate``); the stage is that of optimizer step
    ``b // accumulate``. Every batch depends only on (seed, b, rank, world size), so a resumed run sees
    the batches an uninterrupted one would, also across stage boundaries.
    """

    def __init__(
        self,
        plan: StagePlan,
        main: Sequence[Dataset],
        hires: Mapping[int, Dataset],
        seed: int = 0,
        rank: int = 0,
        ranks: tuple[int, int] = (1, 1),
        accumulate: int = 1,
    ) -> None:
        self.plan, self.accumulate = plan, accumulate
        nodes, devices = ranks
        world = nodes * devices
        self.samplers: list[tuple[StepBatchSampler, StepBatchSampler | None]] = []
        self.data: list[tuple[Dataset, Dataset | None]] = []
        for i, (stage, (batch, hires_batch)) in enumerate(
            zip(plan.stages, rank_batches(plan, nodes, devices, 1))
        ):
            # The first stage keeps the unkeyed shuffle of a run without stages.
            key = (i, 0) if i else ()
            first = StepBatchSampler(len(main[i]), batch, seed, rank=rank, world_size=world, stream=key)
            second = None
            if stage.hires is not None:
                second = StepBatchSampler(
                    len(hires[i]), hires_batch, seed, rank=rank, world_size=world, stream=(i, 1)
                )
            self.samplers.append((first, second))
            self.data.append((main[i], hires.get(i)))

    def locate(self, b: int) -> tuple[int, int]:
        """(stage index, batch number within the stage) of batch ``b``."""
        index = self.plan.index(b // self.accumulate)
        return index, b - self.plan.stages[index].start * self.accumulate

    def steps_per_epoch(self, b: int) -> int:
        """Batches per virtual epoch of the stage batch ``b`` belongs to."""
        return self.samplers[self.locate(b)[0]][0].steps_per_epoch

    def __len__(self) -> int:
        return self.plan.total_steps * self.accumulate

    def __getitem__(self, b: int) -> dict[str, Any]:
        index, local = self.locate(b)
        (first, second), (images, hires) = self.samplers[index], self.data[index]
        batch = default_collate([images[i] for i in first.batch(local)])
        if second is not None:
            batch["hires"] = default_collate([hires[i] for i in second.batch(local)])
        return batch


class StageSteps(Sampler[int]):
    """Batch numbers from the trainer's current one (``step_source``) to the end of its virtual epoch,
    or of its stage if that comes first: a new stage starts a new epoch (and a new loader iteration)."""

    def __init__(self, batches: StageBatches, step_source: Callable[[], int]) -> None:
        self.batches, self.step_source = batches, step_source

    def _range(self) -> range:
        first = self.step_source()
        index, local = self.batches.locate(first)
        per_epoch = self.batches.steps_per_epoch(first)
        end = first - local % per_epoch + per_epoch
        if index < len(self.batches.plan.stages) - 1:
            end = min(end, self.batches.plan.stages[index].end * self.batches.accumulate)
        return range(first, end)

    def __iter__(self) -> Iterator[int]:
        return iter(self._range())

    def __len__(self) -> int:
        return self.batches.steps_per_epoch(self.step_source())


class StagedStream(IterableDataset):
    """Shard streams as one stream of batches by step: the stream of the current step's stage (each at
    its stage's image size and per-rank batch), zipped with its high-resolution partition's stream.

    Streams are placed at the global step (not the step within the stage), so a later stage continues
    into fresh virtual epochs and the first stage reads exactly what a run without stages reads. An
    iteration stops at its stage's end; the loader's next iteration starts the next stage.
    """

    def __init__(self, plan: StagePlan, main: Sequence[Any], hires: Mapping[int, Any], accumulate: int = 1):
        self.plan, self.main, self.hires, self.accumulate = plan, list(main), dict(hires), accumulate
        self.rank, self.world_size, self.start_step = 0, 1, 0

    def _index(self) -> int:
        return self.plan.index(self.start_step // self.accumulate)

    def place(self, rank: int = 0, world_size: int = 1, start_step: int = 0) -> None:
        """Place this rank and the next iteration's start step (batches done) on the stage's streams."""
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        index = self._index()
        last = index == len(self.plan.stages) - 1
        stop = None if last else self.plan.stages[index].end * self.accumulate
        for stream in (self.main[index], self.hires.get(index)):
            if stream is not None:
                stream.place(rank, world_size, start_step, stop)

    def __len__(self) -> int:
        return len(self.main[self._index()])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = self._index()
        if index not in self.hires:
            yield from self.main[index]
            return
        for batch, hires in zip(self.main[index], self.hires[index]):
            yield {
                **batch,
                "hires": {"images": hires["images"]},
                "skipped": batch["skipped"] + hires["skipped"],
            }


class DistillDataset(Dataset):
    """Images plus, when caches are given, the teachers' stored outputs for the same index."""

    def __init__(self, images: Dataset, caches: Mapping[str, TeacherCache] | None = None) -> None:
        self.images = images
        self.caches = dict(caches or {})
        for name, cache in self.caches.items():
            if len(cache) != len(images):
                raise ValueError(
                    f"cache of teacher {name!r} has {len(cache)} items, the image set {len(images)}"
                )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One image and, with caches, its stored teacher outputs (``summary`` only where a teacher has one).

        ``{"images": [3, S, S], "index": i, "targets": {name: {"features": [h, w, Cf], "summary": [Cs]}}}``
        """
        item: dict[str, Any] = {"images": self.images[index], "index": index}
        if self.caches:
            item["targets"] = {name: cache.item(index) for name, cache in self.caches.items()}
        return item


class DistillDataModule(pl.LightningDataModule):
    """Serves training/held-out images with teacher targets, from the cache or (uncached) images only.

    ``teachers`` maps a teacher name to its config (``build_teacher`` input). Teachers are only built when
    a cache entry is missing or the cache is disabled (then the LightningModule runs them every step).
    ``test`` is an optional second held-out set, evaluated at the end of training only. ``train`` may be
    a ``phis.shards.ShardStream`` (an endless stream of batches): it is never cached.

    ``batch_size`` is global (images per optimizer step over all ranks); each rank is served its share
    (``phis.stages.per_rank_batch``). ``plan`` (the run's ``StagePlan``, built once by
    ``phis.build.stage_plan`` and shared with the module) switches the training image size and batch at
    stage boundaries and adds high-resolution partitions; ``stage_sets`` holds the training set at every
    size it names other than ``train``'s own. Without a plan: one open-ended stage at the training set's
    size and ``batch_size``.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        teachers: Mapping[str, Mapping[str, Any]],
        test: Dataset | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        cache_enabled: bool = True,
        cache_dir: str | os.PathLike = ".cache/phis",
        cache_dtype: str = "float16",
        cache_batch_size: int = 64,
        seed: int = 0,
        plan: StagePlan | None = None,
        stage_sets: Mapping[int, Dataset] | None = None,
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("the teacher set is empty; choose a set with teachers=<set>")
        self.streaming = isinstance(train, IterableDataset)
        if self.streaming and cache_enabled:
            raise ValueError(
                "a shard stream has no fixed image set to cache; set cache.enabled=false (the teachers "
                "then run on every batch) or choose data=offline/folder"
            )
        self.sets = {"train": train, "val": val} | ({"test": test} if test is not None else {})
        self.teacher_cfgs = {name: dict(cfg) for name, cfg in teachers.items()}
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.cache_enabled = cache_enabled
        self.cache_batch_size = cache_batch_size
        self._teachers: dict[str, Any] = {}
        self._prepared = False
        self.caches: dict[str, dict[str, TeacherCache]] = {}
        if cache_enabled:
            self.caches = {
                split: {
                    name: TeacherCache(cache_dir, name, cfg, images, dtype=cache_dtype)
                    for name, cfg in self.teacher_cfgs.items()
                }
                for split, images in self.sets.items()
                if not (self.streaming and split == "train")
            }
        if plan is None:  # one open-ended stage at the training set's size and data.batch_size
            plan = StagePlan.from_config(
                None,
                max_steps=1,
                image_size=int(train.size),
                batch_size=batch_size,
                partitions="shared",
                teachers=list(self.teacher_cfgs),
            )
        self.plan = plan
        # Per training image size: its image set and the teachers whose targets are needed at it.
        self.size_sets: dict[int, Dataset] = {int(train.size): train, **dict(stage_sets or {})}
        needed: dict[int, set[str]] = {int(train.size): set(self.teacher_cfgs)}
        for stage in self.plan.stages:
            needed.setdefault(stage.image_size, set()).update(self.teacher_cfgs)
            if stage.hires is not None:
                needed.setdefault(stage.hires.image_size, set()).update(stage.hires.teachers)
        missing = sorted(set(needed) - set(self.size_sets))
        if missing:
            raise ValueError(
                f"the stages train at image sizes {missing} but no training set of that size was given "
                f"(stage_sets has {sorted(self.size_sets)}); build the data module with build_datamodule"
            )
        self.size_caches: dict[int, dict[str, TeacherCache]] = {}
        if cache_enabled:
            for size, names in needed.items():
                if size == int(train.size):
                    self.size_caches[size] = self.caches["train"]
                    continue
                images = self.size_sets[size]
                self.size_caches[size] = {
                    n: TeacherCache(cache_dir, n, cfg, images, dtype=cache_dtype)
                    for n, cfg in self.teacher_cfgs.items()
                    if n in names
                }

    @property
    def train_set(self) -> Dataset:
        return self.sets["train"]

    def teacher(self, name: str) -> Any:
        """The teacher model ``name``, built on first use."""
        if name not in self._teachers:
            from phis.teachers import build_teacher

            log.info("building teacher %s", name)
            self._teachers[name] = build_teacher(self.teacher_cfgs[name])
        return self._teachers[name]

    @property
    def teachers(self) -> dict[str, Any]:
        """All teacher models (builds them)."""
        return {name: self.teacher(name) for name in self.teacher_cfgs}

    def prepare_data(self) -> None:
        """Build every missing cache entry (building teachers only for those); runs once."""
        if self._prepared:
            return
        entries = [
            (cache, lambda n=name: self.teacher(n))
            for split in [*self.caches.values(), *self.size_caches.values()]
            for name, cache in split.items()
        ]
        ensure_all(entries, self.cache_batch_size, self.num_workers)
        if self.cache_enabled:  # with every output cached, the teacher models are no longer needed
            self._teachers.clear()
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def teacher_specs(self) -> dict[str, dict[str, Any]]:
        """Per teacher: summary_dim, feature_dim, grid (h, w), input_size, patch_size."""
        if self.cache_enabled:
            self.prepare_data()
            return {name: cache.spec for name, cache in self.caches["train"].items()}
        return {name: t.spec() for name, t in self.teachers.items()}

    def dataset(self, split: str, limit: int | None = None, rank: int = 0, world_size: int = 1) -> Dataset:
        """Images of a split with their cached targets (if caching), the first ``limit`` only if given;
        with ``world_size`` > 1 every ``world_size``-th of those from ``rank`` (evaluation spread over ranks).

        A streamed training split is represented by the first ``limit`` (default 1024) images of its shards.
        """
        if split not in self.sets:
            raise ValueError(f"no {split!r} set; this data module has {', '.join(self.sets)}")
        images = self.sets[split]
        if split == "train" and self.streaming:
            from phis.shards import HeldoutImages

            images = HeldoutImages(images.urls, images.size, limit or 1024, "train_shards", images.decode)
        data = DistillDataset(images, self.caches.get(split))
        count = len(data) if limit is None else min(limit, len(data))
        if count == len(data) and world_size == 1:
            return data
        return Subset(data, range(rank, count, world_size))

    def _batches_done(self) -> int:
        trainer = self.trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def _ranks(self) -> tuple[int, int, int]:
        """(this rank, nodes, devices per node) of the attached trainer; (0, 1, 1) without one."""
        t = self.trainer
        return (0, 1, 1) if t is None else (t.global_rank, t.num_nodes, t.num_devices)

    def per_rank(self, global_batch: int) -> int:
        """This rank's share of a global batch (clear error when it does not divide)."""
        _, nodes, devices = self._ranks()
        return per_rank_batch(global_batch, nodes, devices)

    def stage_image_size(self, index: int) -> int:
        """Training image size of stage ``index``."""
        return int(self.plan.stages[index].image_size)

    def stage_caches(self, index: int) -> dict[str, TeacherCache]:
        """Every teacher's cache of the training set at stage ``index``'s image size."""
        return self.size_caches[self.stage_image_size(index)]

    def _stage_dataset(self, size: int, names: Sequence[str]) -> DistillDataset:
        caches = self.size_caches.get(size, {})
        return DistillDataset(self.size_sets[size], {n: caches[n] for n in names if n in caches})

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.streaming:
            from phis.shards import StreamLoader

            rank, nodes, devices = self._ranks()
            batches = rank_batches(self.plan, nodes, devices, 1)
            main, hires = [], {}
            for i, (stage, (batch, hires_batch)) in enumerate(zip(self.plan.stages, batches)):
                main.append(copy.copy(self.size_sets[stage.image_size]))
                main[-1].batch_size = batch
                if stage.hires is not None:
                    hires[i] = copy.copy(self.size_sets[stage.hires.image_size])
                    # Another sample order than the main stream's, which may read the same shards.
                    hires[i].seed, hires[i].batch_size = hires[i].seed + 1, hires_batch
            accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
            stream = StagedStream(self.plan, main, hires, accumulate)
            stream.place(rank, nodes * devices)
            return StreamLoader(stream, self._batches_done, self.num_workers)
        names = list(self.teacher_cfgs)
        main = [self._stage_dataset(stage.image_size, names) for stage in self.plan.stages]
        hires = {
            i: self._stage_dataset(stage.hires.image_size, stage.hires.teachers)
            for i, stage in enumerate(self.plan.stages)
            if stage.hires is not None
        }
        rank, nodes, devices = self._ranks()
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        batches = StageBatches(self.plan, main, hires, self.seed, rank, (nodes, devices), accumulate)
        return DataLoader(
            batches,
            batch_size=None,
            sampler=StageSteps(batches, self._batches_done),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Shard batches arrive as uint8 (a quarter of the bytes to move); scale to [0, 1] on the device."""
        if not isinstance(batch, dict):
            return batch
        images = batch.get("images")
        if images is not None and images.dtype == torch.uint8:
            batch = {**batch, "images": images.float().div_(255.0)}
        if isinstance(batch.get("hires"), dict):
            batch = {**batch, "hires": self.on_after_batch_transfer(batch["hires"], dataloader_idx)}
        return batch

    def heldout_dataloader(
        self, split: str = "val", limit: int | None = None, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        """Sequential batches of a held-out split (``limit``, ``rank``, ``world_size``: see ``dataset``)."""
        data = self.dataset(split, limit, rank, world_size)
        return DataLoader(data, batch_size=self.per_rank(self.batch_size), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.heldout_dataloader("val")


def heldout_set(
    source: str | Sequence[str] | None,
    size: int,
    limit: int = 1024,
    name: str = "heldout",
    decode: str = "reduced",
) -> Dataset:
    """Held-out set of a shard run: ``phis.shards.HeldoutImages`` of ``source`` (shards or a folder), or
    crops of the offline test photos if None (rendered from arrays: ``decode`` does not apply)."""
    if source is None:
        log.info("no data.heldout given: held-out metrics use %d crops of the offline test photos", limit)
        return OfflineImagePool("test", size, limit)
    from phis.shards import HeldoutImages

    return HeldoutImages(source, size, limit, name, decode)
