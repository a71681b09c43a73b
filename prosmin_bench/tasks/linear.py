"""Linear probe on frozen, cached features (DINO eval_linear.py protocol, on centre-crop features).

Features: final-norm CLS of the last ``n`` blocks concatenated (DINO, ViT-S: n = 4 -> 1536-d). Head: one linear
layer, weights N(0, 0.01), zero bias; SGD momentum 0.9, weight decay 0, cosine schedule, lr scaled by
batch / 256 (docs/protocols.md "Linear"). The features go to the head as extracted (DINO's eval_linear.py)
unless the card sets ``standardise`` (z-scored with the train rows' statistics, folded into the head:
``tasks/probes.py``). DINO reports its best epoch on val; here the learning rate is chosen on a held-out part of
the training split (stratified, fixed by the seed), the grid extended log-spaced past an edge choice until the choice
is interior or ``lr_bounds`` is reached (``tasks/selection.py``: ties, plateaus, the bounds), then the head is
retrained on the whole training split for the fixed number of epochs and evaluated once on test. The trained head
is cached and reused by the OOD and corruption tasks (the head itself is ``tasks/probes.py``).

Calibration after temperature scaling (Guo et al. 2017, Sec. 4.2): ``nll_ts`` and ``ece_ts`` (the same bins as
``ece``) of the head trained on the fit part at the chosen lr, softmax(its test logits / T), with T fitted on the
held-out split; the final head (``top1``, ``nll``, ``ece``) was trained on the held-out images too, so no held-out data
is left to fit its own temperature (``tasks/scaling.py``).

Uncertainty vs error (issue 10), for models with a predictive distribution (ProSMin checkpoints of the pretraining
module), with u_i = the mean predictive sigma of test image i over the K dimensions:

- ``sigma_err_spearman``: Spearman rank correlation between u_i and the probe's per-sample error, the negative
  log-likelihood -log p(y_i | x_i) of the true class (positive: sigma grows with the error);
- ``sigma_misclf_auroc``: AUROC of u_i for telling the probe's misclassified test images (positive) from its
  correct ones (Hendrycks & Gimpel, ICLR 2017, misclassification detection); 0.5 = sigma carries no signal.

Both come from ``prosmin_bench.metrics.uncertainty``; a metric that is undefined for a run (a constant sigma for
the correlation, a probe with no errors or no correct predictions for the AUROC) is left out with a warning.
``extras["sigma_vs_error"]`` describes them and holds ``bins``, the probe's top-1 error in each of ``SIGMA_BINS``
equal-count bins of u_i, lowest sigma first (``metrics.uncertainty_error_bins``; the sigma-vs-error plot).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.special import logsumexp

from ..errors import CardError, FeatureError
from ..metrics import (
    MetricArgumentError, misclassification_auroc, spearman_uncertainty_error, temperature_scale, uncertainty_error_bins,
)
from .base import Task, TaskContext, TaskOutput, classification_samples, register_kind
from .probes import (
    LinearParams,
    classification_metrics,
    fit_linear_probe,
    predict_logits,
    reliability_extras,
    softmax,
)
from .scaling import temperature_metrics
from .sigma import mean_sigma
from .selection import check_bounds

log = logging.getLogger(__name__)


#: Uncertainty-vs-error metrics of models with a predictive distribution (see the module docstring).
SIGMA_ERROR_METRICS = ("sigma_err_spearman", "sigma_misclf_auroc")
#: Equal-count sigma bins of ``extras["sigma_vs_error"]["bins"]``: deciles, 36 test images each on the mini digits.
SIGMA_BINS = 10


def sigma_error_metrics(uncertainty: np.ndarray, logits: np.ndarray,
                        labels: np.ndarray) -> tuple[dict[str, float], dict[str, Any]]:
    """``sigma_err_spearman`` and ``sigma_misclf_auroc`` of a per-sample uncertainty [N] against a probe's logits
    [N, C] on labels [N]; returns (metrics, extras), the extras with the error per sigma bin (``bins``). An undefined
    metric is left out (logged), never NaN."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    nll = logsumexp(z, axis=1) - z[np.arange(len(y)), y]  # -log softmax(z)_y, without forming tiny probabilities
    correct = z.argmax(axis=1) == y
    out: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, fn, target in (("sigma_err_spearman", spearman_uncertainty_error, nll),
                             ("sigma_misclf_auroc", misclassification_auroc, correct)):
        try:
            out[name] = float(fn(uncertainty, target))
        except MetricArgumentError as exc:  # undefined for this run: absent rather than a made-up number
            skipped[name] = str(exc)
            log.warning("%s left out: %s", name, exc)
    about: dict[str, Any] = {"uncertainty": "mean predictive sigma", "error": "per-sample NLL of the true class",
                             "n": int(len(y)), "n_misclassified": int((~correct).sum()),
                             "sigma_mean": float(np.mean(uncertainty)) if len(y) else 0.0}
    try:
        about["bins"] = uncertainty_error_bins(uncertainty, correct, SIGMA_BINS)
    except MetricArgumentError as exc:  # e.g. a non-finite sigma: no plot rather than a failed run
        skipped["bins"] = str(exc)
        log.warning("sigma_vs_error bins left out: %s", exc)
    if skipped:
        about["skipped"] = skipped
    return out, about


