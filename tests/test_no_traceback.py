"""No traceback ever reaches a user (issue 15): bad invocations of every kind, through the command line.

Each invocation runs ``prosmin_bench.cli.main`` in-process in a sandbox folder holding the bad inputs (cards, files,
records). An exception escaping ``main`` is what a user would see as a traceback, so it fails the test; so does the
word "Traceback" anywhere on stderr (a logged one). Each case also asserts the exit status, that the error is one
line naming the cause, and, for faults found before the work, that no image went through a backbone and no record
was written. The messages themselves are asserted in detail by tests/test_faults*.py; this file is the sweep.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from prosmin_bench.cli import main
from test_faults import CARDS, make_toy, no_forward  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent

TASK = """
    name = "{name}"
    kind = "knn"
    version = 1
    suite = "mini"
    main_score = "top1_k5"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    ks = [5]
"""
MODEL = """
    name = "{name}"
    arch = "vit_micro"
    method = "random"
    scale = "mini"
    [weights]
    random = true
    [preprocess]
    resize = {resize}
    crop = {crop}
    interpolation = "{interpolation}"
    mean = {mean}
    std = {std}
"""
GOOD_PRE = dict(resize=32, crop=32, interpolation="bicubic", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])


def _model(name: str, **bad) -> str:
    return textwrap.dedent(MODEL).format(name=name, **{**GOOD_PRE, **bad})


#: Card folders, each holding one bad card (or the quick good ones of tests/test_faults.py).
CARD_DIRS: dict[str, dict[str, str]] = {
    "good": {name: textwrap.dedent(text) for name, text in CARDS.items()},
    "relative": {"evil.toml": textwrap.dedent(TASK).format(name="../../x")},
    "absolute": {"evil.toml": textwrap.dedent(TASK).format(name="/tmp/prosmin_evil")},
    "hidden": {"evil.toml": textwrap.dedent(TASK).format(name=".hidden")},
    "timm_folder": {"m.toml": _model("timm--vit_small")},
    "interp": {"m.toml": _model("my_vit", interpolation="bicubik")},
    "std0": {"m.toml": _model("my_vit", std=[0, 0, 0])},
    "mean2": {"m.toml": _model("my_vit", mean=[0.5, 0.5])},
    "crop0": {"m.toml": _model("my_vit", crop=0)},
    "crop_big": {"m.toml": _model("my_vit", crop=64)},
    "toml": {"bad.toml": "name = \n"},
    "type": {"bad.toml": textwrap.dedent(TASK).format(name="t").replace("version = 1", 'version = "one"')},
}

# (argv, exit status, a text of the error line). "{x}" in an argument is the sandbox path x.
RUN = ["run", "--model", "random_micro", "--task", "digits_knn", "--no-pretrain", "--results", "{res}"]
BEFORE_WORK = [
    (["run", "--model", "random_mikro", "--task", "digits_knn"], 2, "Unknown model 'random_mikro'"),
    (["run", "--model", "random_micro", "--task", "digits_knm"], 2, "Unknown task 'digits_knm'"),
    (["pretrain", "--recipe", "prosmin_mikro"], 2, "Unknown recipe 'prosmin_mikro'"),
    ([*RUN, "--data-root", "{missing}"], 2, "does not exist"),
    (["--cards", "{cards_relative}", *RUN], 2, "must be a plain name"),
    (["--cards", "{cards_absolute}", *RUN], 2, "must be a plain name"),
    (["--cards", "{cards_hidden}", *RUN], 2, "must be a plain name"),
    (["--cards", "{cards_timm_folder}", *RUN], 2, "must not start with 'timm--'"),
    (["--cards", "{cards_interp}", *RUN], 2, "preprocess.interpolation"),
    (["--cards", "{cards_std0}", *RUN], 2, "preprocess.std"),
    (["--cards", "{cards_mean2}", *RUN], 2, "preprocess.mean"),
    (["--cards", "{cards_crop0}", *RUN], 2, "preprocess.crop"),
    (["--cards", "{cards_crop_big}", *RUN], 2, "preprocess.crop"),
    (["--cards", "{cards_toml}", "list", "tasks"], 2, "is not valid TOML"),
    (["--cards", "{cards_type}", "list", "tasks"], 2, "field 'version' must be int"),
    (["--cards", "{latin}", "list", "tasks"], 2, "is not UTF-8 text"),
    ([*RUN, "--seeds", "1,1"], 2, "seed 1 is repeated"),
    ([*RUN, "--seeds", "-1"], 2, "--seeds"),
    ([*RUN, "--seeds", "99999999999"], 2, "--seeds"),
    ([*RUN, "--batch-size", "0"], 2, "expected a positive integer, got 0"),
    ([*RUN, "--num-workers", "-1"], 2, "expected a non-negative integer, got -1"),
    ([*RUN, "--max-memory", "0"], 2, "--max-memory"),
    ([*RUN, "--precision", "fp8"], 2, "--precision"),
    ([*RUN, "--data-hash", "sha1"], 2, "--data-hash"),
    ([*RUN, "--device", "mps"], 2, "MPS (Apple GPU) is not available here"),
    ([*RUN, "--device", "tpu"], 2, "Expected --device"),
    ([*RUN, "--weights", "{folder}"], 2, "is a folder"),
    ([*RUN, "--weights", "{missing}"], 2, "does not exist"),
    ([*RUN, "--weights-dir", "{missing}"], 2, "is not a folder"),
    (["run", "--model", "random_micro", "--task", "digits_knn", "--results", "{afile}/res"], 2, "Results folder"),
    ([*RUN, "--leaderboard", "{afile}/lb"], 2, "Leaderboard destination"),
    (["leaderboard", "--results", "{res}", "--out", "{afile}/x.md"], 2, "Leaderboard destination"),
    (["pretrain", "--recipe", "prosmin_micro", "--set", "optim.batch_size=0", "--out", "{pt}"], 2,
     "optim.batch_size"),
    (["pretrain", "--recipe", "prosmin_micro", "--set", "optim.lr=nan", "--out", "{pt}"], 2, "optim.lr"),
    (["pretrain", "--recipe", "prosmin_micro", "--set", "recipe=../../x", "--out", "{pt}"], 2, "recipe"),
    (["pretrain", "--recipe", "prosmin_micro", "--epochs", "0", "--out", "{pt}"], 2, "--epochs"),
    (["pretrain", "--recipe", "prosmin_micro", "--device", "mps", "--out", "{pt}"], 2, "MPS"),
    (["pretrain", "--recipe", "prosmin_micro", "--out", "{afile}/pt"], 2, "is a file, not a folder"),
    (["data", "make-imagenet-c", "--data-root", "{folder}", "--severity", "9"], 2, "--severity"),
    (["data", "make-imagenet-c", "--data-root", "{folder}", "--workers", "-1"], 2, "--workers"),
]
# Faults found while a pair runs: an error record, the suite goes on, exit 1 with the one-line summary.
DURING_WORK = [
    (["--cards", "{cards_good}", "run", "--model", "random_micro", "--task", "toy_knn", "--data-root", "{broken}",
      "--results", "{res}"], 1, "is unreadable or truncated"),
    ([*RUN, "--weights", "{truncated}"], 1, "is truncated or not a PyTorch checkpoint"),
    ([*RUN, "--weights", "{html}"], 1, "is not a PyTorch checkpoint"),
]


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> dict[str, Path]:
    """The bad inputs, by name; the current folder is the sandbox, so a stray relative write would land in it."""
    monkeypatch.chdir(tmp_path)
    where: dict[str, Path] = {"res": tmp_path / "res", "missing": tmp_path / "no_such_thing",
                              "folder": tmp_path / "a_folder", "afile": tmp_path / "a_file", "pt": tmp_path / "pt"}
    where["folder"].mkdir()
    where["afile"].write_text("not a folder\n")
    for name, files in CARD_DIRS.items():
        d = where[f"cards_{name}"] = tmp_path / f"cards_{name}"
        d.mkdir()
        for fname, text in files.items():
            (d / fname).write_text(text)
    where["latin"] = tmp_path / "cards_latin"
    where["latin"].mkdir()
    (where["latin"] / "latin.toml").write_bytes('name = "café"\n'.encode("latin-1"))
    where["broken"] = make_toy(tmp_path / "broken")
    (where["broken"] / "toy" / "test" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    where["truncated"] = tmp_path / "truncated.pth"
    where["truncated"].write_bytes(b"PK\x03\x04" + bytes(100))
    where["html"] = tmp_path / "page.pth"
    where["html"].write_text("<!DOCTYPE html><html>Sign in</html>\n")
    return where


def _invoke(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and stderr of ``prosmin-bench argv``; an exception escaping main (a traceback) fails here."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors: the usage, then one "error:" line, exit 2
        code = exc.code
    out, err = capsys.readouterr()
    return code, err


def _fill(argv: list[str], where: dict[str, Path]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: str(where[m.group(1)]), a) for a in argv]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, status, text", BEFORE_WORK, ids=lambda v: None)
def test_a_fault_found_before_the_work_is_one_line_and_no_traceback(sandbox, capsys, no_forward, argv, status, text):
    before = _files_under(sandbox["res"].parent)
    code, err = _invoke(capsys, _fill(argv, sandbox))
    assert code == status, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("prosmin-bench"), err
    assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert no_forward == [], "an image went through a backbone before a fault that needs no work"
    assert _files_under(sandbox["res"].parent) == before, "a fault found before the work wrote a file"
    assert not Path("/tmp/prosmin_evil").exists() and not (REPO.parent / "x").exists()


@pytest.mark.parametrize("argv, status, text", DURING_WORK, ids=["bad_image", "truncated_weights", "html_weights"])
def test_a_fault_found_during_the_work_is_an_error_record_and_no_traceback(sandbox, capsys, argv, status, text):
    code, err = _invoke(capsys, _fill(argv, sandbox))
    assert code == status, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("prosmin-bench: error: ") and "pairs failed" in last and text in last, err
    records = [json.loads(p.read_text()) for p in sandbox["res"].rglob("*.json")]
    assert records and all(r["record_type"] == "error" and text in r["message"] for r in records)
    assert all(r["traceback"] == "" for r in records), "a user's fault must not store a traceback"


def test_the_sweep_covers_at_least_thirty_bad_invocations():
    assert len(BEFORE_WORK) + len(DURING_WORK) >= 30


def test_bad_records_in_the_results_folder_print_no_traceback(sandbox, capsys):
    """The leaderboard over a folder of malformed records lists them and exits 0, with no traceback."""
    res = sandbox["res"]
    bad = {"seeds_null": {"seeds": None}, "per_seed_list": {"per_seed": []}, "model_int": {"model": 123},
           "schema_str": {"schema_version": "1"}, "metric_str": {"per_seed": {"0": {"top1": "high"}}}}
    for i, (name, change) in enumerate(bad.items()):
        d = {"record_type": "result", "schema_version": 1, "model": "random_micro", "task": f"t{i}", "task_version": 1,
             "task_kind": "knn", "suite": "mini", "main_score": "top1", "weights_sha256": "0" * 64, "seeds": [0],
             "per_seed": {"0": {"top1": 0.5}}, "mean": {"top1": 0.5}, "std": {"top1": 0.0}, **change}
        (res / "random_micro").mkdir(parents=True, exist_ok=True)
        (res / "random_micro" / f"t{i}.json").write_text(json.dumps(d))
    for argv in (["leaderboard", "--results", str(res)], ["leaderboard", "--results", str(res), "--suite", "mini"]):
        code, err = _invoke(capsys, argv)
        assert code == 0 and "Traceback" not in err, err


def test_readme_troubleshooting_points_to_the_full_table():
    """The README's Troubleshooting section is short and links docs/troubleshooting.md, which holds the table of
    every fault message (quoted from the tests that produce them)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Troubleshooting\n") + 1:]
    nxt = re.search(r"^## ", section[3:], flags=re.M)
    section = section if nxt is None else section[: nxt.start() + 3]
    assert "(docs/troubleshooting.md)" in section and len(section.splitlines()) < 15
    doc = (REPO / "docs" / "troubleshooting.md").read_text()
    assert "| Fault | What you see | What to do |" in doc and doc.count("\n| ") > 40



def test_library_logs_after_main_go_to_the_current_stderr(monkeypatch):
    """main() run earlier in the same process (a test, a notebook) must not leave the package's log handler bound to
    a stderr that has since been closed: the next library log line would print "--- Logging error ---" and a
    traceback instead of the message."""
    import io
    import logging

    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    assert main(["list", "recipes"]) == 0
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    logging.getLogger("prosmin_bench.test").info("after main")
    assert "after main" in second.getvalue() and "Logging error" not in second.getvalue()
