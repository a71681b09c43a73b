"""Low-shot classification: logistic regression on frozen features of a small labelled subset.

Protocol (docs/protocols.md "Low-shot"; DINO / iBOT ``eval_logistic_regression.py``, which use cyanure): the final-norm
CLS features, L2-normalised; multinomial logistic regression with an L2 penalty and no intercept. Cyanure minimises
(1/N) sum_i loss_i + (lambda/2) ||W||^2; scikit-learn minimises C sum_i loss_i + (1/2) ||W||^2, so C = 1/(lambda N).
lambda comes from a grid (iBOT's {0.01, 0.1, 1} and DINO's 0.1/N) and is chosen by stratified K-fold cross-validation
on the labelled subset (never the test set; K = round(1 / val_fraction), so each fold holds out about val_fraction of
it and every image of a class with two or more examples is held out once: :func:`stratified_folds`); the model is
then refit on the whole subset. Subsets: SimCLR's split files
for ImageNet, a stratified draw per seed elsewhere (``data/subsets.py``).

Selection (``tasks/selection.py``: ties, plateaus) scores each lambda by the top-1 and NLL of the out-of-fold
predictions pooled over the folds: with 144 labelled digits a single 20% held-out part (29 images) let one image
decide, and one seed in 24 still ran into the lower bound; pooling holds out all 144. The grid's entries are compared
as numbers at the folds' mean fit-part N_fit (a ``0.1/N`` entry is 0.1 / N_fit there); when the choice is the
smallest or largest, the grid is extended log-spaced on that side until the choice is interior or ``lambda_bounds``
is reached. A point added past a lambda/N entry is a lambda/N entry too (c / r / N), so the refit on the whole subset
uses lambda = value x N_fit / N; other values are refit as they are. ``extras["selection"]["lambda"]`` lists the
values at N_fit (those compared), while the recorded ``lambda`` is the refit's; ``val_scores`` labels each point as
the card does (``"0.01"``, ``"0.1/N"``).

Standardisation (protocol field ``standardise``, off by default: DINO and iBOT only L2-normalise): each feature
dimension is centred and scaled by the labelled subset's own mean and standard deviation (the test features with the
same statistics, never their own), then the rows are L2-normalised. The centring is SimpleShot's "CL2N" (Wang et al.,
arXiv:1911.04623, Sec. 3: subtract the mean feature, then L2-normalise), which matters when the features share a
large common component: the micro models' CLS features do, so on the plain L2-normalised features the held-out
choice ran into lambda -> 0 (the class differences are a small part of each unit vector) and the mini cards set it.

Solver (protocol field ``solver``): "sklearn" fits scikit-learn's ``LogisticRegression`` (lbfgs), "torch" the
same objective by full-batch L-BFGS on the run's device (``tasks/logreg.py``: float64, stopped when the objective is
provably within 1e-6 of its optimum, relative; each fold's fit warm-started from its fit at the nearest lambda
evaluated, the refit from the first fold's at the chosen lambda). The ImageNet cards use "torch": scikit-learn on a
CPU takes hours per ImageNet-10% fit. Its records say the solver, iterations and convergence in
``extras["solver"]``; a record made before the field existed counts as "sklearn" (``LowShotParams.ADDED_FIELDS``).

Temperature scaling (Guo et al. 2017; ``metrics.fit_temperature``): T is fitted on the pooled out-of-fold logits (the
decision functions) of the folds' classifiers at the chosen lambda, then applied to the decision function of the
classifier refit on the whole subset (``nll_ts``, ``ece_ts``). Besides the test set, which must stay unseen, the
out-of-fold predictions are the only ones on labelled data a classifier was not trained on; the refit classifier was
trained on those images too (and on more data), so T is fitted for slightly different models than the one it
scales.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .. import progress
from ..data.subsets import check_covers
from ..errors import CardError, DataError
from .base import Task, TaskContext, TaskOutput, classification_samples, register_kind
from .logreg import TorchLogisticRegression, nearest_init
from ..metrics import fit_temperature, temperature_scale
from .probes import (
    check_subset_params,
    classification_metrics,
    labelled_subset,
    reliability_extras,
)
from .scaling import temperature_metrics
from .selection import Score, Selection, check_bounds, select_on_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowShotParams:
    layer: str = "cls"  # final-norm CLS token, L2-normalised (DINO/iBOT eval_logistic_regression.py)
    subset_file: str = ""  # SimCLR split file (shipped name or path); empty: stratified draw of `fraction`
    fraction: float = 0.0  # labelled fraction for the stratified draw (seeded)
    lambdas: tuple[float, ...] = (0.01, 0.1, 1.0)  # iBOT eval_logistic_regression.py --lr_lambd
    lambdas_over_n: tuple[float, ...] = (0.1,)  # DINO: lambda = 0.1 / N (docs/protocols.md)
    val_fraction: float = 0.2  # held-out share per fold: K = round(1 / val_fraction) folds choose lambda
    # Folds used of those K (0: all). ImageNet's subsets hold out 2.6k / 25.6k images in one fold, plenty to choose
    # on, and each fit there takes minutes: their cards use 1 (a single held-out part, as DINO / iBOT choose).
    max_folds: int = 0
    max_iter: int = 1000  # lbfgs iterations (converges well before on L2-normalised features)
    n_bins: int = 15  # ECE bins (Guo et al. 2017)
    # Hard bounds of the lambda grid's extension (module docstring): below DINO's ImageNet-10% value 0.1/N = 7.8e-7;
    # above 1e3 the weights have norm <= sqrt(2)/lambda = 1.4e-3 on unit-norm features, so every prediction is
    # within 0.3% of uniform and a larger lambda changes nothing measurable.
    lambda_bounds: tuple[float, float] = (1e-7, 1e3)
    standardise: bool = False  # z-score with the labelled subset's statistics before L2 (module docstring)
    solver: str = "sklearn"  # or "torch": the same objective by L-BFGS on the run's device (module docstring)

    #: Fields added after records existed, with the value those records were made with: a record without one is
    #: compared as if it said this value (``reuse._existing_ok``), so the committed records stay reusable.
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"solver": "sklearn"}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, D] scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation [D] of x [N, D] (a constant dimension gets std 1, so it maps to 0)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    return x.mean(axis=0), np.where(sd > 1e-12, sd, 1.0)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds (fit, val) of a labelled subset: every image of a class with two or more examples is
    held out in exactly one fold (a seeded shuffle per class, dealt round robin, continuing across classes so the
    folds have equal sizes); a class with one example is always in the fit part, and no fold holds out all of a
    class (k >= 2). Folds without held-out images are left out. Sorted index arrays."""
    rng = np.random.default_rng(seed)
    owner = np.full(len(labels), -1)
    turn = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        rng.shuffle(idx)
        owner[idx] = (turn + np.arange(len(idx))) % k
        turn += len(idx)
    everything = np.arange(len(labels))
    return [(everything[owner != f], everything[owner == f]) for f in range(k) if np.any(owner == f)]


