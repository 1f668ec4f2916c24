"""The multi-teacher student: a timm ViT trunk with one summary token per teacher, registers and heads.

Token layout (AM-RADIO): ``[summary_0 … summary_{T-1}, register_0 … register_{R-1}, patch tokens]``.
The timm trunk is built with no class token, no registers and no position table (``pos_embed='none'``);
this module owns those tokens and the position table and runs timm's patch embedding, blocks and final
norm itself, so the number of summary tokens and the position-embedding policy are free. Teacher ``t``
(in configuration order) reads summary token ``t``; every teacher gets one, including teachers without a
summary output (SAM), whose token is simply not supervised. The trunk summary used for probes is
summary token 0 (the first teacher's, a CLIP model in the paper-scale sets, as RADIO exposes).

Initial weights (``pretrained``): random, timm's hub weights of ``model``, a local timm/ImageNet file, or
a phis model (an exported directory, a run directory or a ``.ckpt``). From timm, what applies is mapped
into the trunk (patch embedding, blocks, final norm) and the file's position embedding is resampled into
the table (with CPE, the 14×14 ImageNet table becomes the large CPE table); the class token, the
classifier and the summary/register tokens are not loaded. From a phis model, the trunk, position table,
registers and, for each teacher of the same name and widths, its summary token and heads are loaded
(``load_phis_model``). Loading happens when a run starts fresh (``load_pretrained``), never when a
checkpoint is restored. With ``spectral_reparam`` every linear layer of the trunk is spectrally
reparametrized (``phis.spectral``); the heads stay plain so that a normalizer can be folded into their
last layer.

A phis model's feature heads output teacher space (its normalizers are folded in). They are loaded as
they are, so the new run starts from exactly the model's outputs, and ``teacher_space_heads`` names them:
once the new run has fitted its own normalizer for such a teacher, ``DistillModule`` re-expresses that
head's last layer in the normalized space (``Normalizer.normalize_into``), which leaves its teacher-space
output unchanged.

Position embeddings are learned on a ``[G, G]`` table. Without CPE, G = img_size / patch and other
grids resample the table bilinearly. With CPE (cropped position embedding), G is larger
(``cpe_max_size / patch``); training uses a random ``[h, w]`` window per sample, evaluation the centre
window, so the student sees a consistent embedding at every resolution up to ``cpe_max_size``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from phis.adaptors import MLP2
from phis.model import FORMAT, FORMAT_VERSION, PhisModel, find_model, locate_model
from phis.normalizers import Normalizer, make_normalizer
from phis.spectral import apply_spectral_reparam, reset_spectral_reparams
from phis.teachers import WeightsUnavailableError, hub_offline
from phis.vit import describe_trunk, spec_differences

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")

log = logging.getLogger(__name__)


@dataclass
class StudentOutput:
    """Per-teacher head outputs plus the raw trunk tokens they were computed from."""

    summaries: dict[str, Tensor]  # name → [B, Cs] (teachers with a summary only)
    features: dict[str, Tensor]  # name → [B, h*w, Cf]
    grid: tuple[int, int]  # (h, w) patch grid of the student
    trunk_summary: Tensor  # [B, D]
    trunk_features: Tensor  # [B, h*w, D]


def teacher_spec(summary_dim: int | None, feature_dim: int) -> dict[str, int | None]:
    """The per-teacher facts a student needs (and checkpoints keep): output widths."""
    return {"summary_dim": None if summary_dim is None else int(summary_dim), "feature_dim": int(feature_dim)}


class MultiTeacherViT(nn.Module):
    """ViT trunk + per-teacher summary/feature MLP2 heads; ``teachers`` maps name → teacher_spec."""

    def __init__(
        self,
        teachers: Mapping[str, Mapping[str, Any]],
        model: str = "vit_tiny_patch16_224",
        img_size: int = 64,
        num_registers: int = 4,
        cpe: bool = False,
        cpe_max_size: int | None = None,
        head_hidden_dim: int = 512,
        head_num_inner: int = 0,
        trunk_kwargs: Mapping[str, Any] | None = None,
        pretrained: bool | str | None = False,
        spectral_reparam: bool = False,
    ) -> None:
        super().__init__()
        if not (pretrained is None or isinstance(pretrained, (bool, str))):
            raise ValueError(
                f"student.pretrained={pretrained!r}; use false, true (timm's hub weights of {model!r}), "
                "the path of a local weight file or a phis model (export directory, run directory, .ckpt)"
            )
        if not teachers:
            raise ValueError("MultiTeacherViT needs at least one teacher")
        for name in teachers:
            if not name.isidentifier():
                raise ValueError(f"teacher name {name!r} must be a Python identifier (used as a module key)")
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        self.teacher_names = list(teachers)
        self.model_name = model
        self.trunk_kwargs = dict(trunk_kwargs or {})
        self.pretrained = pretrained or False
        self.head_hidden_dim, self.head_num_inner = int(head_hidden_dim), int(head_num_inner)
        # Teachers whose feature heads were loaded in teacher space (see the module docstring).
        self.teacher_space_heads: set[str] = set()
        self.trunk = timm.create_model(
            model,
            pretrained=False,
            num_classes=0,
            global_pool="",
            class_token=False,
            reg_tokens=0,
            pos_embed="none",
            dynamic_img_size=True,
            img_size=img_size,
            **dict(trunk_kwargs or {}),
        )
        if not hasattr(self.trunk, "patch_embed") or not hasattr(self.trunk, "blocks"):
            raise ValueError(f"student model {model!r} is not a timm VisionTransformer")
        dim = self.trunk.embed_dim
        self.embed_dim = dim
        self.patch_size = int(self.trunk.patch_embed.patch_size[0])
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {self.patch_size}")
        self.img_size = img_size
        self.num_summary = len(teachers)
        self.num_registers = num_registers
        self.cpe = cpe
        table_size = img_size
        if cpe:
            table_size = cpe_max_size or 2 * img_size
            if table_size < img_size or table_size % self.patch_size:
                raise ValueError(
                    f"cpe_max_size {table_size} must be >= img_size {img_size} and a multiple of the "
                    f"patch size {self.patch_size}"
                )
        g = table_size // self.patch_size
        self.pos_table = nn.Parameter(torch.empty(1, g, g, dim))
        self.prefix = nn.Parameter(torch.empty(1, self.num_summary + num_registers, dim))
        nn.init.trunc_normal_(self.pos_table, std=0.02)
        nn.init.normal_(self.prefix, std=1e-6)
        cfg = self.trunk.pretrained_cfg
        self.register_buffer("pixel_mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), False)

        self.summary_heads = nn.ModuleDict()
        self.feature_heads = nn.ModuleDict()
        for name, spec in teachers.items():
            if spec.get("summary_dim"):
                self.summary_heads[name] = MLP2(
                    dim, int(spec["summary_dim"]), head_hidden_dim, head_num_inner
                )
            self.feature_heads[name] = MLP2(dim, int(spec["feature_dim"]), head_hidden_dim, head_num_inner)
        if spectral_reparam:
            apply_spectral_reparam(self.trunk)

    def load_pretrained(self) -> dict[str, Any]:
        """Load ``self.pretrained`` into the trunk and position table; returns (and logs) what was loaded
        and what was not. A no-op without ``pretrained``."""
        if not self.pretrained:
            return {}
        if self.pretrained is not True and find_model(self.pretrained) is not None:
            return self.load_phis_model(load_phis_source(self.pretrained), str(self.pretrained))
        state = timm_weights(self.model_name, self.pretrained, self.trunk_kwargs)
        target = self.trunk.state_dict()
        mapped: dict[str, Tensor] = {}
        unused, mismatched = [], []
        for key, value in state.items():
            # A spectrally reparametrized weight lives at <layer>.parametrizations.weight.original.
            dest = key if key in target else key.replace(".weight", ".parametrizations.weight.original")
            if key == "pos_embed" or dest not in target:
                unused.append(key)
            elif target[dest].shape != value.shape:
                mismatched.append(f"{key} {tuple(value.shape)} (trunk: {tuple(target[dest].shape)})")
            else:
                mapped[dest] = value
        source = "hub" if self.pretrained is True else self.pretrained
        if mismatched or not any(k.startswith("blocks.") for k in mapped):
            raise ValueError(
                f"student.pretrained={source!r} does not fit the trunk {self.model_name!r} "
                f"(trunk_kwargs={self.trunk_kwargs}): mismatched shapes {mismatched or 'none'}, "
                f"{sum(k.startswith('blocks.') for k in mapped)} block tensors matched"
            )
        self.trunk.load_state_dict(mapped, strict=False)
        reset_spectral_reparams(self.trunk)
        if "pos_embed" in state:
            with torch.no_grad():
                self.pos_table.copy_(resample_position_grid(position_grid(state), self.pos_table.shape[1]))
            unused.remove("pos_embed")
        derived = ".parametrizations.weight.0."  # spectral-norm vectors and scales, set from the weights
        not_loaded = [k for k in target if k not in mapped and derived not in k] + ["prefix"]
        if "pos_embed" not in state:
            not_loaded.append("pos_table")
        report = {"source": source, "loaded": len(mapped), "not_loaded": not_loaded, "unused": unused}
        log.info(
            "student initialized from %s: %d trunk tensors and %s; not loaded: %s; unused in the file: %s",
            source,
            len(mapped),
            "the position table" if "pos_embed" in state else "no position table",
            ", ".join(not_loaded),
            ", ".join(unused) or "none",
        )
        return report

    @torch.no_grad()
    def load_phis_model(self, model: PhisModel, source: str) -> dict[str, Any]:
        """Start from a trained phis student: its trunk and position table (the model's positions at
        this table's grid if the sizes differ), its registers (as many as both have) and, for each
        teacher of the same name and widths, that teacher's summary token and heads. Returns (and logs)
        what was and was not loaded."""
        differences = spec_differences(model.trunk.spec, describe_trunk(self.trunk))
        if differences:
            raise ValueError(
                f"student.pretrained={source!r} has another trunk than {self.model_name!r} "
                f"(trunk_kwargs={self.trunk_kwargs}): " + "; ".join(differences)
            )
        for what, theirs, ours in (
            ("pixel mean", model.conditioner.mean, self.pixel_mean),
            ("pixel std", model.conditioner.std, self.pixel_std),
        ):
            if not torch.equal(theirs.cpu(), ours.cpu()):
                raise ValueError(
                    f"student.pretrained={source!r} normalizes its input with {what} "
                    f"{theirs.flatten().tolist()}, this student with {ours.flatten().tolist()}; pick the "
                    "same student.model"
                )
        target = self.trunk.state_dict()
        for key, value in model.trunk.state_dict().items():
            dest = key if key in target else key.replace(".weight", ".parametrizations.weight.original")
            target[dest].copy_(value)
        reset_spectral_reparams(self.trunk)
        # The table is what the model itself adds at this table's grid (its centre window with CPE, else
        # its table resampled as it resamples it), so both compute the same at this student's own size.
        g = self.pos_table.shape[1]
        self.pos_table.copy_(model.position_embedding(g, g).to(self.pos_table))
        same = model.pos_table.shape == self.pos_table.shape
        loaded = ["trunk", "pos_table" if same else f"pos_table (the model's {g}x{g} positions)"]
        registers = min(model.num_registers, self.num_registers)
        ours, theirs = self.num_summary, model.num_summary
        self.prefix[:, ours : ours + registers] = model.prefix[:, theirs : theirs + registers].to(self.prefix)
        loaded.append(f"{registers} of {self.num_registers} registers")
        not_loaded = (
            [f"registers {registers}..{self.num_registers - 1}"] if registers < self.num_registers else []
        )
        for i, name in enumerate(self.teacher_names):
            why = _head_mismatch(model, name, self)
            if why:
                not_loaded.append(f"teacher {name} ({why})")
                continue
            self.prefix[:, i] = model.prefix[:, model.teacher_names.index(name)].to(self.prefix)
            self.feature_heads[name].load_state_dict(model.feature_heads[name].state_dict())
            if name in self.summary_heads:
                self.summary_heads[name].load_state_dict(model.summary_heads[name].state_dict())
            self.teacher_space_heads.add(name)
            loaded.append(f"teacher {name} (summary token and heads)")
        unused = [n for n in model.teacher_names if n not in self.teacher_names]
        report = {"source": source, "loaded": loaded, "not_loaded": not_loaded, "unused": unused}
        log.info(
            "student initialized from the phis model %s: loaded %s; not loaded: %s; teachers of the model "
            "not in this run: %s",
            source,
            ", ".join(loaded),
            ", ".join(not_loaded) or "none",
            ", ".join(unused) or "none",
        )
        return report

    def folded(self, normalizers: Mapping[str, Normalizer]) -> MultiTeacherViT:
        """A copy whose feature heads output teacher space: each normalizer folded into its head."""
        out = copy.deepcopy(self)
        for name, head in out.feature_heads.items():
            head.final = normalizers[name].fold_into(head.final)
        return out

    @torch.no_grad()
    def plain_state(self) -> dict[str, Tensor]:
        """The state dict with every spectrally reparametrized weight as the plain weight it computes in
        evaluation mode (``remove_parametrizations`` would also strip the class this module shares with
        its deep copies)."""
        was_training = self.training
        self.eval()  # no power-iteration step while the weights are read
        state = self.state_dict()
        for name, module in self.named_modules():
            if parametrize.is_parametrized(module, "weight"):
                inner = f"{name}.parametrizations.weight."
                for key in [k for k in state if k.startswith(inner)]:
                    del state[key]
                state[f"{name}.weight"] = module.weight.detach().clone()
        self.train(was_training)
        return state

    @torch.no_grad()
    def to_phis_model(
        self, teachers: Mapping[str, Mapping[str, Any]] | None = None, **kwargs: Any
    ) -> PhisModel:
        """This student as a ``PhisModel`` (spectral reparametrizations turned into plain weights).
        Call it on a ``folded`` copy so its heads output teacher space. ``teachers``: extra facts per
        teacher for the config (grid, normalizer, source); ``kwargs`` go to ``PhisModel``."""
        extra = teachers or {}
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "img_size": self.img_size,
            "table_size": int(self.pos_table.shape[1]),
            "cpe": self.cpe,
            "num_registers": self.num_registers,
            "pixel_mean": self.pixel_mean.flatten().tolist(),
            "pixel_std": self.pixel_std.flatten().tolist(),
            "trunk": asdict(describe_trunk(self.trunk)),
            "head_hidden_dim": self.head_hidden_dim,
            "head_num_inner": self.head_num_inner,
            "teachers": {
                n: {
                    "summary_dim": self.summary_heads[n].out_dim if n in self.summary_heads else None,
                    "feature_dim": self.feature_heads[n].out_dim,
                    **dict(extra.get(n, {})),
                }
                for n in self.teacher_names
            },
        }
        model = PhisModel(config, **kwargs)
        model.load_state_dict(self.plain_state(), strict=True)
        return model.to(self.pos_table.device)

    @property
    def num_prefix(self) -> int:
        return self.num_summary + self.num_registers

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) of an input of the given pixel size."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the student patch size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def position_embedding(
        self, batch: int, h: int, w: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Position embeddings ``[B, h, w, D]``: the resampled table, or a CPE window (random in training)."""
        table = self.pos_table  # [1, G, G, D]
        g = table.shape[1]
        if not self.cpe or h > g or w > g:
            if (h, w) != (g, g):
                table = F.interpolate(
                    table.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False
                ).permute(0, 2, 3, 1)
            return table.expand(batch, -1, -1, -1)
        if not self.training:
            top, left = (g - h) // 2, (g - w) // 2
            return table[:, top : top + h, left : left + w].expand(batch, -1, -1, -1)
        dev = table.device
        top = torch.randint(0, g - h + 1, (batch,), generator=generator).to(dev)
        left = torch.randint(0, g - w + 1, (batch,), generator=generator).to(dev)
        rows = top[:, None] + torch.arange(h, device=dev)  # [B, h]
        cols = left[:, None] + torch.arange(w, device=dev)  # [B, w]
        return table[0][rows[:, :, None], cols[:, None, :]]  # [B, h, w, D]

    def forward_trunk(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, tuple]:
        """``images: [B, 3, H, W]`` in [0, 1] → normed tokens ``[B, T + R + h*w, D]`` and the grid (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        h, w = self.grid_for(images.shape[2], images.shape[3])
        x = self.trunk.patch_embed((images - self.pixel_mean) / self.pixel_std)  # [B, h, w, D]
        x = x + self.position_embedding(x.shape[0], h, w, generator)
        x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        x = self.trunk.norm_pre(x)
        x = self.trunk.blocks(x)
        return self.trunk.norm(x), (h, w)

    def heads(self, tokens: Tensor, grid: tuple[int, int]) -> StudentOutput:
        """Apply every teacher's heads to the trunk tokens ``[B, T + R + h*w, D]``."""
        patches = tokens[:, self.num_prefix :]
        summaries = {
            name: self.summary_heads[name](tokens[:, i])
            for i, name in enumerate(self.teacher_names)
            if name in self.summary_heads
        }
        features = {name: head(patches) for name, head in self.feature_heads.items()}
        return StudentOutput(summaries, features, grid, tokens[:, 0], patches)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> StudentOutput:
        """``images: [B, 3, H, W]`` RGB in [0, 1] → per-teacher predictions."""
        tokens, grid = self.forward_trunk(images, generator)
        return self.heads(tokens, grid)


def check_pretrained(model: str, pretrained: bool | str | None) -> None:
    """Fail at once when the student's initial weights cannot be had (before any teacher is built)."""
    if not pretrained:
        return
    if pretrained is True:
        if hub_offline():
            raise WeightsUnavailableError(
                f"student.pretrained=true downloads timm's {model!r} weights, but the hub is switched off "
                "(HF_HUB_OFFLINE); download them on a machine with network and set "
                "student.pretrained=/path/to/model.safetensors (or PHIS_STUDENT_WEIGHTS=...), or "
                "student.pretrained=false"
            )
        return
    if find_model(pretrained) is not None:
        return
    if os.path.isdir(pretrained):
        raise ValueError(
            f"student.pretrained={pretrained!r} is a directory but no phis model: give an exported model "
            "directory (python -m phis.export), a run directory with checkpoints/last.ckpt, or a file"
        )
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f"student.pretrained={pretrained!r} does not exist")
    if not pretrained.endswith(WEIGHT_FILE_SUFFIXES):
        raise ValueError(
            f"student.pretrained={pretrained!r}: not a weight file timm reads nor a phis model; use one of "
            f"{', '.join(WEIGHT_FILE_SUFFIXES)}, a .ckpt or a phis model directory"
        )


