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
from .backbones import weights_tag
from .data import Dataset, SplitRecipe, load_dataset
from .errors import DataError
from .extract import extract, plan_extraction, split_extract_options
from .heads import create_head, save_head
from .metrics import evaluate_splits
from .results import RunResult, new_record

logger = logging.getLogger(__name__)


def default_run_dir(meta: dict, mode: str, head: str, root: Union[str, Path] = "runs") -> Path:
    tag = weights_tag(meta["weights"]["kind"], meta["weights"]["id"])
    return Path(root) / meta["dataset"]["name"] / f"{meta['model']}-{tag}" / f"{mode}-{head}"


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
    extract_options = dict(extract_options or {})
    cache_hit = True
    user_cache = cache is not None
    if cache is None:
        if data is None:
            raise ValueError("fit_head needs data= (to build or reuse a cache) or cache=")
        plan_options, run_options = split_extract_options(extract_options)
        plan = plan_extraction(data, model, weights=weights, **plan_options)
        cache_hit = cache_io.is_complete(plan.path)
        cache = extract(plan=plan, **run_options)
    features = cache if isinstance(cache, cache_io.FeatureSet) else cache_io.read_cache(cache)
    meta = features.meta
    if user_cache and data is not None:
        check_cache_matches_data(meta, data, cache_dir=extract_options.get("cache_dir"))
    for split in ("train", "val"):
        if split not in features.splits:
            raise cache_io.CacheError(f"{features.path} has no {split!r} split; fit_head needs "
                                      "train and val")
    t_fit = time.perf_counter()
    params = dict(head_params or {})
    train, val = features["train"], features["val"]
    _check_every_class_in_train(train.labels, meta["class_names"])
    threshold_on = None
    if params.get("refit_on_val"):
        # The threshold is chosen on val by the train-only model of the same C; the final
        # model is then refit on train+val, and its val numbers are in-sample.
        selector = create_head(head, **{**params, "refit_on_val": False})
        selector.fit(train.features, train.labels, X_val=val.features, y_val=val.labels)
        threshold_on = (val.labels, selector.predict_proba(val.features))
        fitted = clone(selector).set_params(C=selector.C_, refit_on_val=True)
        fitted.fit(train.features, train.labels, X_val=val.features, y_val=val.labels)
        fitted.selection_ = {**selector.selection_, "refit_on_val": True}
    else:
        fitted = create_head(head, **params)
        fitted.fit(train.features, train.labels, X_val=val.features, y_val=val.labels)
    fit_seconds = time.perf_counter() - t_fit

    t_eval = time.perf_counter()
    splits = list(features.splits)
    probas = {s: fitted.predict_proba(features[s].features) for s in splits}
    labels = {s: features[s].labels for s in splits}
    evaluation = evaluate_splits(labels, probas, threshold=threshold, n_boot=n_boot, seed=seed,
                                 threshold_on=threshold_on)
    eval_seconds = time.perf_counter() - t_eval

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
        timing={"extract_seconds": extract_seconds, "fit_seconds": fit_seconds,
                "evaluate_seconds": eval_seconds,
                "total_seconds": extract_seconds + fit_seconds + eval_seconds,
                "wall_seconds": time.perf_counter() - t_start,
                "extract_images_per_second": n_images / extract_seconds if extract_seconds
                else None},
        cache={"path": str(features.path), "key": features.key, "hit": cache_hit},
        history=getattr(fitted, "history_", []),
        params={"head_params": head_params or {}, "threshold": threshold, "n_boot": n_boot,
                "seed": seed},
        skipped=features.skipped,
    )
    if threshold_on is not None:
        record["notes"] = ["refit on train+val: val metrics are in-sample; the threshold was "
                           "chosen on val with the train-only model of the same C"]
    result = RunResult(record, {s: (features[s].ids, labels[s], probas[s]) for s in splits},
                       head=fitted)
    if save:
        run_dir = Path(out_dir) if out_dir else default_run_dir(meta, "cached", head)
        result.save(run_dir)
        save_head(fitted, run_dir / "head.npz", metadata=head_metadata(meta, evaluation))
        if record["history"]:
            from .report import plot_training_curves

            plot_training_curves(record["history"], run_dir / "curves.png",
                                 title=f"{meta['model']} cached {head} head",
                                 best_epoch=fitted.selection_.get("best_epoch"))
        logger.info("saved %s", run_dir)
    return result


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


def check_cache_matches_data(meta: dict, data, *, cache_dir=None) -> None:
    """A cache given together with ``data`` must have been made from exactly that data."""
    if isinstance(data, Dataset):
        fingerprint = data.fingerprint
    else:
        fingerprint = load_dataset(data, recipe=SplitRecipe.from_split_info(meta["split"]),
                                   cache_dir=cache_dir).fingerprint
    if fingerprint != meta["dataset"]["fingerprint"]:
        raise cache_io.CacheError(
            f"the cache {meta.get('key', '')[:16]} was made from different data than {data} "
            "(its content or split changed); run without --cache to extract a fresh one")


def check_head_matches(head_meta: dict, features_meta: dict, *, source: str = "features") -> None:
    """Refuse to apply a head to features of another backbone, weights or preprocessing."""
    for field, what in (("model", "backbone"), ("feature_dim", "feature dimension"),
                        ("preprocessing", "preprocessing")):
        if head_meta[field] != features_meta[field]:
            raise ValueError(f"the head was trained on {what} {head_meta[field]!r} but {source} "
                             f"come from {features_meta[field]!r}; fit a head on these features "
                             "or extract them with the head's backbone")
    hw, fw = head_meta["weights"], features_meta["weights"]
    if (hw["kind"], hw.get("sha256") or hw["id"]) != (fw["kind"], fw.get("sha256") or fw["id"]):
        raise ValueError(f"the head was trained on features of weights {hw['id']} but {source} "
                         f"come from weights {fw['id']}")
