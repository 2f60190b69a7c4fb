"""Class balance: class counts per split, the majority-class baseline and the prior shift."""

from __future__ import annotations

import numpy as np

from xfeat.analysis.section import Section, md_table, split_names
from xfeat.report.analysis_figures import plot_class_balance

# A change in the majority class's fraction (test - train) below this is no prior shift.
SIMILAR_PRIOR = 0.02
ALPHA = 0.05  # a chi-square p-value of the train/test class counts below this is a prior shift


def balance_section(features) -> Section:
    """Counts and fractions per split, the majority-class baseline and the prior shift.

    The majority class is train's; the baseline predicts it for every image of the other
    splits (its balanced accuracy is ``1 / n_classes`` by construction).
    """
    names = features.class_names
    k = len(names)
    counts = {s: np.bincount(features[s].labels, minlength=k) for s in split_names(features)}
    fractions = {s: (c / max(1, c.sum())).tolist() for s, c in counts.items()}
    majority = int(np.argmax(counts["train"]))
    summary = {
        "class_names": names,
        "counts": {
            s: {**{n: int(v) for n, v in zip(names, c)}, "total": int(c.sum())}
            for s, c in counts.items()
        },
        "fractions": fractions,
        "majority_class": names[majority],
        "majority_baseline": {
            s: {"accuracy": fractions[s][majority], "balanced_accuracy": 1.0 / k}
            for s in counts
            if s != "train"
        },
        "prior_shift": (
            _prior_shift(counts["train"], counts["test"], names, majority) if "test" in counts else None
        ),
    }
    figure = plot_class_balance(
        fractions, names, title=f"class fractions per split ({features.meta.dataset.name})"
    )
    return Section(
        "class_balance",
        "Class balance",
        summary,
        headlines=_headlines(summary),
        markdown=_markdown(summary),
        figures={"class_balance.png": figure},
    )


def _prior_shift(train_counts, test_counts, names: list, majority: int) -> dict:
    """Train and test class fractions, and whether they differ beyond sampling noise: a
    chi-square test of the 2 x K table of counts (scipy), a shift only when p < ALPHA."""
    from scipy.stats import chi2_contingency

    tr, te = train_counts / train_counts.sum(), test_counts / test_counts.sum()
    table = np.stack([train_counts, test_counts])
    table = table[:, table.sum(axis=0) > 0]
    p_value = float(chi2_contingency(table)[1]) if table.shape[1] > 1 else 1.0
    shift = {
        "total_variation": float(0.5 * np.abs(tr - te).sum()),
        "train": tr.tolist(),
        "test": te.tolist(),
        "chi2_p_value": p_value,
        "beyond_noise": p_value < ALPHA,
    }
    if len(names) == 2:
        shift.update(positive_class=names[1], train_positive=float(tr[1]), test_positive=float(te[1]))
    m = names[majority]
    change = float(te[majority] - tr[majority])
    # How train's majority class fares in test: "similar" (within SIMILAR_PRIOR, or within
    # sampling noise), "lower", "higher".
    similar = abs(change) < SIMILAR_PRIOR or not shift["beyond_noise"]
    direction = "similar" if similar else "lower" if change < 0 else "higher"
    shift.update(majority_fraction_change=change, majority_test_vs_train=direction)
    noise = f"chi-square p = {p_value:.2g}"
    if direction == "similar":
        shift["meaning"] = (
            f"train and test have similar class priors ({m} {tr[majority]:.1%} vs "
            f"{te[majority]:.1%}; the fractions differ by no more than sampling noise, {noise}): "
            "no prior shift to correct for."
            if not shift["beyond_noise"]
            else f"train and test have similar class priors ({m} {tr[majority]:.1%} vs "
            f"{te[majority]:.1%}): no prior shift to correct for."
        )
    elif direction == "lower":
        shift["meaning"] = (
            f"train is {tr[majority]:.1%} {m} but test only {te[majority]:.1%} ({noise}): a "
            f"model fitted to the train priors over-calls {m} on test. Balanced accuracy "
            "and a prevalence-free operating point (balanced class weights, a Youden threshold "
            "chosen on val) mitigate it."
        )
    else:
        shift["meaning"] = (
            f"test has more {m} ({te[majority]:.1%}) than train ({tr[majority]:.1%}; {noise}): a model "
            f"tuned to the train priors under-calls {m} on test; balanced accuracy and a "
            "prevalence-free operating point mitigate it."
        )
    return shift


def _headlines(s: dict) -> list:
    ps = s["prior_shift"]
    if ps and "train_positive" in ps:
        return [
            f"class priors: train {ps['train_positive']:.1%} {ps['positive_class']} vs "
            f"test {ps['test_positive']:.1%}; majority-class baseline accuracy on test "
            f"{s['majority_baseline']['test']['accuracy']:.3f}"
        ]
    if ps:
        noise = "beyond" if ps["beyond_noise"] else "within"
        return [
            f"class priors: train vs test total variation {ps['total_variation']:.3f} "
            f"({noise} sampling noise, chi-square p = {ps['chi2_p_value']:.2g})"
        ]
    return []


def _markdown(s: dict) -> list:
    names = s["class_names"]
    out = md_table(
        ["split", *names, "total"],
        [
            [
                split,
                *[f"{s['counts'][split][n]} ({f:.1%})" for n, f in zip(names, s["fractions"][split])],
                s["counts"][split]["total"],
            ]
            for split in s["counts"]
        ],
    )
    out += [
        "",
        f"Majority class in train: **{s['majority_class']}**. Predicting it for every "
        "image scores: "
        + "; ".join(
            f"{split} accuracy {v['accuracy']:.3f}, balanced accuracy {v['balanced_accuracy']:.3f}"
            for split, v in s["majority_baseline"].items()
        )
        + ".",
        "",
    ]
    if s["prior_shift"]:
        out += [f"Prior shift: {s['prior_shift']['meaning']}", ""]
    return out + ["![class fractions per split](class_balance.png)", ""]
