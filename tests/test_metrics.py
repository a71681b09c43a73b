"""prosmin_bench.metrics against independent references: scikit-learn, netcal, torchmetrics, scipy, direct loops.

Every reference below is computed without the function under test.
"""

from __future__ import annotations

import ast
import csv
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    log_loss,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

import prosmin_bench.metrics as M
from prosmin_bench.metrics import MetricArgumentError

# The CSV shipped in the package (Hendrycks & Dietterich's AlexNet errors, see prosmin_bench/_refdata/README.md)
ALEXNET_CSV = Path(__file__).resolve().parents[1] / "prosmin_bench" / "_refdata" / "alexnet_c_errors.csv"


def _random_probs(rng: np.random.Generator, n: int, c: int, sharpness: float) -> np.ndarray:
    logits = rng.normal(size=(n, c)) * sharpness
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def _labels_with_every_class(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    labels = rng.integers(0, c, n)
    labels[:c] = np.arange(c)  # netcal switches to a binary ECE when at most two label values occur
    return labels


# --------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_accuracy_matches_sklearn_top_k(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    probs = _random_probs(rng, 300, 10, 2.0)
    labels = rng.integers(0, 10, 300)
    expected = top_k_accuracy_score(labels, probs, k=k, labels=np.arange(10))
    assert M.accuracy(probs, labels, k=k) == pytest.approx(expected, abs=1e-12)


def test_accuracy_top1_breaks_ties_like_argmax() -> None:
    probs = np.array([[0.4, 0.4, 0.2], [0.3, 0.3, 0.4]])
    assert M.accuracy(probs, [0, 2]) == 1.0
    assert M.accuracy(probs, [1, 2]) == 0.5
    assert M.accuracy(probs, [1, 0], k=2) == 1.0
    assert M.accuracy(probs, [1, 1], k=2) == 0.5  # row 2: classes 2 and 0 (lower index wins the 0.3 tie)


@pytest.mark.parametrize("seed", [0, 1])
def test_nll_matches_sklearn_log_loss_and_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    probs = _random_probs(rng, 400, 7, 3.0)
    labels = rng.integers(0, 7, 400)
    expected = log_loss(labels, probs, labels=np.arange(7))
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(expected, rel=1e-10)
    direct = -sum(np.log(max(probs[i, labels[i]], 1e-12)) for i in range(400)) / 400
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(direct, rel=1e-12)


def test_nll_clamps_zero_probabilities_at_1e_12() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    expected = (-np.log(1e-12) - np.log(0.5)) / 2
    assert M.negative_log_likelihood(probs, [1, 0]) == pytest.approx(expected, rel=1e-14)


# ------------------------------------------------------------------------------------------------ calibration


@pytest.mark.parametrize(
    "seed,n,c,sharpness", [(0, 500, 10, 1.0), (1, 1000, 5, 3.0), (2, 200, 3, 0.5), (3, 800, 20, 6.0)]
)
def test_ece_matches_netcal_and_torchmetrics(seed: int, n: int, c: int, sharpness: float) -> None:
    from netcal.metrics import ECE
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(seed)
    probs = _random_probs(rng, n, c, sharpness)
    labels = _labels_with_every_class(rng, n, c)
    ours = M.expected_calibration_error(probs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        netcal_value = ECE(bins=15).measure(probs, labels)
    tm_value = multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(labels), num_classes=c, n_bins=15, norm="l1"
    ).item()
    assert ours == pytest.approx(netcal_value, abs=1e-12)
    assert ours == pytest.approx(tm_value, abs=1e-6)  # torchmetrics computes in float32


def test_ece_edge_conventions() -> None:
    from netcal.metrics import ECE
    from torchmetrics.functional.classification import multiclass_calibration_error

    # Confidences exactly on interior edges (0.25, 0.5, 0.75 are exact in float32 and float64): all three use
    # [lo, hi) bins. Guo et al.'s (lo, hi] bins would give 0.1375 here.
    probs = np.array([[0.5, 0.25, 0.25], [0.4, 0.3, 0.3], [0.75, 0.25, 0.0], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 0, 2])
    ours = M.expected_calibration_error(probs, labels, n_bins=4)
    # Bins: [0.25, 0.5) holds 0.4 (wrong); [0.5, 0.75) holds 0.5 (right); [0.75, 1] holds 0.75, 0.8 (both right).
    assert ours == pytest.approx((0.4 + 0.5 + (2 - 1.55)) / 4, abs=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours == pytest.approx(ECE(bins=4).measure(probs, labels), abs=1e-12)
    tm = multiclass_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels), num_classes=3, n_bins=4)
    assert ours == pytest.approx(tm.item(), abs=1e-7)

    # Confidence exactly 1.0 joins the last bin here and in netcal; torchmetrics gives it a bin of its own.
    probs = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.95, 0.05, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 0, 2, 1])
    ours = M.expected_calibration_error(probs, labels)
    # Last bin [14/15, 1]: confidences 1, 1, 0.95, 1 with 3 right -> |3 - 3.95|; bin of 0.5: |1 - 0.5|.
    assert ours == pytest.approx((0.95 + 0.5) / 5, abs=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours == pytest.approx(ECE(bins=15).measure(probs, labels), abs=1e-12)


def test_ece_direct_loop_and_reliability_bins() -> None:
    rng = np.random.default_rng(5)
    probs = _random_probs(rng, 300, 4, 2.0)
    labels = rng.integers(0, 4, 300)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, 16)
    expected, counts = 0.0, []
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        members = (conf >= lo) & ((conf < hi) if b < 14 else (conf <= hi))
        counts.append(members.sum())
        if members.any():
            expected += members.mean() * abs(correct[members].mean() - conf[members].mean())
    assert M.expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-14)
    bins = M.reliability_bins(probs, labels)
    assert bins["count"].tolist() == counts
    assert np.isnan(bins["accuracy"][np.array(counts) == 0]).all()



