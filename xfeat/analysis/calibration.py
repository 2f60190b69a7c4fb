"""Calibration of the probe (reliability, ECE, Brier) and the effect of its val-chosen threshold."""

from __future__ import annotations

from xfeat.analysis.section import Section, diff, fmt, md_table
from xfeat.evaluation.metrics import reliability_curve
from xfeat.report.analysis_figures import plot_reliability
from xfeat.runs.results import RunResult

THRESHOLD_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity")


def calibration_section(probe: RunResult) -> Section:
    """Reliability curves and ECE of the probe on val and test; threshold vs 0.5 on test.

    ECE is ``compute_metrics``'s (top-label, 15 bins), as everywhere in xfeat. For binary
    problems the diagram plots the positive-class probability against the observed rate.
    """
    rec = probe.record
    names = rec.dataset.class_names
    splits = [s for s in ("val", "test") if s in probe.predictions]
    binary = len(names) == 2
    positive = names[1] if binary else None
    summary = {
        "x": f"predicted probability of {positive}" if binary else "top-label confidence",
        # the class whose probability the curves plot; None: top-label confidence (multi-class)
        "positive_class": positive,
        "ece": {s: rec.metrics[s]["ece"] for s in splits},
        "brier": {s: rec.metrics[s]["brier"] for s in splits},
        "curves": {
            s: reliability_curve(probe.predictions[s][1], probe.predictions[s][2]) for s in splits
        },
        "threshold": None,
    }
    if binary and "test" in rec.metrics:
        chosen = {k: rec.metrics["test"][k] for k in THRESHOLD_METRICS}
        half = {k: rec.metrics_at_half["test"][k] for k in THRESHOLD_METRICS}
        summary["threshold"] = {
            "rule": rec.threshold.rule,
            "value": rec.threshold.value,
            "chosen_on": "val",
            "test_at_chosen": chosen,
            "test_at_0.5": half,
            "difference": {k: diff(chosen[k], half[k]) for k in THRESHOLD_METRICS},
        }
    figure = plot_reliability(
        summary["curves"], ece=summary["ece"], title="logistic probe: reliability", xlabel=summary["x"]
    )
    return Section(
        "calibration",
        "Calibration and operating point",
        summary,
        headlines=_headlines(summary),
        markdown=_markdown(summary),
        figures={"reliability.png": figure},
    )


def _headlines(s: dict) -> list:
    if not s["ece"]:
        return []
    text = "probe ECE " + ", ".join(f"{k} {v:.3f}" for k, v in s["ece"].items())
    th = s["threshold"]
    if th:
        text += (
            f"; threshold {th['value']:.2f} chosen on val vs 0.5 on test: balanced "
            f"accuracy {th['test_at_chosen']['balanced_accuracy']:.3f} vs "
            f"{th['test_at_0.5']['balanced_accuracy']:.3f}"
        )
    return [text]


def _markdown(s: dict) -> list:
    out = [
        "ECE: top-label expected calibration error, 15 bins (as in results.json). "
        + ", ".join(f"{split} {v:.3f}" for split, v in s["ece"].items())
        + "; Brier "
        + ", ".join(f"{split} {v:.3f}" for split, v in s["brier"].items())
        + ".",
        "",
        "![reliability diagram of the logistic probe](reliability.png)",
        "",
    ]
    th = s["threshold"]
    if th:
        out += [f"Threshold {th['value']:.3f} ({th['rule']}, chosen on val) vs 0.5, on test:", ""]
        out += md_table(
            ["metric", f"at {th['value']:.3f}", "at 0.5", "difference"],
            [
                [
                    k,
                    fmt(th["test_at_chosen"][k]),
                    fmt(th["test_at_0.5"][k]),
                    fmt(th["difference"][k], signed=True),
                ]
                for k in th["test_at_chosen"]
            ],
        )
        out += [""]
    return out
