"""Every metric xfeat reports and its confidence interval, as plain JSON-ready dicts.

This module owns the numbers computed from predictions: point metrics
(:func:`compute_metrics`), percentile-bootstrap intervals (:func:`bootstrap_ci`),
paired comparisons of two models (:func:`paired_bootstrap`, :func:`delong_test`),
operating-point selection (:func:`choose_threshold`), reliability curves and a text table.

Conventions
-----------
* ``proba`` is an (N, C) array of class probabilities. In binary problems class 1 is the
  positive class and a sample is predicted positive iff ``proba[:, 1] >= threshold``;
  with C > 2 the prediction is the argmax.
* Multi-class metrics are macro averages over the classes where they are defined.
* Undefined values (a division by zero, an AUC with a single class) are ``float('nan')``.
* Results hold only Python floats, ints, lists and None, so ``json.dumps`` works on them.

Point estimates and bootstrap replicates share one code path: a bootstrap resample is a
row of per-sample counts, the full data set is a row of ones. That is what makes 1000
resamples cost a few matrix products instead of 1000 calls into scikit-learn.
"""

import logging
import math
import numbers
import time

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_curve

logger = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity",
                "ppv", "npv", "f1", "log_loss", "brier", "ece")
ECE_BINS = 15
_CONFUSION_METRICS = frozenset(METRIC_NAMES[:2] + METRIC_NAMES[3:8])
_LOG_EPS = 1e-15  # log loss clips probabilities to [eps, 1] so a confident mistake stays finite
_MAX_CELLS = 4_000_000  # resample-weight entries held at once; bounds bootstrap memory
_RULE_HELP = ("expected 'youden', a probability such as 0.5, "
              "or 'sensitivity:0.95' / 'specificity:0.95'")


# ----------------------------------------------------------------------------- validation

def _check_labels(y_true, name="y_true"):
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (N,), got shape {y.shape}")
    if y.size == 0:
        raise ValueError(f"{name} is empty; expected at least one sample")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise ValueError(f"{name} must hold integer class labels, got {y[bad][0]!r}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"{name} has negative label {y.min()}; expected labels 0, 1, ...")
    return y


def _check_inputs(y_true, proba, name="proba"):
    """Validated (y, proba) as int64 (N,) and float64 (N, C)."""
    y = _check_labels(y_true)
    p = np.asarray(proba, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, C) with C >= 2 classes, got shape "
                         f"{p.shape}; for a positive-class score p pass "
                         f"np.column_stack([1 - p, p])")
    if len(p) != len(y):
        raise ValueError(f"y_true has {len(y)} samples but {name} has {len(p)} rows")
    n_classes = p.shape[1]
    if y.max() >= n_classes:
        raise ValueError(f"{name} has {n_classes} columns but y_true has labels up to "
                         f"{y.max()}; expected labels in [0, {n_classes})")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise ValueError(f"{name} must hold probabilities in [0, 1], got values in "
                         f"[{p.min():.4g}, {p.max():.4g}]; pass softmax outputs, not logits")
    sums = p.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(f"{name} rows must sum to 1, got row sums in [{sums.min():.4g}, "
                         f"{sums.max():.4g}]; pass softmax outputs, not logits")
    return y, np.clip(p, 0.0, 1.0)


def _check_binary(y, where):
    extra = np.setdiff1d(y, [0, 1])
    if extra.size:
        raise ValueError(f"{where} needs binary labels 0/1, got label {extra[0]}")
    for label in (0, 1):
        if not (y == label).any():
            raise ValueError(f"{where} needs both classes in y_true, but class {label} "
                             f"is absent")


def _check_scores(scores, name, n):
    s = np.asarray(scores, dtype=float)
    if s.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match y_true, got shape "
                         f"{s.shape}; for probabilities pass proba[:, 1]")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _check_threshold(threshold, n_classes):
    if n_classes > 2:
        return None  # multi-class predictions are the argmax; the threshold is ignored
    if (isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real)
            or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def _check_metric_names(names):
    if not names:
        raise ValueError(f"metrics is empty; expected names from {', '.join(METRIC_NAMES)}")
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; "
                         f"expected one of {', '.join(METRIC_NAMES)}")


def _check_bootstrap_args(n_boot, level):
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(level, numbers.Real) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be a number in (0, 1) such as 0.95, got {level!r}")


