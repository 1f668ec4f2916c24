"""The SD-PLL evaluation protocol: the validation split epochs are selected on, the PLL candidates'
report, the tables that put last / best-on-validation / best-on-test side by side, and the region
table's exact dynamics beside the linearized theory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments.bench import selfdistill as bench
from experiments.selfdistill.study import region_outputs, write_accuracy_tables
from phis.selfdistill import run as sd_run
from phis.selfdistill.corruption import corrupt_labels, corruption_matrix
from phis.selfdistill.features import block_feature_set, load_features, validation_rows
from phis.selfdistill.probe import SGDRecipe, logit_accuracy, runner_up_share, top2, top2_report, two_hot

pytestmark = pytest.mark.usefixtures("one_thread")

SGD = {"name": "sgd", "epochs": 3, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "lr_decay": 0.98}


def _job(**over: object) -> dict:
    """A block-model SGD job: K = 4 classes of 30 training and 5 test instances, each with its own
    instance direction (no two rows alike, test rows included)."""
    cfg = {
        "experiment": "protocol",
        "report": "table",
        "table_by": [],
        "task": "distill",
        "seed": 0,
        "cache_dir": "unused",
        "save_outputs": False,
        "sd": {
            "features": {"kind": "block", "name": "block", "K": 4, "n": 30, "c": 0.4, "d": 0.1, "n_test": 5},
            "corruption": {"kind": "sym", "eta": 0.0, "exact": False},
            "solver": {**SGD, "val_fraction": 0.2, "val_seed": 0},
            "rounds": 2,
            "pll": {"losses": ["gce"], "q": 0.7},
            "lam": 1e-3,
        },
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


# ---------------------------------------------------------------------------------------------- split


def test_validation_rows_are_stratified_deterministic_and_none_at_zero() -> None:
    y = np.repeat(np.arange(4), [20, 10, 30, 7])
    rows = validation_rows(y, 0.1, 0)
    assert [int(rows[y == k].sum()) for k in range(4)] == [2, 1, 3, 1]
    np.testing.assert_array_equal(rows, validation_rows(y, 0.1, 0))
    assert not np.array_equal(rows, validation_rows(y, 0.1, 1))
    assert not validation_rows(y, 0.0, 0).any()


def _index(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Position of every row of ``rows`` in ``table`` (-1 where it is none of them)."""
    where = {r.tobytes(): i for i, r in enumerate(table)}
    return np.array([where.get(r.tobytes(), -1) for r in rows])


@pytest.mark.parametrize("path", ["one job", "batched jobs"])
def test_the_validation_split_is_carved_from_training_and_never_overlaps_the_test_set(
    monkeypatch, tmp_path: Path, path: str
) -> None:
    """What the probes get, on both paths a job takes (alone, and in a sweep's batch): the validation
    rows are training rows held out of training, no test row; 20 % of each class; the same rows for
    every η and seed; labelled with the job's given (corrupted) labels."""
    seen: list[dict] = []
    for name in ("self_distill", "self_distill_batched"):
        real = getattr(sd_run, name)

        def spy(X_train, y_given, y_true, X_test, y_test, *args, real=real, **kwargs):
            seen.append({"X_train": X_train, "X_test": X_test, **kwargs})
            return real(X_train, y_given, y_true, X_test, y_test, *args, **kwargs)

        monkeypatch.setattr(sd_run, name, spy)
    cells = [(0.0, 0), (0.5, 1), (0.5, 2)]
    cfgs = [_job(**{"sd.corruption.eta": eta, "seed": seed}) for eta, seed in cells]
    if path == "one job":
        for cfg in cfgs:
            sd_run.run_job(cfg, tmp_path)
        y_val = [s["y_val"] for s in seen]
    else:
        sd_run.run_jobs_batched([(cfg, tmp_path / str(i)) for i, cfg in enumerate(cfgs)])
        (only,) = seen
        seen, y_val = [only] * len(cfgs), list(only["y_val"])
    feats = block_feature_set(cfgs[0]["sd"]["features"])
    for s, labels, (eta, seed) in zip(seen, y_val, cells):
        val, train = _index(s["X_val"], feats.X_train), _index(s["X_train"], feats.X_train)
        assert (val >= 0).all() and (train >= 0).all()  # training rows only
        assert (_index(s["X_val"], feats.X_test) < 0).all()  # no test row
        np.testing.assert_array_equal(s["X_test"], feats.X_test)
        assert not set(val) & set(train) and sorted({*val, *train}) == list(range(len(feats.y_train)))
        assert np.bincount(feats.y_train[val]).tolist() == [6] * 4
        np.testing.assert_array_equal(val, _index(seen[0]["X_val"], feats.X_train))  # every job alike
        given = corrupt_labels(feats.y_train, corruption_matrix("sym", 4, eta), seed)
        np.testing.assert_array_equal(labels, given[val])
    assert (y_val[1] != feats.y_train[_index(seen[1]["X_val"], feats.X_train)]).any()  # noisy at η = 0.5