def test_ece_from_bins_is_the_ece_of_the_data_the_bins_came_from() -> None:
    """One binning: the ECE read back from reliability_bins equals expected_calibration_error, also for confidences
    lying exactly on bin edges (0.4, 0.8 and 1.0 with 5 bins go to the bin that starts there, as in netcal)."""
    rng = np.random.default_rng(6)
    probs = _random_probs(rng, 200, 5, 2.0)
    probs[:3] = [[0.4, 0.3, 0.3, 0.0, 0.0], [0.8, 0.2, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]
    labels = rng.integers(0, 5, 200)
    for n_bins in (5, 15):
        bins = M.reliability_bins(probs, labels, n_bins)
        assert M.ece_from_bins(bins) == pytest.approx(M.expected_calibration_error(probs, labels, n_bins), abs=1e-12)
    counts = M.reliability_bins(probs[:3], labels[:3], 5)["count"].tolist()
    assert counts == [0, 0, 1, 0, 2]


# --------------------------------------------------------------------------------------------------------- OOD


def _fpr95_loop(id_conf: np.ndarray, ood_conf: np.ndarray) -> float:
    """Largest ID threshold that still accepts at least 95% of ID samples, then the OOD acceptance rate."""
    best = None
    for t in id_conf:
        if np.mean(id_conf >= t) >= 0.95 and (best is None or t > best):
            best = t
    return float(np.mean(ood_conf >= best))


@pytest.mark.parametrize(
    "seed,n_id,n_ood,discrete",
    [(0, 100, 50, False), (1, 37, 80, False), (2, 1000, 200, True), (3, 20, 7, True), (4, 1, 3, False)],
)
def test_ood_metrics_match_sklearn_and_loop(seed: int, n_id: int, n_ood: int, discrete: bool) -> None:
    rng = np.random.default_rng(seed)
    id_conf = rng.beta(5, 2, n_id)
    ood_conf = rng.beta(2, 3, n_ood)
    if discrete:  # many ties, within and across the two sets
        id_conf, ood_conf = np.round(id_conf, 1), np.round(ood_conf, 1)
    m = M.ood_metrics(id_conf, ood_conf)
    assert set(m) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    is_ood = np.r_[np.zeros(n_id), np.ones(n_ood)]
    scores = np.r_[id_conf, ood_conf]
    assert m["auroc"] == pytest.approx(roc_auc_score(is_ood, -scores), abs=1e-12)
    assert m["aupr_out"] == pytest.approx(average_precision_score(is_ood, -scores), abs=1e-12)
    assert m["aupr_in"] == pytest.approx(average_precision_score(1 - is_ood, scores), abs=1e-12)
    assert m["fpr95"] == _fpr95_loop(id_conf, ood_conf)
    # The OpenOOD formulation: ID positive, first ROC point whose TPR reaches 95%.
    fpr, tpr, _ = roc_curve(1 - is_ood, scores, drop_intermediate=False)
    assert m["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in m.values())


def test_ood_metrics_perfect_and_reversed_separation() -> None:
    perfect = M.ood_metrics([0.9, 0.8, 0.95], [0.1, 0.2])
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    reversed_ = M.ood_metrics([0.1, 0.2], [0.9, 0.8])
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0


def test_confidence_scores_match_torch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 6)) * 5
    t = torch.from_numpy(logits)
    assert np.allclose(M.msp_confidence(logits), torch.softmax(t, dim=1).max(dim=1).values.numpy(), atol=1e-14)
    assert np.array_equal(M.max_logit_confidence(logits), t.max(dim=1).values.numpy())
    for temperature in (1.0, 0.5, 1000.0):
        expected = temperature * torch.logsumexp(t / temperature, dim=1).numpy()
        assert np.allclose(M.energy_confidence(logits, temperature), expected, rtol=1e-12, atol=1e-12)
    # Overflow-prone logits stay finite.
    big = np.array([[1000.0, 0.0], [-1000.0, -1000.0]])
    assert np.allclose(M.msp_confidence(big), [1.0, 0.5])
    assert np.allclose(M.energy_confidence(big), [1000.0, -1000.0 + np.log(2.0)])


