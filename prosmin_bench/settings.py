"""The run settings an evaluation reads besides the protocol: where it runs and how it batches and stores.

``EvalSettings`` is the one place their defaults live (``runner.RunOptions`` takes its defaults from here); a task
reads them as ``ctx.settings``. None of them is a seed, and only ``precision`` and ``feature_dtype`` change the
numbers (they enter feature cache keys and ``ResultRecord.run_config``); ``knn_backend`` enters ``run_config`` too
(the two backends find the same neighbours up to float rounding and exact ties), not the feature cache keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ProsminBenchError

#: ``precision`` -> the autocast dtype of forward passes (None: plain float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``feature_dtype`` -> the dtype features are stored in.
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
#: ``knn_backend``: the exact k-NN search (``tasks/knn_search.py``; "faiss": ``tasks/knn_faiss.py``, optional).
KNN_BACKENDS = ("torch", "faiss")
#: The settings with a fixed set of values, and those values (checked by :func:`check_choices`).
CHOICES = {"precision": PRECISIONS, "feature_dtype": STORE_DTYPES, "knn_backend": KNN_BACKENDS}


def check_choices(obj: object, choices: dict = CHOICES) -> None:
    """Refuse a setting of ``obj`` outside its ``choices``, and ``knn_backend = "faiss"`` where faiss is missing
    (before any work, not as an error record per k-NN task)."""
    for name, allowed in choices.items():
        if getattr(obj, name) not in allowed:
            raise ProsminBenchError(f"Expected `{name}` to be one of {list(allowed)}, but got {getattr(obj, name)!r}")
    if getattr(obj, "knn_backend", None) == "faiss":
        from .tasks.knn_faiss import import_faiss

        import_faiss()


@dataclass(frozen=True)
class EvalSettings:
    """What a task may know about the run it is part of (``TaskContext.settings``)."""

    device: torch.device = torch.device("cpu")  # resolved by the runner ("auto" picks CUDA when present)
    data_root: Path | None = None  # folder of the ImageNet-scale data; the mini data ships inside packages
    batch_size: int = 256  # images per forward pass: DINO's eval_knn.py / eval_linear.py per-GPU batch
    num_workers: int = 0  # data-loader processes; 0 loads in this process (portable, enough for the mini data)
    max_memory: int = 1 << 30  # bytes for k-NN blocks and linear_aug's feature memo: 1 GiB fits any GPU and a laptop
    precision: str = "fp32"  # autocast of the forward passes: exact float32 numbers unless asked otherwise
    feature_dtype: str = "float32"  # stored features: float32 keeps every digit the backbone gave
    knn_backend: str = "torch"  # exact k-NN search: torch needs nothing more; faiss is an optional dependency

    def __post_init__(self) -> None:
        check_choices(self)

    @property
    def autocast(self) -> torch.dtype | None:
        """The autocast dtype of ``precision`` (None for fp32)."""
        return PRECISIONS[self.precision]
