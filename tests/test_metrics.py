import json
import math
import time
import warnings

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from xfeat.metrics import (
    METRIC_NAMES,
    _metric_arrays,
    _predict,
    bootstrap_ci,
    choose_threshold,
    compute_metrics,
    delong_test,
    format_metrics_table,
    paired_bootstrap,
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
    assert m["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
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


@pytest.mark.parametrize("y, proba, match", [
    ([0, 1, 3], np.full((3, 3), 1 / 3), "3 columns but y_true has labels up to 3"),
    ([0, 1], np.full((3, 2), 0.5), "y_true has 2 samples but proba has 3 rows"),
    ([0, 1], [0.2, 0.8], r"shape \(N, C\)"),
    ([0, 1], [[2.0, -1.0], [0.5, 0.5]], r"probabilities in \[0, 1\]"),
    ([0, 1], [[0.5, 0.4], [0.5, 0.5]], "rows must sum to 1"),
    ([0, 0.5], [[0.5, 0.5], [0.5, 0.5]], "integer class labels"),
    ([-1, 0], [[0.5, 0.5], [0.5, 0.5]], "negative label -1"),
])
def test_compute_metrics_rejects_bad_input(y, proba, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, proba)


def test_bad_threshold_raises():
    y, proba = _binary_data(10)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\], got 1.5"):
        compute_metrics(y, proba, threshold=1.5)


# ----------------------------------------------------------------------------- bootstrap

def test_weighted_core_matches_explicit_resample():
    # A bootstrap resample as counts must give the same metrics as the resampled arrays.
    for y, proba in (_binary_data(80, seed=3), _multiclass_data(80, seed=3)):
        idx = np.random.default_rng(1).integers(0, 80, 80)
        w = np.bincount(idx, minlength=80)[None, :].astype(float)
        got = _metric_arrays(w, y, proba, _predict(proba, 0.5), METRIC_NAMES)
        want = compute_metrics(y[idx], proba[idx])
        for name in METRIC_NAMES:
            assert got[name][0] == pytest.approx(want[name]), name


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    y, proba = _binary_data(624)
    point = compute_metrics(y, proba)
    ci = bootstrap_ci(y, proba, seed=7)
    assert set(ci) == {"accuracy", "roc_auc", "sensitivity", "specificity"}
    for name, (lo, hi) in ci.items():
        assert lo < point[name] < hi, name
    assert bootstrap_ci(y, proba, seed=7) == ci
    assert bootstrap_ci(y, proba, seed=8) != ci


def test_bootstrap_ci_narrower_with_more_samples():
    widths = []
    for n in (150, 2400):
        y, proba = _binary_data(n, seed=n)
        lo, hi = bootstrap_ci(y, proba, metrics=("roc_auc",), n_boot=300)["roc_auc"]
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(16) = 1/4 expected


def test_bootstrap_ci_level_and_all_metrics():
    y, proba = _multiclass_data(200)
    wide = bootstrap_ci(y, proba, metrics=METRIC_NAMES, n_boot=200, level=0.99)
    narrow = bootstrap_ci(y, proba, metrics=METRIC_NAMES, n_boot=200, level=0.5)
    for name in METRIC_NAMES:
        assert wide[name][0] <= narrow[name][0] <= narrow[name][1] <= wide[name][1], name


def test_bootstrap_drops_undefined_resamples():
    # 2 positives in 40: many resamples lack a positive, AUC must still come out finite.
    y = np.zeros(40, dtype=int)
    y[:2] = 1
    p1 = np.where(y == 1, 0.9, np.linspace(0.1, 0.95, 40))
    ci = bootstrap_ci(y, np.column_stack([1 - p1, p1]), metrics=["roc_auc"], n_boot=300)
    assert all(np.isfinite(ci["roc_auc"]))
    ci = bootstrap_ci(np.ones(5, int), np.tile([0.2, 0.8], (5, 1)), metrics=["roc_auc"])
    assert all(math.isnan(v) for v in ci["roc_auc"])


def test_bootstrap_is_fast():
    y, proba = _binary_data(624)
    start = time.perf_counter()
    bootstrap_ci(y, proba, n_boot=1000)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"metrics": ["auc"]}, "unknown metric 'auc'"),
    ({"n_boot": 0}, "n_boot must be a positive integer, got 0"),
    ({"level": 95}, r"level must be a number in \(0, 1\)"),
])
def test_bootstrap_rejects_bad_arguments(kwargs, match):
    y, proba = _binary_data(20)
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(y, proba, **kwargs)