@pytest.mark.parametrize("k", [1, 3, 20])
def test_knn_distance_confidence_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    train = rng.normal(size=(60, 8))
    test = rng.normal(size=(25, 8)) * 3
    train_n = train / np.linalg.norm(train, axis=1, keepdims=True)
    expected = []
    for q in test:
        qn = q / np.linalg.norm(q)
        expected.append(-sorted(np.linalg.norm(train_n - qn, axis=1))[k - 1])
    for chunk_size in (None, 1, 7, 1000):
        got = M.knn_distance_confidence(train, test, k=k, chunk_size=chunk_size)
        assert np.allclose(got, expected, atol=1e-7)
    # Torch tensors give the same numbers.
    assert np.array_equal(
        M.knn_distance_confidence(torch.from_numpy(train), torch.from_numpy(test), k=k),
        M.knn_distance_confidence(train, test, k=k),
    )


def test_knn_distance_confidence_arguments() -> None:
    with pytest.raises(MetricArgumentError, match=r"Expected `k` to be an integer in \[1, 2\], but got 3"):
        M.knn_distance_confidence(np.eye(2), np.eye(2), k=3)
    with pytest.raises(MetricArgumentError, match="feature dimension"):
        M.knn_distance_confidence(np.eye(2), np.eye(3))
    with pytest.raises(MetricArgumentError, match="Expected `chunk_size` to be a positive integer, but got 0"):
        M.knn_distance_confidence(np.eye(2), np.eye(2), chunk_size=0)


# -------------------------------------------------------------------------------------------------- robustness


def _read_csv() -> dict[str, tuple[list[float], float]]:
    with ALEXNET_CSV.open() as f:
        rows = list(csv.DictReader(f))
    return {r["corruption"]: ([float(r[f"severity_{s}"]) for s in range(1, 6)], float(r["mean"])) for r in rows}


