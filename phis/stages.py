"""Training stages: which stage a global step belongs to, its image size, batch and teacher partitions.

A run is a list of stages trained one after the other (PHI-S Table 10: 256 px, then 432 px, then 432 px
plus a high-resolution partition for SAM, 300k steps each). Within a stage the LR schedule (warmup, then
cosine) starts afresh, the normalizer statistics are estimated anew and the student trunk is frozen for
its first steps. ``StagePlan`` is the one place that maps a global step to its stage; the module (LR,
statistics, trunk freeze) and the data module (image size, batch size) both ask it.

Batch sizes here are global (images per optimizer step over every rank); ``per_rank_batch`` turns one
into the batch of one data-parallel rank.

Partitions: ``shared`` gives every teacher the whole batch; ``per_teacher`` splits each rank's batch
into T equal contiguous slices, teacher t's loss using only slice t (the student runs once on the whole
batch). Under DDP every rank splits its own share, so the global batch is split the same way: each
teacher sees global_batch / T images per step. A stage's ``hires`` partition is a second, separate batch
of images at another size (own global batch), on which only the listed teachers' losses are computed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from phis.config import check_choice

PARTITIONS = ("shared", "per_teacher")
STAGE_KEYS = ("name", "steps", "image_size", "batch_size", "partitions", "hires")
HIRES_KEYS = ("teachers", "image_size", "batch_size")


@dataclass(frozen=True)
class HiRes:
    """Extra images at ``image_size`` (``batch_size`` per step, global) for ``teachers`` only."""

    teachers: tuple[str, ...]
    image_size: int
    batch_size: int


@dataclass(frozen=True)
class Stage:
    """One stage: ``steps`` optimizer steps from global step ``start`` on."""

    name: str
    start: int
    steps: int
    image_size: int | None  # None: not known to the caller (a module built without stages)
    batch_size: int | None
    partitions: str
    hires: HiRes | None = None

    @property
    def end(self) -> int:
        """First global step after this stage."""
        return self.start + self.steps

    def to_dict(self) -> dict[str, Any]:
        """Plain config form (what ``StagePlan.from_config`` reads back; no ``start``)."""
        d = asdict(self)
        d.pop("start")
        if self.hires is not None:
            d["hires"] = {**d["hires"], "teachers": list(self.hires.teachers)}
        return d


def _positive_int(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}.{key}={value!r} is not valid; it must be a positive integer")
    return value


class StagePlan:
    """The stages of a run, in order; maps a global step to its stage."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        if not stages:
            raise ValueError("a stage plan needs at least one stage")
        self.stages = tuple(stages)
        self._starts = [s.start for s in self.stages]

    @classmethod
    def from_config(
        cls,
        stages: Sequence[Mapping[str, Any]] | None,
        *,
        max_steps: int | None,
        image_size: int | None,
        batch_size: int | None,
        partitions: str,
        teachers: Sequence[str],
    ) -> StagePlan:
        """Stages of the ``stages:`` config, or (empty/None) one stage of ``max_steps`` steps.

        A stage's missing ``image_size``, ``batch_size`` (global) or ``partitions`` default to the given
        ones (the data set's size, ``data.batch_size``, ``distill.partitions``). ``max_steps`` given with
        stages must be None, -1 or their total.
        """
        check_choice("distill.partitions", partitions, PARTITIONS)
        given = bool(stages)
        if not given:
            if max_steps is None or max_steps < 1:
                raise ValueError(
                    f"trainer.max_steps={max_steps!r}: without stages the run needs a positive step count"
                )
            stages = [{"name": "stage1", "steps": max_steps}]
        out, start = [], 0
        for i, raw in enumerate(stages):
            where = f"stages[{i}]"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{where} must be a mapping with keys {list(STAGE_KEYS)}, got {raw!r}")
            unknown = set(raw) - set(STAGE_KEYS)
            if unknown:
                raise ValueError(
                    f"{where} has unknown keys {sorted(unknown)}; valid keys: {list(STAGE_KEYS)}"
                )
            part = raw.get("partitions") or partitions
            check_choice(f"{where}.partitions", part, PARTITIONS)
            steps = _positive_int(where, "steps", raw.get("steps"))
            size, batch = raw.get("image_size") or image_size, raw.get("batch_size") or batch_size
            if given or size is not None:
                size = _positive_int(where, "image_size", size)
            if given or batch is not None:
                batch = _positive_int(where, "batch_size", batch)
            if part == "per_teacher" and batch is not None and batch % len(teachers):
                raise ValueError(
                    f"{where}: per_teacher partitions split the batch of {batch} images over "
                    f"{len(teachers)} teachers {list(teachers)}, which does not divide; choose a batch "
                    f"size that is a multiple of {len(teachers)}"
                )
            hires = raw.get("hires")
            if hires:
                hires = cls._hires(f"{where}.hires", hires, teachers)
            out.append(Stage(str(raw.get("name") or f"stage{i + 1}"), start, steps, size, batch, part, hires))
            start += steps
        plan = cls(out)
        if given and max_steps not in (None, -1, plan.total_steps):
            raise ValueError(
                f"trainer.max_steps={max_steps} contradicts the stages, whose steps sum to "
                f"{plan.total_steps} ({' + '.join(str(s.steps) for s in out)}); set trainer.max_steps=null "
                "(derived from the stages) or to that sum"
            )
        return plan

    @staticmethod
    def _hires(where: str, raw: Mapping[str, Any], teachers: Sequence[str]) -> HiRes:
        unknown = set(raw) - set(HIRES_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}; valid keys: {list(HIRES_KEYS)}")
        names = raw.get("teachers") or []
        names = [names] if isinstance(names, str) else list(names)
        bad = [n for n in names if n not in teachers]
        if not names or bad:
            raise ValueError(
                f"{where}.teachers={names!r} must name one or more of the run's teachers {list(teachers)}"
            )
        size = _positive_int(where, "image_size", raw.get("image_size"))
        batch = _positive_int(where, "batch_size", raw.get("batch_size"))
        return HiRes(tuple(names), size, batch)

    @property
    def total_steps(self) -> int:
        """Steps of all stages together (the run's ``trainer.max_steps``)."""
        return self.stages[-1].end

    def index(self, step: int) -> int:
        """Index of the stage global step ``step`` belongs to (steps past the end: the last stage)."""
        if step < 0:
            raise ValueError(f"global step {step} is negative")
        return bisect.bisect_right(self._starts, step) - 1

    def at(self, step: int) -> Stage:
        """The stage of global step ``step``."""
        return self.stages[self.index(step)]

    def lr_factor(self, step: int, warmup_steps: int, min_lr_ratio: float) -> float:
        """LR multiplier at global step ``step``: linear warmup over ``warmup_steps``, then cosine decay
        to ``min_lr_ratio`` at the end of the stage; both restart at every stage boundary."""
        stage = self.at(step)
        local = step - stage.start
        if local < warmup_steps:
            return (local + 1) / warmup_steps
        progress = min(1.0, (local - warmup_steps) / max(1, stage.steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_config(self) -> list[dict[str, Any]]:
        """The stages as plain dicts (hyperparameters, checkpoints)."""
        return [s.to_dict() for s in self.stages]


def per_rank_batch(global_batch: int, num_nodes: int, devices: int, what: str = "batch") -> int:
    """The batch of one data-parallel rank: ``global_batch`` over ``num_nodes`` × ``devices`` ranks."""
    ranks = num_nodes * devices
    if ranks < 1:
        raise ValueError(f"{num_nodes} nodes x {devices} devices is not a number of ranks")
    if global_batch % ranks:
        raise ValueError(
            f"the global {what} of {global_batch} images does not divide over {ranks} ranks "
            f"({num_nodes} nodes x {devices} devices); choose a global batch that is a multiple of {ranks} "
            "or another number of nodes / devices"
        )
    return global_batch // ranks


def rank_batches(plan: StagePlan, num_nodes: int, devices: int, num_teachers: int) -> list[tuple[int, int]]:
    """Per stage, (main, high-resolution) batch of one rank (0: no high-resolution partition); a clear
    error when a global batch does not divide over the ranks or a per-teacher split over the teachers."""
    out = []
    for s in plan.stages:
        main = per_rank_batch(s.batch_size, num_nodes, devices, f"batch of stage {s.name!r}")
        if s.partitions == "per_teacher" and main % num_teachers:
            raise ValueError(
                f"stage {s.name!r}: each of {num_nodes} x {devices} ranks gets {main} images, which do not "
                f"split into {num_teachers} per-teacher partitions; choose a global batch that is a "
                f"multiple of {num_nodes * devices * num_teachers}"
            )
        hires = 0
        if s.hires is not None:
            what = f"high-resolution batch of stage {s.name!r}"
            hires = per_rank_batch(s.hires.batch_size, num_nodes, devices, what)
        out.append((main, hires))
    return out
