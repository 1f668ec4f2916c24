"""Teacher cache: keying, exact stored values, streaming statistics, atomic builds, no silent overflow."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from phis.cache import TeacherCache, cache_key
from phis.photos import OfflineImagePool
from phis.teachers import TeacherOutput


class OffsetTeacher(nn.Module):
    """Stand-in teacher: a fixed random 4x4-stride conv with SAM-like offsets (means near -60)."""

    input_size, patch_size = 16, 4

    def __init__(self, dim: int = 6, scale: float = 5.0, fail_after: int | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(dim, 3, 4, 4, generator=g) * scale, requires_grad=False)
        self.offset = -60.0 + torch.randn(dim, generator=g)
        self.calls, self.fail_after = 0, fail_after

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("teacher died mid-build")
        feats = nn.functional.conv2d(images, self.weight, stride=4) + self.offset[:, None, None]
        return TeacherOutput(summary=feats.mean(dim=(2, 3))[:, :3], features=feats)


@pytest.fixture
def pool() -> OfflineImagePool:
    return OfflineImagePool("train", size=16, count=10, seed=0)


def test_key_changes_with_teacher_resolution_images_and_dtype(pool) -> None:
    cfg = {"family": "x", "variant": 0, "tap": "a"}
    images = pool.fingerprint()
    base = cache_key(cfg, 16, images, "float16")
    assert base == cache_key(dict(reversed(list(cfg.items()))), 16, images, "float16")  # order-free
    assert base != cache_key({**cfg, "tap": "b"}, 16, images, "float16")
    assert base != cache_key(cfg, 32, images, "float16")
    assert base != cache_key(cfg, 16, {**images, "seed": 1}, "float16")
    assert base != cache_key(cfg, 16, images, "float32")


def test_build_stores_exact_outputs_and_float64_moments(tmp_path, pool) -> None:
    teacher = OffsetTeacher()
    cache = TeacherCache(tmp_path, "t", {"family": "stand-in"}, pool).ensure(lambda: teacher, batch_size=4)
    images = torch.stack([pool[i] for i in range(len(pool))])
    ref = teacher(images)
    feats = torch.from_numpy(np.array(cache.features)).float()  # [N, h, w, C]
    assert feats.shape == (10, 4, 4, 6) and cache.features.dtype == np.float16
    torch.testing.assert_close(feats, ref.features.permute(0, 2, 3, 1).half().float())
    torch.testing.assert_close(torch.from_numpy(np.array(cache.summary)).float(), ref.summary.half().float())
    assert cache.spec == {
        "summary_dim": 3,
        "feature_dim": 6,
        "grid": (4, 4),
        "input_size": 16,
        "patch_size": 4,
    }

    y = feats.reshape(-1, 6).double()  # float64 two-pass reference of the stored values
    m = cache.moments()
    torch.testing.assert_close(m.mean, y.mean(0))
    torch.testing.assert_close(m.covariance, torch.cov(y.T, correction=0))
    stats = cache.activation_stats()
    assert stats["channel_mean_max"] < -30 and stats["tokens"] == 160
    assert math.isclose(stats["global_std"], float(y.std(unbiased=False)), rel_tol=1e-9)
    assert math.isclose(stats["alpha_phis"], float(y.var(0, unbiased=False).mean()) ** -0.5, rel_tol=1e-9)
    assert stats["alpha_gs"] <= stats["alpha_phis"]

    item = cache.item(7)
    assert torch.equal(item["features"], torch.from_numpy(np.array(cache.features[7])))
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["count"] == 10 and meta["images"] == pool.fingerprint()


def test_hit_does_not_build_and_changed_config_rebuilds(tmp_path, pool) -> None:
    built = []

    def factory():
        built.append(1)
        return OffsetTeacher()

    a = TeacherCache(tmp_path, "t", {"family": "stand-in", "tap": 1}, pool).ensure(factory)
    TeacherCache(tmp_path, "t", {"family": "stand-in", "tap": 1}, pool).ensure(factory)
    assert len(built) == 1
    b = TeacherCache(tmp_path, "t", {"family": "stand-in", "tap": 2}, pool).ensure(factory)
    c = TeacherCache(
        tmp_path, "t", {"family": "stand-in", "tap": 1}, OfflineImagePool("train", 16, 11)
    ).ensure(factory)
    assert len(built) == 3 and len({a.path, b.path, c.path}) == 3
    entries = sorted(p.name for p in tmp_path.iterdir() if p.name != ".locks")
    assert entries == sorted(p.name for p in (a.path, b.path, c.path))


def test_killed_build_leaves_nothing_behind(tmp_path, pool) -> None:
    cache = TeacherCache(tmp_path, "t", {"family": "stand-in"}, pool)
    with pytest.raises(RuntimeError, match="mid-build"):
        cache.build(OffsetTeacher(fail_after=1), batch_size=4)
    assert not cache.ready and list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not built"):
        cache.features  # noqa: B018


def test_float16_overflow_is_an_error_not_inf(tmp_path, pool) -> None:
    cache = TeacherCache(tmp_path, "t", {"family": "stand-in"}, pool)
    with pytest.raises(FloatingPointError, match="cache.dtype=float32"):
        cache.build(OffsetTeacher(scale=1e6), batch_size=4)
    ok = TeacherCache(tmp_path, "t", {"family": "stand-in"}, pool, dtype="float32")
    ok.build(OffsetTeacher(scale=1e6), batch_size=4)
    assert ok.features.dtype == np.float32 and np.isfinite(ok.features).all()
    with pytest.raises(ValueError, match="float16, float32"):
        TeacherCache(tmp_path, "t", {}, pool, dtype="int8")


def test_jobs_started_together_build_an_entry_once(tmp_path, pool) -> None:
    """Two jobs (threads here) ensure the same entry at once: one builds, the other waits and reads."""
    import threading

    built, start = [], threading.Barrier(2)

    def make() -> OffsetTeacher:
        built.append(threading.get_ident())
        return OffsetTeacher()

    def job() -> None:
        cache = TeacherCache(tmp_path, "t", {"family": "stand-in"}, pool)
        start.wait()
        cache.ensure(make, batch_size=2)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(built) == 1 and TeacherCache(tmp_path, "t", {"family": "stand-in"}, pool).ready
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_ensure_without_waiting_leaves_an_entry_held_elsewhere(tmp_path, pool) -> None:
    """wait=False returns at once, unbuilt, while another holder has the entry's lock; later it builds."""
    from phis.cache import _entry_lock

    cache = TeacherCache(tmp_path, "t", {"family": "stand-in"}, pool)
    made = []

    def make() -> OffsetTeacher:
        made.append(1)
        return OffsetTeacher()

    (tmp_path / ".locks").mkdir()
    with _entry_lock(tmp_path / ".locks" / cache.path.name) as held:
        assert held
        assert not cache.ensure(make, batch_size=4, wait=False).ready and made == []
    assert cache.ensure(make, batch_size=4, wait=False).ready and made == [1]


