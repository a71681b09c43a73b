"""prosmin-bench: benchmark self-supervised vision backbones (ProSMin, DINO, iBOT, MoCo-v3) on the ProSMin
paper's tasks, with versioned results and generated leaderboards.

Public API::

    from prosmin_bench import Results, evaluate, get_model, get_task, list_models, list_tasks, load_results
    from prosmin_bench.metrics import expected_calibration_error, ood_metrics, mean_corruption_error
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Results", "evaluate", "get_model", "get_task", "list_models", "list_tasks", "load_results", "__version__"]


def __getattr__(name: str):
    """Load the API lazily, so ``from prosmin_bench.metrics import ...`` stays light (numpy, scipy only)."""
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'prosmin_bench' has no attribute {name!r}")
