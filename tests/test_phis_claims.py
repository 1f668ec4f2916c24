"""The claims report: paired verdicts over seeds, noise-only downstream groups, every claim found."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.phis.claims import alpha_claim, claims, downstream_metric_noise, paired
from experiments.phis.runs import METHODS_10, Run

TEACHERS = {"dfn_like": 1e-3, "sam_like": 30.0}  # held-out target variance


def test_paired_verdicts() -> None:
    assert paired([1.0, 1.1, 0.9], [2.0, 2.2, 2.1], better="lower")[0] == "agree"
    assert paired([2.0, 2.2, 2.1], [1.0, 1.1, 0.9], better="lower")[0] == "disagree"
    assert paired([0.5, 0.7, 0.6], [1.0, 1.1, 0.9], better="higher")[0] == "disagree"
    # A gap inside the seed-to-seed spread is inconclusive, whichever way its mean points.
    verdict, text = paired([1.0, 2.0, 0.5], [1.2, 0.9, 1.1], better="lower")
    assert verdict == "inconclusive" and "p = " in text
    assert paired([1.0], [2.0])[0] == "inconclusive"  # one seed: no test


def make_runs(quality: dict[str, float], noise: float, seeds: int = 3) -> list[Run]:
    """Runs whose teacher errors follow ``quality`` (higher = better) with seed noise; the kNN metric is
    pure noise (independent of the method), so the Cls group must be found to rank nothing."""
    rng = np.random.default_rng(0)
    runs = []
    for method in METHODS_10:
        for seed in range(seeds):
            q = quality.get(method, 0.0) + noise * rng.normal()
            metrics = {}
            heldout = {}
            for t, var in TEACHERS.items():
                explained = 0.5 + 0.1 * q + 0.01 * rng.normal()
                metrics[f"tmse/{t}"] = var * (1 - explained)
                metrics[f"explained_val/{t}"] = explained
                metrics[f"err_var_range_norm/{t}"] = float(np.exp(-q + 0.05 * rng.normal()))
                heldout[t] = {"variance": var, "explained": explained}
            metrics["knn/photos"] = float(rng.uniform())
            res = {"heldout": {"val": heldout}, "eval": {"details": {"tmse": {"heldout": "val"}}}}
            runs.append(Run(method, seed, Path(f"/runs/{method}/{seed}"), metrics, res))
    return runs


def by_claim(found) -> dict[str, str]:
    return {c.claim.split(" (")[0]: c.verdict for c in found}


def test_claims_agree_when_the_sweep_separates_methods() -> None:
    quality = {"phi_s": 3.0, "standardize": 2.0, "global_standardize": 2.0, "mse": -2.0}
    found, notes = claims(make_runs(quality, noise=0.05))
    verdicts = by_claim(found)
    assert verdicts["Plain MSE neglects the low-variance teacher"] == "agree"
    assert verdicts["The standardizations beat the whitenings"] == "agree"
    assert verdicts["PHI-S has the best average rank of the ten methods"] == "agree"
    assert verdicts["PHI-S has the smallest normalized error-variance range"] == "agree"
    # The noise-only Cls group is detected and left out of the averages.
    assert any(n.startswith("Cls:") and "within seed noise" in n for n in notes)
    assert any("['TMSE']" in n for n in notes)


def test_downstream_metrics_are_tested_one_by_one() -> None:
    """A metric that follows the method is found to separate the methods; a noise-only one is not."""
    runs = make_runs({"phi_s": 3.0, "mse": -2.0}, noise=0.05)
    for r in runs:
        r.metrics["knn_spatial/photos"] = (
            0.5 + 0.1 * {"phi_s": 3.0, "mse": -2.0}.get(r.method, 0.0) + (0.001 * r.seed)
        )
        r.metrics["zero_shot_agreement/t/digits"] = 0.0  # the same for every run: separates nothing
    grouped = {m: [r for r in runs if r.method == m] for m in METHODS_10}
    lines = {line.split("`")[1]: line for line in downstream_metric_noise(grouped)}
    # tmse/* is not a downstream metric
    assert set(lines) == {"knn/photos", "knn_spatial/photos", "zero_shot_agreement/t/digits"}
    p = {m: float(line.rsplit("p = ", 1)[1]) for m, line in lines.items()}
    assert p["knn_spatial/photos"] < 1e-6 and p["knn/photos"] > 0.05
    assert p["zero_shot_agreement/t/digits"] == 1.0
    assert "span 0.5" in lines["knn_spatial/photos"]  # phi_s 0.8 vs mse 0.3


def test_claims_are_inconclusive_within_noise_and_disagree_when_reversed() -> None:
    noisy = by_claim(claims(make_runs({"phi_s": 0.1}, noise=2.0))[0])
    assert noisy["PHI-S has the best average rank of the ten methods"] in ("inconclusive", "disagree")
    assert noisy["Plain MSE neglects the low-variance teacher"] == "inconclusive"
    reversed_ = by_claim(
        claims(
            make_runs({"mse": 3.0, "pca_whiten": 2.0, "zca_whiten": 2.0, "hadamard_whiten": 2.0}, noise=0.05)
        )[0]
    )
    assert reversed_["Plain MSE neglects the low-variance teacher"] == "disagree"
    assert reversed_["The standardizations beat the whitenings"] == "disagree"
    assert reversed_["PHI-S has the best average rank of the ten methods"] == "disagree"


def test_alpha_claim_reads_table8(tmp_path: Path) -> None:
    csv = tmp_path / "table8_alpha.csv"
    head = "teacher,alpha_global_standardize,alpha_phi_s\n"
    csv.write_text(head + "ours: dfn_like,34.9,36.1\nours: sam_like,0.18,0.2\npaper: sam,9,1\n")
    claim = alpha_claim(csv)
    assert claim is not None and claim.verdict == "agree" and "dfn_like: 34.9 ≤ 36.1" in claim.ours
    assert "sam:" not in claim.ours  # the paper's rows are not ours
    csv.write_text(head + "ours: bad,2.0,1.0\n")
    assert alpha_claim(csv).verdict == "disagree"
    assert alpha_claim(tmp_path / "missing.csv") is None


def test_claims_about_all_methods_need_all_methods() -> None:
    runs = [r for r in make_runs({"phi_s": 3.0, "mse": -3.0}, noise=0.05) if r.method in ("mse", "phi_s")]
    verdicts = by_claim(claims(runs)[0])
    assert verdicts == {"Plain MSE neglects the low-variance teacher": "agree"}


def test_single_seed_is_never_a_verdict() -> None:
    found, _ = claims(make_runs({"phi_s": 3.0, "mse": -3.0}, noise=0.0, seeds=1))
    assert found and all(c.verdict == "inconclusive" for c in found)


def test_table5_claim_compares_phis_with_the_normalizations_not_plain_mse() -> None:
    """Plain MSE's 'normalized' space is the teacher's own: its small range on a small teacher (the
    paper's DFN CLIP row) does not count against PHI-S, which is compared with the best normalization."""
    found, _ = claims(make_runs({"mse": 5.0, "phi_s": 3.0, "standardize": 2.0}, noise=0.05))
    table5 = [c for c in found if c.claim.startswith("PHI-S has the smallest normalized")]
    assert len(table5) == len(TEACHERS)
    for c in table5:
        assert c.verdict == "agree"
        assert "(Standardize)" in c.measure and "MSE" not in c.measure
