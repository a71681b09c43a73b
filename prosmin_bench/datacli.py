"""``prosmin-bench data check`` and ``prosmin-bench data make-imagenet-c``.

``check_data(data_root)`` lists, for every registered task, each dataset (and split file) it needs: whether it is
present, where it was looked for, the expected layout and where it comes from. It only looks at folders (no image
is decoded, no download starts), so it is quick even on a full ImageNet. ``check`` and ``make_imagenet_c`` are the
CLI shells: they turn the parsed arguments into typed options and make one library call.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config
from .data import DATASETS, parse_ref
from .data.corruptions import SEVERITIES, digits_c_base, digits_c_cache_path
from .data.folder import imagenet_wnids, reference_file
from .data.imagenet_o import imagenet_o_wnids
from .data.transfer import TRANSFER_SOURCES
from .errors import DataError, ProsminBenchError
from .metrics import CORRUPTIONS

log = logging.getLogger(__name__)

PRESENT, PARTIAL, MISSING = "present", "partial", "MISSING"
BUNDLED, GENERATED, ON_FIRST_USE, HF_CACHED, HF_DOWNLOAD = (
    "bundled", "generated", "made on first use", "in HF cache", "HF download on first use")


@dataclass(frozen=True)
class Probe:
    """What is known about one dataset reference without reading its images."""

    status: str
    where: str
    detail: str = ""


@dataclass(frozen=True)
class Need:
    """One dataset (or split file) one task needs."""

    task: str
    role: str
    ref: str
    probe: Probe
    layout: str
    source: str

    @property
    def ok(self) -> bool:
        return self.probe.status != MISSING


def _count_dirs(root: Path, names: list[str]) -> int:
    try:
        present = {e.name for e in os.scandir(root) if e.is_dir()}
    except OSError:
        return 0
    return sum(1 for n in names if n in present)


def _probe_class_folder(root: Path | None, expected: list[str] | None, what: str) -> Probe:
    if root is None:
        return Probe(MISSING, "no --data-root given", "pass --data-root DIR or set PROSMIN_BENCH_DATA")
    if not root.is_dir():
        return Probe(MISSING, str(root), "folder does not exist")
    if expected is None:
        n = sum(1 for e in os.scandir(root) if e.is_dir())
        return Probe(PRESENT if n else MISSING, str(root), f"{n} class folders")
    n = _count_dirs(root, expected)
    status = PRESENT if n == len(expected) else PARTIAL if n else MISSING
    return Probe(status, str(root), f"{n} of {len(expected)} {what} folders")


def _hf_cached(hf_id: str) -> bool:
    """Whether the HF hub cache or the ``datasets`` cache holds ``hf_id`` (folder check, no network)."""
    try:
        from datasets import config as ds_config
        from huggingface_hub import constants
    except ImportError:
        return False
    owner_name = hf_id.split("/")
    hub = Path(constants.HF_HUB_CACHE) / "--".join(["datasets", *owner_name])
    processed = Path(ds_config.HF_DATASETS_CACHE) / "___".join(owner_name)
    return hub.is_dir() or processed.is_dir()


def probe_ref(ref: str, data_root: Path | None) -> Probe:
    """Presence of a registered ``name:split`` under ``data_root``, from folder listings only."""
    name, split = parse_ref(ref)
    root = Path(data_root) if data_root is not None else None
    if name == "imagenet":
        return _probe_class_folder(root / "imagenet" / split if root else None, imagenet_wnids(), "wnid")
    if name == "imagenet_o":
        return _probe_class_folder(root / "imagenet-o" if root else None, imagenet_o_wnids(), "wnid")
    if name == "imagenet_c":
        c, _, s = split.partition("/")
        return _probe_class_folder(root / "imagenet-c" / c / s if root else None, None, "wnid")
    if name == "digits_c":
        c, _, s = split.partition("/")
        path = digits_c_cache_path(digits_c_base().fingerprint, c, int(s))
        return Probe(GENERATED if path.is_file() else ON_FIRST_USE, str(path.parent))
    if name in TRANSFER_SOURCES:
        src = TRANSFER_SOURCES[name]
        local = src.local_root(root, split)
        if local is not None and local.is_dir():
            return _probe_class_folder(local, None, "class")
        looked = str(local) if local is not None else "no --data-root given"
        if src.hf_id is None:
            return Probe(MISSING, looked, "no HF copy: needs the local folder")
        state = HF_CACHED if _hf_cached(src.hf_id) else HF_DOWNLOAD
        return Probe(state, f"{looked}; HF {src.hf_id!r} split {src.hf_split(split)!r}")
    spec = DATASETS.get(name)
    if spec.scale == "mini":
        return Probe(BUNDLED, "installed packages")
    try:  # a dataset registered elsewhere: loading it is the only check it offers
        spec.load(split, root)
    except DataError as exc:
        return Probe(MISSING, str(root) if root else "no --data-root given", str(exc).splitlines()[0][:160])
    return Probe(PRESENT, str(root))


def _probe_table(ref: Mapping[str, Any], data_root: Path | None) -> Probe:
    source = ref.get("source")
    if source == "imagefolder":
        root = Path(str(ref.get("root", "")))
        if not root.is_absolute():
            root = Path(data_root) / root if data_root is not None else root
        return _probe_class_folder(root, None, "class")
    if source == "hf":
        path = str(ref.get("path", ""))
        local = Path(data_root) / path if data_root is not None else Path(path)
        if local.exists():
            return Probe(PRESENT, str(local))
        return Probe(HF_CACHED if _hf_cached(path) else HF_DOWNLOAD, f"HF {path!r}")
    return Probe(MISSING, str(ref), f"unknown source {source!r}")


def _ref_text(ref: Any) -> str:
    return ref if isinstance(ref, str) else ",".join(f"{k}={v}" for k, v in sorted(dict(ref).items()))


def _layout_source(ref: Any) -> tuple[str, str]:
    if not isinstance(ref, str):
        return "generic source (see the card)", str(dict(ref).get("path") or dict(ref).get("root") or "")
    spec = DATASETS.get(parse_ref(ref)[0])
    return spec.layout or "(bundled)", spec.source


def _file_need(task: str, role: str, name: str, data_root: Path | None) -> Need:
    from .data.subsets import resolve_split_file

    try:
        path = resolve_split_file(name, data_root)
        shipped = path == reference_file(name)
        probe = Probe(BUNDLED if shipped else PRESENT, str(path))
    except DataError as exc:
        probe = Probe(MISSING, name, str(exc)[:160])
    return Need(task, role, name, probe, "one entry per line", "shipped in prosmin_bench/_refdata or a path")


def _merge(task: str, role: str, label: str, refs: list[str], data_root: Path | None) -> Need:
    """One row for a family of splits (ImageNet-C's 75 folders): present only if all are."""
    probes = [probe_ref(r, data_root) for r in refs]
    ok = [p for p in probes if p.status != MISSING]
    status = probes[0].status if len(ok) == len(probes) else PARTIAL if ok else MISSING
    name = parse_ref(refs[0])[0]
    where = os.path.commonpath([p.where for p in probes]) if all(os.sep in p.where for p in probes) else probes[0].where
    layout, source = _layout_source(refs[0])
    return Need(task, role, f"{name}:{label}", Probe(status, where, f"{len(ok)} of {len(probes)} splits"), layout,
                source)


def check_data(data_root: Path | None, tasks: list[str] | None = None) -> list[Need]:
    """Every dataset and split file each task (default: every registered task) needs, with its presence."""
    from .tasks import catalogue

    cat = catalogue()
    names = tasks if tasks is not None else cat.names()
    needs: list[Need] = []
    for name in names:
        spec = cat.get(name)
        for role, ref in spec.datasets.items():
            probe = probe_ref(ref, data_root) if isinstance(ref, str) else _probe_table(ref, data_root)
            layout, source = _layout_source(ref)
            needs.append(Need(name, role, _ref_text(ref), probe, layout, source))
        proto = spec.protocol
        if isinstance(proto.get("corrupted"), str) and proto["corrupted"] in DATASETS:
            ds = proto["corrupted"]
            needs.append(_merge(name, "corrupted", "<15 corruptions>/<1-5>",
                                [f"{ds}:{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES], data_root))
        for field in ("subset_file", "knn_subset_file", "id_classes"):
            if proto.get(field):
                needs.append(_file_need(name, field, str(proto[field]), data_root))
    return needs


def render_check(needs: list[Need], data_root: Path | None) -> str:
    """Two tables: what each task needs and its state; then how to get each missing dataset."""
    from tabulate import tabulate

    rows = [[n.task, n.role, n.ref, n.probe.status, n.probe.detail, n.probe.where] for n in needs]
    root = str(data_root) if data_root is not None else "(none: pass --data-root DIR or set PROSMIN_BENCH_DATA)"
    out = [f"data root: {root}",
           tabulate(rows, ["task", "role", "dataset", "status", "detail", "looked at"], tablefmt="github")]
    missing: dict[str, Need] = {}
    for n in needs:
        if n.probe.status in (MISSING, PARTIAL):
            missing.setdefault(n.ref.split(":")[0], n)
    if missing:
        out.append("\nMissing or incomplete datasets: expected layout and where to get them\n")
        out.append(tabulate([[k, v.layout, v.source] for k, v in sorted(missing.items())],
                            ["dataset", "expected layout", "source"], tablefmt="github"))
    ready = sorted({n.task for n in needs} - {n.task for n in needs if not n.ok})
    blocked = sorted({n.task for n in needs if not n.ok})
    out.append(f"\n{len(ready)} task(s) have their data; {len(blocked)} miss some: {', '.join(blocked) or '-'}")
    return "\n".join(out) + "\n"


def check(a: Any) -> int:
    """CLI: ``prosmin-bench data check [--data-root DIR] [--task NAME ...]``. Exits 1 when a checked task misses
    data (scripts can gate a run on it), 0 when every one has its data."""
    data_root = config.data_root(a.data_root)
    needs = check_data(data_root, list(a.task) or None)
    sys.stdout.write(render_check(needs, data_root))
    return 0 if all(n.ok for n in needs) else 1


def make_imagenet_c(a: Any) -> int:
    """CLI: ``prosmin-bench data make-imagenet-c --data-root DIR [--workers N] [--corruption C] [--severity S]``."""
    from .data.imagenet_c import ImageNetCBuild, build_imagenet_c

    data_root = config.data_root(a.data_root)
    if data_root is None:
        raise ProsminBenchError("make-imagenet-c needs --data-root DIR holding imagenet/val/<wnid>/*.JPEG")
    kwargs: dict[str, Any] = {"data_root": data_root}
    if a.corruption:
        kwargs["corruptions"] = tuple(a.corruption)
    if a.severity:
        kwargs["severities"] = tuple(a.severity)
    if a.workers is not None:
        kwargs["workers"] = a.workers
    report = build_imagenet_c(ImageNetCBuild(**kwargs))
    sys.stdout.write(
        f"{report.out_root}: wrote {report.written} images, {report.skipped} were already there "
        f"({report.source_images} val images)\n"
    )
    return 0
