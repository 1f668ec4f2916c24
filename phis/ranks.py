"""Average ordinal ranks across benchmarks, as in PHI-S Tables 1, 4 and 12.

Every method is ranked per raw metric (1 = best; ties share the minimum rank, "competition"
ranking), ranks are averaged within a benchmark group, and the group ranks are averaged into the
summary columns. Groups follow the paper: TMSE (teacher-space MSE, one metric per teacher), Cls
(zero-shot, kNN), Seg (ADE20k, VOC), COCO (SAM instance segmentation), LLaVA (its probe
benchmarks) and P3D (Probe3D: depth, surface normals, multi-view, SPair-71k). A group with no metric
run is left out, and the table says which groups and metrics were used.

Metric names follow ``phis.eval``: ``tmse/<teacher>``; Cls: ``knn``, ``zero_shot`` (the paper's ImageNet
numbers), ``knn/<set>``, ``knn_spatial/<set>``, ``zero_shot/<teacher>/<set>``,
``zero_shot_agreement/<teacher>/<set>``; Seg: ``ade20k``, ``voc``, ``seg/<set>``; ``sam_coco``;
``llava/<benchmark>``; ``probe3d/<task>``. Other metrics (``rankme/*``, ``tmse_explained/*``,
``teacher_zero_shot/*`` …) are not ranked. Only ``tmse/*`` is lower-is-better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phis.results import markdown_table, write_table

GROUP_ORDER = ("TMSE", "Cls", "Seg", "COCO", "LLaVA", "P3D")
# Summary column -> groups it leaves out of the average.
SUMMARIES: dict[str, tuple[str, ...]] = {
    "Avg": (),
    "Avg_noCOCO": ("COCO",),
    "Avg_noMSE_noCOCO": ("TMSE", "COCO"),
}
_EXACT = {"zero_shot": "Cls", "knn": "Cls", "ade20k": "Seg", "voc": "Seg", "sam_coco": "COCO"}
_PREFIX = {
    "tmse/": "TMSE",
    "knn/": "Cls",
    "knn_spatial/": "Cls",
    "zero_shot/": "Cls",
    "zero_shot_agreement/": "Cls",
    "seg/": "Seg",
    "llava/": "LLaVA",
    "probe3d/": "P3D",
}


def metric_group(metric: str) -> str | None:
    """The paper's benchmark group of a metric name, or None for metrics that are not ranked."""
    if metric in _EXACT:
        return _EXACT[metric]
    return next((g for p, g in _PREFIX.items() if metric.startswith(p)), None)


def higher_is_better(metric: str) -> bool:
    """Accuracy / mIoU-type metrics are better high; teacher-space MSE is better low."""
    return metric_group(metric) != "TMSE"


def rank_values(values: Mapping[str, float], higher_better: bool) -> dict[str, int]:
    """Competition ranks (1 = best, ties share the minimum rank); a NaN value is ranked last."""
    if not values:
        raise ValueError("rank_values needs at least one method, got none")

    def key(v: float) -> float:
        if math.isnan(v):
            return math.inf  # a diverged run is worse than any finite score
        return -v if higher_better else v

    keys = {m: key(float(v)) for m, v in values.items()}
    return {m: 1 + sum(other < k for other in keys.values()) for m, k in keys.items()}


