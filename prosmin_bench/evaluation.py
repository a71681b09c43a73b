"""One (model, task) evaluation: the feature source a task reads through, and the task run over the seeds.

The runner decides what needs evaluating (and, under torchrun, keeps the ranks in step); :func:`run_one` runs one
task for one model into a ResultRecord. A task reaches the run only through its ``TaskContext``, whose features
come from :class:`FeatureSource`: datasets resolved once, every (dataset, layer, preprocessing) extracted once per
run through the content-keyed cache, and, under torchrun, every extraction announced to the other ranks first so
that each rank extracts its shard of it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .data import DatasetRef, resolve_dataset
from .data.labels import align_labels, describe
from .errors import ProsminBenchError, one_line
from .features import extract
from .record_samples import main_score_interval
from .results import ResultRecord, git_commit, utc_now, versions
from .settings import EvalSettings
from .threads import execution_info
from .tasks import TaskContext, TaskSpec, build_task


def _alone(message: Any) -> None:
    """The ``announce`` of a process that extracts by itself: there is no one to tell."""


class FeatureSource:
    """Per-model feature access for tasks: datasets resolved once, features from the content-keyed cache.

    Args:
        model: the Backbone (``with_preprocess`` gives its other preprocessing views).
        settings: the run's EvalSettings (device, batch size, workers, precision, feature dtype, data root).
        data_hash: how image files enter fingerprints and cache keys ("stat" or "content").
        recompute: recompute each cache entry once (``--overwrite``).
        announce: called with ``("features", ref, layer, preprocess)`` before each extraction; under torchrun,
            rank 0's tells the other ranks, which then call :meth:`features` with the same arguments.
    """

    def __init__(self, model: Any, settings: EvalSettings, *, data_hash: str = "stat", recompute: bool = False,
                 announce: Callable[[Any], None] = _alone) -> None:
        self.model = model
        self.settings = settings
        self.data_hash = data_hash
        self.recompute = recompute
        self.announce = announce
        self._datasets: dict[Any, Any] = {}  # dataset key, or (dataset key, training split key) once aligned
        self._features: dict[tuple[str, str, Any], Any] = {}
        self._views: dict[Any, Any] = {}  # preprocessing key -> the model seen through it
        self.images_per_second: list[float] = []
        # While a task runs: {dataset key: {"ref", "fingerprint"}} of every dataset it reads (ResultRecord.data).
        self.read: dict[str, dict[str, Any]] | None = None

    def data_identity(self) -> dict[str, Any]:
        """``ResultRecord.data`` for the datasets read since ``self.read`` was reset."""
        return {"hash": self.data_hash, "sets": dict(sorted((self.read or {}).items()))}

    def data_changed(self, data: Any) -> str | None:
        """Why the datasets a record names (its ``data``) are not, now, the data it was computed on; None when each
        still has its recorded fingerprint. Records that name none (made before data identities were recorded) or
        were fingerprinted by another ``--data-hash`` are not vouched for."""
        sets = data.get("sets") if isinstance(data, dict) else None
        if not isinstance(sets, dict) or not sets:
            return "it does not record the data it was computed on"
        if data.get("hash") != self.data_hash:
            return f"its data was fingerprinted with --data-hash {data.get('hash')}, not {self.data_hash}"
        for key, entry in sets.items():
            try:
                ref, fingerprint = DatasetRef.parse(entry["ref"]), entry["fingerprint"]
                now = self.dataset(ref)
                same = ref.key == key and now.fingerprint_for(self.data_hash) == fingerprint
            except (ProsminBenchError, OSError) as exc:
                return f"its dataset {key} cannot be read now ({one_line(exc)})"
            except (KeyError, TypeError, ValueError, AttributeError):
                return f"its data identity for {key} is malformed"
            if not same:
                return f"dataset {key} has changed since it was computed"
        return None

    def dataset(self, ref: DatasetRef, labels_from: DatasetRef | None = None) -> Any:
        """The dataset ``ref``; with ``labels_from`` (a task's training split), labelled by class name in that
        split's class list (DataError naming a class it has images of and the training split has none)."""
        train = None if labels_from is None else self.dataset(labels_from)  # first: its faults are reported first
        key = ref.key
        if key not in self._datasets:
            self._datasets[key] = resolve_dataset(ref, self.settings.data_root)
        if self.read is not None and key not in self.read:
            self.read[key] = {"ref": ref.raw, "fingerprint": self._datasets[key].fingerprint_for(self.data_hash)}
        if train is None:
            return self._datasets[key]
        aligned = (key, labels_from.key)
        if aligned not in self._datasets:
            self._datasets[aligned] = align_labels(self._datasets[key], train,
                                                   name=describe(ref.raw, self._datasets[key]),
                                                   train_name=describe(labels_from.raw, train))
        return self._datasets[aligned]

    def view(self, preprocess: Any) -> Any:
        """The model under eval ``preprocess`` (None: its own), made once per run."""
        if preprocess is None or preprocess == self.model.spec.preprocess:
            return self.model
        key = preprocess.key()
        if key not in self._views:
            self._views[key] = self.model.with_preprocess(preprocess)
        return self._views[key]

    def features(self, ref: DatasetRef, layer: str, preprocess: Any = None,
                 labels_from: DatasetRef | None = None) -> Any:
        """Features of ``ref`` in ``layer`` under the model's preprocessing or ``preprocess``, extracted (or read
        from the cache) once per run, by every rank under torchrun; with ``recompute`` the cache entries are
        recomputed, once. ``labels_from``: as in :meth:`dataset`."""
        if labels_from is not None:
            aligned = self.dataset(ref, labels_from)  # checked before the extraction, which it does not change
            fs = self.features(ref, layer, preprocess)
            if aligned is self.dataset(ref):
                return fs
            # Extraction keeps the dataset's sample order, so the aligned labels pair up with the rows.
            return dataclasses.replace(fs, labels=aligned.labels)
        view = self.view(preprocess)
        dataset = self.dataset(ref)  # also when the features are memoised: the record names every dataset it read
        key = (ref.key, layer, None if view is self.model else view.spec.preprocess.key())
        if key not in self._features:
            self.announce(("features", ref, layer, None if view is self.model else view.spec.preprocess))
            s = self.settings
            fs = extract(
                view, dataset, dataset_id=key[0], layer=layer, batch_size=s.batch_size, device=s.device,
                precision=s.precision, dtype=s.feature_dtype, num_workers=s.num_workers, shard=True,
                data_hash=self.data_hash, recompute=self.recompute,
            )
            if fs.computed:
                self.images_per_second.append(float(fs.meta.get("images_per_second", 0.0)))
            self._features[key] = fs
        return self._features[key]


def labels_source(spec: TaskSpec) -> Callable[[DatasetRef], DatasetRef | None]:
    """``ref ->`` the split whose class list labels ``ref`` in task ``spec``: the training split for every split but
    the training split itself and the OOD set (whose images belong to no class); None in tasks without one."""
    train, ood = spec.refs.get("train"), spec.refs.get("ood")

    def of(ref: DatasetRef) -> DatasetRef | None:
        return None if train is None or ref == train or (ood is not None and ref == ood) else train

    return of


def merge_selections(per_seed: Sequence[Any]) -> dict[str, dict[str, list[Any]]]:
    """The record's ``extras["selection"]`` from each seed's ``{hparam: {"grid": [...], "chosen": v, "edge": bool}}``
    (None for a seed without one): ``{hparam: {"grid": sorted union, "chosen": [per seed], "edge": [per seed]}}``,
    None where a seed did not select that hyper-parameter."""
    names = sorted({h for sel in per_seed if isinstance(sel, dict) for h in sel})
    merged: dict[str, dict[str, list[Any]]] = {}
    for h in names:
        each = [sel.get(h) if isinstance(sel, dict) else None for sel in per_seed]
        grid = sorted({float(v) for e in each if isinstance(e, dict) for v in e.get("grid", [])})
        merged[h] = {"grid": grid, "chosen": [e.get("chosen") if isinstance(e, dict) else None for e in each],
                     "edge": [bool(e.get("edge")) if isinstance(e, dict) else None for e in each]}
    return merged


def run_one(spec: TaskSpec, source: FeatureSource, *, seeds: Sequence[int], run_config: dict[str, Any]) -> ResultRecord:
    """Task ``spec`` on ``source.model`` for every seed, as a ResultRecord (``run_config``: the run settings that
    change the numbers, ``ResultRecord.run_config``): the first seed's extras with every seed's hyper-parameter
    selection merged (:func:`merge_selections`), and the main score's pooled ``ci95`` and stored per-image values
    (``record_samples.main_score_interval``) when the task gives them for every seed."""
    model, settings = source.model, source.settings
    task = build_task(spec)
    per_seed: dict[str, dict[str, float]] = {}
    extras: dict[str, Any] = {}
    selections: list[Any] = []
    samples: list[Any] = []
    labels_from = labels_source(spec)
    unchecked = [ref for ref in spec.refs.values() if labels_from(ref) is not None]

    def checked_labels_from(ref: DatasetRef) -> DatasetRef | None:
        # At the task's first request for data (after its own card checks, before any image is read) every labelled
        # split is checked against the training split's classes, so a missing class costs no extraction.
        while unchecked:
            source.dataset(unchecked[0], labels_from(unchecked[0]))
            unchecked.pop(0)
        return labels_from(ref)

    def feature_fn(ref: DatasetRef, layer: str, preprocess: Any = None) -> Any:
        return source.features(ref, layer, preprocess, labels_from=checked_labels_from(ref))

    start = time.perf_counter()
    source.read = {}
    for seed in seeds:
        torch.manual_seed(seed)
        ctx = TaskContext(model=model, seed=seed, settings=settings, feature_fn=feature_fn,
                          dataset_fn=lambda ref: source.dataset(ref, checked_labels_from(ref)))
        out = task.run(ctx)
        per_seed[str(seed)] = {k: float(v) for k, v in out.metrics.items()}
        if not extras:
            extras = dict(out.extras)
        selections.append(out.extras.get("selection"))
        samples.append(out.samples)
    if any(selections):
        extras["selection"] = merge_selections(selections)
    ci95, stored = main_score_interval(spec.main_score, seeds, samples)
    wall = time.perf_counter() - start
    data, source.read = source.data_identity(), None
    ips = source.images_per_second
    mspec = model.spec
    return ResultRecord(
        model=mspec.name, task=spec.name, task_version=spec.version, task_kind=spec.kind, suite=spec.suite,
        main_score=spec.main_score, weights_sha256=model.weights_sha256, seeds=list(seeds), per_seed=per_seed,
        protocol=dict(vars(task.params)) if hasattr(task.params, "__dict__") else {}, run_config=run_config,
        datasets=spec.datasets, data=data, extras=extras, ranked=spec.ranked, ci95=ci95, samples=stored,
        model_info={"method": mspec.method, "arch": mspec.arch, "weights": mspec.weights.kind,
                    "recipe": mspec.weights.recipe, "pretrained_on": list(mspec.pretrained_on),
                    "weights_path": model.weights_path, "reference": bool(mspec.reference),
                    **({"network": model.network} if model.network else {}),
                    **({"variant_of": mspec.variant_of} if mspec.variant_of else {})},
        versions=versions(), git_commit=git_commit(), device=str(settings.device), wall_time_s=wall,
        execution=execution_info(),
        images_per_second=(sum(ips) / len(ips)) if ips else None, timestamp_utc=utc_now(),
    )
