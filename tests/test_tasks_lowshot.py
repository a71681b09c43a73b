"""Low-shot logistic regression and the labelled subsets, against scikit-learn run directly."""

from __future__ import annotations

import hashlib
import textwrap

import numpy as np
import pytest

from prosmin_bench import cards
from prosmin_bench.data.subsets import stratified_subset, subset_from_split_file
from prosmin_bench.errors import DataError
from prosmin_bench.features import load_cached
from prosmin_bench.results import ErrorRecord, ResultRecord
from prosmin_bench.runner import RunOptions, evaluate


def test_stratified_subset_is_sklearns_draw_and_differs_per_seed():
    from sklearn.model_selection import train_test_split

    labels = np.repeat(np.arange(5), [30, 40, 50, 60, 20])
    a = stratified_subset(labels, 0.1, seed=0)
    expected, _ = train_test_split(np.arange(200), train_size=20, stratify=labels, random_state=0)
    assert np.array_equal(a.indices, np.sort(expected))
    assert a.info["indices_sha256"] == hashlib.sha256(np.sort(expected).astype(np.int64).tobytes()).hexdigest()[:16]
    assert sorted(set(labels[a.indices].tolist())) == [0, 1, 2, 3, 4]
    assert not np.array_equal(a.indices, stratified_subset(labels, 0.1, seed=1).indices)
    with pytest.raises(DataError, match="fewer than the 5 classes"):
        stratified_subset(labels, 0.01, seed=0)


def test_split_file_selects_by_name_and_refuses_an_incomplete_folder(tmp_path):
    paths = [str(tmp_path / w / f"{w}_{i}.JPEG") for w in ("n01", "n02") for i in range(3)]
    labels = np.array([0, 0, 0, 1, 1, 1])
    split = tmp_path / "1percent.txt"
    split.write_text("n02_1.JPEG\nn01_0.JPEG\nn09_5.JPEG\n")  # n09: no folder at all -> skipped
    sub = subset_from_split_file(paths, labels, ["n01", "n02"], split)
    assert sub.indices.tolist() == [0, 4] and sub.info["skipped_absent_classes"] == 1
    split.write_text("n02_1.JPEG\nn01_7.JPEG\n")  # n01 is there but n01_7 is not: an incomplete download
    with pytest.raises(DataError, match="1 of 2 files listed in 1percent.txt are missing"):
        subset_from_split_file(paths, labels, ["n01", "n02"], split)


LOWSHOT = """
    name = "t_lowshot"
    kind = "lowshot"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    fraction = 0.1
    lambdas = [0.01, 1.0]
    lambdas_over_n = [0.1]
"""


