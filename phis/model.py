"""The distilled student as a plain model for users: ``PhisModel``, loaded without the training stack.

A ``PhisModel`` is the trained ``MultiTeacherViT`` with every normalizer folded into its feature head
(``Normalizer.fold_into``) and spectral reparametrizations turned into plain weights, rebuilt from a
config and safetensors weights with torch alone (no Lightning, Hydra or timm: ``phis.vit`` holds the
trunk). ``python -m phis.export`` writes such a directory; ``phis.load`` reads it.

    model = phis.load("outputs/default/<time>/student")     # or PhisModel.from_pretrained(dir)
    summary, spatial = model(images)                           # images: [B, 3, H, W] RGB in [0, 1]
    per_teacher = model.forward_teachers(images)               # name → PhisOutput in that teacher's space

``spatial`` is ``[B, D, H/p, W/p]`` (``feature_fmt="NLC"``: ``[B, H/p·W/p, D]``) for any H, W that are
multiples of the patch size p; each teacher's features come at that same grid, not resampled to the
teacher's own (a metric that compares with a teacher resamples them itself, as ``DistillModule.predict``
does). The summary is summary token 0, the one the evaluation's kNN and probes use; the others are the
prefix tokens ``forward_intermediates(return_prefix_tokens=True)`` returns.

Resolution: ``preferred_resolution`` is the training size; sizes from ``min_resolution`` to
``max_resolution`` (a quarter of the training size up to the larger of the position table and four
times the training size) are supported, others warn (``resolution_policy="warn"``), raise (``"error"``)
or pass (``"ignore"``).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin
from torch import Tensor, nn

from phis.adaptors import MLP2
from phis.vit import TrunkSpec, ViTTrunk, block_indices

FORMAT = "phis-student"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "provenance.json"
CARD_FILE = "README.md"
PROGRAM_FILE = "model.pt2"
FEATURE_FORMATS = ("NCHW", "NLC")
RESOLUTION_POLICIES = ("warn", "error", "ignore")
RESOLUTION_RANGE = 4  # supported sizes: training size / 4 … max(position table, training size × 4)
INPUT_SLACK = 0.25  # inputs may leave [0, 1] by this much (resampling overshoot) before it is an error


class PhisOutput(NamedTuple):
    """A summary vector ``[B, C]`` (None for a teacher without one) and spatial features."""

    summary: Tensor | None
    features: Tensor  # [B, C, h, w] (NCHW) or [B, h*w, C] (NLC)


class Resolution(NamedTuple):
    height: int
    width: int


class InputConditioner(nn.Module):
    """``(x - mean) / std`` per RGB channel: the preprocessing a model applies to [0, 1] images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Not in the state dict: the config holds the values.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


def find_model(path: str | Path) -> tuple[str, Path] | None:
    """What a local path holds: ``("export", dir)`` for a phis model directory (or a run directory with
    one in ``student/``), ``("checkpoint", file)`` for a ``.ckpt`` (or a run directory's
    ``checkpoints/last.ckpt``); None for anything else."""
    path = Path(path)
    for folder in (path, path / "student"):
        config = folder / CONFIG_FILE
        if config.is_file():
            try:
                fmt = json.loads(config.read_text()).get("format")
            except (json.JSONDecodeError, AttributeError):
                fmt = None
            if fmt == FORMAT:
                return "export", folder
    if path.is_file() and path.suffix == ".ckpt":
        return "checkpoint", path
    last = path / "checkpoints" / "last.ckpt"
    return ("checkpoint", last) if last.is_file() else None


def locate_model(path: str | Path) -> tuple[str, Path]:
    """``find_model``, with a FileNotFoundError saying what a phis model is where there is none."""
    found = find_model(path)
    if found is None:
        raise FileNotFoundError(
            f"{path} is no phis model: expected an exported directory (config.json, model.safetensors), "
            "a run directory with student/ or checkpoints/last.ckpt, or a .ckpt file"
        )
    return found


