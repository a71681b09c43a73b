"""The one table of metric facts, and the one place that reads a recorded metric name.

A recorded name is ``[qualifier_]base[_variant]``:

* ``base``: a name declared in :data:`TABLE`: by a metric module (``top1``, ``ece``, ``auroc``, ``mce``,
  ``effective_rank``) or by :data:`TASK_VALUES` (values the task protocols record: ``lr``, ``sigma_mean``);
* ``qualifier``: what it was computed on or scored by (``clean_error``, ``energy_auroc``, ``mu_effective_rank``);
  it keeps the base's facts, and ``sigma_``, ``dispersion_``, ``mu_`` and ``proj_`` put it in a group;
* ``variant``: which instance (``top1_k20``: k = 20; ``error_fog_s3``: corruption and severity; ``dims_99``).

A name resolves to the whole name when declared; else, after its variant words (``k20``, ``s3``, ``99``, ``ts``,
corruption names) are set aside, to the longest declared tail (qualifier + base), then the longest declared head
(base + an unknown variant). A name that resolves to nothing gets the defaults of :class:`MetricInfo`: higher is
better, shown as recorded (most scores in the suite are accuracies or areas). Declare a new lower-is-better metric
or a new rate beside its function, or in :data:`TASK_VALUES` for a protocol value.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from prosmin_bench.metrics import calibration, classification, collapse, ood, robustness, temperature, uncertainty
from prosmin_bench.metrics._checks import MetricArgumentError
from prosmin_bench.metrics.info import FRACTION, PREDICTIVE, PROJECTOR, MetricInfo, Qualifier
from prosmin_bench.metrics.robustness import CORRUPTIONS

#: What the task protocols record besides the metric functions' values (tasks/linear.py, lowshot, semisup,
#: collapse): the hyperparameters they chose and the counts they used carry no better direction.
TASK_VALUES: dict[str, MetricInfo] = {
    "lr": MetricInfo(score=False),
    "lambda": MetricInfo(score=False),
    "n_labelled": MetricInfo(score=False),
    "best_epoch": MetricInfo(score=False),
    "sigma_mean": MetricInfo(score=False, group=PREDICTIVE, description="the mean predictive sigma"),
    "sigma_err_spearman": MetricInfo(
        group=PREDICTIVE,
        description="Spearman rank correlation between a test image's mean predictive sigma and the probe's error "
                    "on it (its NLL); > 0: sigma grows with the error"),
    "sigma_misclf_auroc": MetricInfo(
        unit=FRACTION, group=PREDICTIVE,
        description="AUROC of the mean sigma for telling the probe's misclassified test images from its correct "
                    "ones (50 = no signal)"),
}

#: Every declared base name -> its facts.
TABLE: dict[str, MetricInfo] = {
    **classification.METRIC_INFO,
    **calibration.METRIC_INFO,
    **ood.METRIC_INFO,
    **robustness.METRIC_INFO,
    **collapse.METRIC_INFO,
    **uncertainty.METRIC_INFO,
    **temperature.METRIC_INFO,
    **TASK_VALUES,
}

#: Leading words that put a metric in a group, with what the metrics so named are.
QUALIFIERS: dict[str, Qualifier] = {
    "sigma": Qualifier(PREDICTIVE, "OOD detection scored by the mean predictive sigma (higher = less confident)"),
    "dispersion": Qualifier(PREDICTIVE, "OOD detection scored by the expected pairwise distance between r samples "
                                        "mu + sigma * eps (r and the distance are in the protocol)"),
    "mu": Qualifier(PREDICTIVE, "the collapse metrics on the predictive mean"),
    "proj": Qualifier(PROJECTOR, "the collapse metrics on the projector outputs [N, K]"),
}

#: A variant word: k of k-NN (``k20``), severity (``s3``), a percentage (``99``, ``99.9``), temperature-scaled.
_VARIANT_WORD = re.compile(r"k\d+|s\d+|\d+(?:\.\d+)?|ts")
_CORRUPTION_WORDS = tuple(sorted((tuple(c.split("_")) for c in CORRUPTIONS), key=len, reverse=True))


@dataclass(frozen=True)
class MetricName:
    """A recorded metric name split into its parts (see the module docstring); ``base`` is "" when undeclared."""

    name: str
    qualifier: str
    base: str
    variant: str
    corruption: str  # the ImageNet-C corruption the variant names ("fog"), or ""

    @property
    def first_word(self) -> str:
        """The name up to its first underscore: what names of one family share (``energy_auroc``, ``top1_k20``)."""
        return self.name.split("_", 1)[0]


def _check(metric_name: object) -> str:
    if not isinstance(metric_name, str) or not metric_name:
        raise MetricArgumentError(f"Expected `metric_name` to be a non-empty string, but got {metric_name!r}")
    return metric_name.lower()


def parse_metric_name(metric_name: str) -> MetricName:
    """Split a recorded name into qualifier, base and variant.

    >>> p = parse_metric_name("error_gaussian_noise_s3"); p.qualifier, p.base, p.variant, p.corruption
    ('', 'error', 'gaussian_noise_s3', 'gaussian_noise')
    >>> p = parse_metric_name("mu_dims_99"); p.qualifier, p.base, p.variant
    ('mu', 'dims', '99')
    >>> parse_metric_name("some_new_score").base
    ''
    """
    name = _check(metric_name)
    words = name.split("_")
    if name in TABLE:
        return MetricName(name, "", name, "", "")
    end, corruption = len(words), ""
    while end > 1:
        if _VARIANT_WORD.fullmatch(words[end - 1]):
            end -= 1
            continue
        hit = next((c for c in _CORRUPTION_WORDS if end - len(c) >= 1 and tuple(words[end - len(c):end]) == c), None)
        if hit is None:
            break
        corruption, end = "_".join(hit), end - len(hit)
    core = words[:end]
    start, stop = 0, 0
    for i in range(len(core)):  # the whole core, then shorter tails: qualifier + base
        if "_".join(core[i:]) in TABLE:
            start, stop = i, len(core)
            break
    else:
        for j in range(len(core) - 1, 0, -1):  # shorter heads: base + a variant not recognised above
            if "_".join(core[:j]) in TABLE:
                start, stop = 0, j
                break
    if stop == 0:
        return MetricName(name, "", "", "", corruption)
    return MetricName(name, "_".join(words[:start]), "_".join(words[start:stop]), "_".join(words[stop:]),
                      corruption)


def metric_info(metric_name: str) -> MetricInfo:
    """The facts of a recorded metric name (its base's facts, its qualifier's group; defaults when undeclared).

    >>> metric_info("clean_error")
    MetricInfo(higher_is_better=False, unit='fraction', group='', score=True, description='')
    >>> info = metric_info("mu_effective_rank"); info.higher_is_better, info.unit, info.group
    (True, 'raw', 'predictive')
    >>> metric_info("sigma_auroc").description
    '`sigma_*`: OOD detection scored by the mean predictive sigma (higher = less confident)'
    """
    parsed = parse_metric_name(metric_name)
    info = TABLE.get(parsed.base, MetricInfo())
    if info.description:  # only whole names carry their own description
        info = dataclasses.replace(info, description=f"`{parsed.base}`: {info.description}")
    lead = parsed.first_word if parsed.qualifier or not parsed.base else ""
    qualifier = QUALIFIERS.get(lead)
    if qualifier is not None and not info.group:
        info = dataclasses.replace(info, group=qualifier.group, description=f"`{lead}_*`: {qualifier.description}")
    return info


def higher_is_better(metric_name: str) -> bool:
    """True when a larger value of ``metric_name`` is better; undeclared names default to True.

    >>> higher_is_better("top1"), higher_is_better("aupr_out"), higher_is_better("effective_rank")
    (True, True, True)
    >>> higher_is_better("dims_99"), higher_is_better("top1_error")
    (True, False)
    >>> higher_is_better("ece"), higher_is_better("fpr95"), higher_is_better("clean_error"), higher_is_better("mce")
    (False, False, False, False)
    >>> higher_is_better("spearman_uncertainty_error")
    True
    """
    return metric_info(metric_name).higher_is_better
