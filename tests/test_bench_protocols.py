"""``benchmarks/bench_protocols.py --scale tiny`` end to end: every protocol stage prints a row with a finite wall time,
and the JSON rows agree with the table and with the arithmetic of their own extrapolation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the stages the issue asks for, each with the row labels it prints (the faiss rows only where faiss is installed)
STAGE_ROWS = {
    "k-NN": ["k-NN k=20 (torch)", "k-NN k=200 (torch)"],
    "linear": ["linear"],
    "low-shot": ["low-shot 1pct (sklearn)", "low-shot 1pct (torch)", "low-shot 10pct (sklearn)",
                 "low-shot 10pct (torch)"],
    "OOD": ["OOD (ImageNet-O)", "OOD predictive (sigma, dispersion)"],
    "corruption": ["corruption (ImageNet-C)"],
    "collapse": ["collapse"],
    "fine-tuning": ["fine-tuning step", "fine-tuning: imagenet_semisup_1pct", "fine-tuning: imagenet_semisup_10pct",
                    "fine-tuning: transfer_cifar10"],
}


def test_tiny_scale_prints_a_finite_row_per_stage(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_protocols.py"), "--scale", "tiny",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = {r["stage"]: r for r in json.loads(out.read_text())["rows"]}
    for stage, labels in STAGE_ROWS.items():
        for label in labels:
            printed = [line for line in lines if line.startswith(label + " ")]
            assert printed, f"no {stage} row {label!r} in:\n{proc.stdout}"
            r = rows[label]
            assert math.isfinite(r["wall_s"]) and r["wall_s"] > 0, r
            assert f" {r['wall_s']:.4g} " in printed[0], (printed[0], r)  # the table prints the JSON's time
            assert math.isfinite(r["peak_rss_mib"]) and r["peak_gpu_mib"] is None and r["device"] == "cpu", r
    # tiny runs every stage whole, except the fine-tuning schedules, extrapolated from the measured step rate:
    # images x epochs / (images/s) for training, plus the held-out evaluations
    for label, r in rows.items():
        if not label.startswith("fine-tuning:"):
            assert r["basis"] == "measured" and math.isclose(r["wall_s"], r["measured_s"]), r
    images_per_s = float(rows["fine-tuning step"]["note"].split(" images/s")[0].split()[-1])
    for label in STAGE_ROWS["fine-tuning"][1:]:
        r = rows[label]
        images, _, _, epochs = r["shape"].split()[:4]  # "<images> images x <epochs> epochs, batch <b>"
        assert r["wall_s"] >= int(images) * int(epochs) / images_per_s * 0.99, r
        assert r["basis"].startswith("extrapolated from "), r
