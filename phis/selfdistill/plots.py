"""Figures of the SD-PLL study: gains over the teacher, eigenvalue decay, outputs on the simplex, and
the (η, t) region of 100 % training accuracy. Each function draws one figure and saves it as a PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CLASS_COLORS = ("tab:blue", "tab:orange", "tab:green")


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def gain_bars(
    etas: Sequence[float],
    gains: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str,
    ylabel: str,
) -> Path:
    """Grouped bars: per η, the gain of every model over the teacher (mean, std over seeds) [E] each."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(etas) + 2), 3.6))
    width = 0.8 / max(len(gains), 1)
    x = np.arange(len(etas))
    cmap = plt.get_cmap("viridis")
    for i, (name, (mean, std)) in enumerate(gains.items()):
        pll = name.startswith("PLL")
        color = (
            ("tab:red" if name == "PLL" else "tab:pink") if pll else cmap(0.15 + 0.7 * i / max(len(gains), 2))
        )
        label = name if pll else f"student {name}"
        offset = (i - (len(gains) - 1) / 2) * width
        ax.bar(x + offset, mean, width, yerr=std, color=color, label=label, capsize=2, error_kw={"lw": 0.8})
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, [f"{e:g}" for e in etas])
    ax.set_xlabel("noise rate η")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(
        ncol=min(len(gains), 6), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False
    )
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def eigen_decay(panels: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, title: str) -> Path:
    """One panel per (title, σ_i^t [T, M]): σ_i^t against the eigenvalue index i, one line per round t."""
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, (name, sigma_t) in zip(axes[0], panels):
        T, M = sigma_t.shape
        cmap = plt.get_cmap("plasma")
        for t in range(T):
            ax.plot(
                np.arange(1, M + 1), sigma_t[t], color=cmap(t / max(T, 2)), lw=1.4, label=f"$t = {t + 1}$"
            )
        ax.set_xscale("log")
        ax.set_xlabel(r"eigenvalue index $i$ (descending $\mu_i$)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(r"$\sigma_i^t = (\mu_i / (\mu_i + K N \lambda))^t$")
    axes[0, -1].legend(fontsize=8, frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def simplex(
    outputs: Mapping[str, np.ndarray],
    y_true: np.ndarray,
    y_given: np.ndarray,
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Ternary scatter of 3-class softmax outputs [N, 3], one panel per model; colour = true class,
    dot = label kept, cross = label corrupted, dashed = argmax regions. Accuracy w.r.t. the true labels
    in each title."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    names = list(outputs)
    fig, axes = plt.subplots(1, len(names), figsize=(2.9 * len(names), 3.1), squeeze=False)
    for ax, name in zip(axes[0], names):
        P = outputs[name]
        xy = P @ corners
        ax.plot(*np.r_[corners, corners[:1]].T, color="black", lw=0.8)
        centre = corners.mean(0)
        for i in range(3):  # argmax regions: centre to the midpoint of each edge
            mid = (corners[i] + corners[(i + 1) % 3]) / 2
            ax.plot(*np.c_[centre, mid], color="grey", lw=0.6, ls="--")
        for k in range(3):
            for clean, marker in ((True, "o"), (False, "x")):
                sel = (y_true == k) & ((y_given == y_true) == clean)
                size = 10 if clean else 16
                ax.scatter(*xy[sel].T, s=size, marker=marker, color=CLASS_COLORS[k], alpha=0.6, lw=0.8)
        for k, (cx, cy) in enumerate(corners):
            offset = (0, -11 if cy == 0 else 4)
            ax.annotate(
                f"class {k}", (cx, cy), textcoords="offset points", xytext=offset, ha="center", fontsize=7
            )
        acc = float(np.mean(P.argmax(1) == y_true))
        ax.set_title(f"{'round ' + name if name.isdigit() else name}: {100 * acc:.0f}% right", fontsize=9)
        ax.set_aspect("equal")
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def region(
    etas: np.ndarray,
    rounds: np.ndarray,
    simulated: np.ndarray,
    path: str | os.PathLike,
    title: str,
    theory_eta: np.ndarray | None = None,
    theory_realized: np.ndarray | None = None,
    exact_eta: np.ndarray | None = None,
) -> Path:
    """(η, t) map: simulated[E, T] True where round t gets every training instance right at noise η;
    the linearized theory's η_t [T] drawn over it, × where that theory for the realized labels
    disagrees, and the exact (softmax) dynamics' η_t [T] dashed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    step = float(np.min(np.diff(etas))) if len(etas) > 1 else 0.1
    edges_x = np.r_[etas - step / 2, etas[-1] + step / 2]
    edges_y = np.r_[rounds - 0.5, rounds[-1] + 0.5]
    cmap = matplotlib.colors.ListedColormap(["#e6e6e6", "#7fc97f"])
    ax.pcolormesh(
        edges_x, edges_y, simulated.T.astype(float), cmap=cmap, vmin=0, vmax=1, edgecolors="white", lw=0.5
    )
    if theory_eta is not None:
        # boundary polyline: a vertical stroke at η_t across row t, joined row to row
        xs = np.repeat(theory_eta, 2)
        ys = np.ravel(np.c_[rounds - 0.5, rounds + 0.5])
        ax.plot(xs, ys, color="black", lw=1.6, label=r"linearized: 100% for $\eta < \eta_t$")
    if exact_eta is not None:
        xs = np.repeat(exact_eta, 2)
        ys = np.ravel(np.c_[rounds - 0.5, rounds + 0.5])
        ax.plot(xs, ys, color="tab:blue", lw=1.6, ls="--", label=r"exact: 100% for $\eta < \eta_t$")
    if theory_realized is not None:
        bad = theory_realized != simulated
        ei, ti = np.nonzero(bad)
        if len(ei):
            ax.scatter(
                etas[ei],
                rounds[ti],
                marker="x",
                color="tab:red",
                s=30,
                label="linearized (realized) disagrees",
            )
    ax.plot([], [], "s", color="#7fc97f", label="simulation: 100% train accuracy")
    ax.set_xlabel("noise rate η")
    ax.set_ylabel("round t (1 = teacher)")
    ax.set_xlim(edges_x[0], edges_x[-1])
    ax.set_ylim(edges_y[0], edges_y[-1])
    ax.set_yticks(rounds)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
