"""Tests for xfeat.evaluation.stats: bootstrap intervals, paired bootstrap, DeLong, p-value text."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from xfeat.evaluation.core import METRIC_NAMES, metric_arrays, predict_labels
from xfeat.evaluation.metrics import compute_metrics
from xfeat.evaluation.stats import bootstrap_ci, delong_test, format_p_value, paired_bootstrap

DATA = Path(__file__).parent / "data"


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


# ----------------------------------------------------------------------------- bootstrap


def test_weighted_core_matches_explicit_resample():
    # A bootstrap resample as counts must give the same metrics as the resampled arrays.
    for y, proba in (_binary_data(80, seed=3), _multiclass_data(80, seed=3)):
        idx = np.random.default_rng(1).integers(0, 80, 80)
        w = np.bincount(idx, minlength=80)[None, :].astype(float)
        got = metric_arrays(w, y, proba, predict_labels(proba, 0.5), METRIC_NAMES)
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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"metrics": ["auc"]}, "unknown metric 'auc'"),
        ({"n_boot": 0}, "n_boot must be a positive integer, got 0"),
        ({"level": 95}, r"level must be a number in \(0, 1\)"),
    ],
)
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


def _asah():
    with open(DATA / "aSAH.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([r["outcome"] == "Poor" for r in rows], dtype=int)
    return y, {k: np.array([float(r[k]) for r in rows]) for k in ("wfns", "s100b", "ndka")}


@pytest.mark.parametrize(
    "a, b, z, p_value, ci",
    [
        ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, [0.0104061769564846, 0.174214419249478]),
        (
            "wfns",
            "ndka",
            2.79777591868904,
            0.00514557970691098,
            [0.0634011709339876, 0.3600405634833566],
        ),
        (
            "ndka",
            "s100b",
            -1.39077002573558,
            0.164295175223054,
            [-0.2876917446341914, 0.0488706064228094],
        ),
    ],
)
def test_delong_matches_pROC_on_aSAH(a, b, z, p_value, ci):
    """Reference values of pROC's ``roc.test`` (DeLong, paired, two-sided) on its aSAH data.

    Expected numbers: pROC's own tests, tests/testthat/test-roc.test.R of
    github.com/xrobin/pROC (commit ee2877e), ``roc.test(r.wfns, r.s100b)`` etc. with
    ``r.X <- roc(aSAH$outcome, aSAH$X)``; the first is pROC's documentation example
    (``roc.test(roc1, roc2)`` on s100b vs wfns: Z = -2.209, p-value = 0.02718). The 113 rows
    are in tests/data/aSAH.csv (see tests/data/README.md). pROC orients each curve so that
    "Poor" scores higher, which is how these raw scores already rank (every AUC > 0.5).
    """
    y, scores = _asah()
    assert (y.sum(), len(y)) == (41, 113)
    res = delong_test(y, scores[a], scores[b])
    assert res["auc_a"] > 0.5 and res["auc_b"] > 0.5
    assert res["z"] == pytest.approx(z, rel=1e-9)
    assert res["p_value"] == pytest.approx(p_value, rel=1e-9)
    assert res["ci"] == pytest.approx(ci, rel=1e-9)


def test_delong_auc_of_aSAH_matches_pROC_placements():
    """AUC of ndka: theta = 0.611957994579946 in pROC's tests/testthat/
    helper-deLongPlacementsCpp-expected.R (same commit)."""
    y, scores = _asah()
    assert delong_test(y, scores["ndka"], scores["wfns"])["auc_a"] == pytest.approx(
        0.611957994579946, rel=1e-12
    )


# ----------------------------------------------------------------------------- p-value text


@pytest.mark.parametrize(
    "p, n_boot, text",
    [
        (0.0, 1000, "< 0.001"),
        (0.0, 2000, "< 0.0005"),
        (0.002, 1000, "0.0020"),
        (0.5, 1000, "0.500"),
        (1.0, None, "1.000"),
        (0.0271757822291882, None, "0.027"),
        (0.00514557970691098, None, "0.0051"),
        (3.2e-05, None, "3.2e-05"),
        (1e-20, None, "< 1e-16"),
        (0.0, None, "< 1e-16"),
        (float("nan"), None, "nan"),
        (None, 1000, "nan"),
    ],
)
def test_format_p_value(p, n_boot, text):
    assert format_p_value(p, n_boot) == text


def test_format_p_value_never_prints_zero():
    y, proba = _binary_data(300)
    _, noise = _binary_data(300, seed=1, signal=0.0)
    res = paired_bootstrap(y, proba, noise, metric="accuracy", n_boot=200)
    assert res["p_value"] == 0.0  # no resample where the noise model wins
    assert format_p_value(res["p_value"], 200) == "< 0.005"
    z = delong_test(y, proba[:, 1], noise[:, 1])
    assert float(format_p_value(z["p_value"]).lstrip("< ")) > 0


@pytest.mark.parametrize(
    "p, n_boot, match",
    [
        (1.5, None, r"p must be a probability in \[0, 1\]"),
        (-0.1, None, r"p must be a probability in \[0, 1\]"),
        (0.1, 0, "n_boot must be a positive integer or None, got 0"),
    ],
)
def test_format_p_value_rejects_bad_input(p, n_boot, match):
    with pytest.raises(ValueError, match=match):
        format_p_value(p, n_boot)
