"""The torch solver of the low-shot logistic regression (prosmin_bench/tasks/logreg.py) against scikit-learn run
directly, with both objectives computed by a numpy formula written here."""

from __future__ import annotations

import logging
import textwrap

import numpy as np
import pytest
import torch

from prosmin_bench import cards
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.results import ResultRecord
from prosmin_bench.runner import RunOptions, evaluate
from prosmin_bench.tasks.logreg import (
    LogRegArgumentError,
    TorchLogisticRegression,
    fit_multinomial_l2,
    path,
)


def _l2(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _objective_and_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
    """scikit-learn's objective with C = 1 / (lam N), divided by N: mean cross-entropy + lam / 2 ||W||^2, and its
    gradient [C, D]."""
    z = x @ w.T
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    p = np.exp(logp)
    p[rows, y] -= 1.0
    return float(-logp[rows, y].mean() + 0.5 * lam * (w * w).sum()), p.T @ x / len(y) + lam * w


def _sklearn(x: np.ndarray, y: np.ndarray, lam: float, **kw):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0 / (lam * len(y)), l1_ratio=0.0, fit_intercept=False, **kw).fit(x, y)


def _problems() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = {"digits": (_l2(digits.data.astype(np.float64)), digits.target)}
    for seed in (0, 1):  # 1,000 rows, 10 classes: Gaussian classes around a shared component
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(10, 32))
        y = rng.integers(0, 10, 1000)
        out[f"random{seed}"] = (_l2(0.5 * centres[y] + rng.normal(size=(1000, 32)) + rng.normal(size=32)), y)
    return out


PROBLEMS = _problems()
LAMBDAS = (1.0, 1e-2, 1e-4, 1e-6)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_objective_and_predictions_equal_sklearns_optimum(name):
    """At each lambda the torch fit's objective is within 1e-6 (relative) of scikit-learn's run to convergence
    (tol 1e-10); its argmax is scikit-learn's on every row
    whose top-2 logit margin exceeds what the two fits' distances to the optimum could move. Run to tol 1e-12,
    the objectives agree to 1e-9 and the argmax on every row (the closest margins, at lambda = 1, are 5e-6)."""
    x, y = PROBLEMS[name]
    for lam in LAMBDAS:
        ref = _sklearn(x, y, lam, tol=1e-10, max_iter=20000)
        fit = fit_multinomial_l2(x, y, lam, num_classes=10)
        f_ref, g_ref = _objective_and_grad(ref.coef_, x, y, lam)
        f, g = _objective_and_grad(fit.weights, x, y, lam)
        assert fit.converged and fit.objective == pytest.approx(f, rel=1e-12)
        assert abs(f - f_ref) <= 1e-6 * f_ref, (name, lam)
        # f is lam-strongly convex: ||W - W*||_F <= ||grad f(W)|| / lam. Rows are unit vectors, so the logits of
        # classes a and b move by at most ||dW_a|| + ||dW_b|| <= sqrt(2) ||dW||_F: a larger margin cannot flip.
        moved = (np.linalg.norm(g) + np.linalg.norm(g_ref)) / lam
        z = x @ ref.coef_.T
        top2 = np.sort(z, axis=1)[:, -2:]
        safe = top2[:, 1] - top2[:, 0] > np.sqrt(2) * moved
        assert safe.mean() >= 0.75, (name, lam, safe.mean())
        assert np.array_equal((x @ fit.weights.T).argmax(1)[safe], z.argmax(1)[safe]), (name, lam)
        tight = fit_multinomial_l2(x, y, lam, num_classes=10, tol=1e-12)
        assert abs(_objective_and_grad(tight.weights, x, y, lam)[0] - f_ref) <= 1e-9 * f_ref, (name, lam)
        assert np.array_equal((x @ tight.weights.T).argmax(1), z.argmax(1)), (name, lam)


