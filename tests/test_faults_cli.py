"""Fault suite, names, cards and command-line values (issue 15): no write outside the results folder, and every
fault a user can make in a card or on the command line is one line before any work.

Same house style as ``test_faults.py``: each test drives ``prosmin_bench.cli.main`` in-process and asserts the exit
code, the one line on stderr and the state of the folders afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from prosmin_bench.cli import main
from prosmin_bench.errors import ResultsError
from prosmin_bench.paths import record_path
from prosmin_bench.results import ResultRecord, dumps
from test_faults import CARDS, PREFIX, assert_one_line_error, cards_dir, cli, json_files, no_forward  # noqa: F401


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


def _task(name: str) -> str:
    return textwrap.dedent(CARDS["fault_knn.toml"]).replace('"fault_knn"', f'"{name}"')


def _model(**replace: str) -> str:
    """fault_pinned's card (a pinned URL model with 32-px preprocessing) renamed, with ``old -> new`` edits."""
    text = textwrap.dedent(CARDS["fault_pinned.toml"]).replace('"fault_pinned"', '"fault_model"')
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------------------------------------------------------
# 9. Names become path components: refused at card load unless they are plain names; every computed path is
#    checked to stay inside its root.


@pytest.mark.parametrize(
    "make_text, field, shown",
    [
        (lambda tmp: _task("../../escaped"), "name", "'../../escaped'"),
        (lambda tmp: _task(str(tmp / "abs_escaped")), "name", "abs_escaped'"),
        (lambda tmp: _task(".hidden"), "name", "'.hidden'"),
        (lambda tmp: _model(fault_model="../../escaped"), "name", "'../../escaped'"),
        (lambda tmp: _model(fault_model=str(tmp / "abs_escaped")), "name", "abs_escaped'"),
        (lambda tmp: _model(**{'url = "https://example.invalid/fault_pinned.pth"':
                               'recipe = "../../escaped"', 'sha256 = "' + "0" * 64 + '"': ""}),
         "weights.recipe", "'../../escaped'"),
        (lambda tmp: _model(**{"[weights]": '[weights]\nfilename = "../escaped.pth"'}), "weights.filename",
         "'../escaped.pth'"),
    ],
    ids=["task-relative", "task-absolute", "task-hidden", "model-relative", "model-absolute", "recipe",
         "weights-filename"],
)
def test_a_card_name_that_would_leave_its_folder_is_refused_at_load(tmp_path, cards_dir, capsys, no_forward,
                                                                    make_text, field, shown):
    bad = cards_dir / "bad_name.toml"
    bad.write_text(make_text(tmp_path))
    res = tmp_path / "deep" / "er" / "res"  # "../../x" from here would still be inside tmp_path
    before = files_under(tmp_path)
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(res), "--seeds", "0")
    assert_one_line_error(code, err, f"Card {str(bad)!r}: field {field!r} must be a plain name (letters, digits and "
                                     "_ . + - only, starting with a letter or digit) because it becomes a file name, "
                                     "but got '", shown)
    assert files_under(tmp_path) == before and no_forward == []


def test_a_model_card_may_not_take_the_folder_of_a_timm_model(tmp_path, cards_dir, capsys, no_forward):
    bad = cards_dir / "bad_name.toml"
    bad.write_text(_model(fault_model="timm--vit_tiny"))
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(tmp_path / "res"))
    assert_one_line_error(code, err, f"Card {str(bad)!r}: field 'name' must not start with 'timm--' (the results "
                                     "folder of timm:<name> models), but got 'timm--vit_tiny'")
    assert not (tmp_path / "res").exists() and no_forward == []


def test_timm_names_map_to_a_timm_folder_and_other_names_stay_inside(tmp_path):
    res = tmp_path / "res"
    assert record_path(res, "timm:vit_small_patch16_224.dino", "digits_knn") == (
        res / "timm--vit_small_patch16_224.dino" / "digits_knn.json")
    assert record_path(res, "random_micro", "digits_knn") == res / "random_micro" / "digits_knn.json"
    for model, task in (("../x", "digits_knn"), ("/abs/x", "digits_knn"), ("random_micro", "../x"),
                        ("timm:../x", "digits_knn"), ("timm--x", "digits_knn"), ("random_micro", "")):
        with pytest.raises(ResultsError, match="would be written outside the results folder"):
            record_path(res, model, task)


