"""Benchmark: streaming float64 moments (phis.stats) vs one-shot ``torch.cov`` over tokens held in memory.

    python -m experiments.bench_stats                      # C ∈ {256, 1024, 1536}, 2^21 tokens
    python -m experiments.bench_stats --tokens 262144      # quick run

Features are synthetic float32 tokens with SAM-like channel offsets (means in ±60, stds 2–30) and
low-rank correlations, generated batch by batch from a seeded generator (generation is not timed).
Every measurement runs in a fresh spawned process. Peak memory is that process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) minus its resident set just before the measured phase:
it counts the input tokens each method must hold (one batch for streaming, every token for
torch.cov) and one batch's generation temporaries. torch.cov runs in float32 on the float32 tokens
(the usual one-shot practice; a float64 copy of 2M × 1536 tokens would need 25 GB). When the
one-shot method would exceed --max-inmem-gb, it runs on the longest token prefix that fits, and
the streaming accumulator is snapshotted at that same prefix for the comparison.
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


def _measure(
    method: str, dim: int, tokens: int, batch: int, seed: int, snapshot: int, path: str, threads: int
) -> dict:
    """Run one method in this (fresh) process; save its covariance (at ``snapshot`` tokens) to ``path``."""
    if threads > 0:
        torch.set_num_threads(threads)
    params = _params(dim, seed)
    StreamingMoments(dim).update(_batch(-1, 64, params, seed))  # warm up BLAS threads before measuring
    torch.cov(_batch(-1, 64, params, seed).T)
    n_batches = -(-tokens // batch)
    sizes = [min(batch, tokens - i * batch) for i in range(n_batches)]
    base = _start_peak()
    if method == "streaming":
        moments, wall, seen = StreamingMoments(dim), 0.0, 0
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
) -> tuple[list, list[str]]:
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for dim in dims:
            # torch.cov holds the tokens and one centred copy of them, both float32.
            fit = int(max_inmem_gb * 2**30 // (2 * 4 * dim)) // batch * batch
            n_cmp = min(tokens, fit)
            if n_cmp < batch:
                raise ValueError(f"--max-inmem-gb {max_inmem_gb} leaves less than one batch for C={dim}")
            s_path, c_path = f"{tmp}/stream.npy", f"{tmp}/cov.npy"
            stream = _in_fresh_process("streaming", dim, tokens, batch, seed, n_cmp, s_path, threads)
            oneshot = _in_fresh_process("torch.cov", dim, n_cmp, batch, seed, n_cmp, c_path, threads)
            ref = np.load(s_path)
            diff = float(np.abs(ref - np.load(c_path)).max())
            rel = diff / float(np.abs(ref).max())
            per_tok_s = stream["wall_s"] / tokens
            per_tok_c = oneshot["wall_s"] / n_cmp
            rows.append(
                [
                    dim,
                    f"{tokens:,}",
                    "StreamingMoments (float64)",
                    f"{stream['wall_s']:.2f}",
                    f"{tokens / stream['wall_s'] / 1e3:.0f}",
                    f"{stream['peak_mb']:.0f}",
                    "",
                    "",
                ]
            )
            rows.append(
                [
                    dim,
                    f"{n_cmp:,}",
                    "torch.cov (float32, in memory)",
                    f"{oneshot['wall_s']:.2f}",
                    f"{n_cmp / oneshot['wall_s'] / 1e3:.0f}",
                    f"{oneshot['peak_mb']:.0f}",
                    f"{per_tok_s / per_tok_c:.2f}",
                    f"{diff:.2e} ({rel:.1e})",
                ]
            )
            if n_cmp < tokens:
                need = 2 * 4 * dim * tokens / 2**30
                notes.append(
                    f"C={dim}: torch.cov over all {tokens:,} tokens needs {need:.1f} GB > the "
                    f"{max_inmem_gb} GB budget; it ran on the first {n_cmp:,} tokens, compared "
                    "with the streaming snapshot at that prefix."
                )
            print(markdown_table(HEADER, rows[-2:]), flush=True)
    return rows, notes


HEADER = [
    "C",
    "tokens",
    "method",
    "wall s",
    "ktok/s",
    "peak MB",
    "time/token ratio (stream ÷ cov)",
    "max |ΔΣ| (rel. to max |Σ|)",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 1536])
    p.add_argument("--tokens", type=int, default=2**21)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--max-inmem-gb", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per measurement (0: torch default)")
    p.add_argument("--out", default="outputs/bench_stats.md")
    args = p.parse_args()
    load = os.getloadavg()
    rows, notes = run(args.dims, args.tokens, args.batch, args.max_inmem_gb, args.seed, args.threads)
    threads = args.threads or torch.get_num_threads()
    text = (
        "### StreamingMoments vs one-shot torch.cov\n\n"
        + markdown_table(HEADER, rows)
        + f"\nMachine: {os.cpu_count()} CPUs, torch {torch.__version__} with {threads} "
        f"thread(s), load average at start {load[0]:.1f}; batches of {args.batch:,} float32 tokens "
        "(SAM-like offsets).\n"
        "Peak MB: increase of the measuring process's peak resident set over the measured phase, "
        "including the tokens the method holds (one batch vs all) and one batch's generation temporaries. "
        "Wall time excludes data generation. ΔΣ: streaming float64 covariance minus torch.cov's float32 "
        "one on the same tokens.\n" + "".join(f"\n- {n}" for n in notes) + "\n"
    )
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
