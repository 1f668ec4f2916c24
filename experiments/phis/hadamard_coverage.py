"""Hadamard coverage: which orders have an exact construction here, against the public reference's rule.

Part of the normalization report (``experiments.phis.normalization_report``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from phis.hadamard import constructible_orders, construction, is_constructible
from phis.results import markdown_table

TEACHER_WIDTHS = (192, 256, 384, 512, 768, 1024, 1152, 1280, 1408, 1536)
REFERENCE_COVERAGE = 354  # multiples of 4 up to 2048 built by the public reference (SPEC §1)
COVERAGE_LIMIT = 2048
FAMILY_COLORS = {
    "sylvester": "tab:blue",
    "paley1": "tab:green",
    "paley2": "tab:orange",
    "kron": "tab:purple",
}


def reference_rule(n: int) -> bool:
    """Whether the public reference builds order n: 2^k, or Sylvester(2^i) ⊗ one Paley matrix of prime q."""
    if n & (n - 1) == 0:
        return True
    cofactors = [n >> i for i in range((n & -n).bit_length())]  # n / 2^i for every 2^i dividing n
    return any(
        is_constructible(m, prime_powers=False) and construction(m, prime_powers=False).startswith("paley")
        for m in cofactors
    )


def coverage_summary(limit: int = COVERAGE_LIMIT) -> dict:
    """Constructible multiples of 4 up to ``limit`` here, with prime q only, and by the reference rule."""
    orders = list(range(4, limit + 1, 4))
    ours = {n: r for n, r in constructible_orders(limit).items() if n % 4 == 0}
    prime_only = [n for n in orders if is_constructible(n, prime_powers=False)]
    return {
        "orders": orders,
        "ours": ours,
        "families": Counter(r.split("(")[0] for r in ours.values()),
        "prime_only": prime_only,
        "reference": [n for n in orders if reference_rule(n)],
        "missing": [n for n in orders if n not in ours],
    }


def coverage_figure(out: Path, cov: dict) -> None:
    """Two grids of the multiples of 4 (32 per row): construction family here, and here vs the reference."""
    orders, ours, ref = cov["orders"], cov["ours"], set(cov["reference"])
    families = [*FAMILY_COLORS, "none"]
    family_idx = [families.index(ours[n].split("(")[0]) if n in ours else 4 for n in orders]
    compare = ["both", "only this code", "neither"]
    compare_idx = [0 if n in ref else 1 if n in ours else 2 for n in orders]
    cols = 32
    fig = Figure(figsize=(14, 4.6), layout="constrained")
    panels = (
        ("construction used here", family_idx, [*FAMILY_COLORS.values(), "red"], families),
        ("this code vs the public reference", compare_idx, ["0.75", "gold", "red"], compare),
    )
    for ax, (title, idx, colors, names) in zip(fig.subplots(1, 2), panels):
        grid = torch.tensor(idx).reshape(-1, cols)
        ax.imshow(grid, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(colors) - 0.5, aspect="equal")
        rows = range(0, grid.shape[0], 2)
        ax.set_yticks(list(rows), [f"{orders[r * cols]}–{orders[r * cols + cols - 1]}" for r in rows])
        ax.set_xticks([])
        ax.set_title(title)
        counts = Counter(idx)
        handles = [
            Patch(color=c, label=f"{name} ({counts[i]})") for i, (c, name) in enumerate(zip(colors, names))
        ]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=8)
    fig.suptitle(f"Hadamard orders 4 … {orders[-1]} (multiples of 4), {cols} per row")
    fig.savefig(out / "fig_hadamard_coverage.png", dpi=110)


def coverage_section(cov: dict) -> str:
    """The report's section on Hadamard coverage: counts per rule and family, the orders only built here,
    the teacher widths' recipes and the orders with no construction."""
    ours, ref, fam = cov["ours"], set(cov["reference"]), cov["families"]
    total = len(cov["orders"])
    only_ours = [n for n in ours if n not in ref]
    prime_power = [n for n in only_ours if n not in set(cov["prime_only"])]
    counts = [
        ["public reference (SPEC §1)", REFERENCE_COVERAGE],
        ["reference rule re-derived here: 2^i ⊗ one Paley, prime q", len(ref)],
        ["this code, Paley restricted to prime q", len(cov["prime_only"])],
        ["this code: prime-power q, any Kronecker product", len(ours)],
    ]
    return "\n".join(
        [
            "## 3. Hadamard coverage\n",
            f"Multiples of 4 up to {COVERAGE_LIMIT}: {total} (orders above 2 must be multiples of 4).\n",
            markdown_table(
                ["rule", "constructible", "not constructible"], [[r, k, total - k] for r, k in counts]
            ),
            "\nBy the top-level construction used here (direct constructions first, then a power-of-two "
            "Sylvester factor split off, then any other Kronecker split):\n",
            markdown_table(
                ["family", "orders"], [[f, fam[f]] for f in FAMILY_COLORS] + [["total", len(ours)]]
            ),
            f"\nEvery order the reference rule builds is built here too: {ref <= set(ours)}. "
            f"Orders only this code builds: {len(only_ours)} ({len(prime_power)} need a prime-power q, the "
            "others a Kronecker product of two factors that are not powers of two):\n",
            markdown_table(["order", "recipe"], [[n, ours[n]] for n in only_ours]),
            "\nTeacher widths of SPEC §1:\n",
            markdown_table(["width", "recipe"], [[w, construction(w)] for w in TEACHER_WIDTHS]),
            f"\nNo construction here for {len(cov['missing'])} orders; asking for one raises ValueError "
            "naming the nearest constructible orders, and nothing is substituted:\n",
            ", ".join(map(str, cov["missing"])) + "\n",
            "![coverage](fig_hadamard_coverage.png)\n",
        ]
    )
