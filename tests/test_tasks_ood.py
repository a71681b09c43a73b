"""OOD detection with the shared linear head, against scikit-learn and a direct softmax / nearest-neighbour."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from prosmin_bench import cards, config
from prosmin_bench.errors import CardError
from prosmin_bench.results import ResultRecord
from prosmin_bench.runner import RunOptions, evaluate


@pytest.fixture(scope="module")
def ood_home(tmp_path_factory):
    """A cache of this module's own: the head-count checks must not see heads other test files trained."""
    return tmp_path_factory.mktemp("ood_home")


def _cached_features(model, ref: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    from prosmin_bench.data import dataset_key, resolve_dataset
    from prosmin_bench.features import cache_key, load_cached

    ds = resolve_dataset(ref)
    fs = load_cached(cache_key(model, dataset_key(ref), ds.fingerprint, layer, "fp32", "float32"))
    assert fs is not None, ref
    return np.asarray(fs.features, dtype=np.float64), np.asarray(fs.labels)


def test_digits_o_far_reuses_the_linear_head_and_matches_sklearn(tmp_path, ood_home, monkeypatch):
    from scipy.special import softmax
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    from prosmin_bench.models import get_model

    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(ood_home))
    res = tmp_path / "r"
    lin, ood = evaluate(["random_micro"], ["digits_linear", "digits_o_far"],  # far-OOD: a fixed OOD set
                        options=RunOptions(seeds=(0,), device="cpu", results_dir=res))
    assert isinstance(lin, ResultRecord) and isinstance(ood, ResultRecord)
    heads = list(config.heads_dir().rglob("*.pt"))
    assert len(heads) == 1  # the OOD task found digits_linear's head in the cache instead of training another
    blob = torch.load(heads[0], weights_only=True)
    w, b = blob["weight"].double().numpy(), blob["bias"].double().numpy()

    model = get_model("random_micro")
    x_id, y_id = _cached_features(model, "digits:test", "cls_last4")
    x_ood, _ = _cached_features(model, "digits_o:test", "cls_last4")
    # The head is a float32 layer, so its logits are float32 (a standardised head is sharp: float64 logits would break
    # ties between MSPs that round to the same float32 logits and move the AUROC by a pair or two).
    w32, b32 = w.astype(np.float32), b.astype(np.float32)
    logits_id = (x_id.astype(np.float32) @ w32.T + b32).astype(np.float64)
    logits_ood = (x_ood.astype(np.float32) @ w32.T + b32).astype(np.float64)
    msp_id, msp_ood = softmax(logits_id, axis=1).max(1), softmax(logits_ood, axis=1).max(1)
    is_ood = np.r_[np.zeros(len(msp_id)), np.ones(len(msp_ood))]
    score = -np.r_[msp_id, msp_ood]  # OOD positive, scored by -confidence
    m = ood.mean
    assert m["auroc"] == pytest.approx(roc_auc_score(is_ood, score), abs=1e-6)
    assert m["aupr_out"] == pytest.approx(average_precision_score(is_ood, score), abs=1e-6)
    assert m["aupr_in"] == pytest.approx(average_precision_score(1 - is_ood, -score), abs=1e-6)
    threshold = np.sort(msp_id)[::-1][int(np.ceil(0.95 * len(msp_id))) - 1]
    assert m["fpr95"] == pytest.approx(np.mean(msp_ood >= threshold), abs=1e-6)
    assert m["id_top1"] == pytest.approx(lin.mean["top1"])  # all 10 classes: the head's own test accuracy
    # k-NN distance score (k = 1 on L2-normalised CLS features of the train split)
    bank, _ = _cached_features(model, "digits:train", "cls")
    q_id, _ = _cached_features(model, "digits:test", "cls")
    q_ood, _ = _cached_features(model, "digits_o:test", "cls")
    nn = NearestNeighbors(n_neighbors=1).fit(bank / np.linalg.norm(bank, axis=1, keepdims=True))
    d_id = nn.kneighbors(q_id / np.linalg.norm(q_id, axis=1, keepdims=True))[0][:, 0]
    d_ood = nn.kneighbors(q_ood / np.linalg.norm(q_ood, axis=1, keepdims=True))[0][:, 0]
    assert m["knn_auroc"] == pytest.approx(roc_auc_score(is_ood, np.r_[d_id, d_ood]), abs=1e-6)
    hist = ood.extras["msp_hist"]
    assert sum(hist["id"]["counts"]) == 360 and sum(hist["ood"]["counts"]) == 360


def test_restricted_logits_use_only_the_named_classes(tmp_path, ood_home, monkeypatch):
    """``id_classes`` keeps ID images of those classes and the softmax over those logits only (ImageNet-O)."""
    from scipy.special import softmax
    from sklearn.metrics import roc_auc_score

    from prosmin_bench.models import get_model

    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(ood_home))
    (tmp_path / "three.txt").write_text("2\n5\n7\n")
    d = tmp_path / "cards"
    d.mkdir()
    (d / "t.toml").write_text(textwrap.dedent(f"""
        name = "t_ood_restricted"
        kind = "ood"
        version = 1
        suite = "mini"
        main_score = "auroc"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        ood = "digits_o:test"
        [protocol]
        head_task = "digits_linear"
        id_classes = "{tmp_path / 'three.txt'}"
    """))
    cards.add_card_dir(d)
    (rec,) = evaluate(["random_micro"], ["t_ood_restricted"],
                      options=RunOptions(seeds=(0,), device="cpu", results_dir=tmp_path / "r"))
    (head,) = config.heads_dir().rglob("*.pt")  # still the one digits_linear head
    blob = torch.load(head, weights_only=True)
    w, b = blob["weight"].double().numpy(), blob["bias"].double().numpy()
    model = get_model("random_micro")
    x_id, y_id = _cached_features(model, "digits:test", "cls_last4")
    x_ood, _ = _cached_features(model, "digits_o:test", "cls_last4")
    keep = np.isin(y_id, [2, 5, 7])
    cols = [2, 5, 7]
    msp_id = softmax((x_id[keep] @ w.T + b)[:, cols], axis=1).max(1)
    msp_ood = softmax((x_ood @ w.T + b)[:, cols], axis=1).max(1)
    expected = roc_auc_score(np.r_[np.zeros(len(msp_id)), np.ones(len(msp_ood))], -np.r_[msp_id, msp_ood])
    assert rec.extras["n_id"] == int(keep.sum()) and rec.extras["head"]["classes"] == 3
    assert rec.mean["auroc"] == pytest.approx(expected, abs=1e-6)


def test_head_task_must_be_a_linear_task_on_the_same_sets(tmp_path):
    d = tmp_path / "cards"
    d.mkdir()
    base = """
        name = "{name}"
        kind = "ood"
        version = 1
        suite = "mini"
        main_score = "auroc"
        [datasets]
        train = "{train}"
        test = "digits:test"
        ood = "digits_o:test"
        [protocol]
        head_task = "{head}"
    """
    (d / "a.toml").write_text(textwrap.dedent(base.format(name="t_a", train="lfw:train", head="digits_linear")))
    (d / "b.toml").write_text(textwrap.dedent(base.format(name="t_b", train="digits:train", head="digits_knn")))
    cards.add_card_dir(d)
    recs = {r.task: r for r in evaluate(["random_micro"], ["t_a", "t_b"], options=RunOptions(
        seeds=(0,), device="cpu", results_dir=tmp_path / "r"))}
    assert recs["t_a"].error_type == CardError.__name__ and "must be the same set" in recs["t_a"].message
    assert recs["t_b"].error_type == CardError.__name__ and "kind 'linear'" in recs["t_b"].message
