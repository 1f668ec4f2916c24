"""experiments.bench.gpu runs end to end at toy sizes on the CPU (the GPU numbers need a GPU)."""

from pathlib import Path

import pytest

from experiments.bench import gpu as bench_gpu


def test_tiny_cpu_benchmark_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    rows = bench_gpu.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--batch-sizes",
            "2",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    assert [r["batch"] for r in rows] == [2, 4] and {r["mode"] for r in rows} == {
        "eager"
    }  # no compile on CPU
    for r in rows:
        parts = [r[f"{p}_ms"] for p in bench_gpu.PARTS]
        assert all(p > 0 for p in parts) and r["step_ms"] == pytest.approx(sum(parts))
        assert r["images_s"] == pytest.approx(1000 * r["batch"] / r["step_ms"])
        assert 0 < r["statistics_share"] < 1 and r["peak_gib"] > 0 and r["mfu"] is None
    text = (tmp_path / "bench.md").read_text()
    assert "tiny random models" in text and "statistics share" in text and text.count("| eager |") == 2


def test_student_flops_count_matches_a_hand_count() -> None:
    """ViT-B/16 at 256 px, 4 teachers' summary tokens + 4 registers: 264 tokens, 12 blocks of width 768."""
    cfg = bench_gpu.config(["teachers=phis", "student=vit_b16"])
    from phis.module import DistillModule

    specs = {n: {"summary_dim": 8, "feature_dim": 8, "grid": [4, 4]} for n in ("a", "b", "c", "d")}
    plain = {
        k: dict(v) for k, v in ((k, cfg[k]) for k in ("student", "normalizer", "loss", "distill", "optim"))
    }
    module = DistillModule(specs, **plain, max_steps=10)
    t, d = 256 + 4 + 4, 768
    assert bench_gpu.trunk_flops_per_image(module) == 12 * (24 * t * d * d + 4 * t * t * d)


def test_real_architectures_build_with_random_weights_and_nothing_downloaded() -> None:
    """random_init: SAM ViT-B's encoder at its real size; an unknown DINOv2 id names the known ones."""
    from phis.teachers import build_teacher

    sam = build_teacher({"family": "sam", "name": "sam", "variant": "vit_b", "random_init": True})
    assert sam.feature_dim == 768 and sam.grid == 64 and sam.summary_dim is None
    assert 85e6 < sum(p.numel() for p in sam.parameters()) < 95e6  # SAM ViT-B image encoder: ~89M
    with pytest.raises(ValueError, match="random_init knows the architectures.*dinov2-with-registers-giant"):
        build_teacher(
            {"family": "hf_dinov2", "name": "d", "model": "facebook/dinov2-small", "random_init": True}
        )
