"""The distillation LightningModule: one student, per-teacher normalizers and losses, one training step.

Per teacher t with targets (summary s_t, features y_t) and student predictions (ŝ_t, x̂_t):

    loss = Σ_t  w_s · cosine(ŝ_t, s_t)  +  w_f · L(x̂_t, N_t(y_t))

where N_t is the teacher's feature normalizer (PHI-S, whitening, …; identity for the plain baselines)
and L the configured feature loss; with AdaLoss each term is divided by a running estimate of itself.
The student head predicts in normalized space; ``predict`` maps back to teacher space with N_t⁻¹.

Teachers are never submodules: they are not in checkpoints, so ``load_from_checkpoint`` needs only the
per-teacher widths and grids kept in the hyperparameters. Targets normally come from the teacher cache
(the batch holds them); with the cache disabled the teachers run on every batch under ``no_grad``.

Stages (``phis.stages``): the run's ``StagePlan`` says which stage a global step belongs to. Each
stage starts afresh: the LR schedule (warmup, cosine) restarts, the normalizer statistics are estimated
anew (first ``estimate_steps`` steps of the stage, refit every ``refit_every``; or fitted once from the
teacher cache at the stage's resolution) and then frozen, and the trunk is frozen for the stage's first
``freeze_trunk_steps`` so only the heads chase the moving targets.

Partitions: with ``per_teacher`` each teacher's targets and loss cover only its contiguous slice of the
batch (online teachers run on their slice only); the student runs once on the whole batch. A stage's
high-resolution partition (``batch["hires"]``: images and, when cached, targets) adds a term for each
of its teachers, from a second student forward at that resolution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from phis.cache import TeacherCache
from phis.config import check_choice
from phis.losses import AdaLoss, cosine, make_loss, mse
from phis.metrics import TeacherErrorMeter
from phis.normalizers import make_normalizer
from phis.spectral import spectral_reparams
from phis.stages import PARTITIONS, StagePlan
from phis.student import MultiTeacherViT

NORMALIZER_FITS = ("cache", "schedule")
RESAMPLE_TO = ("student", "teacher")
RESAMPLE_MODES = ("bilinear", "bicubic", "nearest", "area")
OPTIMIZERS = ("adamw", "lamb", "sgd")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_TARGETS = ("teachers", "student")

log = logging.getLogger(__name__)


def resample_grid(y: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resample channels-last maps ``y: [B, h, w, C]`` to ``[B, *size, C]`` (antialiased when shrinking)."""
    if tuple(y.shape[1:3]) == tuple(size):
        return y
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"unknown resample mode {mode!r}; choose one of {', '.join(RESAMPLE_MODES)}")
    shrink = size[0] < y.shape[1] or size[1] < y.shape[2]
    kw: dict[str, Any] = {}
    if mode in ("bilinear", "bicubic"):
        kw = {"align_corners": False, "antialias": shrink}
    out = F.interpolate(y.permute(0, 3, 1, 2), size=tuple(size), mode=mode, **kw)
    return out.permute(0, 2, 3, 1)


@dataclasses.dataclass
class _TargetMemo:
    """Normalized cached targets of one teacher: ``values[i]`` is valid where ``filled[i]``, for ``key``."""

    key: tuple
    values: Tensor  # [N, tokens, C]
    filled: Tensor  # [N] bool, on the CPU


