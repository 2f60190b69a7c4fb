"""Every metric xfeat reports for one set of predictions, as plain JSON-ready dicts.

This module owns the numbers computed from predictions: point metrics
(:func:`compute_metrics`), operating-point selection (:func:`choose_threshold`), reliability
curves, a text table and :func:`evaluate_splits` (everything a run reports).  Their
uncertainty -- bootstrap intervals, paired bootstrap, DeLong's test -- is in
:mod:`xfeat.evaluation.stats` and re-exported here.

Conventions
-----------
* ``proba`` is an (N, C) array of class probabilities. In binary problems class 1 is the
  positive class and a sample is predicted positive iff ``proba[:, 1] >= threshold``;
  with C > 2 the prediction is the argmax.
* Multi-class metrics are macro averages over the classes where they are defined.
* Undefined values (a division by zero, an AUC with a single class) are ``float('nan')``.
* Results hold only Python floats, ints, lists and None, so ``json.dumps`` works on them.
"""

import math
import numbers

import numpy as np

from xfeat.config import parse_threshold_rule
from xfeat.evaluation.core import (
    ECE_BINS,
    METRIC_NAMES,
    bin_index,
    check_binary,
    check_inputs,
    check_labels,
    check_scores,
    check_threshold,
    metric_arrays,
    predict_labels,
)
from xfeat.evaluation.stats import bootstrap_ci, delong_test, format_p_value, paired_bootstrap

__all__ = [
    "ECE_BINS",
    "METRIC_NAMES",
    "bootstrap_ci",
    "choose_threshold",
    "compute_metrics",
    "delong_test",
    "evaluate_splits",
    "format_metrics_table",
    "format_p_value",
    "paired_bootstrap",
    "parse_threshold_rule",
    "reliability_curve",
]


def compute_metrics(y_true, proba, *, threshold=0.5):
    """All metrics of one set of predictions.

    Parameters
    ----------
    y_true : array-like of shape (N,)
        Integer labels in [0, C).
    proba : array-like of shape (N, C)
        Class probabilities; rows sum to 1.
    threshold : float, default=0.5
        Binary only: predict class 1 iff ``proba[:, 1] >= threshold``. Ignored (stored as
        None) when C > 2, where the prediction is the argmax.

    Returns
    -------
    dict
        ``n``, ``accuracy``, ``balanced_accuracy``, ``roc_auc``, ``sensitivity``,
        ``specificity``, ``ppv``, ``npv``, ``f1``, ``log_loss``, ``brier``, ``ece``,
        ``confusion_matrix`` (rows = true, columns = predicted) and ``threshold``.
        Binary metrics are for class 1; with C > 2 they are macro averages over the
        classes where they are defined (one-vs-rest for specificity, NPV and AUC), and
        ``brier`` sums the squared error over classes. ``ece`` is the top-label ECE of
        the argmax class with 15 equal-width bins, whatever the threshold. Undefined
        values are NaN.
    """
    y, p = check_inputs(y_true, proba)
    n_classes = p.shape[1]
    threshold = check_threshold(threshold, n_classes)
    pred = predict_labels(p, threshold)
    values = metric_arrays(np.ones((1, len(y))), y, p, pred, METRIC_NAMES)
    cm = np.bincount(y * n_classes + pred, minlength=n_classes**2)
    return {
        "n": int(len(y)),
        **{name: float(v[0]) for name, v in values.items()},
        "confusion_matrix": cm.reshape(n_classes, n_classes).tolist(),
        "threshold": threshold,
    }


def choose_threshold(y_true, p_positive, rule):
    """Pick a decision threshold on positive-class probabilities (binary only).

    Parameters
    ----------
    y_true : array-like of shape (N,)
        Labels 0/1; both classes must be present for the data-driven rules.
    p_positive : array-like of shape (N,)
        Probability of class 1.
    rule : str or float
        ``'youden'`` (maximise sensitivity + specificity - 1), a fixed probability,
        ``'sensitivity:t'`` (highest specificity with sensitivity >= t) or
        ``'specificity:t'`` (highest sensitivity with specificity >= t).

    Returns
    -------
    float
        Threshold in [0, 1] for the rule ``p_positive >= threshold``. Candidates are the
        observed scores; among tied candidates the highest wins (the most conservative about
        calling a sample positive); the returned value lies midway between that score and
        the next lower one, which classifies these samples identically with the widest
        margin. A rule met only by predicting nothing positive returns a value above every
        score.
    """
    parsed = parse_threshold_rule(rule)
    if isinstance(parsed, float):
        return parsed
    y = check_labels(y_true)
    check_binary(y, "choose_threshold")
    p = check_scores(p_positive, "p_positive", len(y))
    if p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"p_positive must hold probabilities in [0, 1], got values in [{p.min():.4g}, {p.max():.4g}]"
        )
    # Thresholds come back in decreasing order, so argmax's first hit is the highest one.
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    if parsed == "youden":
        best = int(np.argmax(tpr - fpr))
    else:
        kind, target = parsed.split(":")
        target = float(target)
        if kind == "sensitivity":
            ok = tpr >= target - 1e-12
            gain = np.where(ok, 1 - fpr, -np.inf)
        else:
            ok = 1 - fpr >= target - 1e-12
            gain = np.where(ok, tpr, -np.inf)
        best = int(np.argmax(gain))
    t = float(np.clip(thresholds[best], 0.0, 1.0))
    # Midway to the next lower score: the same calls on these data, the widest margin on new.
    below = p[p < t]
    return (t + float(below.max())) / 2 if below.size else t