def _cached_digits_cls(model_name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The cached final-norm CLS features [N, D] (float64) and labels [N] of the digits train and test splits that a
    run of ``model_name`` extracted (the reference computations below start from the same features)."""
    from prosmin_bench.data import resolve_dataset
    from prosmin_bench.features import cache_key
    from prosmin_bench.models import get_model

    model = get_model(model_name)
    out = []
    for split in ("train", "test"):
        ds = resolve_dataset(f"digits:{split}")
        fs = load_cached(cache_key(model, f"digits@1:{split}", ds.fingerprint, "cls", "fp32", "float32"))
        assert fs is not None, split
        out.append((np.asarray(fs.features, dtype=np.float64), np.asarray(fs.labels)))
    return out[0], out[1]


def test_lowshot_matches_sklearn_on_the_same_subset_and_lambda(tmp_path, shared_home, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import train_test_split

    from prosmin_bench.tasks.lowshot import stratified_folds

    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(shared_home))
    d = tmp_path / "cards"
    d.mkdir()
    (d / "t.toml").write_text(textwrap.dedent(LOWSHOT))
    (d / "bad.toml").write_text(textwrap.dedent(LOWSHOT).replace("t_lowshot", "t_lowshot_bad")
                                .replace("fraction = 0.1", "fraction = 0.005"))
    cards.add_card_dir(d)
    recs = evaluate(["random_micro"], ["t_lowshot", "t_lowshot_bad"],
                    options=RunOptions(seeds=(0, 1), device="cpu", results_dir=tmp_path / "r"))
    rec, bad = recs
    assert isinstance(rec, ResultRecord) and set(rec.per_seed) == {"0", "1"}
    assert isinstance(bad, ErrorRecord) and bad.error_type == "DataError" and "some class" in bad.message

    # Independent reference for seed 1: sklearn's stratified draw, held-out choice over the grid, refit, test.
    l2 = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    (x_tr, y_tr), (x_te, y_te) = _cached_digits_cls("random_micro")
    x_tr, x_te = l2(x_tr), l2(x_te)
    seed = 1
    idx, _ = train_test_split(np.arange(len(y_tr)), train_size=144, stratify=y_tr, random_state=seed)
    idx = np.sort(idx)
    x, y = x_tr[idx], y_tr[idx]
    folds = stratified_folds(y, 5, seed)  # K = round(1 / val_fraction): checked in test_stratified_folds_...
    n_fit = np.mean([len(f) for f, _ in folds])

    def held_out(lam_fit):  # the out-of-fold predictions pooled over the folds
        probs, truth = [], []
        for fit, val in folds:
            clf = LogisticRegression(C=1 / (lam_fit * len(fit)), fit_intercept=False, max_iter=1000)
            probs.append(clf.fit(x[fit], y[fit]).predict_proba(x[val]))
            truth.append(y[val])
        p, t = np.concatenate(probs), np.concatenate(truth)
        return accuracy_score(t, p.argmax(1)), -log_loss(t, p, labels=clf.classes_)

    # The card's grid at the fit part's N (value -> whether it is a lambda/N entry), then the extension written out:
    # while the best (top-1, then NLL; the first evaluated wins ties) is the smallest or largest value, add one
    # point beyond it at the ratio of the two outermost values, clamped to the default lambda_bounds (1e-7, 1e3).
    kind = {0.01: False, 1.0: False, 0.1 / n_fit: True}
    scores = {v: held_out(v) for v in kind}
    while True:
        best = max(scores, key=lambda v: (scores[v], -list(scores).index(v)))
        values = sorted(scores)
        if best == values[0] and best > 1e-7:
            new = max(values[0] ** 2 / values[1], 1e-7)
        elif best == values[-1] and best < 1e3:
            new = min(values[-1] ** 2 / values[-2], 1e3)
        else:
            break
        kind[new] = kind[values[0]] if best == values[0] else kind[values[-1]]
        scores[new] = held_out(new)
    lam = best * n_fit / len(y) if kind[best] else best  # a lambda/N point is refit at N = the whole subset
    clf = LogisticRegression(C=1 / (lam * len(y)), fit_intercept=False, max_iter=1000).fit(x, y)
    probs = clf.predict_proba(x_te)
    got = rec.per_seed["1"]
    assert got["lambda"] == pytest.approx(lam)
    assert got["top1"] == pytest.approx(accuracy_score(y_te, probs.argmax(1)), abs=1e-9)
    assert got["nll"] == pytest.approx(log_loss(y_te, probs), rel=1e-4)
    assert got["n_labelled"] == 144


def test_standardised_lowshot_matches_sklearn_on_z_scored_then_l2_normalised_features(tmp_path, shared_home,
                                                                                    monkeypatch):
    """``standardise = true`` with DINO's fixed lambda = 0.1/N (a one-value grid: no selection): the features are
    z-scored with the labelled subset's mean and std (the test features with the same statistics), then
    L2-normalised (SimpleShot's CL2N plus scaling); sklearn on those features gives the same numbers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import train_test_split

    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(shared_home))
    d = tmp_path / "cards"
    d.mkdir()
    card = (textwrap.dedent(LOWSHOT).replace("t_lowshot", "t_lowshot_std")
            .replace("lambdas = [0.01, 1.0]", "lambdas = []") + "standardise = true\n")
    (d / "t.toml").write_text(card)
    cards.add_card_dir(d)
    (rec,) = evaluate(["random_micro"], ["t_lowshot_std"],
                      options=RunOptions(seeds=(2,), device="cpu", results_dir=tmp_path / "r"))
    assert isinstance(rec, ResultRecord), rec
    (x_tr, y_tr), (x_te, y_te) = _cached_digits_cls("random_micro")
    idx, _ = train_test_split(np.arange(len(y_tr)), train_size=144, stratify=y_tr, random_state=2)
    x, y = x_tr[np.sort(idx)], y_tr[np.sort(idx)]
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1.0
    l2 = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    xs, xt = l2((x - mu) / sd), l2((x_te - mu) / sd)
    lam = 0.1 / len(y)
    clf = LogisticRegression(C=1 / (lam * len(y)), fit_intercept=False, max_iter=1000).fit(xs, y)
    probs = clf.predict_proba(xt)
    got = rec.per_seed["2"]
    assert got["lambda"] == pytest.approx(lam)
    assert got["top1"] == pytest.approx(accuracy_score(y_te, probs.argmax(1)), abs=1e-9)
    assert got["nll"] == pytest.approx(log_loss(y_te, probs), rel=1e-4)
    assert rec.extras["selection"]["lambda"]["edge"] == [False]


def test_stratified_folds_hold_out_every_image_of_a_class_with_two_examples_once():
    from prosmin_bench.tasks.lowshot import stratified_folds

    rng = np.random.default_rng(0)
    labels = np.r_[np.repeat(np.arange(8), rng.integers(2, 30, 8)), [8, 9]]  # classes 8 and 9: one example each
    folds = stratified_folds(labels, 5, seed=4)
    held = np.concatenate([v for _, v in folds])
    assert len(folds) == 5 and sorted(held.tolist()) == np.flatnonzero(labels < 8).tolist()  # each once, no single
    sizes = [len(v) for _, v in folds]
    assert max(sizes) - min(sizes) <= 1  # dealt round robin across classes
    for fit, val in folds:
        assert sorted(np.r_[fit, val].tolist()) == list(range(len(labels)))
        assert set(labels[fit]) == set(range(10))  # no fold holds out all of a class
    assert [v.tolist() for _, v in stratified_folds(labels, 5, seed=4)] == [v.tolist() for _, v in folds]
    assert [v.tolist() for _, v in stratified_folds(labels, 5, seed=5)] != [v.tolist() for _, v in folds]
    tiny = np.array([0, 0, 1, 2, 3])  # 14-image subsets: a class with two, the rest single
    assert [v.tolist() for _, v in stratified_folds(tiny, 5, 0)] in ([[0], [1]], [[1], [0]])
