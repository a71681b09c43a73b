"""Fault suite (issue 9): bad input, interruption and concurrency turn into one clear message and lose nothing.

Every fault is driven through the command line (``prosmin_bench.cli.main`` in-process, or ``python -m prosmin_bench``
in a subprocess for SIGKILL and concurrency) and each test asserts both the message a user sees and the state of
the results folder afterwards. The README's troubleshooting table (docs/troubleshooting.md) quotes these messages.

Two kinds of fault:
- found before any work (names, cards, paths, results folder): one line ``prosmin-bench: error: ...`` on stderr,
  exit 2, nothing written and no image through a backbone;
- found while a (model, task) runs (weights, images, features, data layout): that pair gets an ErrorRecord, the
  rest of the suite runs, and the run ends with one ``prosmin-bench: error: N of M ... failed ...`` line naming the
  first failure, exit 1. A later run retries exactly the failed or missing pairs.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prosmin_bench import config
from prosmin_bench.cli import main
from prosmin_bench.models import build_architecture
from prosmin_bench.models.backbone import Backbone
from prosmin_bench.paths import record_path
from prosmin_bench.results import ErrorRecord, ResultRecord, read_record, scan

PREFIX = "prosmin-bench: error: "

# Quick user task cards: the shipped protocols with fewer neighbours / epochs, so each run takes seconds.
CARDS = {
    "fault_knn.toml": """
        name = "fault_knn"
        kind = "knn"
        version = 1
        suite = "mini"
        main_score = "top1_k5"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        [protocol]
        ks = [5]
    """,
    "toy_knn.toml": """
        name = "toy_knn"
        kind = "knn"
        version = 1
        suite = "mini"
        main_score = "top1_k5"
        [datasets]
        train = { source = "imagefolder", root = "toy/train" }
        test = { source = "imagefolder", root = "toy/test" }
        [protocol]
        ks = [5]
    """,
    "toy_linear.toml": """
        name = "toy_linear"
        kind = "linear"
        version = 1
        suite = "mini"
        main_score = "top1"
        [datasets]
        train = { source = "imagefolder", root = "toy/train" }
        test = { source = "imagefolder", root = "toy/test" }
        [protocol]
        layer = "cls_last4"
        epochs = 3
        base_lrs = [0.1]
        batch_size = 64
    """,
    "toy_knn4.toml": """
        name = "toy_knn4"
        kind = "knn"
        version = 1
        suite = "mini"
        main_score = "top1_k10"
        [datasets]
        train = { source = "imagefolder", root = "toy/train" }
        test = { source = "imagefolder", root = "toy/test" }
        [protocol]
        ks = [10]
        layer = "cls_last4"
    """,
    "other_knn.toml": """
        name = "other_knn"
        kind = "knn"
        version = 1
        suite = "mini"
        main_score = "top1_k5"
        [datasets]
        train = { source = "imagefolder", root = "other/train" }
        test = { source = "imagefolder", root = "other/test" }
        [protocol]
        ks = [5]
    """,
    # A model card pinning a sha256 that no real file has (64 zeros).
    "fault_pinned.toml": """
        name = "fault_pinned"
        arch = "vit_micro"
        scale = "mini"
        [weights]
        url = "https://example.invalid/fault_pinned.pth"
        sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
        [preprocess]
        resize = 32
        crop = 32
        interpolation = "bilinear"
        mean = [0.5, 0.5, 0.5]
        std = [0.5, 0.5, 0.5]
    """,
}


@pytest.fixture
def cards_dir(tmp_path):
    d = tmp_path / "cards"
    d.mkdir()
    for name, text in CARDS.items():
        (d / name).write_text(textwrap.dedent(text))
    return d


@pytest.fixture
def no_forward(monkeypatch):
    """Counts images sent through any backbone: faults found before the work must leave it at zero."""
    calls: list[int] = []
    real = Backbone.features

    def spy(self, images, layer="cls"):
        calls.append(len(images))
        return real(self, images, layer)

    monkeypatch.setattr(Backbone, "features", spy)
    return calls


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *texts: str) -> None:
    """Exactly one line on stderr, the error prefix, every expected text, exit 2, no traceback."""
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(PREFIX), err
    assert "Traceback" not in err
    for text in texts:
        assert text in err, f"{text!r} not in {err!r}"


def assert_run_error(code: int, err: str, *texts: str) -> None:
    """A run that went on past a failure: exit 1, the last stderr line is the one-line summary naming the cause."""
    assert code == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(PREFIX) and "pairs failed" in last, err
    for text in texts:
        assert text in last, f"{text!r} not in {last!r}"


def json_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.json")) if folder.exists() else []


def cached_feature_sets() -> list[Path]:
    d = config.features_dir()
    return sorted(d.rglob("*.json")) if d.exists() else []


def make_toy(root: Path, name: str = "toy", train_per_class: int = 6, test_per_class: int = 3) -> Path:
    """``root/<name>/{train,test}/{a,b}/<i>.png``: 32-px images, class ``a`` dark and class ``b`` bright."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, (lo, hi) in (("a", (0, 128)), ("b", (128, 256))):
            d = root / name / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(lo, hi, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------------------
# 1. Unknown names: close matches suggested, nothing run, nothing written.


@pytest.mark.parametrize(
    "argv, texts",
    [
        (["run", "--model", "random_mikro", "--task", "fault_knn"],
         ["Unknown model 'random_mikro'; did you mean 'random_micro'", "prosmin-bench list models"]),
        (["run", "--model", "random_micro", "--task", "fault_knm"],
         ["Unknown task 'fault_knm'; did you mean", "'fault_knn'", "prosmin-bench list tasks"]),
        (["run", "--model", "random_micro", "--task", "typo_dataset"],
         ["Task 'typo_dataset'", "datasets.train: Unknown dataset 'digitz'; did you mean 'digits'"]),
        (["run", "--model", "random_micro", "--task", "typo_split"],
         ["Task 'typo_split'",
          "datasets.test: dataset 'digits' has no split 'val'; expected one of ['train', 'test']"]),
        (["run", "--model", "timm:resnet_eighteen", "--task", "fault_knn"], ["Unknown timm model 'resnet_eighteen'"]),
        (["pretrain", "--recipe", "prosmin_mikro"],
         ["Unknown recipe 'prosmin_mikro'; did you mean 'prosmin_micro'", "prosmin-bench list recipes"]),
    ],
    ids=["model", "task", "dataset", "split", "timm", "recipe"],
)
def test_unknown_names_suggest_close_matches(tmp_path, cards_dir, capsys, no_forward, argv, texts):
    (cards_dir / "typo_dataset.toml").write_text(textwrap.dedent(CARDS["fault_knn.toml"]).replace(
        '"fault_knn"', '"typo_dataset"').replace('train = "digits:train"', 'train = "digitz:train"'))
    (cards_dir / "typo_split.toml").write_text(textwrap.dedent(CARDS["fault_knn.toml"]).replace(
        '"fault_knn"', '"typo_split"').replace('test = "digits:test"', 'test = "digits:val"'))
    res = tmp_path / "res"
    extra = ["--results", str(res)] if argv[0] == "run" else ["--out", str(tmp_path / "ckpt")]
    code, _, err = cli(capsys, "--cards", str(cards_dir), *argv, *extra)
    assert_one_line_error(code, err, *texts)
    assert not res.exists() and not (tmp_path / "ckpt").exists()
    assert no_forward == []


def test_debug_shows_the_traceback(tmp_path, cards_dir):
    from prosmin_bench.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean 'random_micro'"):
        main(["--debug", "--cards", str(cards_dir), "run", "--model", "random_mikro", "--task", "fault_knn",
              "--results", str(tmp_path / "res")])


# ---------------------------------------------------------------------------------------------------------------
# 2. Data root missing, empty or in the wrong layout: what was expected, what was found.


def test_missing_data_root_fails_before_any_work(tmp_path, capsys, no_forward):
    res = tmp_path / "res"
    code, _, err = cli(capsys, "run", "--model", "random_micro", "--task", "imagenet_knn",
                       "--data-root", str(tmp_path / "no_such_dir"), "--results", str(res))
    assert_one_line_error(code, err, f"Data root {str(tmp_path / 'no_such_dir')!r} does not exist",
                           "prosmin-bench data check --data-root DIR")
    assert not res.exists() and no_forward == []


def _layout_empty(root: Path) -> list[str]:
    return ["/imagenet/train' does not exist; expected <data-root>/imagenet/{train,val}/<wnid>/*.JPEG",
            f"but {str(root)!r} is empty"]


def _layout_wrong_name(root: Path) -> list[str]:
    (root / "ImageNet" / "train").mkdir(parents=True)
    (root / "readme.txt").write_text("x")
    return ["/imagenet/train' does not exist", f"found ['ImageNet/', 'readme.txt'] in {str(root)!r}"]


def _layout_flat_files(root: Path) -> list[str]:
    make_toy(root, "flat")
    (root / "imagenet").mkdir()
    (root / "flat" / "train" / "a").rename(root / "imagenet" / "train")  # images right under train/
    return ["imagenet:train: 1000 of 1000 class folders are missing", "(e.g. ['n01440764', 'n01443537', 'n01484850'])",
            "found 0 folders (e.g. []) and 6 files (e.g. ['0.png', '1.png', '2.png'])"]


def _layout_no_images(root: Path) -> list[str]:
    (root / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    (root / "imagenet" / "train" / "n01440764" / "notes.txt").write_text("x")
    return ["imagenet:train: no images (.jpg, .jpeg, .png", "check the path and the layout"]


@pytest.mark.parametrize("make_layout", [_layout_empty, _layout_wrong_name, _layout_flat_files, _layout_no_images],
                         ids=["empty", "wrong-name", "no-class-folders", "no-images"])
def test_data_root_in_the_wrong_layout_says_what_was_expected_and_found(tmp_path, capsys, no_forward, make_layout):
    data, res = tmp_path / "data", tmp_path / "res"
    data.mkdir()
    texts = make_layout(data)
    code, _, err = cli(capsys, "-q", "run", "--model", "random_micro", "--task", "imagenet_knn",
                       "--data-root", str(data), "--results", str(res))
    assert_run_error(code, err, "random_micro / imagenet_knn", *texts)
    [path] = json_files(res)
    rec = read_record(path)
    assert isinstance(rec, ErrorRecord) and rec.error_type == "DataError"
    assert all(t in rec.message for t in texts) and rec.traceback == ""
    assert no_forward == []


def test_image_folder_without_class_subfolders(tmp_path, cards_dir, capsys):
    data, res = tmp_path / "data", tmp_path / "res"
    make_toy(data)
    for p in sorted((data / "toy" / "train" / "a").iterdir())[:2]:  # images at the top instead of in class folders
        p.rename(data / "toy" / "train" / f"loose_{p.name}")
    for c in ("a", "b"):
        for p in (data / "toy" / "train" / c).iterdir():
            p.unlink()
        (data / "toy" / "train" / c).rmdir()
    code, _, err = cli(capsys, "-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                       "toy_knn", "--data-root", str(data), "--num-workers", "0", "--results", str(res))
    assert_run_error(code, err, "has no class subfolders (found files", "loose_0.png",
                     "expected " + str(data / "toy" / "train") + "/<class>/<image files>")
    assert isinstance(read_record(record_path(res, "random_micro", "toy_knn")), ErrorRecord)


# ---------------------------------------------------------------------------------------------------------------
# 3. Unreadable or truncated images inside an otherwise valid dataset. Policy: fail with the file named (no
#    silent skipping: a corrupt download is fixed, not averaged away); the rest of the suite still runs.


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_an_image(path: Path) -> None:
    path.unlink()
    path.with_suffix(".jpg").write_bytes(b"<html>404 Not Found</html>")


@pytest.mark.parametrize(
    "damage, workers, cause",
    [(_truncated, "0", "image file is truncated"), (_not_an_image, "0", "cannot identify image file"),
     # with loader workers, the message is still the worker's own, not torch's "Caught DataError in DataLoader
     # worker process 0." followed by a traceback
     (_truncated, "1", "image file is truncated")],
    ids=["truncated", "not-an-image", "truncated-in-a-worker"],
)
def test_bad_image_is_named_and_the_rest_of_the_suite_runs(tmp_path, cards_dir, capsys, damage, workers, cause):
    data, res = make_toy(make_toy(tmp_path / "data"), "other"), tmp_path / "res"
    bad = data / "other" / "train" / "b" / "1.png"
    damage(bad)
    bad = bad if bad.exists() else bad.with_suffix(".jpg")
    argv = ["-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "toy_knn", "--task",
            "other_knn", "--data-root", str(data), "--num-workers", workers, "--results", str(res)]
    code, _, err = cli(capsys, *argv)
    assert_run_error(code, err, "1 of 2", "random_micro / other_knn", f"Image {str(bad)!r} is unreadable or truncated",
                     cause, "replace or delete the file and run again")
    good = read_record(record_path(res, "random_micro", "toy_knn"))
    failed = read_record(record_path(res, "random_micro", "other_knn"))
    assert isinstance(good, ResultRecord) and isinstance(failed, ErrorRecord)
    assert failed.error_type == "DataError" and str(bad) in failed.message and cause in failed.message
    assert failed.message.count("\n") == 0 and "Caught" not in failed.message
    before = record_path(res, "random_micro", "toy_knn").read_bytes()
    # Fix the data and run again: only the failed pair runs; the finished one is not touched.
    bad.unlink()
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert isinstance(read_record(record_path(res, "random_micro", "other_knn")), ResultRecord)
    assert record_path(res, "random_micro", "toy_knn").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# 4. Weights files: truncated, not a checkpoint, unknown format, wrong keys, checksum different from the card.


def _state() -> dict[str, torch.Tensor]:
    return build_architecture("vit_micro").state_dict()


def _w_truncated(path: Path) -> None:
    torch.save(_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _w_html(path: Path) -> None:
    path.write_text("<!DOCTYPE html><html><body>Access denied</body></html>")


def _w_empty(path: Path) -> None:
    path.write_bytes(b"")


def _w_unknown_format(path: Path) -> None:
    torch.save({"foo": {"bar": torch.zeros(2)}}, path)


def _w_keys(path: Path) -> None:
    state = _state()
    state.pop("blocks.3.mlp.fc2.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)


def _w_shapes(path: Path) -> None:
    torch.save(build_architecture("vit_micro", embed_dim=48, num_heads=3).state_dict(), path)


@pytest.mark.parametrize(
    "make, texts",
    [
        (_w_truncated, ["is truncated or not a PyTorch checkpoint", "download it again or pass another file"]),
        (_w_html, ["is not a PyTorch checkpoint (it starts with b'<!DO': an HTML/text page (a failed download?))"]),
        (_w_empty, ["is empty; download it again"]),
        (_w_unknown_format, ["Unknown checkpoint format: top-level keys ['foo']; known formats"]),
        (_w_keys, ["does not match the architecture: missing keys [blocks.3.mlp.fc2.bias] (1); unexpected keys "
                   "[extra.weight] (1)", "Check the model's card"]),
        (_w_shapes, ["shape mismatches [blocks.0.attn.proj.bias: checkpoint (48,) vs model (96,)"]),
    ],
    ids=["truncated", "html-page", "empty", "unknown-format", "missing-unexpected-keys", "wrong-shapes"],
)
def test_bad_weights_file(tmp_path, cards_dir, capsys, no_forward, make, texts):
    weights, res = tmp_path / "w.pth", tmp_path / "res"
    make(weights)
    code, _, err = cli(capsys, "-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                       "fault_knn", "--task", "toy_knn", "--weights", str(weights), "--results", str(res))
    assert_run_error(code, err, "2 of 2", repr(str(weights)), *texts)
    recs = [read_record(p) for p in json_files(res)]
    assert [(r.task, type(r)) for r in recs] == [("fault_knn", ErrorRecord), ("toy_knn", ErrorRecord)]
    assert all(r.error_type == "WeightsError" and all(t in r.message for t in texts) for r in recs)
    assert no_forward == []


def test_weights_checksum_different_from_the_card(tmp_path, cards_dir, capsys, no_forward):
    wdir, res = tmp_path / "weights", tmp_path / "res"
    wdir.mkdir()
    torch.save(_state(), wdir / "fault_pinned.pth")
    from prosmin_bench.models.weights import sha256_file

    digest = sha256_file(wdir / "fault_pinned.pth")
    code, _, err = cli(capsys, "-q", "--cards", str(cards_dir), "run", "--model", "fault_pinned", "--task",
                       "fault_knn", "--weights-dir", str(wdir), "--results", str(res))
    texts = [f"has sha256 {digest}, but the card for 'fault_pinned' pins {'0' * 64}",
             "the file is damaged or a different release; delete it and download it again"]
    assert_run_error(code, err, *texts)
    rec = read_record(record_path(res, "fault_pinned", "fault_knn"))
    assert isinstance(rec, ErrorRecord) and all(t in rec.message for t in texts)
    assert no_forward == []


def test_a_failing_model_never_replaces_a_finished_result(tmp_path, cards_dir, capsys):
    """A later run (or another job) whose weights fail to load leaves the finished record as it was."""
    data, res = make_toy(tmp_path / "data"), tmp_path / "res"
    run = ["-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "toy_knn", "--data-root",
           str(data), "--num-workers", "0", "--results", str(res)]
    assert cli(capsys, *run)[0] == 0
    path = record_path(res, "random_micro", "toy_knn")
    before = path.read_text()
    _w_html(tmp_path / "w.pth")
    code, _, err = cli(capsys, *run, "--weights", str(tmp_path / "w.pth"))
    assert_run_error(code, err, "is not a PyTorch checkpoint")
    assert path.read_text() == before


# ---------------------------------------------------------------------------------------------------------------
# 5. Malformed task and model cards: the file and the field named, before any work.


def _task_card(name: str, old: str, new: str) -> str:
    """fault_knn's card renamed to ``name`` with ``old`` replaced by ``new``."""
    return CARDS["fault_knn.toml"].replace('"fault_knn"', f'"{name}"').replace(old, new)


def _model_card(name: str, old: str, new: str) -> str:
    return CARDS["fault_pinned.toml"].replace('"fault_pinned"', f'"{name}"').replace(old, new)


@pytest.mark.parametrize(
    "name, text, texts",
    [
        ("bad_syntax.toml", "name = [\nkind = 'knn'\n", ["is not valid TOML", "fix the syntax"]),
        ("bad_task_type.toml", _task_card("t2", "version = 1", 'version = "one"'),
         ["field 'version' must be int, but got str 'one'"]),
        ("bad_task_kind.toml", _task_card("t3", 'kind = "knn"', 'kind = "knnn"'),
         ["field 'kind' names unknown protocol kind 'knnn'"]),
        ("bad_task_protocol.toml", _task_card("t4", "ks = [5]", "ks = [0]"),
         ["protocol field 'ks' must be positive integers"]),
        ("bad_model_weights.toml", _model_card("m2", "[weights]", "[weights]\nrandom = true"),
         ["field 'weights' must set exactly one of url, recipe or random"]),
        ("bad_model_sha.toml", _model_card("m3", "0" * 64, "abc"),
         ["field 'weights.sha256' must be 64 lowercase hex digits"]),
        ("bad_model_field.toml", _model_card("m4", 'scale = "mini"', 'scale = "mini"\narchitecture = "vit_micro"'),
         ["unknown field(s) ['architecture']"]),
    ],
    ids=["toml-syntax", "task-field-type", "task-kind", "task-protocol", "model-weights", "model-sha256",
         "model-unknown-field"],
)
def test_malformed_card(tmp_path, cards_dir, capsys, no_forward, name, text, texts):
    path = cards_dir / name
    path.write_text(textwrap.dedent(text))
    res = tmp_path / "res"
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(res))
    assert_one_line_error(code, err, f"Card {str(path)!r}", *texts)
    assert not res.exists() and no_forward == []


# ---------------------------------------------------------------------------------------------------------------
# 6. Features with NaN or inf: refused before any metric, never cached.


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_features_are_refused_before_any_metric(tmp_path, cards_dir, capsys, monkeypatch, value):
    import prosmin_bench.metrics as metrics

    state = _state()
    state["norm.bias"] = torch.full_like(state["norm.bias"], value)  # every CLS feature becomes NaN / inf
    torch.save(state, tmp_path / "diverged.pth")
    metric_calls: list[str] = []
    for name in ("accuracy", "negative_log_likelihood", "expected_calibration_error"):
        real = getattr(metrics, name)
        monkeypatch.setattr(metrics, name, lambda *a, _n=name, _r=real, **k: (metric_calls.append(_n), _r(*a, **k))[1])
    res = tmp_path / "res"
    code, _, err = cli(capsys, "-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                       "fault_knn", "--weights", str(tmp_path / "diverged.pth"), "--results", str(res))
    texts = ["contain NaN or inf in", "the weights are probably diverged or corrupt; check the checkpoint"]
    assert_run_error(code, err, "random_micro / fault_knn", *texts)
    rec = read_record(record_path(res, "random_micro", "fault_knn"))
    assert isinstance(rec, ErrorRecord) and rec.error_type == "FeatureError"
    assert metric_calls == []
    assert cached_feature_sets() == []  # nothing non-finite reaches the cache


# ---------------------------------------------------------------------------------------------------------------
# 7. Corrupted or partially written result files: reported and ignored by the leaderboard, re-run by `run`.


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"model": "random_micro", "task": "fault_knn", "per_seed": {"0": {"top1', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2, 3]", "not a prosmin-bench result record"),
        ('{"record_type": "result", "schema_version": 99}', "schema_version 99 is newer than this prosmin-bench"),
        ('{"record_type": "result", "schema_version": 1, "model": "random_micro"}', "missing fields"),
    ],
    ids=["partial-write", "empty", "not-a-record", "newer-schema", "missing-fields"],
)
def test_corrupt_result_file_is_reported_then_recomputed(tmp_path, cards_dir, capsys, content, reason):
    data, res = make_toy(tmp_path / "data"), tmp_path / "res"
    run = ["-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--data-root", str(data),
           "--num-workers", "0", "--results", str(res)]
    assert cli(capsys, *run, "--task", "toy_knn4")[0] == 0
    bad = record_path(res, "random_micro", "toy_knn")
    bad.write_text(content)
    code, out, err = cli(capsys, "--cards", str(cards_dir), "leaderboard", "--results", str(res))
    assert code == 0 and "Traceback" not in err
    assert "Unreadable result files (ignored; re-run to recompute)" in out
    assert "`random_micro/toy_knn.json`" in out and reason in out
    assert "toy_knn4@1" in out  # the readable record is still tabulated
    knn4 = record_path(res, "random_micro", "toy_knn4").read_bytes()
    code, out, err = cli(capsys, *run, "--task", "toy_knn", "--task", "toy_knn4")
    assert code == 0, err
    assert f"ignoring unreadable result file {bad}" in err and "it will be recomputed" in err
    rec = read_record(bad)
    assert isinstance(rec, ResultRecord) and rec.task == "toy_knn" and 0 <= rec.mean["top1_k5"] <= 1
    assert record_path(res, "random_micro", "toy_knn4").read_bytes() == knn4
    assert scan(res)[1] == []
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("random_micro ")}
    assert "  computed (" in rows["toy_knn@1"] and rows["toy_knn4@1"].rstrip().endswith("  reused"), out


# ---------------------------------------------------------------------------------------------------------------
# 8. An incomplete ImageNet-C set: the missing corruption / severity named, where to get it, never a mean over fewer.

INET_CARDS = {
    "inet_linear.toml": """
        name = "inet_linear"
        kind = "linear"
        version = 1
        suite = "imagenet"
        main_score = "top1"
        [datasets]
        train = "imagenet:train"
        test = "imagenet:val"
        [protocol]
        layer = "cls"
        epochs = 3
        base_lrs = [0.1]
        batch_size = 16
    """,
    "inet_c.toml": """
        name = "inet_c"
        kind = "corruption"
        version = 1
        suite = "imagenet"
        main_score = "mce"
        [datasets]
        train = "imagenet:train"
        test = "imagenet:val"
        [protocol]
        corrupted = "imagenet_c"
        head_task = "inet_linear"
        baseline = "alexnet"
        resize = false
    """,
}


def make_fake_imagenet(root: Path, wnids: list[str]) -> Path:
    """``imagenet/{train,val}/<wnid>/`` and the full ``imagenet-c/<corruption>/<severity>/<wnid>/`` tree, 32 px."""
    from prosmin_bench.metrics import CORRUPTIONS

    rng = np.random.default_rng(0)

    def jpeg(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)

    for w in wnids:
        for i in range(4):
            jpeg(root / "imagenet" / "train" / w / f"{w}_{i}.JPEG")
        jpeg(root / "imagenet" / "val" / w / f"val_{w}.JPEG")
        for c in CORRUPTIONS:
            for sev in range(1, 6):
                jpeg(root / "imagenet-c" / c / str(sev) / w / f"val_{w}.JPEG")
    return root


def _c_severities_missing(root: Path) -> list[str]:
    import shutil

    for sev in (3, 4, 5):  # a download cut short inside one corruption
        shutil.rmtree(root / "imagenet-c" / "gaussian_noise" / str(sev))
    return [f"{str(root / 'imagenet-c' / 'gaussian_noise' / '3')!r} does not exist",
            f"found ['1/', '2/'] in {str(root / 'imagenet-c' / 'gaussian_noise')!r}"]


def _c_corruptions_missing(root: Path) -> list[str]:
    import shutil

    for c in ("fog", "frost", "snow", "brightness"):  # weather.tar never extracted
        shutil.rmtree(root / "imagenet-c" / c)
    return [f"{str(root / 'imagenet-c' / 'snow' / '1')!r} does not exist"]


def _c_absent(root: Path) -> list[str]:
    import shutil

    shutil.rmtree(root / "imagenet-c")
    return [f"{str(root / 'imagenet-c' / 'gaussian_noise' / '1')!r} does not exist",
            f"found ['imagenet/'] in {str(root)!r}"]


def _c_images_missing(root: Path) -> list[str]:
    from prosmin_bench.data.folder import imagenet_wnids

    w = imagenet_wnids()[1]
    (root / "imagenet-c" / "fog" / "3" / w / f"val_{w}.JPEG").unlink()  # an extraction stopped part-way
    return ["inet_c: 1 of 75 splits of 'imagenet_c' do not hold the clean test set's images (imagenet:val: 2 "
            "images), e.g. ['fog/3: 1 image(s), 1 class(es) with another count']",
            "a download or extraction stopped part-way"]


@pytest.mark.parametrize("damage", [_c_severities_missing, _c_corruptions_missing, _c_absent, _c_images_missing],
                         ids=["severities-missing", "corruptions-missing", "no-imagenet-c", "images-missing"])
def test_incomplete_imagenet_c_names_what_is_missing_and_where_to_get_it(tmp_path, capsys, damage):
    from prosmin_bench.data.folder import imagenet_wnids

    cards = tmp_path / "cards"
    cards.mkdir()
    for name, text in INET_CARDS.items():
        (cards / name).write_text(textwrap.dedent(text))
    data, res = make_fake_imagenet(tmp_path / "data", imagenet_wnids()[:2]), tmp_path / "res"
    texts = damage(data) + ["expected <data-root>/imagenet-c/<corruption>/<severity 1-5>/<wnid>/*.JPEG",
                            "https://zenodo.org/record/2235448",
                            "prosmin-bench data make-imagenet-c --data-root DIR"]
    code, _, err = cli(capsys, "-q", "--cards", str(cards), "run", "--model", "random_micro", "--task", "inet_linear",
                       "--task", "inet_c", "--data-root", str(data), "--num-workers", "0", "--results", str(res))
    assert_run_error(code, err, "1 of 2", "random_micro / inet_c", *texts)
    assert isinstance(read_record(record_path(res, "random_micro", "inet_linear")), ResultRecord)
    rec = read_record(record_path(res, "random_micro", "inet_c"))
    assert isinstance(rec, ErrorRecord) and rec.error_type == "DataError"  # no mCE over fewer corruptions
    assert all(t in rec.message for t in texts)


# ---------------------------------------------------------------------------------------------------------------
# 9. A class with no training example in a low-shot split.

LOWSHOT = """
    name = "toy_lowshot"
    kind = "lowshot"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = { source = "imagefolder", root = "toy/train" }
    test = { source = "imagefolder", root = "toy/test" }
    [protocol]
    fraction = FRACTION
"""


def _split_too_small(data: Path) -> tuple[str, list[str]]:
    return "0.1", ["A 0.1 fraction of 12 images is 1 labelled examples, fewer than the 2 classes: some "
                   "class would have no training example; use a larger fraction"]


def _class_missing_from_train(data: Path) -> tuple[str, list[str]]:
    import shutil

    shutil.rmtree(data / "toy" / "train" / "b")  # class b is in the test folder only
    return "0.5", [f"Class 'b' has 3 image(s) in split {str(data / 'toy' / 'test')!r}, folder "
                   f"{str(data / 'toy' / 'test' / 'b')!r} but none in the training split {str(data / 'toy' / 'train')!r}"]


@pytest.mark.parametrize("make", [_split_too_small, _class_missing_from_train], ids=["split-too-small",
                                                                                   "class-missing-from-train"])
def test_lowshot_class_without_training_example(tmp_path, cards_dir, capsys, make):
    data, res = make_toy(tmp_path / "data"), tmp_path / "res"
    fraction, texts = make(data)
    (cards_dir / "toy_lowshot.toml").write_text(textwrap.dedent(LOWSHOT).replace("FRACTION", fraction))
    code, _, err = cli(capsys, "-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                       "toy_lowshot", "--data-root", str(data), "--num-workers", "0", "--results", str(res))
    assert_run_error(code, err, "random_micro / toy_lowshot", *texts)
    rec = read_record(record_path(res, "random_micro", "toy_lowshot"))
    assert isinstance(rec, ErrorRecord) and rec.error_type == "DataError" and all(t in rec.message for t in texts)


# ---------------------------------------------------------------------------------------------------------------
# 10. Read-only or full results folder: an error before the work starts, not after.


def _under_a_file(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    (tmp_path / "plain_file").write_text("x")
    return tmp_path / "plain_file" / "res", ["cannot be created (Not a directory); pass a writable --results DIR"]


def _read_only(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    res = tmp_path / "ro"
    res.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: simulate the EACCES a read-only folder gives
        real_open = open

        def deny(file, mode="r", *a, **k):
            if "w" in mode and str(file).startswith(str(res)):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr("builtins.open", deny)
    else:
        res.chmod(0o555)
    return res, ["is not writable (Permission denied); free space or pass a writable --results DIR"]


def _no_space_on_write(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    return tmp_path / "full", ["is not writable (No space left on device)"]


def _almost_full(tmp_path: Path, monkeypatch) -> tuple[Path, list[str]]:
    real = os.statvfs

    class Tiny:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 2

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny(real(p)))
    return tmp_path / "nearly_full", ["bytes free; free space or pass another --results DIR"]


@pytest.mark.parametrize("make", [_under_a_file, _read_only, _no_space_on_write, _almost_full],
                         ids=["not-a-folder", "read-only", "write-fails-no-space", "almost-full"])
def test_unwritable_results_folder_fails_before_the_work(tmp_path, cards_dir, capsys, no_forward, make):
    with pytest.MonkeyPatch.context() as mp:  # open / fsync / statvfs are restored before the folder is inspected
        res, texts = make(tmp_path, mp)
        try:
            code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                               "fault_knn", "--results", str(res))
        finally:
            if res.is_dir():
                res.chmod(0o755)
    assert_one_line_error(code, err, f"Results folder {str(res)!r}", *texts)
    assert no_forward == [] and json_files(res) == []
    assert not res.exists() or [p.name for p in res.iterdir()] == []  # no probe file left behind


def test_disk_full_during_the_run_is_one_line_and_keeps_finished_results(tmp_path, cards_dir, capsys):
    data, res = make_toy(tmp_path / "data"), tmp_path / "res"
    run = ["-q", "--cards", str(cards_dir), "run", "--model", "random_micro", "--data-root", str(data),
           "--num-workers", "0", "--results", str(res), "--task", "toy_knn"]
    assert cli(capsys, *run)[0] == 0
    kept = record_path(res, "random_micro", "toy_knn").read_text()
    real, calls = os.fsync, []

    def fills_up(fd):  # the start-up checks (results, cache) pass; the disk is full when the next record is written
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fills_up)
        code, _, err = cli(capsys, *run, "--task", "toy_knn4")
    path = record_path(res, "random_micro", "toy_knn4")
    assert_one_line_error(code, err, f"Could not write result file {str(path)!r} (No space left on device)",
                          "free space or pass a writable --results DIR, then run again")
    assert record_path(res, "random_micro", "toy_knn").read_text() == kept
    assert not path.exists() and list(path.parent.glob("*.tmp")) == []


# ---------------------------------------------------------------------------------------------------------------
# 13. Pretraining: a non-finite loss stops the run with one line naming the step and the last checkpoint. (Killed
#     and resumed pretraining: tests/test_pretrain.py::test_killed_then_resumed_run_equals_an_uninterrupted_run;
#     the library-level non-finite check: test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint.)

#: A one-block 32-wide ProSMin with 2 local crops (as tests/test_pretrain.py's TINY): a step takes ~0.1 s.
TINY_PRETRAIN = {
    "arch_kwargs.depth": 1, "arch_kwargs.embed_dim": 32, "arch_kwargs.num_heads": 2, "method.out_dim": 32,
    "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16, "method.predictor_hidden_dim": 64,
    "optim.batch_size": 32, "optim.warmup_epochs": 0, "crops.local_crops": 2,
}


def test_pretraining_with_a_diverging_learning_rate_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "pretrain"
    sets = [f"--set={k}={v}" for k, v in {**TINY_PRETRAIN, "optim.lr": 1e30, "run.max_steps": 6,
                                           "run.checkpoint_every_steps": 1}.items()]
    code, stdout, err = cli(capsys, "-q", "pretrain", "--recipe", "prosmin_micro", "--epochs", "1", "--device", "cpu",
                            "--out", str(out), *sets)
    assert_one_line_error(code, err, "Non-finite loss (nan) at step", "training stopped",
                          f"The last good checkpoint is {str(out / 'checkpoint.pt')!r}",
                          "lower optim.lr, raise optim.warmup_epochs or use run.precision=fp32")
    assert stdout == ""  # no checkpoint path printed as if the run had finished
    step = int(err.split("at step ")[1].split()[0])
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] <= step  # the checkpoint precedes the non-finite step
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(step)) and all(np.isfinite(r["loss"]) for r in logged)


# ---------------------------------------------------------------------------------------------------------------
# 11, 12. SIGKILL mid-run, and two runs writing one results folder at once (real processes).

TASKS3 = ["toy_knn", "toy_linear", "toy_knn4"]


def _run_argv(cards: Path, data: Path, res: Path, tasks: list[str], python: bool = True) -> list[str]:
    argv = ["--cards", str(cards), "run", "--model", "random_micro", "--data-root", str(data), "--num-workers", "0",
            "--results", str(res)]
    for t in tasks:
        argv += ["--task", t]
    return [sys.executable, "-m", "prosmin_bench", *argv] if python else argv


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PROSMIN_BENCH_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PROSMIN_BENCH_OFFLINE="1")
    env.pop("PROSMIN_BENCH_CARDS", None)
    return env


def _metrics(res: Path) -> dict[str, tuple[dict, dict]]:
    out = {}
    for p in json_files(res):
        rec = read_record(p)
        assert isinstance(rec, ResultRecord), p
        out[rec.task] = (rec.per_seed, rec.mean)
    return out


def test_killed_run_resumes_and_equals_an_uninterrupted_run(tmp_path, cards_dir, capsys, monkeypatch):
    # 240 training images: the first record (toy_knn) appears early, and the cls_last4 features of the next task
    # take long enough to extract that the kill lands in the middle of the run.
    data = make_toy(tmp_path / "data", train_per_class=120, test_per_class=10)
    home, res = tmp_path / "home", tmp_path / "res"
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(home))
    proc = subprocess.Popen(_run_argv(cards_dir, data, res, TASKS3), env=_env(home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    first = record_path(res, "random_micro", "toy_knn")
    deadline = time.monotonic() + 120
    try:
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = {p.stem for p in json_files(res)}
    assert "toy_knn" in done and done != set(TASKS3), done  # killed part-way
    assert isinstance(read_record(first), ResultRecord)  # what was written is whole
    first_bytes = first.read_bytes()

    code, _, err = cli(capsys, *_run_argv(cards_dir, data, res, TASKS3, python=False))
    assert code == 0, err
    assert "random_micro / toy_knn: up to date" in err
    for t in set(TASKS3) - done:
        assert f"random_micro / {t}: running" in err
    assert first.read_bytes() == first_bytes  # finished work was not redone

    code, _, err = cli(capsys, "-q", *_run_argv(cards_dir, data, tmp_path / "uninterrupted", TASKS3, python=False))
    assert code == 0, err
    resumed, clean = _metrics(res), _metrics(tmp_path / "uninterrupted")
    assert sorted(resumed) == sorted(TASKS3) and resumed == clean
    # Lock files and a killed write's temp file are not records and disturb nothing.
    records, bad = scan(res)
    assert len(records) == 3 and bad == []
    code, out, _ = cli(capsys, "--cards", str(cards_dir), "leaderboard", "--results", str(res))
    assert code == 0 and "Unreadable" not in out and "Failed runs" not in out


def test_two_runs_on_one_results_folder_lose_nothing_and_repeat_nothing(tmp_path, cards_dir):
    data = make_toy(tmp_path / "data", train_per_class=30, test_per_class=10)
    home, res = tmp_path / "home", tmp_path / "res"
    a_tasks, b_tasks = ["toy_knn", "toy_linear"], ["toy_linear", "toy_knn4", "toy_knn"]
    procs = [subprocess.Popen(_run_argv(cards_dir, data, res, tasks), env=_env(home), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for tasks in (a_tasks, b_tasks)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    logs = "".join(err for _, err in outs)
    files = json_files(res)
    assert [p.relative_to(res).as_posix() for p in files] == [f"random_micro/{t}.json" for t in sorted(TASKS3)]
    for p in files:
        data_ = json.loads(p.read_text())  # every record is whole, valid JSON
        assert data_["record_type"] == "result" and data_["model"] == "random_micro"
        assert data_["task"] == p.stem and data_["seeds"] == [0]
    for t in TASKS3:  # each pair computed by exactly one of the two runs; the other found it done
        assert logs.count(f"random_micro / {t}: running") == 1, logs
    assert logs.count("up to date") == len(a_tasks) + len(b_tasks) - len(TASKS3)
    assert list(res.rglob("*.tmp")) == []
