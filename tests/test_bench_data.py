"""experiments.bench.data runs end to end on a few images and reports every pipeline of both parts."""

import io
import json
from pathlib import Path

from PIL import Image

from experiments.bench import data as bench


def test_benchmark_jpegs_have_sides_between_384_and_1024() -> None:
    for jpeg in bench.bench_jpegs(6, seed=3):
        with Image.open(io.BytesIO(jpeg)) as im:
            assert im.format == "JPEG" and all(bench.SIDES[0] <= s <= bench.SIDES[1] for s in im.size)


def test_quick_run_writes_both_parts_with_pixel_differences(tmp_path: Path) -> None:
    out = tmp_path / "bench_data"
    args = [
        "--quick",
        "--images",
        "4",
        "--sizes",
        "48",
        "--batches",
        "5",
        "--out",
        str(out),
        "--note",
        "busy",
    ]
    results = bench.main(args)
    decode = {r["pipeline"]: r for r in results["decode"]}
    assert {"ours, decode=reduced", "ours, decode=exact", bench.BASELINE} <= set(decode)
    assert decode["ours, decode=exact"]["mean_diff"] == 0 == decode["ours, decode=exact"]["max_diff"]
    assert 0 < decode["ours, decode=reduced"]["mean_diff"] <= bench.BOUND
    assert decode[bench.BASELINE]["mean_diff"] > 0 and decode[bench.BASELINE]["vs_open_clip"] == 1
    assert all(r["median_ms"] > 0 and len(r["ms"]) == 1 for r in decode.values())
    loader = {r["pipeline"]: r for r in results["loader"]}
    assert set(loader) == {"ours, decode=reduced", bench.BASELINE}
    assert all(r["median_images_s"] > 0 and r["size"] == 48 for r in loader.values())
    (verdict,) = results["verdict"]
    assert verdict["speedup"] == decode["ours, decode=reduced"]["vs_open_clip"]
    assert json.loads(out.with_suffix(".json").read_text())["machine"]["cpu"]
    md = out.with_suffix(".md").read_text()
    assert "(a) Decode" in md and "(b) Whole loader" in md and "Load average" in md and "busy" in md
    assert len(out.with_suffix(".csv").read_text().splitlines()) == 1 + len(decode) + len(loader)
