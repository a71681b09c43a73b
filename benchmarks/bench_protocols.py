"""Benchmark: every ImageNet protocol's stage after feature extraction, run through the suite's own functions on
synthetic features of the real shapes (ViT-S/16: 384-d CLS, 1536-d last-4 CLS; 1000 classes; sizes and protocol
fields from the task cards): wall time and peak memory per stage.

k-NN (``knn_predict``: 1.28M x 384 memmap bank, 50k queries, k = 20 and 200, the suite's ``max_memory``; faiss's
search too when faiss is installed); linear (``imagenet_linear``: the lr grid on the fit part, held-out selection
and temperature, the refit, test metrics); low-shot 1% / 10% (each lambda of the grid on the fold and the refit, with
scikit-learn's and the torch solver); ImageNet-O (MSP, max-logit, energy, k-NN, sigma and dispersion scores, AUROC /
AUPR / FPR95); ImageNet-C (the head on 75 splits + clean, features made per split, then mCE); collapse (RankMe
metrics, bootstrap); fine-tuning (ViT-S/16 forward + backward + AdamW step with Mixup and drop path on random 224-px
batches, extrapolated to the iBOT semi-supervised and CIFAR-10 transfer schedules).

Each stage runs in a fresh process forked from this one (torch and the suite imported, nothing run): inputs are
made, a warm-up runs, the peak-RSS counter is reset (``/proc/self/clear_refs``) and the growth of ``VmHWM`` is
reported (on CUDA also ``torch.cuda.max_memory_allocated`` above the start). ``--scale imagenet`` measures a fraction
where the whole would take minutes on a small CPU machine (bank rows, query blocks, training steps, rows, splits,
replicates) and scales each measured part by its share: the row says "extrapolated from N%" (measured seconds over
the estimate), its peak is the measured part's, and the note names the part that set it. ``--scale tiny``: the same
stages at tiny shapes (2k x 32 features, 10 classes, ``vit_micro``) in seconds.

Run: ``python benchmarks/bench_protocols.py --scale {tiny,imagenet} [--device cpu|cuda] [--threads N]
[--stages knn,linear,...] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from prosmin_bench import threads

threads.prepare_environment()  # the suite's OpenMP wait policy, before torch loads
import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402  (a scikit-learn dependency)
from timm.loss import SoftTargetCrossEntropy  # noqa: E402

from prosmin_bench import metrics  # noqa: E402
from prosmin_bench.data import folder, subsets  # noqa: E402
from prosmin_bench.models import get_model, spec  # noqa: E402
from prosmin_bench.settings import EvalSettings  # noqa: E402
from prosmin_bench.tasks import (  # noqa: E402
    base, collapse, corruption, finetune, knn, logreg, lowshot, ood, probe_heads, probes, scaling, selection, sigma,
)

STAGES = ("knn", "linear", "lowshot", "ood", "corruption", "collapse", "finetune")
MIB = 2**20
CIFAR10_TRAIN = 50_000  # images in CIFAR-10's train split (transfer_cifar10's train set)
VAL_PER_CLASS = 50  # ImageNet val images per class: imagenet_o's ID set is the val images of its 200 classes
ALL = 10**9  # "every row" for the tiny scale's measured fractions


@dataclasses.dataclass(frozen=True)
class Scale:
    """Shapes of one scale, and how much of each stage is measured (the rest is extrapolated)."""

    n_train: int  # k-NN bank and linear-probe train rows (ImageNet-1k train)
    n_test: int  # ImageNet val
    dim: int  # final-norm CLS width
    dim4: int  # last-4 CLS concatenated
    classes: int
    knn_bank_rows: int  # bank rows the torch search reads, with the full run's plan (time ~ bank rows)
    knn_blocks: int  # query blocks of the faiss plan searched against one of its bank chunks
    linear_rows: int  # rows of the measured probe epochs (> 87,381 x 1536 keeps the full run's per-batch reads)
    linear_epochs: int
    eval_rows: int  # rows the evaluations (held-out, test, predictive scores) are measured on
    lowshot_rows: int  # labelled rows of the measured low-shot fits
    ood_n: int  # OOD images (ImageNet-O: 2,000)
    predictive_k: int  # ProSMin's predictive width K
    c_splits: int  # corrupted splits evaluated of the 75
    collapse_boot: int  # bootstrap replicates computed of the task's 200
    vit: str  # the fine-tuned architecture and its crop
    crop: int
    ft_steps: int  # fine-tuning steps timed


SCALES = {
    "tiny": Scale(n_train=2000, n_test=500, dim=32, dim4=128, classes=10, knn_bank_rows=ALL, knn_blocks=ALL,
                  linear_rows=ALL, linear_epochs=100, eval_rows=ALL, lowshot_rows=ALL, ood_n=100, predictive_k=64,
                  c_splits=75, collapse_boot=200, vit="vit_micro", crop=32, ft_steps=3),
    "imagenet": Scale(n_train=1_281_167, n_test=50_000, dim=384, dim4=1536, classes=1000, knn_bank_rows=32_768,
                      knn_blocks=24, linear_rows=90_112, linear_epochs=1, eval_rows=8192, lowshot_rows=12_811,
                      ood_n=2000, predictive_k=12_000, c_splits=5, collapse_boot=20, vit="vit_small_patch16",
                      crop=224, ft_steps=3),
}


def features(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-clustered float32 features [n, d] (centre N(0, 1) + noise N(0, 4), as ``bench_knn.py``; the same
    centres for every set) and labels [n]."""
    centres = np.random.default_rng(0).standard_normal((classes, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        e = min(s + 65536, n)
        x[s:e] = centres[y[s:e]] + 2.0 * rng.standard_normal((e - s, d), dtype=np.float32)
    return x, y


def memmap(x: np.ndarray, path: Path) -> np.ndarray:
    """``x`` written to ``path`` and opened read-only as a ``.npy`` memmap, as the feature cache returns features."""
    np.save(path, x)
    return np.load(path, mmap_mode="r")


def card(name: str):
    """The parsed protocol params of task card ``name``."""
    return base.build_task(base.get_task_spec(name)).params


def lines(split_file: str) -> int:
    """Entries of a split file a card names (shipped in ``prosmin_bench/_refdata``)."""
    return len(folder.read_lines(subsets.resolve_split_file(split_file)))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class Meter:
    """Timed parts, each with the factor that scales it to the full run, and the peak memory growth since the meter
    was made (VmHWM over VmRSS; on CUDA also max_memory_allocated over memory_allocated)."""

    def __init__(self, device: str) -> None:
        self.device, self.parts = device, []
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset this process's peak RSS (VmHWM) to its current RSS
        self.base = _status_kib("VmRSS")
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.gpu_base = torch.cuda.memory_allocated()

    @contextlib.contextmanager
    def part(self, name: str, factor: float = 1.0):
        t = time.perf_counter()
        yield
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.parts.append((name, time.perf_counter() - t, float(factor), _status_kib("VmHWM")))

    def row(self, stage: str, shape: str, note: str, inputs: float = 0.0) -> dict:
        measured, total = sum(p[1] for p in self.parts), sum(p[1] * p[2] for p in self.parts)
        hwm = [self.base] + [p[3] for p in self.parts]
        if len(self.parts) > 1:
            note += f"; RSS peak set in: {self.parts[int(np.argmax(np.diff(hwm)))][0]}"
        return {"stage": stage, "shape": shape, "device": self.device, "wall_s": total, "measured_s": measured,
                "peak_rss_mib": (hwm[-1] - self.base) / 1024, "inputs_mib": inputs / MIB, "note": note,
                "peak_gpu_mib": (torch.cuda.max_memory_allocated() - self.gpu_base) / MIB if self.device == "cuda"
                else None, "basis": "measured" if all(abs(p[2] - 1) < 1e-9 for p in self.parts)
                else f"extrapolated from {100 * measured / total:.2g}%"}


def steps(n: int, batch: int, epochs: int) -> int:
    return epochs * math.ceil(n / min(batch, n))


def stage_knn(sc: Scale, dev: str, wd: Path) -> list[dict]:
    budget, c, nq = EvalSettings.max_memory, sc.classes, sc.n_test
    queries, _ = features(nq, sc.dim, c, 2)
    full = np.broadcast_to(np.zeros(1, np.float32), (sc.n_train, sc.dim))  # the full bank's shape, no memory
    rows = []
    for backend in ["torch"] + (["faiss"] if importlib.util.find_spec("faiss") else []):
        for k in (20, 200):
            vote = 4 * nq * c + min(nq, knn._VOTE_ROWS) * (8 * c + 28 * k)  # knn_predict's set-aside for the vote
            plan = knn.knn_plan(full, queries, k, max_memory=budget - vote, backend=backend, device=dev)
            if backend == "torch":  # the bank's first rows, searched with the full run's plan (forced)
                nb, q = min(sc.knn_bank_rows, sc.n_train), nq
            else:  # one of the full run's bank chunks (+ a sliver, so the merge runs) and a few query blocks
                nb, q = min(plan.bank_chunk + 2048, sc.n_train), min(nq, plan.query_chunk * sc.knn_blocks)
            x, labels = features(nb, sc.dim, c, 1)
            bank = memmap(x, wd / "bank.npy")  # read with file reads: no resident pages
            del x

            def search(b, y, qs):
                if backend == "torch":
                    return knn.knn_predict(b, y, qs, k=k, num_classes=c, max_memory=budget, device=dev,
                                           path=plan.path)
                from prosmin_bench.tasks.knn_faiss import faiss_topk  # imports faiss

                sims, idx = faiss_topk(b, qs, plan, device=dev)
                return knn.knn_vote(sims, idx, y, sims.shape[1], 0.07, c)

            search(bank[:4096], labels[:4096], queries[:64])  # warm-up
            m = Meter(dev if backend == "torch" or plan.path == "faiss_gpu" else "cpu")
            with m.part("search", sc.n_train / nb * nq / q):
                search(bank, labels, queries[:q])
            note = (f"the full run's {plan.path} plan: {plan.query_chunk} queries x {plan.bank_chunk} bank rows per "
                    f"block; measured {q} queries x {nb} bank rows, scaled by both; budget {budget / MIB:.0f} MiB")
            rows.append(m.row(f"k-NN k={k} ({backend})", f"{sc.n_train}x{sc.dim} bank, {nq} queries", note,
                              nq * sc.dim * 4))
    return rows


def stage_linear(sc: Scale, dev: str, wd: Path) -> list[dict]:
    p = card("imagenet_linear")
    n, d, c, bs, lrs = sc.n_train, sc.dim4, sc.classes, p.batch_size, list(p.base_lrs)
    n_val = round(n * p.val_fraction)
    n_fit, r = n - n_val, min(sc.linear_rows, n)
    x, y = features(r, d, c, 3)  # in RAM: fit_linear_probe trains the grid on a float32 copy of the fit part
    xm = memmap(x, wd / "linear.npy")  # the refit reads the cached train features (a memmap) batch by batch
    rf, rv = min(r, n_fit), min(r, n_val, sc.eval_rows)
    xt, yt = features(min(sc.n_test, sc.eval_rows), d, c, 4)
    kw = dict(batch_size=bs, momentum=p.momentum, weight_decay=p.weight_decay, seed=0, device=dev,
              standardise=p.standardise)
    probe_heads.train_linear_heads(x[:2048], y[:2048], c, lrs=lrs, epochs=1, **kw)  # warm-up
    m = Meter(dev)
    with m.part("lr grid", steps(n_fit, bs, p.epochs) / steps(rf, bs, sc.linear_epochs)):
        heads = probe_heads.train_linear_heads(x[:rf], y[:rf], c, lrs=lrs, epochs=sc.linear_epochs, **kw)
    with m.part("held-out scores and temperature", n_val / rv):  # fit_linear_probe keeps the best logits only
        best = (None, 0, None)
        for i, h in enumerate(heads):
            logits = probes.predict_logits(h, x[:rv]).astype(np.float64)
            key = selection.logits_score(logits, y[:rv]).key
            best = (key, i, logits) if best[0] is None or key > best[0] else best
            del logits
        _, best, logits = best
        t = metrics.fit_temperature(logits, y[:rv])
        del logits
    with m.part("refit on all rows", steps(n, bs, p.epochs) / steps(r, bs, sc.linear_epochs)):
        head = probe_heads.train_linear_head(xm, y, c, lr=lrs[best], epochs=sc.linear_epochs, **kw)
    with m.part("test metrics", sc.n_test / len(yt)):  # the final head, then the fit-part head at T
        probes.classification_metrics(probes.softmax(probes.predict_logits(head, xt)), yt, p.n_bins)
        scaled = metrics.temperature_scale(probes.predict_logits(heads[best], xt), t)
        scaling.temperature_metrics(scaled, yt, t, p.n_bins)
    note = (f"{len(lrs)} lrs x {p.epochs} epochs, batch {bs}, on {n_fit} fit rows, then 1 lr on all {n}; measured "
            f"{sc.linear_epochs} epoch(s) of {rf} rows (scaled by steps), evaluations on {rv} rows (scaled by "
            f"rows); lr-grid extension past an edge not counted; inputs: fit_linear_probe's float32 fit/val copies")
    return [m.row("linear", f"{n}x{d}, {c} classes", note, n * d * 4)]


def stage_lowshot(sc: Scale, dev: str, wd: Path) -> list[dict]:
    c, rows = sc.classes, []
    xt, yt = features(sc.n_test, sc.dim, c, 5)
    xt = lowshot.l2_normalise(xt)
    for pct, frac in (("1pct", 0.01), ("10pct", 0.1)):
        p = card(f"imagenet_lowshot_{pct}")
        n = lines(p.subset_file) if c == 1000 else round(frac * sc.n_train)
        k, r = max(2, round(1 / p.val_fraction)), min(sc.lowshot_rows, n)
        x, y = features(r, sc.dim, c, 6 + len(rows))
        x = lowshot.l2_normalise(x)
        fold = lowshot.stratified_folds(y, k, 0)[0][0]  # the fit part of the task's first fold
        n_fit, folds = round(len(fold) * n / r), min(p.max_folds or k, k)
        grid = list(p.lambdas) + [v / n_fit for v in p.lambdas_over_n]  # the task's grid, in its order
        for solver in ("sklearn", "torch"):
            on, warm = (dev if solver == "torch" else "cpu"), {}

            def fit(idx, lam, init=None):
                more = () if solver == "sklearn" else ("torch", on, init)
                clf = lowshot.fit_logistic(x[idx], y[idx], lam, p.max_iter, *more)
                return clf, int(np.max(clf.n_iter_))

            fit(fold[:200], grid[0])  # warm-up
            m, iters = Meter(on), []
            for lam in grid:  # each lambda on the fold (a torch fit starts from the nearest lambda's, as the task)
                with m.part(f"lambda {lam:.3g}", folds * n_fit / len(fold)):
                    clf, it = fit(fold, lam, logreg.nearest_init(warm, lam))
                warm[lam] = clf.fit_.weights if solver == "torch" else None
                iters.append(it)
            slowest = grid[max(range(len(grid)), key=lambda i: m.parts[i][1])]
            with m.part("refit", n / r):  # the refit on the whole subset at the slowest lambda (an upper bound)
                clf, it = fit(slice(None), slowest, warm[slowest])
            with m.part("test metrics"):
                probes.classification_metrics(lowshot.predict_proba_full(clf, xt, c), yt, p.n_bins)
                lowshot.scaled_proba_full(clf, xt, 1.5, c)
            note = (f"{len(grid)} lambdas x {folds} fold(s) of {n_fit} rows + refit on {n}; measured on {len(fold)} "
                    f"/ {r} rows, scaled by rows; iterations {iters} + {it} (max_iter {p.max_iter})")
            rows.append(m.row(f"low-shot {pct} ({solver})", f"{n}x{sc.dim}, {c} classes", note,
                              (n + sc.n_test) * sc.dim * 8))
    return rows


def stage_ood(sc: Scale, dev: str, wd: Path) -> list[dict]:
    p, c = card("imagenet_o"), sc.classes
    n_cls = lines(p.id_classes) if c == 1000 else c // 2
    n_id = n_cls * (VAL_PER_CLASS if c == 1000 else sc.n_test // c)
    classes = np.sort(np.random.default_rng(7).choice(c, n_cls, replace=False))
    bank_n = lines(p.knn_subset_file) if c == 1000 else sc.n_train // 100  # Sun et al.'s 1% bank
    head = torch.nn.Linear(sc.dim4, c)
    (id_x, _), (ood_x, _) = features(n_id, sc.dim4, c, 8), features(sc.ood_n, sc.dim4, c, 9)
    id_k, ood_k, bank = (features(nr, sc.dim, c, s)[0] for nr, s in ((n_id, 10), (sc.ood_n, 11), (bank_n, 12)))
    m = Meter("cpu")
    with m.part("scores"):  # OODTask.run: logits restricted to the ID classes, their confidences, k-NN, metrics
        zi, zo = probes.predict_logits(head, id_x)[:, classes], probes.predict_logits(head, ood_x)[:, classes]
        conf = {name: (f(zi), f(zo)) for name, f in (("msp", metrics.msp_confidence), ("energy",
                metrics.energy_confidence), ("maxlogit", metrics.max_logit_confidence))}
        conf["knn"] = tuple(metrics.knn_distance_confidence(bank, q, k=min(p.knn_k, bank_n)) for q in (id_k, ood_k))
        ood.ood_scores(conf)
    rows = [m.row("OOD (ImageNet-O)", f"{n_id} ID + {sc.ood_n} OOD, {bank_n}-row bank",
                  f"head {sc.dim4}->{c} restricted to {n_cls} classes; MSP, max-logit, energy, k-NN (k = {p.knn_k}); "
                  "AUROC, AUPR, FPR95 of each", (n_id + sc.ood_n) * (sc.dim4 + sc.dim) * 4)]
    n_all, kk = n_id + sc.ood_n, sc.predictive_k
    nr = min(sc.eval_rows, n_all)
    mu = np.random.default_rng(13).standard_normal((nr, kk), dtype=np.float32)
    sd = np.abs(np.random.default_rng(14).standard_normal((nr, kk), dtype=np.float32)) + 0.1
    m = Meter("cpu")
    with m.part("mean sigma and dispersion", n_all / nr):
        s = -sigma.mean_sigma(sd)
        dsp = -ood.predictive_dispersion(mu, sd, r=p.predictive_samples, distance=p.predictive_distance,
                                         rng=np.random.default_rng(0))
    with m.part("metrics"):
        cut = max(1, nr * n_id // n_all)
        ood.ood_scores({"sigma": (s[:cut], s[cut:]), "dispersion": (dsp[:cut], dsp[cut:])})
    rows.append(m.row("OOD predictive (sigma, dispersion)", f"{n_all}x{kk} mu and sigma",
                      f"r = {p.predictive_samples}, {p.predictive_distance}; {nr} rows measured, scaled by rows",
                      2 * n_all * kk * 4))
    return rows


def stage_corruption(sc: Scale, dev: str, wd: Path) -> list[dict]:
    p, head = card("imagenet_c"), torch.nn.Linear(sc.dim4, sc.classes)
    n_splits = len(metrics.CORRUPTIONS) * len(corruption.SEVERITIES)
    measured = min(sc.c_splits, n_splits)
    m, errors, wrong_sum = Meter("cpu"), [], 0.0
    for i in range(measured + 1):  # the clean set, then `measured` corrupted splits; features made untimed
        x, y = features(sc.n_test, sc.dim4, sc.classes, 20 + i)
        with m.part("splits", (n_splits + 1) / (measured + 1)):  # CorruptionTask.run's evaluate() of one split
            probs = probes.softmax(probes.predict_logits(head, x))
            wrong = probs.argmax(1) != y
            metrics.negative_log_likelihood(probs, y), metrics.expected_calibration_error(probs, y, n_bins=p.n_bins)
        errors.append(float(wrong.mean()))
        wrong_sum = wrong_sum + wrong.astype(np.float64)
        del x, probs
    with m.part("mCE"):  # mCE, relative mCE and each image's share of the mCE, every split at the measured error
        err = {name: [float(np.mean(errors[1:]))] * len(corruption.SEVERITIES) for name in metrics.CORRUPTIONS}
        ref = corruption.alexnet_errors()
        metrics.corruption_errors(err, baseline=ref), metrics.mean_corruption_error(err, baseline=ref)
        metrics.relative_mean_corruption_error(err, errors[0], baseline=ref,
                                               baseline_clean_error=metrics.ALEXNET_CLEAN_ERROR)
        corruption.mce_samples({name: wrong_sum for name in metrics.CORRUPTIONS}, ref)
    note = f"{n_splits} splits + clean, {measured} corrupted measured, scaled by splits; feature generation not timed"
    return [m.row("corruption (ImageNet-C)", f"{n_splits + 1} x {sc.n_test}x{sc.dim4}", note, sc.n_test * sc.dim4 * 4)]


def stage_collapse(sc: Scale, dev: str, wd: Path) -> list[dict]:
    p, replicates = card("imagenet_collapse"), collapse.BOOTSTRAP_REPLICATES
    x = np.asarray(features(sc.n_test, sc.dim, sc.classes, 30)[0], dtype=np.float64)  # as the task's _rows
    boot = min(sc.collapse_boot, replicates)
    m = Meter("cpu")
    with m.part("metrics and spectrum"):
        collapse.embedding_collapse_metrics(x, p.variance_fraction), collapse.normalised_spectrum(x, p.spectrum_size)
    with m.part("bootstrap", replicates / boot):
        collapse.effective_rank_replicates(x, n_boot=boot)
    return [m.row("collapse", f"{sc.n_test}x{sc.dim}", f"RankMe metrics + {replicates} bootstrap replicates ({boot} "
                  "measured)", x.nbytes)]


def stage_finetune(sc: Scale, dev: str, wd: Path) -> list[dict]:
    p, c = card("imagenet_semisup_1pct"), sc.classes
    net = get_model(spec.ModelSpec(name=f"{sc.vit}_random", arch=sc.vit, weights=spec.WeightsSource(random=True)))
    model = finetune.Classifier(net, c, p.layer, 0).to(dev)  # finetune()'s model, optimiser, Mixup and loss
    finetune.set_drop_path(model.backbone.net, p.drop_path)
    mixup, loss_fn = finetune.build_mixup(p, c), SoftTargetCrossEntropy()
    opt = torch.optim.AdamW(finetune._param_groups(model, p.weight_decay), lr=1e-5)
    b = 64 if dev == "cuda" or sc.crop < 224 else 8
    images, y = torch.randn(b, 3, sc.crop, sc.crop, device=dev), torch.randint(0, c, (b,), device=dev)

    def step() -> None:
        xm, target = mixup(images, y)
        loss = loss_fn(model(xm).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    step()  # warm-up
    m = Meter(dev)
    with m.part("training steps"):
        for _ in range(sc.ft_steps):
            step()
    model.eval()
    with torch.no_grad():
        model(images)
        with m.part("forward"):
            model(images)
    (_, step_s, _, _), (_, fwd_s, _, _) = m.parts
    train_ips, eval_ips = b * sc.ft_steps / step_s, b / fwd_s
    rows = [m.row("fine-tuning step", f"{sc.vit} {sc.crop}px, batch {b}", f"{train_ips / b:.3g} steps/s, "
                  f"{train_ips:.3g} images/s (forward only {eval_ips:.3g}); AdamW, Mixup/CutMix, drop path")]
    for name, frac in (("imagenet_semisup_1pct", 0.01), ("imagenet_semisup_10pct", 0.1), ("transfer_cifar10", 1)):
        q = card(name)
        sub = getattr(q, "subset_file", "")
        n = (lines(sub) if sub else CIFAR10_TRAIN) if c == 1000 else round(frac * sc.n_train)
        n_fit = n - round(n * q.val_fraction)
        total = n_fit * q.epochs / train_ips + (q.epochs // q.eval_every + 1) * (n - n_fit) / eval_ips
        rows.append({**rows[0], "stage": f"fine-tuning: {name}", "wall_s": total,
                     "basis": f"extrapolated from {100 * (step_s + fwd_s) / total:.2g}%",
                     "shape": f"{n_fit} images x {q.epochs} epochs, batch {q.batch_size}",
                     "note": f"at {train_ips:.3g} images/s (batch {b}) + held-out eval every {q.eval_every} epochs; "
                             "data loading and augmentation not timed"})
    return rows


STAGE_FUNCTIONS = {"knn": stage_knn, "linear": stage_linear, "lowshot": stage_lowshot, "ood": stage_ood,
                   "corruption": stage_corruption, "collapse": stage_collapse, "finetune": stage_finetune}


def _stage_process(conn, stage: str, args: argparse.Namespace, workdir: Path) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        with threadpool_limits(limits=args.threads):  # numpy's and scikit-learn's BLAS too
            conn.send(STAGE_FUNCTIONS[stage](SCALES[args.scale], args.device, workdir))
    except BaseException:
        conn.send(traceback.format_exc())
    conn.close()


def run_stages(stages: list[str], args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Each stage in a fresh process (its own peak RSS), forked from this one, which imported torch and the suite
    but ran nothing (no OpenMP thread pool or CUDA context is forked)."""
    ctx, rows = multiprocessing.get_context("fork"), []
    for stage in stages:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_stage_process, args=(send, stage, args, workdir))
        proc.start()
        send.close()
        try:
            out = recv.recv()
        except EOFError:
            out = "the stage's process ended without a result\n"
        proc.join()
        if isinstance(out, str):
            sys.stderr.write(out)
            raise SystemExit(f"stage {stage!r} failed (exit code {proc.exitcode})")
        rows += out
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'stage':<36}{'shape':<44}{'device':<7}{'wall s':>11}{'peak RSS MiB':>13}{'peak GPU MiB':>13}"
          f"{'inputs MiB':>11}  basis")
    for r in rows:
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        print(f"{r['stage']:<36}{r['shape']:<44}{r['device']:<7}{r['wall_s']:>11.4g}{r['peak_rss_mib']:>13.0f}"
              f"{gpu:>13}{r['inputs_mib']:>11.0f}  {r['basis']}")
    print("\nnotes (inputs: what the protocol's inputs take in RAM at the full shape, computed, not in the peak):")
    for r in rows:
        print(f"  {r['stage']}: {r['note']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny", help="shapes (default tiny)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the device-aware stages run")
    ap.add_argument("--threads", type=int, default=threads.usable_cores(), help="threads (default: usable cores)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if set(stages) - set(STAGES) or args.threads < 1:
        raise SystemExit(f"--stages must name some of {','.join(STAGES)} and --threads be >= 1")
    load = os.getloadavg()
    print(f"scale {args.scale}, device {args.device}, {args.threads} thread(s), usable cores "
          f"{threads.usable_cores()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    start, workdir = time.perf_counter(), Path(tempfile.mkdtemp(prefix="bench-protocols-"))
    try:
        rows = run_stages(stages, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    load = os.getloadavg()
    print(f"total {time.perf_counter() - start:.1f} s; load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"scale": args.scale, "device": args.device, "threads": args.threads,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
