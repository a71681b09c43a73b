"""Low-shot classification: logistic regression on frozen features of a small labelled subset.

Protocol (PROTOCOLS.md "Low-shot"; DINO / iBOT ``eval_logistic_regression.py``, which use cyanure): the final-norm
CLS features, L2-normalised; multinomial logistic regression with an L2 penalty and no intercept. Cyanure minimises
(1/N) sum_i loss_i + (lambda/2) ||W||^2; scikit-learn minimises C sum_i loss_i + (1/2) ||W||^2, so C = 1/(lambda N).
lambda comes from a grid (iBOT's {0.01, 0.1, 1} and DINO's 0.1/N) and is chosen on a stratified held-out part of the
labelled subset (never the test set); the model is then refit on the whole subset. Subsets: SimCLR's split files
for ImageNet, a stratified draw per seed elsewhere (``data/subsets.py``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.subsets import check_covers
from ..errors import CardError, DataError
from .base import Task, TaskContext, TaskOutput, register_kind
from .probes import check_subset_params, classification_metrics, labelled_subset, reliability_extras, stratified_holdout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowShotParams:
    layer: str = "cls"  # final-norm CLS token, L2-normalised (DINO/iBOT eval_logistic_regression.py)
    subset_file: str = ""  # SimCLR split file (shipped name or path); empty: stratified draw of `fraction`
    fraction: float = 0.0  # labelled fraction for the stratified draw (seeded)
    lambdas: tuple[float, ...] = (0.01, 0.1, 1.0)  # iBOT eval_logistic_regression.py --lr_lambd
    lambdas_over_n: tuple[float, ...] = (0.1,)  # DINO: lambda = 0.1 / N (PROTOCOLS.md)
    val_fraction: float = 0.2  # held-out part of the labelled subset for choosing lambda
    max_iter: int = 1000  # lbfgs iterations (converges well before on L2-normalised features)
    n_bins: int = 15  # ECE bins (Guo et al. 2017)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, D] scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, max_iter: int):
    """Multinomial L2 logistic regression without intercept, cyanure's lambda -> sklearn C = 1 / (lambda N)."""
    # Imported here: scikit-learn's linear models take about a second to import, which only a low-shot run pays.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0 / (lam * len(y)), l1_ratio=0.0, fit_intercept=False, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("logistic regression (lambda %.3g, N %d) stopped at max_iter=%d before converging", lam, len(y),
                    max_iter)
    return clf


def predict_proba_full(clf: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities [N, num_classes]: the classifier's columns placed at their class indices."""
    out = np.zeros((len(x), num_classes))
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = clf.predict_proba(x)
    return out


@register_kind("lowshot")
class LowShotTask(Task):
    """Low-shot logistic regression: ``top1``, ``top5`` (C >= 5), ``nll``, ``ece``; the chosen ``lambda``,
    ``val_top1`` and ``n_labelled``."""

    roles = ("train", "test")
    Params = LowShotParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        check_subset_params(spec, params.subset_file, params.fraction)
        if not (params.lambdas or params.lambdas_over_n) or any(v <= 0 for v in params.lambdas + params.lambdas_over_n):
            raise CardError(f"Card {spec.card!r}: protocol fields 'lambdas' / 'lambdas_over_n' must be positive")
        if not 0 < params.val_fraction < 1:
            raise CardError(f"Card {spec.card!r}: protocol field 'val_fraction' must be in (0, 1)")

    def metric_names(self) -> list[str]:
        return ["top1", "top5", "nll", "ece", "val_top1", "lambda", "n_labelled"]

    def _grid(self, n: int) -> list[tuple[str, float]]:
        p = self.params
        return [(f"{v:g}", v) for v in p.lambdas] + [(f"{v:g}/N", v / n) for v in p.lambdas_over_n]

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        train = ctx.features(self.spec.refs["train"], p.layer)
        test = ctx.features(self.spec.refs["test"], p.layer)
        y_all, y_test = np.asarray(train.labels), np.asarray(test.labels)
        num_classes = int(max(y_all.max(), y_test.max())) + 1
        subset = labelled_subset(ctx, self.spec.refs["train"], y_all, p.subset_file, p.fraction, self.spec.card)
        x = l2_normalise(np.asarray(train.features[subset.indices]))
        y = y_all[subset.indices]
        names = getattr(ctx.dataset(self.spec.refs["test"]), "class_names", None)
        check_covers(y, y_test, names, f"{self.spec.name} (seed {ctx.seed})")
        # Choose lambda on a held-out part of the labelled subset (classes with one example stay in the fit part).
        fit_idx, val_idx = stratified_holdout(y, p.val_fraction, ctx.seed)
        if len(val_idx) == 0:
            raise DataError(
                f"{self.spec.name}: the labelled subset ({len(y)} images) has no class with two examples, so nothing "
                "can be held out to choose lambda; use a larger subset"
            )
        scores = []
        for label, lam_fit in self._grid(len(fit_idx)):
            clf = fit_logistic(x[fit_idx], y[fit_idx], lam_fit, p.max_iter)
            probs = predict_proba_full(clf, x[val_idx], num_classes)
            top1 = float((probs.argmax(1) == y[val_idx]).mean())
            nll = float(-np.log(np.clip(probs[np.arange(len(val_idx)), y[val_idx]], 1e-12, None)).mean())
            scores.append((top1, -nll, label))
            log.debug("%s lambda %s: held-out top1 %.4f nll %.4f", self.spec.name, label, top1, nll)
        best = max(scores, key=lambda s: (s[0], s[1]))
        lam = dict(self._grid(len(y)))[best[2]]  # same grid point, N = the whole subset for lambda/N entries
        clf = fit_logistic(x, y, lam, p.max_iter)
        probs = predict_proba_full(clf, l2_normalise(np.asarray(test.features)), num_classes)
        metrics = classification_metrics(probs, y_test, p.n_bins)
        metrics.update({"val_top1": best[0], "lambda": float(lam), "n_labelled": float(len(y))})
        extras = {
            "subset": subset.info, "lambda_choice": best[2],
            "val_scores": {s[2]: {"top1": s[0], "nll": -s[1]} for s in scores},
            "reliability": reliability_extras(probs, y_test, p.n_bins),
        }
        return TaskOutput(metrics, extras)
