"""Open-set recognition in the ``ood`` kind (``class_splits``): held-out classes of the test set are the OOD set.

Checked on a constructed problem (Gaussian class clusters as "features", served through a TaskContext) against
scikit-learn's ROC AUC of the max softmax probability computed here from the cached heads, and against a head trained
here on the ID classes only; the cards' class fields are checked with one-line CardErrors.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from prosmin_bench import cards, config
from prosmin_bench.errors import CardError, DataError
from prosmin_bench.settings import EvalSettings
from prosmin_bench.tasks.base import TaskContext, build_task, get_task_spec, spec_from_card
from prosmin_bench.tasks.open_set import split_mean_auroc_replicates

LINEAR = """
    name = "t_osr_linear"
    kind = "linear"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    layer = "cls"
    epochs = 30
    batch_size = 64
    base_lrs = [0.1, 0.3, 1.0]
"""

OSR = """
    name = "t_osr"
    kind = "ood"
    version = 1
    suite = "mini"
    main_score = "auroc"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    head_task = "t_osr_linear"
    knn_k = 1
    class_splits = [[0, 1], [3, 1, 2]]
"""


@dataclass
class _Features:
    features: np.ndarray
    labels: np.ndarray
    key: str


@dataclass
class _Spec:
    name: str = "synthetic"
    feature_layer: str = "cls"


@dataclass
class _Model:
    spec: _Spec = field(default_factory=_Spec)
    has_predictive: bool = False
    has_projector: bool = False


def _problem(seed: int = 0) -> dict[str, _Features]:
    """Four classes in 6-D, cluster centres on a circle (near classes overlap a little): 60 train, 25 test each."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * np.eye(6)[:4]
    out = {}
    for split, n in (("train", 60), ("test", 25)):
        y = np.repeat(np.arange(4), n)
        x = centres[y] + rng.normal(0.0, 0.9, (len(y), 6))
        out[split] = _Features(x.astype(np.float32), y, f"synthetic-{split}")
    return out


def _context(data: dict[str, _Features]) -> TaskContext:
    def feature_fn(ref, layer, preprocess=None):
        return data[ref.split]

    return TaskContext(model=_Model(), seed=0, settings=EvalSettings(), feature_fn=feature_fn,
                       dataset_fn=lambda ref: None)


@pytest.fixture
def osr_cards(tmp_path):
    d = tmp_path / "cards"
    d.mkdir()
    (d / "lin.toml").write_text(textwrap.dedent(LINEAR))
    (d / "osr.toml").write_text(textwrap.dedent(OSR))
    cards.add_card_dir(d)
    return d


def test_open_set_partition_heads_and_auroc_match_a_direct_computation(osr_cards):
    from scipy.special import softmax
    from sklearn.metrics import average_precision_score, roc_auc_score

    from prosmin_bench.tasks.probes import linear_task_spec, train_linear_head

    data = _problem()
    out = build_task(get_task_spec("t_osr")).run(_context(data))
    heads = {}
    for path in config.heads_dir().rglob("*.pt"):
        blob = torch.load(path, weights_only=True)
        heads[blob["weight"].shape[0]] = blob  # the two splits have 2 and 3 ID classes
    assert sorted(heads) == [2, 3]  # one head per split, with one output per ID class and none for OOD classes
    x_te, y_te = data["test"].features.astype(np.float64), data["test"].labels
    x_tr, y_tr = data["train"].features, data["train"].labels
    _, lin = linear_task_spec("t_osr_linear", "test")
    aurocs, auprs, tops = [], [], []
    for j, split in enumerate([[0, 1], [3, 1, 2]]):
        info = out.extras["open_set"]["splits"][j]
        assert info["id_classes"] == split and info["ood_classes"] == sorted(set(range(4)) - set(split))
        assert (info["n_id"], info["n_ood"]) == (25 * len(split), 25 * (4 - len(split)))
        blob = heads[len(split)]
        # The head is the one trained on the ID classes' train images alone, labelled in the split's order.
        rows = np.flatnonzero(np.isin(y_tr, split))
        relabel = np.array([split.index(int(v)) for v in y_tr[rows]])
        direct = train_linear_head(x_tr[rows], relabel, len(split), lr=float(blob["lr"]), epochs=lin.epochs,
                                   batch_size=lin.batch_size, momentum=lin.momentum, weight_decay=lin.weight_decay,
                                   seed=0)
        torch.testing.assert_close(direct.weight.detach(), blob["weight"])
        w, b = blob["weight"].double().numpy(), blob["bias"].double().numpy()
        is_id = np.isin(y_te, split)
        probs = softmax(x_te @ w.T + b, axis=1)
        msp = probs.max(1)
        is_ood = (~is_id).astype(int)
        aurocs.append(roc_auc_score(is_ood, -msp))  # OOD positive, scored by -confidence
        auprs.append(average_precision_score(is_ood, -msp))
        tops.append(np.mean(probs[is_id].argmax(1) == np.array([split.index(int(v)) for v in y_te[is_id]])))
        assert info["auroc"] == pytest.approx(aurocs[-1], abs=1e-9)
    assert out.metrics["auroc"] == pytest.approx(np.mean(aurocs), abs=1e-9)  # the mean over the splits
    assert out.metrics["aupr_out"] == pytest.approx(np.mean(auprs), abs=1e-9)
    assert out.metrics["id_top1"] == pytest.approx(np.mean(tops), abs=1e-9)
    assert 0.6 < out.metrics["auroc"] < 1.0  # held-out classes are separable here, but not perfectly
    assert sum(out.extras["msp_hist"]["id"]["counts"]) == 25 * 5 and sum(out.extras["msp_hist"]["ood"]["counts"]) == 25 * 3


