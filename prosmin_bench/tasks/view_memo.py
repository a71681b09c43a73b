"""Memo of the frozen backbone's features of augmented views, for the ``linear_aug`` kind (``tasks/linear_aug.py``).

Every image's view is drawn from its own seed (run seed, epoch, index: ``linear_aug.item_seed``), so the final pass
over all of train computes, for every fit-part image and epoch, the very view the selection pass computed, and a
grid-extension pass repeats the selection pass's batches exactly. :class:`ViewMemo` keeps the features of the views
this process computed, by (epoch, image index), and later passes of the same run read them instead of loading,
augmenting and running the backbone again. Only where the features come from changes: the batches, their order and
the head updates are those of a run without the memo, and the features are the same numbers wherever the backbone's
output for an image does not depend on the rest of its batch (row-wise ViT arithmetic; checked on CPU by
``tests/test_tasks_linear_aug.py``; GPU kernels picked by batch shape may round differently in the last bits).

Memory rule: epoch ``e``'s table (this process's rows of the pass that opens it, [shard, D] in the dtype the backbone
returned, plus an int64 index -> row map over the dataset) is kept only while the memo's tables fit in ``budget``
bytes (the run's ``max_memory``), so the first ``budget // table bytes`` epochs are memoised and later ones are
recomputed, as they are with ``budget = 0``. Mini scale: 4 epochs x 1295 fit images x 384 floats, 8 MB of the 1 GiB
default (``--max-memory 1M`` keeps none); ImageNet scale (100 epochs x 1.15M fit images x 1536 floats, 700 GB): an epoch
table is 7 GB in one process (none kept at 1 GiB) and 0.9 GB per process of 8 (the first epoch kept).

Under torchrun each process keeps its own memo: the rows of its own ``DistributedSampler`` shard, which a later pass
(a new shard) finds about 1 / world of. The memo decides only which backbone forwards run, never the number of batches
or the heads' all-reduces, so every rank still enters the same collectives.
"""

from __future__ import annotations

import math
import uuid
from typing import Any, Callable, Iterator

import numpy as np
import torch

RULE = "epoch tables of this process's backbone features kept while they fit max_memory, first epochs first"


class _Table:
    """One epoch's memoised rows: ``rows`` [capacity, D] and ``slot`` [n_index] (-1: not memoised)."""

    def __init__(self, capacity: int, n_index: int, like: torch.Tensor) -> None:
        self.rows = torch.empty((capacity, like.shape[1]), dtype=like.dtype, device=like.device)
        self.slot = np.full(n_index, -1, dtype=np.int64)
        self.count = 0

    @staticmethod
    def nbytes(capacity: int, n_index: int, like: torch.Tensor) -> int:
        return capacity * like.shape[1] * like.element_size() + n_index * 8


