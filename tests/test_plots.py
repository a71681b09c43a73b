"""Plots: what is drawn equals what an independent computation gives; robust to missing extras; stable bytes."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from netcal.metrics import ECE

from prosmin_bench import plots
from prosmin_bench.metrics import CORRUPTIONS, ece_from_bins, expected_calibration_error, reliability_bins
from prosmin_bench.results import ResultRecord


def rec(model: str, extras: dict, task: str = "digits_x", mean: dict | None = None) -> ResultRecord:
    return ResultRecord(model=model, task=task, task_version=3, task_kind="x", suite="mini", main_score="top1",
                        weights_sha256="0" * 64, seeds=[0], per_seed={"0": mean or {"top1": 0.5}}, extras=extras)


def probs_labels(seed: int = 0, n: int = 400, c: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(c) * 0.4, size=n), rng.integers(0, c, n)


def reliability_extras(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    b = reliability_bins(probs, labels, n_bins)
    return {k: [float(x) for x in b[k]] for k in ("confidence", "accuracy", "count")}


def loop_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[list[float], list[int]]:
    """Per-bin accuracy and count by a plain loop over samples (the independent reference)."""
    correct = [[] for _ in range(n_bins)]
    for p, y in zip(probs, labels):
        conf = float(p.max())
        b = min(int(conf * n_bins - 1e-12), n_bins - 1) if conf > 0 else 0
        correct[b].append(float(p.argmax() == y))
    return [sum(c) / len(c) if c else float("nan") for c in correct], [len(c) for c in correct]


def test_reliability_ece_matches_netcal() -> None:
    probs, labels = probs_labels()
    ours = ece_from_bins(reliability_extras(probs, labels))
    assert ours == pytest.approx(ECE(bins=15).measure(probs, labels), abs=1e-9)


def test_reliability_bars_are_the_per_bin_accuracies() -> None:
    probs, labels = probs_labels(1)
    records = [rec("m1", {"reliability": reliability_extras(probs, labels)})]
    (spec,) = plots.plan(records)
    fig = plots.figure(spec, records)
    ax = fig.axes[0]
    acc, counts = loop_bins(probs, labels, 15)
    # one stack per non-empty bin: the accuracy up to the confidence, then the accuracy above it (under-confidence)
    base, under = ax.containers[0].patches, ax.containers[1].patches
    drawn = {round(p.get_x() * 15): p.get_height() + q.get_height() for p, q in zip(base, under)}
    expected = {b: a for b, (a, n) in enumerate(zip(acc, counts)) if n > 0}
    assert drawn.keys() == expected.keys()
    for b in expected:
        assert drawn[b] == pytest.approx(expected[b])
    hist = fig.axes[1]
    assert [round(p.get_height(), 9) for p in hist.patches] == [round(100 * n / len(labels), 9) for n in counts]
    ece = ECE(bins=15).measure(probs, labels)
    assert f"ECE = {100 * ece:.2f}% (seed 0)" in ax.get_title()
    assert ax.get_ylabel() == "accuracy" and "confidence" in hist.get_xlabel()
    assert fig.get_suptitle() == "digits_x@3: reliability diagrams"


def test_reliability_title_shows_the_records_ece() -> None:
    """The title's ECE is the record's own (the number in the task's table), never re-derived from the bins."""
    probs, labels = probs_labels(3)
    records = [rec("m1", {"reliability": reliability_extras(probs, labels)}, mean={"top1": 0.5, "ece": 0.01234})]
    (spec,) = plots.plan(records)
    title = plots.figure(spec, records).axes[0].get_title()
    assert "ECE = 1.23% (seed 0)" in title, title


def test_the_bins_a_task_records_are_the_bins_of_its_ece() -> None:
    """Tasks record metrics.reliability_bins: confidences on a bin edge (0.4, 0.8 with 5 bins) fall in the bin that
    starts there, as in the ECE, so the diagram drawn from the record shows the record's ECE."""
    from prosmin_bench.tasks.probes import reliability_extras as task_extras

    probs = np.array([[0.4, 0.3, 0.3], [0.4, 0.6, 0.0], [0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 2, 0])
    extras = task_extras(probs, labels, 5)
    assert extras["count"] == [0, 0, 3, 0, 2]
    # plain Python lists, as records store them (0.6 lies above the float edge 3/5 = 0.6000000000000001)
    assert json.dumps(extras) and {type(x) for v in extras.values() for x in v} == {int, float}
    assert ece_from_bins(extras) == pytest.approx(expected_calibration_error(probs, labels, 5), abs=1e-12)


def test_knn_lines_follow_k_in_numeric_order() -> None:
    records = [rec("b", {"top1_by_k": {"200": 0.5, "10": 0.8, "20": 0.9, "100": 0.7}}),
               rec("a", {"top1_by_k": {"20": 0.6}})]
    (spec,) = plots.plan(records)
    assert spec.models == ("a", "b") and spec.filename == "digits_x_knn_k.png"
    ax = plots.figure(spec, records).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["b"].get_xdata()) == [10, 20, 100, 200]
    assert list(lines["b"].get_ydata()) == pytest.approx([80, 90, 70, 50])
    assert ax.get_xscale() == "log" and "k" in ax.get_xlabel() and "%" in ax.get_ylabel()


def step_heights(vertices: np.ndarray, edges: np.ndarray) -> list[float]:
    """The height of a step outline over each bin: its vertex at the bin's left edge with the largest y (a step
    outline passes each edge twice, at the heights of the bins on either side)."""
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        on_left = vertices[np.isclose(vertices[:, 0], a)][:, 1]
        on_right = vertices[np.isclose(vertices[:, 0], b)][:, 1]
        out.append(float(np.intersect1d(np.round(on_left, 9), np.round(on_right, 9)).max()))
    return out


def test_ood_histograms_are_normalised_per_distribution() -> None:
    rng = np.random.default_rng(0)
    edges = np.linspace(0, 1, 11)
    id_counts = np.histogram(rng.beta(5, 1, 500), edges)[0]
    ood_counts = np.histogram(rng.beta(1, 2, 120), edges)[0]
    h = {"id": {"edges": edges.tolist(), "counts": id_counts.tolist(), "quantiles": {"50": 0.8}},
         "ood": {"edges": edges.tolist(), "counts": ood_counts.tolist()}}
    records = [rec("m", {"msp_hist": h}, mean={"auroc": 0.9})]
    records[0].datasets = {"train": "digits:train", "test": "digits:test", "ood": "digits_o:test"}
    (spec,) = plots.plan(records)
    fig = plots.figure(spec, records)
    ax = fig.axes[0]
    (id_fill,) = [c for c in ax.collections if c.get_label() == "in-distribution (digits:test), n = 500"]
    (ood_line,) = [line for line in ax.get_lines() if line.get_label() == "OOD (digits_o:test), n = 120"]
    assert step_heights(id_fill.get_paths()[0].vertices, edges) == pytest.approx(100 * id_counts / 500)
    assert list(ood_line.get_ydata()[:10]) == pytest.approx(100 * ood_counts / 120)
    assert "AUROC = 90.00%" in ax.get_title()
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == [id_fill.get_label(), ood_line.get_label()]


def test_ood_kde_is_scipys_weighted_kde_and_only_where_it_fits() -> None:
    from scipy.stats import gaussian_kde

    from prosmin_bench.plots.draw_ood import kde_fits

    edges = np.linspace(0, 1, 11)
    centres = (edges[:-1] + edges[1:]) / 2
    spread = {"id": [0, 2, 5, 9, 14, 20, 22, 16, 8, 4], "ood": [12, 20, 22, 18, 12, 8, 5, 2, 1, 0]}
    h = {k: {"edges": edges.tolist(), "counts": v} for k, v in spread.items()}
    records = [rec("m", {"msp_hist": h})]
    (spec,) = plots.plan(records)
    ax = plots.figure(spec, records).axes[0]
    kdes = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(kdes) == 2
    for line, key in zip(kdes, ("id", "ood")):
        counts = np.array(spread[key], float)
        # seaborn scales the density to the histogram's percent: density * bin width * 100
        expected = gaussian_kde(centres, weights=counts)(line.get_xdata()) * 0.1 * 100
        assert line.get_ydata() == pytest.approx(expected, rel=1e-6)
    # MSP piled in the last bin: no KDE (it would smear the spike into a hump)
    assert kde_fits(spread["id"]) and not kde_fits([0, 0, 1, 2, 3, 4, 5, 6, 10, 90])
    h["id"]["counts"] = [0, 0, 1, 2, 3, 4, 5, 6, 10, 90]
    ax = plots.figure(spec, records).axes[0]
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_corruption_bars_in_canonical_order_and_severity_means() -> None:
    rng = np.random.default_rng(0)
    errors = {c: sorted(rng.random(5).tolist()) for c in reversed(CORRUPTIONS)}  # given in reverse order
    records = [rec("m", {"errors": errors}, mean={"mce": 70.0, "clean_error": 0.1})]
    specs = {s.kind: s for s in plots.plan(records)}
    assert set(specs) == {"corruption", "severity"}
    ax = plots.figure(specs["corruption"], records).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [c.replace("_", " ") for c in CORRUPTIONS]
    bars = [p for p in ax.patches if p.get_height() > 0]
    # Bars are drawn severity by severity, each over the corruptions in canonical order.
    expected = [100 * errors[c][s] for s in range(5) for c in CORRUPTIONS]
    assert [p.get_height() for p in bars] == pytest.approx(expected)
    sev = plots.figure(specs["severity"], records).axes[0]
    line = next(line for line in sev.get_lines() if line.get_label() == "m")
    assert any(list(line.get_ydata()) == [10.0, 10.0] for line in sev.get_lines())  # the clean error
    assert list(line.get_ydata()) == pytest.approx([100 * np.mean([errors[c][s] for c in CORRUPTIONS])
                                                    for s in range(5)])


def test_spectrum_is_sorted_and_normalised() -> None:
    sv = [0.5, 4.0, 2.0, 0.0]
    records = [rec("m", {"spectrum": sv}, mean={"effective_rank": 2.5})]
    (spec,) = plots.plan(records)
    ax = plots.figure(spec, records).axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == pytest.approx([1.0, 0.5, 0.125, 1e-12])
    assert "effective rank 2.5, seed 0" in line.get_label() and ax.get_yscale() == "log"


def test_missing_or_malformed_extras_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    good = rec("good", {"reliability": {"confidence": [0.4, 0.9], "accuracy": [0.5, 1.0], "count": [2, 2]}})
    none = rec("none", {})
    bad = rec("bad", {"reliability": {"confidence": [0.4], "accuracy": [0.5, 1.0], "count": [2, 2]},
                      "top1_by_k": {"ten": 0.4}, "msp_hist": {"id": {"edges": [0, 1], "counts": [0]}},
                      "errors": {"fog": [0.1, 0.2]}, "spectrum": []})
    with caplog.at_level(logging.WARNING, logger="prosmin_bench.plots"):
        specs = plots.plan([good, none, bad])
    assert [(s.kind, s.models) for s in specs] == [("reliability", ("good",))]
    assert sum("malformed" in m for m in caplog.messages) == 6  # `errors` feeds two plots
    assert plots.plan([none]) == [] and plots.plan([]) == []


def png_chunks(data: bytes) -> list[bytes]:
    chunks, i = [], 8
    while i < len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        chunks.append(data[i + 4:i + 8])
        i += 12 + n
    return chunks


def test_png_bytes_are_stable_and_carry_no_software_metadata(tmp_path: Path) -> None:
    import matplotlib as mpl

    probs, labels = probs_labels(2)
    records = [rec(m, {"reliability": reliability_extras(probs[i::2], labels[i::2])}) for i, m in enumerate("ab")]
    (spec,) = plots.plan(records)
    before = mpl.rcParams["font.size"], mpl.rcParams["axes.facecolor"]
    a = plots.draw(spec, records, tmp_path / "a.png").read_bytes()
    b = plots.draw(spec, records, tmp_path / "b.png").read_bytes()
    assert a == b
    assert a[:8] == b"\x89PNG\r\n\x1a\n" and b"tEXt" not in png_chunks(a)
    assert (mpl.rcParams["font.size"], mpl.rcParams["axes.facecolor"]) == before  # the caller's style is restored
    width, height = struct.unpack(">II", a[16:24])
    assert 600 <= width <= 2000 and 300 <= height <= 2000