def test_paired_bootstrap_against_itself_and_a_worse_model():
    y, proba = _binary_data(300)
    same = paired_bootstrap(y, proba, proba, metric="roc_auc", n_boot=300)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    assert same["a"] == pytest.approx(compute_metrics(y, proba)["roc_auc"])
    _, noise = _binary_data(300, seed=1, signal=0.0)
    res = paired_bootstrap(y, proba, noise, metric="accuracy", n_boot=500)
    assert res["metric"] == "accuracy" and res["diff"] == pytest.approx(res["a"] - res["b"])
    assert res["diff"] > 0.15 and res["ci"][0] > 0 and res["p_value"] < 0.01
    assert paired_bootstrap(y, proba, noise, n_boot=500) == res  # seeded


# ----------------------------------------------------------------------------- thresholds

@pytest.mark.parametrize("rule, expected", [
    ("youden", "youden"), (" Youden ", "youden"), (0.3, 0.3), ("0.5", 0.5),
    ("sensitivity:0.95", "sensitivity:0.95"), ("specificity:1", "specificity:1.0"),
])
def test_parse_threshold_rule(rule, expected):
    assert parse_threshold_rule(rule) == expected


@pytest.mark.parametrize("rule, match", [
    ("foo", "threshold rule 'foo' not understood; expected 'youden'"),
    ("sensitivity:high", r"target must be a number in \(0, 1\]"),
    ("specificity:1.5", r"target must be a number in \(0, 1\]"),
    ("1.5", r"fixed threshold must lie in \(0, 1\)"),
    (0.0, r"fixed threshold must lie in \(0, 1\)"),
    (True, "not understood"),
    (None, "not understood"),
])
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


# ----------------------------------------------------------------------------- DeLong

def _delong_brute_force(y, a, b):
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    aucs = np.array([c[0] for c in comps])
    s10 = np.cov(np.vstack([c[1] for c in comps]))
    s01 = np.cov(np.vstack([c[2] for c in comps]))
    cov = s10 / pos.sum() + s01 / neg.sum()
    return aucs, cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]


def test_delong_matches_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    a = np.round(y + rng.normal(size=60), 1)  # rounding creates ties
    b = np.round(0.5 * y + rng.normal(size=60), 1)
    res = delong_test(y, a, b)
    aucs, var = _delong_brute_force(y, a, b)
    assert [res["auc_a"], res["auc_b"]] == pytest.approx(list(aucs))
    assert res["auc_a"] == pytest.approx(skm.roc_auc_score(y, a))
    assert res["z"] == pytest.approx((aucs[0] - aucs[1]) / np.sqrt(var))
    assert res["p_value"] == pytest.approx(2 * norm.sf(abs(res["z"])))
    half = 1.959964 * np.sqrt(var)
    assert res["ci"] == pytest.approx([res["diff"] - half, res["diff"] + half], rel=1e-5)


def test_delong_identical_scores():
    y, proba = _binary_data(100)
    res = delong_test(y, proba[:, 1], proba[:, 1])
    assert res["diff"] == 0 and res["z"] == 0 and res["p_value"] == 1.0


def test_delong_rejects_bad_input():
    with pytest.raises(ValueError, match=r"score_b must have shape \(4,\)"):
        delong_test([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], [0.1, 0.9])
    with pytest.raises(ValueError, match="at least 2 samples of each class"):
        delong_test([0, 1, 0], [0.1, 0.9, 0.2], [0.2, 0.8, 0.1])


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
    table = format_metrics_table({"val": val, "test": test},
                                 ci={"accuracy": [0.81234, 0.9]})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "val", "test"]
    assert len(lines) == 2 + len(METRIC_NAMES)
    acc = next(line for line in lines if line.startswith("accuracy "))
    assert acc.split()[1] == f"{val['accuracy']:.3f}" and acc.endswith("[0.812, 0.900]")
    assert next(line for line in lines if line.startswith("roc_auc")).endswith("nan")
    with pytest.raises(ValueError, match="metrics_by_split is empty"):
        format_metrics_table({})
