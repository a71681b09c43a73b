"""Multinomial L2 logistic regression without intercept, solved with torch: scikit-learn's objective on any device.

The low-shot protocol (``tasks/lowshot.py``) fits scikit-learn's ``LogisticRegression(C=1 / (lambda N),
fit_intercept=False)`` for every lambda of its grid; at ImageNet scale (128,116 x 384 features, 1,000 classes) that
takes hours on a CPU. This module minimises the same objective with full-batch L-BFGS (``torch.optim.LBFGS``, strong
Wolfe line search) on the run's device, in float64 by default.

Objective. scikit-learn 1.9's lbfgs path sets ``l2_reg_strength = 1 / (C * sw_sum)`` (sklearn/linear_model/
_logistic.py:580, ``sw_sum`` = N without sample weights) and ``LinearModelLoss.loss`` returns
``sum_i loss_i / sw_sum + l2_reg_strength / 2 * ||W||_F^2`` (sklearn/linear_model/_linear_loss.py:283-287 and
``l2_penalty`` at 226-229), with the full multinomial cross-entropy as loss_i (``HalfMultinomialLoss``). With
C = 1 / (lambda N) that is

    f(W) = (1/N) sum_i CE(W x_i, y_i) + (lambda / 2) ||W||_F^2,    W [C, D],

which is cyanure's form (DINO / iBOT) and what :func:`fit_multinomial_l2` minimises. Stopping differs:
scikit-learn stops when the largest absolute gradient entry is at most ``tol`` = 1e-4 (L-BFGS-B's ``gtol``,
``_logistic.py:593``), this solver when f is provably within ``tol`` = 1e-6 (relative) of its optimum, so its small
lambda fits are closer to the optimum than scikit-learn's (:func:`fit_multinomial_l2`).

Two classes. scikit-learn then fits one binary vector d (``is_binary``, ``_logistic.py:416``) with the penalty
(lambda / 2) ||d||^2. The multinomial optimum at 2 lambda has w_1 = -w_0 = d / 2 (for a fixed difference the
penalty is smallest there) and penalty lambda ||d||^2 / 2, so it is that binary optimum with d = w_1 - w_0:
:class:`TorchLogisticRegression` fits it so and gives scikit-learn's 1-D decision function d . x.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import progress
from ..errors import ProsminBenchError

log = logging.getLogger(__name__)

#: L-BFGS memory (pairs kept). scipy's L-BFGS-B, which scikit-learn calls, keeps 10 (``maxcor``); more pairs cost
#: 2 x history_size vector operations per iteration against two [N, D] x [D, C] products, and save iterations on
#: the ill-conditioned small-lambda problems.
HISTORY_SIZE = 20
#: Function evaluations allowed per fit: scipy's L-BFGS-B default ``maxfun`` (scikit-learn leaves it as is).
MAX_EVAL = 15000


class LogRegArgumentError(ProsminBenchError, ValueError):
    """A logistic-regression fit called with an argument it cannot use."""


@dataclass(frozen=True)
class LogRegFit:
    """One fit: ``weights`` [C, D] (numpy, the dtype fitted in), the ``objective`` f(W) at them, L-BFGS
    ``n_iter`` (iterations, as scikit-learn's ``n_iter_``), ``converged`` (a stopping rule of
    :func:`fit_multinomial_l2` met before ``max_iter``), ``gap`` (the bound ||grad f||^2 / (2 lam) on f - f* at
    the end) and the ``lam`` fitted."""

    weights: np.ndarray
    objective: float
    n_iter: int
    converged: bool
    gap: float
    lam: float


def _as_features(x: Any) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read
        raise LogRegArgumentError(f"Expected `x` to be an array of features [N, D], but got {type(x).__name__} "
                                  f"({exc})") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise LogRegArgumentError(f"Expected `x` to be a non-empty 2-D array [N, D], but got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise LogRegArgumentError(f"Expected `x` to hold real numbers, but got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise LogRegArgumentError("Expected `x` to be finite, but it holds NaN or inf; check the features")
    return arr


def _as_labels(y: Any, n: int, num_classes: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise LogRegArgumentError(f"Expected `y` to be a 1-D array of {n} labels (one per row of `x`), but got "
                                  f"shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise LogRegArgumentError(f"Expected `y` to hold integer class indices, but got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= num_classes:
        raise LogRegArgumentError(f"Expected `y` to lie in [0, {num_classes}) (`num_classes` = {num_classes}), but "
                                  f"got labels from {arr.min()} to {arr.max()}")
    return arr.astype(np.int64)


def _check_number(name: str, value: Any, *, integer: bool = False, low: float = 0.0) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool) or not np.isfinite(value) or value <= low:
        what = "an integer" if integer else "a finite number"
        raise LogRegArgumentError(f"Expected `{name}` to be {what} > {low:g}, but got {value!r}")


def _loss_grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """f(W) and its gradient [C, D] for W [C, D], x [N, D], y [N] (module docstring):
    grad = (softmax(x W^T) - onehot(y))^T x / N + lambda W. The logits are kept as [C, N] (W x^T), which one
    CPU thread multiplies about 1.7x faster than x W^T here, and softmax'd in place with one exp pass."""
    n = x.shape[0]
    rows = torch.arange(n, device=x.device)
    z = w @ x.T  # [C, N]
    true = z[y, rows]
    top = z.amax(dim=0)
    e = z.sub_(top).exp_()
    total = e.sum(dim=0)
    loss = (top + torch.log(total) - true).mean() + 0.5 * lam * (w * w).sum()
    p = e.div_(total)  # softmax [C, N]
    p[y, rows] -= 1.0
    grad = (p @ x).div_(n).add_(w, alpha=lam)
    return loss, grad