def test_alexnet_constants_equal_the_csv() -> None:
    table = _read_csv()
    assert list(table) == list(M.CORRUPTIONS)
    assert {c: list(v) for c, v in M.ALEXNET_ERRORS.items()} == {c: v[0] for c, v in table.items()}
    for c, (values, mean) in table.items():
        assert np.mean(values) == pytest.approx(mean, abs=1e-6)
    groups = [c for members in M.CORRUPTION_GROUPS.values() for c in members]
    assert groups == list(M.CORRUPTIONS) and list(M.CORRUPTION_GROUPS) == ["noise", "blur", "weather", "digital"]
    assert M.ALEXNET_CLEAN_ERROR == 0.4345


def _model_errors(seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    return {c: sorted(rng.uniform(0.2, 0.9, 5).tolist()) for c in M.CORRUPTIONS}


def test_mce_matches_hand_computation_from_csv() -> None:
    table = _read_csv()
    errors = _model_errors(0)
    ce = {c: sum(errors[c]) / sum(table[c][0]) for c in table}
    assert M.corruption_errors(errors) == pytest.approx(ce, abs=1e-14)
    assert M.mean_corruption_error(errors) == pytest.approx(100 * sum(ce.values()) / 15, abs=1e-12)
    clean = 0.25
    rel = {c: sum(e - clean for e in errors[c]) / sum(e - 0.4345 for e in table[c][0]) for c in table}
    assert M.relative_mean_corruption_error(errors, clean) == pytest.approx(100 * sum(rel.values()) / 15, abs=1e-12)
    assert M.relative_corruption_errors(errors, clean) == pytest.approx(rel, abs=1e-14)


def test_mce_with_a_mapping_baseline() -> None:
    errors, base = _model_errors(1), _model_errors(2)
    expected = 100 * np.mean([sum(errors[c]) / sum(base[c]) for c in M.CORRUPTIONS])
    assert M.mean_corruption_error(errors, baseline=base) == pytest.approx(expected, abs=1e-12)
    rel = 100 * np.mean([sum(e - 0.1 for e in errors[c]) / sum(e - 0.15 for e in base[c]) for c in M.CORRUPTIONS])
    got = M.relative_mean_corruption_error(errors, 0.1, baseline=base, baseline_clean_error=0.15)
    assert got == pytest.approx(rel, abs=1e-12)
    with pytest.raises(MetricArgumentError, match="Expected `baseline_clean_error` to be given"):
        M.relative_mean_corruption_error(errors, 0.1, baseline=base)


def test_mce_ignores_dict_order() -> None:
    errors = _model_errors(3)
    items = list(errors.items())
    random.Random(0).shuffle(items)
    base_items = list(M.ALEXNET_ERRORS.items())
    random.Random(1).shuffle(base_items)
    assert M.mean_corruption_error(dict(items)) == M.mean_corruption_error(errors)
    assert M.mean_corruption_error(dict(items), baseline=dict(base_items)) == M.mean_corruption_error(errors)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda e: e.pop("fog"), r"missing \['fog'\]"),
        (lambda e: e.update(speckle_noise=[0.5] * 5), r"unknown \['speckle_noise'\]"),
        (lambda e: e.update(fog=[0.5] * 4), r"Expected `errors\['fog'\]` to have 5 severities, but got 4"),
        (lambda e: e.update(fog=[50.0] * 5), r"Expected `errors\['fog'\]` to be errors in \[0, 1\]"),
        (lambda e: e.update(fog=[0.5, 0.5, float("nan"), 0.5, 0.5]), r"Expected `errors\['fog'\]` to be finite"),
    ],
)
def test_mce_rejects_malformed_tables(mutate, message: str) -> None:
    errors = _model_errors(4)
    mutate(errors)
    with pytest.raises(MetricArgumentError, match=message):
        M.mean_corruption_error(errors)


