"""From saved run results to the comparison: table rows, the best run, significance tests,
timings.

A run from random weights is timed like any other but never chosen as the best: its accuracy
says nothing about transfer learning. Nothing here trains a model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from xfeat.runs.results import RunRecord, RunResult

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random init: speed only"
TRANSDUCTIVE = "transductive"
CHOSEN_BY = "val AUC, among runs from pretrained weights"
ALPHA = 0.05  # a difference from the best is called significant below this p-value


def table_row(model: str, mode: str, result: RunResult) -> dict:
    """One row of the comparison table from a run's ``results.json``."""
    from xfeat.backbones import parameter_count

    r = result.record
    t, test, ci = r.timing, r.metrics["test"], r.ci.get("test", {})
    params = r.params
    if mode == "zero-shot":  # nothing trained: the prompts' embedding is its "fit"
        n_params, trainable = parameter_count(model), 0
        extract_s, train_s, eval_s = t["extract_seconds"], t["fit_seconds"], t["evaluate_seconds"]
        ips = None
    elif mode == "cached":
        n_params, trainable = parameter_count(model), _head_params(r)
        extract_s, train_s, eval_s = t["extract_seconds"], t["fit_seconds"], t["evaluate_seconds"]
        ips = t.get("extract_images_per_second")
    else:
        n_params, trainable = params.get("parameters"), params.get("trainable_parameters")
        extract_s, train_s, eval_s = (
            t.get("store_seconds", 0.0),
            t["train_seconds"],
            t["evaluate_seconds"],
        )
        ips = t.get("train_images_per_second")
    w = r.weights
    transductive = r.transductive
    return {
        "model": model,
        "mode": mode,
        "head": r.head,
        "weights": w.id if w.kind not in ("file", "torchscript") else Path(w.id).name,
        "weights_kind": w.kind,
        "transductive": transductive,
        "caveat": run_caveat(w.kind, transductive),
        "parameters": n_params,
        "trainable_parameters": trainable,
        "extract_seconds": extract_s,
        "train_seconds": train_s,
        "evaluate_seconds": eval_s,
        "total_seconds": extract_s + train_s + eval_s,
        "images_per_second": ips,
        "peak_memory_mib": r.peak_memory_mib,
        "epochs": len(r.history) or None,
        # multi-label runs have no accuracy: their AUC and AP are macro over labels
        "multilabel": r.multilabel,
        "val_accuracy": r.metrics["val"].get("accuracy"),
        "val_auc": r.metrics["val"]["roc_auc"],
        "test_accuracy": test.get("accuracy"),
        "test_accuracy_ci": ci.get("accuracy"),
        "balanced_accuracy": test.get("balanced_accuracy"),
        "auc": test["roc_auc"],
        "auc_ci": ci.get("roc_auc"),
        "average_precision": test.get("average_precision"),
        "sensitivity": test["sensitivity"],
        "sensitivity_ci": ci.get("sensitivity"),
        "specificity": test["specificity"],
        "specificity_ci": ci.get("specificity"),
        "threshold": r.threshold.value,
        "n_classes": len(r.dataset.class_names),
        "run_dir": r.run_dir,
    }


def run_caveat(weights_kind: str, transductive: bool = False) -> str:
    """What a reader must know before reading a run's accuracy; ``""`` when nothing."""
    return "; ".join(
        c
        for c, applies in ((RANDOM_WEIGHTS, weights_kind == "random"), (TRANSDUCTIVE, transductive))
        if applies
    )


def run_label(row: dict) -> str:
    """``resnet18 full``, with the caveat in brackets when there is one."""
    label = f"{row['model']} {row['mode']}"
    return f"{label} ({row['caveat']})" if row.get("caveat") else label


def best_run(rows: list) -> Optional[int]:
    """Index of the row with the highest val AUC (then val accuracy) among runs from
    pretrained weights; ``None`` when every run starts from random weights."""
    candidates = [i for i, r in enumerate(rows) if r["weights_kind"] != "random"]
    if not candidates:
        return None
    return max(candidates, key=lambda i: (_or(rows[i]["val_auc"]), _or(rows[i]["val_accuracy"])))


def _head_params(record: RunRecord) -> Optional[int]:
    """Trainable numbers of a head on the cache: ``C x D`` (+ biases); k-NN has none."""
    d = record.cache.feature_dim if record.cache is not None else None
    c = len(record.dataset.class_names)
    if d is None:
        return None
    if record.multilabel:  # one binary head per label
        return c * {"logreg": d + 1, "linear": 2 * d + 2, "knn": 0}[record.head]
    k = 1 if c == 2 else c
    return {"logreg": d * k + k, "linear": d * c + c, "knn": 0}[record.head]


