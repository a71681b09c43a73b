"""Run the docstring examples of every module in prosmin_bench.metrics, and require one per public function."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import prosmin_bench.metrics as metrics

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(metrics.__path__, prefix="prosmin_bench.metrics.")
)


@pytest.mark.parametrize("module_name", ["prosmin_bench.metrics", *MODULES])
def test_doctests_pass(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {module_name}"


def test_doctests_exist() -> None:
    attempted = sum(doctest.testmod(importlib.import_module(m), report=False).attempted for m in MODULES)
    assert attempted > 0


@pytest.mark.parametrize("name", [n for n in metrics.__all__ if inspect.isfunction(getattr(metrics, n))])
def test_every_public_function_has_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(metrics, name)) or ""
    assert ">>>" in doc, f"prosmin_bench.metrics.{name} has no runnable docstring example"
