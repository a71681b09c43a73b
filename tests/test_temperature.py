"""Temperature scaling (Guo et al. 2017): ``metrics.fit_temperature`` against an independent minimisation and
against netcal's TemperatureScaling; its argument checks; and the ``nll_ts`` / ``ece_ts`` / ``temperature`` of the
k-NN, linear and low-shot records, recomputed here from scratch (held-out split, direct formulas)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from prosmin_bench import metrics as M
from prosmin_bench.metrics import MetricArgumentError, fit_temperature, temperature_scale
from prosmin_bench.settings import EvalSettings
from prosmin_bench.tasks.base import TaskContext, TaskSpec, build_task
from prosmin_bench.tasks.probes import stratified_holdout


def _logits(n, c, seed, noise=2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 2.0
    y = np.argmax(z + rng.normal(size=z.shape) * noise, axis=1)
    return z, y


def _nll(z, y, t):
    """Mean NLL of softmax(z / t), written out with torch's cross-entropy (an implementation independent of ours)."""
    return float(torch.nn.functional.cross_entropy(torch.as_tensor(z / t), torch.as_tensor(y)))


def _reference_temperature(z, y):
    """Independent minimiser: Nelder-Mead on beta = 1/T of torch's cross-entropy (another method, another variable)."""
    res = minimize(lambda b: _nll(z, y, 1.0 / b[0]), x0=[1.0], method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 2000})
    return 1.0 / res.x[0]


@pytest.mark.parametrize("n,c,seed,noise", [(500, 3, 0, 2.0), (300, 10, 1, 1.0), (200, 2, 2, 4.0),
                                            (1000, 100, 3, 0.5)])
def test_fit_temperature_matches_an_independent_minimisation(n, c, seed, noise):
    z, y = _logits(n, c, seed, noise)
    t = fit_temperature(z, y)
    assert t == pytest.approx(_reference_temperature(z, y), rel=1e-5)
    # and it is the minimum of a fine grid around it (1e-4 steps in log T)
    grid = t * np.exp(np.linspace(-0.05, 0.05, 1001))
    assert _nll(z, y, t) <= min(_nll(z, y, g) for g in grid) + 1e-12


@pytest.mark.parametrize("c,seed", [(3, 0), (10, 1)])
def test_fit_temperature_matches_netcal(c, seed):
    """netcal fits probabilities (it takes log p as the logits) and reports w = 1/T as its ``temperature``; given
    softmax(z) it sees z up to a per-row shift, which changes no softmax. Its MLE uses scipy's BFGS with numerical
    gradients (gtol 1e-5 on the mean NLL), so w is accurate to about 1e-5 relative: T is compared at 1e-4, and the
    calibrated NLLs, flat at the optimum (second order in the error of T), at 1e-8."""
    from netcal.scaling import TemperatureScaling

    z, y = _logits(500, c, seed)
    ts = TemperatureScaling(method="mle")
    ts.fit(softmax(z, axis=1), y)
    w = float(np.asarray(ts.temperature).ravel()[0])
    t = fit_temperature(z, y)
    assert t == pytest.approx(1.0 / w, rel=1e-4)
    calibrated = ts.transform(softmax(z, axis=1))
    netcal_nll = float(-np.mean(np.log(calibrated[np.arange(len(y)), y])))
    assert _nll(z, y, t) == pytest.approx(netcal_nll, abs=1e-8)
    assert M.negative_log_likelihood(temperature_scale(z, t), y) == pytest.approx(netcal_nll, abs=1e-8)


def test_fit_temperature_beats_netcal_on_sharp_logits():
    """Why the suite fits T itself (metrics/temperature.py): netcal takes log(clip(p, eps, 1 - eps)) as its logits, so
    the classes a sharp head gives p < eps lose their logit and its T misses the held-out NLL minimum. A nearly
    unregularised softmax regression on scikit-learn's digits (probabilities down to 1e-74) shows it: netcal's T is
    about 7% lower and its held-out NLL higher than the minimum this suite finds."""
    from netcal.scaling import TemperatureScaling
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    head = LogisticRegression(C=1e6, max_iter=5000).fit(x[:900], y[:900])
    z, yv = head.decision_function(x[900:1300]), y[900:1300]
    assert softmax(z, axis=1).min() < 1e-40  # sharp: far below netcal's clip
    ours = fit_temperature(z, yv)
    netcal = TemperatureScaling()
    netcal.fit(softmax(z, axis=1), yv)
    theirs = 1.0 / float(np.ravel(netcal.temperature)[0])
    assert _nll(z, yv, ours) < _nll(z, yv, theirs) - 1e-4
    assert ours == pytest.approx(_reference_temperature(z, yv), rel=1e-5)


