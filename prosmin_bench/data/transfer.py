"""Transfer-learning targets (DINO / iBOT transfer protocol): CIFAR-10, CIFAR-100, Flowers-102, iNaturalist 2018.

Each set is looked for, in order:

1. a local class-per-folder copy ``<data_root>/transfer/<name>/{train,test}/<class>/<image>`` (class order = sorted
   folder names, torchvision ImageFolder's convention);
2. its Hugging Face hub id, through ``datasets`` (downloaded on first use when online, then read from the HF cache;
   offline only the cache is used).

Splits follow the papers: CIFAR train (50k) / test (10k); Flowers-102 train+val (2,040) / test (6,149), the split of
DeiT / DINO transfer; iNat-2018 train (437,513) / the official val set (24,426) as test. iNat-2018 has no HF copy:
sort its images into class folders (``train/<category_id>/`` and ``test/<category_id>/`` from ``train2018.json`` /
``val2018.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .base import DatasetSpec, ImageDataset, register_dataset
from .folder import list_image_folder

TRANSFER_DIR = "transfer"


@dataclass(frozen=True)
class TransferSource:
    """Where one transfer set comes from. ``hf_splits`` maps our split to an HF split expression."""

    name: str
    num_classes: int
    description: str
    homepage: str
    hf_id: str | None = None
    hf_splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))
    image_column: str = "image"
    label_column: str = "label"
    how_to: str = ""

    def hf_split(self, split: str) -> str:
        return dict(self.hf_splits)[split]

    def local_root(self, data_root: Path | None, split: str) -> Path | None:
        return Path(data_root) / TRANSFER_DIR / self.name / split if data_root is not None else None

    @property
    def layout(self) -> str:
        return f"<data-root>/{TRANSFER_DIR}/{self.name}/{{train,test}}/<class>/<images>"

    @property
    def source(self) -> str:
        hf = f"HF hub id {self.hf_id!r}" if self.hf_id else "no HF copy"
        return f"{self.homepage}; {hf}" + (f"; {self.how_to}" if self.how_to else "")


TRANSFER_SOURCES: dict[str, TransferSource] = {
    s.name: s
    for s in (
        TransferSource(
            "cifar10", 10, "CIFAR-10 (50k train / 10k test, 32 px)", "https://www.cs.toronto.edu/~kriz/cifar.html",
            hf_id="uoft-cs/cifar10", image_column="img", label_column="label",
        ),
        TransferSource(
            "cifar100", 100, "CIFAR-100 (50k train / 10k test, 100 fine labels)",
            "https://www.cs.toronto.edu/~kriz/cifar.html",
            hf_id="uoft-cs/cifar100", image_column="img", label_column="fine_label",
        ),
        TransferSource(
            "flowers102", 102, "Oxford Flowers-102 (train+val 2,040 / test 6,149)",
            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
            # dpdl-benchmark/oxford_flowers102 keeps the official 1,020 / 1,020 / 6,149 split (column names
            # image / label as in TFDS; the loader names the columns it finds if they differ).
            hf_id="dpdl-benchmark/oxford_flowers102", hf_splits=(("train", "train+validation"), ("test", "test")),
        ),
        TransferSource(
            "inat18", 8142, "iNaturalist 2018 (437,513 train / 24,426 val used as test)",
            "https://github.com/visipedia/inat_comp/tree/master/2018",
            how_to="download train_val2018.tar.gz and sort images into <category_id> folders from train2018.json "
                   "(train) and val2018.json (test)",
        ),
    )
}


def load_transfer(name: str, split: str, data_root: Path | None) -> ImageDataset:
    """The ``split`` of transfer set ``name``: a local class-folder copy, else its HF hub id."""
    src = TRANSFER_SOURCES[name]
    local = src.local_root(data_root, split)
    if local is not None and local.is_dir():
        return list_image_folder(local, name=f"{name}:{split}")
    looked = str(local) if local is not None else "no --data-root given"
    if src.hf_id is None:
        raise DataError(
            f"Dataset {name!r} split {split!r} not found: looked for {looked} (expected {src.layout}); there is no "
            f"HF copy. Get it from {src.homepage}: {src.how_to}"
        )
    from .hf import load_hf

    try:
        return load_hf(src.hf_id, src.hf_split(split), src.image_column, src.label_column, None)
    except DataError as exc:
        raise DataError(
            f"Dataset {name!r} split {split!r}: no local folder {looked} (expected {src.layout}); {exc}"
        ) from None


def _loader(name: str):
    def load(split: str, data_root: Path | None) -> ImageDataset:
        return load_transfer(name, split, data_root)

    load.__module__ = __name__
    return load


for _src in TRANSFER_SOURCES.values():
    register_dataset(DatasetSpec(
        name=_src.name, version="1", splits=("train", "test"), loader=_loader(_src.name), scale="imagenet",
        num_classes=_src.num_classes, source=_src.source, layout=_src.layout, description=_src.description,
    ))