def _check_config(config: Mapping[str, Any]) -> None:
    if config.get("format") != FORMAT:
        raise ValueError(f"not a phis model config: format={config.get('format')!r}, expected {FORMAT!r}")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"model format version {config['format_version']} is newer than this phis reads "
            f"({FORMAT_VERSION}); update phis"
        )
    teachers = config.get("teachers") or {}
    if not teachers or not all(str(n).isidentifier() for n in teachers):
        raise ValueError(
            f"the config's teachers must be a non-empty map of identifiers, got {list(teachers)}"
        )


class PhisModel(nn.Module, ModelHubMixin, library_name="phis", tags=["phis", "image-feature-extraction"]):
    """The distilled student: a ViT trunk with per-teacher summary tokens, registers and teacher heads
    whose outputs are in each teacher's own space.

    ``config`` is what ``config.json`` holds (written by ``phis.export``). ``external_preprocessing``:
    inputs arrive already normalized by ``make_preprocessor_external()``'s module. ``resolution_policy``:
    what a size outside ``min_resolution``..``max_resolution`` does (warn, error, ignore).
    """

    def __init__(
        self,
        config: dict[str, Any],
        external_preprocessing: bool = False,
        resolution_policy: str = "warn",
    ) -> None:
        super().__init__()
        _check_config(config)
        if resolution_policy not in RESOLUTION_POLICIES:
            raise ValueError(
                f"resolution_policy={resolution_policy!r} is not valid; choose one of {RESOLUTION_POLICIES}"
            )
        self.config = json.loads(json.dumps(config))  # a private, JSON-clean copy
        self.external_preprocessing = bool(external_preprocessing)
        self.resolution_policy = resolution_policy
        self.check_input_range = True  # off for compiled/exported graphs (the check reads the values)
        self.provenance: dict[str, Any] | None = None
        spec = TrunkSpec.from_dict(config["trunk"])
        self.trunk = ViTTrunk(spec)
        self.teacher_names = list(config["teachers"])
        self.teachers = {n: dict(t) for n, t in config["teachers"].items()}
        self.patch_size = spec.patch_size
        self.embed_dim = spec.embed_dim
        self.img_size = int(config["img_size"])
        self.cpe = bool(config["cpe"])
        self.num_registers = int(config["num_registers"])
        self.num_summary = len(self.teacher_names)
        g = int(config["table_size"])
        self.pos_table = nn.Parameter(torch.zeros(1, g, g, spec.embed_dim))
        self.prefix = nn.Parameter(torch.zeros(1, self.num_prefix, spec.embed_dim))
        self.conditioner = InputConditioner(config["pixel_mean"], config["pixel_std"])
        hidden, inner = int(config["head_hidden_dim"]), int(config["head_num_inner"])
        self.summary_heads = nn.ModuleDict()
        self.feature_heads = nn.ModuleDict()
        for name, t in self.teachers.items():
            if t.get("summary_dim"):
                self.summary_heads[name] = MLP2(spec.embed_dim, int(t["summary_dim"]), hidden, inner)
            self.feature_heads[name] = MLP2(spec.embed_dim, int(t["feature_dim"]), hidden, inner)
        self.eval()

    # ------------------------------------------------------------------ sizes

    @property
    def num_prefix(self) -> int:
        return self.num_summary + self.num_registers

    @property
    def preferred_resolution(self) -> Resolution:
        """The size the student was trained at."""
        return Resolution(self.img_size, self.img_size)

    @property
    def min_resolution(self) -> int:
        """Smallest supported side: a quarter of the training size (at least one patch)."""
        p = self.patch_size
        return max(p, math.ceil(self.img_size / RESOLUTION_RANGE / p) * p)

    @property
    def max_resolution(self) -> int:
        """Largest supported side: the position table's size or four times the training size."""
        return max(self.pos_table.shape[1] * self.patch_size, RESOLUTION_RANGE * self.img_size)

    def get_nearest_supported_resolution(self, height: int, width: int) -> Resolution:
        """Each side rounded to the nearest multiple of the patch size, within min/max_resolution."""
        p = self.patch_size

        def side(v: int) -> int:
            return min(max(math.floor(v / p + 0.5) * p, self.min_resolution), self.max_resolution)

        return Resolution(side(height), side(width))

    def make_preprocessor_external(self) -> nn.Module:
        """Hand the input normalization to the caller: returns it as a module, after which the model
        takes its output (no [0, 1] check) instead of [0, 1] images."""
        self.external_preprocessing = True
        return InputConditioner(self.config["pixel_mean"], self.config["pixel_std"]).to(self.pos_table.device)

    def _check(self, images: Tensor) -> tuple[int, int]:
        """Validate an input batch; returns its patch grid (h, w)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {images.dtype}; use images.float() / 255")
        height, width = int(images.shape[2]), int(images.shape[3])
        p = self.patch_size
        if height % p or width % p:
            near = self.get_nearest_supported_resolution(height, width)
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {p}; resize to e.g. "
                f"{near.height}x{near.width} (get_nearest_supported_resolution)"
            )
        lo, hi = self.min_resolution, self.max_resolution
        if self.resolution_policy != "ignore" and not (lo <= min(height, width) and max(height, width) <= hi):
            msg = (
                f"input size {height}x{width} is outside the supported {lo}..{hi} px per side of this "
                f"student (trained at {self.img_size}); resolution_policy='ignore' silences this"
            )
            if self.resolution_policy == "error":
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        if self.check_input_range and not self.external_preprocessing and images.numel():
            low, high = float(images.min()), float(images.max())
            if low < -INPUT_SLACK or high > 1 + INPUT_SLACK:
                raise ValueError(
                    f"pixel values span [{low:.4g}, {high:.4g}], but the model takes RGB in [0, 1]: divide "
                    "0-255 images by 255; for inputs already normalized call make_preprocessor_external()"
                )
        return height // p, width // p

    # ------------------------------------------------------------------ trunk

    def position_embedding(self, h: int, w: int) -> Tensor:
        """``[1, h, w, D]``: the centre window of the CPE table, else the table resampled bilinearly."""
        table = self.pos_table  # [1, G, G, D]
        g = table.shape[1]
        if self.cpe and h <= g and w <= g:
            # Indexing rather than slicing: an exported graph then holds for windows up to the full table.
            rows = torch.arange(h, device=table.device) + (g - h) // 2
            cols = torch.arange(w, device=table.device) + (g - w) // 2
            return table[:, rows[:, None], cols[None, :]]
        # At the table's own size the resampling is an exact copy: no branch, so exported graphs stay
        # valid for every size.
        out = F.interpolate(table.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
        return out.permute(0, 2, 3, 1)

    def _tokens(
        self, images: Tensor, grid: tuple[int, int], keep: Iterable[int] = (), last: int | None = None
    ):
        """Tokens after the final norm ``[B, P + h*w, D]`` and the raw outputs of the blocks in ``keep``;
        blocks after ``last`` are not run (then the first value is None)."""
        x = images if self.external_preprocessing else self.conditioner(images)
        x = self.trunk.patch_embed(x)  # [B, h, w, D]
        x = x + self.position_embedding(*grid)
        x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1)
        x = self.trunk.norm_pre(x)
        keep, kept = set(keep), []
        for i, block in enumerate(self.trunk.blocks):
            x = block(x)
            if i in keep:
                kept.append(x)
            if last is not None and i == last:
                return None, kept
        return self.trunk.norm(x), kept

    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``images: [B, 3, H, W]`` → normed trunk tokens ``[B, T + R + h*w, D]`` and the grid (h, w)."""
        grid = self._check(images)
        return self._tokens(images, grid)[0], grid

    def _format(self, tokens: Tensor, grid: tuple[int, int], feature_fmt: str) -> Tensor:
        if feature_fmt not in FEATURE_FORMATS:
            raise ValueError(f"feature_fmt={feature_fmt!r} is not valid; choose one of {FEATURE_FORMATS}")
        if feature_fmt == "NLC":
            return tokens
        return tokens.unflatten(1, grid).permute(0, 3, 1, 2)

    def backbone_output(self, tokens: Tensor, grid: tuple[int, int], feature_fmt: str = "NCHW") -> PhisOutput:
        """Summary token 0 ``[B, D]`` and the patch tokens of ``encode``'s output."""
        return PhisOutput(tokens[:, 0], self._format(tokens[:, self.num_prefix :], grid, feature_fmt))

    def teacher_outputs(
        self,
        tokens: Tensor,
        grid: tuple[int, int],
        names: Sequence[str] | None = None,
        feature_fmt: str = "NCHW",
    ) -> dict[str, PhisOutput]:
        """Per teacher (default: all), its summary head on its own summary token and its feature head
        on every patch token, in the teacher's space at the input's grid."""
        names = self.teacher_names if names is None else list(names)
        unknown = [n for n in names if n not in self.teachers]
        if unknown:
            raise ValueError(f"unknown teacher(s) {unknown}; this student has {self.teacher_names}")
        patches = tokens[:, self.num_prefix :]
        out = {}
        for n in names:
            i = self.teacher_names.index(n)
            summary = self.summary_heads[n](tokens[:, i]) if n in self.summary_heads else None
            out[n] = PhisOutput(summary, self._format(self.feature_heads[n](patches), grid, feature_fmt))
        return out

    def forward(self, images: Tensor, feature_fmt: str = "NCHW") -> PhisOutput:
        """``images: [B, 3, H, W]`` RGB in [0, 1] → (summary ``[B, D]``, spatial ``[B, D, H/p, W/p]``)."""
        return self.backbone_output(*self.encode(images), feature_fmt=feature_fmt)

    def forward_teachers(
        self, images: Tensor, names: Sequence[str] | None = None, feature_fmt: str = "NCHW"
    ) -> dict[str, PhisOutput]:
        """Per teacher (default: all): (summary ``[B, Cs]`` or None, features ``[B, Cf, H/p, W/p]``)."""
        return self.teacher_outputs(*self.encode(images), names=names, feature_fmt=feature_fmt)

    def forward_intermediates(
        self,
        images: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        return_prefix_tokens: bool = False,
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[PhisOutput, list[Any]]:
        """Outputs of trunk blocks (``indices``: the last n, or a list; default all), with this model's
        position table and prefix tokens. Each is the patch tokens (``norm``: after the final norm) in
        ``output_fmt``, or with ``return_prefix_tokens`` a pair (patches, prefix ``[B, T + R, D]``).
        Returns the list, or (``forward``'s output, the list) unless ``intermediates_only``."""
        grid = self._check(images)
        take = block_indices(len(self.trunk.blocks), indices)
        tokens, kept = self._tokens(images, grid, take, last=max(take) if intermediates_only else None)
        out = []
        for x in kept:
            x = self.trunk.norm(x) if norm else x
            patches = self._format(x[:, self.num_prefix :], grid, output_fmt)
            out.append((patches, x[:, : self.num_prefix]) if return_prefix_tokens else patches)
        if intermediates_only:
            return out
        return self.backbone_output(tokens, grid, output_fmt), out

    def extra_repr(self) -> str:
        return (
            f"teachers={self.teacher_names}, img_size={self.img_size}, patch_size={self.patch_size}, "
            f"cpe={self.cpe}, registers={self.num_registers}"
        )

    # ------------------------------------------------------------------ files

    def _save_pretrained(self, save_directory: Path) -> None:
        """Config, weights (safetensors), provenance and model card into ``save_directory``."""
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        (save_directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        if self.provenance is not None:
            (save_directory / PROVENANCE_FILE).write_text(json.dumps(self.provenance, indent=2) + "\n")
        (save_directory / CARD_FILE).write_text(model_card(self.config, self.provenance))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> PhisModel:
        from safetensors.torch import load_file

        folder = Path(model_id)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    repo_id=model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        weights = folder / WEIGHTS_FILE
        if config is None or not weights.is_file():
            raise FileNotFoundError(
                f"{folder} is not a phis model directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(python -m phis.export <checkpoint or run dir> <out dir> writes them)"
            )
        model = cls(config, **kwargs)
        model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
        model.to(map_location)
        provenance = folder / PROVENANCE_FILE
        if provenance.is_file():
            model.provenance = json.loads(provenance.read_text())
        return model.eval()


def _metric_rows(provenance: Mapping[str, Any]) -> list[str]:
    """Markdown rows of the held-out explained fractions per split and teacher, and the evaluation."""
    rows = []
    for split, per_teacher in (provenance.get("heldout") or {}).items():
        for name, r in per_teacher.items():
            mse, explained = r.get("mse_teacher", math.nan), r.get("explained", math.nan)
            rows.append(f"| {split} | {name} | {mse:.4g} | {explained:.3f} |")
    return rows


def model_card(config: Mapping[str, Any], provenance: Mapping[str, Any] | None) -> str:
    """A short README for a model directory: what the student is, its teachers, where it came from."""
    spec = config["trunk"]
    prov = dict(provenance or {})
    lines = [
        "---",
        "library_name: phis",
        "tags: [phis, image-feature-extraction, distillation]",
        "---",
        "",
        f"# {prov.get('name') or 'phis student'}",
        "",
        "A ViT student distilled from several frozen teachers with phis (label-free multi-teacher "
        "distillation, AM-RADIO framework, PHI-S normalization). Its teacher heads output each teacher's own "
        "space (the training normalizer is folded into them).",
        "",
        f"- trunk: {spec['depth']} blocks, width {spec['embed_dim']}, {spec['num_heads']} heads, "
        f"patch {spec['patch_size']}; {config['num_registers']} registers, one summary token per teacher",
        f"- trained at {config['img_size']} px; position table {config['table_size']}x{config['table_size']} "
        f"patches{' (CPE)' if config['cpe'] else ''}",
        f"- input: RGB in [0, 1], normalized inside with mean {config['pixel_mean']} "
        f"and std {config['pixel_std']}",
    ]
    if prov:
        lines.append(
            f"- training: {prov.get('steps', '?')} steps, normalizer {prov.get('normalizer', '?')}, "
            f"loss {prov.get('loss', '?')}; the full config is in {PROVENANCE_FILE}"
        )
    lines += ["", "| teacher | summary dim | feature dim | teacher grid | source |", "|---|---|---|---|---|"]
    for name, t in config["teachers"].items():
        source = t.get("source") or {}
        what = ", ".join(
            f"{k}={v}" for k, v in source.items() if k in ("family", "model", "tap", "pretrained")
        )
        grid = "x".join(str(v) for v in t.get("grid") or [])
        lines.append(
            f"| {name} | {t.get('summary_dim') or '-'} | {t['feature_dim']} | {grid} | {what or '-'} |"
        )
    rows = _metric_rows(prov)
    if rows:
        lines += ["", "Held-out teacher-space error of the run:", "", "| split | teacher | MSE | explained |",
                  "|---|---|---|---|", *rows]  # fmt: skip
    lines += [
        "",
        "```python",
        "import phis",
        "model = phis.load('<this directory>')",
        "summary, spatial = model(images)            # images: [B, 3, H, W] in [0, 1]",
        "teachers = model.forward_teachers(images)   # name -> (summary, features) in teacher space",
        "```",
        "",
    ]
    return "\n".join(lines)
