"""ImageNet-O (Hendrycks et al., "Natural Adversarial Examples", CVPR 2021): the OOD set of the ImageNet-O task.

Official layout: ``<data_root>/imagenet-o/<wnid>/*.JPEG``, 2,000 images in 200 wnid folders (the 200 ImageNet-1k
classes of ``_refdata/imagenet_o_wnids.txt``; every folder must be there). The images are OOD for an ImageNet-1k
classifier; their folder labels are kept (index into the 200 wnids) but the OOD task never uses them.
"""

from __future__ import annotations

from pathlib import Path

from .base import DatasetSpec, ImageDataset, register_dataset, require_root
from .folder import list_image_folder, read_lines, reference_file

IMAGENET_O_SOURCE = (
    "https://github.com/hendrycks/natural-adv-examples (download "
    "https://people.eecs.berkeley.edu/~hendrycks/imagenet-o.tar and extract it into the data root)"
)
IMAGENET_O_LAYOUT = "<data-root>/imagenet-o/<wnid>/*.JPEG (200 wnid folders, 2,000 images)"


def imagenet_o_wnids() -> list[str]:
    """The 200 ImageNet-1k wnids of ImageNet-O (hendrycks/natural-adv-examples ``imagenet_o_wnids``)."""
    return read_lines(reference_file("imagenet_o_wnids.txt"))


def load_imagenet_o(split: str, data_root: Path | None) -> ImageDataset:
    root = require_root("imagenet_o", data_root, "imagenet-o", IMAGENET_O_LAYOUT, IMAGENET_O_SOURCE)
    return list_image_folder(root, imagenet_o_wnids(), name="imagenet_o:test")


register_dataset(DatasetSpec(
    name="imagenet_o", version="1", splits=("test",), loader=load_imagenet_o, scale="imagenet", num_classes=200,
    source=IMAGENET_O_SOURCE, layout=IMAGENET_O_LAYOUT,
    description="ImageNet-O: 2,000 natural adversarial OOD images for ImageNet-1k classifiers",
))
