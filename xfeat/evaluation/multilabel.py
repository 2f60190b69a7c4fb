"""Metrics of multi-label predictions with unknown entries: per label, macro, micro, bootstrap.

Conventions
-----------
* ``Y`` is an (N, L) integer matrix: 1 positive, 0 negative, -1 unknown (a blank or ignored
  uncertain label). Unknown entries count in no metric and no threshold choice; each label's
  ``n`` says how many rows it was judged on.
* ``P`` is an (N, L) matrix of independent positive-class probabilities (one-vs-rest).
* A label with one class among its known rows of a split has undefined AUC and AP there
  (``NaN``); macro averages are over the labels where the metric is defined, and
  ``n_labels_defined`` says how many those are.
* Bootstrap intervals resample patients (whole groups of rows) when ``groups`` are given,
  else rows.
"""

from __future__ import annotations

import math

import numpy as np

from xfeat.config import parse_threshold_rule
from xfeat.errors import DataError
from xfeat.evaluation.core import nanmean, weighted_auc, weighted_average_precision
from xfeat.evaluation.metrics import choose_threshold

UNKNOWN = -1
_MAX_CELLS = 4_000_000  # resample-weight entries held at once; bounds bootstrap memory
SUMMARY_NAMES = ("roc_auc", "average_precision", "micro_roc_auc", "micro_average_precision")


def check_multilabel(Y, P, label_names=None) -> tuple:
    """Validated ``(Y, P)`` as int64 and float64 (N, L) matrices of one shape."""
    Y, P = np.asarray(Y), np.asarray(P, dtype=float)
    if Y.ndim != 2 or P.shape != Y.shape:
        raise ValueError(f"labels {Y.shape} and probabilities {P.shape} must both be (N, L)")
    if label_names is not None and len(label_names) != Y.shape[1]:
        raise ValueError(f"{len(label_names)} label names for {Y.shape[1]} label columns")
    if not np.isin(Y, (0, 1, UNKNOWN)).all():
        raise ValueError("multi-label targets must be 1, 0 or -1 (unknown)")
    return Y.astype(np.int64), P


def _defined(y: np.ndarray) -> bool:
    return len(y) > 0 and 0 < y.sum() < len(y)


def _label_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """One label on its known rows: AUC, AP, prevalence, and the operating point."""
    from sklearn.metrics import average_precision_score, roc_auc_score  # 0.15 s: when used

    n = len(y)
    row = {"n": int(n), "prevalence": float(y.mean()) if n else math.nan, "threshold": threshold}
    defined = _defined(y)
    row["roc_auc"] = float(roc_auc_score(y, p)) if defined else math.nan
    row["average_precision"] = float(average_precision_score(y, p)) if defined else math.nan
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    row["sensitivity"] = float(pred[pos].mean()) if pos.any() else math.nan
    row["specificity"] = float((~pred[neg]).mean()) if neg.any() else math.nan
    return row


