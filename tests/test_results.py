"""File-based results: atomic writes survive crashes, sweeps collect only finished jobs."""

import json
import math
import os

import pytest
from omegaconf import OmegaConf

from phis import results


def test_atomic_write_keeps_old_file_when_serialization_fails(tmp_path):
    path = tmp_path / "results.json"
    results.atomic_write_json(path, {"status": "finished", "x": 1})
    with pytest.raises(TypeError, match="cannot serialize"):
        results.atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"status": "finished", "x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_collect_and_is_finished(tmp_path):
    results.atomic_write_json(tmp_path / "a" / "results.json", {"status": "finished", "v": 1.0})
    results.atomic_write_json(tmp_path / "b" / "results.json", {"status": "running", "v": 2.0})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text("{truncated")
    found = results.collect_results(tmp_path)
    assert [r["v"] for r in found] == [1.0]
    assert found[0]["_dir"] == str(tmp_path / "a")
    assert results.is_finished(tmp_path / "a")
    assert not results.is_finished(tmp_path / "b")
    assert not results.is_finished(tmp_path / "c")
    assert not results.is_finished(tmp_path / "missing")


def test_append_jsonl(tmp_path):
    path = tmp_path / "eval" / "log.jsonl"
    results.append_jsonl(path, {"step": 1})
    results.append_jsonl(path, {"step": 2})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_mean_std_matches_sample_std():
    m, s = results.mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3)
    assert s == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert results.mean_std([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in results.mean_std([float("nan"), None]))
    assert results.format_mean_std([0.5, 0.7], digits=1, scale=100) == "60.0 ± 14.1"
    assert results.format_mean_std([]) == "—"
    assert results.format_mean_std([0.25, float("nan"), None]) == "0.25"  # one finite value
    assert results.format_mean_std([1234.5, 1236.5], digits=4, significant=True) == "1236 ± 1.4"
    assert results.format_mean_std([2.0], digits=4, significant=True) == "2"


def test_write_table(tmp_path):
    md, csv_path = results.write_table(tmp_path / "t", ["a", "b"], [[1, "x, y"]], title="T")
    assert md.read_text() == "### T\n\n| a | b |\n|---|---|\n| 1 | x, y |\n"
    assert csv_path.read_text().splitlines() == ["a,b", '1,"x, y"']


def test_import_object_errors():
    assert results.import_object("os.path.join") is os.path.join
    with pytest.raises(ValueError, match="dotted path"):
        results.import_object("join")


calls = []


def _record(sweep_dir, out_dir):
    calls.append((sweep_dir, out_dir))


def test_multirun_callback_calls_aggregator():
    cb = results.AggregateOnMultirunEnd(aggregator=f"{__name__}._record")
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "/sweep"}}}))
    assert calls[-1] == ("/sweep", "/sweep")


def test_atomic_write_uses_default_permissions(tmp_path):
    path = results.atomic_write_text(tmp_path / "x.txt", "hi")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
