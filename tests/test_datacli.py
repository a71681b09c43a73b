"""``prosmin-bench data check`` and ``prosmin-bench data make-imagenet-c`` on tiny fake folders."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from prosmin_bench.cli import main
from prosmin_bench.data import resolve_dataset
from prosmin_bench.data.imagenet_c import ImageNetCBuild, build_imagenet_c
from prosmin_bench.datacli import MISSING, PARTIAL, PRESENT, check_data
from prosmin_bench.errors import DataError

WNIDS = ("n01440764", "n01443537")
BUILD = ("gaussian_noise", "contrast", "pixelate")


@pytest.fixture
def val_root(tmp_path):
    rng = np.random.default_rng(0)
    for w in WNIDS:
        d = tmp_path / "imagenet" / "val" / w
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)).save(d / f"ILSVRC2012_val_{w}_{i}.JPEG")
    return tmp_path


def _by(needs, task, role):
    return next(n for n in needs if n.task == task and n.role == role)


def test_check_reports_present_partial_missing_and_sources(val_root, capsys):
    (val_root / "transfer" / "cifar10" / "train" / "cat").mkdir(parents=True)
    needs = check_data(val_root)
    assert {n.task for n in needs} >= {"imagenet_o", "imagenet_c", "digits_c", "transfer_inat18", "digits_o"}
    val = _by(needs, "imagenet_linear", "test")
    assert val.probe.status == PARTIAL and "2 of 1000" in val.probe.detail
    assert _by(needs, "imagenet_linear", "train").probe.status == MISSING
    ood = _by(needs, "imagenet_o", "ood")
    assert ood.probe.status == MISSING and ood.probe.where == str(val_root / "imagenet-o")
    assert "natural-adv-examples" in ood.source and "imagenet-o/<wnid>" in ood.layout
    assert _by(needs, "imagenet_c", "corrupted").probe.status == MISSING
    assert _by(needs, "transfer_cifar10", "train").probe.status == PRESENT  # local class folder wins over HF
    assert _by(needs, "transfer_inat18", "train").probe.status == MISSING
    assert _by(needs, "imagenet_lowshot_1pct", "subset_file").ok
    assert all(n.ok for n in needs if n.task.startswith(("digits_", "transfer_lfw")))  # mini data: always there
    assert main(["data", "check", "--data-root", str(val_root)]) == 1  # something is missing: scripts can tell
    out = capsys.readouterr().out
    assert "zenodo.org/record/2235448" in out and "MISSING" in out and "transfer_inat18" in out
    assert main(["data", "check", "--data-root", str(val_root), "--task", "digits_knn", "--task", "transfer_lfw"]) == 0
    out = capsys.readouterr().out
    assert "2 task(s) have their data; 0 miss some" in out and "imagenet" not in out


def _expected(src: str, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Independent reference: torchvision Resize 256 + CenterCrop 224, imagecorruptions, JPEG q85 in memory."""
    from imagecorruptions import corrupt
    from torchvision import transforms as T

    with Image.open(src) as im:
        img = T.CenterCrop(224)(T.Resize(256)(im.convert("RGB")))
    out = corrupt(np.asarray(img), corruption_name=corruption, severity=severity)
    buf = io.BytesIO()
    Image.fromarray(np.uint8(out)).save(buf, format="JPEG", quality=85, optimize=True)
    return np.asarray(Image.open(buf))


def test_make_imagenet_c_layout_pixels_resume_and_workers(val_root):
    opts = ImageNetCBuild(data_root=val_root, corruptions=BUILD, severities=(1, 3), workers=1, progress=False)
    report = build_imagenet_c(opts)
    assert report.written == 2 * 2 * len(BUILD) * 2 and report.skipped == 0
    out = val_root / "imagenet-c"
    for c in BUILD:
        for s in (1, 3):
            for w in WNIDS:
                files = sorted(os.listdir(out / c / str(s) / w))
                assert files == [f"ILSVRC2012_val_{w}_0.JPEG", f"ILSVRC2012_val_{w}_1.JPEG"]
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob("*.tmp"))  # temp files renamed into place
    # contrast has no randomness: the written file equals the reference pipeline exactly
    src = val_root / "imagenet" / "val" / WNIDS[0] / f"ILSVRC2012_val_{WNIDS[0]}_1.JPEG"
    got = np.asarray(Image.open(out / "contrast" / "3" / WNIDS[0] / src.name))
    assert got.shape == (224, 224, 3) and np.array_equal(got, _expected(str(src), "contrast", 3, 0))
    # the loader reads the built tree as an ImageNet-C split, labels by wnid index
    ds = resolve_dataset("imagenet_c:pixelate/3", data_root=val_root)
    assert len(ds) == 4 and sorted(set(ds.labels.tolist())) == [0, 1]
    # resumable: nothing to do, then exactly the removed file is rewritten
    noisy = out / "gaussian_noise" / "1" / WNIDS[1] / f"ILSVRC2012_val_{WNIDS[1]}_0.JPEG"
    before = np.asarray(Image.open(noisy))
    assert build_imagenet_c(opts).written == 0
    noisy.unlink()
    again = build_imagenet_c(opts)
    assert again.written == 1 and again.skipped == 2 * 2 * len(BUILD) * 2 - 1
    assert np.array_equal(np.asarray(Image.open(noisy)), before)  # seeded: the same noise every time
    # parallel workers write the same pixels as one process
    par = ImageNetCBuild(data_root=val_root, corruptions=("gaussian_noise",), severities=(5,), workers=2,
                         progress=False)
    assert build_imagenet_c(par).written == 4
    first = {p.name: np.asarray(Image.open(p)) for p in (out / "gaussian_noise" / "5").rglob("*.JPEG")}
    for p in (out / "gaussian_noise" / "5").rglob("*.JPEG"):
        p.unlink()
    build_imagenet_c(ImageNetCBuild(data_root=val_root, corruptions=("gaussian_noise",), severities=(5,),
                                    workers=1, progress=False))
    for p in (out / "gaussian_noise" / "5").rglob("*.JPEG"):
        assert np.array_equal(np.asarray(Image.open(p)), first[p.name])


def test_make_imagenet_c_cli_and_errors(val_root, tmp_path, capsys):
    assert main(["data", "make-imagenet-c", "--data-root", str(val_root), "--corruption", "contrast",
                 "--severity", "2", "--workers", "1"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert main(["data", "make-imagenet-c", "--data-root", str(val_root), "--corruption", "fogg"]) == 2
    assert "fogg" in capsys.readouterr().err
    with pytest.raises(DataError, match="imagenet/val"):
        build_imagenet_c(ImageNetCBuild(data_root=tmp_path / "empty", corruptions=("contrast",), workers=1))