def test_open_set_knn_bank_holds_only_the_id_classes_train_images(osr_cards):
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    data = _problem(seed=1)
    out = build_task(get_task_spec("t_osr")).run(_context(data))
    x_tr, y_tr = data["train"].features.astype(np.float64), data["train"].labels
    x_te, y_te = data["test"].features.astype(np.float64), data["test"].labels
    norm = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    expected = []
    for split in ([0, 1], [3, 1, 2]):
        nn = NearestNeighbors(n_neighbors=1).fit(norm(x_tr[np.isin(y_tr, split)]))
        dist = nn.kneighbors(norm(x_te))[0][:, 0]
        expected.append(roc_auc_score((~np.isin(y_te, split)).astype(int), dist))
    assert out.metrics["knn_auroc"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert [s["bank"] for s in out.extras["open_set"]["splits"]] == [120, 180]


def test_main_score_samples_are_bootstrap_replicates_of_the_split_mean(osr_cards):
    from sklearn.metrics import roc_auc_score

    conf = [np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1]), np.array([0.5, 0.7, 0.2, 0.9, 0.4, 0.3])]
    ood = [np.array([0, 0, 1, 1, 0, 1], bool), np.array([0, 1, 0, 1, 0, 1], bool)]
    reps = split_mean_auroc_replicates(conf, ood, n_boot=50, seed=3)
    rng = np.random.default_rng(3)
    for b in range(50):  # the documented draw: one index vector per replicate, shared by the splits
        idx = rng.integers(0, 6, 6)
        vals = [roc_auc_score(o[idx], -c[idx]) for c, o in zip(conf, ood) if 0 < o[idx].sum() < 6]
        assert reps[b] == pytest.approx(np.mean(vals) if vals else np.nan, nan_ok=True)
    out = build_task(get_task_spec("t_osr")).run(_context(_problem()))
    assert out.samples is not None and out.samples.kind == "replicates" and out.samples.metric == "auroc"
    assert abs(float(np.nanmean(out.samples.values)) - out.metrics["auroc"]) < 0.05


def test_a_split_without_held_out_test_classes_is_a_data_error(tmp_path):
    d = tmp_path / "cards"
    d.mkdir()
    (d / "lin.toml").write_text(textwrap.dedent(LINEAR))
    (d / "osr.toml").write_text(textwrap.dedent(OSR.replace("[[0, 1], [3, 1, 2]]", "[[0, 1, 2, 3]]")))
    cards.add_card_dir(d)
    with pytest.raises(DataError, match="no class is held out"):
        build_task(get_task_spec("t_osr")).run(_context(_problem()))


def _card(tmp_path: Path, protocol: str, datasets: str = "") -> Any:
    text = textwrap.dedent(OSR).replace("class_splits = [[0, 1], [3, 1, 2]]", protocol)
    text = text.replace('test = "digits:test"', 'test = "digits:test"\n' + datasets)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return cards.Card(path, cards.read_card(path), "user")


@pytest.mark.parametrize("protocol, datasets, message", [
    ("class_splits = [[0]]", "", "split 0 must list at least 2 ID classes"),
    ("class_splits = [[0, 1], [2, 2]]", "", "split 1 lists a class twice"),
    ("class_splits = [[0, -1]]", "", "split 0 must be a list of non-negative class indices"),
    ('class_splits = [["0", "1"]]', "", "split 0 must be a list of non-negative class indices"),
    ("class_splits = [[0, true]]", "", "split 0 must be a list of non-negative class indices"),
    ("class_splits = [0, 1]", "", "split 0 must be a list of non-negative class indices"),
    ("class_splits = [[0, 1]]", 'ood = "digits_o:test"', "remove datasets.ood"),
    ('class_splits = [[0, 1]]\nid_classes = "x.txt"', "", "remove protocol.id_classes"),
    ("", "", "needs datasets.ood (the OOD images) or protocol field 'class_splits'"),
])
def test_bad_class_fields_are_card_errors(tmp_path, protocol, datasets, message):
    card = _card(tmp_path, protocol, datasets)
    with pytest.raises(CardError) as err:
        spec_from_card(card)
    text = str(err.value)
    assert message in text and str(card.path) in text and "\n" not in text


def test_shipped_cards_digits_o_is_open_set_and_digits_o_far_keeps_version_1():
    osr, far = get_task_spec("digits_o"), get_task_spec("digits_o_far")
    assert osr.version == 2 and "ood" not in osr.datasets and osr.ranked
    splits = osr.protocol["class_splits"]
    # OpenOOD's MNIST-6/4: five splits of six ID digits (Vaze et al.'s osr_splits.py 'mnist' lists)
    assert len(splits) == 5 and all(len(s) == 6 and len(set(s)) == 6 for s in splits)
    assert splits[0] == [2, 4, 5, 9, 8, 3]
    assert far.version == 1 and far.datasets["ood"] == "digits_o:test" and not far.ranked
    assert {k: v for k, v in far.protocol.items()} == {"head_task": "digits_linear", "knn_k": 1}
