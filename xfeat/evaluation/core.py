"""Input validation and the weighted metric core that ``metrics`` and ``stats`` share.

Point estimates and bootstrap replicates share one code path, :func:`metric_arrays`: a
bootstrap resample is a row of per-sample counts, the full data set is a row of ones. That is
what makes 1000 resamples cost a few matrix products instead of 1000 calls into scikit-learn.
"""

import numbers

import numpy as np

METRIC_NAMES = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "log_loss",
    "brier",
    "ece",
)
ECE_BINS = 15
_CONFUSION_METRICS = frozenset(METRIC_NAMES[:2] + METRIC_NAMES[3:8])
_LOG_EPS = 1e-15  # log loss clips probabilities to [eps, 1] so a confident mistake stays finite


# ----------------------------------------------------------------------------- validation


def check_labels(y_true, name="y_true"):
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


def check_inputs(y_true, proba, name="proba"):
    """Validated (y, proba) as int64 (N,) and float64 (N, C)."""
    y = check_labels(y_true)
    p = np.asarray(proba, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(
            f"{name} must have shape (N, C) with C >= 2 classes, got shape "
            f"{p.shape}; for a positive-class score p pass "
            f"np.column_stack([1 - p, p])"
        )
    if len(p) != len(y):
        raise ValueError(f"y_true has {len(y)} samples but {name} has {len(p)} rows")
    n_classes = p.shape[1]
    if y.max() >= n_classes:
        raise ValueError(
            f"{name} has {n_classes} columns but y_true has labels up to "
            f"{y.max()}; expected labels in [0, {n_classes})"
        )
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in "
            f"[{p.min():.4g}, {p.max():.4g}]; pass softmax outputs, not logits"
        )
    sums = p.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError(
            f"{name} rows must sum to 1, got row sums in [{sums.min():.4g}, "
            f"{sums.max():.4g}]; pass softmax outputs, not logits"
        )
    return y, np.clip(p, 0.0, 1.0)


def check_binary(y, where):
    extra = np.setdiff1d(y, [0, 1])
    if extra.size:
        raise ValueError(f"{where} needs binary labels 0/1, got label {extra[0]}")
    for label in (0, 1):
        if not (y == label).any():
            raise ValueError(f"{where} needs both classes in y_true, but class {label} is absent")


def check_scores(scores, name, n):
    s = np.asarray(scores, dtype=float)
    if s.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) to match y_true, got shape "
            f"{s.shape}; for probabilities pass proba[:, 1]"
        )
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def check_threshold(threshold, n_classes):
    if n_classes > 2:
        return None  # multi-class predictions are the argmax; the threshold is ignored
    if (
        isinstance(threshold, (bool, np.bool_))
        or not isinstance(threshold, numbers.Real)
        or not 0.0 <= threshold <= 1.0
    ):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def check_metric_names(names):
    if not names:
        raise ValueError(f"metrics is empty; expected names from {', '.join(METRIC_NAMES)}")
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; expected one of {', '.join(METRIC_NAMES)}")


# ----------------------------------------------------------------------------- core


def _div(num, den):
    """num / den with NaN where den == 0, without warnings."""
    num, den = np.broadcast_arrays(np.asarray(num, float), np.asarray(den, float))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den != 0)


def nanmean(values):
    """Mean over the last axis ignoring NaN; NaN (no warning) when a row is all NaN."""
    ok = ~np.isnan(values)
    return _div(np.where(ok, values, 0.0).sum(axis=-1), ok.sum(axis=-1))


def predict_labels(proba, threshold):
    if proba.shape[1] == 2:
        return (proba[:, 1] >= threshold).astype(np.int64)
    return proba.argmax(axis=1)


def bin_index(values, n_bins):
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
        out = {name: nanmean(v) for name, v in per_class.items()}
    out["accuracy"] = _div(tp.sum(axis=1), total[:, 0])
    out["balanced_accuracy"] = nanmean(per_class["sensitivity"])
    return out


def weighted_auc(w, positive, score):
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


def weighted_average_precision(w, positive, score):
    """Average precision (scikit-learn's step-wise definition: the sum over thresholds of the
    recall gained times the precision there) for each row of sample weights w (B, N)."""
    order = np.argsort(-score, kind="stable")
    s, pos = score[order], positive[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # last row of each tied group
    ws = w[:, order]
    tp = np.cumsum(ws * pos, axis=1)[:, ends]
    fp = np.cumsum(ws * ~pos, axis=1)[:, ends]
    recall = _div(tp, tp[:, -1:])
    precision = _div(tp, tp + fp)
    gained = np.diff(recall, axis=1, prepend=0.0)
    ap = np.where(gained > 0, gained * np.nan_to_num(precision), 0.0).sum(axis=1)
    return np.where((tp[:, -1] > 0) & (fp[:, -1] > 0), ap, np.nan)


def metric_arrays(w, y, proba, pred, names):
    """Metrics named in ``names`` for each row of sample weights w (B, N) -> {name: (B,)}."""
    n, n_classes = proba.shape
    binary = n_classes == 2
    total = w.sum(axis=1)
    out = {}
    if _CONFUSION_METRICS.intersection(names):
        out.update(_confusion_metrics(_weighted_confusion(w, y, pred, n_classes)))
    if "roc_auc" in names:
        if binary:
            out["roc_auc"] = weighted_auc(w, y == 1, proba[:, 1])
        else:
            per_class = [weighted_auc(w, y == k, proba[:, k]) for k in range(n_classes)]
            out["roc_auc"] = nanmean(np.stack(per_class, axis=1))
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
        # Own binning, not sklearn.calibration.calibration_curve: that returns neither the
        # per-bin counts ECE weighs by nor takes per-resample sample weights (rows of w).
        # The bins are the same ((lo, hi], equal width), so reliability_curve agrees with it.
        conf = proba.max(axis=1)
        bins, _ = bin_index(conf, ECE_BINS)
        gaps = np.zeros((n, ECE_BINS))
        gaps[np.arange(n), bins] = (proba.argmax(axis=1) == y) - conf
        out["ece"] = np.abs(w @ gaps).sum(axis=1) / total
    return {name: out[name] for name in names}
