"""Multi-label data: each label's prevalence per split, its shift from train to val and to
test, and how labels occur together.

A label's prevalence is counted on the rows where it is known. The shift of each label from
train to another split is a two-proportion z-test (scipy's normal tail); a label whose test
prevalence differs from train's shifts every threshold chosen on val and every metric that
depends on prevalence (AP, PPV), although not the AUC; one whose val prevalence differs makes
val a poor stand-in for train when thresholds are chosen there.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

from xfeat.analysis.section import Section, fmt, md_table, split_names
from xfeat.report.analysis_figures import plot_class_balance, plot_cooccurrence

UNKNOWN = -1
ALPHA = 0.05
SIMILAR_PREVALENCE = 0.02  # a change below this (in absolute prevalence) is no shift


def label_section(features) -> Section:
    """Prevalence per split, the shift per label from train to val and to test, and
    co-occurrence on train."""
    names = features.class_names
    splits = split_names(features)
    prevalence, known = {}, {}
    for s in splits:
        Y = features[s].labels
        known[s] = (Y != UNKNOWN).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):  # no known row: NaN, not 0
            prevalence[s] = np.where(known[s] > 0, (Y == 1).sum(axis=0) / known[s], np.nan).tolist()
    summary = {
        "label_names": names,
        "n_images": int(sum(len(features[s]) for s in splits)),
        "prevalence": prevalence,
        "known": {s: k.tolist() for s, k in known.items()},
        "unknown_entries": {s: int((features[s].labels == UNKNOWN).sum()) for s in splits},
        "shift": _shift(features, names, "test") if "test" in splits else None,
        "shift_val": _shift(features, names, "val") if "val" in splits else None,
        "cooccurrence": _cooccurrence(features["train"].labels, names),
    }
    co = summary["cooccurrence"]
    figures = {
        "label_prevalence.png": plot_class_balance(
            prevalence, names, title="label prevalence per split (known rows)", ylabel="prevalence"
        ),
        "label_cooccurrence.png": plot_cooccurrence(
            np.asarray(co["conditional"], dtype=float),
            np.asarray(co["both"]),
            names,
            title="label co-occurrence on train",
        ),
    }
    return Section(
        "label_balance",
        "Labels: prevalence, shift and co-occurrence",
        summary,
        headlines=_headlines(summary),
        markdown=_markdown(summary, splits),
        figures=figures,
        tables={
            "label_prevalence.csv": (
                [
                    {"label": n, **{f"{s}_prevalence": prevalence[s][j] for s in splits}}
                    | {f"{s}_known": int(known[s][j]) for s in splits}
                    for j, n in enumerate(names)
                ],
                ["label", *(f"{s}_prevalence" for s in splits), *(f"{s}_known" for s in splits)],
            )
        },
    )


def _shift(features, names: list, other: str) -> dict:
    """Per label: its prevalence on train and on ``other``, their difference and a two-sided
    z-test p-value."""
    tr, te = features["train"].labels, features[other].labels
    out = {}
    for j, name in enumerate(names):
        a, b = tr[:, j][tr[:, j] != UNKNOWN], te[:, j][te[:, j] != UNKNOWN]
        if not len(a) or not len(b):
            out[name] = {"skipped": f"no known rows in train or {other}"}
            continue
        p1, p2 = a.mean(), b.mean()
        pooled = (a.sum() + b.sum()) / (len(a) + len(b))
        se = math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
        z = (p2 - p1) / se if se > 0 else 0.0
        p = float(2 * norm.sf(abs(z))) if se > 0 else 1.0
        change = float(p2 - p1)
        out[name] = {
            "train": float(p1),
            other: float(p2),
            "change": change,
            "p_value": p,
            "shifted": bool(p < ALPHA and abs(change) >= SIMILAR_PREVALENCE),
        }
    return out


def _cooccurrence(Y: np.ndarray, names: list) -> dict:
    """Counts of images positive for both labels (both known), and P(B | A) on train."""
    pos = (Y == 1).astype(np.int64)
    both_known = (Y != UNKNOWN).astype(np.int64)
    both = pos.T @ pos
    a_positive_b_known = pos.T @ both_known  # rows: A positive, columns: B known
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = np.where(a_positive_b_known > 0, both / a_positive_b_known, np.nan)
    pairs = [
        (names[i], names[j], int(both[i, j]))
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if both[i, j]
    ]
    return {
        "both": both.tolist(),
        "conditional": [[None if np.isnan(v) else float(v) for v in row] for row in conditional],
        "pairs": sorted(pairs, key=lambda p: -p[2]),
        "n_labels_per_image": float(pos.sum(axis=1).mean()),
    }


def _headlines(summary: dict) -> list:
    out = []
    for other, key, consequence in (
        (
            "test",
            "shift",
            "thresholds chosen on val and prevalence-dependent metrics (AP, PPV) move with it; "
            "AUC does not",
        ),
        ("val", "shift_val", "thresholds chosen on val may not suit train's (or test's) mix"),
    ):
        shift = summary.get(key) or {}
        shifted = [(n, s) for n, s in shift.items() if s.get("shifted")]
        if shifted:
            parts = ", ".join(f"{n} {s['train']:.1%} -> {s[other]:.1%}" for n, s in shifted)
            out.append(f"label prevalence shifts from train to {other} ({parts}): {consequence}")
        elif shift:
            out.append(f"no label's prevalence differs significantly between train and {other}")
    return out


def _markdown(summary: dict, splits: list) -> list:
    names = summary["label_names"]
    out = [
        "Prevalence: the share of positives among the rows where the label is known "
        "(known rows in brackets). Unknown entries: "
        + ", ".join(f"{s} {summary['unknown_entries'][s]}" for s in splits)
        + ".",
        "",
        *md_table(
            ["label", *splits],
            [
                [n, *(f"{fmt(summary['prevalence'][s][j])} ({summary['known'][s][j]})" for s in splits)]
                for j, n in enumerate(names)
            ],
        ),
        "",
        "![label prevalence](label_prevalence.png)",
        "",
    ]
    for other, key in (("val", "shift_val"), ("test", "shift")):
        if not summary.get(key):
            continue
        out += [
            f"Shift from train to {other}, per label (two-proportion z-test; shifted: "
            f"p < {ALPHA} and a change of at least {SIMILAR_PREVALENCE:.0%}):",
            "",
            *md_table(
                ["label", "train", other, "change", "p", "shifted"],
                [
                    [
                        n,
                        fmt(s["train"]),
                        fmt(s[other]),
                        fmt(s["change"], signed=True),
                        f"{s['p_value']:.2g}",
                        "yes" if s["shifted"] else "no",
                    ]
                    if "skipped" not in s
                    else [n, "—", "—", "—", "—", s["skipped"]]
                    for n, s in summary[key].items()
                ],
            ),
            "",
        ]
    co = summary["cooccurrence"]
    out += [
        f"Co-occurrence on train: {co['n_labels_per_image']:.2f} positive labels per image on "
        "average; the cell (A, B) is the share of A's positives that are also B (images with "
        "both in brackets).",
        "",
        "![label co-occurrence](label_cooccurrence.png)",
        "",
    ]
    if co["pairs"]:
        out += [
            "Most frequent pairs: " + ", ".join(f"{a} + {b} ({n})" for a, b, n in co["pairs"][:5]) + "."
        ]
    return out


def not_applicable(name: str, title: str, why: str) -> Section:
    """A single-label diagnosis on multi-label data: said, not silently dropped."""
    summary = {"skipped": why, "skip_reason": "multilabel"}
    return Section(name, title, summary, markdown=[f"Does not apply: {why}"])