def test_fit_temperature_closed_form_and_invariances():
    # two classes, one margin m, a fraction a right: softmax(m / T) = a at the optimum, T = m / logit(a)
    for a, m in ((0.75, 4.0), (0.9, 1.0), (0.6, 10.0)):
        n = 1000
        right = int(a * n)
        z = np.tile([m, 0.0], (n, 1))
        y = np.r_[np.zeros(right, int), np.ones(n - right, int)]
        assert fit_temperature(z, y) == pytest.approx(m / np.log(a / (1 - a)), rel=1e-6)
    z, y = _logits(400, 5, 4)
    t = fit_temperature(z, y)
    assert fit_temperature(z + np.random.default_rng(0).normal(size=(400, 1)) * 50, y) == pytest.approx(t, rel=1e-6)
    assert fit_temperature(7.0 * z, y) == pytest.approx(7.0 * t, rel=1e-6)  # T scales with the logits
    assert fit_temperature(torch.from_numpy(z).float(), torch.from_numpy(y)) == pytest.approx(t, rel=1e-5)


def test_fit_temperature_ends_of_the_bracket():
    # separable held-out data: the NLL falls towards 0 as T -> 0, so the lower end 1e-3 s comes back
    z = np.array([[2.0, -1.0, 0.0], [0.0, 3.0, 1.0], [-1.0, 0.0, 1.5]])
    s = float(np.sqrt(np.mean((z - z.mean(1, keepdims=True)) ** 2)))
    assert fit_temperature(z, [0, 1, 2]) == pytest.approx(1e-3 * s, rel=1e-6)
    # logits that point away from the labels: the best is as flat as allowed, the upper end 1e3 s
    assert fit_temperature(z, [1, 2, 0]) == pytest.approx(1e3 * s, rel=1e-6)
    assert fit_temperature(np.ones((4, 3)), [0, 1, 2, 0]) == 1.0  # no dependence on T at all


@pytest.mark.parametrize("logits,labels,match", [
    (np.zeros(3), [0, 1, 2], "Expected `logits` to be 2-dimensional"),
    (np.zeros((0, 3)), [], "Expected `logits` to be non-empty"),
    ([[0.0, np.nan]], [0], "Expected `logits` to be finite"),
    ([[0.0, 1.0]], [2], r"Expected `labels` to be in \[0, 2\)"),
    ([[0.0, 1.0]], [0, 1], "one entry per row"),
    ([[0.0, 1.0]], [0.5], "integer class indices"),
])
def test_fit_temperature_argument_errors(logits, labels, match):
    with pytest.raises(MetricArgumentError, match=match):
        fit_temperature(logits, labels)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf"), True, "x"])
def test_temperature_scale_refuses_a_temperature_that_is_not_positive(t):
    with pytest.raises(MetricArgumentError, match="Expected `temperature` to be a positive"):
        temperature_scale([[1.0, 0.0]], t)


@pytest.mark.parametrize("name,higher,score", [("nll_ts", False, True), ("ece_ts", False, True),
                                               ("nll_ts_k20", False, True), ("ece_ts_k200", False, True),
                                               ("temperature", True, False), ("temperature_k20", True, False)])
def test_temperature_metric_names_are_declared(name, higher, score):
    info = M.metric_info(name)
    assert (info.higher_is_better, info.score) == (higher, score)
    assert M.parse_metric_name(name).base in ("nll", "ece", "temperature")