def timm_weights(model: str, pretrained: bool | str, trunk_kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """State dict of timm's VisionTransformer ``model``: its hub weights (True) or a local file."""
    check_pretrained(model, pretrained)
    if pretrained is True:
        try:
            return timm.create_model(model, pretrained=True, **trunk_kwargs).state_dict()
        except Exception as err:  # hub failures come in many types
            raise WeightsUnavailableError(
                f"student.pretrained=true: timm's {model!r} weights could not be downloaded ({err}); set "
                "student.pretrained=/path/to/model.safetensors"
            ) from err
    if pretrained.endswith(".npz"):
        # Google's JAX checkpoints: timm's own reader maps them into its VisionTransformer.
        ref = timm.create_model(model, pretrained=False, **trunk_kwargs)
        ref.load_pretrained(pretrained)
        return ref.state_dict()
    return timm.models.load_state_dict(pretrained)


def position_grid(state: Mapping[str, Tensor]) -> Tensor:
    """The patch part of a timm ``pos_embed`` ``[1, P + g*g, D]`` as ``[1, g, g, D]`` (P: class/register
    positions, absent when the model does not embed them)."""
    pos = state["pos_embed"]
    prefix = int("cls_token" in state) + (state["reg_tokens"].shape[1] if "reg_tokens" in state else 0)
    n = pos.shape[1]
    for p in (prefix, 0):
        g = math.isqrt(n - p)
        if g * g == n - p:
            return pos[:, p:].reshape(1, g, g, pos.shape[2])
    raise ValueError(f"pos_embed with {n} positions is not {prefix} prefix positions plus a square grid")


def resample_position_grid(grid: Tensor, size: int) -> Tensor:
    """``[1, g, g, D]`` → ``[1, size, size, D]``, bicubic and antialiased as timm resamples its tables."""
    if grid.shape[1] == size:
        return grid
    out = F.interpolate(
        grid.permute(0, 3, 1, 2).float(),
        size=(size, size),
        mode="bicubic",
        antialias=True,
        align_corners=False,
    )
    return out.permute(0, 2, 3, 1).to(grid.dtype)


def _head_mismatch(model: PhisModel, name: str, student: MultiTeacherViT) -> str | None:
    """Why teacher ``name``'s heads of ``model`` cannot be loaded into ``student`` (None: they can)."""
    if name not in model.teachers:
        return "not a teacher of the model"
    t, cfg = model.teachers[name], model.config
    theirs = (t.get("summary_dim") or None, int(t["feature_dim"]))
    ours = (
        student.summary_heads[name].out_dim if name in student.summary_heads else None,
        student.feature_heads[name].out_dim,
    )
    if theirs != ours:
        return f"summary/feature widths {theirs} there, {ours} here"
    theirs = (cfg["head_hidden_dim"], cfg["head_num_inner"])
    ours = (student.head_hidden_dim, student.head_num_inner)
    if theirs != ours:
        return f"head hidden width and inner blocks {theirs} there, {ours} here"
    return None


@dataclass
class CheckpointStudent:
    """The student of a training checkpoint with its normalizers folded in, and what else it says."""

    student: MultiTeacherViT  # heads output teacher space
    teachers: dict[str, dict[str, Any]]  # per teacher: grid and the normalizer folded into its head
    hparams: dict[str, Any]
    step: int


def read_checkpoint(path: str | os.PathLike) -> CheckpointStudent:
    """Rebuild a training checkpoint's student (no Lightning needed) with every normalizer folded in."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a phis training checkpoint (no hyper_parameters/state_dict)")
    hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    student = MultiTeacherViT(hp["teachers"], **{**hp["student"], "pretrained": False})
    student.load_state_dict({k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")})
    name = hp["normalizer"]["name"]
    normalizers = {}
    for n, spec in hp["teachers"].items():
        norm = make_normalizer(name, int(spec["feature_dim"]))
        norm.load_state_dict(
            {k: state[f"normalizers.{n}.{k}"] for k in ("mu", "weight", "inverse")}, strict=False
        )
        normalizers[n] = norm
    teachers = {n: {"grid": list(s["grid"]), "normalizer": name} for n, s in hp["teachers"].items()}
    return CheckpointStudent(
        student.folded(normalizers).eval(), teachers, dict(hp), int(ckpt.get("global_step", 0))
    )


def load_phis_source(source: str | os.PathLike, **kwargs: Any) -> PhisModel:
    """A ``PhisModel`` from an exported directory, a run directory or a training checkpoint."""
    kind, path = locate_model(source)
    if kind == "export":
        return PhisModel.from_pretrained(Path(path), **kwargs)
    ckpt = read_checkpoint(path)
    return ckpt.student.to_phis_model(ckpt.teachers, **kwargs)
