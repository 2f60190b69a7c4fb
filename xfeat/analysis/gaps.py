"""Overfitting and generalisation: train/val/test gaps of the probe and of any given runs."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

from xfeat.analysis.section import SPLIT_ORDER, Section, diff, fmt, is_nan, md_table
from xfeat.files import safe_name
from xfeat.report import plot_training_curves
from xfeat.runs.results import RunRecord, RunResult, load_result

logger = logging.getLogger(__name__)

GAP_FLAG = 0.05  # an accuracy gap above this many points is called out
GAP_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "log_loss")
PROBE_NAME = "logistic probe (fit_head)"


def gaps_section(probe: RunResult, runs: Sequence = (), *, fingerprint: str = "") -> Section:
    """Train, val and test metrics of the probe and of each run in ``runs``; gaps; a reading.

    ``runs`` are run folders (or their ``results.json``); one that is the probe's own folder
    is not listed twice. A run made on other data (``fingerprint`` differs) is shown but
    marked not comparable. Runs with a training history get their curves as a figure.
    """
    entries = [(PROBE_NAME, probe.record, None)]
    for run in runs:
        run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
        if probe.run_dir is not None and run_dir.resolve() == probe.run_dir.resolve():
            continue
        entries.append((run_dir.name, load_result(run).record, run))
    summary = {"metrics": list(GAP_METRICS), "accuracy_gap_flag": GAP_FLAG, "runs": []}
    figures = {}
    for name, rec, run in entries:
        entry = _entry(name, rec, run, fingerprint)
        history = rec.history
        if history and all(
            f"{p}_{m}" in history[0] for p in ("train", "val") for m in ("accuracy", "loss")
        ):
            entry["curves_png"] = f"curves_{safe_name(name)}.png"
            figures[entry["curves_png"]] = functools.partial(
                plot_training_curves,
                history,
                title=name,
                best_epoch=rec.selection.get("best_epoch"),
            )
        summary["runs"].append(entry)
    return Section(
        "overfitting",
        "Overfitting and generalisation gaps",
        summary,
        headlines=_headlines(summary),
        markdown=_markdown(summary),
        figures=figures,
    )


def _entry(name: str, rec: RunRecord, run, fingerprint: str) -> dict:
    metrics = rec.metrics
    table = {s: {m: metrics[s].get(m) for m in GAP_METRICS} for s in SPLIT_ORDER if s in metrics}
    gaps = {
        f"{a}-{b}": {m: diff(table[a][m], table[b][m]) for m in GAP_METRICS}
        for a, b in (("train", "val"), ("val", "test"))
        if a in table and b in table
    }
    entry = {
        "name": name,
        "model": rec.model,
        "mode": rec.mode,
        "head": rec.head,
        "run_dir": str(run) if run else None,
        "metrics": table,
        "gaps": gaps,
        "threshold": rec.threshold.value,
        "test_ci": rec.ci.get("test", {}),
        "same_data": rec.dataset.fingerprint == fingerprint,
    }
    # A given run made on other data is listed but its gaps are not comparable to the probe's.
    entry["comparable"] = run is None or entry["same_data"]
    entry.update(_findings(entry))
    if not entry["comparable"]:
        logger.warning(
            "run %s was made on other data than this analysis; its gaps are shown but not comparable",
            run,
        )
    entry["interpretation"] = _meaning(entry)
    return entry


def _findings(entry: dict) -> dict:
    """The readings of the accuracy gaps, as data: what ``interpretation`` says in words.

    ``train_val_finding``: ``overfitting`` (train exceeds val by more than ``GAP_FLAG``),
    ``val_exceeds_train``, ``agree`` or None (no such splits); ``val_test_finding``:
    ``val_overstates_test``, ``test_exceeds_val``, ``agree`` or None;
    ``val_outside_test_ci``: val accuracy outside the test accuracy's 95% CI (None without
    val and test; False without a CI); ``extreme_threshold``: the val-chosen threshold is
    outside (0.02, 0.98).
    """
    tv = entry["gaps"].get("train-val", {}).get("accuracy")
    vt = entry["gaps"].get("val-test", {}).get("accuracy")
    out = {"train_val_finding": _direction(tv, "overfitting", "val_exceeds_train")}
    out["val_test_finding"] = _direction(vt, "val_overstates_test", "test_exceeds_val")
    out["val_outside_test_ci"] = None
    if vt is not None:
        ci = entry["test_ci"].get("accuracy")
        val_acc = entry["metrics"]["val"]["accuracy"]
        out["val_outside_test_ci"] = bool(
            ci is not None and not any(is_nan(c) for c in ci) and not ci[0] <= val_acc <= ci[1]
        )
    th = entry.get("threshold")
    out["extreme_threshold"] = bool(th is not None and not 0.02 < th < 0.98)
    return out


def _direction(gap, above: str, below: str):
    if gap is None:
        return None
    return above if gap > GAP_FLAG else below if gap < -GAP_FLAG else "agree"


def _meaning(entry: dict) -> str:
    parts = []
    tv = entry["gaps"].get("train-val", {}).get("accuracy")
    vt = entry["gaps"].get("val-test", {}).get("accuracy")
    if tv is not None:
        if entry["train_val_finding"] == "overfitting":
            parts.append(
                f"train accuracy exceeds val by {100 * tv:.1f} points: it fits the "
                "training images better than new ones (overfitting)"
            )
        elif entry["train_val_finding"] == "val_exceeds_train":
            parts.append(
                f"val accuracy exceeds train by {100 * -tv:.1f} points: no "
                "overfitting, but val is small or easier than train (train may hold "
                "the hard or mislabelled images; see label noise)"
            )
        else:
            parts.append(
                f"train and val accuracy agree within {100 * abs(tv):.1f} points: no "
                "sign of overfitting to the training images"
            )
    if vt is not None:
        outside = entry["val_outside_test_ci"]
        if entry["val_test_finding"] == "val_overstates_test":
            parts.append(
                f"val overstates test accuracy by {100 * vt:.1f} points"
                + (" (val is outside the test 95% CI, so not noise)" if outside else "")
                + ": val shares train's distribution, test does not (see shift)"
            )
        elif entry["val_test_finding"] == "test_exceeds_val":
            parts.append(
                f"test accuracy exceeds val by {100 * -vt:.1f} points"
                + (" (outside the test 95% CI)" if outside else "")
            )
        else:
            parts.append(f"val predicts test accuracy within {100 * abs(vt):.1f} points")
    th = entry.get("threshold")
    if entry["extreme_threshold"]:
        parts.append(
            f"caution: the threshold chosen on val is extreme ({th:.3f}; val is "
            "probably separated perfectly), so accuracies at it are unstable; compare "
            "roc_auc and log_loss"
        )
    return "; ".join(parts) + "." if parts else "not enough splits to compare."


def _headlines(s: dict) -> list:
    probe = s["runs"][0]
    m = probe["metrics"]
    if not {"train", "val", "test"} <= set(m):
        return []
    return [
        f"logistic probe accuracy train {m['train']['accuracy']:.3f}, val "
        f"{m['val']['accuracy']:.3f}, test {m['test']['accuracy']:.3f}: "
        f"{probe['interpretation']}"
    ]


def _markdown(s: dict) -> list:
    out = [
        "Metrics at each run's threshold chosen on val (so val is slightly optimistic); "
        "log_loss: lower is better, the others: higher is better. Gaps are differences "
        "(train - val, val - test).",
        "",
    ]
    for run in s["runs"]:
        title = f"**{run['name']}** ({run['model']}, {run['mode']}, head {run['head']})"
        if not run["comparable"]:
            title += " — made on other data, not comparable"
        out += [title, ""]
        cols = list(run["metrics"]) + list(run["gaps"])
        rows = [
            [
                m,
                *[fmt(run["metrics"][split][m]) for split in run["metrics"]],
                *[fmt(run["gaps"][g][m], signed=True) for g in run["gaps"]],
            ]
            for m in s["metrics"]
        ]
        out += md_table(["metric", *cols], rows)
        out += ["", run["interpretation"], ""]
        if run.get("curves_png"):
            out += [f"![training curves of {run['name']}]({run['curves_png']})", ""]
    return out
