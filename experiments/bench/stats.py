"""Benchmark: streaming moments (phis.stats), float32 and float64 products, vs one-shot ``torch.cov``.

    python -m experiments.bench.stats --threads 2                    # C ∈ {1024, 1536}, 2^19 tokens
    python -m experiments.bench.stats --dims 256 --tokens 65536      # quick run

Features are synthetic float32 tokens with SAM-like channel offsets (means in ±60, stds 2–30) and
low-rank correlations, generated batch by batch from a seeded generator (generation is not timed).
Every measurement runs in a fresh spawned process. Three methods on the same tokens:
- ``StreamingMoments`` with float32 products (the default): chunks centred on their float64 mean, the
  upper block triangle of XᵀX in float32, accumulated in float64;
- ``StreamingMoments`` with float64 products (``dtype=float64``): exact two-pass statistics, the
  reference every other covariance is compared with;
- ``torch.cov`` in float32 over all tokens held in memory (the usual one-shot practice; a float64 copy of
  2M × 1536 tokens would need 25 GB).
Peak memory is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its
resident set just before the measured phase: the input tokens a method holds (one batch for streaming,
every token for torch.cov) and one batch's generation temporaries. When torch.cov would exceed
--max-inmem-gb it runs on the longest token prefix that fits, and the streaming accumulators are
snapshotted at that prefix for the comparison. The ratio column is time per token over torch.cov's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from phis.results import atomic_write_text, markdown_table
from phis.stats import StreamingMoments

RANK = 16  # low-rank correlation factors of the synthetic features


def _params(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(dim, generator=g) * 120 - 60
    stds = 2 + 28 * torch.rand(dim, generator=g)
    factors = torch.randn(RANK, dim, generator=g) / RANK**0.5
    return means, stds, factors


def _batch(i: int, n: int, params: tuple, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Batch i of the token stream: [n, C] float32, written into ``out`` when given."""
    means, stds, factors = params
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    y = torch.randn(n, means.shape[0], generator=g, out=out)
    y.addmm_(torch.randn(n, RANK, generator=g), factors)
    return y.mul_(stds).add_(means)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _start_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return _rss_kb("VmRSS")


STREAMS = {"stream_f32": "float32", "stream_f64": "float64"}  # method → StreamingMoments dtype
METHOD_NAMES = {
    "stream_f32": "StreamingMoments (float32 products)",
    "stream_f64": "StreamingMoments (float64 products)",
    "torch.cov": "torch.cov (float32, in memory)",
}


