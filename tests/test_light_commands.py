"""Light commands (issue 20 goal 3): ``prosmin-bench --help`` and ``list tasks`` import no torch.

Task cards are read by ``prosmin_bench.tasks.spec``; the shipped kinds are known there by name (``KIND_MODULES``)
and their modules are imported when a task of that kind is checked or built. The tests below check the table
against the real ``@register_kind`` registrations, so it cannot drift.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prosmin_bench import cards
from prosmin_bench.errors import CardError, DuplicateNameError
from prosmin_bench.tasks import TASK_KINDS, Task, TaskOutput, build_task, get_task_spec, register_kind
from prosmin_bench.tasks.spec import KIND_MODULES, task_index

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "prosmin_bench" / "tasks"


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this process imported torch long ago)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


_MAIN_THEN_MODULES = """
    import json, sys
    import prosmin_bench.cli
    try:
        code = prosmin_bench.cli.main(json.loads(sys.argv[1]))
    except SystemExit as exc:  # --help exits through argparse
        code = exc.code
    sys.stdout.flush()
    print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)}))
"""


def _main(argv: list[str]) -> tuple[dict, str, str]:
    proc = _fresh(_MAIN_THEN_MODULES, json.dumps(argv))
    *out, last = proc.stdout.strip().splitlines()
    return json.loads(last), "\n".join(out), proc.stderr


def test_list_tasks_imports_no_torch_and_lists_every_shipped_card() -> None:
    status, out, err = _main(["list", "tasks"])
    assert status == {"code": 0, "heavy": []}, err[-2000:]
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[2:]}
    assert set(rows) == {p.stem for p in (REPO / "tasks").glob("*.toml")}
    assert rows["digits_knn"] == ["knn", "2", "mini"]  # kind, version, suite, as tasks/digits_knn.toml says


def test_help_imports_no_torch() -> None:
    status, out, err = _main(["--help"])
    assert status == {"code": 0, "heavy": []}, err[-2000:]
    assert "list" in out and "run" in out


def test_list_tasks_reports_an_unknown_kind_as_before(tmp_path: Path) -> None:
    card = tmp_path / "bad_kind.toml"
    card.write_text('name = "bad_kind"\nkind = "knnn"\nversion = 1\nsuite = "mini"\nmain_score = "top1"\n'
                    '[datasets]\ntrain = "digits:train"\ntest = "digits:test"\n')
    status, _, err = _main(["--cards", str(tmp_path), "list", "tasks"])
    assert status["code"] == 2  # (the CLI's error path imports runner.one_line, and torch with it)
    known = sorted(KIND_MODULES)
    assert f"field 'kind' names unknown protocol kind 'knnn'; known: {known}" in err
    assert str(card) in err


def _registered_in_source() -> dict[str, str]:
    """kind -> module name, from every ``@register_kind("...")`` in the package's task modules (read, not run)."""
    found = {}
    for path in sorted(TASKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_kind" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    assert arg.value not in found, f"{arg.value} registered twice"
                    found[arg.value] = path.stem
    return found


def test_the_static_kind_table_matches_the_real_registrations() -> None:
    assert _registered_in_source() == KIND_MODULES
    for kind, module in KIND_MODULES.items():
        cls = TASK_KINDS.get(kind)  # imports the module when it was not yet
        assert cls.kind == kind and cls.__module__ == f"prosmin_bench.tasks.{module}"
        assert TASK_KINDS.origin(kind) == f"prosmin_bench.tasks.{module}.{cls.__qualname__}"


def test_a_kind_module_is_imported_only_when_a_task_of_it_is_built() -> None:
    proc = _fresh("""
        import json, sys
        from prosmin_bench.tasks import TASK_KINDS
        from prosmin_bench.tasks.spec import task_index
        names, kinds = task_index().names(), TASK_KINDS.names()
        before = sorted(m for m in sys.modules if m.startswith("prosmin_bench.tasks."))
        from prosmin_bench.tasks import build_task, get_task_spec
        task = build_task(get_task_spec("digits_knn"))
        print(json.dumps({"before": before, "torch": "torch" in sys.modules, "kinds": kinds, "task": task.kind,
                          "n": len(names)}))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] == ["prosmin_bench.tasks.spec"]
    assert out["kinds"] == sorted(KIND_MODULES) and out["task"] == "knn" and out["torch"]
    assert out["n"] == len(list((REPO / "tasks").glob("*.toml")))


def test_a_shipped_kind_name_taken_elsewhere_is_a_duplicate_before_its_module_is_imported() -> None:
    proc = _fresh("""
        import sys
        from prosmin_bench.errors import DuplicateNameError
        from prosmin_bench.tasks import Task, register_kind
        assert "prosmin_bench.tasks.knn" not in sys.modules
        class Mine(Task):
            pass
        try:
            register_kind("knn")(Mine)
        except DuplicateNameError as exc:
            print(exc)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "task kind 'knn' is already registered (first in prosmin_bench.tasks.knn.KNNTask)" in proc.stdout


@pytest.fixture
def custom_kind():
    """A user-defined kind registered with ``register_kind`` (removed afterwards: the registry is global)."""

    @register_kind("echo_test")
    class EchoTask(Task):
        roles = ("data",)

        def metric_names(self) -> list[str]:
            return ["echo"]

        def run(self, ctx) -> TaskOutput:
            return TaskOutput({"echo": 1.0})

    yield EchoTask
    TASK_KINDS.remove("echo_test")


def _card(folder: Path, name: str, main_score: str = "echo") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(f'name = "{name}"\nkind = "echo_test"\nversion = 1\nsuite = "mini"\nmain_score = "{main_score}"\n'
                    '[datasets]\ndata = "digits:test"\n')
    return path


def test_a_user_card_of_a_custom_registered_kind_works(tmp_path: Path, custom_kind) -> None:
    _card(tmp_path, "my_echo")
    cards.add_card_dir(tmp_path)
    assert "echo_test" in TASK_KINDS and "echo_test" in TASK_KINDS.names()
    assert task_index().get("my_echo").kind == "echo_test"
    spec = get_task_spec("my_echo")
    assert spec.refs["data"].name == "digits" and spec.refs["data"].split == "test"
    assert isinstance(build_task(spec), custom_kind)


def test_a_custom_kind_still_checks_main_score(tmp_path: Path, custom_kind) -> None:
    path = _card(tmp_path, "my_echo", main_score="top1")
    cards.add_card_dir(tmp_path)
    with pytest.raises(CardError) as err:
        get_task_spec("my_echo")
    assert str(path) in str(err.value)
    assert "field 'main_score' is 'top1', which kind 'echo_test' does not report; it reports ['echo']" in str(err.value)


def test_a_duplicate_custom_kind_is_an_error(custom_kind) -> None:
    with pytest.raises(DuplicateNameError, match="echo_test"):
        register_kind("echo_test")(type("Other", (Task,), {}))


def test_bare_command_prints_help_and_version_is_light(tmp_path):
    """Issue 22: `prosmin-bench` alone prints the help (it used to start the whole suite) and `--version` says the
    installed version; neither imports torch or writes anything."""
    from importlib import metadata

    out = _fresh("""
        import sys
        from prosmin_bench.cli import main
        code = main([])
        print("EXIT", code, "torch" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: prosmin-bench") and "EXIT 0 False" in out.stdout
    ver = subprocess.run([sys.executable, "-m", "prosmin_bench", "--version"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert ver.returncode == 0 and ver.stdout.strip() == f"prosmin-bench {metadata.version('prosmin-bench')}"
    assert list(tmp_path.iterdir()) == []


def test_model_and_task_take_comma_lists(capsys):
    """Issue 22: `--model a,b` as `mteb run -m` / `lm_eval --tasks`; repeated flags still add up."""
    from prosmin_bench.cli_args import build_parser

    a = build_parser().parse_args(["run", "--model", "dino_micro,ibot_micro", "--model", "pixels",
                                   "--task", "digits_knn, digits_linear"])
    assert a.model == ["dino_micro", "ibot_micro", "pixels"] and a.task == ["digits_knn", "digits_linear"]
    assert build_parser().parse_args(["data", "check", "--task", "digits_c,digits_o"]).task == ["digits_c", "digits_o"]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "--model", ","])
    assert exc.value.code == 2 and "comma-separated list of names, but got ','" in capsys.readouterr().err


@pytest.mark.parametrize("argv, quiet, debug", [
    (["run", "-q"], True, False), (["-q", "run"], True, False), (["run"], False, False),
    (["leaderboard", "--debug"], False, True), (["--debug", "leaderboard"], False, True),
    (["data", "check", "--quiet"], True, False)])
def test_quiet_and_debug_are_accepted_after_the_subcommand_too(argv, quiet, debug):
    from prosmin_bench.cli_args import build_parser

    a = build_parser().parse_args(argv)
    assert (a.quiet, a.debug) == (quiet, debug)


def test_every_option_of_every_command_has_help():
    """Issue 22: `--help` of every subcommand explains each option (pretrain, leaderboard and make-imagenet-c had
    none)."""
    import argparse

    from prosmin_bench.cli_args import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield path, action

    missing = [(" ".join(p), a.dest) for p, a in walk(build_parser(), ()) if not a.help]
    assert missing == []