def test_binary_and_absent_classes_follow_sklearn():
    """Two classes: scikit-learn fits one vector d with penalty lam/2 ||d||^2 (coef_ [1, D], 1-D decision
    function); labels {2, 5, 7}: only those three columns, in scikit-learn's order."""
    x, y = PROBLEMS["random0"]
    for keep, lam in (((3, 8), 1e-3), ((2, 5, 7), 1e-4)):
        mask = np.isin(y, keep)
        xs, ys = x[mask], y[mask]
        ref = _sklearn(xs, ys, lam, tol=1e-10, max_iter=20000)
        clf = TorchLogisticRegression(lam, tol=1e-12).fit(xs, ys)
        assert np.array_equal(clf.classes_, ref.classes_) and clf.coef_.shape == ref.coef_.shape
        np.testing.assert_allclose(clf.decision_function(xs), ref.decision_function(xs), atol=1e-4)
        np.testing.assert_allclose(clf.predict_proba(xs), ref.predict_proba(xs), atol=1e-5)
        if len(keep) == 2:  # scikit-learn's binary objective (labels +-1), written out, at both solutions
            s = np.where(ys == keep[1], 1.0, -1.0)

            def binary(d):
                return np.logaddexp(0.0, -s * (xs @ d)).mean() + 0.5 * lam * d @ d

            assert binary(clf.coef_[0]) == pytest.approx(binary(ref.coef_[0]), rel=1e-10)
        assert clf.decision_function(xs).ndim == (1 if len(keep) == 2 else 2)
        np.testing.assert_allclose(clf.predict_proba(xs).sum(1), 1.0)


@pytest.mark.parametrize("order", [1, -1])
def test_warm_started_path_equals_cold_fits(order):
    """A lambda path (decreasing, then increasing) warm-started from fit to fit reaches the cold fits' objectives
    (both within 1e-6 of the optimum) and the same weights to within the strong-convexity bound."""
    x, y = PROBLEMS["random1"]
    lams = list(LAMBDAS[::order])
    fits = path(x, y, lams, num_classes=10)
    cold = [fit_multinomial_l2(x, y, lam, num_classes=10) for lam in lams]
    assert [f.lam for f in fits] == lams
    np.testing.assert_array_equal(fits[0].weights, cold[0].weights)  # the first starts from zeros as well
    for lam, warm, c in zip(lams, fits, cold):
        f_w, g_w = _objective_and_grad(warm.weights, x, y, lam)
        f_c, g_c = _objective_and_grad(c.weights, x, y, lam)
        assert warm.converged and abs(f_w - f_c) <= 1e-6 * f_c, lam
        bound = (np.linalg.norm(g_w) + np.linalg.norm(g_c)) / lam
        assert np.linalg.norm(warm.weights - c.weights) <= bound, lam
    assert sum(f.n_iter for f in fits[1:]) < sum(f.n_iter for f in cold[1:])


def test_float32_and_an_unconverged_fit(caplog):
    x, y = PROBLEMS["random0"]
    ref = _sklearn(x, y, 1e-3, tol=1e-10, max_iter=20000)
    f_ref = _objective_and_grad(ref.coef_, x, y, 1e-3)[0]
    fit = fit_multinomial_l2(x, y, 1e-3, num_classes=10, dtype=torch.float32)
    assert fit.weights.dtype == np.float32 and fit.converged
    assert _objective_and_grad(fit.weights.astype(np.float64), x, y, 1e-3)[0] == pytest.approx(f_ref, rel=1e-5)
    with caplog.at_level(logging.WARNING, logger="prosmin_bench.tasks.logreg"):
        short = fit_multinomial_l2(x, y, 1e-6, num_classes=10, max_iter=3)
    assert short.n_iter == 3 and not short.converged and "max_iter=3" in caplog.text
    assert short.gap == pytest.approx(np.sum(_objective_and_grad(short.weights, x, y, 1e-6)[1] ** 2) / 2e-6,
                                      rel=1e-9)


X, Y = np.eye(4, 3), np.array([0, 1, 2, 0])


@pytest.mark.parametrize("kwargs, match", [
    ({"x": np.ones(4)}, "Expected `x` to be a non-empty 2-D array"),
    ({"x": np.where(X == 1, np.nan, X)}, "Expected `x` to be finite"),
    ({"x": X.astype(str)}, "Expected `x` to hold real numbers"),
    ({"y": Y[:3]}, "Expected `y` to be a 1-D array of 4 labels"),
    ({"y": Y.astype(float)}, "Expected `y` to hold integer class indices"),
    ({"y": Y + 1}, r"Expected `y` to lie in \[0, 3\)"),
    ({"lam": 0.0}, "Expected `lam` to be a finite number > 0"),
    ({"lam": float("nan")}, "Expected `lam`"),
    ({"num_classes": 1, "y": np.zeros(4, dtype=int)}, "Expected `num_classes` to be an integer > 1"),
    ({"init": np.zeros((2, 3))}, r"Expected `init` to be finite weights of shape \(3, 3\)"),
    ({"max_iter": 0}, "Expected `max_iter` to be an integer > 0"),
    ({"tol": -1.0}, "Expected `tol`"),
    ({"dtype": torch.float16}, "Expected `dtype` to be torch.float32 or torch.float64"),
    ({"device": "no-such-device"}, "Expected `device` to be a torch device"),
])
def test_argument_errors(kwargs, match):
    args = {"x": X, "y": Y, "lam": 0.1, "num_classes": 3, **kwargs}
    with pytest.raises(LogRegArgumentError, match=match) as info:
        fit_multinomial_l2(args.pop("x"), args.pop("y"), args.pop("lam"), **args)
    assert isinstance(info.value, ProsminBenchError) and "\n" not in str(info.value)


