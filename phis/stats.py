"""Streaming first and second moments of teacher features, accumulated in float64 and mergeable across ranks.

Teacher activations can sit far from zero (SAM channel means near -60 with stds of a few units), so the
textbook E[yyᵀ] - μμᵀ cancels catastrophically in float32. Each chunk of a batch (at most 16,384 tokens) is
instead centred on its own mean before its scatter matrix is formed; chunks, batches and ranks are
then combined in float64 with the parallel update of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,   δ = μ_b - μ_a,   μ = μ_a + δ n_b / n,   M2 = M2_a + M2_b + δ δᵀ n_a n_b / n.

The scatter of a centred chunk is one symmetric rank-k product XᵀX, the whole cost of a statistics pass.
By default it runs in float32 for float32/bfloat16/float16 features (``dtype=torch.float32``): centring
first leaves values of the order of the channel stds, so the float32 product is accurate to ~1e-7 of the
largest variance (the naive formula on the same data: ~1e-6 to 1e-3), the mean to ~1e-7 of the channel
std, and every product is accumulated in float64. ``dtype=torch.float64`` centres and multiplies in
float64 (exact two-pass statistics, ~1e-13; about twice the time). Only the upper block triangle of
the product is formed: on a CPU with numpy's BLAS (symmetric ``syrk`` blocks on the diagonal, shared
among torch's threads), elsewhere with torch block products and TF32 off.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy
import torch
import torch.distributed as dist
from threadpoolctl import ThreadpoolController
from torch import Tensor, nn

# A chunk holds at most about 16M values (64 MiB in float32) and at most 16,384 tokens: the float32
# rounding error of a chunk's product grows with its token count (measured ~2e-7 of max |Σ| at 16,384,
# 5e-7 at 500k), while longer products run faster (on 2 CPU cores at C = 1024, 8,192-token chunks took
# about 1.25x the time of 16,384-token ones).
_CHUNK_ELEMENTS = 1 << 24
_CHUNK_ROWS = 16384
PRODUCT_DTYPES = {"float32": torch.float32, "float64": torch.float64}  # config name → dtype
# Symmetric products: column blocks at least 256 wide, where matmuls still run near full speed
# (measured on 2 CPU cores at C = 1024 and 1536); on a GPU at most 4 (10 of 16 block products).
_SCATTER_BLOCKS = 4
_SCATTER_MIN_WIDTH = 256


@contextmanager
def _full_precision_matmul():
    """Float32 matmuls in IEEE float32 inside the block: TF32 (~1e-3 relative) would ruin the statistics."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


_BLAS = None  # numpy's BLAS thread pool (threadpoolctl), found on first use
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool) of the CPU products


_SCRATCH = threading.local()  # per thread: name → flat buffer, reused by every update


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least ``numel`` values, kept for the next update in this thread.

    A statistics pass calls ``update`` once per batch; allocating its chunk buffer (64 MiB) and float64
    accumulator anew each time costs a page fault per 4 KiB page, measurable beside the products on a
    CPU. One buffer per name, dtype and device is kept per thread (however many accumulators exist).
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    # A buffer made under torch.inference_mode() cannot be written outside it (nor the reverse).
    key = (name, dtype, torch.device(device), torch.is_inference_mode_enabled())
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers[key] = buffer = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _numpy_blas_threads(n: int):
    """Context limiting numpy's BLAS (OpenBLAS in the numpy wheels) to n threads."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController().select(user_api="blas")  # finds the BLAS numpy has loaded
    return _BLAS.limit(limits=n)


def _product_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads for the CPU products, made anew in a forked child or for a new size."""
    global _POOL
    if _POOL is None or _POOL[:2] != (os.getpid(), workers):
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="phis-scatter"))
    return _POOL[2]


def _quiet_numpy():
    """numpy's warnings off in this thread: non-finite features are reported by ``update`` itself."""
    return numpy.errstate(all="ignore")