def test_side_by_side_jobs_build_free_entries_before_waiting(tmp_path, pool) -> None:
    """ensure_all skips an entry another job is building, builds the free one, then waits for the first:
    here the 'other job' releases entry a only once b exists, so waiting on a first would stall."""
    import threading
    import time

    from phis.cache import _entry_lock, ensure_all

    a = TeacherCache(tmp_path, "a", {"family": "stand-in"}, pool)
    b = TeacherCache(tmp_path, "b", {"family": "stand-in"}, pool)
    (tmp_path / ".locks").mkdir()
    order, locked = [], threading.Event()

    def other_job() -> None:
        with _entry_lock(tmp_path / ".locks" / a.path.name):
            locked.set()
            deadline = time.monotonic() + 20
            while not b.ready and time.monotonic() < deadline:
                time.sleep(0.05)

    def maker(name: str):
        return lambda: order.append(name) or OffsetTeacher()

    holder = threading.Thread(target=other_job)
    holder.start()
    locked.wait(10)
    ensure_all([(a, maker("a")), (b, maker("b"))], batch_size=4)
    holder.join(30)
    assert order == ["b", "a"] and a.ready and b.ready


def test_cache_command_lists_and_clears_only_cache_entries(tmp_path, pool, capsys) -> None:
    from phis.cache import main

    cache = TeacherCache(tmp_path, "t", {"family": "tiny"}, pool)
    cache.path.mkdir(parents=True)
    (cache.path / "features.npy").write_bytes(b"x" * 2048)
    (tmp_path / "digits_224px.npz").write_bytes(b"y")
    (tmp_path / "notes.txt").write_text("mine")
    assert main([str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert cache.path.name in listed and "notes.txt: not a cache entry, left alone" in listed
    assert cache.path.is_dir()  # listing removes nothing
    assert main([str(tmp_path), "--clear"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
