"""Out-of-distribution detection with the linear head of a ``linear`` task (``head_task``).

Main score: the maximum softmax probability of the head (Hendrycks & Gimpel, ICLR 2017) separating the ID test set
(``test``, the head task's test set) from the OOD set (``ood``), via ``metrics.ood_metrics`` (AUROC main, AUPR-In,
AUPR-Out, FPR at 95% TPR of ID; OOD positive). For ImageNet-O (Hendrycks et al., "Natural Adversarial Examples",
CVPR 2021) the ID set is the ImageNet val images of ImageNet-O's 200 classes and the logits are restricted to those
200 classes before the softmax (``id_classes``). Extra scores on the same restricted logits: max logit (Hendrycks
et al., ICML 2022), energy (Liu et al., NeurIPS 2020), and the k-th nearest-neighbour distance to the training
features (Sun et al., ICML 2022).

Open-set recognition (protocol field ``class_splits``; ``tasks/open_set.py``, OpenOOD's "osr" benchmarks): no OOD
dataset; for each split, a linear head is trained on the split's ID classes of ``train`` only (the ``head_task``
card's params and lr selection, ``fit_linear_probe(..., classes=...)``), the ID set is the ``test`` images of those
classes and the OOD set the ``test`` images of the held-out classes; the k-NN bank holds the ID classes' ``train``
images only. Every metric is the mean over the splits (each seed evaluates every split); ``extras["open_set"]``
lists the splits and each split's scores.

For models with a predictive distribution (ProSMin checkpoints of the pretraining module: ``Backbone.predictive``
gives a diagonal Gaussian N(mu, diag(sigma^2)) per image), two more scores use it directly (the paper attributes
its OOD results, ProSMin, ICLR 2024, Table 5, to this probabilistic representation), each reported with the same
four metrics:

- ``sigma_*``: the mean predictive sigma over the K dimensions (higher = less confident; confidence = -mean sigma);
- ``dispersion_*``: the expected pairwise distance E d(z_j, z_k), j != k, between r reparameterised samples
  z_j = mu + sigma * eps_j, eps_j ~ N(0, I) (the energy score's dispersion term, ``pretrain/losses.py``), with
  confidence = -dispersion. ``d`` is ``predictive_distance``: "l1" (mean absolute difference over K, the released
  code's ``F.l1_loss`` and the paper's best row, Table 3) or "l2" (Euclidean). The noise is drawn from a generator
  seeded by the task seed. mu cancels in z_j - z_k, so the score is a Monte-Carlo estimate of a function of sigma
  alone (for "l1" its expectation is 2 / sqrt(pi) * mean sigma): it differs from ``sigma_*`` by the sampling noise
  that r samples leave, which is what the loss sees during training.

Models without a predictive head report neither (absent, not NaN).

Extras for the plots (the runner keeps the first seed's): ``msp_hist`` (MSP histograms of the ID and OOD sets) and
``roc``, ``{score: {"fpr": [101], "tpr": [101]}}`` for every score above: the ROC curve of the score's ``*_auroc``
(OOD positive, scored by -confidence; ``metrics.ood_roc_curve``) resampled to 101 points along the curve
(``metrics.compact_roc``; its trapezoid area is the record's AUROC to within about 5e-4). Open-set recognition
stores the vertical average of the splits' curves (``metrics.average_roc_curves``), whose area is the mean of the
splits' AUROCs, as the metrics are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.folder import read_lines
from ..data.subsets import resolve_split_file
from ..errors import CardError, DataError, FeatureError, ProsminBenchError
from ..metrics import (
    ScoreSamples, average_roc_curves, compact_roc, energy_confidence, knn_distance_confidence, max_logit_confidence,
    msp_confidence, ood_metrics, ood_roc_curve,
)
from ..metrics.bootstrap import DEFAULT_N_BOOT, DEFAULT_SEED
from .base import Task, TaskContext, TaskOutput, register_kind
from .open_set import check_class_splits, remap_labels, split_mean_auroc_replicates, split_rows
from .probes import fit_linear_probe, labelled_subset, linear_task_spec, shared_linear_head
from .sigma import mean_sigma, row_chunks

log = logging.getLogger(__name__)

SCORES = ("msp", "maxlogit", "energy", "knn")
#: Scores from the predictive distribution, reported only for models that have one.
PREDICTIVE_SCORES = ("sigma", "dispersion")
#: ``predictive_distance`` values: the distances of ProSMin's energy score (``pretrain/losses.py`` DISTANCES).
DISPERSION_DISTANCES = ("l1", "l2")
#: Rows whose r samples are drawn at once: [rows, r, K] float64 is 1.5 GB at K = 12000 with 4096 rows; 256 keeps
#: the working set near 100 MB.
_DISPERSION_CHUNK = 256
#: Offsets of ``ctx.rng`` for the ID and OOD noise (independent streams, fixed by the seed).
_RNG_ID, _RNG_OOD = 21, 22


@dataclass(frozen=True)
class OODParams:
    head_task: str = ""  # the linear task whose head gives the logits (e.g. "digits_linear")
    id_classes: str = ""  # file of ID class names (e.g. "imagenet_o_wnids.txt"); empty: all classes of `test`
    knn_k: int = 1  # Sun et al. 2022: k = 1000 with the full ImageNet train set, k = 10 with a 1% sample
    knn_layer: str = "cls"  # final-norm CLS, L2-normalised (Sun et al. use the penultimate, normalised features)
    knn_subset_file: str = ""  # train bank for the k-NN score, e.g. SimCLR's 1% file (Sun et al.'s alpha = 1%)
    energy_temperature: float = 1.0  # Liu et al. 2020: T = 1
    hist_bins: int = 20  # histogram of MSP confidences in the extras (plots)
    predictive: bool = True  # also score the predictive distribution (sigma, dispersion) when the model has one
    predictive_samples: int = 4  # r: ProSMin paper and released code draw r = 4 samples per image
    predictive_distance: str = "l1"  # paper Table 3 best row "Energy (L1 loss)"; released code F.l1_loss
    # Open-set recognition (module docstring): the ID classes (label indices of `train`) of each split; the other
    # classes of `test` are the OOD set. Empty: the OOD set is the card's `ood` dataset.
    class_splits: tuple[tuple[int, ...], ...] = ()


def _histogram(values: np.ndarray, bins: int) -> dict[str, Any]:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist() if len(values) else []
    return {"edges": edges.tolist(), "counts": counts.tolist(),
            "quantiles": dict(zip(["5", "25", "50", "75", "95"], q))}


def roc_extras(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, list[float]]]:
    """``extras["roc"]``: each score's (fpr, tpr) curve as ``metrics.compact_roc`` points rounded to 1e-6 (the area
    moves by less than 1e-6; the record stays small)."""
    out = {}
    for name, curve in curves.items():
        fpr, tpr = compact_roc(*curve)
        out[name] = {"fpr": np.round(fpr, 6).tolist(), "tpr": np.round(tpr, 6).tolist()}
    return out


def _quantiles(values: np.ndarray) -> dict[str, float]:
    """5/25/50/75/95% quantiles of a per-sample score (for the extras)."""
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist() if len(values) else []
    return dict(zip(["5", "25", "50", "75", "95"], q))


def class_indices(names_file: str, class_names: list[str], data_root: Any) -> np.ndarray:
    """Label indices of the classes listed in ``names_file`` (one class name per line) within ``class_names``."""
    wanted = read_lines(resolve_split_file(names_file, data_root))
    pos = {c: i for i, c in enumerate(class_names)}
    missing = [w for w in wanted if w not in pos]
    if missing:
        raise DataError(f"{len(missing)} classes of {names_file} (e.g. {missing[:3]}) are not classes of the ID set")
    return np.array([pos[w] for w in wanted], dtype=np.int64)


def predictive_dispersion(mu: Any, sigma: Any, *, r: int, distance: str, rng: np.random.Generator,
                          rows: np.ndarray | None = None, chunk: int = _DISPERSION_CHUNK) -> np.ndarray:
    """Per-sample expected pairwise distance between r samples of N(mu, diag(sigma^2)).

    mu, sigma [N, K] (possibly memory-mapped; only ``rows``, sorted, when given); ``rng`` draws eps [n, r, K] in
    row order, so the result does not depend on ``chunk``. Returns [n] float64: the mean over the r (r - 1) / 2
    pairs j < k (equal to the mean over j != k) of d(z_j, z_k) with z_j = mu + sigma * eps_j; d = mean |.| over
    K ("l1") or ||.||_2 ("l2"), as the energy score's sample-sample term (ProSMin, ICLR 2024, Eq. 2;
    ``pretrain/losses.py``).
    """
    if distance not in DISPERSION_DISTANCES:
        raise ProsminBenchError(f"Expected distance 'l1' or 'l2', but got {distance!r}")
    if r < 2:
        raise ProsminBenchError(f"Expected r >= 2 samples (a pairwise distance needs two), but got {r}")
    if tuple(mu.shape) != tuple(sigma.shape):
        raise FeatureError(
            f"Expected mu and sigma of the same shape, but got {tuple(mu.shape)} and {tuple(sigma.shape)}"
        )
    k = int(mu.shape[1])
    a, b = torch.triu_indices(r, r, offset=1)
    p = 1.0 if distance == "l1" else 2.0
    parts = []
    for sel in row_chunks(int(mu.shape[0]), rows, chunk):
        m = torch.from_numpy(np.asarray(mu[sel], dtype=np.float64))
        sd = torch.from_numpy(np.asarray(sigma[sel], dtype=np.float64))
        eps = torch.from_numpy(rng.standard_normal((len(m), r, k)))
        z = m[:, None, :] + sd[:, None, :] * eps  # [c, r, K]
        d = torch.cdist(z, z, p=p, compute_mode="donot_use_mm_for_euclid_dist")[:, a, b]  # [c, r (r - 1) / 2]
        if distance == "l1":
            d = d / k  # mean absolute difference, as F.l1_loss
        parts.append(d.mean(dim=1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


@register_kind("ood")
class OODTask(Task):
    """OOD detection: ``auroc`` (MSP, main), ``aupr_in``, ``aupr_out``, ``fpr95``; the same four for
    ``maxlogit_*``, ``energy_*``, ``knn_*`` and, for models with a predictive distribution, ``sigma_*`` and
    ``dispersion_*``; ``id_top1`` of the (restricted) head on the ID set."""

    roles = ("train", "test")
    optional_roles = ("ood",)  # required unless `class_splits` takes the OOD images from `test`
    Params = OODParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        if not params.head_task:
            raise CardError(f"Card {spec.card!r}: protocol field 'head_task' must name a linear task")
        if params.knn_k < 1 or params.hist_bins < 1 or not params.energy_temperature > 0:
            raise CardError(f"Card {spec.card!r}: 'knn_k' and 'hist_bins' must be >= 1, 'energy_temperature' > 0")
        if not isinstance(params.predictive, bool):
            raise CardError(f"Card {spec.card!r}: protocol field 'predictive' must be true or false")
        r = params.predictive_samples
        if not isinstance(r, int) or isinstance(r, bool) or r < 2:
            raise CardError(f"Card {spec.card!r}: protocol field 'predictive_samples' must be an integer >= 2 "
                            f"(a pairwise distance needs two samples), but got {r!r}")
        if params.predictive_distance not in DISPERSION_DISTANCES:
            raise CardError(f"Card {spec.card!r}: protocol field 'predictive_distance' must be 'l1' or 'l2', but "
                            f"got {params.predictive_distance!r}")
        if not params.class_splits:
            if "ood" not in spec.datasets:
                raise CardError(f"Card {spec.card!r}: an ood task needs datasets.ood (the OOD images) or protocol "
                                "field 'class_splits' (held-out classes of the test set as OOD)")
            return
        check_class_splits(spec.card, params.class_splits)
        clash = [f for f, v in (("datasets.ood", "ood" in spec.datasets), ("protocol.id_classes", params.id_classes))
                 if v]
        if clash:
            raise CardError(f"Card {spec.card!r}: protocol field 'class_splits' takes the ID classes from its splits "
                            f"and the OOD images from the test set's other classes; remove {' and '.join(clash)}")

    def metric_names(self) -> list[str]:
        four = ("auroc", "aupr_in", "aupr_out", "fpr95")
        names = list(four) + [f"{s}_{m}" for s in SCORES[1:] for m in four] + ["id_top1"]
        return names + [f"{s}_{m}" for s in PREDICTIVE_SCORES for m in four]

    def run(self, ctx: TaskContext) -> TaskOutput:
        if self.params.class_splits:
            return self._run_open_set(ctx)
        p = self.params
        ds = self.spec.refs
        shared = shared_linear_head(ctx, p.head_task, card=self.spec.card, train_ref=ds["train"], test_ref=ds["test"])
        id_feats = ctx.features(ds["test"], shared.layer)
        ood_feats = ctx.features(ds["ood"], shared.layer)
        id_labels = np.asarray(id_feats.labels)
        keep = np.arange(len(id_labels))
        classes = np.arange(shared.num_classes)
        if p.id_classes:
            wanted = class_indices(p.id_classes, ctx.dataset(ds["test"]).class_names, ctx.data_root)
            classes = wanted[wanted < shared.num_classes]  # on a full ImageNet all 200 are head outputs
            if len(classes) < len(wanted):  # a partial layout: the head has no output for the highest labels
                log.warning("%s: the head has outputs for %d of the %d classes of %s", self.spec.name, len(classes),
                            len(wanted), p.id_classes)
            keep = np.flatnonzero(np.isin(id_labels, classes))
            if len(keep) == 0:
                raise DataError(f"{self.spec.name}: no image of the ID set belongs to the classes of {p.id_classes}")
        id_logits = shared.head.logits(id_feats.features[keep])[:, classes]
        ood_logits = shared.head.logits(ood_feats.features)[:, classes]
        c_id, c_ood = self._logit_confidences(id_logits), self._logit_confidences(ood_logits)
        conf = {name: (c_id[name], c_ood[name]) for name in c_id}
        bank = ctx.features(ds["train"], p.knn_layer)
        if p.knn_subset_file:  # read only the subset's rows of the (memory-mapped) bank
            sub = labelled_subset(ctx, ds["train"], np.asarray(bank.labels), p.knn_subset_file, 0.0, self.spec.card)
            bank_x = np.asarray(bank.features[sub.indices])
        else:
            bank_x = np.asarray(bank.features)
        id_knn = np.asarray(ctx.features(ds["test"], p.knn_layer).features)[keep]
        ood_knn = np.asarray(ctx.features(ds["ood"], p.knn_layer).features)
        k = min(p.knn_k, len(bank_x))
        conf["knn"] = (knn_distance_confidence(bank_x, id_knn, k=k), knn_distance_confidence(bank_x, ood_knn, k=k))
        predictive = p.predictive and ctx.model.has_predictive
        if predictive:
            parts = self._predictive_confidences(ctx, [(ds["test"], keep, _RNG_ID), (ds["ood"], None, _RNG_OOD)])
            conf.update({name: (c[0], c[1]) for name, c in parts.items()})
        metrics = ood_scores(conf)
        # Accuracy of the restricted head on the ID images (labels mapped into the restricted class order).
        metrics["id_top1"] = float((id_logits.argmax(1) == remap_labels(id_labels[keep], classes)).mean())
        extras = {
            "n_id": int(len(keep)), "n_ood": int(len(ood_logits)),
            "msp_hist": {"id": _histogram(conf["msp"][0], p.hist_bins), "ood": _histogram(conf["msp"][1], p.hist_bins)},
            "head": {"task": shared.task.name, "lr": shared.head.lr, "val_top1": shared.head.val_top1,
                     "classes": int(len(classes))},
            "knn_k": k,
            "roc": roc_extras({name: ood_roc_curve(*c) for name, c in conf.items()}),
        }
        if predictive:
            extras["predictive"] = self._predictive_extras(ctx, {"id": -conf["sigma"][0], "ood": -conf["sigma"][1]})
        # The record's ci95 and paired tests: the confidences of the main score's AUROC (msp for ``auroc``).
        score = self._main_confidence()
        main = score is not None and score in conf
        return TaskOutput(metrics, extras, ScoreSamples.auroc(self.spec.main_score, *conf[score]) if main else None)

    def _main_confidence(self) -> str | None:
        """The confidence whose AUROC is the card's main score ("msp" for ``auroc``), or None for another metric."""
        if not self.spec.main_score.endswith("auroc"):
            return None
        return self.spec.main_score.removesuffix("auroc").rstrip("_") or "msp"

    def _logit_confidences(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Per-image MSP, max-logit and energy confidences [N] of head logits [N, C]."""
        t = self.params.energy_temperature
        return {"msp": msp_confidence(logits), "maxlogit": max_logit_confidence(logits),
                "energy": energy_confidence(logits, t)}

    def _predictive_extras(self, ctx: TaskContext, sigma: dict[str, np.ndarray]) -> dict[str, Any]:
        """The predictive scores' settings and the quantiles of the mean sigma of each named set of images."""
        p = self.params
        return {"r": p.predictive_samples, "distance": p.predictive_distance, "noise_seed": ctx.seed,
                "sigma_quantiles": {name: _quantiles(s) for name, s in sigma.items()}}

    def _run_open_set(self, ctx: TaskContext) -> TaskOutput:
        """Open-set recognition over ``class_splits`` (module docstring): every metric is the mean over the splits;
        the main score's samples are bootstrap replicates of that mean over the test images."""
        p = self.params
        ds = self.spec.refs
        _, lin = linear_task_spec(p.head_task, self.spec.card)  # the head task's params: layer, epochs, lr grid
        test = ctx.features(ds["test"], lin.layer)
        labels = np.asarray(test.labels)
        bank = ctx.features(ds["train"], p.knn_layer)
        bank_labels = np.asarray(bank.labels)
        bank_rows = (labelled_subset(ctx, ds["train"], bank_labels, p.knn_subset_file, 0.0, self.spec.card).indices
                     if p.knn_subset_file else np.arange(len(bank_labels)))
        test_knn = np.asarray(ctx.features(ds["test"], p.knn_layer).features)
        predictive = p.predictive and ctx.model.has_predictive  # split-free: every test image's once
        pred = self._predictive_confidences(ctx, [(ds["test"], None, _RNG_ID)]) if predictive else {}
        splits: list[dict[str, Any]] = []
        per_split: list[dict[str, float]] = []
        full_confs: list[dict[str, np.ndarray]] = []
        masks: list[np.ndarray] = []
        pooled: dict[str, list[np.ndarray]] = {"id": [], "ood": []}
        curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # score -> each split's ROC curve
        for j, split in enumerate(p.class_splits):
            classes = [int(c) for c in split]
            id_rows, ood_rows = split_rows(labels, classes, f"{self.spec.name} split {j}")
            head = fit_linear_probe(ctx, ds["train"], lin, classes=classes)
            logits = head.logits(test.features)  # [N_test, len(classes)]
            in_bank = np.sort(bank_rows[np.isin(bank_labels[bank_rows], classes)])  # ID classes' train images
            k = min(p.knn_k, len(in_bank))
            full = self._logit_confidences(logits)
            full["knn"] = knn_distance_confidence(np.asarray(bank.features[in_bank]), test_knn, k=k)
            full.update({name: c[0] for name, c in pred.items()})
            conf = {name: (c[id_rows], c[ood_rows]) for name, c in full.items()}
            scores = ood_scores(conf)
            for name, c in conf.items():
                curves.setdefault(name, []).append(ood_roc_curve(*c))
            scores["id_top1"] = float((logits[id_rows].argmax(1) == remap_labels(labels[id_rows], classes)).mean())
            per_split.append(scores)
            full_confs.append(full)
            mask = np.zeros(len(labels), dtype=bool)
            mask[ood_rows] = True
            masks.append(mask)
            pooled["id"].append(conf["msp"][0])
            pooled["ood"].append(conf["msp"][1])
            splits.append({"id_classes": classes, "ood_classes": sorted(int(c) for c in np.unique(labels[ood_rows])),
                           "n_id": int(len(id_rows)), "n_ood": int(len(ood_rows)), "auroc": scores["auroc"],
                           "id_top1": scores["id_top1"], "lr": head.lr, "val_top1": head.val_top1,
                           "selection": head.selection, "bank": int(len(in_bank)), "knn_k": k})
        metrics = {name: float(np.mean([s[name] for s in per_split])) for name in per_split[0]}
        msp_id, msp_ood = np.concatenate(pooled["id"]), np.concatenate(pooled["ood"])
        extras: dict[str, Any] = {
            "n_id": [s["n_id"] for s in splits], "n_ood": [s["n_ood"] for s in splits],
            "msp_hist": {"id": _histogram(msp_id, p.hist_bins), "ood": _histogram(msp_ood, p.hist_bins)},
            "head": {"task": p.head_task, "lr": [s["lr"] for s in splits], "classes": len(p.class_splits[0])},
            "knn_k": min(s["knn_k"] for s in splits),
            "roc": roc_extras({name: average_roc_curves(cs) for name, cs in curves.items()}),
            "open_set": {"rule": "every seed evaluates every split; each metric is the mean over the splits",
                         "splits": splits},
        }
        if predictive:
            extras["predictive"] = self._predictive_extras(ctx, {"test": -pred["sigma"][0]})
        score = self._main_confidence()
        samples = None
        if score is not None and score in full_confs[0]:
            reps = split_mean_auroc_replicates([f[score] for f in full_confs], masks, n_boot=DEFAULT_N_BOOT,
                                               seed=DEFAULT_SEED)
            samples = ScoreSamples.replicates(self.spec.main_score, reps)
        return TaskOutput(metrics, extras, samples)

    def _predictive_confidences(self, ctx: TaskContext, parts: list[tuple[Any, np.ndarray | None, int]]
                                ) -> dict[str, list[np.ndarray]]:
        """Confidences -mean sigma and -dispersion from the cached predictive layers, one array per part
        ``(dataset ref, rows or None for all, rng offset of the dispersion noise)``."""
        p = self.params
        out: dict[str, list[np.ndarray]] = {"sigma": [], "dispersion": []}
        for ref, rows, offset in parts:
            sigma = ctx.features(ref, "predictive_sigma")
            mu = ctx.features(ref, "predictive_mu")
            out["sigma"].append(-mean_sigma(sigma.features, rows))
            out["dispersion"].append(-predictive_dispersion(mu.features, sigma.features, r=p.predictive_samples,
                                                            distance=p.predictive_distance, rng=ctx.rng(offset),
                                                            rows=rows))
        return out


def ood_scores(conf: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``metrics.ood_metrics`` of every (ID, OOD) confidence pair, keyed ``auroc``... for "msp" and
    ``<name>_auroc``... for the others."""
    metrics: dict[str, float] = {}
    for name, (c_id, c_ood) in conf.items():
        prefix = "" if name == "msp" else f"{name}_"
        metrics.update({f"{prefix}{m}": v for m, v in ood_metrics(c_id, c_ood).items()})
    return metrics
