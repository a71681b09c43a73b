"""Every ImageNet-scale task end to end on a tiny fake data root in the official layouts, with a micro backbone.

The fake root holds: ``imagenet/{train,val}/<wnid>/*.JPEG`` whose train files are the very names SimCLR's shipped
1% / 10% split files list for three classes; ``imagenet-o/<wnid>/`` with all 200 ImageNet-O folders;
``imagenet-c/<corruption>/<severity>/<wnid>/`` for the 15 x 5 tree; ``transfer/<name>/{train,test}/<class>/``.
The shipped cards run as they are, except that the fine-tuning ones and the augmented linear probe get copies with
1 epoch (user cards).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prosmin_bench import cards
from prosmin_bench.data.folder import imagenet_wnids, read_lines, reference_file
from prosmin_bench.metrics import ALEXNET_ERRORS, CORRUPTIONS
from prosmin_bench.models import ModelSpec, Preprocess, WeightsSource
from prosmin_bench.results import ErrorRecord, ResultRecord
from prosmin_bench.runner import RunOptions, evaluate

TINY = ModelSpec(name="tiny", arch="vit_micro", weights=WeightsSource(random=True, seed=0),
                 preprocess=Preprocess(resize=36, crop=32), scale="imagenet", method="random")
O_WNIDS = read_lines(reference_file("imagenet_o_wnids.txt"))
# Two ImageNet-O classes and one class outside ImageNet-O (its val images must not count as ImageNet-O's ID set).
CLASSES = [O_WNIDS[0], O_WNIDS[1], next(w for w in imagenet_wnids() if w not in O_WNIDS)]
VAL_PER_CLASS = 4
TRANSFER = ("cifar10", "cifar100", "flowers102", "inat18")
# Fine-tuning cards get 1 epoch; everything else runs as shipped.
FAST = {"epochs": 1, "batch_size": 32, "eval_every": 1, "warmup_epochs": 0}


def _jpeg(path: Path, rng: np.random.Generator, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def split_file_names(percent: int, classes: list[str]) -> list[str]:
    return [n for n in read_lines(reference_file(f"imagenet_{percent}percent.txt")) if n.split("_")[0] in classes]


def make_fake_root(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in sorted(set(split_file_names(1, CLASSES)) | set(split_file_names(10, CLASSES))):
        _jpeg(root / "imagenet" / "train" / name.split("_")[0] / name, rng)
    for w in CLASSES:
        for i in range(VAL_PER_CLASS):
            _jpeg(root / "imagenet" / "val" / w / f"ILSVRC2012_val_{w}_{i}.JPEG", rng)
            for c in CORRUPTIONS:  # ImageNet-C images are stored already cropped (here: at the model's 32 px)
                for s in range(1, 6):  # and are the val images, every one (the task checks)
                    _jpeg(root / "imagenet-c" / c / str(s) / w / f"ILSVRC2012_val_{w}_{i}.JPEG", rng, 32)
    for w in O_WNIDS:  # all 200 ImageNet-O folders, one image each
        _jpeg(root / "imagenet-o" / w / f"{w}_o.JPEG", rng)
    for t in TRANSFER:
        for split, n in (("train", 12), ("test", 4)):
            for cls in ("a", "b"):
                for i in range(n):
                    _jpeg(root / "transfer" / t / split / cls / f"{i}.png", rng, 36)
    return root


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def fast_copy(name: str, folder: Path, fast: dict | None = None) -> str:
    """A user card ``t_<name>``: the shipped card with the FAST protocol overrides (``fast``: others), without its
    ``deviations`` (metadata: an array of tables this small writer does not need)."""
    data = tomllib.loads((Path(cards.builtin_card_dir("tasks")) / f"{name}.toml").read_text())
    data["name"] = f"t_{name}"
    data.pop("deviations", None)
    data.pop("variant_of", None)  # its base task is not copied
    data["protocol"].update(FAST if fast is None else fast)
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for table in ("datasets", "protocol"):
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data[table].items()]
    (folder / f"t_{name}.toml").write_text("\n".join(lines) + "\n")
    return f"t_{name}"


AS_SHIPPED = ["imagenet_knn", "imagenet_linear", "imagenet_lowshot_1pct", "imagenet_lowshot_10pct", "imagenet_o",
              "imagenet_c"] + [f"transfer_{t}_linear" for t in TRANSFER]
FINETUNE = ["imagenet_semisup_1pct", "imagenet_semisup_10pct"] + [f"transfer_{t}" for t in TRANSFER]
# The augmented linear probe gets 1 epoch at batch 32 (its card has no warm-up or eval_every fields).
LINEAR_AUG = {"imagenet_linear_aug": {"epochs": 1, "batch_size": 32}}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def fake_run(fake_root, module_home, tmp_path_factory):
    """Run every ImageNet-scale task once on the fake root; the tests below read the records."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PROSMIN_BENCH_HOME", str(module_home))
    card_dir = tmp_path_factory.mktemp("cards")
    cards.add_card_dir(card_dir)
    try:
        copies = {n: fast_copy(n, card_dir) for n in FINETUNE}
        copies.update({n: fast_copy(n, card_dir, fast) for n, fast in LINEAR_AUG.items()})
        tasks = AS_SHIPPED + list(copies.values())
        results = tmp_path_factory.mktemp("results")
        recs = evaluate([TINY], tasks, options=RunOptions(seeds=(0,), device="cpu", results_dir=results,
                                                         data_root=fake_root))
    finally:
        cards.clear_card_dirs()
        mp.undo()
    return {r.task: r for r in recs}, copies


