"""experiments.checks.paper_geometry: the tiny run passes, a wrong geometry fails it; the real one (slow)."""

import dataclasses
from pathlib import Path

import pytest

from experiments.checks import paper_geometry as geometry


@pytest.fixture(scope="module")
def tiny_report() -> dict:
    return geometry.run(geometry.TINY, log=lambda line: None)


def test_tiny_run_has_the_expected_geometry_and_stage_mechanics(tiny_report) -> None:
    assert tiny_report["failures"] == []
    first, _, stage2 = tiny_report["steps"]
    assert stage2["teachers"]["sam"]["grid"] == (3, 3) and first["teachers"]["sam"]["grid"] == (2, 2)
    assert stage2["teachers"]["sam"]["encoder"] == 128 and stage2["teachers"]["clip"]["side"] == (32, 32)
    assert first["student_tokens"] == 4 + 4 + 4 * 4 and stage2["student_tokens"] == 4 + 4 + 6 * 6
    assert [s["partitions"] for s in tiny_report["steps"]] == ["per_teacher"] * 3
    assert first["teachers"]["dinov2"]["batch"] == 1  # one image of the four per teacher
    assert stage2["lr"] == first["lr"] and stage2["trunk_frozen"]  # the new stage restarts
    text = geometry.table(geometry.TINY, tiny_report)
    assert "48 px → 128 padded" in text and text.rstrip().endswith("PASS")


def test_any_mismatch_is_reported(tiny_report) -> None:
    wrong = dataclasses.replace(
        geometry.TINY,
        teachers={**geometry.TINY.teachers, "sam": geometry.Geometry(64, 128, 16, 16, None)},  # resized
        sizes=(32, 48),
    )
    failures = geometry.check(wrong, tiny_report)
    assert any("sam: side (32, 32), expected (64, 64)" in f for f in failures)
    assert any("sam: grid (3, 3), expected (4, 4)" in f for f in failures)
    broken = {**tiny_report, "steps": [dict(s) for s in tiny_report["steps"]]}
    broken["steps"][1]["loss"] = float("nan")
    broken["steps"][2]["counts"] = {n: c + 1 for n, c in broken["steps"][2]["counts"].items()}
    broken["steps"][2]["lr"] = broken["steps"][1]["lr"] * 1.5
    failures = geometry.check(geometry.TINY, broken)
    assert any("step 1: non-finite loss" in f for f in failures)
    assert any("statistics token counts" in f for f in failures)
    assert any("does not restart" in f for f in failures)


@pytest.mark.slow
def test_paper_geometry_on_the_cpu(tmp_path: Path) -> None:
    """The phis teacher set at real size (random weights, ~15 GiB of float32), the ViT-B/16 student."""
    out = tmp_path / "geometry.md"
    assert geometry.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "256 px → 1024 padded" in text and "432 px → 1024 padded" in text
    assert text.rstrip().endswith("PASS")