# ------------------------------------------------------------------------------------- the records of the tasks
def _ece(probs, labels, n_bins=15):
    """Top-label ECE written out: bins [k/n, (k+1)/n), the last one closed at 1 (metrics/calibration.py's bins)."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        inside = (conf >= lo) & ((conf < hi) if k < n_bins - 1 else (conf <= hi))
        if inside.any():
            total += inside.sum() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return total / len(labels)


def _direct_nll(probs, labels):
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))


def _blobs(n, dim, classes, seed, noise_seed, spread=0.6):
    centers = np.random.default_rng(seed).normal(size=(classes, dim)) * spread
    y = np.repeat(np.arange(classes), n // classes)
    x = centers[y] + np.random.default_rng(noise_seed).normal(size=(len(y), dim))
    return x.astype(np.float32), y


def _run(kind, protocol, seed=0):
    x, y = _blobs(300, 12, 4, 0, 1)
    xt, yt = _blobs(120, 12, 4, 0, 2)
    sets = {"train": SimpleNamespace(features=x, labels=y, key=f"ts-{kind}"),
            "test": SimpleNamespace(features=xt, labels=yt, key=f"ts-{kind}-t")}
    spec = TaskSpec(name=f"ts_{kind}", kind=kind, version=1, main_score="top1" if kind != "knn" else "top1_k20",
                    suite="mini", datasets={"train": "digits:train", "test": "digits:test"}, protocol=protocol)
    model = SimpleNamespace(spec=SimpleNamespace(feature_layer="cls"), has_predictive=False)
    ctx = TaskContext(model=model, seed=seed, settings=EvalSettings(),
                      feature_fn=lambda ref, layer, preprocess=None: sets[ref.split],
                      dataset_fn=lambda ref: SimpleNamespace())
    return build_task(spec).run(ctx), (x, y), (xt, yt)


def _knn_probs(bank, bank_y, queries, k, c, vote_t=0.07):
    """DINO's weighted vote written out in numpy: cosine similarity, top-k, exp(sim / T) summed per class."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ b.T.astype(np.float64)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(q), c))
    for i in range(len(q)):
        np.add.at(votes[i], bank_y[top[i]], np.exp(sims[i, top[i]] / vote_t))
    return votes / votes.sum(1, keepdims=True)


def test_knn_records_temperature_fitted_on_a_held_out_part_of_the_bank():
    out, (x, y), (xt, yt) = _run("knn", {"ks": [5, 20], "layer": "cls"}, seed=3)
    fit, val = stratified_holdout(y, 0.1, 3)  # the protocol's ts_val_fraction, seeded like the task
    for k in (5, 20):
        val_logits = np.log(np.maximum(_knn_probs(x[fit], y[fit], x[val], k, 4), 1e-12))
        t = _reference_temperature(val_logits, y[val])
        assert out.metrics[f"temperature_k{k}"] == pytest.approx(t, rel=1e-4)
        # Guo et al.'s setup: the classifier T was fitted for (the bank less its held-out part) on test
        test_logits = np.log(np.maximum(_knn_probs(x[fit], y[fit], xt, k, 4), 1e-12))
        scaled = softmax(test_logits / out.metrics[f"temperature_k{k}"], axis=1)
        assert out.metrics[f"nll_ts_k{k}"] == pytest.approx(_direct_nll(scaled, yt), abs=1e-5)
        assert out.metrics[f"ece_ts_k{k}"] == pytest.approx(_ece(scaled, yt), abs=1e-5)
        assert out.metrics[f"nll_k{k}"] == pytest.approx(_direct_nll(_knn_probs(x, y, xt, k, 4), yt), abs=1e-5)