# ----------------------------------------------------------------------------- core

def _div(num, den):
    """num / den with NaN where den == 0, without warnings."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den != 0)


def _nanmean(values):
    """Mean over the last axis ignoring NaN; NaN (no warning) when a row is all NaN."""
    ok = ~np.isnan(values)
    return _div(np.where(ok, values, 0.0).sum(axis=-1), ok.sum(axis=-1))


def _predict(proba, threshold):
    if proba.shape[1] == 2:
        return (proba[:, 1] >= threshold).astype(np.int64)
    return proba.argmax(axis=1)


def _bin_index(values, n_bins):
    """Bin of each value among n_bins equal-width bins (lo, hi] on [0, 1]; 0 joins bin 0."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1), edges


def _weighted_confusion(w, y, pred, n_classes):
    """Confusion matrices (B, C, C), rows = true class, for sample weights w (B, N)."""
    cells = np.eye(n_classes * n_classes)[y * n_classes + pred]
    return (w @ cells).reshape(-1, n_classes, n_classes)


def _confusion_metrics(cms):
    tp = np.diagonal(cms, axis1=1, axis2=2)
    true, predicted = cms.sum(axis=2), cms.sum(axis=1)
    total = true.sum(axis=1, keepdims=True)
    fn, fp = true - tp, predicted - tp
    tn = total - true - predicted + tp
    per_class = {
        "sensitivity": _div(tp, true),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, predicted),
        "npv": _div(tn, tn + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
    }
    if cms.shape[1] == 2:
        out = {name: v[:, 1] for name, v in per_class.items()}
    else:
        out = {name: _nanmean(v) for name, v in per_class.items()}
    out["accuracy"] = _div(tp.sum(axis=1), total[:, 0])
    out["balanced_accuracy"] = _nanmean(per_class["sensitivity"])
    return out


def _weighted_auc(w, positive, score):
    """ROC AUC (Mann-Whitney U, ties count 1/2) for each row of sample weights w (B, N)."""
    order = np.argsort(score, kind="stable")
    s, pos = score[order], positive[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    ws = w[:, order]
    n_pos = np.add.reduceat(ws * pos, starts, axis=1)
    n_neg = np.add.reduceat(ws * ~pos, starts, axis=1)
    neg_below = np.cumsum(n_neg, axis=1) - n_neg
    wins = (n_pos * (neg_below + 0.5 * n_neg)).sum(axis=1)
    return _div(wins, n_pos.sum(axis=1) * n_neg.sum(axis=1))


def _metric_arrays(w, y, proba, pred, names):
    """Metrics named in ``names`` for each row of sample weights w (B, N) -> {name: (B,)}."""
    n, n_classes = proba.shape
    binary = n_classes == 2
    total = w.sum(axis=1)
    out = {}
    if _CONFUSION_METRICS.intersection(names):
        out.update(_confusion_metrics(_weighted_confusion(w, y, pred, n_classes)))
    if "roc_auc" in names:
        if binary:
            out["roc_auc"] = _weighted_auc(w, y == 1, proba[:, 1])
        else:
            per_class = [_weighted_auc(w, y == k, proba[:, k]) for k in range(n_classes)]
            out["roc_auc"] = _nanmean(np.stack(per_class, axis=1))
    if "log_loss" in names:
        p_true = np.clip(proba[np.arange(n), y], _LOG_EPS, 1.0)
        out["log_loss"] = w @ -np.log(p_true) / total
    if "brier" in names:
        if binary:
            err = (proba[:, 1] - (y == 1)) ** 2
        else:
            err = ((proba - np.eye(n_classes)[y]) ** 2).sum(axis=1)
        out["brier"] = w @ err / total
    if "ece" in names:
        # Top-label ECE: |accuracy - confidence| per bin, weighted by the bin's share.
        conf = proba.max(axis=1)
        bins, _ = _bin_index(conf, ECE_BINS)
        gaps = np.zeros((n, ECE_BINS))
        gaps[np.arange(n), bins] = (proba.argmax(axis=1) == y) - conf
        out["ece"] = np.abs(w @ gaps).sum(axis=1) / total
    return {name: out[name] for name in names}


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
            part.append(_metric_arrays(w, y, proba, pred, names))
    logger.debug("bootstrap: %d resamples of %d samples x %d model(s) in %.1f ms",
                 n_boot, n, len(models), 1e3 * (time.perf_counter() - start))
    return [{name: np.concatenate([p[name] for p in part]) for name in names}
            for part in parts]


def _percentile_ci(values, level):
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [math.nan, math.nan]
    alpha = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [alpha, 100 - alpha])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------- public API

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
    y, p = _check_inputs(y_true, proba)
    n_classes = p.shape[1]
    threshold = _check_threshold(threshold, n_classes)
    pred = _predict(p, threshold)
    values = _metric_arrays(np.ones((1, len(y))), y, p, pred, METRIC_NAMES)
    cm = np.bincount(y * n_classes + pred, minlength=n_classes ** 2)
    return {
        "n": int(len(y)),
        **{name: float(v[0]) for name, v in values.items()},
        "confusion_matrix": cm.reshape(n_classes, n_classes).tolist(),
        "threshold": threshold,
    }


