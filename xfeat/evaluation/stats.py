"""Uncertainty of the metrics: bootstrap intervals, paired comparisons, DeLong's test.

:func:`bootstrap_ci` (percentile-bootstrap intervals of any metric of :mod:`xfeat.evaluation.metrics`),
:func:`paired_bootstrap` (two models scored on the same resamples), :func:`delong_test` (two
correlated ROC AUCs), :func:`format_p_value` (a p-value as text, never ``0``) and
:func:`format_interval` (a value with its interval, ``0.843 [0.81–0.87]``).  Results
are plain JSON-ready dicts; :mod:`xfeat.evaluation.metrics` re-exports the three tests.
"""

import logging
import math
import numbers
import time

import numpy as np
from scipy.stats import norm, rankdata

from xfeat.evaluation.core import (
    check_binary,
    check_inputs,
    check_labels,
    check_metric_names,
    check_scores,
    check_threshold,
    metric_arrays,
    predict_labels,
)

logger = logging.getLogger(__name__)

_MAX_CELLS = 4_000_000  # resample-weight entries held at once; bounds bootstrap memory
_P_FLOOR = 1e-16  # below this a normal-tail p-value says nothing more (double precision near 1)


def _check_bootstrap_args(n_boot, level):
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(level, numbers.Real) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be a number in (0, 1) such as 0.95, got {level!r}")