def test_mce_rejects_unknown_baseline_name_and_bad_clean_error() -> None:
    with pytest.raises(MetricArgumentError, match="Expected `baseline` to be 'alexnet' or a mapping"):
        M.mean_corruption_error(_model_errors(5), baseline="resnet50")
    with pytest.raises(MetricArgumentError, match=r"Expected `clean_error` to be a number in \[0, 1\], but got 43"):
        M.relative_mean_corruption_error(_model_errors(5), 43.0)


# ---------------------------------------------------------------------------------------------------- collapse


def test_spectrum_and_effective_rank_match_numpy_svd() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 5.0
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    assert np.allclose(M.spectrum(x), s, rtol=1e-12)
    assert np.all(np.diff(M.spectrum(x)) <= 0)
    p = s / s.sum() + 1e-7
    assert M.effective_rank(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_embedding(k: int) -> None:
    rng = np.random.default_rng(k)
    # Rank-k centred matrix with comparable singular values: orthonormal factors times a spread-out diagonal.
    u, _ = np.linalg.qr(rng.normal(size=(300, k)))
    u -= u.mean(axis=0)
    v, _ = np.linalg.qr(rng.normal(size=(32, k)))
    x = (u * np.linspace(1.0, 2.0, k)) @ v.T + rng.normal(size=32)  # plus a constant offset
    assert M.dims_for_variance(x, 0.99) == k
    assert M.effective_rank(x) <= k + 1e-3  # RankMe's eps adds ~1e-6 per zero singular value
    assert M.effective_rank(x) >= 0.9 * k
    assert int(np.sum(M.spectrum(x) > 1e-8)) == k


def test_isotropic_gaussian_has_near_full_effective_rank() -> None:
    rng = np.random.default_rng(0)
    d = 32
    x = rng.normal(size=(20000, d))
    assert M.effective_rank(x) == pytest.approx(d, rel=0.01)
    assert M.dims_for_variance(x, 0.99) >= d - 1
    assert M.per_dim_std(x) == pytest.approx(1 / np.sqrt(d), rel=0.05)


def test_collapsed_embedding() -> None:
    rng = np.random.default_rng(0)
    point = rng.normal(size=16)
    collapsed = np.tile(point, (100, 1)) * rng.uniform(0.5, 2.0, size=(100, 1))  # one direction, varying norm
    assert M.per_dim_std(collapsed) == pytest.approx(0.0, abs=1e-12)
    assert M.effective_rank(collapsed) == pytest.approx(1.0, abs=1e-3)
    assert M.dims_for_variance(collapsed) == 1
    identical = np.tile(np.array([0.1, 0.3, 1e3, -7.0]), (50, 1))  # rounding residue after centring is ignored
    assert M.effective_rank(identical) == 0.0
    assert M.dims_for_variance(identical) == 0


def test_per_dim_std_matches_direct_formula() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5)) + 1.0
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.mean([np.sqrt(np.mean((z[:, j] - z[:, j].mean()) ** 2)) for j in range(5)])
    assert M.per_dim_std(x) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------------- uncertainty


def test_misclassification_auroc() -> None:
    correct = np.array([True, False, True, True, False, True])
    assert M.misclassification_auroc(np.where(correct, 0.1, 2.0), correct) == 1.0
    assert M.misclassification_auroc(np.where(correct, 2.0, 0.1), correct) == 0.0
    assert M.misclassification_auroc(np.full(6, 0.3), correct) == 0.5
    rng = np.random.default_rng(0)
    u, c = rng.normal(size=200), rng.integers(0, 2, 200)
    assert M.misclassification_auroc(u, c) == pytest.approx(roc_auc_score(1 - c, u), abs=1e-12)
    with pytest.raises(MetricArgumentError, match="both correct and misclassified"):
        M.misclassification_auroc([0.1, 0.2], [True, True])
    with pytest.raises(MetricArgumentError, match="Expected `correct` to be a 1-dimensional array of booleans"):
        M.misclassification_auroc([0.1, 0.2], [0.5, 1.0])