def test_job_results_count_the_rows_each_part_holds(tmp_path: Path) -> None:
    res = sd_run.run_job(_job(**{"sd.corruption.eta": 0.5}), tmp_path)
    assert (res["n_train"], res["n_val"], res["n_test"]) == (96, 24, 20)
    assert 0 < res["noise_realized_val"] < 1 and res["pll_top2"]["PLL_to_runner_up"] >= 0
    for m in res["models"]:
        assert all(np.isfinite(m[k]) for k in ("test_acc_last", "test_acc_best_val", "test_acc_best_test"))
        assert m["test_acc_best_test"] >= max(m["test_acc_best_val"], m["test_acc_last"])  # picked on test


def test_digits_validation_split_is_disjoint_from_its_test_split(tmp_path: Path) -> None:
    """Real features: a tiny EfficientNet digits set (4 per class); the split is carved from the rows
    ``stratified_split`` left for training, whose test rows it never touches."""
    cfg = {"kind": "efficientnet", "dataset": "digits", "variant": 0, "size": 64, "limit_per_class": 4}
    feats = load_features({**cfg, "test_fraction": 0.25, "split_seed": 0}, tmp_path)
    rows = validation_rows(feats.y_train, 1 / 3, 0)
    assert np.bincount(feats.y_train[rows]).tolist() == [1] * 10
    assert (_index(feats.X_train[rows], feats.X_test) < 0).all()
    assert len({r.tobytes() for r in feats.X_train}) == len(feats.X_train)  # rows are distinct images


# ---------------------------------------------------------------------------------------------- PLL


def test_top2_report_and_runner_up_share_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    N, K = 300, 5
    P = rng.dirichlet(np.full(K, 0.4), size=N)
    y = rng.integers(0, K, N)
    Z = rng.normal(size=(N, K))
    order = np.argsort(-P, axis=1)  # no ties in continuous draws
    a, b = order[:, 0], order[:, 1]
    np.testing.assert_array_equal(top2(P, seed=3), order[:, :2])
    assert (two_hot(P, seed=3)[np.arange(N), a] == 0.5).all() and (
        two_hot(P, seed=3)[np.arange(N), b] == 0.5
    ).all()
    mutual = [
        sum(a[j] == b[i] and b[j] == a[i] for j in range(N)) / max(1, sum(a[j] == b[i] for j in range(N)))
        for i in range(N)
    ]
    report = top2_report(P, y, seed=3)
    assert report == pytest.approx(
        {
            "top1_true": np.mean(a == y),
            "runner_up_true": np.mean(b == y),
            "runner_up_prob": np.mean(P[np.arange(N), b]),
            "mutual": np.mean(mutual),
        }
    )
    assert runner_up_share(Z, P, y, seed=3) == pytest.approx(np.mean((Z.argmax(1) == b) & (b != y)))
    # pairs that are each other's runner-up: all of class 2k's instances put 2k + 1 second, and back
    pairs = np.full((40, 4), 0.05)
    top = np.arange(40) % 4
    pairs[np.arange(40), top], pairs[np.arange(40), top ^ 1] = 0.6, 0.3
    assert top2_report(pairs, top)["mutual"] == 1.0 and top2_report(pairs, top)["top1_true"] == 1.0
    tie = np.zeros((40, 4))
    tie[np.arange(40), top], tie[np.arange(40), top ^ 1] = 1.0, 1.0  # a student tied on its two candidates
    assert runner_up_share(tie, pairs, top) == pytest.approx(0.5) == 1 - logit_accuracy(tie, top)


# ---------------------------------------------------------------------------------------------- tables


