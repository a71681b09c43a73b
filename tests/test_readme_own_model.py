"""The README's "Evaluate your own model" section runs as written: its API snippet, its ``module:`` factory and
command, and its model card and command (each checked against the record files it writes)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch

from prosmin_bench import config
from prosmin_bench.cli import main
from prosmin_bench.models import build_architecture
from prosmin_bench.models.weights import sha256_file
from prosmin_bench.paths import record_path

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Evaluate your own model\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def of(lang: str) -> list[str]:
    return [code for lg, code in blocks() if lg == lang]


def run_command(line: str) -> int:
    argv = shlex.split(line.strip())
    assert argv[0] == "prosmin-bench"
    return main(["-q", *argv[1:]])


def test_the_section_has_the_three_routes():
    assert [lg for lg, _ in blocks()] == ["python", "python", "bash", "toml", "bash"]


def test_the_api_snippet_runs_and_prints_its_record(capsys):
    exec(compile(of("python")[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    rec = json.loads(record_path(config.default_results_dir(), "my_net", "digits_knn").read_text())
    assert rec["model"] == "my_net" and rec["model_info"]["module"] == "readme.MyNet"
    assert "ToTensor()" in rec["model_info"]["preprocess"]
    value = rec["per_seed"]["0"][rec["main_score"]]
    # pandas prints as few digits as the column needs (0.775, not 0.775000): compare the number, not the text
    found = re.search(rf"my_net\s+digits_knn\s+{rec['main_score']}\s+0\s+(\S+)", out)
    assert found and abs(float(found.group(1)) - value) < 5e-7, out


def test_the_module_factory_route_runs(tmp_path, monkeypatch, capsys):
    code = of("python")[1]
    assert code.startswith("# my_models.py")
    (tmp_path / "my_models.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_command(of("bash")[0]) == 0, capsys.readouterr().err
    rec = json.loads(record_path(config.default_results_dir(), "my_models.build", "digits_knn").read_text())
    assert rec["record_type"] == "result" and rec["model_info"]["arch"] == "module:torch.nn.modules.container.Sequential"


def test_the_model_card_route_runs_and_list_shows_its_origin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    toml = of("toml")[0]
    first, _, body = toml.partition("\n")
    card = tmp_path / first.removeprefix("# ").strip()
    card.parent.mkdir()
    card.write_text(body)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        torch.save(build_architecture("vit_micro").state_dict(), tmp_path / "my_vit.pth")
    assert run_command(of("bash")[1]) == 0, capsys.readouterr().err
    rec = json.loads(record_path(config.default_results_dir(), "my_vit", "digits_knn").read_text())
    assert rec["weights_sha256"] == sha256_file(tmp_path / "my_vit.pth")
    capsys.readouterr()
    assert main(["--cards", "my_cards", "list", "models"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("my_vit ")]
    assert str(card.resolve()) in row


CARDS_DOC = README.parent / "docs" / "cards.md"


def test_cards_doc_names_every_card_field_and_protocol_parameter_with_its_default():
    import dataclasses

    from prosmin_bench.models import zoo
    from prosmin_bench.tasks import base, catalogue

    doc = CARDS_DOC.read_text(encoding="utf-8")
    for field in zoo._MODEL_FIELDS | zoo._WEIGHTS_FIELDS | zoo._PREPROCESS_FIELDS | base._TASK_FIELDS:
        assert f"| `{field}` |" in doc, field
    catalogue()  # registers every kind
    for kind, cls in base.TASK_KINDS.items():
        assert f"**`{kind}`**" in doc, kind
        for f in dataclasses.fields(cls.Params):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = {True: "true", False: "false"}.get(default, default) if isinstance(default, bool) else default
            text = f'"{shown}"' if isinstance(shown, str) and not isinstance(default, bool) else shown
            if isinstance(default, (int, float, str)):
                assert f"`{f.name} = {text}`" in doc, (kind, f.name)
            else:
                assert f"`{f.name} = [" in doc, (kind, f.name)


def test_cards_doc_examples_are_valid_cards(tmp_path):
    from prosmin_bench import cards
    from prosmin_bench.models import get_model_spec
    from prosmin_bench.tasks import get_task_spec

    model_toml, task_toml = re.findall(r"```toml\n(.*?)```", CARDS_DOC.read_text(encoding="utf-8"), flags=re.S)
    (tmp_path / "my_vits16.toml").write_text(model_toml)
    (tmp_path / "my_knn.toml").write_text(task_toml)
    cards.add_card_dir(tmp_path)
    spec = get_model_spec("my_vits16")
    assert spec.weights.format == "dino_full" and spec.preprocess.resize == 256 and spec.method == "dino"
    task = get_task_spec("my_knn")
    assert task.kind == "knn" and task.protocol == {"ks": [10, 20]} and task.main_score == "top1_k20"