class ViewMemo:
    """Backbone features of augmented views by (epoch, image index) within ``budget`` bytes (module docstring)."""

    def __init__(self, budget: int) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"Expected `budget` to be a number of bytes >= 0, but got {budget!r}")
        self.budget = int(budget)
        self.token = uuid.uuid4().hex  # names this run's memo in the messages to torchrun followers
        self.signature: tuple[Any, ...] | None = None
        self.used = 0
        self.computed = 0  # views the backbone ran on, in every pass
        self.reused = 0  # views read from the memo
        self._tables: dict[int, _Table] = {}
        self.epochs: list[int] = []  # the epochs whose tables were opened

    def bind(self, signature: tuple[Any, ...]) -> None:
        """Tie the memo to one run's views (seed, layer, precision, augmentation, backbone, dataset)."""
        if self.signature is None:
            self.signature = signature
        elif signature != self.signature:
            raise ValueError(f"Expected the views of {self.signature}, but got a pass over {signature}")

    def known(self, epoch: int, index: np.ndarray) -> np.ndarray:
        """Which of images ``index`` have their ``epoch`` view memoised (bool [n])."""
        table = self._tables.get(epoch)
        return np.zeros(len(index), dtype=bool) if table is None else table.slot[index] >= 0

    def get(self, epoch: int, index: np.ndarray) -> torch.Tensor:
        table = self._tables[epoch]
        return table.rows[torch.as_tensor(table.slot[index], device=table.rows.device)]

    def put(self, epoch: int, index: np.ndarray, features: torch.Tensor, *, capacity: int, n_index: int) -> None:
        """Keep ``features`` [n, D] of images ``index`` in ``epoch`` if its table is or can be (budget) open."""
        table = self._tables.get(epoch)
        if table is None:
            nbytes = _Table.nbytes(capacity, n_index, features)
            if self.used + nbytes > self.budget:
                return
            table = self._tables[epoch] = _Table(capacity, n_index, features)
            self.used += nbytes
            self.epochs.append(epoch)
        new = table.slot[index] < 0
        n = min(int(new.sum()), len(table.rows) - table.count)  # a padded shard's repeats are already in
        if n <= 0 or features.dtype != table.rows.dtype:
            return
        rows = np.flatnonzero(new)[:n]
        table.slot[index[rows]] = np.arange(table.count, table.count + n)
        table.rows[table.count:table.count + n] = features[torch.as_tensor(rows, device=features.device)]
        table.count += n

    def release(self) -> None:
        self._tables.clear()

    def as_extras(self) -> dict[str, Any]:
        return {"rule": RULE, "budget_bytes": self.budget, "bytes": self.used, "epochs": sorted(self.epochs),
                "views_computed": self.computed, "views_reused": self.reused}


class MarkedBatches(torch.utils.data.Sampler):
    """``sampler``'s positions in consecutive batches of ``batch_size`` (the last one short: a ``DataLoader``'s own
    batching), each paired with whether ``memo`` holds that image's view in :attr:`epoch` (then it is not loaded)."""

    def __init__(self, sampler: Any, batch_size: int, indices: np.ndarray, memo: ViewMemo | None) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.indices = indices
        self.memo = memo
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        positions = np.fromiter(iter(self.sampler), dtype=np.int64)
        for start in range(0, len(positions), self.batch_size):
            pos = positions[start:start + self.batch_size]
            # marked just before the batch loads, after the earlier batches were stored (workers prefetch: later)
            known = np.zeros(len(pos), bool) if self.memo is None else self.memo.known(self.epoch, self.indices[pos])
            yield list(zip(pos.tolist(), known.tolist()))


def collate_marked(rows: list[tuple[torch.Tensor | None, int, int]]) -> tuple[torch.Tensor, ...]:
    """(images of the views to compute [m, ...], labels [n], image indices [n], known [n]) of a batch."""
    images = [r[0] for r in rows if r[0] is not None]
    return (torch.stack(images) if images else torch.empty(0), torch.tensor([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows]), torch.tensor([r[0] is None for r in rows]))


def view_features(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, index: torch.Tensor,
                  known: torch.Tensor, memo: ViewMemo | None, epoch: int, *, keep: bool, capacity: int,
                  n_index: int) -> torch.Tensor:
    """Backbone features [n, D] of a batch: memoised rows where ``known``, ``forward(images)`` for the rest (kept in
    ``memo`` when ``keep``)."""
    index_np, known_np = index.numpy(), known.numpy()
    n_known = int(known_np.sum())
    fresh = forward(images) if n_known < len(index_np) else None
    if memo is None:
        return fresh
    memo.computed += len(index_np) - n_known
    memo.reused += n_known
    if fresh is not None and keep:
        memo.put(epoch, index_np[~known_np], fresh, capacity=capacity, n_index=n_index)
    if n_known == 0:
        return fresh
    cached = memo.get(epoch, index_np[known_np])
    if fresh is None:
        return cached
    out = torch.empty((len(index_np), cached.shape[1]), dtype=fresh.dtype, device=fresh.device)
    mask = known.to(fresh.device)
    out[mask] = cached.to(fresh.dtype)
    out[~mask] = fresh
    return out