def objective(weights: Any, x: Any, y: Any, lam: float) -> float:
    """f(W) of the module docstring for numpy ``weights`` [C, D], ``x`` [N, D], ``y`` [N], in float64."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    loss, _ = _loss_grad(w, torch.as_tensor(np.asarray(x, dtype=np.float64)),
                         torch.as_tensor(np.asarray(y, dtype=np.int64)), float(lam))
    return float(loss)


class _Objective:
    """The closure L-BFGS calls: f and its gradient at the parameter's current value, computed once per point
    (each ``step`` starts by asking again for the point the last line search accepted)."""

    def __init__(self, w: torch.nn.Parameter, x: torch.Tensor, y: torch.Tensor, lam: float) -> None:
        self.w, self.x, self.y, self.lam = w, x, y, lam
        self.at: torch.Tensor | None = None
        self.evals = 0

    def values(self) -> tuple[float, torch.Tensor]:
        """f(W) and its gradient [C, D] at the current W."""
        if self.at is None or not torch.equal(self.at, self.w):
            with torch.no_grad():
                self.loss, self.grad = _loss_grad(self.w, self.x, self.y, self.lam)
            self.at = self.w.detach().clone()
            self.evals += 1
        return float(self.loss), self.grad

    def __call__(self) -> torch.Tensor:
        self.values()
        self.w.grad = self.grad
        return self.loss


def fit_multinomial_l2(x: Any, y: Any, lam: float, *, num_classes: int, device: str | torch.device = "cpu",
                       init: Any = None, max_iter: int = 1000, tol: float = 1e-6,
                       dtype: torch.dtype = torch.float64) -> LogRegFit:
    """Minimise f(W) = (1/N) sum_i CE(W x_i, y_i) + (lam / 2) ||W||_F^2 over W [num_classes, D] (scikit-learn's
    objective with C = 1 / (lam N), scaled by 1 / N: module docstring) by full-batch L-BFGS on ``device``.

    ``x`` [N, D] features, ``y`` [N] labels in [0, num_classes) (a class without examples gets weights too: its
    logits are pushed down, whereas scikit-learn leaves absent classes out; :class:`TorchLogisticRegression` fits
    the present classes only), ``init`` [num_classes, D] warm start (default zeros, as scikit-learn).

    Stops when f(W) - f* is provably at most ``tol`` times both f(W) and f(0) - f(W) = log C - f(W) (the second
    rules at large lambda, where f stays near log C and the first would allow sizeable weight errors): f is
    lam-strongly convex, so f(W) - f* <= ||grad f(W)||^2 / (2 lam) (``LogRegFit.gap``). Or when an iteration
    lowers f by at most 64 eps max(|f|, 1), float64's eps: scipy's ``ftol`` as scikit-learn sets it
    (``_logistic.py:594``), the precision floor (in float32 the usual stop). scikit-learn's own rule, largest
    gradient entry <= ``tol`` = 1e-4, leaves small-lambda fits far from the optimum (on the L2-normalised digits
    pixels at lambda = 1e-6 its objective is 9% above it)."""
    x_np = _as_features(x)
    _check_number("num_classes", num_classes, integer=True, low=1)
    y_np = _as_labels(y, x_np.shape[0], num_classes)
    _check_number("lam", lam)
    _check_number("max_iter", max_iter, integer=True)
    _check_number("tol", tol)
    if dtype not in (torch.float32, torch.float64):
        raise LogRegArgumentError(f"Expected `dtype` to be torch.float32 or torch.float64, but got {dtype!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LogRegArgumentError(f"Expected `device` to be a torch device such as 'cpu' or 'cuda', but got "
                                  f"{device!r} ({exc})") from None
    shape = (num_classes, x_np.shape[1])
    if init is None:
        w0 = torch.zeros(shape, dtype=dtype, device=dev)
    else:
        init_np = np.asarray(init)
        if init_np.shape != shape or not np.issubdtype(init_np.dtype, np.number) or not np.isfinite(init_np).all():
            raise LogRegArgumentError(f"Expected `init` to be finite weights of shape {shape} ([num_classes, D]), "
                                      f"but got shape {init_np.shape}")
        w0 = torch.tensor(init_np, dtype=dtype, device=dev)  # a copy: the fit must not write into `init`
    lam = float(lam)
    w = torch.nn.Parameter(w0)
    fn = _Objective(w, torch.as_tensor(x_np, dtype=dtype).to(dev), torch.as_tensor(y_np).to(dev), lam)
    # One iteration per step() (its state carries the memory over), so the stopping rules above run in between;
    # torch's own tests are switched off (tolerances 0). max_eval 51: scikit-learn's maxls = 50 evaluations per
    # line search (sklearn/linear_model/_logistic.py:592) after the step's first one.
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=1, max_eval=51, tolerance_grad=0.0, tolerance_change=0.0,
                            history_size=HISTORY_SIZE, line_search_fn="strong_wolfe")
    ftol = 64 * torch.finfo(torch.float64).eps
    reducible = float(np.log(num_classes))  # f(0): every logit 0
    loss, grad = fn.values()
    n_iter, converged, previous = 0, False, None
    while True:
        gap = float((grad * grad).sum()) / (2 * lam)
        stalled = previous is not None and previous - loss <= ftol * max(abs(previous), loss, 1.0)
        if gap <= tol * min(loss, reducible - loss) or stalled:
            converged = True
            break
        if n_iter >= max_iter or fn.evals >= MAX_EVAL:
            break
        previous = loss
        opt.step(fn)
        n_iter += 1
        loss, grad = fn.values()
    if not converged:
        log.warning("torch logistic regression (lambda %.3g, N %d) stopped at max_iter=%d before converging "
                    "(objective %.6g, at most %.3g above the optimum)", lam, x_np.shape[0], max_iter, loss, gap)
    return LogRegFit(w.detach().cpu().numpy().copy(), loss, n_iter, converged, gap, lam)


def path(x: Any, y: Any, lams: Sequence[float], *, num_classes: int, device: str | torch.device = "cpu",
         init: Any = None, **kwargs: Any) -> list[LogRegFit]:
    """:func:`fit_multinomial_l2` for each lambda of ``lams`` in the order given (decreasing or increasing), each
    warm-started from the previous one's weights (the first from ``init``), with a progress bar over the lambdas
    (:mod:`prosmin_bench.progress`). ``kwargs``: ``max_iter``, ``tol``, ``dtype``."""
    if isinstance(lams, (str, bytes)) or not isinstance(lams, Sequence) or len(lams) == 0:
        raise LogRegArgumentError(f"Expected `lams` to be a non-empty sequence of positive numbers, but got {lams!r}")
    fits: list[LogRegFit] = []
    for lam in progress.bar(lams, desc="logistic regression path", unit="lambda"):
        fits.append(fit_multinomial_l2(x, y, lam, num_classes=num_classes, device=device, init=init, **kwargs))
        init = fits[-1].weights
    return fits


def nearest_init(solutions: dict[float, np.ndarray], lam: float) -> np.ndarray | None:
    """The weights in ``solutions`` (lambda -> weights) of the lambda nearest ``lam`` on a log scale, to warm-start
    a fit at ``lam`` from (None when there are none)."""
    if not solutions:
        return None
    return solutions[min(solutions, key=lambda v: abs(np.log(v / lam)))]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class TorchLogisticRegression:
    """scikit-learn's ``LogisticRegression(C=1 / (lam N), l1_ratio=0, fit_intercept=False)`` as the low-shot task
    uses it (``classes_``, ``coef_``, ``n_iter_``, ``decision_function``, ``predict_proba``), fitted by
    :func:`fit_multinomial_l2` on ``device``. As in scikit-learn, only the classes present in ``y`` get a column
    (``classes_`` = the sorted labels of ``y``); with two of them ``coef_`` is [1, D] and the decision function
    1-D (module docstring). ``fit_`` keeps the :class:`LogRegFit`, whose multinomial weights [K, D] warm-start a
    later fit on the same classes (``init``)."""

    def __init__(self, lam: float, *, device: str | torch.device = "cpu", max_iter: int = 1000,
                 tol: float = 1e-6) -> None:
        _check_number("lam", lam)
        self.lam, self.device, self.max_iter, self.tol = float(lam), device, max_iter, tol

    def fit(self, x: Any, y: Any, init: Any = None) -> "TorchLogisticRegression":
        """Fit on ``x`` [N, D] and labels ``y`` [N] (any integers), from ``init`` [K, D] (K classes in ``y``)."""
        labels = np.asarray(y)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise LogRegArgumentError(f"Expected `y` to be a 1-D array of integer labels, but got shape "
                                      f"{labels.shape} and dtype {labels.dtype}")
        self.classes_, positions = np.unique(labels, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise LogRegArgumentError(f"Expected `y` to hold at least 2 classes, but got {k}: a classifier needs "
                                      "examples of two classes or more")
        # two classes: scikit-learn's binary fit at lam is the multinomial one at 2 lam (module docstring)
        self.fit_ = fit_multinomial_l2(x, positions, self.lam * (2.0 if k == 2 else 1.0), num_classes=k,
                                       device=self.device, init=init, max_iter=self.max_iter, tol=self.tol)
        w = self.fit_.weights.astype(np.float64)
        self.coef_ = w[1:] - w[:1] if k == 2 else w
        self.n_iter_ = np.array([self.fit_.n_iter], dtype=np.int32)
        return self

    def decision_function(self, x: Any) -> np.ndarray:
        """Logits [N, K] (for two classes the 1-D d . x, as scikit-learn) of ``x`` [N, D]."""
        z = np.asarray(x, dtype=np.float64) @ self.coef_.T
        return z[:, 0] if len(self.classes_) == 2 else z

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities [N, K] of ``x`` [N, D] (columns in ``classes_`` order)."""
        d = self.decision_function(x)
        return _softmax(np.stack([np.zeros_like(d), d], axis=1) if d.ndim == 1 else d)