def test_tables_put_the_three_selections_side_by_side_beside_the_pll_candidates(tmp_path: Path) -> None:
    results = [
        {
            **sd_run.run_job(_job(**{"sd.corruption.eta": eta, "seed": seed}), tmp_path / f"{eta}_{seed}"),
            "seed": seed,
        }
        for eta in (0.0, 0.5)
        for seed in (0, 1)
    ]
    paths = write_accuracy_tables("protocol", results, tmp_path / "tables")
    names = {p.name for p in paths}
    assert {"protocol_test_acc.md", "protocol_test_acc.csv", "protocol_train_acc_true.md"} <= names
    lines = (tmp_path / "tables" / "protocol_test_acc.csv").read_text().splitlines()
    assert lines[0] == "model,epoch,η=0,η=0.5"
    teacher = [line for line in lines if line.startswith("Teacher,")]
    assert [line.split(",")[1] for line in teacher] == [
        "last",
        "best on validation",
        "best on test (official protocol)",
    ]
    last = np.mean([r["models"][0]["test_acc_last"] for r in results if r["eta"] == 0.5]) * 100
    assert teacher[0].split(",")[3].startswith(f"{last:.1f}")
    title = (tmp_path / "tables" / "protocol_test_acc.md").read_text().splitlines()[0]
    assert "N=96 train + 24 validation / 20 test" in title and "selected on the test set" in title
    pll = (tmp_path / "tables" / "protocol_pll_top2.md").read_text()
    for row in (
        "teacher's runner-up is the true class",
        "top-2 mutual",
        "PLL: training instances predicted as a wrong runner-up",
        "PLL − Teacher, test, last epoch",
    ):
        assert f"| {row}" in pll


def test_region_table_shows_the_exact_dynamics_beside_the_linearized_theory(tmp_path: Path) -> None:
    """A small region sweep (K = 4, n = 12, exact solver): the simulation's first all-right round equals
    the exact dynamics' for its realized labels at every η, the table says so, and it lists both
    theories' thresholds η_t."""
    cfg = _job(
        **{
            "report": "region",
            "sd.features": {
                "kind": "block",
                "name": "block_region",
                "K": 4,
                "n": 12,
                "c": 0.4,
                "d": 0.1,
                "n_test": 0,
            },
            "sd.solver": {"name": "exact", "tol": 1e-9},
            "sd.corruption.exact": True,
            "sd.rounds": 8,
            "sd.pll.losses": [],
            "sd.lam": 4.3e-4,
        }
    )
    results = []
    for eta in (0.0, 0.25, 0.5):
        job = _job()
        job.update(cfg)
        job["sd"] = {**cfg["sd"], "corruption": {**cfg["sd"]["corruption"], "eta": eta}}
        results.append({**sd_run.run_job(job, tmp_path / str(eta)), "config": job})
    paths = region_outputs(results, tmp_path / "out")
    table = (tmp_path / "out" / "region.md").read_text()
    assert "| η | simulation | exact dynamics (realized labels) | exact dynamics (population) |" in table
    assert (
        "follows the exact softmax dynamics: its first round equals theirs for the realized labels at 3 of 3"
        in table
    )
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| 0")]
    assert all(r[1].strip() == r[2].strip() for r in rows)
    thresholds = (tmp_path / "out" / "region_thresholds.md").read_text().splitlines()
    assert len([line for line in thresholds if line.startswith("| ") and line[2].isdigit()]) == 8
    assert {p.name for p in paths} >= {"region.png", "region.md", "region_thresholds.md"}


# ---------------------------------------------------------------------------------------------- bench


def test_bench_batched_runs_and_compares_every_report_field(monkeypatch) -> None:
    """The benchmark's table run (one by one, then batched) on a small feature set: it carves the
    table's validation split, and every report field, best-on-validation included, agrees."""
    monkeypatch.setattr(bench, "ETAS", (0.0, 0.5))
    monkeypatch.setattr(bench, "TABLE_SEEDS", (0,))
    monkeypatch.setattr(bench, "SGDRecipe", lambda lr: SGDRecipe(lr=lr, epochs=3))  # 3 epochs, not 200
    feats = block_feature_set({"kind": "block", "K": 4, "n": 20, "c": 0.4, "d": 0.1, "n_test": 5})
    run = bench.bench_batched(feats, threads=1, batched_threads=[1], rounds=2)
    (batched,) = run["batched"]
    assert run["n_val"] == 8 and run["N"] == 72 and run["fields_compared"] == list(bench.REPORT_FIELDS)
    assert batched["accuracy_values_compared"] == 2 * 3 * len(bench.REPORT_FIELDS)
    assert batched["accuracy_values_different"] == 0