def test_linear_records_temperature_scaled_test_logits_of_the_fit_part_head():
    """nll_ts / ece_ts are the NLL and the 15-bin ECE of softmax(test logits / T) of the head trained on the fit part
    at the chosen lr (Guo et al.'s setup), T its NLL minimiser on the held-out split; nll is the final head's."""
    from prosmin_bench import config
    from prosmin_bench.tasks.probes import predict_logits, train_linear_head

    protocol = {"layer": "cls", "epochs": 10, "batch_size": 64, "base_lrs": [0.03, 0.1, 0.3]}
    out, (x, y), (xt, yt) = _run("linear", protocol)
    (head_file,) = config.heads_dir().rglob("*.pt")
    blob = torch.load(head_file, weights_only=True)
    logits = (torch.from_numpy(xt).double() @ blob["weight"].double().T + blob["bias"].double()).numpy()
    assert out.metrics["nll"] == pytest.approx(-log_softmax(logits, axis=1)[np.arange(len(yt)), yt].mean(), abs=1e-5)
    fit, val = stratified_holdout(y, 0.1, 0)
    fit_head = train_linear_head(x[fit], y[fit], 4, lr=out.metrics["lr"], epochs=10, batch_size=64, momentum=0.9,
                                 weight_decay=0.0, seed=0)
    t = out.metrics["temperature"]
    assert t == pytest.approx(_reference_temperature(predict_logits(fit_head, x[val]).astype(np.float64), y[val]),
                              rel=1e-4)
    scaled = softmax(predict_logits(fit_head, xt).astype(np.float64) / t, axis=1)
    assert out.metrics["nll_ts"] == pytest.approx(_direct_nll(scaled, yt), abs=1e-5)
    assert out.metrics["ece_ts"] == pytest.approx(_ece(scaled, yt), abs=1e-5)
    assert blob["calibration_weight"] is not None  # the cache keeps the fit-part head, so a reused head agrees


def test_lowshot_records_temperature_fitted_on_the_held_out_part():
    """T is fitted on the pooled out-of-fold decision functions of the folds' classifiers at the chosen lambda."""
    from sklearn.linear_model import LogisticRegression

    from prosmin_bench.data.subsets import stratified_subset
    from prosmin_bench.tasks.lowshot import stratified_folds

    out, (x, y), (xt, yt) = _run("lowshot", {"fraction": 0.3, "lambdas": [0.01, 0.1], "lambdas_over_n": []})
    sub = stratified_subset(y, 0.3, 0).indices
    xs = x[sub] / np.linalg.norm(x[sub], axis=1, keepdims=True)
    ys = y[sub]
    lam_fit = out.extras["selection"]["lambda"]["chosen"]
    logits, labels = [], []
    for fit, val in stratified_folds(ys, 5, 0):
        clf = LogisticRegression(C=1 / (lam_fit * len(fit)), fit_intercept=False, max_iter=1000).fit(xs[fit], ys[fit])
        logits.append(clf.decision_function(xs[val]))
        labels.append(ys[val])
    t = _reference_temperature(np.concatenate(logits), np.concatenate(labels))
    assert out.metrics["temperature"] == pytest.approx(t, rel=1e-3)
    final = LogisticRegression(C=1 / (out.metrics["lambda"] * len(ys)), fit_intercept=False, max_iter=1000)
    final.fit(xs, ys)
    xt_n = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    scaled = softmax(final.decision_function(xt_n) / out.metrics["temperature"], axis=1)
    assert out.metrics["nll_ts"] == pytest.approx(_direct_nll(scaled, yt), rel=1e-3)
    assert out.metrics["ece_ts"] == pytest.approx(_ece(scaled, yt), abs=1e-3)
    assert {"nll", "ece", "nll_ts", "ece_ts", "temperature"} <= set(out.metrics)


def test_knn_topk_never_returns_an_excluded_bank_row_even_across_chunks():
    """The held-out part of the bank is excluded from the neighbours: brute force over the included rows only, with
    a budget small enough that the bank is read in several chunks."""
    from prosmin_bench.tasks.knn import knn_topk

    rng = np.random.default_rng(5)
    bank, queries = rng.normal(size=(5000, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    exclude = rng.random(5000) < 0.3
    exclude[:50] = True  # the first chunk starts with excluded rows
    sims, idx = knn_topk(bank, queries, 20, max_memory=400_000, exclude=exclude)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ref = (q @ b.T).astype(np.float64)
    ref[:, exclude] = -np.inf
    expected = np.sort(ref, axis=1)[:, ::-1][:, :20]
    assert not exclude[idx.numpy()].any()
    assert sims.numpy() == pytest.approx(expected, abs=1e-5)
    kept = np.flatnonzero(~exclude)[:3]  # a bank of 3 included rows gives 3 neighbours, never an excluded one
    only = np.ones(5000, dtype=bool)
    only[kept] = False
    _, idx3 = knn_topk(bank, queries, 20, exclude=only)
    assert idx3.shape == (40, 3) and set(idx3.numpy().ravel()) <= set(kept.tolist())
