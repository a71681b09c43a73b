"""What pages need to know about a metric: which way is better, the unit it is recorded in, its table group.

Each metric module declares ``METRIC_INFO`` beside its functions: the record names the suite stores for them and
their facts (the way torchmetrics keeps ``higher_is_better`` on the metric). :mod:`prosmin_bench.metrics.names`
gathers the declarations into one table and resolves a recorded name (``clean_error``, ``top1_k20``) to its facts.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A rate recorded as a fraction in [0, 1] (accuracy, ECE, AUROC, AUPR, FPR, error); pages show it in percent.
FRACTION = "fraction"
#: Recorded in percent already (mCE: 100 x mean CE, Hendrycks & Dietterich 2019).
PERCENT = "percent"
#: Natural-log likelihoods (NLL).
NATS = "nats"
#: Anything else, shown as recorded (ranks, standard deviations, CE ratios, chosen hyperparameters).
RAW = "raw"
UNITS = (FRACTION, PERCENT, NATS, RAW)

#: Metrics from a model's own predictive distribution (ProSMin's online predictor): only such models report them.
PREDICTIVE = "predictive"
#: Metrics on the projection head's outputs: only checkpoints of the pretraining module report them.
PROJECTOR = "projector"
#: Groups in page order; "" is the task's own table.
GROUPS = (PREDICTIVE, PROJECTOR)


@dataclass(frozen=True)
class MetricInfo:
    """The facts of one metric.

    >>> MetricInfo(higher_is_better=False, unit=FRACTION)
    MetricInfo(higher_is_better=False, unit='fraction', group='', score=True, description='')
    """

    higher_is_better: bool = True
    unit: str = RAW  # one of UNITS
    group: str = ""  # "" or one of GROUPS: reported by some models only, shown in a table of its own
    score: bool = True  # False: what the protocol chose or counted (lr, n_labelled), no better direction
    description: str = ""  # what it is, for pages that list a group's metrics; "" when the name says it

    def __post_init__(self) -> None:
        # Declarations are code, so a wrong one is a bug to catch at import, not a user error.
        if self.unit not in UNITS:
            raise ValueError(f"Expected `unit` to be one of {UNITS}, but got {self.unit!r}")
        if self.group and self.group not in GROUPS:
            raise ValueError(f"Expected `group` to be one of {GROUPS} or '', but got {self.group!r}")


@dataclass(frozen=True)
class Qualifier:
    """A leading word naming what a metric was computed on or scored by (``mu_effective_rank``: on the predictive
    mean), when that word puts the metric in a group."""

    group: str
    description: str  # what the qualified metrics are, e.g. "OOD detection scored by the mean predictive sigma"
