"""Issue 20: the linear probe's heads of several lrs trained in one batched loop (``tasks/probe_heads.py``) equal
heads trained one at a time, both by ``train_linear_head`` and by a reference loop written with torch's own
``nn.Linear``, ``optim.SGD`` and ``CosineAnnealingLR`` (the single-head trainer as it was before the batching);
the lr search then picks the same lr with the same held-out scores as a search that trains each lr alone."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from prosmin_bench.data.base import DatasetRef
from prosmin_bench.metrics import fit_temperature
from prosmin_bench.settings import EvalSettings
from prosmin_bench.tasks import probe_heads, probes
from prosmin_bench.tasks.base import TaskContext
from prosmin_bench.tasks.probe_heads import cosine_lrs, train_linear_head, train_linear_heads
from prosmin_bench.tasks.probes import LinearParams, fit_linear_probe, predict_logits, stratified_holdout
from prosmin_bench.tasks.selection import logits_score, select_on_grid


def _reference_head(x, y, c, *, lr, epochs, batch_size, momentum, weight_decay, seed, standardise=False):
    """One head trained alone with torch's optimiser and scheduler: same seeded init and batch order, z-scoring
    with numpy's float64 statistics of the rows (folded back so the head takes raw features)."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], c)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    mean = x.astype(np.float64).mean(0)
    std = np.where(x.std(0) > 0, x.astype(np.float64).std(0), 1.0)
    z = torch.from_numpy(((x - mean) / std).astype(np.float32) if standardise else x)
    y = torch.as_tensor(y)
    bs = min(batch_size, len(y))
    steps = -(-len(y) // bs)
    opt = torch.optim.SGD(head.parameters(), lr=lr * bs / 256, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps, eta_min=0)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(head(z[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    if standardise:
        with torch.no_grad():
            w = head.weight.double() / torch.from_numpy(std)
            head.bias.copy_(head.bias.double() - w @ torch.from_numpy(mean))
            head.weight.copy_(w)
    return head


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits (64 pixel features, 0..16), 4/5 train and 1/5 test."""
    x, y = load_digits(return_X_y=True)
    test = np.arange(len(y)) % 5 == 0
    return x[~test].astype(np.float32), y[~test], x[test].astype(np.float32), y[test]


def _assert_same_heads(heads, refs, x_test, stats=None):
    """Weights and biases within 1e-5, the same predicted class on every test row. ``stats``: the training rows'
    (mean, std) [D], for heads with z-scoring folded in: they are compared unfolded (W s, b + W m), as trained, since
    folding divides by std and a near-constant pixel's tiny std magnifies float noise."""
    xt = torch.from_numpy(x_test)
    with torch.no_grad():
        for head, ref in zip(heads, refs, strict=True):
            (w, b), (w_ref, b_ref) = ((h.weight.double(), h.bias.double()) for h in (head, ref))
            if stats is not None:
                mean, std = (torch.from_numpy(v.astype(np.float64)) for v in stats)
                (w, b), (w_ref, b_ref) = (w * std, b + w @ mean), (w_ref * std, b_ref + w_ref @ mean)
            assert (w - w_ref).abs().max().item() < 1e-5
            assert (b - b_ref).abs().max().item() < 1e-5
            assert torch.equal(head(xt).argmax(1), ref(xt).argmax(1))


@pytest.mark.parametrize("standardise,scale,lrs,momentum", [
    (True, 1.0, (0.01, 0.03, 0.1, 0.3, 1.0), 0.9),
    (False, 1 / 16, (0.01, 0.1, 1.0), 0.9),  # raw pixels / 16: a head at lr 1 is still well behaved
    (True, 1.0, (0.03, 0.3), 0.0),  # no momentum: SGD uses the gradient itself
])
def test_batched_heads_equal_heads_trained_one_at_a_time(digits, standardise, scale, lrs, momentum):
    x, y, xt, _ = digits
    x, xt = x * np.float32(scale), xt * np.float32(scale)
    kw = dict(epochs=12, batch_size=200, momentum=momentum, weight_decay=1e-3, seed=4)  # 1438 rows: a short batch
    heads = train_linear_heads(x, y, 10, lrs=lrs, standardise=standardise, **kw)
    assert len(heads) == len(lrs) and all(not h.training for h in heads)
    stats = (x.mean(0), x.std(0)) if standardise else None
    _assert_same_heads(heads, [_reference_head(x, y, 10, lr=lr, standardise=standardise, **kw) for lr in lrs], xt,
                       stats)
    _assert_same_heads(heads, [train_linear_head(x, y, 10, lr=lr, standardise=standardise, **kw) for lr in lrs], xt)
    # the heads differ from each other: each took its own lr
    assert min((a.weight - b.weight).abs().max().item() for a, b in zip(heads, heads[1:])) > 1e-3


def test_a_bank_read_batch_by_batch_gives_the_heads_of_a_bank_held_whole(digits, monkeypatch, tmp_path):
    """A bank over WHOLE_BANK_BYTES is read per batch from its memory map (rows in sorted order within a batch)."""
    x, y, xt, _ = digits
    path = tmp_path / "bank.npy"
    np.save(path, x)
    kw = dict(lrs=(0.03, 0.3), epochs=5, batch_size=256, momentum=0.9, weight_decay=0.0, seed=1, standardise=True)
    whole = train_linear_heads(x, y, 10, **kw)
    monkeypatch.setattr(probe_heads, "WHOLE_BANK_BYTES", 0)
    streamed = train_linear_heads(np.load(path, mmap_mode="r"), y, 10, **kw)
    _assert_same_heads(streamed, whole, xt)


def test_cosine_lrs_are_the_schedulers_step_by_step():
    for lr, total in [(0.1, 500), (3.0, 7), (1e-3, 1)]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0)
        expected = []
        for _ in range(total):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert cosine_lrs(lr, total) == expected  # float for float, not merely close


def test_lrs_must_be_positive():
    with pytest.raises(ValueError, match="Expected `lrs` to be one or more positive"):
        train_linear_heads(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]), 2, lrs=[], epochs=1,
                           batch_size=2, momentum=0.9, weight_decay=0.0, seed=0)


def _ctx(x, y, seed=0):
    model = SimpleNamespace(spec=SimpleNamespace(feature_layer="cls"), has_predictive=False)
    sets = {"train": SimpleNamespace(features=x, labels=y, key=f"digits-probe-heads-{seed}")}
    return TaskContext(model=model, seed=seed, settings=EvalSettings(),
                       feature_fn=lambda ref, layer, preprocess=None: sets[ref.split],
                       dataset_fn=lambda ref: SimpleNamespace())


def test_the_lr_search_picks_what_training_each_lr_alone_picks(digits, monkeypatch):
    """Few epochs and a low grid: the top of the grid wins, so the search extends upwards (points trained one by
    one). The chosen lr, every held-out score, the temperature and both heads equal an unbatched search's."""
    x, y, _, _ = digits
    params = LinearParams(layer="cls", epochs=4, batch_size=128, base_lrs=(0.001, 0.003, 0.001, 0.01),
                          momentum=0.9, weight_decay=1e-4, val_fraction=0.2, standardise=True)
    batched_calls, single_calls = [], []
    real_batched, real_single = probes.train_linear_heads, probes.train_linear_head
    monkeypatch.setattr(probes, "train_linear_heads",
                        lambda *a, **k: batched_calls.append(list(k["lrs"])) or real_batched(*a, **k))
    monkeypatch.setattr(probes, "train_linear_head",
                        lambda *a, **k: single_calls.append(k["lr"]) or real_single(*a, **k))
    out = fit_linear_probe(_ctx(x, y, seed=2), DatasetRef.parse("digits:train"), params)

    kw = dict(epochs=4, batch_size=128, momentum=0.9, weight_decay=1e-4, seed=2, standardise=True)
    fit, val = stratified_holdout(y, 0.2, 2)
    refs = {}

    def evaluate(lr):
        refs[lr] = _reference_head(x[fit], y[fit], 10, lr=lr, **kw)
        return logits_score(predict_logits(refs[lr], x[val]).astype(np.float64), y[val])

    sel = select_on_grid(params.base_lrs, evaluate, params.lr_bounds)
    assert batched_calls == [[0.001, 0.003, 0.01]]  # the card's grid once, in its order, without the duplicate
    assert len(sel.grid) > 3 and single_calls == [v for v in sel.scores if v not in (0.001, 0.003, 0.01)] + [out.lr]
    assert out.selection == sel.as_extras() and out.lr == sel.chosen
    expected = sel.score_table()
    assert set(out.val_scores) == set(expected)
    for name, score in expected.items():
        assert out.val_scores[name] == pytest.approx(score, abs=1e-6)
    chosen = refs[sel.chosen]
    _assert_same_heads([out.calibration_head], [chosen], x[val], (x[fit].mean(0), x[fit].std(0)))
    logits = predict_logits(chosen, x[val]).astype(np.float64)
    assert out.temperature == pytest.approx(fit_temperature(logits, y[val]), rel=1e-5)
    _assert_same_heads([out.head], [_reference_head(x, y, 10, lr=sel.chosen, **kw)], x[val], (x.mean(0), x.std(0)))
