"""Label corruption: matrix structure, exact-proportion relabelling, superclass recovery."""

from __future__ import annotations

import numpy as np
import pytest

from phis.selfdistill.blockmodel import block_features
from phis.selfdistill.corruption import (
    NOISE_KINDS,
    corrupt_labels,
    corruption_matrix,
    find_superclasses,
    realized_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_matrix(kind: str, K: int, eta: float, sup: np.ndarray | None = None) -> np.ndarray:
    """Entry-by-entry transcription of SPEC §3, for comparison."""
    C = np.zeros((K, K))
    for k in range(K):
        for j in range(K):
            if kind == "sym":
                C[k, j] = 1 - eta if j == k else eta / (K - 1)
            elif kind == "asym":
                C[k, j] = 1 - eta if j == k else eta / K + (eta / K if j == (k + 1) % K else 0.0)
            else:
                m = int((sup == sup[k]).sum())
                if m == 1:
                    C[k, j] = float(j == k)
                elif j == k:
                    C[k, j] = 1 - eta
                else:
                    C[k, j] = eta / (m - 1) if sup[j] == sup[k] else 0.0
    return C


@pytest.mark.parametrize("K", [2, 3, 7])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("kind", ["sym", "asym"])
def test_matrix_structure(kind: str, K: int, eta: float) -> None:
    C = corruption_matrix(kind, K, eta)
    np.testing.assert_allclose(C.sum(1), 1.0, atol=1e-15)
    np.testing.assert_allclose(C, _reference_matrix(kind, K, eta), atol=1e-15)
    # Both kinds are column-balanced, so the label marginal stays uniform.
    np.testing.assert_allclose(C.sum(0), 1.0, atol=1e-14)


def test_asym_equals_sym_for_two_classes() -> None:
    np.testing.assert_allclose(corruption_matrix("asym", 2, 0.4), corruption_matrix("sym", 2, 0.4))


def test_superclass_matrix_uneven_groups() -> None:
    sup = np.array([2, 0, 2, 1, 0, 2, 1, 3])  # sizes 3, 2, 2 and a singleton (class 7)
    C = corruption_matrix("superclass", 8, 0.45, sup)
    np.testing.assert_allclose(C, _reference_matrix("superclass", 8, 0.45, sup), atol=1e-15)
    np.testing.assert_allclose(C.sum(1), 1.0, atol=1e-15)
    assert (C[sup[:, None] != sup[None, :]] == 0).all()
    assert C[7, 7] == 1.0


def test_matrix_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'pair'.*sym.*asym.*superclass"):
        corruption_matrix("pair", 4, 0.2)
    with pytest.raises(ValueError, match="eta=1.2"):
        corruption_matrix("sym", 4, 1.2)
    with pytest.raises(ValueError, match="superclass id"):
        corruption_matrix("superclass", 4, 0.2)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        corruption_matrix("superclass", 4, 0.2, np.array([0, 0, 1]))
    assert NOISE_KINDS == ("sym", "asym", "superclass")


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_exact_proportions_realize_C(kind: str) -> None:
    K, n = 5, 100  # every share n C_kj is a whole number at η = 0.4
    sup = np.array([0, 1, 0, 1, 1])
    y = np.random.default_rng(1).permutation(np.repeat(np.arange(K), n))
    C = corruption_matrix(kind, K, 0.4, sup)
    noisy = corrupt_labels(y, C, 3, exact=True)
    np.testing.assert_allclose(realized_matrix(y, noisy, K), C, atol=1e-12)
    # Which instances flip is random, how many is not.
    other = corrupt_labels(y, C, 4, exact=True)
    assert (other != noisy).any()
    np.testing.assert_allclose(realized_matrix(y, other, K), C, atol=1e-12)


def test_exact_rounding_is_largest_remainder_and_stays_circulant() -> None:
    K, n, eta = 4, 50, 0.5  # η n / 3 = 8.33 per wrong class: counts 25, 9, 8, 8 in cyclic order
    y = np.repeat(np.arange(K), n)
    noisy = corrupt_labels(y, corruption_matrix("sym", K, eta), 0, exact=True)
    counts = realized_matrix(y, noisy, K) * n
    for k in range(K):
        assert [round(counts[k, (k + s) % K]) for s in range(K)] == [25, 9, 8, 8]
    np.testing.assert_allclose(counts.sum(0), n)  # column-balanced after rounding


def test_exact_counts_uneven_classes() -> None:
    y = np.concatenate([np.zeros(7, int), np.ones(13, int), np.full(3, 2)])
    C = corruption_matrix("asym", 3, 0.55)
    counts = realized_matrix(y, corrupt_labels(y, C, 0, exact=True), 3) * np.array([[7], [13], [3]])
    sizes = np.array([7, 13, 3])[:, None]
    assert (np.abs(counts - sizes * C) < 1).all()
    np.testing.assert_allclose(counts.sum(1), sizes[:, 0])


def test_sampled_labels_follow_C() -> None:
    K, n = 5, 40_000
    y = np.repeat(np.arange(K), n)
    C = corruption_matrix("asym", K, 0.6)
    noisy = corrupt_labels(y, C, np.random.default_rng(7))
    R = realized_matrix(y, noisy, K)
    se = np.sqrt(C * (1 - C) / n)
    assert (np.abs(R - C) <= 5 * se + 1e-12).all()
    np.testing.assert_array_equal(corrupt_labels(y, C, 11), corrupt_labels(y, C, 11))


def test_sampled_labels_never_leave_superclass() -> None:
    sup = np.array([0, 1, 0, 1, 2, 2])
    y = np.repeat(np.arange(6), 500)
    noisy = corrupt_labels(y, corruption_matrix("superclass", 6, 0.9, sup), 0)
    assert (sup[noisy] == sup[y]).all()
    assert (noisy != y).mean() > 0.85


def test_corrupt_labels_rejects_bad_inputs() -> None:
    C = corruption_matrix("sym", 3, 0.2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        corrupt_labels(np.array([0, 3]), C, 0)
    with pytest.raises(ValueError, match="row-stochastic"):
        corrupt_labels(np.array([0, 1]), C * 2, 0)


def test_realized_matrix_counts() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    noisy = np.array([0, 2, 2, 1, 0, 2])
    expected = np.array([[1 / 3, 0, 2 / 3], [0.5, 0.5, 0], [0, 0, 1]])
    np.testing.assert_allclose(realized_matrix(y, noisy, 3), expected)
    with pytest.raises(ValueError, match=r"classes \[3\]"):
        realized_matrix(y, noisy, 4)


def test_find_superclasses_recovers_three_level_structure() -> None:
    K, m = 12, 3
    data = block_features(K, 25, 0.6, 0.35, e=0.1, m=m, seed=2)
    # Hostile: shuffle class ids so superclasses are not runs of consecutive classes, add noise.
    relabel = np.random.default_rng(0).permutation(K)
    y = relabel[data.y_train]
    X = data.X_train + 0.01 * np.random.default_rng(1).standard_normal(data.X_train.shape)
    found = find_superclasses(X, y, K)
    truth = np.empty(K, int)
    truth[relabel] = data.superclass
    same_found = found[:, None] == found[None, :]
    np.testing.assert_array_equal(same_found, truth[:, None] == truth[None, :])
    first_seen = np.sort(np.unique(found, return_index=True)[1])
    np.testing.assert_array_equal(found[first_seen], np.arange(K // m))  # ids in order of appearance


def test_find_superclasses_without_hierarchy_keeps_classes_apart() -> None:
    data = block_features(5, 20, 0.5, 0.2, seed=0)  # every class pair equally similar
    np.testing.assert_array_equal(find_superclasses(data.X_train, data.y_train, 5), np.arange(5))


def test_find_superclasses_cut_controls_granularity() -> None:
    data = block_features(8, 10, 0.6, 0.35, e=0.1, m=4, seed=0)
    assert len(np.unique(find_superclasses(data.X_train, data.y_train, 8, cut=1.0))) == 1
    np.testing.assert_array_equal(
        find_superclasses(data.X_train, data.y_train, 8, cut=0.8), np.repeat([0, 1], 4)
    )
    with pytest.raises(ValueError, match=r"classes \[8\]"):
        find_superclasses(data.X_train, data.y_train, 9)
