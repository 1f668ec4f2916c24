"""Label corruption for SD-PLL: corruption matrices, sampled or exact-proportion noisy labels, and
superclasses found by clustering class means.

A corruption matrix C is [K, K] with rows = true class and C[k, j] = fraction of class k labelled j.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

NOISE_KINDS = ("sym", "asym", "superclass")


def _check_eta(eta: float) -> float:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"noise rate eta must lie in [0, 1], got eta={eta}")
    return float(eta)


def corruption_matrix(kind: str, K: int, eta: float, superclass: np.ndarray | None = None) -> np.ndarray:
    """C: [K, K] row-stochastic, SD-PLL §3's symmetric, asymmetric or within-superclass noise.

    sym: C_kk = 1 − η, C_kj = η/(K − 1). asym: η/K on every other class plus another η/K on
    class (k + 1) mod K. superclass: η/(m − 1) on each other class of k's superclass (size m), 0
    outside; a class alone in its superclass keeps its labels.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}")
    if K < 2:
        raise ValueError(f"need K ≥ 2 classes, got K={K}")
    eta = _check_eta(eta)
    if kind == "sym":
        C = np.full((K, K), eta / (K - 1))
    elif kind == "asym":
        C = np.full((K, K), eta / K)
        C[np.arange(K), (np.arange(K) + 1) % K] += eta / K
    else:
        if superclass is None:
            raise ValueError("noise kind 'superclass' needs the superclass id of every class")
        sup = np.asarray(superclass)
        if sup.shape != (K,):
            raise ValueError(f"superclass must have shape ({K},), got {sup.shape}")
        same = sup[:, None] == sup[None, :]
        size = same.sum(1, keepdims=True)
        C = np.where(same & (size > 1), eta / np.maximum(size - 1, 1), 0.0)
        np.fill_diagonal(C, np.where(size[:, 0] > 1, 1.0 - eta, 1.0))
        return C
    np.fill_diagonal(C, 1.0 - eta)
    return C


def _rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _exact_counts(n_k: int, row: np.ndarray, k: int) -> np.ndarray:
    """Split n_k instances by ``row`` with the largest-remainder rule: [K] counts summing to n_k.

    Remainders are rounded to 1e-9 so float noise cannot break ties, and ties go to j = k, k + 1, ...
    (cyclically), which keeps a circulant C circulant after rounding (hence column-balanced).
    """
    K = row.shape[0]
    share = n_k * row
    counts = np.floor(share + 1e-9).astype(np.int64)
    remainder = np.round(share - counts, 9)
    order = np.lexsort(((np.arange(K) - k) % K, -remainder))
    counts[order[: n_k - counts.sum()]] += 1
    return counts


def corrupt_labels(
    y: np.ndarray, C: np.ndarray, rng_or_seed: np.random.Generator | int, exact: bool = False
) -> np.ndarray:
    """Noisy labels [N] for true labels y [N]: drawn from row C[y_i], or with ``exact`` each class is
    relabelled in exactly the proportions of its row (largest remainder), which instances get which
    label being random."""
    y = np.asarray(y, dtype=np.int64)
    C = np.asarray(C, dtype=np.float64)
    K = C.shape[0]
    if C.shape != (K, K) or not np.allclose(C.sum(1), 1.0) or (C < 0).any():
        raise ValueError(f"C must be a row-stochastic [K, K] matrix, got shape {C.shape}")
    if y.size and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"labels must lie in [0, {K}), got range [{y.min()}, {y.max()}]")
    rng = _rng(rng_or_seed)
    if not exact:
        cdf = np.cumsum(C, axis=1)
        draws = (rng.random(y.shape[0])[:, None] >= cdf[y]).sum(1)
        return np.minimum(draws, K - 1)  # guards a cdf that ends at 1 − 1e-16
    noisy = np.empty_like(y)
    for k in range(K):
        idx = np.flatnonzero(y == k)
        counts = _exact_counts(idx.size, C[k], k)
        noisy[rng.permutation(idx)] = np.repeat(np.arange(K), counts)
    return noisy


def realized_matrix(y_true: np.ndarray, y_noisy: np.ndarray, K: int) -> np.ndarray:
    """Realized corruption matrix [K, K]: fraction of each true class carrying each noisy label."""
    y_true, y_noisy = np.asarray(y_true), np.asarray(y_noisy)
    counts = np.zeros((K, K))
    np.add.at(counts, (y_true, y_noisy), 1.0)
    sizes = counts.sum(1, keepdims=True)
    if (sizes == 0).any():
        raise ValueError(f"classes {np.flatnonzero(sizes[:, 0] == 0).tolist()} have no instances")
    return counts / sizes


def find_superclasses(X: np.ndarray, y: np.ndarray, K: int, cut: float = 0.8) -> np.ndarray:
    """Superclass id per class [K] (0, 1, ... in order of first class), SD-PLL's recipe.

    Features X [N, D] are centred and L2-normalized; the mean cosine similarity of classes k and l
    (= the dot product of their mean normalized features) gives the distance 1 − S_kl; complete
    linkage; the tree is cut at ``cut`` × the largest merge height.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    missing = [k for k in range(K) if not (y == k).any()]
    if missing:
        raise ValueError(f"classes {missing} have no instances")
    Xc = X - X.mean(0)
    Xc /= np.maximum(np.linalg.norm(Xc, axis=1, keepdims=True), 1e-12)
    means = np.stack([Xc[y == k].mean(0) for k in range(K)])
    dist = 1.0 - means @ means.T
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(np.maximum(dist, 0.0), checks=False), method="complete")
    labels = fcluster(tree, t=cut * tree[:, 2].max(), criterion="distance")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse]
