"""Transductive site adaptation of the probe: what each method of :mod:`xfeat.heads.adaptation` does to
the val-test gap, and whether EM's estimate of the test class prior can be believed.

Every method here is *transductive*: it uses the unlabelled test images, as
``fit-head --adapt METHOD`` does. Test labels are read only to report the numbers (as in every
section of the analysis); they choose nothing.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from xfeat.analysis.section import Section, diff, fmt, md_table
from xfeat.evaluation.metrics import choose_threshold, compute_metrics
from xfeat.heads import LogisticHead
from xfeat.heads import adaptation as adapt
from xfeat.report.analysis_figures import plot_grouped_bars
from xfeat.runs.results import RunResult

logger = logging.getLogger(__name__)

TITLE = "Site adaptation to the test images (transductive)"
METHODS = ("none",) + adapt.METHODS
METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "ece")
GAP_METRICS = ("accuracy", "balanced_accuracy", "roc_auc")
# Total variation between EM's estimated test prior and the actual one above which the
# estimate is called implausible (0.1 = ten points of one class, for two classes).
EM_PRIOR_TOLERANCE = 0.1
LABEL_USE = (
    "Test labels are read only to report these numbers, as in every section of this "
    "analysis; they choose nothing: the head, its C and its threshold come from train "
    "and val, and each method sees the test images without their labels."
)


def adaptation_section(features, probe: RunResult, *, seed: int = 0, progress: bool = False) -> Section:
    """The probe on the test images as they are, and after each transductive adaptation.

    The rows are the probe's head on the cached features, at the probe's threshold (chosen on
    val), with the test split left alone (``none``) or adapted as ``fit_head(adapt=...)``
    adapts it: ``standardize`` and ``coral`` map the test features to train's statistics;
    ``em`` re-weights the test probabilities to a test prior estimated by EM, after
    bias-corrected temperature scaling on val, from the train prior. Val is never adapted, so
    its numbers are the same in every row (em's row: its calibrated val, on which its threshold
    is chosen) and the change in the val - test gap is the change
    on test. Where the probe's own head cannot be applied to these features (a run folder
    without ``head.npz``, or fitted on other blocks), a :class:`~xfeat.heads.LogisticHead`
    with the probe's C is fitted on train instead, its threshold chosen on val by the same
    rule.

    For ``em``, the estimated test prior is set beside the train and the actual test prior,
    with the label-free check of EM's assumption (:func:`xfeat.heads.adaptation.within_class_shift`, and
    :func:`xfeat.heads.adaptation.em_warning`, which is what ``fit-head --adapt em`` shows). The estimate
    is also called implausible, by a check that reads test labels and so is diagnostic only,
    when it is farther from the actual prior than the train prior is (by more than the
    standard error of a prior measured on the test images), or more than
    ``EM_PRIOR_TOLERANCE`` from it (total variation).
    """
    skipped = _skip_reason(features)
    if skipped:
        reason, text, counts = skipped
        summary = {"transductive": True, "skipped": text, "skip_reason": reason, **counts}
        return Section("adaptation", TITLE, summary, markdown=[f"Not measured: {text}.", ""])
    names = features.class_names
    tr, va, te = features["train"], features["val"], features["test"]
    head, head_note, own = _probe_head(features, probe)
    p_val = head.predict_proba(va.features)
    threshold = _threshold(probe, own, va.labels, p_val)
    val = _metrics(va.labels, p_val, threshold)
    rows, em = [], None
    for method in tqdm(METHODS, desc="adaptations (transductive)", disable=not progress, leave=False):
        X_test = te.features
        if method in adapt.FEATURE_METHODS:
            X_test = getattr(adapt, method)(tr.features, X_test)
        p_test = head.predict_proba(X_test)
        row_val, row_threshold = val, threshold
        if method == "em":  # val and threshold in the calibrated space EM works in
            p_test, em, calibrate = _em(features, p_val, p_test, seed=seed)
            p_cal = calibrate(p_val)
            row_threshold = (
                None
                if threshold is None
                else float(choose_threshold(va.labels, p_cal[:, 1], probe.record.threshold.rule))
            )
            row_val = _metrics(va.labels, p_cal, row_threshold)
        test = _metrics(te.labels, p_test, row_threshold)
        rows.append(
            {
                "method": method,
                "transductive": method != "none",
                "val": dict(row_val),
                "threshold": row_threshold,
                "test": test,
                "gap": {m: diff(row_val[m], test[m]) for m in GAP_METRICS},
            }
        )
    summary = {
        "transductive": True,
        "target": "test images (labels not read by any method)",
        "label_use": LABEL_USE,
        "head": head_note,
        # "probe": the probe's own head; "fitted_on_train": a LogisticHead of its C, fitted here
        "head_source": "probe" if own else "fitted_on_train",
        "threshold": {"value": threshold, "rule": probe.record.threshold.rule, "chosen_on": "val"},
        "gap": "val - test",
        "methods": rows,
        "em": em,
        # The method the report advises: standardize when EM's label-free check finds the
        # images shifted within a class; None otherwise.
        "recommended": "standardize" if em["shifted_classes"] else None,
    }
    figure = plot_grouped_bars(
        {r["method"]: [r["gap"][m] for m in GAP_METRICS] for r in rows},
        list(GAP_METRICS),
        group_labels=["accuracy", "balanced accuracy", "AUC"],
        ylabel="val - test gap",
        title="val - test gap of the probe, per transductive adaptation of test",
    )
    return Section(
        "adaptation",
        TITLE,
        summary,
        headlines=_headlines(summary, names),
        markdown=_markdown(summary),
        figures={"adaptation_gaps.png": figure},
        tables={"adaptation_transductive.csv": _table(rows)},
    )


def _skip_reason(features):
    """``(reason, text, counts)`` when the section cannot run, else None."""
    if "test" not in features.splits:
        return "no_test_split", "the cache has no test split", {}
    if "val" not in features.splits:
        return (
            "no_val_split",
            "the cache has no val split (BCTS for em and the threshold are fitted on val)",
            {},
        )
    n_test = len(features["test"])
    if n_test < adapt.MIN_TARGET_IMAGES:
        return (
            "too_few_test_images",
            f"test has {n_test} images; the adaptations need at least "
            f"{adapt.MIN_TARGET_IMAGES} to estimate their statistics",
            {"n_test": n_test, "min_test_images": adapt.MIN_TARGET_IMAGES},
        )
    return None


def _probe_head(features, probe: RunResult):
    """``(head, description, is the probe's own)``."""
    dim = features["train"].features.shape[1]
    head = probe.head
    if head is not None and getattr(head, "n_features_in_", None) == dim:
        return head, "the analysis' logistic probe", True
    C = probe.record.selection["C"]
    logger.info(
        "the probe's head cannot be applied to these %d features; fitting "
        "LogisticHead(C=%g) on train for the adaptation section",
        dim,
        C,
    )
    tr = features["train"]
    return (
        LogisticHead(C=C).fit(tr.features, tr.labels),
        f"LogisticHead(C={C:g}) fitted on train (the probe's own head was not available)",
        False,
    )


def _threshold(probe: RunResult, own_head: bool, y_val, p_val):
    """The probe's val-chosen threshold; re-chosen on val by its rule for another head."""
    chosen = probe.record.threshold
    if chosen.value is None:  # multi-class: argmax
        return None
    if own_head:
        return float(chosen.value)
    return float(choose_threshold(y_val, p_val[:, 1], chosen.rule))


def _metrics(y, proba, threshold) -> dict:
    m = compute_metrics(y, proba, threshold=0.5 if threshold is None else threshold)
    return {k: m[k] for k in METRICS}


def _em(features, p_val, p_test, *, seed: int):
    """EM as ``fit_head(adapt="em")`` does it, with the label-free and the labelled checks."""
    names = features.class_names
    tr, va, te = features["train"], features["val"], features["test"]
    k = len(names)
    train_prior = np.bincount(tr.labels, minlength=k) / len(tr)
    calibrate, adjusted, details = adapt.em_adapt(p_val, va.labels, p_test, train_prior)
    predicted = adjusted.argmax(1)
    shift = adapt.within_class_shift(tr.features, tr.labels, te.features, predicted, seed=seed)
    bars = adapt.shift_bars(tr.labels, predicted)
    estimate = np.asarray(details["target_prior"])
    actual = np.bincount(te.labels, minlength=k) / len(te)
    error, before = _total_variation(estimate, actual), _total_variation(train_prior, actual)
    # "Away" must be more than chance: a prior read off n images moves by about this much.
    noise = float(np.sqrt((actual * (1 - actual)).max() / len(te)))
    moves_away, far = error > before + noise, error > EM_PRIOR_TOLERANCE
    reasons = []
    if moves_away:
        reasons.append(
            f"it moves the prior away from the actual test prior (distance "
            f"{before:.3f} from train's, {error:.3f} from EM's; standard error of a "
            f"prior on {len(te)} images {noise:.3f})"
        )
    if far:
        reasons.append(f"it is {error:.3f} from the actual test prior (tolerance {EM_PRIOR_TOLERANCE})")
    return (
        adjusted,
        {
            "calibration": "BCTS fitted on val: em's val row and threshold are on calibrated "
            "probabilities",
            "train_prior": dict(zip(names, train_prior.tolist())),
            "estimated_test_prior": dict(zip(names, estimate.tolist())),
            "actual_test_prior": dict(zip(names, actual.tolist())),
            "temperature": details["temperature"],
            "iterations": details["iterations"],
            "within_class_shift_auc": {names[c]: v for c, v in shift.items()},
            "warning_auc": adapt.EM_SHIFT_WARNING_AUC,
            # label-free: the classes whose within-class shift AUC is above warning_auc and
            # beyond chance for the number of images compared (its bar)
            "warning_auc_by_class": {names[c]: b for c, b in bars.items() if c in shift},
            "shifted_classes": [names[c] for c in adapt.shifted_classes(shift, bars)],
            "warning": adapt.em_warning(shift, names, bars),
            "implausible": bool(reasons),
            "implausible_reasons": reasons,
            # reads test labels: EM's estimate is farther from the actual prior than train's
            # (by more than a standard error), and more than the tolerance from it
            "moves_away_from_actual": bool(moves_away),
            "far_from_actual": bool(far),
            "distance_to_actual": {"estimate": error, "train": before, "standard_error": noise},
            "tolerance": EM_PRIOR_TOLERANCE,
            "label_use": {
                "within_class_shift_auc": "label-free: fit-head --adapt em shows it too",
                "warning": "label-free: fit-head --adapt em shows it too",
                "implausible": "reads test labels: diagnostic only",
            },
        },
        calibrate,
    )


def _total_variation(p, q) -> float:
    """Half the L1 distance; for two classes, the difference in either class's prior."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def _table(rows: list) -> tuple:
    columns = [
        "method",
        "transductive",
        "val_accuracy",
        "val_roc_auc",
        "test_accuracy",
        "test_balanced_accuracy",
        "test_roc_auc",
        "test_ece",
        "gap_accuracy",
        "gap_balanced_accuracy",
        "gap_roc_auc",
    ]
    out = [
        {
            "method": r["method"],
            "transductive": r["transductive"],
            **{f"val_{m}": r["val"][m] for m in ("accuracy", "roc_auc")},
            **{f"test_{m}": r["test"][m] for m in METRICS},
            **{f"gap_{m}": r["gap"][m] for m in GAP_METRICS},
        }
        for r in rows
    ]
    return out, columns


def _row(s: dict, method: str) -> dict:
    return next(r for r in s["methods"] if r["method"] == method)


def _shown_class(em: dict, names: list) -> str:
    """The positive class for two classes; else the one whose prior EM moved most."""
    if len(names) == 2:
        return names[1]
    return max(names, key=lambda n: abs(em["estimated_test_prior"][n] - em["train_prior"][n]))


def _headlines(s: dict, names: list) -> list:
    gaps = ", ".join(f"{r['method']} {fmt(r['gap']['accuracy'], signed=True)}" for r in s["methods"])
    out = [f"transductive adaptation to the test images, val - test accuracy gap: {gaps}"]
    em = s["em"]
    c = _shown_class(em, names)
    text = (
        f"EM estimates a test {c} prior of {em['estimated_test_prior'][c]:.3f} (train "
        f"{em['train_prior'][c]:.3f}, actual {em['actual_test_prior'][c]:.3f})"
    )
    shifted = {n: em["within_class_shift_auc"][n] for n in em["shifted_classes"]}
    aucs = ", ".join(f"{n} {v:.2f}" for n, v in (shifted or em["within_class_shift_auc"]).items())
    prefer = ""
    if s["recommended"]:
        none, best = (_row(s, m)["test"]["accuracy"] for m in ("none", s["recommended"]))
        prefer = (
            f"prefer {s['recommended']}, chosen from the unlabelled test images' within-class "
            f"shift, not from test accuracy (which moves {none:.3f} -> {best:.3f}, reported only)"
        )
    if em["implausible"] and shifted:
        text += f": implausible — the shift is in the images (within-class shift AUC {aucs}); " + prefer
    elif em["implausible"]:
        why = (
            "it moves away from the actual prior"
            if em["moves_away_from_actual"]
            else "it is far from the actual prior"
        )
        text += f": implausible ({why}), though no class shifted within itself" + (
            f" (within-class shift AUC {aucs})" if aucs else ""
        )
    elif shifted:
        text += (
            f": close to the actual prior, but the images shifted within class "
            f"(within-class shift AUC {aucs}), so EM's assumption does not hold; " + prefer
        )
    else:
        text += ": plausible" + (f"; no within-class shift (AUC {aucs})" if aucs else "")
    return out + [text]


def _markdown(s: dict) -> list:
    th = s["threshold"]
    at = (
        f"at the probe's threshold {th['value']:.3f} ({th['rule']}, chosen on val)"
        if th["value"] is not None
        else "at the argmax"
    )
    out = [
        "**Transductive**: each method adapts the test split to its own unlabelled images, as "
        "`fit-head --adapt METHOD` does: `standardize` and `coral` map the test features to "
        "train's mean and spread (CORAL: covariance), `em` re-weights the test probabilities "
        "to a test class prior that EM estimates from them. Val is never adapted: its "
        "numbers are the same in every row, except em's, whose val probabilities are the "
        "temperature-scaled ones (BCTS fitted on val) its threshold is chosen on. " + LABEL_USE,
        "",
        f"Head: {s['head']}, {at}. ECE: top-label, 15 bins. Gap: val - test.",
        "",
        "Test split adapted transductively (test images, not their labels):",
        "",
    ]
    out += md_table(
        [
            "test adaptation (transductive)",
            "val accuracy",
            "val AUC",
            "test accuracy",
            "test balanced accuracy",
            "test AUC",
            "test ECE",
            "val - test accuracy",
        ],
        [
            [
                r["method"],
                fmt(r["val"]["accuracy"]),
                fmt(r["val"]["roc_auc"]),
                fmt(r["test"]["accuracy"]),
                fmt(r["test"]["balanced_accuracy"]),
                fmt(r["test"]["roc_auc"]),
                fmt(r["test"]["ece"]),
                fmt(r["gap"]["accuracy"], signed=True),
            ]
            for r in s["methods"]
        ],
    )
    out += ["", "![val - test gap per transductive adaptation](adaptation_gaps.png)", ""]
    em = s["em"]
    out += [
        "**EM's estimate of the test class prior** (Saerens et al. 2002, after bias-corrected "
        f"temperature scaling on val, T = {em['temperature']:.3f}; "
        f"{em['iterations']} iterations):",
        "",
    ]
    out += md_table(
        ["class", "train prior", "EM's test prior", "actual test prior", "within-class shift AUC"],
        [
            [
                n,
                fmt(em["train_prior"][n]),
                fmt(em["estimated_test_prior"][n]),
                fmt(em["actual_test_prior"][n]),
                fmt(em["within_class_shift_auc"].get(n)),
            ]
            for n in em["train_prior"]
        ],
    )
    out += [
        "",
        "Label-free check, which `fit-head --adapt em` shows too: within each class "
        "(predicted, on test), how well a linear classifier tells test images from train "
        f"ones (cross-validated AUC; above {em['warning_auc']}, and beyond chance for the "
        "number of images compared (Bonferroni over the classes), the images themselves "
        "shifted, which EM assumes they did not; `-`: fewer than 10 test images predicted "
        "in the class). " + (f"Warning: {em['warning']}." if em["warning"] else "No class shifted."),
        "",
    ]
    verdict = (
        "**implausible**: " + "; ".join(em["implausible_reasons"])
        if em["implausible"]
        else f"plausible: within {em['tolerance']} of the actual prior and not moved away from it"
    )
    out += [
        f"Check with test labels (diagnostic only; `fit-head` cannot make it): the estimate "
        f"is {verdict}.",
        "",
    ]
    if s["recommended"]:
        out += [
            f"Recommendation: `--adapt {s['recommended']}`. It is made from signals that read "
            "no test label: the within-class shift of the unlabelled test images against "
            "train (a cross-validated classifier telling them apart within each class, the "
            "test images' class being the predicted one). The test accuracies above are "
            "reported, never used to choose.",
            "",
        ]
    else:
        out += [
            "Recommendation: none. No class shifted beyond chance in the label-free check, so "
            "nothing in the unlabelled test images calls for an adaptation; the test accuracies "
            "above are reported, never used to choose.",
            "",
        ]
    return out