def test_a_model_spec_named_like_a_path_fails_before_any_work(tmp_path, cards_dir, no_forward):
    from prosmin_bench import cards, evaluate
    from prosmin_bench.models import MINI_PREPROCESS, ModelSpec, WeightsSource

    cards.add_card_dir(cards_dir)
    spec = ModelSpec(name="../escaped", arch="vit_micro", weights=WeightsSource(random=True),
                     preprocess=MINI_PREPROCESS, scale="mini")
    res = tmp_path / "res"
    with pytest.raises(ResultsError, match=r"Expected a model name of .*, but got '../escaped'"):
        evaluate(spec, "fault_knn", results_dir=res)
    assert files_under(tmp_path) == files_under(cards_dir) | {cards_dir} and no_forward == []


def test_a_model_folder_that_links_outside_the_results_folder_is_refused(tmp_path, cards_dir, capsys, no_forward):
    res, elsewhere = tmp_path / "res", tmp_path / "elsewhere"
    res.mkdir()
    elsewhere.mkdir()
    (res / "random_micro").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(res), "--seeds", "0")
    assert_one_line_error(code, err, f"Refusing to use result file {str(res / 'random_micro' / 'fault_knn.json')!r}: "
                                     f"it leads outside {str(res)!r}", "must not be links to elsewhere")
    assert list(elsewhere.iterdir()) == [] and no_forward == []


def test_a_record_with_a_path_for_a_name_writes_no_page_outside_the_output_folder(tmp_path, capsys):
    """A hand-made record whose suite is ``../escaped`` would make ``leaderboard --out DIR`` write DIR/../escaped.md."""
    res, out = tmp_path / "res", tmp_path / "site" / "pages"
    rec = ResultRecord(model="random_micro", task="digits_knn", task_version=1, task_kind="knn", suite="../escaped",
                       main_score="top1_k20", weights_sha256="0" * 64, seeds=[0], per_seed={"0": {"top1_k20": 0.5}})
    (res / "random_micro").mkdir(parents=True)
    (res / "random_micro" / "digits_knn.json").write_text(dumps(rec))
    code, _, err = cli(capsys, "leaderboard", "--results", str(res), "--out", str(out))
    assert code == 0, err
    assert {p.relative_to(tmp_path).parts[0] for p in files_under(tmp_path)} == {"res", "site"}
    assert not (tmp_path / "site" / "escaped.md").exists()
    assert all(p.is_relative_to(out) or p == out for p in files_under(tmp_path / "site"))


def test_pretrain_recipe_override_cannot_leave_the_checkpoints_folder(tmp_path, capsys, _isolated_home):
    code, _, err = cli(capsys, "pretrain", "--recipe", "prosmin_micro", "--set", "recipe=../../escaped")
    assert_one_line_error(code, err, "Expected recipe to be a name of letters, digits and _ . + - only",
                          "but got '../../escaped'")
    assert files_under(_isolated_home) == set()


# ---------------------------------------------------------------------------------------------------------------
# 13. Cards, destinations, devices, pretraining configs and lock files: one line at load or parse time, before any
#     work, naming the file, field, key or path.


