"""Benchmark: feature extraction images/s against the bare backbone forward on the same batches, fp32 vs bf16.

For each backbone and precision:

- ``bare``: the backbone's ``forward`` alone (no_grad, autocast at the precision) over batches that were loaded and
  transformed beforehand — the ceiling;
- ``extract``: ``prosmin_bench.features.extract`` on a cache miss, as a run sees it: data loading and the eval
  transform, the same forward, the cast to the stored dtype with the NaN/inf check, and the write into the
  ``.npy`` cache entry (temp file + rename).

Backbones: ``random_micro`` (vit_micro, 32 px) on the 1,437 digits train images, and ViT-S/16
(``timm:vit_small_patch16_224``, random init: the speed does not depend on the weights) on random 224-px
images (resized to 256 and centre-cropped, as the ImageNet tasks do). Prints images/s, the ratio extract / bare,
and bf16 / fp32 for each, plus the largest feature difference between bf16 and fp32.

Run: ``python benchmarks/bench_extraction.py [--threads 1] [--vits-images 48] [--batch-size 16] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prosmin_bench.data.base import ArrayImageDataset
from prosmin_bench.data.bundled import load_digits_split
from prosmin_bench.features import PRECISIONS, extract
from prosmin_bench.models import get_model


def bare_forward(model, batches: list[torch.Tensor], precision: str) -> tuple[float, np.ndarray]:
    amp = PRECISIONS[precision]
    start = time.perf_counter()
    outs = []
    with torch.no_grad():
        for images in batches:
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                outs.append(model(images).float())
    return time.perf_counter() - start, torch.cat(outs).numpy()


def bench(name: str, model, ds, batch_size: int, repeats: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(ds.with_transform(model.transform), batch_size=batch_size)
    batches = [images for images, _ in loader]  # loaded once, outside the bare timing
    n = len(ds)
    rows, feats = [], {}
    for precision in ("fp32", "bf16"):
        bare_forward(model, batches[:1], precision)  # warm-up (kernels, thread pool)
        bare_s, extract_s = [], []
        for _ in range(repeats):  # alternated, best of n: the machine is shared
            seconds, feats[precision] = bare_forward(model, batches, precision)
            bare_s.append(seconds)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                fs = extract(model, ds, dataset_id=f"bench-{name}", batch_size=batch_size, precision=precision,
                             cache_root=Path(tmp))
                extract_s.append(time.perf_counter() - start)
                assert fs.computed
        rows.append({"model": name, "precision": precision, "bare": n / min(bare_s), "extract": n / min(extract_s)})
    diff = float(np.abs(feats["bf16"] - feats["fp32"]).max() / np.abs(feats["fp32"]).max())
    for r in rows:
        r["bf16_rel_diff"] = diff
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: default 1)")
    ap.add_argument("--vits-images", type=int, default=48, help="random 224-px images for ViT-S/16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement (best is reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    digits = load_digits_split("train")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.vits_images, 224, 224, 3), dtype=np.uint8)
    random224 = ArrayImageDataset(images, np.zeros(args.vits_images, dtype=np.int64), ["x"], "random224-seed0")
    rows = bench("random_micro", get_model("random_micro"), digits, 256, args.repeats)
    rows += bench("vit_small_patch16", get_model("timm:vit_small_patch16_224"), random224, args.batch_size,
                  args.repeats)

    print(f"{args.threads} thread(s), CPU; images/s (best of {args.repeats})")
    print(f"{'backbone':<20}{'precision':>10}{'bare fwd':>11}{'extract':>10}{'extract/bare':>14}{'vs fp32':>9}")
    fp32 = {r["model"]: r for r in rows if r["precision"] == "fp32"}
    for r in rows:
        base = fp32[r["model"]]
        print(f"{r['model']:<20}{r['precision']:>10}{r['bare']:>11.1f}{r['extract']:>10.1f}"
              f"{r['extract'] / r['bare']:>14.2f}{r['extract'] / base['extract']:>9.2f}")
    for name, r in fp32.items():
        print(f"{name}: max |bf16 - fp32| feature difference = {r['bf16_rel_diff']:.3%} of the largest |feature|")


if __name__ == "__main__":
    main()
