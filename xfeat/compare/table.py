"""From saved run results to the comparison: table rows, significance tests, time savings.

Nothing here trains a model except :func:`linear_on_cache`, which is computed once per
comparison folder and then reused like any other run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..results import RunResult, load_result

logger = logging.getLogger(__name__)


def table_row(model: str, mode: str, result: RunResult) -> dict:
    """One row of the comparison table from a run's ``results.json``."""
    from ..backbones import parameter_count

    r = result.record
    t, test, ci = r["timing"], r["metrics"]["test"], r.get("ci", {}).get("test", {})
    params = r.get("params", {})
    if mode == "cached":
        n_params, trainable = parameter_count(model), _head_params(r)
        extract_s, train_s, eval_s = t["extract_seconds"], t["fit_seconds"], t["evaluate_seconds"]
        ips = t.get("extract_images_per_second")
    else:
        n_params, trainable = params.get("parameters"), params.get("trainable_parameters")
        extract_s, train_s, eval_s = t.get("store_seconds", 0.0), t["train_seconds"], \
            t["evaluate_seconds"]
        ips = t.get("train_images_per_second")
    w = r["weights"]
    return {
        "model": model, "mode": mode, "head": r["head"],
        "weights": w["id"] if w["kind"] != "file" else Path(w["id"]).name,
        "weights_kind": w["kind"],
        "parameters": n_params, "trainable_parameters": trainable,
        "extract_seconds": extract_s, "train_seconds": train_s, "evaluate_seconds": eval_s,
        "total_seconds": extract_s + train_s + eval_s, "images_per_second": ips,
        "peak_memory_mib": r.get("peak_memory_mib"),
        "epochs": len(r.get("history") or []) or None,
        "val_accuracy": r["metrics"]["val"]["accuracy"],
        "val_auc": r["metrics"]["val"]["roc_auc"],
        "test_accuracy": test["accuracy"], "test_accuracy_ci": ci.get("accuracy"),
        "balanced_accuracy": test["balanced_accuracy"], "auc": test["roc_auc"],
        "auc_ci": ci.get("roc_auc"), "sensitivity": test["sensitivity"],
        "sensitivity_ci": ci.get("sensitivity"), "specificity": test["specificity"],
        "specificity_ci": ci.get("specificity"), "threshold": r["threshold"]["value"],
        "run_dir": r.get("run_dir"),
    }


def _head_params(record: dict) -> Optional[int]:
    """Trainable numbers of a head on the cache: ``C x D`` (+ biases); k-NN has none."""
    cache = record.get("cache") or {}
    d, c = cache.get("feature_dim"), len(record["dataset"]["class_names"])
    if d is None:
        return None
    k = 1 if c == 2 else c
    return {"logreg": d * k + k, "linear": d * c + c, "knn": 0}[record["head"]]


def significance(results) -> list:
    """Each run against the best by val AUC, on the same test images.

    DeLong for AUC (binary), a paired bootstrap for accuracy at each run's own threshold.
    """
    from ..stats import delong_test, paired_bootstrap

    usable = [(m, mode, r) for m, mode, r in results if "test" in r.predictions]
    if len(usable) < 2:
        return []
    best = max(usable, key=lambda x: (_or(x[2]["metrics"]["val"]["roc_auc"]),
                                      _or(x[2]["metrics"]["val"]["accuracy"])))
    ids_b, _, p_b = best[2].predictions["test"]
    order_b = np.argsort(np.asarray(ids_b))
    tests = [{"best": f"{best[0]} {best[1]}", "chosen_by": "val AUC"}]
    for model, mode, r in usable:
        if r is best[2]:
            continue
        ids, y, p = r.predictions["test"]
        order = np.argsort(np.asarray(ids))
        if list(np.asarray(ids)[order]) != list(np.asarray(ids_b)[order_b]):
            logger.warning("%s %s was evaluated on other test images; no paired test", model, mode)
            continue
        y_sorted, pa, pb = np.asarray(y)[order], np.asarray(p)[order], np.asarray(p_b)[order_b]
        entry = {"model": model, "mode": mode, "against": tests[0]["best"]}
        if pa.shape[1] == 2:
            d = delong_test(y_sorted, pa[:, 1], pb[:, 1])
            entry.update(auc_diff=d["diff"], auc_p_value=d["p_value"], auc_diff_ci=d["ci"])
        n_boot = 2000
        acc = paired_bootstrap(y_sorted, pa, pb, metric="accuracy", n_boot=n_boot,
                               threshold_a=r["threshold"]["value"] or 0.5,
                               threshold_b=best[2]["threshold"]["value"] or 0.5)
        entry.update(accuracy_diff=acc["diff"], accuracy_p_value=acc["p_value"],
                     accuracy_diff_ci=acc["ci"], n_boot=n_boot)
        entry["significant"] = bool(min(_or(entry.get("auc_p_value"), 1.0),
                                        entry["accuracy_p_value"]) < 0.05)
        tests.append(entry)
    return tests


def _or(value, default=-1.0):
    return default if value is None or value != value else value


def linear_on_cache(cached: RunResult, epochs: Optional[int], run_root: Path):
    """The frozen baseline's linear layer and SGD recipe, trained on the cached features for
    the same number of epochs: the like-for-like time of the cached path. Saved once in
    ``run_root`` and reused."""
    from ..fit import fit_head

    if epochs is None or not cached.record.get("cache"):
        return None
    cache_path = Path(cached.record["cache"]["path"])
    run_dir = run_root / f"{Path(cached.record['run_dir']).name}-as-linear-{epochs}ep"
    if (run_dir / "results.json").is_file():
        return load_result(run_dir)
    if not cache_path.is_file():
        return None
    return fit_head(cache=cache_path, head="linear", head_params={"epochs": epochs},
                    out_dir=run_dir, n_boot=0)


def speed_ratio(slow_seconds: float, fast_seconds: float) -> str:
    """``"12.3x faster"`` when ``fast_seconds`` is the smaller, else ``"1.25x slower"``."""
    if fast_seconds <= 0 or slow_seconds <= 0:
        return "n/a"
    ratio = slow_seconds / fast_seconds
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def time_savings(rows: list, baselines: dict) -> list:
    """Per model: the cached head vs the frozen baseline vs full fine-tuning, in plain words."""
    lines = []
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["mode"]] = row
    for model, modes in by_model.items():
        linear = baselines.get(model)
        if "cached" not in modes or "frozen" not in modes or linear is None:
            continue
        cached, frozen = modes["cached"], modes["frozen"]
        linear_s = linear["timing"]["fit_seconds"]
        extract_s = cached["extract_seconds"]
        text = (f"{model}, {frozen['epochs']} epochs: the frozen-backbone baseline trained for "
                f"{frozen['train_seconds']:.0f} s; the same linear layer and SGD recipe on the "
                f"cached features (no augmentation) took {linear_s:.2f} s after a one-off "
                f"extraction of {extract_s:.0f} s "
                f"({speed_ratio(frozen['train_seconds'], extract_s + linear_s)} including the "
                f"extraction, {speed_ratio(frozen['train_seconds'], linear_s)} once the cache "
                f"exists; its test accuracy {linear['metrics']['test']['accuracy']:.3f} vs the "
                f"frozen run's {frozen['test_accuracy']:.3f}). The {cached['head']} head with "
                f"its val sweep took {cached['train_seconds']:.1f} s")
        if "full" in modes:
            full = modes["full"]
            text += (f"; full fine-tuning trained for {full['train_seconds']:.0f} s "
                     f"({full['epochs']} epochs)")
        lines.append(text + ".")
    return lines