@pytest.mark.parametrize(
    "edits, field, texts",
    [
        ({'interpolation = "bilinear"': 'interpolation = "bicubik"'}, "preprocess.interpolation",
         ["must be one of ['nearest', 'nearest-exact', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'], but got "
          "'bicubik'"]),
        ({"std = [0.5, 0.5, 0.5]": "std = [0, 0, 0]"}, "preprocess.std",
         ["must be 3 finite positive numbers (one per RGB channel), but got [0, 0, 0]"]),
        ({"std = [0.5, 0.5, 0.5]": "std = [0.5, nan, 0.5]"}, "preprocess.std", ["finite positive numbers"]),
        ({"mean = [0.5, 0.5, 0.5]": "mean = [0.5, 0.5]"}, "preprocess.mean",
         ["must be 3 finite numbers (one per RGB channel), but got [0.5, 0.5]"]),
        ({"crop = 32": "crop = 0"}, "preprocess.crop", ["must be a positive integer, but got 0"]),
        ({"crop = 32": "crop = 64"}, "preprocess.crop", ["must not exceed resize (32), but got 64"]),
        ({"resize = 32": "resize = -1"}, "preprocess.resize", ["must be a positive integer, but got -1"]),
        ({'arch = "vit_micro"': 'arch = "vit_mikro"'}, "arch", ["Unknown architecture 'vit_mikro'; did you mean "
                                                                "'vit_micro'"]),
        ({'scale = "mini"': 'scale = "mini"\nfeature_layer = "cls_last0"'}, "feature_layer",
         ["Expected feature layer 'cls', 'avgpool' or 'cls_lastN'"]),
    ],
    ids=["interpolation", "std-zero", "std-nan", "mean-two", "crop-zero", "crop-over-resize", "resize-negative",
         "arch", "feature-layer"],
)
def test_a_model_card_that_cannot_work_fails_the_run_before_any_work(tmp_path, cards_dir, capsys, no_forward,
                                                                     edits, field, texts):
    """The bad card is another model's: the run still stops before any work (a bad card is fixed, not skipped)."""
    bad = cards_dir / "bad_model.toml"
    bad.write_text(_model(**edits))
    res = tmp_path / "res"
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(res), "--seeds", "0")
    assert_one_line_error(code, err, f"Card {str(bad)!r}: field {field!r}", *texts)
    assert not res.exists() and no_forward == []


def test_a_card_that_is_not_utf8_is_one_line(tmp_path, cards_dir, capsys, no_forward):
    bad = cards_dir / "latin1.toml"
    bad.write_bytes(_task("caf\u00e9_knn").encode("latin-1"))
    res = tmp_path / "res"
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(res))
    offset = _task("caf\u00e9_knn").index("\u00e9")
    assert_one_line_error(code, err, f"Card {str(bad)!r} is not UTF-8 text (byte 0xe9 at offset {offset}); save it "
                                     "as UTF-8")
    assert not res.exists() and no_forward == []


def _under_a_file(tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    (tmp_path / "plain_file").write_text("x")
    return tmp_path / "plain_file" / "board", f"{str(tmp_path / 'plain_file')!r} is a file, not a folder"


def _page_under_a_file(tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    (tmp_path / "plain_file").write_text("x")
    return tmp_path / "plain_file" / "board.md", f"{str(tmp_path / 'plain_file')!r} is a file, not a folder"


def _figures_is_a_file(tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "figures").write_text("x")
    return tmp_path / "site" / "board.md", f"{str(tmp_path / 'site' / 'figures')!r} is a file, not a folder"


def _read_only(tmp_path: Path, monkeypatch) -> tuple[Path, str]:
    site = tmp_path / "site"
    site.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: simulate the EACCES a read-only folder gives
        real_open = open

        def deny(file, mode="r", *a, **k):
            if "w" in mode and str(file).startswith(str(site)):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr("builtins.open", deny)
    else:
        site.chmod(0o555)
    return site / "board", f"{str(site)!r} is not writable (Permission denied)"


@pytest.mark.parametrize("make", [_under_a_file, _page_under_a_file, _figures_is_a_file, _read_only],
                         ids=["folder-under-a-file", "page-under-a-file", "figures-is-a-file", "read-only"])
@pytest.mark.parametrize("command", ["leaderboard", "run"])
def test_an_unwritable_leaderboard_destination_fails_before_the_work(tmp_path, cards_dir, capsys, no_forward,
                                                                     make, command):
    res = tmp_path / "res"
    with pytest.MonkeyPatch.context() as mp:
        out, reason = make(tmp_path, mp)
        before = files_under(tmp_path)
        try:
            if command == "run":
                code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                                   "fault_knn", "--results", str(res), "--seeds", "0", "--leaderboard", str(out))
            else:
                code, _, err = cli(capsys, "leaderboard", "--results", str(res), "--out", str(out))
        finally:
            if (tmp_path / "site").is_dir():
                (tmp_path / "site").chmod(0o755)
    flag = "--leaderboard" if command == "run" else "--out"
    assert_one_line_error(code, err, f"Leaderboard destination {str(out)!r} cannot be written: {reason}; pass "
                                     f"another {flag}")
    assert files_under(tmp_path) == before and no_forward == []


def test_a_leaderboard_page_that_is_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "board.md").mkdir()
    code, _, err = cli(capsys, "leaderboard", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "board.md"))
    assert_one_line_error(code, err, f"Leaderboard page {str(tmp_path / 'board.md')!r} is a folder; pass a file name "
                                     "ending in .md")


