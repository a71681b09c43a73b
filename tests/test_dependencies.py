"""The declared dependencies match the imports: every runtime dependency is imported by runtime code (none is there
for the tests alone), every third-party module the package imports is declared, and every module the tests and
benchmarks import is a runtime dependency or in the extra that installs it for them."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _dist(requirement: str) -> str:
    """'torch>=2.5' -> 'torch'; names compared in PEP 503 normal form (lower case, runs of -_. as -)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(folder: Path) -> dict[str, set[str]]:
    """Top-level module name -> the files (relative) that import it, over every .py file under ``folder``;
    relative imports and imports of the project itself are left out."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "prosmin_bench" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _module_dists() -> dict[str, set[str]]:
    return {m: {_dist(d) for d in ds} for m, ds in packages_distributions().items()}


RUNTIME = {_dist(r) for r in PYPROJECT["dependencies"]}
EXTRAS = {name: {_dist(r) for r in reqs} for name, reqs in PYPROJECT["optional-dependencies"].items()}


def test_every_runtime_dependency_is_imported_by_runtime_code() -> None:
    owners = _module_dists()
    imported = {d for m in _imports(REPO / "prosmin_bench") for d in owners.get(m, ())}
    unused = sorted(RUNTIME - imported)
    assert not unused, f"runtime dependencies no runtime code imports (move them to an extra or drop them): {unused}"


def test_every_module_the_package_imports_is_declared() -> None:
    owners = _module_dists()
    optional = set().union(*(EXTRAS[e] for e in ("cluster", "faiss")))
    undeclared = {m: sorted(files)[:2] for m, files in _imports(REPO / "prosmin_bench").items()
                  if not owners.get(m, set()) & (RUNTIME | optional)}
    assert not undeclared, f"imported by the package but not declared in pyproject.toml: {undeclared}"


@pytest.mark.parametrize("folder,extra", [("tests", "test"), ("benchmarks", "bench")])
def test_test_and_benchmark_imports_are_installed_by_their_extra(folder: str, extra: str) -> None:
    owners = _module_dists()
    local = {p.stem for p in (REPO / folder).glob("*.py")}  # helper modules of the folder itself
    declared = RUNTIME | EXTRAS[extra] | {"pytest"}
    missing = {m: sorted(files)[:2] for m, files in _imports(REPO / folder).items()
               if m not in local and not owners.get(m, set()) & declared}
    assert not missing, f"{folder}/ imports modules that neither the runtime nor the [{extra}] extra installs: {missing}"


def test_netcal_is_a_test_reference_not_a_runtime_dependency() -> None:
    """netcal (with tensorboard, pyro and gpytorch) stays out of the core install: the suite fits temperatures and
    bins ECE itself, and the tests compare both against netcal."""
    assert "netcal" not in RUNTIME and "netcal" in EXTRAS["test"]
    assert "netcal" in _imports(REPO / "tests") and "netcal" not in _imports(REPO / "prosmin_bench")