def test_argument_errors_of_path_and_the_classifier():
    with pytest.raises(LogRegArgumentError, match="Expected `lams` to be a non-empty sequence"):
        path(X, Y, [], num_classes=3)
    with pytest.raises(LogRegArgumentError, match="Expected `y` to hold at least 2 classes"):
        TorchLogisticRegression(0.1).fit(X, np.zeros(4, dtype=int))
    with pytest.raises(LogRegArgumentError, match="Expected `lam` to be a finite number > 0"):
        TorchLogisticRegression(-1.0)


# ------------------------------------------------------------------------------------------- through the task
def _task(protocol):
    from prosmin_bench.tasks import build_task
    from prosmin_bench.tasks.spec import TaskSpec

    spec = TaskSpec(name="t_logreg", kind="lowshot", version=1, main_score="top1", suite="mini",
                    datasets={"train": "digits:train", "test": "digits:test"}, protocol=protocol)
    return build_task(spec)


def test_solver_field_is_checked_and_records_without_it_count_as_sklearn():
    from pathlib import Path

    from prosmin_bench.errors import CardError
    from prosmin_bench.results import read_record
    from prosmin_bench.reuse import _existing_ok, run_settings
    from prosmin_bench.tasks import get_task_spec

    assert _task({"fraction": 0.1}).params.solver == "sklearn"
    assert vars(_task({"fraction": 0.1, "solver": "torch"}).params)["solver"] == "torch"
    with pytest.raises(CardError, match="protocol field 'solver' must be \"sklearn\" or \"torch\""):
        _task({"fraction": 0.1, "solver": "cyanure"})
    # A committed record made before the field existed: no "solver" in its protocol, and a default run reuses it
    path = Path(__file__).resolve().parents[1] / "leaderboards" / "results" / "random_micro" / "digits_lowshot_1pct.json"
    rec = read_record(path)
    assert "solver" not in rec.protocol
    ok = dict(path=path, spec=get_task_spec("digits_lowshot_1pct"), seeds=rec.seeds, sha=rec.weights_sha256,
              model=rec.model, settings=run_settings(RunOptions()))
    assert _existing_ok(**ok) is not None
    # ... but not by a card that asks for the torch solver without a version bump
    torch_spec = get_task_spec("digits_lowshot_1pct")
    torch_spec = type(torch_spec)(**{**vars(torch_spec), "protocol": {**torch_spec.protocol, "solver": "torch"}})
    assert _existing_ok(**{**ok, "spec": torch_spec}) is None


def test_imagenet_cards_use_the_torch_solver():
    from prosmin_bench.tasks import build_task, get_task_spec

    for name in ("imagenet_lowshot_1pct", "imagenet_lowshot_10pct"):
        spec = get_task_spec(name)
        assert spec.version == 3 and build_task(spec).params.solver == "torch", name
    for name in ("digits_lowshot_1pct", "digits_lowshot_10pct"):
        assert build_task(get_task_spec(name)).params.solver == "sklearn", name


CARD = """
    name = "t_lowshot_torch"
    kind = "lowshot"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    fraction = 0.1
    lambdas = []
    lambdas_over_n = [0.01]
    solver = "torch"
"""


