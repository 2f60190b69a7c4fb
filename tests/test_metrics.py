import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from xfeat.evaluation import metrics, stats
from xfeat.evaluation.metrics import (
    METRIC_NAMES,
    choose_threshold,
    compute_metrics,
    format_metrics_table,
    parse_threshold_rule,
    reliability_curve,
)


def _binary_data(n, seed=0, signal=1.5):
    """Labels and (N, 2) probabilities from a logistic score with some signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))
    return y, np.column_stack([1 - p, p])


def _multiclass_data(n, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.2 * np.eye(n_classes)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


# ----------------------------------------------------------------------------- compute_metrics


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_binary_metrics_match_sklearn(threshold):
    y, proba = _binary_data(300)
    pred = (proba[:, 1] >= threshold).astype(int)
    m = compute_metrics(y, proba, threshold=threshold)
    assert m["n"] == 300 and m["threshold"] == threshold
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, proba[:, 1]))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_binary_counts_by_hand():
    # true:  1    1    1    0    0    0    0    1
    # pred:  1    1    0    0    0    1    0    1   -> TP=3 FN=1 TN=3 FP=1
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p1 = np.array([0.9, 0.6, 0.4, 0.2, 0.1, 0.7, 0.3, 0.8])
    m = compute_metrics(y, np.column_stack([1 - p1, p1]))
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == (0.75, 0.75, 0.75, 0.75)
    # Shift one mistake: p=0.4 positive becomes a hit -> TP=4 FN=0.
    p1[2] = 0.55
    m = compute_metrics(y, np.column_stack([1 - p1, p1]))
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75
    assert m["ppv"] == pytest.approx(4 / 5) and m["npv"] == 1.0
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 0))


def test_multiclass_metrics_match_sklearn_macro():
    y, proba = _multiclass_data(400)
    pred = proba.argmax(axis=1)
    m = compute_metrics(y, proba, threshold=0.9)
    assert m["threshold"] is None
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, proba))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    spec = [skm.recall_score(y != k, pred != k) for k in range(3)]
    npv = [skm.precision_score(y != k, pred != k) for k in range(3)]
    assert m["specificity"] == pytest.approx(np.mean(spec))
    assert m["npv"] == pytest.approx(np.mean(npv))
    brier = np.mean(((proba - np.eye(3)[y]) ** 2).sum(axis=1))
    assert m["brier"] == pytest.approx(brier)


def test_result_is_plain_json():
    y, proba = _multiclass_data(50)
    m = compute_metrics(y, proba)
    assert json.loads(json.dumps(m)) == m
    assert all(type(m[k]) is float for k in METRIC_NAMES)


def test_undefined_values_are_nan_without_warnings():
    y = np.ones(6, dtype=int)  # a single class: AUC, specificity, npv undefined
    p1 = np.linspace(0.6, 0.9, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y, np.column_stack([1 - p1, p1]))
        mc = compute_metrics([0, 0, 1], np.full((3, 3), 1 / 3))  # class 2 absent
    assert math.isnan(m["roc_auc"]) and math.isnan(m["specificity"]) and math.isnan(m["npv"])
    assert m["sensitivity"] == 1.0 and m["confusion_matrix"] == [[0, 0], [0, 6]]
    assert mc["confusion_matrix"] == [[2, 0, 0], [1, 0, 0], [0, 0, 0]]
    assert mc["roc_auc"] == 0.5  # classes 0 and 1 defined, class 2 dropped from the mean


def test_ece_calibrated_is_zero_and_overconfident_is_positive():
    # Within each confidence level the hit rate equals the confidence exactly.
    y, p1 = [], []
    for conf, n, hits in [(0.6, 10, 6), (0.8, 10, 8), (1.0, 5, 5)]:
        y += [1] * hits + [0] * (n - hits)
        p1 += [conf] * n
    m = compute_metrics(y, np.column_stack([1 - np.array(p1), p1]))
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)
    y = np.tile([0, 1], 50)
    over = compute_metrics(y, np.tile([0.01, 0.99], (100, 1)))
    assert over["ece"] == pytest.approx(0.49)


@pytest.mark.parametrize(
    "y, proba, match",
    [
        ([0, 1, 3], np.full((3, 3), 1 / 3), "3 columns but y_true has labels up to 3"),
        ([0, 1], np.full((3, 2), 0.5), "y_true has 2 samples but proba has 3 rows"),
        ([0, 1], [0.2, 0.8], r"shape \(N, C\)"),
        ([0, 1], [[2.0, -1.0], [0.5, 0.5]], r"probabilities in \[0, 1\]"),
        ([0, 1], [[0.5, 0.4], [0.5, 0.5]], "rows must sum to 1"),
        ([0, 0.5], [[0.5, 0.5], [0.5, 0.5]], "integer class labels"),
        ([-1, 0], [[0.5, 0.5], [0.5, 0.5]], "negative label -1"),
    ],
)
def test_compute_metrics_rejects_bad_input(y, proba, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, proba)


def test_bad_threshold_raises():
    y, proba = _binary_data(10)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\], got 1.5"):
        compute_metrics(y, proba, threshold=1.5)


def test_statistics_are_re_exported_from_metrics():
    from xfeat.evaluation.metrics import bootstrap_ci, delong_test, format_p_value, paired_bootstrap

    assert (bootstrap_ci, delong_test, paired_bootstrap, format_p_value) == (
        stats.bootstrap_ci,
        stats.delong_test,
        stats.paired_bootstrap,
        stats.format_p_value,
    )
    assert {"bootstrap_ci", "delong_test", "paired_bootstrap"} <= set(metrics.__all__)


# ----------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("youden", "youden"),
        (" Youden ", "youden"),
        (0.3, 0.3),
        ("0.5", 0.5),
        ("sensitivity:0.95", "sensitivity:0.95"),
        ("specificity:1", "specificity:1.0"),
    ],
)
def test_parse_threshold_rule(rule, expected):
    assert parse_threshold_rule(rule) == expected


@pytest.mark.parametrize(
    "rule, match",
    [
        ("foo", "threshold rule 'foo' not understood; expected 'youden'"),
        ("sensitivity:high", r"target must be a number in \(0, 1\]"),
        ("specificity:1.5", r"target must be a number in \(0, 1\]"),
        ("1.5", r"fixed threshold must lie in \(0, 1\)"),
        (0.0, r"fixed threshold must lie in \(0, 1\)"),
        (True, "not understood"),
        (None, "not understood"),
    ],
)
def test_parse_threshold_rule_rejects(rule, match):
    with pytest.raises(ValueError, match=match):
        parse_threshold_rule(rule)


def test_youden_separates_a_separable_case():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.35, 0.6, 0.7, 0.95])
    t = choose_threshold(y, p, "youden")
    assert t == pytest.approx((0.6 + 0.35) / 2)  # midway between the classes' closest scores
    assert np.array_equal(p >= t, y == 1)


@pytest.mark.parametrize("kind", ["sensitivity", "specificity"])
def test_target_rules_meet_their_target_and_are_optimal(kind):
    y, proba = _binary_data(500, signal=1.0)
    p = proba[:, 1]
    t = choose_threshold(y, p, f"{kind}:0.95")
    sens = lambda thr: np.mean(p[y == 1] >= thr)  # noqa: E731
    spec = lambda thr: np.mean(p[y == 0] < thr)  # noqa: E731
    met, other = (sens, spec) if kind == "sensitivity" else (spec, sens)
    assert met(t) >= 0.95
    # No observed threshold meeting the target does better on the other side.
    feasible = [c for c in np.unique(p) if met(c) >= 0.95]
    assert other(t) == pytest.approx(max(other(c) for c in feasible))


def test_choose_threshold_fixed_and_errors():
    assert choose_threshold([0, 1], [0.2, 0.8], "0.42") == 0.42
    with pytest.raises(ValueError, match="class 1 is absent"):
        choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], "youden")
    with pytest.raises(ValueError, match="binary labels 0/1, got label 2"):
        choose_threshold([0, 1, 2], [0.1, 0.2, 0.3], "youden")


# ----------------------------------------------------------------------------- reporting


def test_reliability_curve_binary_and_multiclass():
    y = [0, 1, 1, 1, 0]
    p1 = np.array([0.05, 0.55, 0.55, 0.95, 0.55])
    curve = reliability_curve(y, np.column_stack([1 - p1, p1]), n_bins=10)
    assert len(curve["bin_edges"]) == 11 and sum(curve["count"]) == 5
    assert curve["count"][5] == 3 and curve["accuracy"][5] == pytest.approx(2 / 3)
    assert curve["confidence"][5] == pytest.approx(0.55)
    assert curve["accuracy"][0] == 0.0 and math.isnan(curve["accuracy"][3])
    y, proba = _multiclass_data(100)
    curve = reliability_curve(y, proba, n_bins=15)
    counts = np.array(curve["count"])
    hit = np.nan_to_num(curve["accuracy"]) * counts
    assert hit.sum() == pytest.approx(np.sum(proba.argmax(axis=1) == y))
    # The count-weighted gap of the curve is exactly the reported ECE.
    gap = np.abs(np.nan_to_num(curve["accuracy"]) - np.nan_to_num(curve["confidence"]))
    assert (gap * counts).sum() / 100 == pytest.approx(compute_metrics(y, proba)["ece"])


def test_format_metrics_table():
    y, proba = _binary_data(100)
    val = compute_metrics(y, proba)
    test = dict(val, roc_auc=float("nan"))
    table = format_metrics_table({"val": val, "test": test}, ci={"accuracy": [0.81234, 0.9]})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "val", "test"]
    assert len(lines) == 2 + len(METRIC_NAMES)
    acc = next(line for line in lines if line.startswith("accuracy "))
    assert acc.split()[1] == f"{val['accuracy']:.3f}" and acc.endswith("[0.812, 0.900]")
    assert next(line for line in lines if line.startswith("roc_auc")).endswith("nan")
    with pytest.raises(ValueError, match="metrics_by_split is empty"):
        format_metrics_table({})
