"""Label-noise candidates: train images whose given label an out-of-fold probe doubts."""

from __future__ import annotations

import numpy as np

from xfeat.analysis.probe import out_of_fold_proba
from xfeat.analysis.section import Section, count, md_table
from xfeat.evaluation.metrics import compute_metrics

TOP_LABEL_NOISE = 20  # candidates shown in the report (all go to the CSV)
CANDIDATE_COLUMNS = ["rank", "id", "given_label", "p_given", "predicted_label", "p_predicted"]


def label_noise_section(features, *, C: float, n_folds: int = 5, seed: int = 0) -> Section:
    """Train images whose given label the out-of-fold probe doubts (confident learning).

    Out-of-fold probabilities come from ``LogisticHead(C=C)`` (C chosen once on val, by the
    analysis probe). Per class j, the threshold t_j is the mean probability of j over the
    images labelled j (its average self-confidence). An image labelled y is a candidate when
    p_y < t_y and some other class k has p_k >= t_k; its predicted label is the most probable
    such k. Candidates are ranked by p_y, lowest first; all go to the CSV.
    """
    tr = features["train"]
    names = features.class_names
    y = tr.labels
    proba, folds = out_of_fold_proba(tr.features, y, C=C, n_folds=n_folds, seed=seed)
    if proba is None:
        summary = {"skipped": f"too few train images per class for {n_folds}-fold cross-validation"}
        return Section(
            "label_noise",
            "Label-noise candidates",
            summary,
            markdown=_markdown(summary),
            tables={"label_noise_candidates.csv": ([], CANDIDATE_COLUMNS)},
        )
    n, k = proba.shape
    p_given = proba[np.arange(n), y]
    has = np.bincount(y, minlength=k) > 0
    thresholds = np.array([proba[y == j, j].mean() if has[j] else 1.0 for j in range(k)])
    other = proba >= thresholds
    other[np.arange(n), y] = False
    flagged = (p_given < thresholds[y]) & other.any(axis=1)
    predicted = np.where(other, proba, -np.inf).argmax(axis=1)
    order = [r for r in np.lexsort((np.array(tr.ids, dtype=object).astype(str), p_given)) if flagged[r]]
    rows = [
        {
            "rank": rank,
            "id": tr.ids[r],
            "given_label": names[y[r]],
            "p_given": round(float(p_given[r]), 6),
            "predicted_label": names[predicted[r]],
            "p_predicted": round(float(proba[r, predicted[r]]), 6),
        }
        for rank, r in enumerate(order, 1)
    ]
    oof = compute_metrics(y, proba, threshold=0.5)
    summary = {
        "method": f"out-of-fold probabilities ({folds} stratified folds) of LogisticHead with "
        "C chosen once on val; flagged when p(given) < the given class's average "
        "self-confidence and another class's probability reaches its own",
        "C": float(C),
        "folds": folds,
        "thresholds": {names[j]: float(thresholds[j]) for j in range(k)},
        "out_of_fold": {m: oof[m] for m in ("accuracy", "balanced_accuracy", "roc_auc")},
        "n_train": int(n),
        "n_flagged": len(rows),
        "fraction_flagged": len(rows) / n,
        "flagged_per_class": {names[j]: int((flagged & (y == j)).sum()) for j in range(k)},
        "top": rows[:TOP_LABEL_NOISE],
    }
    return Section(
        "label_noise",
        "Label-noise candidates",
        summary,
        headlines=_headlines(summary),
        markdown=_markdown(summary),
        tables={"label_noise_candidates.csv": (rows, CANDIDATE_COLUMNS)},
    )


def _headlines(s: dict) -> list:
    return [
        f"{count(s['n_flagged'], 'train image')} ({s['fraction_flagged']:.1%}) flagged as "
        "possible label errors (out-of-fold probe accuracy "
        f"{s['out_of_fold']['accuracy']:.3f})"
    ]


def _markdown(s: dict) -> list:
    if "n_flagged" not in s:
        return [f"Not measured: {s.get('skipped')}.", ""]
    out = [
        f"Method: {s['method']} (C = {s['C']:.3g}; thresholds "
        + ", ".join(f"{k} {v:.3f}" for k, v in s["thresholds"].items())
        + f"). Out-of-fold accuracy {s['out_of_fold']['accuracy']:.3f}, balanced "
        f"{s['out_of_fold']['balanced_accuracy']:.3f}: the weaker the probe, the more "
        "candidates are its own mistakes.",
        "",
        f"**{s['n_flagged']} of {s['n_train']}** train images flagged "
        f"({s['fraction_flagged']:.1%}; "
        + ", ".join(f"{k} {v}" for k, v in s["flagged_per_class"].items())
        + "). All in `label_noise_candidates.csv`; to review by eye, not to drop blindly.",
        "",
    ]
    if s["top"]:
        out += md_table(
            ["rank", "image", "given", "p(given)", "predicted", "p(predicted)"],
            [
                [
                    c["rank"],
                    f"`{c['id']}`",
                    c["given_label"],
                    f"{c['p_given']:.3f}",
                    c["predicted_label"],
                    f"{c['p_predicted']:.3f}",
                ]
                for c in s["top"]
            ],
        )
        out += [""]
    return out