def _no_cuda(mp) -> None:
    mp.setattr(torch.cuda, "is_available", lambda: False)


def _one_gpu(mp) -> None:
    mp.setattr(torch.cuda, "is_available", lambda: True)
    mp.setattr(torch.cuda, "device_count", lambda: 1)


def _no_mps(mp) -> None:
    mp.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    "device, machine, text",
    [
        ("mps", _no_mps, "--device mps was asked for, but MPS (Apple GPU) is not available here; use --device cpu"),
        ("cuda", _no_cuda, "--device cuda was asked for, but CUDA is not available here; use --device cpu"),
        ("cuda:7", _one_gpu, "--device cuda:7 was asked for, but this machine has 1 CUDA device (cuda:0); use one "
                             "of those or --device cpu"),
        ("tpu", _no_cuda, "Expected --device auto, cpu, cuda, cuda:N or mps, but got 'tpu'"),
        ("cuda:x", _no_cuda, "Expected --device auto, cpu, cuda, cuda:N or mps, but got 'cuda:x'"),
    ],
    ids=["mps", "cuda", "cuda-index", "tpu", "malformed"],
)
@pytest.mark.parametrize("command", ["run", "pretrain"])
def test_a_device_this_machine_lacks_is_one_line_before_any_work(tmp_path, cards_dir, capsys, monkeypatch, no_forward,
                                                                 device, machine, text, command):
    machine(monkeypatch)
    res, ckpt = tmp_path / "res", tmp_path / "ckpt"
    if command == "run":
        argv = ["--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn", "--results",
                str(res)]
    else:
        argv = ["pretrain", "--recipe", "prosmin_micro", "--out", str(ckpt)]
    code, _, err = cli(capsys, *argv, "--device", device)
    assert_one_line_error(code, err, text)
    assert not res.exists() and not ckpt.exists() and no_forward == []


@pytest.mark.parametrize(
    "override, text",
    [
        ("optim.batch_size=0", "Expected optim.batch_size to be a positive integer, but got 0"),
        ("optim.epochs=-3", "Expected optim.epochs to be a positive integer, but got -3"),
        ("optim.lr=-0.1", "Expected optim.lr to be a non-negative number, but got -0.1"),
        ("optim.lr=nan", "Expected optim.lr to be a finite number, but got nan"),
        ("optim.betas=0.9,1.5", "Expected optim.betas[1] to be in [0, 1), but got 1.5"),
        ("crops.global_size=0", "Expected crops.global_size to be a positive integer, but got 0"),
        ("crops.global_scale=0.9,0.2", "Expected crops.global_scale to be two numbers with 0 < low <= high <= 1, "
                                       "but got [0.9, 0.2]"),
        ("crops.backend=gpu", "Expected crops.backend to be one of ['pil', 'tensor'], but got 'gpu'"),
        ("data.std=0.5,0,0.5", "Expected data.std to be 3 positive numbers, but got [0.5, 0.0, 0.5]"),
        ("run.max_steps=0", "Expected run.max_steps to be a positive integer or none, but got 0"),
        ("run.checkpoint_every_steps=0", "Expected run.checkpoint_every_steps to be a positive integer, but got 0"),
        ("method.n_samples=1", "Expected method.n_samples to be an integer >= 2, but got 1"),
        ("method.out_dim=0", "Expected method.out_dim to be a positive integer, but got 0"),
        ("method.lam=inf", "Expected method.lam to be a finite number, but got inf"),
    ],
)
def test_a_pretraining_config_that_cannot_train_is_one_line_naming_the_key(tmp_path, capsys, override, text):
    ckpt = tmp_path / "ckpt"
    code, _, err = cli(capsys, "pretrain", "--recipe", "prosmin_micro", "--set", override, "--out", str(ckpt))
    assert_one_line_error(code, err, text)
    assert not ckpt.exists()