def test_spearman_matches_pearson_of_ranks() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=100)
    e = u + rng.normal(size=100)
    ranks_u, ranks_e = np.argsort(np.argsort(u)), np.argsort(np.argsort(e))  # no ties in continuous draws
    expected = np.corrcoef(ranks_u, ranks_e)[0, 1]
    assert M.spearman_uncertainty_error(u, e) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(MetricArgumentError, match="Expected `uncertainty` to vary across samples"):
        M.spearman_uncertainty_error([1.0, 1.0, 1.0], [0.0, 1.0, 0.0])


# --------------------------------------------------------------------------------------- arguments and inputs


P = [[0.6, 0.4]]  # one sample, two classes
ARGUMENT_ERRORS = [
    (M.expected_calibration_error, (P, [0]), {"n_bins": 0}, "Expected `n_bins` to be a positive integer, but got 0"),
    (M.expected_calibration_error, (P, [0]), {"n_bins": 2.5},
     "Expected `n_bins` to be a positive integer, but got 2.5"),
    (M.accuracy, (P, [0]), {"k": 3}, r"Expected `k` to be an integer in \[1, 2\], but got 3"),
    (M.accuracy, (P, [0]), {"k": 0}, "Expected `k` to be a positive integer, but got 0"),
    (M.accuracy, ([[0.6, float("nan")]], [0]), {}, "Expected `probs` to be finite, but got 1 NaN or infinite"),
    (M.accuracy, ([[0.6, float("inf")]], [0]), {}, "Expected `probs` to be finite"),
    (M.accuracy, ([[1.5, -0.5]], [0]), {}, r"Expected `probs` to be probabilities in \[0, 1\]"),
    (M.accuracy, (P, [2]), {}, r"Expected `labels` to be in \[0, 2\), but got values in \[2, 2\]"),
    (M.accuracy, (P, [-1]), {}, r"Expected `labels` to be in \[0, 2\)"),
    (M.accuracy, (P, [0, 1]), {}, r"Expected `labels` to have one entry per row of the predictions \(1\), but got 2"),
    (M.accuracy, (P, [0.0]), {}, "Expected `labels` to be integer class indices, but got dtype float64"),
    (M.accuracy, ([0.6, 0.4], [0]), {}, r"Expected `probs` to be 2-dimensional, but got shape \(2,\)"),
    (M.accuracy, (np.zeros((0, 3)), np.zeros(0, int)), {}, r"Expected `probs` to be non-empty, but got shape \(0,"),
    (M.negative_log_likelihood, (P, [[0]]), {}, r"Expected `labels` to be 1-dimensional, but got shape \(1, 1\)"),
    (M.ood_metrics, ([], [0.5]), {}, "Expected `id_confidence` to be non-empty"),
    (M.ood_metrics, ([0.5], [[0.5]]), {}, "Expected `ood_confidence` to be 1-dimensional"),
    (M.energy_confidence, ([[1.0, 2.0]],), {"temperature": 0.0}, r"Expected `temperature` to be a number in \(0,"),
    (M.effective_rank, ([[1.0, 2.0]],), {}, "Expected `features` to have at least 2 rows"),
    (M.dims_for_variance, (np.eye(3),), {"fraction": 1.5},
     r"Expected `fraction` to be a number in \(0, 1\], but got 1.5"),
    (M.higher_is_better, ("",), {}, "Expected `metric_name` to be a non-empty string"),
    (M.metric_info, (None,), {}, "Expected `metric_name` to be a non-empty string, but got None"),
    (M.ece_from_bins, ({"confidence": [0.5], "accuracy": [0.5], "count": [0]},), {},
     "Expected `bins\\['count'\\]` to be non-negative counts with a positive sum"),
    (M.ece_from_bins, ({"confidence": [0.5], "accuracy": [0.5, 1.0], "count": [1, 2]},), {},
     r"Expected `bins` to hold one accuracy and one confidence per count \(2\), but got 2 and 1"),
]


@pytest.mark.parametrize("fn,args,kwargs,message", ARGUMENT_ERRORS)
def test_argument_errors_say_what_was_expected(fn, args, kwargs, message: str) -> None:
    with pytest.raises(MetricArgumentError, match=message):
        fn(*args, **kwargs)


