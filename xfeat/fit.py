"""``fit_head``: a head on cached features with an honest protocol, saved and reported.

Protocol: the head chooses its hyper-parameters (C, k, epoch) on val; the decision threshold
is chosen on val; test is evaluated once, with those choices, and influences nothing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
from sklearn.base import clone

from . import cache as cache_io
from .errors import ConfigError, DataError
from .features import load_features
from .heads import create_head, save_head
from .metrics import evaluate_splits
from .results import RunResult, new_record
from .runs import check_writable, default_run_dir, run_lock
from .thresholds import parse_threshold_rule

logger = logging.getLogger(__name__)


def fit_head(data=None, model: str = "resnet18", *, weights="none",
             cache: Union[str, Path, cache_io.FeatureSet, None] = None, head: str = "logreg",
             threshold: Union[str, float] = "youden", head_params: Optional[dict] = None,
             out_dir: Union[str, Path, None] = None, n_boot: int = 1000, seed: int = 0,
             extract_options: Optional[dict] = None, save: bool = True) -> RunResult:
    """Fit ``head`` on the cached features of ``model`` and evaluate it on every split.

    Parameters
    ----------
    data, model, weights : what to extract (the cache is built or reused); or give ``cache``.
    cache : a cache file (``.h5``) or a :class:`~xfeat.cache.FeatureSet` already in memory.
        With ``data`` too, the cache must have been made from that data.
    head : ``logreg`` (C swept on val), ``linear`` (the tutorial's SGD recipe) or ``knn``.
    threshold : ``youden``, a probability such as ``0.5``, or ``sensitivity:0.95``; chosen on val.
    head_params : head options, e.g. ``{"C": 0.1}``, ``{"epochs": 25}``, ``{"refit_on_val": True}``.
    out_dir : where results.json, predictions.npz and head.npz go
        (default ``runs/DATASET/MODEL-WEIGHTS/cached-HEAD``).
    """
    t_start = time.perf_counter()
    parse_threshold_rule(threshold)  # before any extraction
    check_writable(out_dir)
    loaded = load_features(data, model, weights=weights, cache=cache,
                           extract_options=extract_options, command="fit_head")
    features = loaded.features
    fitted, threshold_on, fit_seconds = _fit(features, head, dict(head_params or {}))
    t_eval = time.perf_counter()
    probas = {s: fitted.predict_proba(sp.features) for s, sp in features.splits.items()}
    labels = {s: sp.labels for s, sp in features.splits.items()}
    evaluation = evaluate_splits(labels, probas, threshold=threshold, n_boot=n_boot, seed=seed,
                                 threshold_on=threshold_on)
    timing = {"fit": fit_seconds, "evaluate": time.perf_counter() - t_eval, "start": t_start}
    record = _record(features, fitted, head, evaluation, timing, cache_hit=loaded.cache_hit,
                     params={"head_params": head_params or {}, "threshold": threshold,
                             "n_boot": n_boot, "seed": seed})
    result = RunResult(record, {s: (sp.ids, labels[s], probas[s])
                                for s, sp in features.splits.items()}, head=fitted)
    if save:
        _save(result, features.meta, head, evaluation, out_dir)
    return result


def _fit(features, head: str, params: dict):
    """``(fitted head, threshold_on, seconds)``: every choice made on val.

    With ``refit_on_val`` the threshold is chosen on val by the train-only model of the same
    C (``threshold_on``); the final model is then refit on train+val.
    """
    t0 = time.perf_counter()
    train, val = features["train"], features["val"]
    _check_every_class_in_train(train.labels, features.meta["class_names"])
    fit_kwargs = dict(X_val=val.features, y_val=val.labels)
    if not params.get("refit_on_val"):
        fitted = create_head(head, **params).fit(train.features, train.labels, **fit_kwargs)
        return fitted, None, time.perf_counter() - t0
    selector = create_head(head, **{**params, "refit_on_val": False})
    selector.fit(train.features, train.labels, **fit_kwargs)
    threshold_on = (val.labels, selector.predict_proba(val.features))
    fitted = clone(selector).set_params(C=selector.C_, refit_on_val=True)
    fitted.fit(train.features, train.labels, **fit_kwargs)
    fitted.selection_ = {**selector.selection_, "refit_on_val": True}
    return fitted, threshold_on, time.perf_counter() - t0


def _record(features, fitted, head: str, evaluation: dict, timing: dict, *, cache_hit: bool,
            params: dict) -> dict:
    """The ``results.json`` record of a head on the cache."""
    meta = features.meta
    extract_seconds = sum(s.get("seconds_total") or 0 for s in meta["splits"].values())
    n_images = sum(s["n"] for s in meta["splits"].values())
    record = new_record(
        model=meta["model"],
        weights={k: meta["weights"][k] for k in ("kind", "id", "sha256")},
        mode="cached", head=head,
        dataset={"name": meta["dataset"]["name"], "source": meta["dataset"]["source"],
                 "fingerprint": meta["dataset"]["fingerprint"],
                 "class_names": meta["class_names"], "counts": meta["dataset"]["counts"]},
        threshold=evaluation["threshold"],
        selection=fitted.selection_,
        metrics=evaluation["metrics"],
        **{"metrics_at_0.5": evaluation["metrics_at_0.5"]},
        ci=evaluation["ci"],
        timing={"extract_seconds": extract_seconds, "fit_seconds": timing["fit"],
                "evaluate_seconds": timing["evaluate"],
                "total_seconds": extract_seconds + timing["fit"] + timing["evaluate"],
                "wall_seconds": time.perf_counter() - timing["start"],
                "extract_images_per_second": n_images / extract_seconds if extract_seconds
                else None},
        cache={"path": str(features.path), "key": features.key, "hit": cache_hit,
               "feature_dim": meta["feature_dim"]},
        history=getattr(fitted, "history_", []),
        params=params,
        skipped=features.skipped,
    )
    if fitted.selection_.get("refit_on_val"):
        record["notes"] = ["refit on train+val: val metrics are in-sample; the threshold was "
                           "chosen on val with the train-only model of the same C"]
    return record


def _save(result: RunResult, meta: dict, head: str, evaluation: dict, out_dir) -> Path:
    """results.json, predictions, head.npz (and the training curves) in the run folder."""
    run_dir = Path(out_dir) if out_dir else default_run_dir(
        meta["dataset"]["name"], meta["model"], meta["weights"], f"cached-{head}")
    with run_lock(run_dir, "fit-head run"):
        result.save(run_dir)
        save_head(result.head, run_dir / "head.npz", metadata=head_metadata(meta, evaluation))
        if result.record["history"]:
            from .report import plot_training_curves

            plot_training_curves(result.record["history"], run_dir / "curves.png",
                                 title=f"{meta['model']} cached {head} head",
                                 best_epoch=result.head.selection_.get("best_epoch"))
    logger.info("saved %s", run_dir)
    return run_dir


def _check_every_class_in_train(labels, class_names: list) -> None:
    """A head's probability columns are the classes it saw in train; xfeat needs all of them."""
    missing = sorted(set(range(len(class_names))) - set(np.unique(labels).tolist()))
    if missing:
        raise DataError(f"the train split has no images of class(es) "
                        f"{[class_names[i] for i in missing]}; every class must occur in train")


def head_metadata(meta: dict, evaluation: dict) -> dict:
    """What a saved head must know to be applied again: the cache key fields and threshold."""
    return {"threshold": evaluation["threshold"]["value"],
            "threshold_rule": evaluation["threshold"]["rule"],
            "class_names": meta["class_names"], "model": meta["model"],
            "feature_dim": meta["feature_dim"], "weights": meta["weights"],
            "preprocessing": meta["preprocessing"], "cache_key": meta["key"],
            "dataset_fingerprint": meta["dataset"]["fingerprint"]}


def check_head_matches(head_meta: dict, features_meta: dict, *, source: str = "features") -> None:
    """Refuse to apply a head to features of another backbone, weights or preprocessing."""
    for field, what in (("model", "backbone"), ("feature_dim", "feature dimension"),
                        ("preprocessing", "preprocessing")):
        if head_meta[field] != features_meta[field]:
            raise ConfigError(f"the head was trained on {what} {head_meta[field]!r} but {source} "
                             f"come from {features_meta[field]!r}; fit a head on these features "
                             "or extract them with the head's backbone")
    hw, fw = head_meta["weights"], features_meta["weights"]
    if (hw["kind"], hw.get("sha256") or hw["id"]) != (fw["kind"], fw.get("sha256") or fw["id"]):
        raise ConfigError(f"the head was trained on features of weights {hw['id']} but {source} "
                         f"come from weights {fw['id']}")
