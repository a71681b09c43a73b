"""Leaderboards: markdown pages (and PNG plots) rendered from the result files alone, never edited by hand.

``render(results_dir, suite)`` reads ``<results>/<model>/<task>.json`` and returns one suite's page:

* a summary table measured by this suite: one row per model, the main score of every task (mean ± sample std
  over seeds; the best learned model of a ranked task in bold, ``≈`` where a paired bootstrap cannot tell a model
  from it, :mod:`.significance`), ``task@version`` headers, learned models sorted by mean rank over the ranked tasks,
  then the reference rows (``model_info.reference``: never ranked);
* numbers reported in papers (``prosmin_bench.reported``: model cards and docs/protocols.md's tables) in their own
  tables, next to the measured ones and never mixed into them;
* a section per task family (knn, linear, lowshot, semisup, ood, corruption, transfer, collapse, then any other
  kind) with every metric of every task, the main score's 95% interval (``ci95``; none for older records), the
  models not compared for significance and why, and links to the plots (``prosmin_bench.plots``). Metrics only
  some models can have (a ``group`` in ``prosmin_bench.metrics.metric_info``: scores from ProSMin's predictive
  distribution, collapse of the projector outputs) get their own table under the task's table, with rows for the
  models that report them and a line saying what they are;
* stale results (older task versions: never aggregated with the newest), failed runs (error records) and
  unreadable files (listed and ignored).

A model is marked ``‡`` when it was pretrained on data the task evaluates on (not comparable to the other rows)
and ``†`` when it was pretrained on another split of an evaluation dataset, typically its train split (the
standard self-supervised protocol, so a note only); see :func:`board.pretraining_overlap`.

Two marks and two notes come from the task cards, not the records. ``¶`` after a task (section heading, measured
summary header, the line under the reported summary): its card lists ``deviations``, the ways its protocol differs
from the paper's behind the reported numbers, and its section lists them (field: here, paper, why). A task whose card
says ``variant_of = X`` shows in its section each model's main-score difference from X (the difference of the means
over seeds, for the models with records of both, and their mean). Why the catalogue and not the records: the
reported numbers already come from code and cards (:mod:`prosmin_bench.reported`), and a task shown with reported
numbers only has no record to carry anything; a deviation is a statement about the card's protocol against a paper,
not a measurement, so editing it must not make records stale or be frozen into old ones (a card's deviations describe
its current version; the section says so when the records are of another). Rows of a model that is a variant of
another (``model_info.variant_of``, e.g. ``prosmin_target_micro``: the ``prosmin_micro`` checkpoint through its
target network) come from the records, as the references do: they are listed beside that model and never ranked.
The papers' "mCE" is read as mean corruption error (a note under every table showing a reported ``mce``).
Everything is sorted, so the page stays a deterministic function of the result files and the cards.

The work is split by job: :mod:`.board` (records -> each task's newest version, families, ranks), :mod:`.format`
(numbers, units, mean ± std, intervals, marks), :mod:`.significance` (paired tests against each task's best),
:mod:`.summary` (the measured summary, the mini page's opening), :mod:`.sections` (the task and reported tables, the
lists of what is not tabulated) and :mod:`.pages` (a suite's page, and writing pages and figures).

>>> render("/nonexistent/results").splitlines()[1:3]
['# prosmin-bench leaderboard', '']
"""

from .pages import SUITES, check_destination, render, summary, write, write_suite_pages

__all__ = ["SUITES", "check_destination", "render", "summary", "write", "write_suite_pages"]