def test_metric_argument_error_is_a_value_error() -> None:
    assert issubclass(MetricArgumentError, ValueError)


def test_torch_and_numpy_give_identical_results() -> None:
    rng = np.random.default_rng(0)
    probs = _random_probs(rng, 120, 5, 2.0)
    labels = rng.integers(0, 5, 120)
    tp, tl = torch.from_numpy(probs), torch.from_numpy(labels)
    for fn in (M.accuracy, M.negative_log_likelihood, M.expected_calibration_error):
        assert fn(tp, tl) == fn(probs, labels)
        assert isinstance(fn(tp, tl), float)
    # float32 tensors equal float32 arrays (both widened to float64 at the boundary)
    p32 = probs.astype(np.float32)
    assert M.expected_calibration_error(torch.from_numpy(p32), tl) == M.expected_calibration_error(p32, labels)
    logits = rng.normal(size=(30, 4))
    for fn in (M.msp_confidence, M.max_logit_confidence, M.energy_confidence):
        assert np.array_equal(fn(torch.from_numpy(logits)), fn(logits))
    a, b = rng.uniform(size=50), rng.uniform(size=30)
    assert M.ood_metrics(torch.from_numpy(a), torch.from_numpy(b)) == M.ood_metrics(a, b)
    x = rng.normal(size=(40, 6))
    tx = torch.from_numpy(x).requires_grad_(True)  # detached at the boundary
    for fn in (M.effective_rank, M.dims_for_variance, M.per_dim_std):
        assert fn(tx) == fn(x)
    assert np.array_equal(M.spectrum(tx), M.spectrum(x))
    correct = rng.integers(0, 2, 50).astype(bool)
    ta, tc = torch.from_numpy(a), torch.from_numpy(correct)
    assert M.misclassification_auroc(ta, tc) == M.misclassification_auroc(a, correct)
    assert M.spearman_uncertainty_error(ta, ta**2) == M.spearman_uncertainty_error(a, a**2)
    errors = {c: torch.tensor(v, dtype=torch.float64) for c, v in _model_errors(0).items()}
    assert M.mean_corruption_error(errors) == M.mean_corruption_error(_model_errors(0))
    assert isinstance(M.mean_corruption_error(errors), float)
    bf16 = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.bfloat16)  # numpy cannot read bfloat16 directly
    assert M.accuracy(bf16, torch.tensor([0, 1])) == 0.5


def test_higher_is_better_table() -> None:
    higher = ["top1", "top5", "top1_k20", "acc", "accuracy", "auroc", "aupr_in", "aupr_out", "effective_rank",
              "per_dim_std", "misclassification_auroc", "spearman_uncertainty_error", "dims_99", "some_new_score"]
    lower = ["nll", "ece", "fpr95", "mce", "relative_mce", "error", "clean_error", "top1_error", "ce_fog",
             "relative_ce_fog"]
    assert all(M.higher_is_better(n) for n in higher)
    assert not any(M.higher_is_better(n) for n in lower)