def bootstrap_ci(y_true, proba, *, threshold=0.5,
                 metrics=("accuracy", "roc_auc", "sensitivity", "specificity"),
                 n_boot=1000, level=0.95, seed=0):
    """Percentile-bootstrap confidence intervals, resampling samples with replacement.

    Resamples where a metric is undefined (e.g. AUC of a resample with one class) are
    dropped for that metric; an interval with no defined resample is ``[nan, nan]``.

    Returns
    -------
    dict
        ``{metric: [lo, hi]}`` for each name in ``metrics`` (any of :data:`METRIC_NAMES`).
    """
    y, p = _check_inputs(y_true, proba)
    threshold = _check_threshold(threshold, p.shape[1])
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    _check_metric_names(metrics)
    _check_bootstrap_args(n_boot, level)
    (replicates,) = _bootstrap_replicates(y, [(p, _predict(p, threshold))], metrics,
                                          n_boot, seed)
    for name, values in replicates.items():
        dropped = int(np.isnan(values).sum())
        if dropped:
            logger.debug("%s undefined in %d of %d resamples; dropped", name, dropped, n_boot)
    return {name: _percentile_ci(values, level) for name, values in replicates.items()}


def paired_bootstrap(y_true, proba_a, proba_b, *, metric="accuracy", threshold_a=0.5,
                     threshold_b=0.5, n_boot=2000, level=0.95, seed=0):
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
    y, pa = _check_inputs(y_true, proba_a, "proba_a")
    _, pb = _check_inputs(y_true, proba_b, "proba_b")
    if pa.shape[1] != pb.shape[1]:
        raise ValueError(f"proba_a has {pa.shape[1]} columns but proba_b has {pb.shape[1]}")
    if not isinstance(metric, str):
        raise ValueError(f"metric must be a single metric name, got {metric!r}")
    _check_metric_names([metric])
    _check_bootstrap_args(n_boot, level)
    models = [(pa, _predict(pa, _check_threshold(threshold_a, pa.shape[1]))),
              (pb, _predict(pb, _check_threshold(threshold_b, pb.shape[1])))]
    ones = np.ones((1, len(y)))
    a, b = (float(_metric_arrays(ones, y, p, pred, [metric])[metric][0]) for p, pred in models)
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
    return {"metric": metric, "a": a, "b": b, "diff": diff,
            "ci": _percentile_ci(diffs, level), "p_value": p_value}


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
    y = _check_labels(y_true)
    _check_binary(y, "delong_test")
    scores = np.vstack([_check_scores(score_a, "score_a", len(y)),
                        _check_scores(score_b, "score_b", len(y))])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, k = pos.shape[1], neg.shape[1]
    if min(m, k) < 2:
        raise ValueError(f"delong_test needs at least 2 samples of each class, got {m} "
                         f"positive and {k} negative")
    rank_all = rankdata(np.hstack([pos, neg]), axis=1)
    rank_pos, rank_neg = rankdata(pos, axis=1), rankdata(neg, axis=1)
    auc = (rank_all[:, :m].sum(axis=1) / m - (m + 1) / 2) / k
    v_pos = (rank_all[:, :m] - rank_pos) / k      # per positive: share of negatives below
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
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff, "z": float(z),
            "p_value": p_value, "ci": [diff - half, diff + half]}


