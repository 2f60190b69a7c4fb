"""Train/test covariate shift: a domain classifier's out-of-fold AUC, overall and per class."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from xfeat.analysis.probe import out_of_fold_proba
from xfeat.analysis.section import Section, fmt_ci, md_table
from xfeat.data.dataset import strata
from xfeat.evaluation.metrics import bootstrap_ci
from xfeat.report.analysis_figures import plot_projection

# The domain classifier's L2 strength (scikit-learn's C on standardised features), fixed
# rather than tuned: the out-of-fold AUC of any fixed classifier is an honest (if
# conservative) test of shift, and tuning C on the same folds would bias it upwards.
DOMAIN_C = 0.1
# Train is subsampled to at most this many times the test size for the domain classifier:
# a near-balanced problem, and 5,216 train rows add time but little power against 624.
MAX_TRAIN_PER_TEST = 3
# Domain-classifier AUC at or above which the shift is called moderate, and strong.
MODERATE_SHIFT_AUC = 0.6
STRONG_SHIFT_AUC = 0.75


def shift_section(features, *, n_folds: int = 5, n_boot: int = 1000, seed: int = 0) -> Section:
    """How well a linear probe tells train embeddings from test ones (AUC; 0.5 = no shift).

    Train is subsampled (seeded) to at most ``MAX_TRAIN_PER_TEST`` times the test size. A
    :class:`~xfeat.heads.LogisticHead` with fixed ``C = DOMAIN_C`` gives stratified
    out-of-fold scores; the AUC's 95% interval bootstraps those scores (the folds' training
    variability is not included). Per class, the same on that class's images only: shift that
    survives within a class is not explained by the different class mix. The figure is a PCA
    of the standardised features of the train subsample, val and test.
    """
    if "test" not in features.splits:
        summary = {"skipped": "the cache has no test split", "skip_reason": "no_test_split"}
        return Section("shift", "Train/test shift", summary, markdown=_markdown(summary))
    rng = np.random.default_rng(seed)
    tr, te = features["train"], features["test"]
    summary = {
        "method": f"LogisticHead(C={DOMAIN_C}) on standardised features, {n_folds}-fold "
        "stratified out-of-fold scores, train subsampled to at most "
        f"{MAX_TRAIN_PER_TEST}x the test size (seed {seed})"
    }
    rows = _subsample(np.arange(len(tr)), MAX_TRAIN_PER_TEST * len(te), rng)
    summary.update(_domain_auc(tr.features[rows], te.features, n_folds, n_boot, seed))
    summary["n_train_used"], summary["n_test"] = int(len(rows)), int(len(te))
    summary["per_class"] = {}
    for c, name in enumerate(features.class_names):
        # multi-label data: the images positive for label c
        tr_c = np.flatnonzero(tr.labels[:, c] == 1 if tr.labels.ndim == 2 else tr.labels == c)
        te_c = np.flatnonzero(te.labels[:, c] == 1 if te.labels.ndim == 2 else te.labels == c)
        if len(te_c) < 2 or len(tr_c) < 2:
            summary["per_class"][name] = {"skipped": "fewer than 2 images in train or test"}
            continue
        tr_c = _subsample(tr_c, MAX_TRAIN_PER_TEST * len(te_c), rng)
        summary["per_class"][name] = {
            **_domain_auc(tr.features[tr_c], te.features[te_c], n_folds, n_boot, seed),
            "n_train_used": int(len(tr_c)),
            "n_test": int(len(te_c)),
        }
    summary.setdefault("level", None)  # None: too few images for the folds
    summary["meaning"] = _meaning(summary["level"])
    return Section(
        "shift",
        "Train/test shift",
        summary,
        headlines=_headlines(summary),
        markdown=_markdown(summary),
        figures={"shift_projection.png": _projection(features, rows, seed)},
    )


def _domain_auc(X_train, X_test, n_folds, n_boot, seed) -> dict:
    X = np.concatenate([X_train, X_test])
    is_test = np.r_[np.zeros(len(X_train), np.int64), np.ones(len(X_test), np.int64)]
    proba, folds = out_of_fold_proba(X, is_test, C=DOMAIN_C, n_folds=n_folds, seed=seed)
    if proba is None:
        return {"skipped": f"too few images for {n_folds}-fold cross-validation"}
    auc = float(roc_auc_score(is_test, proba[:, 1]))
    ci = (
        bootstrap_ci(is_test, proba, metrics=("roc_auc",), n_boot=n_boot, seed=seed)["roc_auc"]
        if n_boot
        else None
    )
    return {"auc": auc, "ci": ci, "folds": folds, "level": _level(auc)}


def _level(auc):
    """``none``, ``moderate`` or ``strong`` shift by the domain AUC; None if not measured."""
    if auc is None:
        return None
    if auc < MODERATE_SHIFT_AUC:
        return "none"
    if auc < STRONG_SHIFT_AUC:
        return "moderate"
    return "strong"


def _meaning(level) -> str:
    return {
        None: "not measured",
        "none": "train and test embeddings look alike to a linear probe",
        "moderate": "moderate shift: a linear probe tells test from train better than chance",
        "strong": "strong shift: test images are easy to tell from train",
    }[level]


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(rng.choice(rows, size=limit, replace=False))


def _projection(features, train_rows, seed):
    """PCA of the standardised features of the train subsample, val and test."""
    tr = features["train"]
    parts = [("train", tr.features[train_rows], tr.labels[train_rows])]
    parts += [
        (s, features[s].features, features[s].labels) for s in ("val", "test") if s in features.splits
    ]
    X = np.concatenate([p[1] for p in parts]).astype(np.float64)
    X = (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 0, X.std(axis=0), 1.0)
    n_comp = min(2, X.shape[0], X.shape[1])
    pca = PCA(n_components=n_comp, svd_solver="randomized", random_state=seed).fit(X)
    coords = pca.transform(X)
    if n_comp < 2:
        coords = np.column_stack([coords, np.zeros(len(coords))])
    explained = pca.explained_variance_ratio_.tolist() + [0.0] * (2 - n_comp)
    labels, names = np.concatenate([p[2] for p in parts]), list(features.class_names)
    if labels.ndim == 2:  # multi-label: the marker of each image's rarest positive label
        labels, names = strata(labels), names + ["none"]
    return plot_projection(
        coords,
        np.concatenate([[s] * len(p) for s, p, _ in parts]),
        labels,
        names,
        title="PCA of standardised features",
        axis_labels=[f"PC {k + 1} ({v:.0%} of variance)" for k, v in enumerate(explained)],
    )


def _headlines(s: dict) -> list:
    if "auc" not in s:
        return []
    ci = f" [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if s.get("ci") else ""
    per = ", ".join(f"{n} {v['auc']:.2f}" for n, v in s["per_class"].items() if "auc" in v)
    return [
        f"train/test shift AUC {s['auc']:.2f}{ci}: {s['meaning']}"
        + (f" (within class: {per})" if per else "")
    ]


def _markdown(s: dict) -> list:
    if "auc" not in s:
        return [f"Not measured: {s.get('skipped', 'no test split')}.", ""]
    out = [
        f"A domain classifier ({s['method']}) tells train from test with AUC "
        f"**{s['auc']:.3f}** (95% CI {fmt_ci(s.get('ci'))}): {s['meaning']}. 0.5 means no "
        "detectable shift.",
        "",
    ]
    rows = [
        [n, f"{v['auc']:.3f}", fmt_ci(v.get("ci")), v["n_train_used"], v["n_test"]]
        if "auc" in v
        else [n, "-", v.get("skipped", ""), "", ""]
        for n, v in s["per_class"].items()
    ]
    out += md_table(["class", "AUC", "95% CI", "train used", "test"], rows)
    return out + [
        "",
        "Within one class the class mix cannot drive the AUC: shift that remains "
        "there comes from acquisition (devices, sites, preprocessing), not labels.",
        "",
        "![PCA projection: colour = split, marker = class](shift_projection.png)",
        "",
    ]