def fit_logistic(x: np.ndarray, y: np.ndarray, lam: float, max_iter: int, solver: str = "sklearn",
                 device: Any = "cpu", init: np.ndarray | None = None):
    """Multinomial L2 logistic regression without intercept, cyanure's lambda -> sklearn C = 1 / (lambda N); with
    ``solver="torch"`` the same fit by ``logreg.TorchLogisticRegression`` on ``device``, from weights ``init``."""
    if solver == "torch":
        return TorchLogisticRegression(lam, device=device, max_iter=max_iter).fit(x, y, init=init)
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


def decision_logits(clf: Any, x: np.ndarray) -> np.ndarray:
    """Logits [N, len(clf.classes_)] whose softmax is ``clf.predict_proba(x)``: the decision function, and for two
    classes (scikit-learn's 1-D decision d) the logits [0, d]."""
    d = np.asarray(clf.decision_function(x), dtype=np.float64)
    return np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d


def scaled_proba_full(clf: Any, x: np.ndarray, temperature: float, num_classes: int) -> np.ndarray:
    """softmax(decision logits / T) [N, num_classes], the classifier's columns placed at their class indices."""
    out = np.zeros((len(x), num_classes))
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = temperature_scale(decision_logits(clf, x), temperature)
    return out


def solver_extras(fits: list[Any], device: Any) -> dict[str, Any]:
    """``extras["solver"]`` of a torch-solver run from its LogRegFits (the refit last): the device, the number of
    fits, their total and largest L-BFGS iterations, how many stopped unconverged, and the refit's iterations,
    convergence and bound on its distance to the optimum (``LogRegFit.gap``)."""
    refit = fits[-1]
    return {"name": "torch", "device": str(device), "fits": len(fits), "n_iter_total": sum(f.n_iter for f in fits),
            "n_iter_max": max(f.n_iter for f in fits), "not_converged": sum(not f.converged for f in fits),
            "refit": {"n_iter": refit.n_iter, "converged": refit.converged, "gap": refit.gap,
                      "objective": refit.objective}}


