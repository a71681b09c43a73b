"""ImageNet-1k from a local folder: ``<data_root>/imagenet/{train,val}/<wnid>/*.JPEG``.

Labels follow the 1,000 wnids in index order (``_refdata/imagenet_wnids.txt``), so every subset and every
derived set (ImageNet-O's 200 classes, ImageNet-C) shares one label space. The val folder must be in the
per-class layout (e.g. after the usual ``valprep.sh``).
"""

from __future__ import annotations

from pathlib import Path

from .base import DatasetSpec, ImageDataset, register_dataset, require_root
from .folder import imagenet_wnids, list_image_folder

IMAGENET_SOURCE = "https://image-net.org/download (ILSVRC-2012 train and val; val sorted into wnid folders)"
IMAGENET_LAYOUT = "<data-root>/imagenet/{train,val}/<wnid>/*.JPEG (1,000 wnid folders)"


def load_imagenet(split: str, data_root: Path | None) -> ImageDataset:
    root = require_root("imagenet", data_root, f"imagenet/{split}", IMAGENET_LAYOUT, IMAGENET_SOURCE)
    # Tiny test layouts hold a few classes; real runs hold all 1,000. Labels always follow the wnid index.
    return list_image_folder(root, imagenet_wnids(), allow_missing_classes=True, name=f"imagenet:{split}")


register_dataset(DatasetSpec(
    name="imagenet", version="1", splits=("train", "val"), loader=load_imagenet, scale="imagenet",
    num_classes=1000, source=IMAGENET_SOURCE, layout=IMAGENET_LAYOUT, description="ImageNet-1k (ILSVRC-2012)",
))