def test_pretrain_out_under_a_file_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "plain_file").write_text("x")
    out = tmp_path / "plain_file" / "ckpt"
    code, _, err = cli(capsys, "pretrain", "--recipe", "prosmin_micro", "--out", str(out))
    assert_one_line_error(code, err, f"Checkpoint folder {str(out)!r} cannot be written: "
                                     f"{str(tmp_path / 'plain_file')!r} is a file, not a folder; pass a writable --out")
    assert (tmp_path / "plain_file").read_text() == "x"


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, cards_dir, capsys):
    from prosmin_bench.reuse import record_lock_path

    res, victim = tmp_path / "res", tmp_path / "victim.txt"
    victim.write_text("precious")
    lock = record_lock_path(res, record_path(res, "random_micro", "fault_knn"))
    lock.symlink_to(victim)
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(res), "--seeds", "0")
    assert_one_line_error(code, err, f"Lock file {str(lock)!r} is a symbolic link (to {str(victim)!r})",
                          "remove it and run again")
    assert victim.read_text() == "precious" and json_files(res) == []


def test_weights_that_name_a_folder_say_which_file_to_pass(tmp_path, cards_dir, capsys, no_forward):
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    (ckpt_dir / "checkpoint.pt").write_bytes(b"")
    res = tmp_path / "res"
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--weights", str(ckpt_dir), "--results", str(res))
    assert_one_line_error(code, err, f"Weights path {str(ckpt_dir)!r} is a folder; pass the checkpoint file inside it "
                                     f"(e.g. {str(ckpt_dir / 'checkpoint.pt')!r}) as --weights, or the folder as "
                                     "--weights-dir")
    assert not res.exists() and no_forward == []


# ---------------------------------------------------------------------------------------------------------------
# 14. Bad numbers on the command line: argparse's usage line and one error line, exit 2, before anything runs.


@pytest.mark.parametrize(
    "argv, text",
    [
        (["run", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
        (["run", "--batch-size", "99999999999"], "argument --batch-size: expected at most 65536, got 99999999999"),
        (["run", "--num-workers", "-1"], "argument --num-workers: expected a non-negative integer, got -1"),
        (["run", "--max-memory", "0"], "argument --max-memory: expected a size from 1M to 1P like 16G, 512M or "
                                       "1073741824, got '0'"),
        (["run", "--max-memory", "1e400G"], "argument --max-memory: expected a size from 1M to 1P"),
        (["run", "--max-memory", "nanG"], "argument --max-memory: expected a size from 1M to 1P"),
        (["pretrain", "--recipe", "prosmin_micro", "--epochs", "0"],
         "argument --epochs: expected a positive integer, got 0"),
        (["data", "make-imagenet-c", "--data-root", "DATA", "--workers", "-1"],
         "argument --workers: expected a positive integer, got -1"),
        (["data", "make-imagenet-c", "--data-root", "DATA", "--severity", "9"],
         "argument --severity: expected at most 5, got 9"),
        (["data", "make-imagenet-c", "--data-root", "DATA", "--severity", "0"],
         "argument --severity: expected a severity from 1 to 5, got 0"),
    ],
    ids=["batch-zero", "batch-huge", "workers-negative", "memory-zero", "memory-overflow", "memory-nan", "epochs-zero",
         "c-workers-negative", "severity-high", "severity-zero"],
)
def test_a_bad_number_is_a_usage_error(tmp_path, capsys, no_forward, argv, text):
    argv = [str(tmp_path / "data") if a == "DATA" else a for a in argv]
    (tmp_path / "data").mkdir()
    before = files_under(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    _, err = capsys.readouterr()
    assert exit_.value.code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: prosmin-bench") and "Traceback" not in err
    assert lines[-1].startswith(f"prosmin-bench {argv[0]}") and f": error: {text}" in lines[-1], err
    assert files_under(tmp_path) == before and no_forward == []


def test_a_missing_results_folder_is_an_error_for_the_leaderboard(tmp_path, capsys):
    """Issue 22: scripts can trust the exit status; a typo in --results is not an empty leaderboard."""
    code, out, err = cli(capsys, "leaderboard", "--results", str(tmp_path / "nope"))
    assert_one_line_error(code, err, f"No results folder {str(tmp_path / 'nope')!r}: run `prosmin-bench run` first")
    assert out == "" and not (tmp_path / "nope").exists()