def _measure(
    method: str, dim: int, tokens: int, batch: int, seed: int, snapshot: int, path: str, threads: int
) -> dict:
    """Run one method in this (fresh) process; save its covariance (at ``snapshot`` tokens) to ``path``."""
    if threads > 0:
        torch.set_num_threads(threads)
        threadpool_limits(threads)  # numpy's BLAS (the float64 reference's load) has its own pool
    params = _params(dim, seed)
    for dtype in STREAMS.values():  # warm up both BLAS libraries' threads before measuring
        StreamingMoments(dim, dtype).update(_batch(-1, 64, params, seed))
    torch.cov(_batch(-1, 64, params, seed).T)
    n_batches = -(-tokens // batch)
    sizes = [min(batch, tokens - i * batch) for i in range(n_batches)]
    base = _start_peak()
    if method in STREAMS:
        moments, wall, seen = StreamingMoments(dim, STREAMS[method]), 0.0, 0
        for i, n in enumerate(sizes):
            y = _batch(i, n, params, seed)
            t0 = time.perf_counter()
            moments.update(y)
            wall += time.perf_counter() - t0
            seen += n
            if seen == snapshot:
                np.save(path, moments.covariance.numpy())
            del y
    else:
        data = torch.empty(tokens, dim)
        for i, n in enumerate(sizes):
            _batch(i, n, params, seed, out=data[i * batch : i * batch + n])
        t0 = time.perf_counter()
        cov = torch.cov(data.T, correction=0)
        wall = time.perf_counter() - t0
        np.save(path, cov.double().numpy())
    peak_mb = (_rss_kb("VmHWM") - base) / 1024
    return {"wall_s": wall, "peak_mb": peak_mb}


def _in_fresh_process(*args) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def run(
    dims: list[int], tokens: int, batch: int, max_inmem_gb: float, seed: int, threads: int
) -> tuple[list, list[str], dict[int, float]]:
    """Rows of the table, notes, and per width the float32 stream's time per token ÷ torch.cov's."""
    rows, notes, ratios = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in dims:
            # torch.cov holds the tokens and one centred copy of them, both float32.
            fit = int(max_inmem_gb * 2**30 // (2 * 4 * dim)) // batch * batch
            n_cmp = min(tokens, fit)
            if n_cmp < batch:
                raise ValueError(f"--max-inmem-gb {max_inmem_gb} leaves less than one batch for C={dim}")
            res, cov = {}, {}
            for method in (*STREAMS, "torch.cov"):
                n = n_cmp if method == "torch.cov" else tokens
                path = f"{tmp}/{method}.npy"
                res[method] = _in_fresh_process(method, dim, n, batch, seed, n_cmp, path, threads)
                res[method]["tokens"] = n
                cov[method] = np.load(path)
            ref = cov["stream_f64"]  # exact two-pass statistics of the first n_cmp tokens
            scale = float(np.abs(ref).max())
            per_token_cov = res["torch.cov"]["wall_s"] / n_cmp
            for method, r in res.items():
                ratio = r["wall_s"] / r["tokens"] / per_token_cov
                diff = float(np.abs(cov[method] - ref).max())
                rows.append(
                    [
                        dim,
                        f"{r['tokens']:,}",
                        METHOD_NAMES[method],
                        f"{r['wall_s']:.2f}",
                        f"{r['tokens'] / r['wall_s'] / 1e3:.0f}",
                        f"{r['peak_mb']:.0f}",
                        f"{ratio:.2f}",
                        "reference" if method == "stream_f64" else f"{diff:.2e} ({diff / scale:.1e})",
                    ]
                )
            ratios[dim] = res["stream_f32"]["wall_s"] / tokens / per_token_cov
            if n_cmp < tokens:
                need = 2 * 4 * dim * tokens / 2**30
                notes.append(
                    f"C={dim}: torch.cov over all {tokens:,} tokens needs {need:.1f} GB > the "
                    f"{max_inmem_gb} GB budget; it ran on the first {n_cmp:,} tokens, compared "
                    "with the streaming snapshots at that prefix."
                )
            print(markdown_table(HEADER, rows[-3:]), flush=True)
    return rows, notes, ratios


HEADER = [
    "C",
    "tokens",
    "method",
    "wall s",
    "ktok/s",
    "peak MB",
    "time/token ÷ torch.cov's",
    "max |ΔΣ| vs float64 stream (rel. to max |Σ|)",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1024, 1536])
    p.add_argument("--tokens", type=int, default=2**19)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--max-inmem-gb", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: their defaults)")
    p.add_argument("--repeats", type=int, default=1, help="measure everything this many times")
    p.add_argument("--out", default="outputs/bench_stats.md")
    args = p.parse_args()
    rows, notes, summary = [], [], []
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    for k in range(args.repeats):
        load = os.getloadavg()[0]
        r_rows, notes, ratios = run(
            args.dims, args.tokens, args.batch, args.max_inmem_gb, args.seed, args.threads
        )
        rows += [[k + 1, *row] for row in r_rows]
        ratio_text = ", ".join(f"C={d}: {r:.2f}" for d, r in ratios.items())
        summary.append(f"- run {k + 1} (load average {load:.1f} at its start): {ratio_text}")
    threads = args.threads or torch.get_num_threads()
    text = (
        "### Streaming moments vs one-shot torch.cov\n\n"
        + markdown_table(["run", *HEADER], rows)
        + "\nFloat32-product stream, time per token ÷ torch.cov's:\n"
        + "\n".join(summary)
        + f"\n\nMachine: {os.cpu_count()} CPUs ({torch.backends.cpu.get_cpu_capability()}), started "
        f"{started} UTC, torch {torch.__version__} with {threads} "
        f"thread(s); batches of {args.batch:,} float32 tokens (SAM-like offsets).\n"
        "Peak MB: increase of the measuring process's peak resident set over the measured phase, "
        "including the tokens the method holds (one batch vs all) and one batch's generation temporaries. "
        "Wall time excludes data generation. ΔΣ: each covariance minus the float64-product stream's on the "
        "same tokens.\n" + "".join(f"\n- {n}" for n in notes) + "\n"
    )
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