class DistillModule(pl.LightningModule):
    """Multi-teacher feature distillation (AM-RADIO) with configurable normalization (PHI-S)."""

    def __init__(
        self,
        teachers: Mapping[str, Mapping[str, Any]],
        student: Mapping[str, Any],
        normalizer: Mapping[str, Any],
        loss: Mapping[str, Any],
        distill: Mapping[str, Any],
        optim: Mapping[str, Any],
        max_steps: int,
        seed: int = 0,
        stages: Sequence[Mapping[str, Any]] | None = None,
        plan: StagePlan | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["plan"])
        d = dict(distill)
        d.setdefault("partitions", "shared")
        d.setdefault("target_memo_mb", 0)  # checkpoints from before the memo existed
        check_choice("distill.partitions", d["partitions"], PARTITIONS)
        check_choice("distill.normalizer_fit", d["normalizer_fit"], NORMALIZER_FITS)
        check_choice("distill.resample_to", d["resample_to"], RESAMPLE_TO)
        check_choice("distill.resample_mode", d["resample_mode"], RESAMPLE_MODES)
        check_choice("optim.name", optim["name"], OPTIMIZERS)
        self.distill_cfg = d
        self.teacher_names = list(teachers)
        self.teacher_specs = {
            name: {
                "summary_dim": spec.get("summary_dim"),
                "feature_dim": int(spec["feature_dim"]),
                "grid": tuple(spec["grid"]),
            }
            for name, spec in teachers.items()
        }
        self.student = MultiTeacherViT(self.teacher_specs, **student)
        # The run's plan as built once for the data module too; from the hyperparameters when a
        # checkpoint is loaded. Without stages: one stage of max_steps, its batch checked when it arrives.
        if plan is not None and stages is not None and plan.to_config() != list(stages):
            raise ValueError(f"the stage plan {plan.to_config()} and the stages {list(stages)} differ")
        self.plan = plan or StagePlan.from_config(
            stages,
            max_steps=max_steps,
            image_size=int(student.get("img_size", 0)) or None,
            batch_size=None,
            partitions=d["partitions"],
            teachers=self.teacher_names,
        )

        norm_cfg = dict(normalizer)
        norm_name = norm_cfg.pop("name")
        if d["normalizer_fit"] == "cache":
            norm_cfg.update(estimate_steps=0)
        else:
            norm_cfg.update(estimate_steps=d["estimate_steps"], refit_every=d["refit_every"])
        self.normalizers = nn.ModuleDict(
            {
                n: make_normalizer(norm_name, s["feature_dim"], **norm_cfg)
                for n, s in self.teacher_specs.items()
            }
        )
        loss_cfg = dict(loss)
        self.feature_loss = make_loss(loss_cfg.pop("name"), **loss_cfg)
        self.adaloss = nn.ModuleDict()
        if d["adaloss"]:
            hires = {n for st in self.plan.stages if st.hires for n in st.hires.teachers}
            for n, s in self.teacher_specs.items():
                for tag in ("", *(("_hires",) if n in hires else ())):
                    self.adaloss[f"{n}{tag}_features"] = AdaLoss(d["adaloss_momentum"])
                    if s["summary_dim"]:
                        self.adaloss[f"{n}{tag}_summary"] = AdaLoss(d["adaloss_momentum"])
        # The stage whose bookkeeping (statistics reset, cache fit) has been done; -1: none yet.
        self.register_buffer("stage_index", torch.tensor(-1, dtype=torch.int64))
        self._teachers: dict[str, nn.Module] = {}
        self._memo: dict[str, _TargetMemo] = {}  # normalized cached targets, see _normalized_targets
        self._heads_due: dict[str, int] = {}  # teacher → step after which its loaded head is re-expressed

    # ------------------------------------------------------------------ targets and losses

    def attach_teachers(self, teachers: Mapping[str, nn.Module]) -> None:
        """Run these (frozen) teachers on every batch; they stay outside the module and its checkpoints."""
        missing = set(self.teacher_names) - set(teachers)
        if missing:
            raise ValueError(
                f"teachers {sorted(missing)} are missing; the module was built for {self.teacher_names}"
            )
        self._teachers = {n: teachers[n].eval().requires_grad_(False) for n in self.teacher_names}

    @torch.no_grad()
    def targets(
        self,
        batch: Mapping[str, Any],
        rows: Mapping[str, slice] | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, tuple[Tensor | None, Tensor]]:
        """Teacher-space targets of ``names`` (default: every teacher): (summary [b, Cs] or None, features
        [b, h, w, Cf]), float32. With ``rows``, teacher n's targets cover only the batch rows ``rows[n]``
        (its partition): cached ones are sliced, an online teacher runs on those images only."""
        names = self.teacher_names if names is None else list(names)
        rows = rows or {}
        if "targets" in batch:
            out = {}
            for n in names:
                t, r = batch["targets"][n], rows.get(n, slice(None))
                out[n] = (t["summary"][r].float() if "summary" in t else None, t["features"][r].float())
            return out
        if not self._teachers:
            raise RuntimeError("the batch carries no cached teacher outputs and no teachers are attached")
        out = {}
        for n in names:
            with torch.inference_mode():
                o = self._teachers[n](batch["images"][rows.get(n, slice(None))])
            # Copies made outside inference mode: the loss may keep the targets for its backward pass.
            out[n] = (
                None if o.summary is None else o.summary.float().clone(),
                o.features.float().permute(0, 2, 3, 1).clone(),
            )
        return out

    def _align(self, pred: Tensor, grid: tuple[int, int], y: Tensor) -> tuple[Tensor, Tensor]:
        """Bring prediction ``[B, h*w, C]`` and target ``[B, h', w', C]`` to one grid → two ``[B, N, C]``."""
        mode = self.distill_cfg["resample_mode"]
        if self.distill_cfg["resample_to"] == "student":
            return pred, resample_grid(y, grid, mode).flatten(1, 2)
        pred = resample_grid(pred.unflatten(1, grid), tuple(y.shape[1:3]), mode)
        return pred.flatten(1, 2), y.flatten(1, 2)

    def _terms(
        self,
        out: Any,
        targets: Mapping[str, tuple],
        step: int | None,
        teacher_space: bool = True,
        rows: Mapping[str, slice] | None = None,
        tag: str = "",
        index: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss over the teachers in ``targets`` and per-teacher logs (normalized-space loss and MSE,
        summary cosine loss, and with ``teacher_space`` the teacher-space MSE, which costs a [C, C] product
        per token). ``rows[n]``: the rows of the student output that teacher n's targets belong to (its
        partition). ``tag`` names a separate term of the same teacher (``hires_``: its own AdaLoss and
        log keys). With a training ``step`` (counted from the stage's start) the normalizers' estimation
        schedule sees the targets (None: evaluation, no update). ``index``: the training-set indices of
        the batch's cached targets, which lets their normalized values be kept (``_normalized_targets``)."""
        d = self.distill_cfg
        total = torch.zeros((), device=self.device)
        logs: dict[str, Tensor] = {}
        for n, (summary_t, feats_t) in targets.items():
            r = (rows or {}).get(n, slice(None))
            norm = self.normalizers[n]
            pred, y = self._align(out.features[n][r], out.grid, feats_t)
            if step is not None and norm.step(y, step) and n in self.student.teacher_space_heads:
                # The head is re-expressed after this step's update (the graph holds its weights).
                pred = norm(pred)
                self._heads_due[n] = int(self.global_step)
            x = norm(y) if index is None else self._normalized_targets(n, y, index[r])
            feat_loss = self.feature_loss(pred, x)
            term = d["feature_weight"] * (
                self.adaloss[f"{n}_{tag}features"](feat_loss) if self.adaloss else feat_loss
            )
            logs[f"{n}/{tag}feat_loss"] = feat_loss.detach()
            with torch.no_grad():
                logs[f"{n}/{tag}mse_norm"] = mse(pred, x)
                if teacher_space:
                    logs[f"{n}/{tag}mse_teacher"] = mse(norm.denormalize(pred), y)
            if summary_t is not None and n in out.summaries:
                s_loss = cosine(out.summaries[n][r], summary_t)
                term = term + d["summary_weight"] * (
                    self.adaloss[f"{n}_{tag}summary"](s_loss) if self.adaloss else s_loss
                )
                logs[f"{n}/{tag}summary_loss"] = s_loss.detach()
            total = total + term
        logs["loss"] = total.detach()
        return total, logs

    def _memo_capacity(self, stage: int) -> int:
        """Training-set size of stage ``stage`` whose normalized targets may be kept; 0: keep none.

        Only when the normalizers are fitted once per stage from the teacher cache (then a cached
        sample's normalized target cannot change within the stage) and a trainer's data module
        says how large the stage's training set is."""
        if self.distill_cfg["normalizer_fit"] != "cache" or not self.distill_cfg["target_memo_mb"]:
            return 0
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        caches = dm.stage_caches(stage) if dm is not None and getattr(dm, "cache_enabled", False) else {}
        return len(next(iter(caches.values()))) if caches else 0

    @torch.no_grad()
    def _normalized_targets(self, name: str, y: Tensor, index: Tensor) -> Tensor:
        """``normalizers[name](y)`` for the cached targets of training samples ``index``, each computed
        once per stage and then read back (for a dense transform the [C, C] product per token is
        about a fifth of a CPU training step's work otherwise).

        Kept per teacher in a [N, tokens, C] float32 store while it fits ``distill.target_memo_mb``,
        for dense (non-diagonal) transforms of targets on the CPU only (on an accelerator the product is
        cheap and its memory better spent on the model). The store is dropped whenever the transform or its
        mean change (``_version`` of the buffers: a refit, a reset, a loaded checkpoint) or the stage
        or the target grid does. The values equal ``norm(y)`` of the batch that first held the sample
        (up to the matmul's round-off across batch compositions).
        """
        norm = self.normalizers[name]
        if norm.diagonal or not norm.uses_statistics or y.device.type != "cpu":
            return norm(y)
        stage = int(self.stage_index)
        key = (stage, norm.weight._version, norm.mu._version, tuple(y.shape[1:]), y.dtype)
        memo = self._memo.get(name)
        if memo is None or memo.key != key:
            size = self._memo_capacity(stage)
            if size == 0 or size * y[0].numel() * 4 > self.distill_cfg["target_memo_mb"] * 2**20:
                self._memo.pop(name, None)  # a stale store would only hold memory
                return norm(y)
            memo = _TargetMemo(key, y.new_empty((size, *y.shape[1:])), torch.zeros(size, dtype=torch.bool))
            self._memo[name] = memo
        index = index.cpu()
        if bool(memo.filled[index].all()):
            return memo.values[index]
        x = norm(y)
        memo.values[index] = x
        memo.filled[index] = True
        return x

    @property
    def stage_resolution(self) -> int:
        """Image size of the stage trained last (-1 before training or where the plan does not say)."""
        index = int(self.stage_index)
        size = self.plan.stages[index].image_size if index >= 0 else None
        return int(size) if size else -1

    def partition_rows(self, batch_size: int, partitions: str) -> dict[str, slice]:
        """Per teacher, the rows of a batch of ``batch_size`` its loss uses: all (``shared``) or its
        contiguous 1/T (``per_teacher``, teacher t gets rows [t·b/T, (t+1)·b/T))."""
        check_choice("partitions", partitions, PARTITIONS)
        if partitions == "shared":
            return {n: slice(None) for n in self.teacher_names}
        t = len(self.teacher_names)
        if batch_size % t:
            raise ValueError(
                f"per_teacher partitions: a batch of {batch_size} images does not split over {t} teachers "
                f"{self.teacher_names}; the per-rank batch must be a multiple of {t}"
            )
        k = batch_size // t
        return {n: slice(i * k, (i + 1) * k) for i, n in enumerate(self.teacher_names)}

    def _begin_stage(self, index: int) -> None:
        """A stage's first step: statistics restart (``schedule``) or are refitted from the teacher cache
        at the stage's resolution (``cache``). Runs once per stage: ``stage_index`` is checkpointed, so a
        run resumed mid-stage keeps the statistics it had."""
        if int(self.stage_index) == index:
            return
        if self.distill_cfg["normalizer_fit"] == "schedule":
            for norm in self.normalizers.values():
                norm.reset()
        else:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if dm is not None and dm.cache_enabled:
                self.fit_normalizers(dm.stage_caches(index), dm.stage_image_size(index))
                self._normalize_loaded_heads(self.teacher_names)
        self.stage_index.fill_(index)

    def _step_generator(self, step: int) -> torch.Generator:
        # Randomness (CPE windows) depends only on (seed, step), so a resumed run draws the same values.
        return torch.Generator().manual_seed(int(self.hparams.seed) * 1_000_003 + step)

    def distill_loss(
        self, batch: Mapping[str, Any], step: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One training step's loss and logs: stage bookkeeping, targets per partition, (partly frozen)
        student forward, terms; plus the high-resolution partition's terms in a stage that has one.

        ``step`` defaults to the trainer's global step; a loop without a Trainer passes its own count.
        """
        step = int(self.global_step) if step is None else int(step)
        index = self.plan.index(step)
        stage = self.plan.stages[index]
        self._begin_stage(index)
        local = step - stage.start
        images = batch["images"]
        rows = self.partition_rows(len(images), stage.partitions)
        targets = self.targets(batch, rows)
        frozen = local < self.distill_cfg["freeze_trunk_steps"]
        generator = self._step_generator(step)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            tokens, grid = self.student.forward_trunk(images, generator)
        out = self.student.heads(tokens, grid)
        # Teacher-space errors are only computed on the steps the trainer logs.
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        logged = (step + 1) % every == 0
        samples = batch.get("index") if "targets" in batch else None  # cached targets: may be kept
        loss, logs = self._terms(out, targets, local, teacher_space=logged, rows=rows, index=samples)
        if stage.hires is not None:
            if "hires" not in batch:
                raise ValueError(
                    f"stage {stage.name!r} has a high-resolution partition for {list(stage.hires.teachers)} "
                    "but the batch has no 'hires' images; the data module serves them from the stage config"
                )
            hires = batch["hires"]
            hires_targets = self.targets(hires, names=stage.hires.teachers)
            with torch.no_grad() if frozen else contextlib.nullcontext():
                tokens, grid = self.student.forward_trunk(hires["images"], generator)
            hires_loss, hires_logs = self._terms(
                self.student.heads(tokens, grid), hires_targets, local, teacher_space=logged, tag="hires_"
            )
            loss = loss + hires_loss
            logs |= {k: v for k, v in hires_logs.items() if k != "loss"}
            logs["loss"] = loss.detach()
        logs["trunk_frozen"] = torch.tensor(float(frozen))
        logs["stage"] = torch.tensor(float(index))
        return loss, logs

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, logs = self.distill_loss(batch)
        if not torch.isfinite(logs["loss"]):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items() if "/" in k)
            raise FloatingPointError(
                f"non-finite training loss ({float(logs['loss'])}) at step {int(self.global_step)}; "
                f"per-teacher terms: {terms}. Stopping; the last good checkpoint is kept"
            )
        if "skipped" in batch:  # shard samples that could not be decoded (phis.shards)
            logs["skipped_samples"] = torch.tensor(float(batch["skipped"]))
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)
        self.log("loss", logs["loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self.student(batch["images"])
        _, logs = self._terms(out, self.targets(batch), None)
        self.log_dict(
            {f"val/{k}": v for k, v in logs.items()}, on_epoch=True, batch_size=len(batch["images"])
        )

    # ------------------------------------------------------------------ normalizer statistics

    def on_fit_start(self) -> None:
        """Attach uncached teachers (the cache fit of the normalizers happens at each stage's first step)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError(
                "DistillModule is trained with a DistillDataModule (trainer.fit(module, datamodule=dm))"
            )
        if not dm.cache_enabled and not self._teachers:
            self.attach_teachers(dm.teachers)
        self.prepare_teachers()
        if self.distill_cfg["normalizer_fit"] == "cache" and not dm.cache_enabled:
            raise ValueError(
                "distill.normalizer_fit=cache needs the teacher cache; set cache.enabled=true or "
                "distill.normalizer_fit=schedule"
            )

    def prepare_teachers(self) -> None:
        """Move the attached teachers to the device once: cast to ``distill.teacher_dtype`` and optionally
        compile them and the student's blocks (``distill.compile``; CUDA only, the CPU keeps eager mode).

        ``teacher_dtype``: ``auto`` (bfloat16 on CUDA, float32 elsewhere), ``bfloat16``, ``float16`` or
        ``float32``. Targets are always returned in float32.
        """
        choice = self.distill_cfg.get("teacher_dtype", "auto")
        check_choice("distill.teacher_dtype", choice, TEACHER_DTYPES)
        cuda = self.device.type == "cuda"
        if choice == "auto":
            dtype = torch.bfloat16 if cuda else torch.float32
        else:
            dtype = getattr(torch, choice)
        compile_what = self.distill_cfg.get("compile") or []
        compile_what = [compile_what] if isinstance(compile_what, str) else list(compile_what)
        for what in compile_what:
            check_choice("distill.compile entry", what, COMPILE_TARGETS)
        if compile_what and not cuda:
            log.info("distill.compile=%s ignored: torch.compile is only used on CUDA", compile_what)
        for teacher in self._teachers.values():
            teacher.to(device=self.device, dtype=dtype)
            if cuda and "teachers" in compile_what:
                teacher.compile()
        if cuda and "student" in compile_what and not getattr(self, "_student_compiled", False):
            for block in self.student.trunk.blocks:
                block.compile()
            self._student_compiled = True

    @torch.no_grad()
    def fit_normalizers(
        self, caches: Mapping[str, TeacherCache], resolution: int, batch_size: int = 256
    ) -> None:
        """Fit every normalizer once from the cached training-set features (as the loss will see them)."""
        grid = self.student.grid_for(resolution, resolution)
        for n in self.teacher_names:
            norm, cache = self.normalizers[n], caches[n]
            norm.reset()
            if norm.uses_statistics:
                if self.distill_cfg["resample_to"] == "teacher" or tuple(cache.spec["grid"]) == grid:
                    norm.stats.merge_(cache.moments().to(norm.stats.mean.device))
                else:
                    for y in cache.feature_batches(batch_size):
                        norm.update(resample_grid(y, grid, self.distill_cfg["resample_mode"]))
            norm.fit()

    # ------------------------------------------------------------------ optimization

    def configure_optimizers(self) -> dict[str, Any]:
        o = dict(self.hparams.optim)
        decay, no_decay = [], []
        # The 0-dim scales γ of spectral reparametrization are decayed, as the PHI-S recipe does: the layer
        # W = γ W̄ / σ(W̄) does not depend on the size of W̄, so γ's decay is what bounds its spectral norm.
        scales = {id(m.scale) for m in spectral_reparams(self)}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            # Biases, norms, position table and prefix tokens are not weight-decayed.
            plain = p.ndim <= 1 or name.endswith(("pos_table", "prefix"))
            (no_decay if plain and id(p) not in scales else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": o["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if o["name"] == "adamw":
            opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))
        elif o["name"] == "lamb":
            from timm.optim import Lamb

            opt = Lamb(groups, lr=o["lr"], betas=tuple(o["betas"]))
        else:
            opt = torch.optim.SGD(groups, lr=o["lr"], momentum=o["betas"][0])
        warmup, floor = int(o["warmup_steps"]), float(o["min_lr_ratio"])

        def factor(step: int) -> float:
            # Linear warmup, then cosine decay to min_lr_ratio · lr, restarting at every stage.
            return self.plan.lr_factor(step, warmup, floor)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation API

    def _grid_maps(
        self, feats: Tensor, grid: tuple[int, int], name: str, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Student-grid tokens ``[B, h*w, C]`` → maps ``[B, C, h', w']`` on ``size`` (default: the teacher's
        grid; a SAM that pads its input has a grid that follows the image size)."""
        size = size or self.teacher_specs[name]["grid"]
        maps = resample_grid(feats.unflatten(1, grid), size, self.distill_cfg["resample_mode"])
        return maps.permute(0, 3, 1, 2)

    @torch.no_grad()
    def predict_normalized(self, images: Tensor) -> dict[str, Any]:
        """Per teacher, TeacherOutput in normalized space: summary [B, Cs] or None, features [B, Cf, h, w]."""
        from phis.teachers import TeacherOutput

        out = self.student(images)
        return {
            n: TeacherOutput(out.summaries.get(n), self._grid_maps(out.features[n], out.grid, n))
            for n in self.teacher_names
        }

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Any]:
        """Per teacher, TeacherOutput in teacher space (denormalized) resampled to the teacher's feature
        grid, as metrics against the teacher need; ``phis.model.PhisModel`` keeps the input's own grid."""
        from phis.teachers import TeacherOutput

        out = self.student(images)
        res = {}
        for n in self.teacher_names:
            feats = self.normalizers[n].denormalize(out.features[n])
            res[n] = TeacherOutput(out.summaries.get(n), self._grid_maps(feats, out.grid, n))
        return res

    @torch.no_grad()
    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Trunk summary ``[B, D]`` and trunk patch features ``[B, D, h, w]`` (for probes, kNN, RankMe)."""
        tokens, grid = self.student.forward_trunk(images)
        patches = tokens[:, self.student.num_prefix :]
        return tokens[:, 0], patches.unflatten(1, grid).permute(0, 3, 1, 2)

    def fold_normalizers(self) -> MultiTeacherViT:
        """A copy of the student whose feature heads output teacher space directly (Θ, μ folded in)."""
        return self.student.folded(self.normalizers)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Re-express the heads whose normalizer was first fitted at an already-taken optimizer step."""
        self._normalize_loaded_heads([n for n, s in self._heads_due.items() if self.global_step > s])

    @torch.no_grad()
    def _normalize_loaded_heads(self, names: Iterable[str]) -> None:
        """Feature heads loaded in teacher space (``student.teacher_space_heads``) whose normalizer was
        fitted: their last layer is re-expressed in the normalized space, in place (the optimizer holds
        these parameters), so their teacher-space outputs stay what the loaded model computed. With
        ``schedule`` fits this follows the first optimizer step (``_heads_due``)."""
        for n in set(names) & self.student.teacher_space_heads:
            self._heads_due.pop(n, None)
            final = self.student.feature_heads[n].final
            new = self.normalizers[n].normalize_into(final)
            final.weight.copy_(new.weight)
            final.bias.copy_(new.bias)
            self.student.teacher_space_heads.discard(n)

    @torch.no_grad()
    def heldout_metrics(
        self,
        batches: Iterable[Mapping[str, Any]],
        distributed: bool = False,
        teachers: Callable[[str], nn.Module] | None = None,
        per_channel: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """Per teacher, on held-out batches: teacher-space MSE, target variance, explained fraction,
        per-channel error-variance ranges and summary cosine (the one held-out teacher-error path).

        Errors are measured on the teacher's own grid against the raw targets; ``variance`` is the mean
        per-channel variance of the held-out targets (tr Σ / C), so ``explained = 1 − MSE / variance`` is
        0 for predicting the held-out mean itself. ``error_variance_range`` (teacher space) and
        ``error_variance_range_normalized`` (``predict_normalized`` against the normalized targets) are
        max − min over channels of the error variance (PHI-S Table 5). ``summary_cosine`` is the mean
        cosine similarity of predicted and true summaries. Targets come from the batch (cache), else
        from the attached teachers, else from ``teachers(name)``. With ``distributed`` every rank passes
        its share of the batches and all ranks return the metrics of all of them. ``per_channel`` adds
        ``channel_mse``: the teacher-space MSE per channel ``[C]`` (float64 tensor; PHI-S Fig. 9).
        """
        was_training = self.training
        self.eval()
        dev = self.device
        meters = {
            n: tuple(TeacherErrorMeter(s["feature_dim"], dev, strict=False) for _ in range(2))
            for n, s in self.teacher_specs.items()
        }
        cos = {n: torch.zeros(2, dtype=torch.float64, device=dev) for n in meters}  # sum, count
        for batch in batches:
            images = batch["images"].to(dev)
            if "targets" in batch or self._teachers or teachers is None:
                targets = self.targets({**batch, "images": images})
            else:
                outs = {n: teachers(n)(images) for n in meters}
                targets = {n: (o.summary, o.features.permute(0, 2, 3, 1)) for n, o in outs.items()}
            out = self.student(images)
            for n, (teacher_space, normalized) in meters.items():
                summary_t, y = targets[n]
                y = y.to(dev).float()  # [B, h, w, C]
                norm = self.normalizers[n]
                size = tuple(y.shape[1:3])
                pred = self._grid_maps(norm.denormalize(out.features[n]), out.grid, n, size)  # [B, C, h, w]
                teacher_space.update(pred, y.permute(0, 3, 1, 2))
                pred_norm = self._grid_maps(out.features[n], out.grid, n, size)
                normalized.update(pred_norm, norm(y).permute(0, 3, 1, 2))
                summary = out.summaries.get(n)
                if summary_t is not None and summary is not None:
                    c = F.cosine_similarity(summary.double(), summary_t.to(dev).double(), dim=1)
                    cos[n] += torch.stack([c.sum(), c.new_tensor(float(len(c)))])
        self.train(was_training)
        if distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for n, (teacher_space, normalized) in meters.items():
                teacher_space.all_reduce_()
                normalized.all_reduce_()
                dist.all_reduce(cos[n])
        res = {}
        for n, (teacher_space, normalized) in meters.items():
            r = teacher_space.result()
            res[n] = {
                "mse_teacher": r["mse"],
                "variance": r["variance"],
                "explained": r["explained"],
                "error_variance_range": r["error_variance_range"],
                "error_variance_range_normalized": normalized.result()["error_variance_range"],
                "summary_cosine": float(cos[n][0] / cos[n][1]) if cos[n][1] > 0 else None,
                "tokens": teacher_space.tokens,
            }
            if per_channel:
                res[n]["channel_mse"] = teacher_space.channel_mse.cpu()
        return res