def test_every_imagenet_scale_task_is_covered():
    from prosmin_bench.tasks import catalogue

    shipped = {n for n, s in catalogue().items() if s.suite == "imagenet" and s.kind != "collapse"}
    # a new ImageNet-scale card must be added to this test
    assert shipped == set(AS_SHIPPED) | set(FINETUNE) | set(LINEAR_AUG)


def test_every_imagenet_scale_task_runs_end_to_end(fake_run):
    recs, copies = fake_run
    names = AS_SHIPPED + list(copies.values())
    errors = {t: r.message for t, r in recs.items() if isinstance(r, ErrorRecord)}
    assert not errors
    for t in names:
        rec = recs[t]
        assert isinstance(rec, ResultRecord) and np.isfinite(rec.mean[rec.main_score]), t


def test_lowshot_uses_exactly_the_simclr_files_of_the_present_classes(fake_run):
    recs, _ = fake_run
    for pct in (1, 10):
        rec = recs[f"imagenet_lowshot_{pct}pct"]
        expected = split_file_names(pct, CLASSES)
        assert rec.mean["n_labelled"] == len(expected)
        info = rec.extras["subset"]
        assert info["file"] == f"imagenet_{pct}percent.txt" and info["n_labelled"] == len(expected)
        listed = len(read_lines(reference_file(f"imagenet_{pct}percent.txt")))
        assert info["skipped_absent_classes"] == listed - len(expected)


def test_imagenet_o_id_set_is_val_of_the_200_classes_only(fake_run):
    recs, _ = fake_run
    rec = recs["imagenet_o"]
    assert rec.extras["n_id"] == 2 * VAL_PER_CLASS  # the third class is not an ImageNet-O class
    assert rec.extras["n_ood"] == 200
    assert 0.0 <= rec.mean["auroc"] <= 1.0 and "knn_auroc" in rec.mean


def test_imagenet_c_uses_alexnet_by_name_and_all_75_sets(fake_run):
    recs, _ = fake_run
    rec = recs["imagenet_c"]
    base = rec.extras["baseline"]["errors"]
    assert {c: tuple(v) for c, v in base.items()} == ALEXNET_ERRORS
    assert sorted(rec.extras["errors"]) == sorted(CORRUPTIONS)
    assert all(len(v) == 5 for v in rec.extras["errors"].values())
    # mCE by hand from the recorded per-severity errors and the AlexNet table
    ce = [sum(rec.extras["errors"][c]) / sum(ALEXNET_ERRORS[c]) for c in CORRUPTIONS]
    assert rec.mean["mce"] == pytest.approx(100 * np.mean(ce))


def test_finetune_tasks_report_the_chosen_epoch(fake_run):
    recs, copies = fake_run
    for t in (copies[n] for n in FINETUNE):
        assert recs[t].mean["best_epoch"] == 1.0 and recs[t].extras["history"]


def test_missing_sets_give_one_clear_error_per_task_and_the_rest_runs(fake_root, module_home, tmp_path, monkeypatch):
    """Without transfer/inat18 and with one ImageNet-C corruption folder gone: one DataError record per affected
    task, saying what and where; the others still run (and a corruption is never silently averaged away)."""
    import shutil

    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(module_home))  # features of the copied folders are cache hits
    root = tmp_path / "partial"
    shutil.copytree(fake_root / "imagenet", root / "imagenet")
    shutil.copytree(fake_root / "imagenet-c", root / "imagenet-c")
    shutil.rmtree(root / "imagenet-c" / "fog")
    tasks = ["transfer_inat18_linear", "imagenet_c", "imagenet_knn"]
    recs = {r.task: r for r in evaluate([TINY], tasks, options=RunOptions(
        seeds=(0,), device="cpu", results_dir=tmp_path / "results", data_root=root))}
    inat = recs["transfer_inat18_linear"]
    assert isinstance(inat, ErrorRecord) and inat.error_type == "DataError"
    assert "inat18" in inat.message and str(root / "transfer" / "inat18") in inat.message
    assert "train2018.json" in inat.message  # how to get it
    c = recs["imagenet_c"]
    assert isinstance(c, ErrorRecord) and c.error_type == "DataError"
    assert "imagenet-c/fog/1" in c.message and "zenodo" in c.message
    assert isinstance(recs["imagenet_knn"], ResultRecord)