def _resample_weights(rng, n, n_resamples):
    """Per-sample counts (n_resamples, n) of bootstrap resamples drawn with replacement."""
    idx = rng.integers(0, n, size=(n_resamples, n))
    flat = (np.arange(n_resamples)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


def _bootstrap_replicates(y, models, names, n_boot, seed):
    """Replicates {name: (n_boot,)} for each (proba, pred) in models, on shared resamples."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = len(y)
    chunk = max(1, _MAX_CELLS // n)
    parts = [[] for _ in models]
    for done in range(0, n_boot, chunk):
        w = _resample_weights(rng, n, min(chunk, n_boot - done))
        for part, (proba, pred) in zip(parts, models):
            part.append(metric_arrays(w, y, proba, pred, names))
    logger.debug(
        "bootstrap: %d resamples of %d samples x %d model(s) in %.1f ms",
        n_boot,
        n,
        len(models),
        1e3 * (time.perf_counter() - start),
    )
    return [{name: np.concatenate([p[name] for p in part]) for name in names} for part in parts]


def _percentile_ci(values, level):
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [math.nan, math.nan]
    alpha = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [alpha, 100 - alpha])
    return [float(lo), float(hi)]


def bootstrap_ci(
    y_true,
    proba,
    *,
    threshold=0.5,
    metrics=("accuracy", "roc_auc", "sensitivity", "specificity"),
    n_boot=1000,
    level=0.95,
    seed=0,
):
    """Percentile-bootstrap confidence intervals, resampling samples with replacement.

    Resamples where a metric is undefined (e.g. AUC of a resample with one class) are
    dropped for that metric; an interval with no defined resample is ``[nan, nan]``.

    Returns
    -------
    dict
        ``{metric: [lo, hi]}`` for each name in ``metrics`` (any of :data:`METRIC_NAMES`).
    """
    y, p = check_inputs(y_true, proba)
    threshold = check_threshold(threshold, p.shape[1])
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    check_metric_names(metrics)
    _check_bootstrap_args(n_boot, level)
    (replicates,) = _bootstrap_replicates(y, [(p, predict_labels(p, threshold))], metrics, n_boot, seed)
    for name, values in replicates.items():
        dropped = int(np.isnan(values).sum())
        if dropped:
            logger.debug("%s undefined in %d of %d resamples; dropped", name, dropped, n_boot)
    return {name: _percentile_ci(values, level) for name, values in replicates.items()}


def paired_bootstrap(
    y_true,
    proba_a,
    proba_b,
    *,
    metric="accuracy",
    threshold_a=0.5,
    threshold_b=0.5,
    n_boot=2000,
    level=0.95,
    seed=0,
):
    """Compare two models on the same samples with a paired bootstrap.

    Both models are scored on the same resamples. ``p_value`` is two-sided: twice the
    fraction of bootstrap differences on the other side of 0 from the observed one
    (0 included), capped at 1; it is 1 when the observed difference is 0.

    Returns
    -------
    dict
        ``metric``, ``a``, ``b``, ``diff`` (a - b on the full set), ``ci`` ([lo, hi] of
        the difference at ``level``) and ``p_value``.
    """
    y, pa = check_inputs(y_true, proba_a, "proba_a")
    _, pb = check_inputs(y_true, proba_b, "proba_b")
    if pa.shape[1] != pb.shape[1]:
        raise ValueError(f"proba_a has {pa.shape[1]} columns but proba_b has {pb.shape[1]}")
    if not isinstance(metric, str):
        raise ValueError(f"metric must be a single metric name, got {metric!r}")
    check_metric_names([metric])
    _check_bootstrap_args(n_boot, level)
    models = [
        (pa, predict_labels(pa, check_threshold(threshold_a, pa.shape[1]))),
        (pb, predict_labels(pb, check_threshold(threshold_b, pb.shape[1]))),
    ]
    ones = np.ones((1, len(y)))
    a, b = (float(metric_arrays(ones, y, p, pred, [metric])[metric][0]) for p, pred in models)
    rep_a, rep_b = (r[metric] for r in _bootstrap_replicates(y, models, [metric], n_boot, seed))
    diffs = rep_a - rep_b
    diffs = diffs[~np.isnan(diffs)]
    diff = a - b
    if diffs.size == 0 or math.isnan(diff):
        p_value = math.nan
    elif diff > 0:
        p_value = min(1.0, 2 * float(np.mean(diffs <= 0)))
    elif diff < 0:
        p_value = min(1.0, 2 * float(np.mean(diffs >= 0)))
    else:
        p_value = 1.0
    return {
        "metric": metric,
        "a": a,
        "b": b,
        "diff": diff,
        "ci": _percentile_ci(diffs, level),
        "p_value": p_value,
    }


def delong_test(y_true, score_a, score_b):
    """DeLong et al. (1988) test for two correlated ROC AUCs on the same samples.

    Uses the O(N log N) midrank formulation of Sun & Xu (2014). Binary only; scores are
    any real-valued positive-class scores (probabilities or logits).

    Returns
    -------
    dict
        ``auc_a``, ``auc_b``, ``diff`` (a - b), ``z``, two-sided ``p_value`` and ``ci``
        (95% normal interval of the difference). Identical AUC variances and a zero
        difference give ``z = 0``, ``p_value = 1``.
    """
    y = check_labels(y_true)
    check_binary(y, "delong_test")
    scores = np.vstack(
        [check_scores(score_a, "score_a", len(y)), check_scores(score_b, "score_b", len(y))]
    )
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, k = pos.shape[1], neg.shape[1]
    if min(m, k) < 2:
        raise ValueError(
            f"delong_test needs at least 2 samples of each class, got {m} positive and {k} negative"
        )
    rank_all = rankdata(np.hstack([pos, neg]), axis=1)
    rank_pos, rank_neg = rankdata(pos, axis=1), rankdata(neg, axis=1)
    auc = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / k
    v_pos = (rank_all[:, :m] - rank_pos) / k  # per positive: share of negatives below
    v_neg = 1 - (rank_all[:, m:] - rank_neg) / m  # per negative: share of positives above
    cov = np.cov(v_pos) / m + np.cov(v_neg) / k
    se = math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))
    diff = float(auc[0] - auc[1])
    if se > 1e-12:
        z = diff / se
        p_value = float(2 * norm.sf(abs(z)))
    else:  # no sampling variability in the difference
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p_value = 1.0 if diff == 0 else 0.0
    half = float(norm.ppf(0.975)) * se
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "diff": diff,
        "z": float(z),
        "p_value": p_value,
        "ci": [diff - half, diff + half],
    }


def format_p_value(p, n_boot=None):
    """A p-value as text that never reads ``0``.

    ``n_boot``: the number of resamples behind a bootstrap p-value; a bootstrap p-value of 0
    (no resample on the other side of 0) means less than one in ``n_boot``, shown as
    ``< 1/n_boot`` (``< 0.001`` for 1000 resamples).  Without ``n_boot`` (e.g. DeLong's normal
    approximation), values below 1e-16 print as ``< 1e-16`` and values below 0.001 in
    scientific notation (``3.2e-05``). Otherwise 3 decimals (4 below 0.01); NaN or None is
    ``nan``.
    """
    if p is None or (isinstance(p, numbers.Real) and math.isnan(p)):
        return "nan"
    if not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1] (or NaN), got {p!r}")
    if n_boot is not None and (
        isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1
    ):
        raise ValueError(f"n_boot must be a positive integer or None, got {n_boot!r}")
    p = float(p)
    if n_boot is not None and p < 1.0 / n_boot:
        return f"< {1.0 / n_boot:.2g}"
    if p < _P_FLOOR:
        return f"< {_P_FLOOR:.0e}"
    if p < 1e-3:
        return f"{p:.1e}"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def format_interval(value, ci=None, digits=3):
    """``0.843 [0.814–0.872]``: the value and its interval with ``digits`` decimals (fewer
    could show an estimate outside its own rounded interval). ``None`` or NaN is ``—``; an
    interval that is missing or undefined is left out."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return "—"
    text = f"{value:.{digits}f}"
    if ci is None or any(b is None or math.isnan(b) for b in ci):
        return text
    return f"{text} [{ci[0]:.{digits}f}–{ci[1]:.{digits}f}]"
