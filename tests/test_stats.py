"""StreamingMoments against float64 two-pass references on hostile (SAM-like, float32) features.

The float64-product path (``dtype=torch.float64``) is held to ~1e-11; the default float32-product path
to 1e-6 of max |Σ|, on the same data where the naive float32 formula is off by orders of magnitude more.
"""

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from phis import stats
from phis.normalizers import make_normalizer
from phis.stats import TABLE7_KEYS, ChannelMoments, StreamingMoments, activation_stats, token_moments

F64 = torch.float64


def sam_like(n: int, c: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Correlated features [n, c] with channel means in ±60 and stds in 2..30 (like SAM's trunk)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    means = torch.rand(c, generator=g, dtype=f64) * 120 - 60
    stds = 2 + 28 * torch.rand(c, generator=g, dtype=f64)
    mix = torch.eye(c, dtype=f64) + torch.randn(c, c, generator=g, dtype=f64) / c**0.5
    mix = mix / mix.norm(dim=1, keepdim=True)  # unit-variance rows, so channel std = stds
    z = torch.randn(n, c, generator=g, dtype=f64) @ mix.T
    return (means + z * stds).to(dtype)


def reference(y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass float64 mean and population covariance of the tokens as stored."""
    a = y.reshape(-1, y.shape[-1]).double().numpy()
    return a.mean(0), np.cov(a, rowvar=False, bias=True)


def feed(y: torch.Tensor, sizes: list[int], dtype: torch.dtype = F64) -> StreamingMoments:
    m = StreamingMoments(y.shape[-1], dtype)
    for chunk in y.split(sizes):
        m.update(chunk)
    return m


def test_float32_offsets_match_float64_reference_and_naive_fails():
    y = sam_like(3000, 48)
    m = feed(y, [1, 7, 992, 2000])
    mean, cov = reference(y)
    scale = np.abs(cov).max()
    err = np.abs(m.covariance.numpy() - cov).max()
    assert m.count.item() == 3000
    assert np.abs(m.mean.numpy() - mean).max() < 1e-11
    assert err < 1e-11 * scale
    # The data is hostile: the one-pass float32 formula E[yyᵀ] - μμᵀ is visibly wrong on it.
    mu32 = y.mean(0)
    naive = (y.T @ y) / y.shape[0] - torch.outer(mu32, mu32)
    assert np.abs(naive.double().numpy() - cov).max() > 1e4 * err


def test_batch_split_invariance_and_symmetry():
    y = sam_like(1000, 16, seed=1)
    a = feed(y, [1000])
    b = feed(y, [3, 500, 1, 496])
    torch.testing.assert_close(a.covariance, b.covariance, rtol=1e-12, atol=1e-12)
    assert torch.equal(b.m2, b.m2.T)


def test_float32_products_within_1e6_of_float64_reference():
    # Enough tokens for full 16,384-token chunks: the float32 error grows with chunk length.
    y = sam_like(40_000, 64, seed=11)
    m = feed(y, [5, 33_000, 6_995], dtype=torch.float32)
    mean, cov = reference(y)
    scale = np.abs(cov).max()
    err = np.abs(m.covariance.numpy() - cov).max()
    assert np.abs(m.mean.numpy() - mean).max() < 1e-6 * np.sqrt(np.diag(cov)).min()
    assert err < 1e-6 * scale
    assert torch.equal(m.m2, m.m2.T)
    # What centring buys: the naive float32 E[yyᵀ] − μμᵀ is several times further off. How far depends
    # on the BLAS kernel: more than 10× with MKL on an AVX2 host, 8.2× (1.2e-6 of max |Σ|) on AVX-512.
    mu32 = y.mean(0)
    naive = (y.T @ y) / y.shape[0] - torch.outer(mu32, mu32)
    assert np.abs(naive.double().numpy() - cov).max() > 5 * err


@pytest.mark.parametrize("dim", [17, 600, 1100])  # one, two and four column blocks of the product
def test_float32_products_across_column_blocks_are_symmetric_and_close(dim):
    # Two chunks at every width: 16,384 + 1,616 tokens (15,252 + 2,748 at 1,100 channels).
    y = sam_like(18_000, dim, seed=dim)
    m = feed(y, [18_000], dtype=torch.float32)
    mean, cov = reference(y)
    assert torch.equal(m.m2, m.m2.T)
    assert np.abs(m.covariance.numpy() - cov).max() < 1e-6 * np.abs(cov).max()
    assert np.abs(m.mean.numpy() - mean).max() < 1e-6 * np.sqrt(np.diag(cov)).min()


@pytest.mark.parametrize("dim", [512, 1000, 1536])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 6])
def test_scatter_tasks_cover_the_upper_triangle_once_largest_first(dim, blocks):
    tasks = stats._scatter_tasks(dim, blocks)
    hits = np.zeros((dim, dim), dtype=int)
    for lo, hi, lo2, hi2 in tasks:
        assert lo < hi and lo2 < hi2 and lo <= lo2
        hits[lo:hi, lo2:hi2] += 1
    assert np.array_equal(np.triu(hits), np.triu(np.ones_like(hits)))
    work = [(hi - lo) * (hi2 - lo2) * (0.5 if lo == lo2 else 1) for lo, hi, lo2, hi2 in tasks]
    assert work == sorted(work, reverse=True) and len(tasks) == blocks * (blocks + 1) // 2


@functools.cache
def _wide_features() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """18,000 SAM-like tokens of 1,100 channels and their float64 mean and covariance (made once)."""
    y = sam_like(18_000, 1100, seed=21)
    return (y, *reference(y))


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_cpu_products_agree_for_any_thread_count(threads, monkeypatch):
    # 1,100 channels: one syrk on 1 thread; 4 blocks shared by 2, 3 or 4 threads otherwise.
    y, mean, cov = _wide_features()
    pools = []
    make_pool = stats._product_pool
    monkeypatch.setattr(stats, "_product_pool", lambda n: pools.append(n) or make_pool(n))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        m = feed(y, [18_000], dtype=torch.float32)
    finally:
        torch.set_num_threads(previous)
    assert pools == ([] if threads == 1 else [threads - 1, threads - 1])  # two chunks
    assert torch.equal(m.m2, m.m2.T)
    assert np.abs(m.covariance.numpy() - cov).max() < 1e-6 * np.abs(cov).max()
    assert np.abs(m.mean.numpy() - mean).max() < 1e-6 * np.sqrt(np.diag(cov)).min()


def test_interleaved_accumulators_share_scratch_buffers_safely():
    a_data, b_data = sam_like(20_000, 600, seed=22), sam_like(7_000, 40, seed=23).double()
    alone_a = feed(a_data, [9_000, 11_000], dtype=torch.float32)
    alone_b = feed(b_data, [3_000, 4_000])
    a, b = StreamingMoments(600), StreamingMoments(40, F64)
    a.update(a_data[:9_000])
    b.update(b_data[:3_000])
    a.update(a_data[9_000:])
    b.update(b_data[3_000:])
    for mixed, alone in ((a, alone_a), (b, alone_b)):
        torch.testing.assert_close(mixed.m2, alone.m2, rtol=1e-12, atol=0)
        torch.testing.assert_close(mixed.mean, alone.mean, rtol=1e-12, atol=0)


def _pool_answer(queue):
    queue.put(stats._product_pool(1).submit(int, "7").result(timeout=20))


def test_product_pool_is_rebuilt_in_a_forked_child():
    assert stats._product_pool(1).submit(int, "5").result(timeout=20) == 5  # the parent's pool is live
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_pool_answer, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=30) == 7  # a pool inherited from the parent would have no thread
    finally:
        child.join(5)
        child.kill()


def test_half_precision_inputs_use_float32_products():
    y = sam_like(3000, 24, seed=12)  # float16 holds ±60 offsets with steps of 1/32
    for dtype in (torch.bfloat16, torch.float16):
        yh = y.to(dtype)
        m = StreamingMoments(24)
        m.update(yh)
        mean_h, cov_h = reference(yh)  # the reference of the values as stored in half precision
        assert np.abs(m.mean.numpy() - mean_h).max() < 1e-6 * np.sqrt(np.diag(cov_h)).min()
        assert np.abs(m.covariance.numpy() - cov_h).max() < 1e-6 * np.abs(cov_h).max()


def test_product_dtype_must_be_float32_or_float64():
    with pytest.raises(ValueError, match="dtype must be one of float32, float64"):
        StreamingMoments(4, torch.float16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        StreamingMoments(4, "float16")
    assert StreamingMoments(4, "float64").dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_path_ignores_tf32():
    y = sam_like(20_000, 128, seed=13)
    mean, cov = reference(y)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 on, as a bf16 training run usually sets it
    try:
        for dtype in (torch.float32, torch.bfloat16):
            yd = y.to(dtype)
            m = StreamingMoments(128).cuda()
            m.update(yd.cuda())
            cov_d = reference(yd)[1]
            err = np.abs(m.covariance.cpu().numpy() - cov_d).max()
            assert err < 1e-6 * np.abs(cov_d).max()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.get_float32_matmul_precision() == previous


def test_bfloat16_and_leading_dims():
    y = sam_like(4 * 50, 8, seed=2).to(torch.bfloat16).reshape(4, 50, 8)
    m = StreamingMoments(8, F64)
    m.update(y)
    mean, cov = reference(y)
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(m.covariance.numpy(), cov, rtol=1e-10, atol=1e-8)


def test_mask_selects_tokens_and_ignores_masked_nans():
    y = sam_like(6 * 40, 12, seed=3).reshape(6, 40, 12)
    mask = torch.rand(6, 40) > 0.4
    y_bad = y.clone()
    y_bad[~mask] = float("nan")  # padding tokens may hold anything
    m = StreamingMoments(12, F64)
    m.update(y_bad, mask)
    mean, cov = reference(y[mask])
    assert m.count.item() == mask.sum().item()
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=0, atol=1e-11)
    np.testing.assert_allclose(m.covariance.numpy(), cov, rtol=1e-11, atol=1e-9)


def test_mask_errors():
    m = StreamingMoments(4)
    with pytest.raises(ValueError, match="mask shape"):
        m.update(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        m.update(torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="last dim 4"):
        m.update(torch.zeros(2, 5))


def test_empty_batches_are_noops():
    y = sam_like(10, 5, seed=4)
    m = feed(y, [10])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.update(torch.zeros(0, 5))
    m.update(torch.zeros(3, 0, 5))
    m.update(y, torch.zeros(10, dtype=torch.bool))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_single_token_then_more():
    y = sam_like(30, 6, seed=5, dtype=torch.float64)
    m = StreamingMoments(6)
    m.update(y[:1])
    assert m.count.item() == 1
    assert torch.equal(m.mean, y[0])
    assert torch.equal(m.covariance, torch.zeros(6, 6, dtype=torch.float64))
    m.update(y[1:])
    np.testing.assert_allclose(m.covariance.numpy(), reference(y)[1], rtol=1e-12, atol=1e-10)


def test_float32_sum_overflow_names_the_float64_option():
    y = torch.full((8, 3), 3e38)
    m = StreamingMoments(3)
    with pytest.raises(ValueError, match="overflow torch.float32 sums; use .*dtype=torch.float64"):
        m.update(y)
    m64 = StreamingMoments(3, F64)
    m64.update(y)
    assert m64.mean.tolist() == pytest.approx([3e38] * 3, rel=1e-7)


def test_float32_square_overflow_with_finite_sums_is_reported():
    y = torch.full((8, 3), 1e20) + torch.arange(8.0)[:, None] * 1e19  # squares overflow float32, sums not
    m = StreamingMoments(3)
    with pytest.raises(ValueError, match="overflow torch.float32 sums; use .*dtype=torch.float64"):
        m.update(y)
    assert m.count.item() == 0 and torch.equal(m.m2, torch.zeros(3, 3, dtype=F64))


def test_update_works_in_and_out_of_inference_mode_in_one_thread():
    """In a fresh thread (empty per-thread buffers), the first update runs under inference mode."""
    y = sam_like(500, 6, seed=31)
    moments = {}

    def both() -> None:
        with torch.inference_mode():
            moments["inside"] = StreamingMoments(6)
            moments["inside"].update(y)
        moments["outside"] = StreamingMoments(6)
        moments["outside"].update(y)  # the buffers made under inference mode are not reused here

    with ThreadPoolExecutor(1) as pool:
        pool.submit(both).result()
    assert torch.equal(moments["outside"].m2, moments["inside"].m2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_and_leaves_state(bad):
    y = sam_like(20, 4, seed=6)
    m = feed(y, [20])
    before = m.m2.clone()
    y2 = y.clone()
    y2[3, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        m.update(y2)
    assert torch.equal(m.m2, before) and m.count.item() == 20


def test_merge_and_reset_and_state_dict():
    y = sam_like(400, 10, seed=7)
    a, b = feed(y[:150], [150]), feed(y[150:], [100, 150])
    assert a.merge_(StreamingMoments(10)) is a  # merging nothing changes nothing
    a.merge_(b)
    full = feed(y, [400])
    torch.testing.assert_close(a.mean, full.mean, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(a.covariance, full.covariance, rtol=1e-12, atol=1e-10)
    empty = StreamingMoments(10).merge_(full)
    assert torch.equal(empty.m2, full.m2) and torch.equal(empty.mean, full.mean)
    restored = StreamingMoments(10)
    restored.load_state_dict(full.state_dict())
    assert torch.equal(restored.covariance, full.covariance)
    full.reset()
    assert full.count.item() == 0 and full.m2.abs().sum().item() == 0
    with pytest.raises(ValueError, match="dim"):
        a.merge_(StreamingMoments(3))


def test_channel_moments_match_two_pass_reference_on_offsets():
    """Per-channel moments merged over uneven batches, on ±60 offsets where E[y²] − E[y]² in float32 fails."""
    y = sam_like(3001, 7, seed=3)
    ref_mean, ref_cov = reference(y)
    m = ChannelMoments()
    for part in y.split([1, 0, 1500, 1500]):
        m.update(part)
    assert m.count == 3001
    np.testing.assert_allclose(m.mean.numpy(), ref_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(m.variance.numpy(), np.diag(ref_cov), rtol=1e-10)
    np.testing.assert_allclose(m.mean_square.numpy(), np.diag(ref_cov) + ref_mean**2, rtol=1e-10)
    with pytest.raises(ValueError, match="no tokens"):
        _ = ChannelMoments().variance


def test_activation_stats_against_numpy_and_closed_form_alphas():
    y = sam_like(2000, 9, seed=4)
    ref = y.double().numpy()
    s = activation_stats(token_moments(y))
    assert set(TABLE7_KEYS) <= set(s) and s["tokens"] == 2000 and s["feature_dim"] == 9
    assert s["global_mean"] == pytest.approx(ref.mean(), rel=1e-12)
    assert s["global_std"] == pytest.approx(ref.std(), rel=1e-10)
    assert s["channel_mean_min"] == pytest.approx(ref.mean(0).min(), rel=1e-12)
    assert s["channel_mean_max"] == pytest.approx(ref.mean(0).max(), rel=1e-12)
    assert s["channel_std_min"] == pytest.approx(ref.std(0).min(), rel=1e-10)
    assert s["channel_std_max"] == pytest.approx(ref.std(0).max(), rel=1e-10)
    assert s["alpha_gs"] == pytest.approx(1 / ref.std(), rel=1e-10)
    assert s["alpha_phis"] == pytest.approx(ref.var(0).mean() ** -0.5, rel=1e-10)
    assert s["alpha_gs"] <= s["alpha_phis"]
    constant = activation_stats(token_moments(torch.full((5, 3), 2.0)))
    assert constant["global_std"] == 0 and math.isinf(constant["alpha_phis"])
    with pytest.raises(ValueError, match="at least one feature token"):
        activation_stats(StreamingMoments(4))


def test_all_reduce_without_process_group_is_noop():
    m = feed(sam_like(50, 3, seed=8), [50])
    before = m.m2.clone()
    m.all_reduce_()
    assert torch.equal(m.m2, before)
    assert torch.equal(m.all_reduced().m2, before)


def _rank_data(rank: int) -> torch.Tensor:
    # Uneven shards with different offsets: rank 0 has many tokens, rank 1 a few far-off ones.
    y = sam_like(700, 24, seed=9)
    return y[:690] if rank == 0 else y[690:] + 25.0


def _dist_worker(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        y = _rank_data(rank)
        m = StreamingMoments(24, F64)
        m.update(y[:5])
        m.update(y[5:])
        norm = make_normalizer("phi_s", 24)
        norm.update(y)
        norm.fit()  # collective: fits on both ranks' tokens, keeps local statistics
        norm.fit()  # so a second fit does not count other ranks' tokens twice
        local_count = norm.stats.count.clone()
        m.all_reduce_()
        torch.save(
            {
                "count": m.count,
                "mean": m.mean,
                "cov": m.covariance,
                "weight": norm.weight,
                "local_count": local_count,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_all_reduce_matches_concatenated(tmp_path):
    mp.spawn(_dist_worker, args=(f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    y = torch.cat([_rank_data(0), _rank_data(1)])
    mean, cov = reference(y)
    single = make_normalizer("phi_s", 24)
    single.update(y)
    single.fit()
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["count"].item() == 700
        assert r["local_count"].item() == len(_rank_data(rank))
        np.testing.assert_allclose(r["mean"].numpy(), mean, rtol=0, atol=1e-11)
        np.testing.assert_allclose(r["cov"].numpy(), cov, rtol=1e-11, atol=1e-9)
        # The normalizers use float32 products: the split of tokens into chunks differs between the
        # two ranks and the single process, so their statistics agree to ~1e-7, not bit for bit.
        torch.testing.assert_close(r["weight"], single.weight, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_bench_stats_reports_ratio_and_accuracy():
    from experiments.bench.stats import run

    rows, notes, ratios = run([40], tokens=6000, batch=2048, max_inmem_gb=1.0, seed=0, threads=1)
    assert set(ratios) == {40} and ratios[40] > 0
    assert [r[2] for r in rows] == [
        "StreamingMoments (float32 products)",
        "StreamingMoments (float64 products)",
        "torch.cov (float32, in memory)",
    ]
    rel = float(rows[0][-1].split("(")[1].rstrip(")"))
    assert rel < 1e-6 and rows[1][-1] == "reference" and notes == []
