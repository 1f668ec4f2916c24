"""File-based results: atomic writes, sweep collection, mean ± std tables, the end-of-sweep hook.

Every job writes one ``results.json`` in its own output directory; tables are built from those files
only, so W&B (if used) mirrors results but never holds the only copy, and a sweep that dies half-way
is aggregated from what finished.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

RESULTS_FILE = "results.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` so a crash leaves either the old file or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (numpy/torch values converted)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line (one evaluation) to a log; each line is written with a single call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def is_finished(run_dir: str | os.PathLike) -> bool:
    """A job is finished when its ``results.json`` exists and says so; sweeps skip such jobs."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        return False
    try:
        return read_json(path).get("status") == "finished"
    except (json.JSONDecodeError, OSError):
        return False


def collect_results(root: str | os.PathLike) -> list[dict]:
    """Every finished ``results.json`` under ``root`` (recursively), with its directory attached."""
    out = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        try:
            res = read_json(path)
        except (json.JSONDecodeError, OSError):
            continue
        if res.get("status") == "finished":
            res["_dir"] = str(path.parent)
            out.append(res)
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values; NaN if none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def format_mean_std(
    values: Sequence[float], digits: int = 2, scale: float = 1.0, significant: bool = False
) -> str:
    """``'m ± s'`` of the finite values (``'m'`` for one, ``'—'`` for none) after multiplying by ``scale``:
    ``digits`` decimals for both, or with ``significant`` ``digits`` significant figures (s to two)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "—"
    m, s = mean_std(vals)
    m, s = m * scale, s * scale
    if significant:
        return f"{m:.{digits}g}" if len(vals) == 1 else f"{m:.{digits}g} ± {s:.2g}"
    return f"{m:.{digits}f}" if len(vals) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are rendered with ``str``."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(
    stem: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = ""
) -> tuple[Path, Path]:
    """Write one table as ``<stem>.md`` (with an optional title) and ``<stem>.csv``, atomically."""
    stem = Path(stem)
    md = (f"### {title}\n\n" if title else "") + markdown_table(header, rows)
    md_path = atomic_write_text(stem.with_suffix(".md"), md)
    lines: list[str] = []

    class _Sink:
        def write(self, s: str) -> None:
            lines.append(s)

    writer = csv.writer(_Sink())
    writer.writerow(header)
    writer.writerows(rows)
    csv_path = atomic_write_text(stem.with_suffix(".csv"), "".join(lines))
    return md_path, csv_path


def import_object(dotted: str) -> Any:
    """Import ``pkg.module.attr`` (or ``pkg.module:attr``)."""
    module, _, attr = dotted.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"expected a dotted path 'package.module.name', got {dotted!r}")
    return getattr(importlib.import_module(module), attr)


class AggregateOnMultirunEnd(Callback):
    """Hydra callback: after a multirun, call ``aggregator(sweep_dir, out_dir)`` on the launching host.

    It runs in ``on_multirun_end`` (the launching process), never in ``on_job_end``, which under the
    SLURM launcher runs on a compute node once per job.
    """

    def __init__(self, aggregator: str, out_dir: str | None = None) -> None:
        self.aggregator = aggregator
        self.out_dir = out_dir

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        fn: Callable[..., Any] = import_object(self.aggregator)
        sweep_dir = config.hydra.sweep.dir
        fn(sweep_dir, self.out_dir or sweep_dir)


def run_metrics(res: Mapping[str, Any]) -> dict[str, float]:
    """Flat metric name → value: ``results["eval"]["metrics"]`` and the held-out teacher metrics.

    Training stores its held-out teacher numbers once, under ``heldout``; the evaluation names the split
    (``eval.details.tmse.heldout``; without an evaluation: ``test``, else ``val``), whose numbers become
    ``tmse/<teacher>``, ``tmse_explained/…``, ``err_var_range[_norm]/…`` and ``summary_cos/…``. Older runs
    that also copied them into ``eval.metrics`` read the same. The explained fraction on each held-out
    split is kept as ``explained_<split>/<teacher>``.
    """
    from phis.metrics import teacher_metric_names  # torch only when asked

    ev = res.get("eval") or {}
    out = {k: float(v) for k, v in (ev.get("metrics") or {}).items() if v is not None}
    heldout = res.get("heldout") or {}
    split = ((ev.get("details") or {}).get("tmse") or {}).get("heldout")
    per_teacher = heldout.get(split) or heldout.get("test") or heldout.get("val") or {}
    derived = {k: float(v) for k, v in teacher_metric_names(per_teacher).items()}
    out = dict(sorted({**derived, **out}.items()))  # results.json's key order (it is written sorted)
    for name, per_teacher in heldout.items():
        for teacher, r in per_teacher.items():
            if r.get("explained") is not None:
                out[f"explained_{name}/{teacher}"] = float(r["explained"])
    return out
