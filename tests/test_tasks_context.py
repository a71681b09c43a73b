"""The task layer's one door (issue 16): dataset references parsed at card load, tasks that import neither models
nor features, and the Backbone members a task may use (its preprocessing view and its trainable copy)."""

from __future__ import annotations

import ast
import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch

from prosmin_bench.features import cache_key
from prosmin_bench.models import get_model
from test_faults import CARDS, assert_one_line_error, cards_dir, cli, no_forward  # noqa: F401  (fixtures)

TASKS_DIR = Path(__file__).resolve().parents[1] / "prosmin_bench" / "tasks"


@pytest.mark.parametrize(
    "old, new, text",
    [
        ('train = "digits:train"', 'train = "digits"',
         "field 'datasets.train': Expected a dataset reference 'name:split' (e.g. 'digits:train'), but got 'digits'"),
        ('train = "digits:train"', 'train = { source = "imagefolder", root = ["a", "b"] }',
         "field 'datasets.train': Expected text or numbers in a dataset source table, but field(s) ['root']"),
    ],
    ids=["no-split", "table-list"],
)
def test_a_malformed_dataset_reference_is_refused_when_the_card_loads(tmp_path, cards_dir, capsys, no_forward,
                                                                     old, new, text):
    path = cards_dir / "bad_ref.toml"
    path.write_text(textwrap.dedent(CARDS["fault_knn.toml"]).replace('"fault_knn"', '"bad_ref"').replace(old, new))
    res = tmp_path / "res"
    code, _, err = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "fault_knn",
                       "--results", str(res))
    assert_one_line_error(code, err, f"Card {str(path)!r}: {text}")
    assert not res.exists() and no_forward == []


def test_tasks_import_neither_models_nor_features():
    """Tasks reach a model only through ``TaskContext`` (its Backbone face and ``ctx.features``)."""
    found = []
    for path in sorted(TASKS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.lstrip(".").split(".")[0] in ("models", "features") and name.startswith(".."):
                    found.append(f"{path.name}:{node.lineno} {name}")
                if name.startswith(("prosmin_bench.models", "prosmin_bench.features")):
                    found.append(f"{path.name}:{node.lineno} {name}")
    assert found == []


def test_trainable_copy_is_a_trainable_twin_that_leaves_the_backbone_alone():
    model = get_model("random_micro")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = model.trainable_copy()
    assert twin.training and all(p.requires_grad for p in twin.parameters())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not {p.data_ptr() for p in twin.parameters()} & {p.data_ptr() for p in model.parameters()}
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(twin.eval().features(x, "cls_last4"), model.features(x, "cls_last4"))
    assert twin.layer_dim("cls") == model.layer_dim("cls") and twin.transform is not None
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_preprocess_view_shares_the_network_and_has_its_own_cache_key():
    model = get_model("random_micro")
    pre = dataclasses.replace(model.spec.preprocess, resize=36)
    view = model.with_preprocess(pre)
    assert view.spec.preprocess == pre and model.spec.preprocess.resize != 36
    assert view.net is model.net and view.weights_sha256 == model.weights_sha256 and view.network == model.network
    assert not view.training and not any(p.requires_grad for p in view.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(view.features(x), model.features(x))
    keys = {cache_key(m, "digits@1:test", "f", "cls", "fp32", "float32") for m in (model, view)}
    assert len(keys) == 2  # features under another preprocessing never meet the model's own
