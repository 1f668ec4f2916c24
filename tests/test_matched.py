"""Statistics-matched teachers: the fitted affine maps hit a Table 7 row exactly and stay invertible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phis.photos import OfflineImagePool
from phis.stats import TABLE7_KEYS, ChannelMoments, activation_stats
from phis.teachers import build_teacher
from phis.teachers.matched import fit_affine_map, table7_rows, target_channel_stats

ROWS = table7_rows()


def brute_force_stats(values: np.ndarray) -> dict[str, float]:
    """Table 7 statistics of a token matrix [N, C] computed directly in float64."""
    mean, std = values.mean(0), values.std(0)
    return {
        "channel_mean_min": mean.min(),
        "channel_mean_max": mean.max(),
        "channel_std_min": std.min(),
        "channel_std_max": std.max(),
        "global_mean": values.mean(),
        "global_std": values.std(),
    }


def hostile_tokens(n: int, c: int, seed: int = 0) -> np.ndarray:
    """Float32 tokens with large channel offsets (±60), stds 2–30 and a rank-deficient part."""
    rng = np.random.default_rng(seed)
    low_rank = rng.normal(size=(n, 3)) @ rng.normal(size=(3, c))
    x = rng.normal(size=(n, c)) * rng.uniform(2, 30, c) + rng.uniform(-60, 60, c) + 5 * low_rank
    return x.astype(np.float32)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_target_statistics_hit_every_row_exactly(row: str) -> None:
    rng = np.random.default_rng(1)
    mean, std = rng.normal(size=1280) * 3, rng.lognormal(size=1280)
    mu, sd, shape = target_channel_stats(mean, std, ROWS[row])
    got = {
        "channel_mean_min": mu.min(),
        "channel_mean_max": mu.max(),
        "channel_std_min": sd.min(),
        "channel_std_max": sd.max(),
        "global_mean": mu.mean(),
        "global_std": np.sqrt(np.mean(sd**2) + np.var(mu)),
    }
    for key in TABLE7_KEYS:
        assert got[key] == pytest.approx(ROWS[row][key], rel=1e-7, abs=1e-12), key
    # The targets keep the base channels' order (a monotone relabelling of their statistics).
    assert np.all(np.diff(sd[np.argsort(std)]) >= 0)
    assert np.all(np.diff(mu[np.argsort(mean)]) >= 0)
    assert shape["p"] > 0 and shape["q"] > 0


@pytest.mark.parametrize("row", ["sam", "dfn_clip"])
def test_affine_map_on_hostile_tokens_matches_brute_force(row: str) -> None:
    x = hostile_tokens(4000, 1024)
    moments = ChannelMoments(1024, torch.device("cpu"))
    for chunk in np.array_split(x, 7):  # streamed in chunks, as over a pool
        moments.update(torch.from_numpy(chunk))
    scale, shift = fit_affine_map(moments, ROWS[row])[:2]
    assert torch.all(scale > 0)  # invertible, order-preserving per channel
    mapped = x.astype(np.float64) * scale.numpy() + shift.numpy()
    got = brute_force_stats(mapped)
    for key in TABLE7_KEYS:
        assert got[key] == pytest.approx(ROWS[row][key], rel=1e-6, abs=1e-9), key
    back = (mapped - shift.numpy()) / scale.numpy()
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-9 * np.abs(x).max())


def test_impossible_rows_and_bad_input_fail_clearly() -> None:
    rng = np.random.default_rng(2)
    # SAM's extreme channel means alone exceed its global variance when there are only 64 channels.
    with pytest.raises(ValueError, match="cannot be met by 64 channels"):
        target_channel_stats(rng.normal(size=64), rng.lognormal(size=64), ROWS["sam"])
    bad = ChannelMoments(8, torch.device("cpu"))
    bad.update(torch.full((5, 8), float("nan")))
    with pytest.raises(ValueError, match="not finite"):
        fit_affine_map(bad, ROWS["dinov2"])
    constant = ChannelMoments(8, torch.device("cpu"))
    constant.update(torch.ones(5, 8))
    with pytest.raises(ValueError, match="8 of 8 channels of the base teacher are constant"):
        fit_affine_map(constant, ROWS["dinov2"])


def test_unknown_row_names_the_choices() -> None:
    with pytest.raises(ValueError, match="Table 7 row 'clip'; choose one of dfn_clip, siglip"):
        build_teacher({"family": "stats_matched", "name": "x", "row": "clip", "base": {}, "pool": {}})


def test_matched_teacher_over_its_pool_and_memo(tmp_path, monkeypatch) -> None:
    pool = {"split": "train", "size": 64, "count": 24, "seed": 0}
    cfg = {
        "family": "stats_matched",
        "name": "sam_like",
        "row": "sam",
        "base": {"family": "efficientnet_lite", "variant": 0, "feature_tap": "head_preact", "input_size": 64},
        "pool": pool,
        "memo_dir": str(tmp_path),
    }
    teacher = build_teacher(cfg)
    images = OfflineImagePool(**pool).images.float() / 255.0
    out = teacher(images)
    base = teacher.base(images)
    assert torch.equal(out.summary, base.summary)  # the summary is left alone
    tokens = out.features.permute(0, 2, 3, 1).reshape(-1, teacher.feature_dim).double()
    moments = ChannelMoments(teacher.feature_dim, torch.device("cpu"))
    moments.update(tokens)
    stats = activation_stats(moments)
    for key in TABLE7_KEYS:
        assert stats[key] == pytest.approx(ROWS["sam"][key], rel=1e-4, abs=1e-6), key
    assert len(list((tmp_path / "stats_match").glob("*.pt"))) == 1

    # A second build reads the stored map instead of running the base teacher over the pool again.
    def no_pass(*args, **kwargs):
        raise AssertionError("the map was refitted instead of read from memo_dir")

    monkeypatch.setattr(type(teacher), "base_moments", no_pass)
    again = build_teacher(cfg)
    assert torch.equal(again.scale, teacher.scale) and torch.equal(again.shift, teacher.shift)
    assert hasattr(again, "classify_summary")  # zero-shot agreement still has the base classifier