@register_kind("lowshot")
class LowShotTask(Task):
    """Low-shot logistic regression: ``top1``, ``top5`` (C >= 5), ``nll``, ``ece``; ``nll_ts``, ``ece_ts`` and the
    ``temperature`` (fitted on the held-out part); the chosen ``lambda``, ``val_top1`` and ``n_labelled``."""

    roles = ("train", "test")
    Params = LowShotParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        check_subset_params(spec, params.subset_file, params.fraction)
        if not (params.lambdas or params.lambdas_over_n) or any(v <= 0 for v in params.lambdas + params.lambdas_over_n):
            raise CardError(f"Card {spec.card!r}: protocol fields 'lambdas' / 'lambdas_over_n' must be positive")
        check_bounds(spec.card, "lambdas", params.lambdas, "lambda_bounds", params.lambda_bounds)
        if not 0 < params.val_fraction < 1:
            raise CardError(f"Card {spec.card!r}: protocol field 'val_fraction' must be in (0, 1)")
        if not isinstance(params.max_folds, int) or isinstance(params.max_folds, bool) or params.max_folds < 0:
            raise CardError(f"Card {spec.card!r}: protocol field 'max_folds' must be an integer >= 0 (0: every fold), "
                            f"but got {params.max_folds!r}")
        if not isinstance(params.standardise, bool):
            raise CardError(f"Card {spec.card!r}: protocol field 'standardise' must be true or false, but got "
                            f"{params.standardise!r}")
        if params.solver not in ("sklearn", "torch"):
            raise CardError(f"Card {spec.card!r}: protocol field 'solver' must be \"sklearn\" or \"torch\", but got "
                            f"{params.solver!r}")

    def metric_names(self) -> list[str]:
        return ["top1", "top5", "nll", "ece", "nll_ts", "ece_ts", "temperature", "val_top1", "lambda", "n_labelled"]

    def _grid(self, n: int) -> list[tuple[float, bool]]:
        """The card's grid at N = n: (lambda, whether it is a lambda/N entry), in card order."""
        p = self.params
        grid = [(float(v), False) for v in p.lambdas] + [(v / n, True) for v in p.lambdas_over_n]
        low, high = p.lambda_bounds
        outside = [f"{v * n:g}/N" for v, per_n in grid if per_n and not low <= v <= high]
        if outside:
            raise CardError(f"Card {self.spec.card!r}: lambda grid values {outside} at N = {n} lie outside "
                            f"lambda_bounds {list(p.lambda_bounds)}; widen 'lambda_bounds'")
        return grid

    def _fit(self, x: np.ndarray, y: np.ndarray, lam: float, device: Any, warm: dict[float, np.ndarray],
             fits: list[Any], bar: Any) -> Any:
        """``fit_logistic`` with the card's solver; a torch fit starts from the weights in ``warm`` (lambda ->
        weights of earlier fits on the same images) of the nearest lambda, adds its own and its LogRegFit to
        ``fits``; one step of the progress ``bar``."""
        p = self.params
        clf = fit_logistic(x, y, lam, p.max_iter, p.solver, device, nearest_init(warm, lam))
        if p.solver == "torch":
            warm[lam] = clf.fit_.weights
            fits.append(clf.fit_)
        bar.update(1)
        return clf

    def _choose(self, x: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]],
                num_classes: int, device: Any, warm: list[dict[float, np.ndarray]], fits: list[Any],
                bar: Any) -> tuple[Selection, float, dict[float, str], float]:
        """Lambda chosen by cross-validation on the labelled subset (``tasks/selection.py`` on the pooled
        out-of-fold predictions of ``folds``), with the lambda to refit the whole subset with, each evaluated value's
        label (``"0.01"``, ``"0.1/N"``) and the temperature fitted on the pooled out-of-fold logits (module
        docstring). ``warm``: one dict per fold for :meth:`_fit`; ``bar``: counts the fits (its total covers the
        card's grid and the refit; each extension point adds one fit per fold)."""
        p = self.params
        n_fit = float(np.mean([len(f) for f, _ in folds]))  # the N of a lambda/N entry while choosing
        card = self._grid(n_fit)
        per_n = {}
        for v, is_per_n in card:
            per_n.setdefault(v, is_per_n)
        best: dict[str, Any] = {"key": None}
        y_val = np.concatenate([y[v] for _, v in folds])

        grid = {v for v, _ in card}

        def evaluate(lam: float) -> Score:
            probs, logits = [], []
            if lam not in grid:  # an extension point past an edge of the grid
                bar.total += len(folds)
            for (fit_idx, val_idx), fold_warm in zip(folds, warm):
                clf = self._fit(x[fit_idx], y[fit_idx], lam, device, fold_warm, fits, bar)
                probs.append(predict_proba_full(clf, x[val_idx], num_classes))
                # every class of the subset keeps a fit example in every fold (stratified_folds), so the columns of
                # the decision function are the same classes in every fold
                logits.append(decision_logits(clf, x[val_idx]))
            pr = np.concatenate(probs)
            score = Score(float((pr.argmax(1) == y_val).mean()),
                          float(-np.log(np.clip(pr[np.arange(len(y_val)), y_val], 1e-12, None)).mean()))
            log.debug("%s lambda %g: out-of-fold top1 %.4f nll %.4f", self.spec.name, lam, score.top1, score.nll)
            if best["key"] is None or score.key > best["key"]:  # the rule of select_on_grid: the first best wins
                best.update(key=score.key, logits=np.concatenate(logits), classes=clf.classes_)
            return score

        sel = select_on_grid([v for v, _ in card], evaluate, p.lambda_bounds)
        lo, hi = min(per_n), max(per_n)
        # An extension point is of the kind of the card value it extends (one past a lambda/N entry is one too).
        kind = {v: per_n[v] if v in per_n else per_n[lo if v < lo else hi] for v in sel.scores}
        labels = {v: f"{v * n_fit:g}/N" if kind[v] else f"{v:g}" for v in sel.scores}
        lam = sel.chosen * n_fit / len(y) if kind[sel.chosen] else sel.chosen
        positions = np.searchsorted(best["classes"], y_val)
        temperature = fit_temperature(best["logits"], positions)
        return sel, float(lam), labels, temperature

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        train = ctx.features(self.spec.refs["train"], p.layer)
        test = ctx.features(self.spec.refs["test"], p.layer)
        y_all, y_test = np.asarray(train.labels), np.asarray(test.labels)
        num_classes = int(max(y_all.max(), y_test.max())) + 1
        subset = labelled_subset(ctx, self.spec.refs["train"], y_all, p.subset_file, p.fraction, self.spec.card)
        x = np.asarray(train.features[subset.indices], dtype=np.float64)
        mean, std = standardiser(x) if p.standardise else (0.0, 1.0)
        x = l2_normalise((x - mean) / std)
        y = y_all[subset.indices]
        names = getattr(ctx.dataset(self.spec.refs["test"]), "class_names", None)
        check_covers(y, y_test, names, f"{self.spec.name} (seed {ctx.seed})")
        # Choose lambda on a held-out part of the labelled subset (classes with one example stay in the fit part).
        folds = stratified_folds(y, max(2, round(1 / p.val_fraction)), ctx.seed)[: p.max_folds or None]
        if not folds:
            raise DataError(
                f"{self.spec.name}: the labelled subset ({len(y)} images) has no class with two examples, so nothing "
                "can be held out to choose lambda; use a larger subset"
            )
        warm: list[dict[float, np.ndarray]] = [{} for _ in folds]
        fits: list[Any] = []  # the torch solver's LogRegFits, the refit's last
        n_grid = len({v for v, _ in self._grid(float(np.mean([len(f) for f, _ in folds])))})
        with progress.bar(desc=f"logistic regression, {len(y)} labelled images (seed {ctx.seed})",
                          total=n_grid * len(folds) + 1, unit="fit") as bar:
            sel, lam, labels, temperature = self._choose(x, y, folds, num_classes, ctx.device, warm, fits, bar)
            # every class of the subset has fit examples in every fold (stratified_folds): the first fold's weights
            # at the chosen lambda have the refit's shape
            clf = self._fit(x, y, lam, ctx.device, {lam: warm[0][sel.chosen]} if p.solver == "torch" else {}, fits,
                            bar)
        x_test = l2_normalise((np.asarray(test.features, dtype=np.float64) - mean) / std)
        probs = predict_proba_full(clf, x_test, num_classes)
        metrics = classification_metrics(probs, y_test, p.n_bins)
        probs_ts = scaled_proba_full(clf, x_test, temperature, num_classes)
        metrics.update(temperature_metrics(probs_ts, y_test, temperature, p.n_bins))
        metrics.update({"val_top1": sel.scores[sel.chosen].top1, "lambda": lam, "n_labelled": float(len(y))})
        extras = {
            "subset": subset.info, "lambda_choice": labels[sel.chosen],
            "val_scores": sel.score_table(labels.__getitem__),
            "selection": {"lambda": sel.as_extras()},
            "reliability": reliability_extras(probs, y_test, p.n_bins),
        }
        if p.solver == "torch":
            extras["solver"] = solver_extras(fits, ctx.device)
        return TaskOutput(metrics, extras, classification_samples(self.spec.main_score, probs, y_test))