def _macro(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def multilabel_metrics(Y, P, thresholds, label_names) -> dict:
    """Every metric of one split: macro ``roc_auc`` and ``average_precision`` (mAP), micro AUC
    and AP over every known entry, and ``per_label`` rows (see :func:`_label_metrics`)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    Y, P = check_multilabel(Y, P, label_names)
    per_label = {}
    for j, name in enumerate(label_names):
        known = Y[:, j] != UNKNOWN
        per_label[name] = _label_metrics(Y[known, j], P[known, j], float(thresholds[j]))
    known = Y != UNKNOWN
    y_all, p_all = Y[known], P[known]
    micro_defined = _defined(y_all)
    eps = 1e-15
    p_clip = np.clip(p_all, eps, 1 - eps)
    return {
        "n": int(len(Y)),
        "n_labels_defined": sum(not math.isnan(r["roc_auc"]) for r in per_label.values()),
        "roc_auc": _macro(r["roc_auc"] for r in per_label.values()),
        "average_precision": _macro(r["average_precision"] for r in per_label.values()),
        "micro_roc_auc": float(roc_auc_score(y_all, p_all)) if micro_defined else math.nan,
        "micro_average_precision": (
            float(average_precision_score(y_all, p_all)) if micro_defined else math.nan
        ),
        "sensitivity": _macro(r["sensitivity"] for r in per_label.values()),
        "specificity": _macro(r["specificity"] for r in per_label.values()),
        "log_loss": float(-np.mean(y_all * np.log(p_clip) + (1 - y_all) * np.log(1 - p_clip)))
        if len(y_all)
        else math.nan,
        "per_label": per_label,
    }


def macro_auc(Y, P) -> float:
    """The macro ROC AUC over the labels defined on their known rows (NaN when none is)."""
    Y, P = check_multilabel(Y, P)
    return float(_macro_auc_rows(np.ones((1, len(Y))), Y, P)[0])


def choose_label_thresholds(Y_val, P_val, rule, label_names) -> list:
    """One threshold per label, chosen by ``rule`` on that label's known val rows."""
    Y, P = check_multilabel(Y_val, P_val, label_names)
    parsed = parse_threshold_rule(rule)
    thresholds = []
    for j, name in enumerate(label_names):
        known = Y[:, j] != UNKNOWN
        y = Y[known, j]
        if isinstance(parsed, float):
            thresholds.append(parsed)
        elif not _defined(y):
            raise DataError(
                f"the label {name!r} has {'no known' if not len(y) else 'a single class in its'} "
                "val rows; its threshold is chosen on val and needs positives and negatives there: "
                "give a larger val split (--val-fraction)"
            )
        else:
            thresholds.append(float(choose_threshold(y, P[known, j], rule)))
    return thresholds


def _resample_weights(groups, n: int, n_boot: int, seed: int, width: int = 1):
    """Chunks of bootstrap resamples as per-row weights (B, n): whole patients are drawn when
    ``groups`` (one per row) are given, else rows; a row's weight is its patient's count."""
    if groups is not None:
        _, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    else:
        index = np.arange(n)
    n_groups = int(index.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CELLS // (max(n, n_groups) * width))  # width: columns held per row
    for done in range(0, n_boot, chunk):
        b = min(chunk, n_boot - done)
        drawn = rng.integers(0, n_groups, size=(b, n_groups))
        counts = np.zeros((b, n_groups))
        np.add.at(counts, (np.repeat(np.arange(b), n_groups), drawn.ravel()), 1.0)
        yield counts[:, index]


def _macro_auc_rows(w: np.ndarray, Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    """The macro AUC of each row of weights w (B, N)."""
    aucs = []
    for j in range(Y.shape[1]):
        known = Y[:, j] != UNKNOWN
        aucs.append(weighted_auc(w[:, known], Y[known, j] == 1, P[known, j]))
    return nanmean(np.stack(aucs, axis=1))


def paired_multilabel_test(Y, P_a, P_b, label_names, *, groups=None, n_boot=2000, level=0.95, seed=0):
    """Two models on the same images: the macro-AUC difference with a paired bootstrap
    (patients resampled when ``groups`` are given; two-sided p-value as
    :func:`~xfeat.evaluation.stats.paired_bootstrap`'s), and DeLong's test per label."""
    from xfeat.evaluation.stats import delong_test

    Y, P_a = check_multilabel(Y, P_a, label_names)
    _, P_b = check_multilabel(Y, P_b, label_names)
    ones = np.ones((1, len(Y)))
    a, b = float(_macro_auc_rows(ones, Y, P_a)[0]), float(_macro_auc_rows(ones, Y, P_b)[0])
    diffs = np.concatenate(
        [
            _macro_auc_rows(w, Y, P_a) - _macro_auc_rows(w, Y, P_b)
            for w in _resample_weights(groups, len(Y), n_boot, seed)
        ]
    )
    diffs = diffs[~np.isnan(diffs)]
    diff = a - b
    if not diffs.size or math.isnan(diff):
        p_value = math.nan
    elif diff == 0:
        p_value = 1.0
    else:
        p_value = min(1.0, 2 * float(np.mean(diffs <= 0 if diff > 0 else diffs >= 0)))
    alpha = 100 * (1 - level) / 2
    per_label = {}
    for j, name in enumerate(label_names):
        known = Y[:, j] != UNKNOWN
        if _defined(Y[known, j]):
            d = delong_test(Y[known, j], P_a[known, j], P_b[known, j])
            per_label[name] = {"auc_diff": d["diff"], "p_value": d["p_value"], "ci": d["ci"]}
    return {
        "metric": "macro roc_auc",
        "a": a,
        "b": b,
        "diff": diff,
        "ci": [float(v) for v in np.percentile(diffs, [alpha, 100 - alpha])]
        if diffs.size
        else [math.nan] * 2,
        "p_value": p_value,
        "resampled": "patients" if groups is not None else "images",
        "per_label": per_label,
    }


def bootstrap_multilabel_ci(Y, P, label_names, *, groups=None, n_boot=1000, level=0.95, seed=0):
    """Percentile intervals of the macro and micro AUC / AP and of each label's AUC and AP,
    resampling whole patients when ``groups`` (one per row) are given, else rows.

    Every resample is a row of per-sample counts (a patient drawn twice counts its images
    twice), scored by the weighted AUC and AP of :mod:`xfeat.evaluation.core`: 1000 resamples
    cost a few array operations per label, not 1000 calls into scikit-learn.
    """
    Y, P = check_multilabel(Y, P, label_names)
    draws = {}
    # the micro AUC holds every label's column of the weights at once
    for w in _resample_weights(groups, len(Y), n_boot, seed, width=Y.shape[1] + 1):
        aucs, aps = [], []
        for j, label in enumerate(label_names):
            known = Y[:, j] != UNKNOWN
            positive, score = Y[known, j] == 1, P[known, j]
            aucs.append(weighted_auc(w[:, known], positive, score))
            aps.append(weighted_average_precision(w[:, known], positive, score))
            draws.setdefault(f"{label}/roc_auc", []).append(aucs[-1])
            draws.setdefault(f"{label}/average_precision", []).append(aps[-1])
        draws.setdefault("roc_auc", []).append(nanmean(np.stack(aucs, axis=1)))
        draws.setdefault("average_precision", []).append(nanmean(np.stack(aps, axis=1)))
        known = (Y != UNKNOWN).ravel(order="F")
        w_all = np.tile(w, (1, Y.shape[1]))[:, known]  # column-major: label by label
        y_all, p_all = Y.ravel(order="F")[known] == 1, P.ravel(order="F")[known]
        draws.setdefault("micro_roc_auc", []).append(weighted_auc(w_all, y_all, p_all))
        draws.setdefault("micro_average_precision", []).append(
            weighted_average_precision(w_all, y_all, p_all)
        )
    alpha = 100 * (1 - level) / 2

    def interval(name: str) -> list:
        values = np.concatenate(draws[name])
        values = values[~np.isnan(values)]
        if not len(values):
            return [math.nan, math.nan]
        return [float(v) for v in np.percentile(values, [alpha, 100 - alpha])]

    ci = {name: interval(name) for name in SUMMARY_NAMES}
    ci["per_label"] = {
        label: {m: interval(f"{label}/{m}") for m in ("roc_auc", "average_precision")}
        for label in label_names
    }
    ci["resampled"] = "patients" if groups is not None else "images"
    return ci


def evaluate_multilabel(
    labels, probas, label_names, *, threshold="youden", n_boot=1000, seed=0, groups=None
) -> dict:
    """Everything a multi-label run reports, in the shape of
    :func:`~xfeat.evaluation.metrics.evaluate_splits`: per-label thresholds chosen on val,
    metrics of every split at them and at 0.5, bootstrap intervals on test."""
    if "val" not in probas:
        raise ValueError("evaluate_multilabel needs a 'val' split to choose the thresholds on")
    rule = parse_threshold_rule(threshold)
    thresholds = choose_label_thresholds(labels["val"], probas["val"], rule, label_names)
    half = [0.5] * len(label_names)
    metrics = {s: multilabel_metrics(labels[s], probas[s], thresholds, label_names) for s in probas}
    at_half = {s: multilabel_metrics(labels[s], probas[s], half, label_names) for s in probas}
    ci = {}
    if "test" in probas and n_boot:
        ci["test"] = bootstrap_multilabel_ci(
            labels["test"],
            probas["test"],
            label_names,
            groups=(groups or {}).get("test"),
            n_boot=n_boot,
            seed=seed,
        )
    return {
        "threshold": {
            "rule": rule if isinstance(rule, str) else float(rule),
            "value": None,
            "per_label": dict(zip(label_names, thresholds)),
            "chosen_on": "val",
        },
        "metrics": metrics,
        "metrics_at_0.5": at_half,
        "ci": ci,
    }


def format_multilabel_table(metrics_by_split: dict, label_names) -> str:
    """Fixed-width text: the macro and micro rows, then AUC / AP / n / prevalence per label."""
    splits = list(metrics_by_split)

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, int):
            return str(value)
        return "nan" if math.isnan(value) else f"{value:.3f}"

    rows = [["metric (labels)", *splits]]
    for name in ("roc_auc", "average_precision", "micro_roc_auc", "micro_average_precision"):
        rows.append(
            [
                f"{name} ({'micro' if name.startswith('micro') else 'macro'})".replace("micro_", ""),
                *(cell(metrics_by_split[s].get(name)) for s in splits),
            ]
        )
    for label in label_names:
        for name in ("roc_auc", "average_precision", "n", "prevalence"):
            rows.append(
                [
                    f"{label}: {name}",
                    *(cell(metrics_by_split[s]["per_label"][label][name]) for s in splits),
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
