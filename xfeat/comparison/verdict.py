"""The verdict a comparison report opens with, as data.

From the rows, the timings and the significance tests (nothing is trained or fitted here):
the best run and its test metrics, what the cached path saves against the frozen baseline and
fine-tuning and at what accuracy, and which differences from the best are significant. The
report prints ``verdict["sentences"]``; the other keys hold the same facts as numbers.
"""

from __future__ import annotations

from typing import Optional

from xfeat.evaluation.stats import format_interval, format_p_value
from xfeat.report.rows import ALPHA, CHOSEN_BY, RANDOM_WEIGHTS, TRANSDUCTIVE, format_seconds, run_label

METHOD = "DeLong test for AUC, paired bootstrap for accuracy"
METHOD_MULTILABEL = "paired bootstrap of the macro AUC, DeLong per label"


def build_verdict(rows: list, tests: list, timings: list, best: Optional[int]) -> dict:
    """``best``: index into ``rows`` (:func:`~xfeat.report.rows.best_run`), or ``None``."""
    verdict = {
        "chosen_by": CHOSEN_BY,
        "best": None if best is None else _best(rows[best]),
        "random_weights_models": sorted({r["model"] for r in rows if r["weights_kind"] == "random"}),
        "speed": [
            _speed(t)
            for t in timings
            if t["extract_seconds"] is not None
            and (t["frozen_seconds"] is not None or t["full_seconds"] is not None)
        ],
        "significance": _significance(tests, multilabel=any(r.get("multilabel") for r in rows)),
    }
    verdict["sentences"] = (
        [_best_sentence(verdict)]
        + [_speed_sentence(s) for s in verdict["speed"]]
        + _significance_sentences(verdict)
    )
    return verdict


def _best(row: dict) -> dict:
    keys = (
        "model",
        "mode",
        "weights",
        "transductive",
        "val_auc",
        "val_accuracy",
        "test_accuracy",
        "test_accuracy_ci",
        "auc",
        "auc_ci",
        "average_precision",
        "multilabel",
    )
    return {"run": run_label(row), **{k: row.get(k) for k in keys}}


def _speed(t: dict) -> dict:
    random = t["weights_kind"] == "random"
    cached_acc = t["cached_test_accuracy"]
    against = []
    for mode, name in (("frozen", "the frozen baseline"), ("full", "full fine-tuning")):
        if t[f"{mode}_seconds"] is None:
            continue
        other_acc = t[f"{mode}_test_accuracy"]
        known = not random and None not in (cached_acc, other_acc)
        against.append(
            {
                "mode": mode,
                "name": name,
                "seconds": t[f"{mode}_seconds"],
                "epochs": t[f"{mode}_epochs"],
                "speed": t[f"cached_vs_{mode}"],
                "ratio": t[f"cached_vs_{mode}_ratio"],
                "test_accuracy": None if random else other_acc,
                "accuracy_diff": cached_acc - other_acc if known else None,
            }
        )
    return {
        "model": t["model"],
        "random_weights": random,
        "head": t["head"],
        "extract_seconds": t["extract_seconds"],
        "head_fit_seconds": t["head_fit_seconds"],
        "cached_seconds": t["extract_seconds"] + t["head_fit_seconds"],
        "cached_test_accuracy": None if random else cached_acc,
        "against": against,
        "cache_built_vs_frozen": t["cache_built_vs_frozen"],
    }


def _significance(tests: list, multilabel: bool = False) -> dict:
    out = {
        "method": METHOD_MULTILABEL if multilabel else METHOD,
        "alpha": ALPHA,
        "against": tests[0]["best"] if tests else None,
        "significant": [],
        "not_significant": [],
        "random_weights_left_out": [],
    }
    for t in tests[1:]:
        if RANDOM_WEIGHTS in t["caveat"]:
            out["random_weights_left_out"].append(f"{t['model']} {t['mode']}")
            continue
        entry = {
            "run": run_label(t),
            **{
                k: t.get(k)
                for k in (
                    "auc_diff",
                    "auc_p_value",
                    "auc_n_boot",
                    "accuracy_diff",
                    "accuracy_p_value",
                    "n_boot",
                )
            },
        }
        out["significant" if t["significant"] else "not_significant"].append(entry)
    return out


