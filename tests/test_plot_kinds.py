"""Every plot kind drawn from a constructed record through the public path (``plots.plan`` -> ``plots.draw``) to a
valid PNG of the planned size; the new kinds are planned only from valid extras; what the new drawings show equals
an independent computation from the extras (ROC points and AUROCs, error per sigma bin and the rejection curve,
chance and reference lines, non-overlapping reliability bars, the LayerNorm note)."""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from prosmin_bench import plots
from prosmin_bench.metrics import CORRUPTIONS, compact_roc, ood_roc_curve, uncertainty_error_bins
from prosmin_bench.plots.drawing import DPI
from prosmin_bench.plots.kinds import KINDS
from prosmin_bench.results import ResultRecord

RNG = np.random.default_rng(0)


def rec(model: str, extras: dict, metrics: dict | None = None, **fields) -> ResultRecord:
    return ResultRecord(model=model, task="t_plot", task_version=2, task_kind="x", suite="mini", main_score="top1",
                        weights_sha256="0" * 64, seeds=[3], per_seed={"3": metrics or {"top1": 0.5}},
                        extras=extras, **fields)


def roc_extras(scores: dict[str, float], n: int = 300) -> dict:
    """Compact ROC curves of Gaussian confidences, ID shifted up by ``d`` (one per score)."""
    out = {}
    for name, d in scores.items():
        fpr, tpr = compact_roc(*ood_roc_curve(RNG.normal(d, 1, n), RNG.normal(0, 1, n // 2)))
        out[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def sigma_bins(n: int = 400) -> dict:
    u = RNG.gamma(2.0, 0.003, n)
    correct = RNG.random(n) > np.clip(20 * u, 0, 0.9)  # more errors at high sigma
    return uncertainty_error_bins(u, correct, 10)


def reliability() -> dict:
    return {"confidence": [0.15, 0.45, 0.75, 0.95], "accuracy": [0.3, 0.35, 0.8, 0.97], "count": [10, 20, 30, 40]}


def corruption_errors() -> dict:
    return {c: sorted(RNG.uniform(0.05, 0.8, 5).tolist()) for c in CORRUPTIONS}


def baseline() -> dict:
    return {"name": "tree on pixels", "errors": {c: sorted(RNG.uniform(0.2, 0.9, 5).tolist()) for c in CORRUPTIONS},
            "clean_error": 0.14}


def corruption_records() -> list[ResultRecord]:
    base = baseline()  # one reference for the task, as the corruption task stores it in every record
    return [rec(m, {"errors": corruption_errors(), "baseline": base, "chance_error": 0.9}, {"clean_error": 0.05})
            for m in "ab"]


def hist(counts: list[int]) -> dict:
    return {"edges": np.linspace(0, 1, len(counts) + 1).tolist(), "counts": counts}


#: Plot kind -> records that draw it (two models, so legends and colours are exercised).
BUILDERS: dict[str, Callable[[], list[ResultRecord]]] = {
    "knn_k": lambda: [rec(m, {"top1_by_k": {"10": a, "20": a - 0.02}}) for m, a in (("a", 0.9), ("b", 0.7))],
    "reliability": lambda: [rec(m, {"reliability": reliability()}, {"ece": 0.05}) for m in "ab"],
    "sigma_error": lambda: [rec(m, {"sigma_vs_error": {"n": 400, "bins": sigma_bins()}},
                                {"sigma_misclf_auroc": 0.7}) for m in ("prosmin_a", "prosmin_b")],
    "ood_hist": lambda: [rec(m, {"msp_hist": {"id": hist([0, 1, 2, 3, 30]), "ood": hist([5, 5, 5, 4, 1])}},
                             {"auroc": 0.8}, datasets={"test": "digits:test", "ood": "digits_o:test"}) for m in "ab"],
    "ood_roc": lambda: [rec("a", {"roc": roc_extras({"msp": 1.0, "maxlogit": 1.2, "energy": 1.1, "knn": 2.0})},
                            {"auroc": 0.76, "knn_auroc": 0.92}),
                        rec("prosmin_a", {"roc": roc_extras({"msp": 1.0, "knn": 0.5, "sigma": 0.8,
                                                             "dispersion": 0.7})})],
    "corruption": lambda: corruption_records(),
    "severity": lambda: corruption_records(),
    "spectrum": lambda: [rec("vit", {"spectrum": [1.0, 0.5, 0.2, 0.1, 1e-9], "dim": 5}, {"effective_rank": 3.1},
                             model_info={"arch": "vit_micro"}),
                         rec("pixels", {"spectrum": [1.0, 0.6, 0.3], "dim": 3072}, model_info={"arch": "pixels"})],
}


def test_every_plot_kind_has_a_builder() -> None:
    assert set(BUILDERS) == {k.name for k in plots.PLOT_KINDS}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    # a valid PNG: every chunk's CRC matches and the image data ends with IEND
    i, kinds = 8, []
    while i < len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        kind, body, crc = data[i + 4:i + 8], data[i + 8:i + 8 + n], data[i + 8 + n:i + 12 + n]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + body), kind
        kinds.append(kind)
        i += 12 + n
    assert kinds[-1] == b"IEND" and b"IDAT" in kinds
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_each_kind_renders_to_a_png_of_the_planned_size(kind: str, tmp_path: Path) -> None:
    records = BUILDERS[kind]()
    specs = [s for s in plots.plan(records) if s.kind == kind]
    assert len(specs) == 1 and set(specs[0].models) == {r.model for r in records}
    path = plots.draw(specs[0], records, tmp_path / specs[0].filename)
    width, height = KINDS[kind].size(len(records))
    assert png_size(path.read_bytes()) == (round(width * DPI), round(height * DPI))


def test_new_kinds_are_planned_only_from_valid_extras(caplog: pytest.LogCaptureFixture) -> None:
    roc = roc_extras({"msp": 1.0})
    bent = {"msp": {"fpr": [0.0, 0.6, 0.4, 1.0], "tpr": [0.0, 0.5, 0.7, 1.0]}}  # FPR not monotone
    records = [
        rec("ok", {"roc": roc, "sigma_vs_error": {"n": 400, "bins": sigma_bins()}}),
        rec("old", {"sigma_vs_error": {"n": 360, "sigma_mean": 0.005}}),  # made before the bins: skipped quietly
        rec("bad", {"roc": bent, "sigma_vs_error": {"bins": {"count": [3, 3], "error": [0.5, 1.5]}}}),
    ]
    with caplog.at_level(logging.WARNING, logger="prosmin_bench.plots"):
        specs = {s.kind: s.models for s in plots.plan(records)}
    assert specs == {"sigma_error": ("ok",), "ood_roc": ("ok",)}
    assert sorted(m.split(": ")[1] for m in caplog.messages if "malformed" in m) == [
        "extras['roc'] is malformed; left out of the ood_roc plot",
        "extras['sigma_vs_error.bins'] is malformed; left out of the sigma_error plot"]
    assert plots.plan([records[1]]) == []


def test_roc_curves_are_the_stored_points_with_the_records_aurocs_and_chance() -> None:
    records = BUILDERS["ood_roc"]()
    (spec,) = plots.plan(records)
    fig = plots.figure(spec, records)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    ax, ax_p = fig.axes[0], fig.axes[1]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    roc = records[0].extras["roc"]
    area = {s: 100 * float(np.trapezoid(roc[s]["tpr"], roc[s]["fpr"])) for s in roc}
    # the record's own AUROC where it has one (msp, knn), the curve's area otherwise
    assert labels == ["chance (AUROC 50%)", "MSP: 76.0%", f"max logit: {area['maxlogit']:.1f}%",
                      f"energy: {area['energy']:.1f}%", "k-NN distance: 92.0%"]
    lines = ax.get_lines()
    assert list(lines[0].get_xdata()) == [0, 1] and list(lines[0].get_ydata()) == [0, 1]
    for line, score in zip(lines[1:], ["msp", "maxlogit", "energy", "knn"]):
        assert list(line.get_xdata()) == roc[score]["fpr"] and list(line.get_ydata()) == roc[score]["tpr"]
    # ProSMin's scores follow the logit and feature scores, in the task's order
    assert [t.get_text().split(":")[0] for t in ax_p.get_legend().get_texts()][1:] == [
        "MSP", "k-NN distance", "mean sigma", "dispersion"]
    # the legends sit below their panels, outside every panel's data area
    for a in (ax, ax_p):
        box = a.get_legend().get_window_extent(renderer)
        assert box.y1 <= a.get_window_extent(renderer).y0
        assert not any(box.overlaps(other.get_window_extent(renderer)) for other in fig.axes)


def test_sigma_error_shows_the_bins_error_and_the_rejection_curve() -> None:
    records = BUILDERS["sigma_error"]()
    (spec,) = plots.plan(records)
    ax_err, ax_rej = plots.figure(spec, records).axes
    bins = records[0].extras["sigma_vs_error"]["bins"]
    counts, error = np.array(bins["count"], float), np.array(bins["error"])
    line = ax_err.get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx(100 * error)
    assert list(line.get_xdata()) == pytest.approx(100 * (np.cumsum(counts) - counts / 2) / counts.sum())
    overall = ax_err.get_lines()[1]  # the dotted overall error
    assert list(overall.get_ydata()) == pytest.approx([100 * counts @ error / counts.sum()] * 2)
    # rejecting the k highest-sigma bins, computed directly
    expected = [(100 * counts[len(counts) - k:].sum() / counts.sum(),
                 100 * (1 - (counts * error)[:len(counts) - k].sum() / counts[:len(counts) - k].sum()))
                for k in range(len(counts))]
    rej = ax_rej.get_lines()[0]
    assert list(rej.get_xdata()) == pytest.approx([x for x, _ in expected])
    assert list(rej.get_ydata()) == pytest.approx([y for _, y in expected])


def test_corruption_plots_draw_chance_and_the_reference_models_errors() -> None:
    records = BUILDERS["corruption"]()
    specs = {s.kind: s for s in plots.plan(records)}
    ax = plots.figure(specs["corruption"], records).axes[0]
    ref = records[0].extras["baseline"]["errors"]
    marks = [line for line in ax.get_lines() if line.get_marker() == "_"]
    assert [list(m.get_ydata()) for m in marks] == [pytest.approx([100 * ref[c][s] for c in CORRUPTIONS])
                                                    for s in range(5)]
    assert any(list(line.get_ydata()) == [90.0, 90.0] for line in ax.get_lines())  # chance: 1 - 1/10
    sev = plots.figure(specs["severity"], records)
    lines = sev.axes[0].get_lines()
    reference = [line for line in lines if line.get_linestyle() == "--"]
    assert len(reference) == 1  # both records share one reference
    assert list(reference[0].get_ydata()) == pytest.approx([100 * np.mean([ref[c][s] for c in CORRUPTIONS])
                                                            for s in range(5)])
    assert any(list(line.get_ydata()) == [90.0, 90.0] for line in lines)
    labels = [t.get_text() for t in sev.legends[0].get_texts()]
    assert "chance (uniform guess, 1 - 1/C = 90%)" in labels and any("tree on pixels" in t for t in labels)


def test_reliability_gap_bars_never_overlap_the_accuracy_bar() -> None:
    records = BUILDERS["reliability"]()[:1]
    (spec,) = plots.plan(records)
    ax = plots.figure(spec, records).axes[0]
    acc_c, under_c, over_c = ax.containers
    b = records[0].extras["reliability"]
    for j, (a, c) in enumerate(zip(b["accuracy"], b["confidence"])):
        base, under, over = acc_c.patches[j], under_c.patches[j], over_c.patches[j]
        assert base.get_height() + under.get_height() == pytest.approx(a)  # blue + green = accuracy
        assert base.get_height() + over.get_height() == pytest.approx(c)  # blue + red = confidence
        assert under.get_height() * over.get_height() == 0  # a bin is over- or under-confident, not both
        assert under.get_y() == pytest.approx(base.get_height()) and over.get_y() == pytest.approx(a)
        for patch in (base, under, over):  # opaque: no colour is a blend of two
            assert patch.get_facecolor()[3] == 1.0
    assert to_rgba(under_c.patches[0].get_facecolor()) != to_rgba(over_c.patches[0].get_facecolor())


def test_spectrum_notes_layernorm_only_for_a_dropped_last_direction() -> None:
    records = BUILDERS["spectrum"]()
    (spec,) = plots.plan(records)
    fig = plots.figure(spec, records)
    notes = [t for t in fig.axes[0].texts if "LayerNorm" in t.get_text()]
    assert len(notes) == 1 and notes[0].xy[0] == 5  # points at the ViT's last index
    # the pixels reference alone has no drop: no note
    (spec,) = plots.plan(records[1:])
    assert not [t for t in plots.figure(spec, records[1:]).axes[0].texts if "LayerNorm" in t.get_text()]
    # a spectrum cut short (fewer values than dim) does not show its last direction
    cut = [rec("vit", {"spectrum": [1.0, 0.5, 1e-9], "dim": 96}, model_info={"arch": "vit_micro"})]
    (spec,) = plots.plan(cut)
    assert not [t for t in plots.figure(spec, cut).axes[0].texts if "LayerNorm" in t.get_text()]


@pytest.mark.parametrize("kind", ["knn_k", "severity", "spectrum", "reliability", "ood_hist", "corruption",
                                  "sigma_error"])
def test_figure_legends_sit_outside_every_axes(kind: str) -> None:
    records = BUILDERS[kind]()
    spec = next(s for s in plots.plan(records) if s.kind == kind)
    fig = plots.figure(spec, records)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert fig.legends and not any(ax.get_legend() for ax in fig.axes)
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (kind, ax.get_title())
