"""Which way is better for each metric name: drives leaderboard sorting (torchmetrics' ``higher_is_better``).

Rules are checked in order: exact names, then lower-is-better suffixes, then prefixes. A name no rule covers is
treated as higher-is-better (most scores in the suite are accuracies or areas); add a rule here for a new
lower-is-better metric.
"""

from __future__ import annotations

from prosmin_bench.metrics._checks import MetricArgumentError

#: Names whose direction the affix rules below would get wrong (a correlation whose name ends in "_error").
_EXACT: dict[str, bool] = {
    "spearman_uncertainty_error": True,
    "misclassification_auroc": True,
}

#: Suffixes of lower-is-better names, e.g. "top1_error", "clean_error", "digits_c_mce".
_LOWER_SUFFIXES: tuple[str, ...] = ("_error", "_nll", "_ece", "_mce", "_fpr95")

#: Prefix -> higher is better. Checked after the suffixes, so "top1_error" is lower-is-better.
_PREFIXES: tuple[tuple[str, bool], ...] = (
    ("top1", True),
    ("top5", True),
    ("acc", True),
    ("auroc", True),
    ("aupr", True),
    ("effective_rank", True),
    ("per_dim_std", True),
    ("spearman", True),
    ("nll", False),
    ("ece", False),
    ("fpr", False),
    ("mce", False),
    ("relative_mce", False),
    ("ce_", False),  # per-corruption CE, e.g. "ce_fog"
    ("relative_ce_", False),
    ("error", False),
    # dims_99: more principal components needed for 99% of the variance = a less collapsed embedding, the same
    # direction as effective_rank.
    ("dims_", True),
)


def higher_is_better(metric_name: str) -> bool:
    """True when a larger value of ``metric_name`` is better; unknown names default to True.

    >>> higher_is_better("top1"), higher_is_better("aupr_out"), higher_is_better("effective_rank")
    (True, True, True)
    >>> higher_is_better("dims_99"), higher_is_better("top1_error")
    (True, False)
    >>> higher_is_better("ece"), higher_is_better("fpr95"), higher_is_better("clean_error"), higher_is_better("mce")
    (False, False, False, False)
    >>> higher_is_better("spearman_uncertainty_error")
    True
    """
    if not isinstance(metric_name, str) or not metric_name:
        raise MetricArgumentError(f"Expected `metric_name` to be a non-empty string, but got {metric_name!r}")
    name = metric_name.lower()
    if name in _EXACT:
        return _EXACT[name]
    if name.endswith(_LOWER_SUFFIXES):
        return False
    for prefix, direction in _PREFIXES:
        if name.startswith(prefix):
            return direction
    return True
