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


def test_lowshot_matches_sklearn_on_the_same_subset_and_lambda(tmp_path, shared_home, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import train_test_split

    from prosmin_bench.tasks.probes import stratified_holdout

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
    from prosmin_bench.features import cache_key
    from prosmin_bench.models import get_model

    model = get_model("random_micro")
    feats = {}
    for split in ("train", "test"):
        from prosmin_bench.data import resolve_dataset

        ds = resolve_dataset(f"digits:{split}")
        key = cache_key(model, f"digits@1:{split}", ds.fingerprint, "cls", "fp32", "float32")
        fs = load_cached(key)
        assert fs is not None
        x = np.asarray(fs.features, dtype=np.float64)
        feats[split] = (x / np.linalg.norm(x, axis=1, keepdims=True), np.asarray(fs.labels))
    (x_tr, y_tr), (x_te, y_te) = feats["train"], feats["test"]
    seed = 1
    idx, _ = train_test_split(np.arange(len(y_tr)), train_size=144, stratify=y_tr, random_state=seed)
    idx = np.sort(idx)
    x, y = x_tr[idx], y_tr[idx]
    fit, val = stratified_holdout(y, 0.2, seed)
    grid = [("0.01", 0.01, 0.01), ("1", 1.0, 1.0), ("0.1/N", 0.1 / len(fit), 0.1 / len(y))]
    scores = []
    for label, lam_fit, lam_all in grid:
        clf = LogisticRegression(C=1 / (lam_fit * len(fit)), fit_intercept=False, max_iter=1000).fit(x[fit], y[fit])
        p = clf.predict_proba(x[val])
        scores.append((accuracy_score(y[val], p.argmax(1)), -log_loss(y[val], p, labels=clf.classes_), lam_all))
    lam = max(scores)[2]
    clf = LogisticRegression(C=1 / (lam * len(y)), fit_intercept=False, max_iter=1000).fit(x, y)
    probs = clf.predict_proba(x_te)
    got = rec.per_seed["1"]
    assert got["lambda"] == pytest.approx(lam)
    assert got["top1"] == pytest.approx(accuracy_score(y_te, probs.argmax(1)), abs=1e-9)
    assert got["nll"] == pytest.approx(log_loss(y_te, probs), rel=1e-4)
    assert got["n_labelled"] == 144