def significance(results, rows: list, best: Optional[int], patients: Optional[dict] = None) -> list:
    """Each run against the best (``rows[best]``, see :func:`best_run`), on the same test
    images: DeLong for AUC (binary), a paired bootstrap for accuracy at each run's own
    threshold. Multi-label runs: a paired bootstrap of the macro AUC (over patients, when
    ``patients`` maps test ids to them) and DeLong per label. ``results`` and ``rows`` are
    aligned; ``[]`` without a best or a second run.
    """
    from xfeat.evaluation.multilabel import paired_multilabel_test
    from xfeat.evaluation.stats import delong_test, paired_bootstrap

    if best is None or "test" not in results[best][2].predictions:
        return []
    best_result = results[best][2]
    ids_b, _, p_b = best_result.predictions["test"]
    order_b = np.argsort(np.asarray(ids_b))
    tests = [{"best": run_label(rows[best]), "chosen_by": CHOSEN_BY}]
    for i, ((model, mode, r), row) in enumerate(zip(results, rows)):
        if i == best or "test" not in r.predictions:
            continue
        ids, y, p = r.predictions["test"]
        order = np.argsort(np.asarray(ids))
        if list(np.asarray(ids)[order]) != list(np.asarray(ids_b)[order_b]):
            logger.warning("%s %s was evaluated on other test images; no paired test", model, mode)
            continue
        y_sorted, pa, pb = np.asarray(y)[order], np.asarray(p)[order], np.asarray(p_b)[order_b]
        entry = {"model": model, "mode": mode, "caveat": row["caveat"], "against": tests[0]["best"]}
        if np.asarray(y).ndim == 2:  # multi-label
            ids_sorted = np.asarray(ids)[order]
            groups = [patients[i] for i in ids_sorted] if patients else None
            labels = list(r.record.dataset.class_names)
            t = paired_multilabel_test(y_sorted, pa, pb, labels, groups=groups, n_boot=2000, seed=0)
            entry.update(
                auc_n_boot=2000,
                auc_diff=t["diff"],
                auc_p_value=t["p_value"],
                auc_diff_ci=t["ci"],
                auc_test="paired bootstrap of the macro AUC over " + t["resampled"],
                per_label=t["per_label"],
                significant=bool(_or(t["p_value"], 1.0) < ALPHA),
            )
            tests.append(entry)
            continue
        if pa.shape[1] == 2 and len(np.unique(y_sorted)) == 2:  # DeLong needs both classes
            d = delong_test(y_sorted, pa[:, 1], pb[:, 1])
            entry.update(auc_diff=d["diff"], auc_p_value=d["p_value"], auc_diff_ci=d["ci"])
        n_boot = 2000
        acc = paired_bootstrap(
            y_sorted,
            pa,
            pb,
            metric="accuracy",
            n_boot=n_boot,
            threshold_a=r.record.threshold.value or 0.5,
            threshold_b=best_result.record.threshold.value or 0.5,
        )
        entry.update(
            accuracy_diff=acc["diff"],
            accuracy_p_value=acc["p_value"],
            accuracy_diff_ci=acc["ci"],
            n_boot=n_boot,
        )
        entry["significant"] = bool(
            min(_or(entry.get("auc_p_value"), 1.0), entry["accuracy_p_value"]) < ALPHA
        )
        tests.append(entry)
    return tests if len(tests) > 1 else []


def _or(value, default=-1.0):
    return default if value is None or value != value else value


def format_seconds(seconds: float) -> str:
    """``152``, ``3.1``, ``0.06``: whole seconds from 10 s, tenths from 1 s, hundredths below."""
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"


def speed_ratio(slow_seconds: float, fast_seconds: float) -> str:
    """``"12.3x faster"`` or ``"1.04x faster"`` (two decimals below 2x, so that a near tie
    never reads "1.0x") when ``fast_seconds`` is the smaller, else ``"1.25x slower"``."""
    if fast_seconds <= 0 or slow_seconds <= 0:
        return "n/a"
    ratio = slow_seconds / fast_seconds
    if ratio < 1:
        return f"{1 / ratio:.2f}x slower"
    return f"{ratio:.2f}x faster" if ratio < 2 else f"{ratio:.1f}x faster"


def timing_rows(rows: list, baselines: dict) -> list:
    """Per model: the cached path (extraction, head fit) against the frozen baseline and full
    fine-tuning, in seconds and as ratios. ``baselines``: model ->
    :func:`xfeat.comparison.run.linear_on_cache`'s result (the frozen baseline's own recipe on
    the cache, for a like-for-like time)."""
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["mode"]] = row
    return [_timing_row(model, modes, baselines.get(model)) for model, modes in by_model.items()]


def _timing_row(model: str, modes: dict, linear) -> dict:
    cached, frozen, full = (modes.get(m) for m in ("cached", "frozen", "full"))
    kind = next(iter(modes.values()))["weights_kind"]
    t = {
        "model": model,
        "weights_kind": kind,
        "caveat": run_caveat(kind),
        "head": _get(cached, "head"),
        "extract_seconds": _get(cached, "extract_seconds"),
        "head_fit_seconds": _get(cached, "train_seconds"),
        "cached_test_accuracy": _get(cached, "test_accuracy"),
    }
    for name, row in (("frozen", frozen), ("full", full)):
        t.update(
            {
                f"{name}_seconds": _get(row, "train_seconds"),
                f"{name}_epochs": _get(row, "epochs"),
                f"{name}_test_accuracy": _get(row, "test_accuracy"),
            }
        )
    t["same_recipe_on_cache_seconds"] = None if linear is None else linear.record.timing["fit_seconds"]
    t["same_recipe_on_cache_test_accuracy"] = (
        None if linear is None else linear.record.metrics["test"].get("accuracy")
    )
    # Ratios: the slower run's seconds over the cached path's (> 1: the cache is faster).
    fit = _get(cached, "train_seconds")
    with_extraction = None if cached is None else cached["extract_seconds"] + fit
    for key, slow, fast in (
        ("cached_vs_frozen", frozen, with_extraction),
        ("cache_built_vs_frozen", frozen, fit),
        ("cached_vs_full", full, with_extraction),
    ):
        known = slow is not None and fast is not None
        t[key] = speed_ratio(slow["train_seconds"], fast) if known else None
        t[f"{key}_ratio"] = slow["train_seconds"] / fast if known and fast > 0 else None
    return t


def _get(row: Optional[dict], key: str):
    return None if row is None else row[key]
