"""One door per layer (issue 16): evaluation never imports training, and modules import in one direction only.

- Evaluating a checkpoint of the pretraining module (its backbone, its ProSMin predictive head and its projector,
  through the runner and a task) loads no ``prosmin_bench.pretrain`` module: the models rebuild the heads from
  the checkpoint alone.
- The runner never trains: a mini model whose checkpoint is missing is an error record that says how to make it;
  only ``prosmin_bench.evaluate`` (the suite) pretrains it first.
- No module of the evaluation side imports the training code, not even inside a function, and no two modules
  import each other (directly or through others).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from prosmin_bench.results import ErrorRecord, read_record
from prosmin_bench.runner import RunOptions, evaluate
from test_faults import cards_dir  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "prosmin_bench"

#: Modules that evaluate models; none of them may import ``prosmin_bench.pretrain``.
EVALUATION_SIDE = ("prosmin_bench.models", "prosmin_bench.tasks", "prosmin_bench.runner", "prosmin_bench.features",
                   "prosmin_bench.evaluation", "prosmin_bench.distributed", "prosmin_bench.devices")

_EVALUATE_IN_A_FRESH_PROCESS = """
import json, sys
from prosmin_bench import cards
from prosmin_bench.models import get_model
from prosmin_bench.runner import RunOptions, evaluate
cards.add_card_dir(sys.argv[2])
model = get_model("prosmin_micro", weights=sys.argv[1])
(rec,) = evaluate(["prosmin_micro"], ["fault_knn"], options=RunOptions(
    seeds=(0,), device="cpu", results_dir=sys.argv[3], weights=sys.argv[1]))
print(json.dumps({"predictive": model.has_predictive, "projector": model.has_projector,
                  "record": rec.record_type, "message": getattr(rec, "message", ""),
                  "training_modules": sorted(m for m in sys.modules if m.startswith("prosmin_bench.pretrain"))}))
"""


def test_evaluating_a_pretraining_checkpoint_loads_no_training_code(cards_dir, tmp_path):  # noqa: F811
    from prosmin_bench.pretrain import pretrain

    ckpt = pretrain("prosmin_micro", out_dir=tmp_path / "ckpt", device="cpu",
                    overrides={"run.max_steps": 1, "optim.batch_size": 16, "method.out_dim": 32,
                               "method.head_hidden_dim": 32, "method.head_bottleneck_dim": 16,
                               "method.predictor_hidden_dim": 32})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _EVALUATE_IN_A_FRESH_PROCESS, str(ckpt), str(cards_dir),
                           str(tmp_path / "results")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["predictive"] and out["projector"]  # the heads came back from the checkpoint
    assert out["record"] == "result", out["message"]
    assert out["training_modules"] == []


def test_the_runner_never_trains_a_missing_model(cards_dir, tmp_path):  # noqa: F811
    from prosmin_bench import cards, config

    cards.add_card_dir(cards_dir)
    (rec,) = evaluate(["prosmin_micro"], ["fault_knn"], options=RunOptions(  # shipped=False: no checkpoint at all
        seeds=(0,), device="cpu", results_dir=tmp_path / "res", shipped=False))
    assert isinstance(rec, ErrorRecord)
    assert "Make it with `prosmin-bench pretrain --recipe prosmin_micro`" in rec.message and "\n" not in rec.message
    assert isinstance(read_record(tmp_path / "res" / "prosmin_micro" / "fault_knn.json"), ErrorRecord)
    assert not (config.checkpoints_dir() / "prosmin_micro").exists()  # nothing pretrained, nothing started


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import in ``path`` (relative ones resolved; ``from
    a import b`` counts as ``a.b`` when that is a module of the package)."""
    name, is_package = _module_name(path), path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, node.col_offset == 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() or \
                    (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base
                out.append((target, node.lineno, node.col_offset == 0))
    return out


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_evaluation_modules_do_not_import_the_training_code():
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {target}"
        for name, path in _package_modules().items() if name.startswith(EVALUATION_SIDE)
        for target, line, _ in _imports(path) if target.startswith("prosmin_bench.pretrain")
    ]
    assert offending == []


def test_no_two_modules_import_each_other():
    """Module-level imports form no cycle (a module's own package is loaded before it, so that edge is left out)."""
    modules = _package_modules()
    graph = {name: {t for t, _, top in _imports(path) if top and t in modules and not name.startswith(t + ".")}
             for name, path in modules.items()}
    cycles, done, stack = [], set(), []

    def visit(name: str) -> None:
        if name in stack:
            cycles.append(stack[stack.index(name):] + [name])
            return
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph[name]):
            visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert cycles == []


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_one_atomic_write_helper_and_one_reliability_bins():
    """Every file the package writes goes through prosmin_bench/atomic.py (temp file beside it, fsync, rename, temp
    removed on every error); ECE bins are computed in one place, so a plot cannot disagree with its record."""
    renames, bins = [], []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("replace", "rename", "mkstemp", "NamedTemporaryFile"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("os", "tempfile"):
                    renames.append(f"{path.relative_to(REPO)}:{node.lineno} {owner.id}.{node.attr}")
            if isinstance(node, ast.FunctionDef) and node.name == "reliability_bins":
                bins.append(str(path.relative_to(REPO)))
    assert all(r.startswith("prosmin_bench/atomic.py:") for r in renames), renames
    assert bins == ["prosmin_bench/metrics/calibration.py"]