def reliability_curve(y_true, proba, *, n_bins=15):
    """Data for a reliability diagram over ``n_bins`` equal-width bins on [0, 1].

    Binary: x is the positive-class probability ``proba[:, 1]`` and y the observed
    frequency of class 1 in the bin. Multi-class: x is the top-label confidence and y
    the accuracy of the argmax. Empty bins have NaN confidence and accuracy.

    The curve is ``sklearn.calibration.calibration_curve``'s (uniform bins); this adds the
    bin edges and the per-bin counts, which it does not return, and NaN for empty bins.

    Returns
    -------
    dict
        ``bin_edges`` (n_bins + 1), and per bin ``confidence`` (mean x), ``accuracy``
        (mean y) and ``count``.
    """
    y, p = check_inputs(y_true, proba)
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if p.shape[1] == 2:
        score, hit = p[:, 1], y == 1
    else:
        score, hit = p.max(axis=1), p.argmax(axis=1) == y
    from sklearn.calibration import calibration_curve  # 0.1 s to import: only when needed

    observed, predicted = calibration_curve(
        hit.astype(np.int64), score, n_bins=n_bins, strategy="uniform"
    )  # non-empty bins only
    bins, edges = bin_index(score, n_bins)  # the same (lo, hi] bins as calibration_curve
    count = np.bincount(bins, minlength=n_bins)
    confidence, accuracy = np.full(n_bins, math.nan), np.full(n_bins, math.nan)
    confidence[count > 0], accuracy[count > 0] = predicted, observed
    return {
        "bin_edges": edges.tolist(),
        "confidence": confidence.tolist(),
        "accuracy": accuracy.tolist(),
        "count": count.tolist(),
    }


def format_metrics_table(metrics_by_split, ci=None):
    """Fixed-width text table: one row per metric, one column per split (in order).

    ``ci`` (as returned by :func:`bootstrap_ci`) annotates the last column, e.g.
    ``0.912 [0.889, 0.934]``. Values have 3 decimals; NaN prints as ``nan`` and a metric
    missing from a split as ``-``.
    """
    if not metrics_by_split:
        raise ValueError("metrics_by_split is empty; expected e.g. {'test': compute_metrics(y, proba)}")
    splits = list(metrics_by_split)
    ci = ci or {}
    first = metrics_by_split[splits[0]]
    multiclass = len(first.get("confusion_matrix") or [[0, 0]]) > 2
    rows = [["metric" + (" (macro over classes)" if multiclass else ""), *splits]]
    for name in METRIC_NAMES:
        cells = [_format_value(metrics_by_split[s].get(name)) for s in splits]
        if name in ci:
            lo, hi = ci[name]
            cells[-1] += f" [{_format_value(lo)}, {_format_value(hi)}]"
        rows.append([name, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _format_value(value):
    if value is None:
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.3f}"


def evaluate_splits(labels, probas, *, threshold="youden", n_boot=1000, seed=0, threshold_on=None):
    """Everything a run reports, from per-split labels and probabilities.

    The threshold rule is applied on ``val`` only (binary problems); metrics are computed for
    every split at that threshold and at 0.5; bootstrap intervals on ``test``.

    ``threshold_on`` = ``(y_val, proba_val)`` chooses the threshold on other val
    probabilities (e.g. a model not fitted on val).

    Returns ``{"threshold": {...}, "metrics": {...}, "metrics_at_0.5": {...}, "ci": {...}}``.
    """
    if "val" not in probas:
        raise ValueError("evaluate_splits needs a 'val' split to choose the threshold on")
    n_classes = probas["val"].shape[1]
    rule = parse_threshold_rule(threshold)
    y_choose, p_choose = threshold_on or (labels["val"], probas["val"])
    if n_classes == 2:
        value = choose_threshold(y_choose, p_choose[:, 1], rule)
    else:
        value, rule = None, "argmax"  # multi-class
    metrics = {
        s: compute_metrics(labels[s], probas[s], threshold=value if value is not None else 0.5)
        for s in probas
    }
    at_half = {s: compute_metrics(labels[s], probas[s], threshold=0.5) for s in probas}
    ci = {}
    if "test" in probas and n_boot:
        ci["test"] = bootstrap_ci(
            labels["test"],
            probas["test"],
            threshold=value if value is not None else 0.5,
            n_boot=n_boot,
            seed=seed,
        )
    return {
        "threshold": {
            "rule": rule if isinstance(rule, str) else float(rule),
            "value": value,
            "chosen_on": "val",
        },
        "metrics": metrics,
        "metrics_at_0.5": at_half,
        "ci": ci,
    }