def _best_sentence(v: dict) -> str:
    b, randoms = v["best"], v["random_weights_models"]
    if b is None:
        return (
            "No meaningful best run: every run starts from random weights, so its "
            f"accuracy says nothing about transfer learning ({RANDOM_WEIGHTS}). The "
            "timings still hold."
        )
    if b.get("multilabel"):
        text = (
            f"Best run by {v['chosen_by']} (macro over labels): {b['model']} {b['mode']} (val "
            f"macro AUC {_num(b['val_auc'])}). On test: macro AUC "
            f"{format_interval(b['auc'], b['auc_ci'])} (95% bootstrap CI), mAP "
            f"{_num(b['average_precision'])}."
        )
    else:
        text = (
            f"Best run by {v['chosen_by']}: {b['model']} {b['mode']} (val AUC "
            f"{_num(b['val_auc'])}). On test: accuracy "
            f"{format_interval(b['test_accuracy'], b['test_accuracy_ci'])}, AUC "
            f"{format_interval(b['auc'], b['auc_ci'])} (95% bootstrap CIs)."
        )
    if b["transductive"]:
        text += f" It is {TRANSDUCTIVE}: its test predictions adapted to the unlabelled test images."
    if randoms:
        text += (
            f" Runs of {', '.join(randoms)} start from random weights: timed, never "
            f"chosen ({RANDOM_WEIGHTS})."
        )
    return text


def _speed_sentence(s: dict) -> str:
    model = f"{s['model']} ({RANDOM_WEIGHTS})" if s["random_weights"] else s["model"]
    parts = []
    for a in s["against"]:
        epochs = "" if not a["epochs"] else f", {a['epochs']} epoch{'s' if a['epochs'] != 1 else ''}"
        parts.append(
            f"{a['speed']} than {a['name']} ({_seconds(a['seconds'])}{epochs})"
            + _accuracy_change(s["cached_test_accuracy"], a)
        )
    text = (
        f"{model}: the cached path (extraction {_seconds(s['extract_seconds'])} + "
        f"{s['head']} head {_seconds(s['head_fit_seconds'])}) is " + ", and ".join(parts) + "."
    )
    if s["cache_built_vs_frozen"]:
        text += f" Once the cache exists: {s['cache_built_vs_frozen']} than the frozen baseline."
    if s["random_weights"]:
        text += " Accuracies from random weights are not compared."
    return text


def _accuracy_change(cached_acc, against: dict) -> str:
    diff = against["accuracy_diff"]
    if diff is None:
        return ""
    pair = f"{cached_acc:.3f} vs {against['test_accuracy']:.3f}"
    if abs(diff) < 5e-4:
        return f", at the same test accuracy ({pair})"
    return f", {'gaining' if diff > 0 else 'losing'} {abs(diff):.3f} test accuracy ({pair})"


def _significance_sentences(v: dict) -> list:
    s = v["significance"]
    if v["best"] is None:
        return []
    if s["against"] is None:
        return [
            f"No other run was scored on the same test images: nothing to test against "
            f"{v['best']['run']}."
        ]
    head = f"Against {s['against']} ({s['method']}, p < {s['alpha']:g})"
    out = []
    if s["significant"]:
        out.append(
            f"{head}, significantly different: "
            + "; ".join(_test_text(e, diffs=True) for e in s["significant"])
            + "."
        )
    if s["not_significant"]:
        lead = (
            "not significantly different"
            if s["significant"]
            else f"{head}, no run differs significantly"
        )
        lead = lead[0].upper() + lead[1:]
        out.append(
            f"{lead}: " + "; ".join(_test_text(e, diffs=False) for e in s["not_significant"]) + "."
        )
    if s["random_weights_left_out"]:
        out.append(
            "Runs from random weights are tested in the table below but not summarised "
            f"here ({RANDOM_WEIGHTS})."
        )
    return out


def _test_text(e: dict, diffs: bool) -> str:
    parts = []
    if e["auc_p_value"] is not None:
        diff = f"{e['auc_diff']:+.3f}, " if diffs else ""
        parts.append(f"AUC {diff}p {format_p_value(e['auc_p_value'], e.get('auc_n_boot'))}")
    if e.get("accuracy_p_value") is not None:
        diff = f"{e['accuracy_diff']:+.3f}, " if diffs else ""
        parts.append(f"accuracy {diff}p {format_p_value(e['accuracy_p_value'], e['n_boot'])}")
    return f"{e['run']} ({'; '.join(parts)})"


def _seconds(s: float) -> str:
    return f"{format_seconds(s)} s"


def _num(x) -> str:
    return "—" if x is None else f"{x:.3f}"