def _scatter_tasks(dim: int, blocks: int) -> list[tuple[int, int, int, int]]:
    """The block products of the upper block triangle of xᵀx, largest first.

    Columns are cut into ``blocks`` equal blocks; a task (lo, hi, lo2, hi2) is the product of column
    block [lo, hi) with [lo2, hi2): a symmetric one (half the work) on the diagonal, a full one above it.
    """
    edges = [dim * i // blocks for i in range(blocks + 1)]
    spans = list(zip(edges[:-1], edges[1:]))
    tasks = [(*spans[i], *spans[j]) for i in range(blocks) for j in range(i, blocks)]
    return sorted(tasks, key=lambda t: -(t[1] - t[0]) * (t[3] - t[2]) * (0.5 if t[0] == t[2] else 1.0))


def _add_cpu_scatter(acc: Tensor, x: Tensor) -> Tensor:
    """acc [C, C] (float64) += the upper block triangle of xᵀx on a CPU; returns x's column sums [C].

    The products run in numpy's BLAS: numpy calls ``syrk`` for ``aᵀ @ a`` on one buffer, a symmetric
    product at about half the cost of a full one, which torch's CPU build lacks. With T torch threads
    and C of at least 256·T, the columns are cut into min(2T, C // 256) blocks and T threads (this
    one and T - 1 pool threads) take the block products of the upper triangle, largest first, then the
    column sums, each task single-threaded in the thread that took it and added to acc there; otherwise
    one ``syrk`` runs on T BLAS threads. (On 2 cores at C = 1024 and 1536 the shared task list took
    0.44-0.57x the time of torch's full float32 product, sums included, one two-thread ``syrk``
    0.50-0.66x without them: the BLAS's own workers keep spinning after each call and slow the torch
    passes around it, and a fixed split of the work leaves one thread idle.)
    """
    threads = torch.get_num_threads()
    dim = x.shape[1]
    xn, an = x.numpy(), acc.numpy()
    blocks = min(2 * threads, dim // _SCATTER_MIN_WIDTH)
    if threads == 1 or blocks < threads:
        with _numpy_blas_threads(threads), _quiet_numpy():
            an += xn.T @ xn
        return x.sum(0)
    tasks = iter([*_scatter_tasks(dim, blocks), "sums"])
    lock, sums = threading.Lock(), []

    def work() -> None:
        with _quiet_numpy():
            run_tasks()

    def run_tasks() -> None:
        while True:
            with lock:
                task = next(tasks, None)
            if task is None:
                return
            if task == "sums":
                sums.append(numpy.ones(len(xn), dtype=xn.dtype) @ xn)
                continue
            lo, hi, lo2, hi2 = task
            a = xn[:, lo:hi]
            an[lo:hi, lo2:hi2] += a.T @ a if lo == lo2 else a.T @ xn[:, lo2:hi2]

    with _numpy_blas_threads(1):
        pool = _product_pool(threads - 1)
        futures = [pool.submit(work) for _ in range(threads - 1)]
        try:
            work()
        finally:  # no thread may still write to acc once this returns or raises
            wait(futures)
        for future in futures:
            future.result()
    return torch.from_numpy(sums[0])


def _scatter_and_sums(acc: Tensor, x: Tensor, work: Tensor | None) -> Tensor:
    """acc [C, C] (float64) += the upper block triangle of xᵀx for ``x: [n, C]`` (float32 or float64);
    returns x's column sums [C] in x's dtype. The caller mirrors the upper triangle once at the end.

    On a CPU: :func:`_add_cpu_scatter`. Elsewhere the columns are cut into up to four blocks and only
    block rows on and above the diagonal are multiplied (block i against blocks i..end: 10 of 16 block
    products), each into the flat buffer ``work`` (C² values of x's dtype, reused so that no product
    allocates) and then added to acc.
    """
    if x.device.type == "cpu":
        return _add_cpu_scatter(acc, x)
    dim = x.shape[1]
    blocks = max(1, min(_SCATTER_BLOCKS, dim // _SCATTER_MIN_WIDTH))
    edges = [dim * i // blocks for i in range(blocks + 1)]
    with _full_precision_matmul():
        for lo, hi in zip(edges[:-1], edges[1:]):
            out = work[: (hi - lo) * (dim - lo)].view(hi - lo, dim - lo)
            acc[lo:hi, lo:] += torch.mm(x[:, lo:hi].T, x[:, lo:], out=out)
    return x.sum(0)


def _combine(
    a: tuple[float, Tensor, Tensor] | None, b: tuple[float, Tensor, Tensor]
) -> tuple[float, Tensor, Tensor]:
    """Chan et al.'s merge of two (count, mean [C], M2) summaries; ``a = None`` means empty.

    M2 is the scatter matrix [C, C], or only its diagonal [C] (per-channel sums of squared deviations).
    """
    if a is None or a[0] == 0:
        return b
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if n_b == 0:
        return a
    n = n_a + n_b
    delta = mean_b - mean_a
    cross = torch.outer(delta, delta) if m2_a.ndim == 2 else delta * delta
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + cross * (n_a * n_b / n)


def _all_reduced(count: float, mean: Tensor, m2: Tensor) -> tuple[float, Tensor, Tensor] | None:
    """(count, mean, M2) of every rank's tokens together, exact in float64; None without a process group
    (or with one rank, or no token on any rank). M2 is [C, C] or its diagonal [C], as in ``_combine``.

    The global mean comes from all-reduced sums of n and n·μ; then each rank contributes its M2 about
    that mean, M2_r + n_r (μ_r − μ)(μ_r − μ)ᵀ, and those are summed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    sums = torch.cat([mean.new_tensor([count]), mean * count])  # [1 + C]: n and n·μ
    dist.all_reduce(sums)
    n = float(sums[0])
    if n == 0:
        return None
    global_mean = sums[1:] / n
    delta = mean - global_mean
    cross = torch.outer(delta, delta) if m2.ndim == 2 else delta * delta
    m2 = m2 + cross * count
    dist.all_reduce(m2)
    return n, global_mean, m2


def _overflow(tokens: Tensor, work: torch.dtype) -> ValueError:
    return ValueError(
        f"feature values up to {float(tokens.abs().max()):.3g} overflow {work} sums; "
        "use StreamingMoments(..., dtype=torch.float64); not updating"
    )


class StreamingMoments(nn.Module):
    """Running token count, mean [C] and scatter matrix about the mean [C, C], all float64 buffers.

    ``dtype`` (a torch dtype or its name) is the precision of each chunk's product XᵀX (float32: fast;
    float64: exact); features given in float64 always use float64 products. The accumulators are
    float64 either way.
    """

    def __init__(self, dim: int, dtype: torch.dtype | str = torch.float32) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"StreamingMoments needs dim >= 1, got {dim}")
        dtype = PRODUCT_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in PRODUCT_DTYPES.values():
            raise ValueError(
                f"StreamingMoments dtype must be one of {', '.join(PRODUCT_DTYPES)}, got {dtype!r}"
            )
        self.dim, self.dtype = dim, dtype
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dim, dtype=torch.float64))

    @property
    def covariance(self) -> Tensor:
        """Population covariance [C, C] (scatter / count); zeros before any token was seen."""
        return self.m2 / self.count.clamp_min(1.0)

    @property
    def variance(self) -> Tensor:
        """Population per-channel variance [C]."""
        return self.covariance.diagonal().clone()

    def reset(self) -> None:
        """Forget every token seen so far."""
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()

    @torch.no_grad()
    def update(self, y: Tensor, mask: Tensor | None = None) -> None:
        """Fold in the tokens of ``y: [..., C]`` (any float dtype); ``mask: [...]`` bool keeps True tokens.

        A batch with no (unmasked) tokens is a no-op; a non-finite value among the kept tokens raises
        ``ValueError`` before anything is changed.
        """
        if y.shape[-1:] != (self.dim,):
            raise ValueError(f"expected features with last dim {self.dim}, got shape {tuple(y.shape)}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
            if mask.shape != y.shape[:-1]:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} must equal the token shape {tuple(y.shape[:-1])}"
                )
            tokens = y[mask.to(y.device)]
        else:
            tokens = y.reshape(-1, self.dim)
        n = tokens.shape[0]
        if n == 0:
            return
        dev, dim = self.mean.device, self.dim
        work = torch.promote_types(self.dtype, tokens.dtype)
        rows_per_chunk = max(1, min(_CHUNK_ROWS, _CHUNK_ELEMENTS // dim))
        centred = _scratch("centred", min(n, rows_per_chunk) * dim, work, dev).view(-1, dim)
        upper = _scratch("upper", dim * dim, torch.float64, dev).view(dim, dim).zero_()
        product = None if dev.type == "cpu" else _scratch("product", dim * dim, work, dev)
        counts, shifts, sums = [], [], []
        for chunk in tokens.split(rows_per_chunk):
            chunk = chunk.to(dev)
            rows = chunk.shape[0]
            # Centred on its mean rounded to the working dtype; what the rounding misses (the mean of x) is
            # corrected exactly below. (A mean of sampled tokens would save a pass, but tokens with a
            # period, e.g. one outlier position per image, can bias it by many stds, and the float32
            # product's error grows with the square of that bias.)
            shift = chunk.mean(0, dtype=work)
            x = torch.sub(chunk, shift, out=centred[:rows])  # the caller's features are never modified
            total = _scatter_and_sums(upper, x, product)
            # Any NaN/inf among the tokens (or a sum that overflows) makes the sum non-finite.
            if not torch.isfinite(total).all():
                bad = int((~torch.isfinite(tokens)).any(dim=-1).sum())
                if bad == 0:
                    raise _overflow(tokens, work)
                raise ValueError(f"non-finite values (NaN/inf) in {bad} of {n} feature tokens; not updating")
            counts.append(rows)
            shifts.append(shift)
            sums.append(total)
        if not torch.isfinite(upper.diagonal()).all():  # squares overflowed where the sums did not
            raise _overflow(tokens, work)
        # With u_c the sum of chunk c's centred tokens x_c and m_c = shift_c + u_c / n_c its mean, the
        # scatter about the batch mean μ is Σ_c [x_cᵀx_c − u_c u_cᵀ / n_c + n_c (m_c − μ)(m_c − μ)ᵀ];
        # Chan's merge with the stored moments adds δδᵀ n_a n / (n_a + n), δ = μ − μ_a. The rank-one
        # terms are rows of one weighted product, added in float64 with a single pass over [C, C].
        n_c = torch.tensor(counts, dtype=torch.float64, device=dev)[:, None]
        u_c = torch.stack(sums).to(torch.float64)
        chunk_means = torch.stack(shifts).to(torch.float64) + u_c / n_c
        mean = (n_c * chunk_means).sum(0) / n
        count_a = float(self.count)
        total_count = count_a + n
        delta = mean - self.mean
        terms = torch.cat(
            [
                u_c / n_c.sqrt(),
                (chunk_means - mean) * n_c.sqrt(),
                delta[None] * math.sqrt(count_a * n / total_count),
            ]
        )
        signs = torch.ones(terms.shape[0], dtype=torch.float64, device=dev)
        signs[: len(counts)] = -1.0
        upper.addmm_(terms.T * signs, terms).add_(self.m2)
        torch.triu(upper, out=self.m2).add_(upper.triu(1).T)  # the upper triangle, mirrored: symmetric
        self.mean.add_(delta * (n / total_count))
        self.count.fill_(total_count)

    def _merge(self, n_b: float, mean_b: Tensor, m2_b: Tensor) -> None:
        count, mean, m2 = _combine((float(self.count), self.mean, self.m2), (n_b, mean_b, m2_b))
        self.count.fill_(count)
        self.mean.copy_(mean)
        self.m2.copy_(m2)

    @torch.no_grad()
    def merge_(self, other: StreamingMoments) -> StreamingMoments:
        """Absorb another accumulator's statistics (as if its tokens had been fed here); returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dim {other.dim} into dim {self.dim}")
        dev = self.mean.device
        self._merge(float(other.count), other.mean.to(dev), other.m2.to(dev))
        return self

    @torch.no_grad()
    def all_reduce_(self) -> StreamingMoments:
        """Replace local statistics by those of all ranks' tokens together (no-op without a process group).

        Exact in float64 (:func:`_all_reduced`). Afterwards every rank holds the global statistics, so a
        second call after more local updates would count the earlier tokens once per rank; use
        :meth:`all_reduced` for periodic refits.
        """
        merged = _all_reduced(float(self.count), self.mean, self.m2)
        if merged is not None:
            count, mean, m2 = merged
            self.count.fill_(count)
            self.mean.copy_(mean)
            self.m2.copy_(0.5 * (m2 + m2.T))
        return self

    def all_reduced(self) -> StreamingMoments:
        """A new accumulator with the statistics of all ranks; this one keeps its local statistics."""
        out = StreamingMoments(self.dim, self.dtype).to(self.mean.device)
        out.load_state_dict(self.state_dict())
        return out.all_reduce_()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dtype={self.dtype}, count={int(self.count)}"


class ChannelMoments:
    """Per-channel token count, mean [C] and sum of squared deviations [C], in float64.

    The diagonal of :class:`StreamingMoments` for when only per-channel statistics are needed (error
    variances, explained fractions): each batch is centred on its own mean and merged with the same
    :func:`_combine`, so large channel offsets do not cancel. Given ``dim`` it starts as zeros of that
    width (needed by :meth:`all_reduce_` on a rank that saw no tokens); otherwise the first batch sets it.
    """

    def __init__(self, dim: int | None = None, device: torch.device | str | None = None) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        if dim is not None:
            self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
            self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, y: Tensor) -> None:
        """Fold in tokens ``y: [N, C]``."""
        y = y.detach().to(torch.float64)
        if y.shape[0] == 0:
            return
        mean_b = y.mean(0)
        batch = (y.shape[0], mean_b, ((y - mean_b) ** 2).sum(0))
        prior = None if self.mean is None else (self.count, self.mean, self.m2)
        self.count, self.mean, self.m2 = _combine(prior, batch)

    def all_reduce_(self) -> ChannelMoments:
        """Replace local statistics by those of all ranks together (no-op without a process group);
        exact in float64 (:func:`_all_reduced`). Needs ``dim`` on every rank."""
        if self.mean is None:
            raise ValueError("ChannelMoments.all_reduce_ needs the width: construct it with dim=C")
        merged = _all_reduced(float(self.count), self.mean, self.m2)
        if merged is not None:
            count, self.mean, self.m2 = merged
            self.count = int(count)
        return self

    @property
    def variance(self) -> Tensor:
        """Population variance per channel [C]."""
        if self.m2 is None:
            raise ValueError("no tokens were accumulated")
        return self.m2 / self.count

    @property
    def mean_square(self) -> Tensor:
        """E[y²] per channel [C] (variance plus squared mean)."""
        return self.variance + self.mean**2


# The columns of PHI-S Table 7, in the paper's order.
TABLE7_KEYS = (
    "channel_mean_min",
    "channel_mean_max",
    "channel_std_min",
    "channel_std_max",
    "global_mean",
    "global_std",
)


def token_moments(tokens: Tensor) -> ChannelMoments:
    """Float64 per-channel moments of a token matrix ``[N, C]`` (all that activation statistics need)."""
    moments = ChannelMoments(tokens.shape[-1], tokens.device)
    moments.update(tokens)
    return moments


def activation_stats(moments: StreamingMoments | ChannelMoments) -> dict[str, float]:
    """A teacher's activation statistics (PHI-S Tables 7 and 8) from the float64 moments of its tokens
    (a cache's stored ``StreamingMoments``, or per-channel ``ChannelMoments``).

    Channel means and population stds (their ranges), the mean and population std over every value
    (σ_g² = mean_c Var_c + Var_c(μ_c)), and the scale factors α_gs = 1/σ_g of global standardization
    and α_phis = (tr Σ / C)^-½ of PHI-S (α_gs ≤ α_phis always).
    """
    if float(moments.count) == 0:
        raise ValueError("activation statistics need at least one feature token, got none")
    mean, var = moments.mean, moments.variance.clamp_min(0)
    std = var.sqrt()
    mean_var = float(var.mean())
    global_var = mean_var + float(mean.var(unbiased=False))
    return {
        "feature_dim": mean.numel(),
        "tokens": int(moments.count),
        "channel_mean_min": float(mean.min()),
        "channel_mean_max": float(mean.max()),
        "channel_std_min": float(std.min()),
        "channel_std_max": float(std.max()),
        "global_mean": float(mean.mean()),
        "global_std": math.sqrt(global_var),
        "alpha_gs": 1.0 / math.sqrt(global_var) if global_var > 0 else math.inf,
        "alpha_phis": 1.0 / math.sqrt(mean_var) if mean_var > 0 else math.inf,
    }