@pytest.mark.parametrize("name,higher,unit,group,score", [
    ("top1_k20", True, "fraction", "", True),
    ("nll_k20", False, "nats", "", True),
    ("ece_ts", False, "fraction", "", True),
    ("val_top1", True, "fraction", "", True),
    ("clean_error", False, "fraction", "", True),
    ("error_gaussian_noise_s3", False, "fraction", "", True),
    ("ce_fog", False, "raw", "", True),
    ("relative_ce_jpeg_compression", False, "raw", "", True),
    ("relative_mce", False, "percent", "", True),
    ("digits_c_mce", False, "percent", "", True),
    ("energy_fpr95", False, "fraction", "", True),
    ("knn_aupr_out", True, "fraction", "", True),
    ("sigma_auroc", True, "fraction", "predictive", True),
    ("dispersion_fpr95", False, "fraction", "predictive", True),
    ("sigma_misclf_auroc", True, "fraction", "predictive", True),
    ("sigma_err_spearman", True, "raw", "predictive", True),
    ("sigma_mean", True, "raw", "predictive", False),
    ("mu_dims_99", True, "raw", "predictive", True),
    ("proj_per_dim_std_x_sqrt_d", True, "raw", "projector", True),
    ("spearman_uncertainty_error", True, "raw", "", True),
    ("misclassification_auroc", True, "fraction", "", True),
    ("lr", True, "raw", "", False),
    ("n_labelled", True, "raw", "", False),
    ("some_new_score", True, "raw", "", True),
])
def test_metric_info_table(name: str, higher: bool, unit: str, group: str, score: bool) -> None:
    info = M.metric_info(name)
    assert (info.higher_is_better, info.unit, info.group, info.score) == (higher, unit, group, score)
    assert M.higher_is_better(name) is higher


def test_metric_names_parse_into_qualifier_base_and_variant() -> None:
    parts = {n: M.parse_metric_name(n) for n in ("energy_auroc", "error_fog_s3", "mu_dims_99.9", "Top1_K20", "x_y")}
    assert [(p.qualifier, p.base, p.variant, p.corruption) for p in parts.values()] == [
        ("energy", "auroc", "", ""), ("", "error", "fog_s3", "fog"), ("mu", "dims", "99.9", ""),
        ("", "top1", "k20", ""), ("", "", "", "")]
    texts = {n: M.metric_info(n).description for n in ("sigma_auroc", "sigma_mean", "proj_dims_99", "top1")}
    assert texts["sigma_auroc"].startswith("`sigma_*`: ") and texts["sigma_mean"].startswith("`sigma_mean`: ")
    assert texts["proj_dims_99"].startswith("`proj_*`: ") and texts["top1"] == ""


def test_every_metric_a_task_records_is_declared() -> None:
    """No recorded name falls back to the defaults: each resolves to a metric declared beside its function (or a
    protocol value), so its direction, unit and group are facts, not guesses."""
    from prosmin_bench.tasks import build_task, catalogue

    names = {n for _, spec in catalogue().items() for n in [spec.main_score, *build_task(spec).metric_names()]}
    assert {"top1_k20", "mce", "sigma_auroc", "proj_dims_99", "error_fog_s5"} <= names
    assert [n for n in sorted(names) if not M.parse_metric_name(n).base] == []


def test_metrics_import_nothing_from_the_rest_of_the_package() -> None:
    package_dir = Path(M.__file__).parent
    for path in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: relative import"
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "prosmin_bench" or name.startswith("prosmin_bench."):
                    assert name.startswith("prosmin_bench.metrics"), f"{path.name} imports {name}"


def test_mid_ranks_equal_scipys_average_rankdata_with_ties() -> None:
    from scipy.stats import rankdata as scipy_rankdata

    from prosmin_bench.metrics._ranking import rankdata

    rng = np.random.default_rng(7)
    for values in (rng.integers(0, 5, size=200).astype(float), rng.normal(size=57), np.array([3.0]),
                   np.array([2.0, 2.0, 2.0]), np.array([1.0, np.inf, -np.inf, 1.0])):
        np.testing.assert_array_equal(rankdata(values), scipy_rankdata(values, method="average"))


def test_spearman_equals_scipys_on_tied_data() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(8)
    u, e = rng.integers(0, 6, size=300).astype(float), rng.normal(size=300)
    e[:50] = 0.0  # many ties in both
    assert M.spearman_uncertainty_error(u, e) == pytest.approx(spearmanr(u, e).statistic, abs=1e-12)


def test_importing_the_metrics_leaves_scipy_stats_and_torch_unimported() -> None:
    # issue 20: `import prosmin_bench.metrics` stays light (scipy.stats alone cost ~0.8 s)
    import subprocess
    import sys

    code = ("import sys, prosmin_bench.metrics; "
            "print(sorted(m for m in ('scipy.stats', 'scipy.optimize', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