@register_kind("linear")
class LinearTask(Task):
    """Linear probe: ``top1``, ``top5`` (when C >= 5), ``nll``, ``ece`` on test; ``nll_ts``, ``ece_ts`` after
    temperature scaling and the ``temperature`` (fitted on the held-out split); ``val_top1`` and ``lr`` chosen
    (``extras["selection"]["lr"]``: the lrs evaluated, the choice, whether it is on the grid's edge);
    ``sigma_err_spearman`` and ``sigma_misclf_auroc`` for models with a predictive distribution."""

    roles = ("train", "test")
    Params = LinearParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        if not params.base_lrs or any(lr <= 0 for lr in params.base_lrs):
            raise CardError(f"Card {spec.card!r}: protocol field 'base_lrs' must hold positive numbers")
        check_bounds(spec.card, "base_lrs", params.base_lrs, "lr_bounds", params.lr_bounds)
        if not 0 < params.val_fraction < 1:
            raise CardError(f"Card {spec.card!r}: protocol field 'val_fraction' must be in (0, 1)")
        if params.epochs < 1 or params.batch_size < 1:
            raise CardError(f"Card {spec.card!r}: protocol fields 'epochs' and 'batch_size' must be >= 1")
        if not isinstance(params.standardise, bool):
            raise CardError(f"Card {spec.card!r}: protocol field 'standardise' must be true or false, but got "
                            f"{params.standardise!r}")

    def metric_names(self) -> list[str]:
        return ["top1", "top5", "nll", "ece", "nll_ts", "ece_ts", "temperature", "val_top1", "lr",
                *SIGMA_ERROR_METRICS]

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        test = ctx.features(self.spec.refs["test"], p.layer)
        train_labels = ctx.features(self.spec.refs["train"], p.layer).labels
        c = int(max(np.max(train_labels), np.max(test.labels))) + 1
        head = fit_linear_probe(ctx, self.spec.refs["train"], p, c)
        logits = head.logits(test.features)
        probs = softmax(logits)
        labels = np.asarray(test.labels)
        metrics = classification_metrics(probs, labels, p.n_bins)
        metrics["val_top1"] = head.val_top1
        metrics["lr"] = head.lr
        if head.temperature is not None and head.calibration_head is not None:
            # Guo et al.'s setup: the fit-part head, its T fitted on the held-out split, evaluated on test (the final
            # head has seen the held-out images, so no held-out data is left to fit its own temperature)
            calib_logits = predict_logits(head.calibration_head, test.features)
            metrics.update(temperature_metrics(temperature_scale(calib_logits, head.temperature), labels,
                                               head.temperature, p.n_bins))
        else:
            log.warning("%s: nothing held out to fit a temperature on; nll_ts / ece_ts left out", self.spec.name)
        extras: dict[str, Any] = {"reliability": reliability_extras(probs, labels, p.n_bins),
                                  "selection": {"lr": head.selection}, "val_scores": head.val_scores}
        if ctx.model.has_predictive:
            sigma = ctx.features(self.spec.refs["test"], "predictive_sigma")
            if not np.array_equal(np.asarray(sigma.labels), labels):
                raise FeatureError(f"{self.spec.name}: the predictive features of the test set are not in the order "
                                   "of its backbone features; clear the feature cache and run again")
            found, about = sigma_error_metrics(mean_sigma(sigma.features), logits, labels)
            metrics.update(found)
            extras["sigma_vs_error"] = about
        return TaskOutput(metrics, extras, classification_samples(self.spec.main_score, probs, labels))