def parse_threshold_rule(rule):
    """Validate a threshold rule; return ``'youden'``, a float in (0, 1), or a normalised
    ``'sensitivity:<target>'`` / ``'specificity:<target>'`` string (target in (0, 1])."""
    if isinstance(rule, numbers.Real) and not isinstance(rule, (bool, np.bool_)):
        if 0.0 < rule < 1.0:
            return float(rule)
        raise ValueError(f"threshold rule {rule!r}: a fixed threshold must lie in (0, 1)")
    if isinstance(rule, str):
        text = rule.strip().lower()
        if text == "youden":
            return text
        kind, sep, value = text.partition(":")
        if sep and kind in ("sensitivity", "specificity"):
            target = _to_float(value)
            if target is not None and 0.0 < target <= 1.0:
                return f"{kind}:{target!r}"
            raise ValueError(f"threshold rule {rule!r}: the {kind} target must be a number "
                             f"in (0, 1], e.g. '{kind}:0.95'")
        number = _to_float(text)
        if number is not None:
            if 0.0 < number < 1.0:
                return number
            raise ValueError(f"threshold rule {rule!r}: a fixed threshold must lie in (0, 1)")
    raise ValueError(f"threshold rule {rule!r} not understood; {_RULE_HELP}")


def _to_float(text):
    try:
        return float(text)
    except ValueError:
        return None


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
    y = _check_labels(y_true)
    _check_binary(y, "choose_threshold")
    p = _check_scores(p_positive, "p_positive", len(y))
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"p_positive must hold probabilities in [0, 1], got values in "
                         f"[{p.min():.4g}, {p.max():.4g}]")
    # Thresholds come back in decreasing order, so argmax's first hit is the highest one.
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

    Returns
    -------
    dict
        ``bin_edges`` (n_bins + 1), and per bin ``confidence`` (mean x), ``accuracy``
        (mean y) and ``count``.
    """
    y, p = _check_inputs(y_true, proba)
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if p.shape[1] == 2:
        score, hit = p[:, 1], y == 1
    else:
        score, hit = p.max(axis=1), p.argmax(axis=1) == y
    bins, edges = _bin_index(score, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    return {
        "bin_edges": edges.tolist(),
        "confidence": _div(np.bincount(bins, score, n_bins), count).tolist(),
        "accuracy": _div(np.bincount(bins, hit.astype(float), n_bins), count).tolist(),
        "count": count.tolist(),
    }


def format_metrics_table(metrics_by_split, ci=None):
    """Fixed-width text table: one row per metric, one column per split (in order).

    ``ci`` (as returned by :func:`bootstrap_ci`) annotates the last column, e.g.
    ``0.912 [0.889, 0.934]``. Values have 3 decimals; NaN prints as ``nan`` and a metric
    missing from a split as ``-``.
    """
    if not metrics_by_split:
        raise ValueError("metrics_by_split is empty; expected e.g. "
                         "{'test': compute_metrics(y, proba)}")
    splits = list(metrics_by_split)
    ci = ci or {}
    rows = [["metric", *splits]]
    for name in METRIC_NAMES:
        cells = [_format_value(metrics_by_split[s].get(name)) for s in splits]
        if name in ci:
            lo, hi = ci[name]
            cells[-1] += f" [{_format_value(lo)}, {_format_value(hi)}]"
        rows.append([name, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([row[0].ljust(widths[0])]
                       + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _format_value(value):
    if value is None:
        return "-"
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.3f}"


def evaluate_splits(labels, probas, *, threshold="youden", n_boot=1000, seed=0,
                    threshold_on=None):
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
    metrics = {s: compute_metrics(labels[s], probas[s], threshold=value if value is not None
                                  else 0.5) for s in probas}
    at_half = {s: compute_metrics(labels[s], probas[s], threshold=0.5) for s in probas}
    ci = {}
    if "test" in probas and n_boot:
        ci["test"] = bootstrap_ci(labels["test"], probas["test"],
                                  threshold=value if value is not None else 0.5,
                                  n_boot=n_boot, seed=seed)
    return {"threshold": {"rule": rule if isinstance(rule, str) else float(rule),
                          "value": value, "chosen_on": "val"},
            "metrics": metrics, "metrics_at_0.5": at_half, "ci": ci}