def test_a_torch_solver_card_gives_sklearns_numbers_and_records_the_solver(tmp_path, shared_home, monkeypatch):
    """DINO's lambda = c / N alone (no selection): the record's test numbers are those of scikit-learn run to
    convergence on the same subset at the same lambda; the record says which solver ran and how."""
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import train_test_split

    from prosmin_bench.data import resolve_dataset
    from prosmin_bench.features import cache_key, load_cached
    from prosmin_bench.models import get_model

    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(shared_home))
    d = tmp_path / "cards"
    d.mkdir()
    (d / "t.toml").write_text(textwrap.dedent(CARD))
    cards.add_card_dir(d)
    (rec,) = evaluate(["random_micro"], ["t_lowshot_torch"],
                      options=RunOptions(seeds=(0,), device="cpu", results_dir=tmp_path / "r"))
    assert isinstance(rec, ResultRecord), rec
    model, sets = get_model("random_micro"), []
    for split in ("train", "test"):  # the cached CLS features the run extracted
        ds = resolve_dataset(f"digits:{split}")
        fs = load_cached(cache_key(model, f"digits@1:{split}", ds.fingerprint, "cls", "fp32", "float32"))
        sets.append((_l2(np.asarray(fs.features, dtype=np.float64)), np.asarray(fs.labels)))
    (x_tr, y_tr), (x_te, y_te) = sets
    idx, _ = train_test_split(np.arange(len(y_tr)), train_size=144, stratify=y_tr, random_state=0)
    x, y = x_tr[np.sort(idx)], y_tr[np.sort(idx)]
    lam = 0.01 / len(y)
    probs = _sklearn(x, y, lam, tol=1e-10, max_iter=20000).predict_proba(x_te)
    got = rec.per_seed["0"]
    assert got["lambda"] == pytest.approx(lam, rel=1e-12)
    assert got["top1"] == pytest.approx(accuracy_score(y_te, probs.argmax(1)), abs=1e-9)
    assert got["nll"] == pytest.approx(log_loss(y_te, probs), rel=1e-5)
    assert rec.protocol["solver"] == "torch"
    solver = rec.extras["solver"]
    assert solver["name"] == "torch" and solver["device"] == "cpu"
    assert solver["fits"] == 6 and solver["not_converged"] == 0  # 5 folds and the refit
    assert solver["refit"]["converged"] and 0 < solver["refit"]["n_iter"] <= solver["n_iter_max"]


def _blob_context(seed: int):
    """A TaskContext over 6 Gaussian classes in 16-D (600 train / 300 test images)."""
    from types import SimpleNamespace

    from prosmin_bench.settings import EvalSettings
    from prosmin_bench.tasks.base import TaskContext

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 16))
    sets = {}
    for split, n in (("train", 600), ("test", 300)):
        y = np.repeat(np.arange(6), n // 6)
        x = (centres[y] + rng.normal(size=(n, 16)) * 1.5).astype(np.float32)
        sets[split] = SimpleNamespace(features=x, labels=y, key=f"blobs-{seed}-{split}")
    model = SimpleNamespace(spec=SimpleNamespace(feature_layer="cls"), has_predictive=False)
    return TaskContext(model=model, seed=seed, settings=EvalSettings(), dataset_fn=lambda ref: SimpleNamespace(),
                       feature_fn=lambda ref, layer, preprocess=None: sets[ref.split])


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_solver_makes_the_sklearn_solvers_choice(seed):
    """Cross-validated lambda over a grid (5 folds, warm starts along the grid and into the refit): the same grid,
    choice as the task with scikit-learn's solver, held-out and test scores equal to the precision of
    scikit-learn's default tolerance, and one fit per fold and lambda plus the refit in the solver's extras."""
    protocol = {"fraction": 0.25, "lambdas": [0.01, 0.1, 1.0], "lambdas_over_n": [0.1]}
    ref = _task(protocol).run(_blob_context(seed))
    out = _task({**protocol, "solver": "torch"}).run(_blob_context(seed))
    assert out.extras["selection"] == ref.extras["selection"]
    assert out.extras["lambda_choice"] == ref.extras["lambda_choice"]
    for key, score in ref.extras["val_scores"].items():
        # at the smallest lambdas scikit-learn's default tolerance leaves its fits visibly short of the optimum
        assert out.extras["val_scores"][key]["top1"] == pytest.approx(score["top1"], abs=0.01), key
        assert out.extras["val_scores"][key]["nll"] == pytest.approx(score["nll"], rel=1e-2), key
    for name in ("lambda", "val_top1", "n_labelled"):
        assert out.metrics[name] == ref.metrics[name], name
    assert out.metrics["nll"] == pytest.approx(ref.metrics["nll"], rel=1e-3)
    assert out.metrics["top1"] == pytest.approx(ref.metrics["top1"], abs=2 / 300)
    solver = out.extras["solver"]
    assert solver["fits"] == 5 * len(out.extras["val_scores"]) + 1 and solver["not_converged"] == 0
    assert "solver" not in ref.extras