@dataclass
class RankTable:
    """Per-metric ranks, per-group average ranks and the summary averages, with what was used."""

    methods: list[str]
    groups: dict[str, list[str]]  # group -> metrics used, in GROUP_ORDER
    metric_ranks: dict[str, dict[str, int]]  # metric -> method -> rank
    group_ranks: dict[str, dict[str, float]]  # group -> method -> mean rank
    summaries: dict[str, dict[str, float]]  # summary column -> method -> mean group rank
    excluded: dict[str, str] = field(default_factory=dict)  # metric -> why it was not ranked

    @property
    def columns(self) -> list[str]:
        return list(self.group_ranks) + list(self.summaries)

    def value(self, method: str, column: str) -> float:
        table = self.group_ranks if column in self.group_ranks else self.summaries
        return table[column][method]

    def rows(self, digits: int = 2) -> list[list[str | float]]:
        """One row per method: name, then the group and summary columns rounded to ``digits``."""
        return [[m] + [round(self.value(m, c), digits) for c in self.columns] for m in self.methods]

    def describe(self) -> str:
        """Which groups and metrics entered the ranks, and which were left out and why."""
        lines = [f"{g}: {', '.join(ms)}" for g, ms in self.groups.items()]
        missing = [g for g in GROUP_ORDER if g not in self.groups]
        if missing:
            lines.append(f"not run (omitted): {', '.join(missing)}")
        lines += [f"excluded {m}: {why}" for m, why in self.excluded.items()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        return markdown_table(["method", *self.columns], self.rows()) + "\n" + self.describe() + "\n"

    def write(self, stem: str | Path, title: str = "Average ranks") -> tuple[Path, Path]:
        """Write ``<stem>.md`` (table + groups used) and ``<stem>.csv``."""
        md, csv = write_table(stem, ["method", *self.columns], self.rows(), title=title)
        md.write_text(md.read_text() + "\n" + self.describe() + "\n")
        return md, csv


def rank_table(
    scores: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, Sequence[str]] | None = None,
    higher_better: Mapping[str, bool] | None = None,
) -> RankTable:
    """Rank ``scores[method][metric]`` per metric, average within groups, then across groups.

    ``groups`` (group -> metrics) defaults to the paper's grouping by metric name (``metric_group``);
    ``higher_better`` overrides the per-metric direction (default ``higher_is_better``). A metric that
    some method lacks cannot be ranked fairly and is excluded (listed in ``RankTable.excluded``).
    """
    methods = list(scores)
    if not methods:
        raise ValueError("rank_table needs scores for at least one method, got an empty mapping")
    all_metrics = list(dict.fromkeys(m for per in scores.values() for m in per))
    excluded: dict[str, str] = {}
    if groups is None:
        grouped: dict[str, list[str]] = {}
        for metric in all_metrics:
            g = metric_group(metric)
            if g is None:
                excluded[metric] = "not part of any rank group"
            else:
                grouped.setdefault(g, []).append(metric)
        groups = {g: grouped[g] for g in GROUP_ORDER if g in grouped}
    direction = dict(higher_better or {})

    used: dict[str, list[str]] = {}
    metric_ranks: dict[str, dict[str, int]] = {}
    for g, metrics in groups.items():
        for metric in metrics:
            lacking = [m for m in methods if metric not in scores[m]]
            if lacking:
                excluded[metric] = f"missing for {', '.join(lacking)}"
                continue
            hib = direction.get(metric, higher_is_better(metric))
            metric_ranks[metric] = rank_values({m: scores[m][metric] for m in methods}, hib)
            used.setdefault(g, []).append(metric)

    group_ranks = {
        g: {m: sum(metric_ranks[x][m] for x in ms) / len(ms) for m in methods} for g, ms in used.items()
    }
    summaries = {}
    for name, leave_out in SUMMARIES.items():
        kept = [g for g in group_ranks if g not in leave_out]
        if kept:
            summaries[name] = {m: sum(group_ranks[g][m] for g in kept) / len(kept) for m in methods}
    return RankTable(methods, used, metric_ranks, group_ranks, summaries, excluded)


def ordinal(values: Mapping[str, float]) -> dict[str, int]:
    """Competition ranks of average ranks (1 = lowest average rank)."""
    return {m: 1 + sum(o < v for o in values.values()) for m, v in values.items()}


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman correlation of two scorings of the same methods (Pearson of their average-tie ranks)."""
    keys = [k for k in a if k in b]

    def ranks(d: Mapping[str, float]) -> list[float]:
        vals = [d[k] for k in keys]
        return [sum(o < v for o in vals) + (sum(o == v for o in vals) + 1) / 2 for v in vals]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else math.nan
