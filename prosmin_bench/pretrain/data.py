"""Pretraining data: this process's batches of multi-crop views, resumable at any step.

Both sources shuffle with ``DistributedSampler`` (seeded, ``set_epoch`` every epoch, ``drop_last``), so the
union of the processes' batches at a step is the same set of images for any world size that divides the
global batch. A resumed run skips the batches of the epoch that were already consumed.

- ``digits``: the bundled digits train split held on the compute device; views made by
  :class:`~prosmin_bench.pretrain.augment.TensorMultiCrop` (or PIL for ``crops.backend="pil"``).
- ``imagenet``: ``<data_root>/imagenet/train/<wnid>/*.JPEG`` decoded and augmented by DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import config as suite_config
from .. import distributed
from ..data.bundled import load_digits_split
from ..data.folder import imagenet_wnids, list_image_folder
from ..errors import DataError
from .augment import PILMultiCrop, TensorMultiCrop, build_augmentation
from .config import ConfigError, PretrainConfig
from .methods.base import MultiCropBatch
from .rng import SampleRNG

log = logging.getLogger(__name__)


class _Indexed(torch.utils.data.Dataset):
    """Wrap an image dataset so items are ``(views, dataset index)``."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        views, _label = self.dataset[i]
        return views, i


class PretrainData:
    """``batches(epoch, start)`` yields this process's :class:`MultiCropBatch` es of ``epoch`` from step
    ``start`` of that epoch; ``steps_per_epoch`` is the same on every process."""

    def __init__(self, cfg: PretrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        world = distributed.world_size()
        gb = cfg.optim.batch_size
        if gb % world:
            raise ConfigError(f"optim.batch_size={gb} is not divisible by the {world} processes; pick a multiple")
        self.local_batch = gb // world
        self.augment = build_augmentation(cfg.crops, cfg.data.mean, cfg.data.std)
        self.images: torch.Tensor | None = None
        self.dataset = self._load()
        self.sampler = distributed.distributed_sampler(self.dataset, seed=cfg.run.seed, shuffle=True, drop_last=True)
        self.steps_per_epoch = self.sampler.num_samples // self.local_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"optim.batch_size={gb} exceeds the {len(self.dataset)} training images; use a smaller batch"
            )

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def _load(self) -> torch.utils.data.Dataset:
        d = self.cfg.data
        if d.dataset == "digits":
            ds = load_digits_split("train")  # pretraining never sees the test split
            if isinstance(self.augment, TensorMultiCrop):
                arr = np.ascontiguousarray(ds.images.transpose(0, 3, 1, 2))
                self.images = torch.from_numpy(arr).to(self.device, torch.float32).div_(255.0)
                return ds
            return _Indexed(ds.with_transform(self.augment))
        if d.dataset == "imagenet":
            root = suite_config.data_root(d.data_root)
            if root is None:
                raise DataError(
                    "Pretraining on ImageNet needs a data root: pass --data-root DIR (or --set data.data_root=DIR, "
                    "or set PROSMIN_BENCH_DATA) with DIR/imagenet/train/<wnid>/*.JPEG"
                )
            if not isinstance(self.augment, PILMultiCrop):
                raise ConfigError("data.dataset='imagenet' needs crops.backend='pil'")
            ds = list_image_folder(Path(root) / "imagenet" / "train", imagenet_wnids(), name="ImageNet train")
            return _Indexed(ds.with_transform(self.augment))
        raise ConfigError(f"Expected data.dataset 'digits' or 'imagenet', but got {d.dataset!r}")

    def epoch_indices(self, epoch: int) -> list[int]:
        self.sampler.set_epoch(epoch)
        return list(iter(self.sampler))

    def batches(self, epoch: int, start: int = 0) -> Iterator[MultiCropBatch]:
        idx = self.epoch_indices(epoch)
        b = self.local_batch
        idx = idx[start * b : self.steps_per_epoch * b]
        seed = self.cfg.run.seed
        if self.images is not None:
            for s in range(0, len(idx), b):
                ind = torch.tensor(idx[s : s + b], dtype=torch.long)
                rng = SampleRNG(seed, epoch, ind)
                g, l = self.augment(self.images[ind.to(self.device)], rng)
                yield MultiCropBatch(g, l, ind, rng)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=b, sampler=idx, drop_last=True, num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(seed * 100003 + epoch * 1009 + start),
        )
        n_glob = self.cfg.crops.global_crops
        for views, ind in loader:
            views = [v.to(self.device, non_blocking=True) for v in views]
            yield MultiCropBatch(views[:n_glob], views[n_glob:], ind, SampleRNG(seed, epoch, ind))
