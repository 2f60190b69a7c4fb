"""``fit_head``: a head on cached features with an honest protocol, saved and reported.

Protocol: the head chooses its hyper-parameters (C, k, epoch) on val; the decision threshold
is chosen on val; test is evaluated once, with those choices, and influences nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from sklearn.base import clone

from xfeat import cache as cache_io
from xfeat.cache import CacheMeta, WeightsRecord
from xfeat.config import DEFAULT_THRESHOLD, parse_threshold_rule
from xfeat.data.dataset import strata
from xfeat.errors import ConfigError, DataError
from xfeat.evaluation.metrics import evaluate_splits
from xfeat.evaluation.multilabel import evaluate_multilabel
from xfeat.extraction.features import load_features
from xfeat.heads import NearestNeighbourOOD, OneVsRestHead, create_head, save_head
from xfeat.runs.folders import check_writable, default_run_dir, run_lock
from xfeat.runs.results import CacheUse, RunDataset, RunRecord, RunResult, RunThreshold

logger = logging.getLogger(__name__)


def fit_head(
    data=None,
    model: str = "resnet18",
    *,
    weights="none",
    cache: Union[str, Path, cache_io.FeatureSet, list, None] = None,
    head: str = "logreg",
    threshold: Union[str, float, None] = None,
    head_params: Optional[dict] = None,
    out_dir: Union[str, Path, None] = None,
    n_boot: int = 1000,
    seed: int = 0,
    extract_options: Optional[dict] = None,
    blocks: Optional[Sequence[str]] = None,
    use_views: bool = True,
    tta=None,
    adapt: Optional[str] = None,
    save: bool = True,
) -> RunResult:
    """Fit ``head`` on the cached features of ``model`` and evaluate it on every split.

    Parameters
    ----------
    data, model, weights : what to extract (the cache is built or reused); or give ``cache``.
        ``model="a+b"`` (or ``cache=[A, B]``) puts several backbones' features side by side.
    cache : a cache file (``.h5``), a :class:`~xfeat.cache.FeatureSet`, or a list of them.
        With ``data`` too, the cache must have been made from that data.
    head : ``logreg`` (C swept on val), ``linear`` (the tutorial's SGD recipe) or ``knn``.
    threshold : two classes: ``youden`` (None: the default), a probability such as ``0.5``, or
        ``sensitivity:0.95``; chosen on val. With three classes or more the prediction is the
        most probable class, and a threshold is an error.
    head_params : head options, e.g. ``{"C": 0.1}``, ``{"epochs": 25}``, ``{"refit_on_val": True}``.
    blocks : feature blocks to use (default every cached block); each column is standardised.
    use_views : train on the cached augmented views of the train images too (if any).
    tta : ``"flip"``, ``"crops"`` or ``"flip,crops"``: val and test features are the mean of the
        centre crop's and those cached views' features (for a linear head: the mean logit).
    adapt : ``standardize``, ``coral`` or ``em``: *transductive* site adaptation to the test
        images (their labels are never read; see :mod:`xfeat.heads.adaptation`).
    out_dir : where results.json, predictions.npz and head.npz go
        (default ``runs/DATASET/MODEL-WEIGHTS/cached-HEAD``).
    """
    from xfeat.extraction.view_names import parse_tta
    from xfeat.heads.adaptation import check_method

    t_start = time.perf_counter()
    explicit_threshold = threshold is not None
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    parse_threshold_rule(threshold)  # before any extraction
    adapt, tta = check_method(adapt), parse_tta(tta)
    if adapt == "em" and getattr(data, "multilabel", False):
        _refuse_em_multilabel()  # before any extraction
    check_writable(out_dir)
    loaded = load_features(
        data,
        model,
        weights=weights,
        cache=cache,
        blocks=blocks,
        extract_options=extract_options,
        command="fit_head",
    )
    features = loaded.features
    multilabel = features.multilabel
    if explicit_threshold and not multilabel:
        check_threshold_applies(threshold, features.class_names)
    if multilabel and adapt == "em":
        _refuse_em_multilabel()
    inputs = _inputs(features, use_views=use_views, tta=tta)
    if multilabel:
        fitted, threshold_on, fit_seconds = _fit_multilabel(
            inputs, head, dict(head_params or {}), features.class_names
        )
    else:
        fitted, threshold_on, fit_seconds = _fit(
            inputs, head, dict(head_params or {}), features.class_names
        )
    t_eval = time.perf_counter()
    probas, adaptation = _predict(fitted, inputs, adapt, features.class_names, seed)
    labels = {s: sp.labels for s, sp in features.splits.items()}
    if multilabel:
        evaluation = evaluate_multilabel(
            labels,
            probas,
            features.class_names,
            threshold=threshold,
            n_boot=n_boot,
            seed=seed,
            groups={"test": features.patient_groups("test")} if "test" in features.splits else None,
        )
    else:
        evaluation = evaluate_splits(
            labels, probas, threshold=threshold, n_boot=n_boot, seed=seed, threshold_on=threshold_on
        )
    timing = {"fit": fit_seconds, "evaluate": time.perf_counter() - t_eval, "start": t_start}
    params = {
        "head_params": head_params or {},
        "threshold": threshold,
        "n_boot": n_boot,
        "seed": seed,
        "blocks": [b for b, _ in features.blocks],
        "tta": list(tta),
        "train_views": inputs["train_views"],
        "adapt": adapt,
        # how the data were read (label columns, --uncertain, patients), as the cache records it
        "data": features.meta.data.to_dict() if features.meta.data is not None else None,
    }
    record = _record(
        features, fitted, head, evaluation, timing, cache_hit=loaded.cache_hit, params=params
    )
    if adaptation:
        record.adaptation, record.transductive = adaptation, True
    result = RunResult(
        record, {s: (sp.ids, labels[s], probas[s]) for s, sp in features.splits.items()}, head=fitted
    )
    if save:
        source = _adaptation_source(
            inputs, fitted.predict_proba(inputs["eval"]["val"]), features.class_names, threshold
        )
        enough = len(inputs["train_labels"]) > NearestNeighbourOOD.k and len(inputs["val_labels"])
        ood = (
            NearestNeighbourOOD.fit(
                inputs["train_features"],
                strata(inputs["train_labels"]),
                inputs["eval"]["val"],
                seed=seed,
            )
            if enough
            else None  # too few images for a reference; predict then leaves ood_score empty
        )
        _save(result, features.meta, head, evaluation, out_dir, features.blocks, source, tta, ood)
    return result


def _refuse_em_multilabel() -> None:
    raise ConfigError(
        "--adapt em re-estimates the class prior of single-label data; these data are "
        "multi-label: use --adapt standardize or coral"
    )


def _adaptation_source(inputs: dict, val_proba: np.ndarray, class_names: list, threshold) -> dict:
    """What ``predict --adapt`` needs of the source: feature statistics of train, and the
    bias-corrected temperature scaling fitted on val with the train prior and the threshold
    chosen on the calibrated val probabilities (for EM)."""
    from xfeat.evaluation.metrics import choose_threshold
    from xfeat.heads.adaptation import calibrator, fit_bcts

    X, y = inputs["train_features"], inputs["train_labels"]
    if y.ndim == 2:  # multi-label: feature statistics only (EM adapts single-label priors)
        return {"mean": X.mean(0).tolist(), "std": X.std(0).tolist(), "calibration": None}
    t, b = fit_bcts(np.log(np.clip(val_proba, 1e-12, 1)), inputs["val_labels"])
    prior = np.bincount(y, minlength=len(class_names)) / len(y)
    calibration = {"temperature": t, "bias": b.tolist(), "source_prior": prior.tolist()}
    if len(class_names) == 2:
        calibrated = calibrator(t, b)(val_proba)[:, 1]
        calibration["threshold"] = float(choose_threshold(inputs["val_labels"], calibrated, threshold))
    return {"mean": X.mean(0).tolist(), "std": X.std(0).tolist(), "calibration": calibration}


def _inputs(features, *, use_views: bool, tta: tuple) -> dict:
    """The arrays a head sees: train (+ its augmented views), val and test (TTA-averaged)."""
    from xfeat.extraction.view_names import tta_views

    train = features["train"]
    views = list(features.views.get("train", {}).values()) if use_views else []
    X = np.concatenate([train.features] + [v.features for v in views]) if views else train.features
    y = np.concatenate([train.labels] * (1 + len(views)))
    evaluated = {}
    for split, part in features.splits.items():
        X_split = part.features
        if tta and split != "train":
            cached = features.views.get(split, {})
            names = tta_views(tta)
            missing = [v for v in names if v not in cached]
            if missing:
                raise cache_io.CacheError(
                    f"{features.path.name} has no {split} views "
                    f"{missing}; extract with --tta {','.join(tta)}"
                )
            X_split = np.mean([part.features] + [cached[v].features for v in names], axis=0)
        evaluated[split] = X_split
    return {
        "train": (X, y),
        "eval": evaluated,
        "val_labels": features["val"].labels,
        "train_features": train.features,
        "train_labels": train.labels,
        "train_views": len(views),
    }


def _fit(inputs: dict, head: str, params: dict, class_names: list):
    """``(fitted head, threshold_on, seconds)``: every choice made on val.

    With ``refit_on_val`` the threshold is chosen on val by the train-only model of the same
    C (``threshold_on``); the final model is then refit on train+val.
    """
    t0 = time.perf_counter()
    X, y = inputs["train"]
    _check_every_class_in_train(y, class_names)
    check_val_classes(inputs["val_labels"], class_names)
    fit_kwargs = dict(X_val=inputs["eval"]["val"], y_val=inputs["val_labels"])
    if not params.get("refit_on_val"):
        fitted = create_head(head, **params).fit(X, y, **fit_kwargs)
        return fitted, None, time.perf_counter() - t0
    selector = create_head(head, **{**params, "refit_on_val": False})
    selector.fit(X, y, **fit_kwargs)
    threshold_on = (inputs["val_labels"], selector.predict_proba(inputs["eval"]["val"]))
    fitted = clone(selector).set_params(C=selector.C_, refit_on_val=True)
    fitted.fit(X, y, **fit_kwargs)
    fitted.selection_ = {**selector.selection_, "refit_on_val": True}
    return fitted, threshold_on, time.perf_counter() - t0


def _fit_multilabel(inputs: dict, head: str, params: dict, label_names: list):
    """``(one-vs-rest head, None, seconds)``: each label's head fitted on its known train rows,
    its hyper-parameters chosen on its known val rows."""
    if params.get("refit_on_val"):
        raise ConfigError(
            "refit_on_val is not available for multi-label heads: their per-label thresholds "
            "are chosen on val; leave it out"
        )
    t0 = time.perf_counter()
    X, Y = inputs["train"]
    fitted = OneVsRestHead(head, **params).fit(
        X, Y, X_val=inputs["eval"]["val"], Y_val=inputs["val_labels"], label_names=label_names
    )
    return fitted, None, time.perf_counter() - t0


def _predict(fitted, inputs: dict, adapt: Optional[str], class_names: list, seed: int):
    """Probabilities per split; with ``adapt``, the test split's are transductive."""
    from xfeat.heads import adaptation

    X = dict(inputs["eval"])
    details = None
    if adapt in adaptation.FEATURE_METHODS and "test" in X:
        X["test"] = getattr(adaptation, adapt)(inputs["train_features"], X["test"])
        details = {"method": adapt, "target": "test images (labels not read)"}
    probas = {s: fitted.predict_proba(x) for s, x in X.items()}
    if adapt == "em" and "test" in X:
        prior = np.bincount(inputs["train_labels"], minlength=len(class_names)) / len(
            inputs["train_labels"]
        )
        calibrate, probas["test"], details = adaptation.em_adapt(
            probas["val"], inputs["val_labels"], probas["test"], prior
        )
        # The threshold is chosen on val in the space of the adjusted probabilities.
        probas.update({s: calibrate(p) for s, p in probas.items() if s != "test"})
        details["note"] = (
            "train and val probabilities are temperature-scaled (BCTS fitted on "
            "val); the threshold is chosen on them"
        )
        predicted = probas["test"].argmax(1)
        shift = adaptation.within_class_shift(
            inputs["train_features"], inputs["train_labels"], X["test"], predicted, seed=seed
        )
        bars = adaptation.shift_bars(inputs["train_labels"], predicted)
        details.update(
            method="em",
            target="test images (labels not read)",
            within_class_shift_auc={class_names[c]: v for c, v in shift.items()},
            warning=adaptation.em_warning(shift, class_names, bars),
        )
        if details["warning"]:
            logger.warning("%s", details["warning"])
    if details:
        details["transductive"] = True
    return probas, details


def _record(
    features, fitted, head: str, evaluation: dict, timing: dict, *, cache_hit: bool, params: dict
) -> RunRecord:
    """The ``results.json`` record of a head on the cache."""
    meta = features.meta
    extract_seconds = sum(s.get("seconds_total") or 0 for s in meta.splits.values())
    n_images = sum(s["n"] for s in meta.splits.values())
    record = RunRecord(
        model=meta.model,
        weights=WeightsRecord(meta.weights.kind, meta.weights.id, meta.weights.sha256),
        mode="cached",
        head=head,
        dataset=RunDataset(
            meta.dataset.name,
            meta.dataset.source,
            meta.dataset.fingerprint,
            tuple(meta.class_names),
            meta.dataset.counts,
        ),
        threshold=RunThreshold(**evaluation["threshold"]),
        selection=fitted.selection_,
        metrics=evaluation["metrics"],
        metrics_at_half=evaluation["metrics_at_0.5"],
        ci=evaluation["ci"],
        timing={
            "extract_seconds": extract_seconds,
            "fit_seconds": timing["fit"],
            "evaluate_seconds": timing["evaluate"],
            "total_seconds": extract_seconds + timing["fit"] + timing["evaluate"],
            "wall_seconds": time.perf_counter() - timing["start"],
            "extract_images_per_second": n_images / extract_seconds if extract_seconds else None,
        },
        cache=CacheUse(
            path=str(features.path),
            key=features.key,
            hit=cache_hit,
            feature_dim=sum(d for _, d in features.blocks),
        ),
        history=getattr(fitted, "history_", []),
        params=params,
        skipped=features.skipped,
    )
    if fitted.selection_.get("refit_on_val"):
        record.notes += [
            "refit on train+val: val metrics are in-sample; the threshold was "
            "chosen on val with the train-only model of the same C"
        ]
    return record


def _save(
    result: RunResult,
    meta: CacheMeta,
    head: str,
    evaluation: dict,
    out_dir,
    blocks: list,
    adaptation_source: dict,
    tta=(),
    ood=None,
) -> Path:
    """head.npz (and the training curves), then predictions and results.json, last: a run
    folder with a results.json is complete, whatever interrupted the one before."""
    run_dir = (
        Path(out_dir)
        if out_dir
        else default_run_dir(meta.dataset.name, meta.model, meta.weights.to_dict(), f"cached-{head}")
    )
    with run_lock(run_dir, "fit-head run"):
        (run_dir / "results.json").unlink(missing_ok=True)  # incomplete until written again
        save_head(
            result.head,
            run_dir / "head.npz",
            metadata={
                **head_metadata(meta, evaluation, blocks, tta),
                "adaptation_source": adaptation_source,
            },
            extra=ood.to_arrays() if ood is not None else None,
        )
        if result.record.history:
            from xfeat.report import plot_training_curves

            plot_training_curves(
                result.record.history,
                run_dir / "curves.png",
                title=f"{meta.model} cached {head} head",
                best_epoch=result.head.selection_.get("best_epoch"),
            )
        result.save(run_dir)
    logger.info("saved %s", run_dir)
    return run_dir


def check_threshold_applies(threshold, class_names) -> None:
    """A decision threshold exists for two classes only; with more, refuse it clearly."""
    if len(class_names) > 2:
        raise ConfigError(
            f"threshold {threshold!r} applies to two classes, but these data have "
            f"{len(class_names)} ({', '.join(class_names)}): the prediction is the most probable "
            "class; leave --threshold out"
        )


def check_val_classes(labels, class_names) -> None:
    """Val chooses C, k, epochs and the threshold: with two classes it needs both, else
    nothing can be chosen; a one-line error naming the split and the class."""
    present = set(np.unique(labels).tolist())
    if len(class_names) == 2 and len(present) == 1:
        only = next(iter(present))
        raise DataError(
            f"the val split has no images of class {class_names[1 - only]!r} (only {len(labels)} "
            f"of {class_names[only]!r}); choices are made on val and need both "
            "classes: give a larger val split (--val-fraction) or add val images of that class"
        )


def _check_every_class_in_train(labels, class_names: list) -> None:
    """A head's probability columns are the classes it saw in train; xfeat needs all of them."""
    missing = sorted(set(range(len(class_names))) - set(np.unique(labels).tolist()))
    if missing:
        raise DataError(
            f"the train split has no images of class(es) "
            f"{[class_names[i] for i in missing]}; every class must occur in train"
        )


def head_metadata(meta: CacheMeta, evaluation: dict, blocks: list, tta=()) -> dict:
    """What a saved head must know to be applied again: its backbone, blocks, threshold."""
    return {
        "threshold": evaluation["threshold"]["value"],
        "threshold_rule": evaluation["threshold"]["rule"],
        # multi-label: one threshold per label, chosen on val; class_names are the labels
        "label_thresholds": evaluation["threshold"].get("per_label"),
        "class_names": list(meta.class_names),
        "model": meta.model,
        "blocks": [list(b) for b in blocks],
        "feature_dim": sum(d for _, d in blocks),
        "weights": meta.weights.to_dict(),
        "preprocessing": meta.preprocessing,
        "sources": [
            {"model": s.model, "weights": s.weights.to_dict(), "preprocessing": s.preprocessing}
            for s in meta.merged_sources()
        ],
        "cache_key": meta.key,
        "dataset_fingerprint": meta.dataset.fingerprint,
        "tta": list(tta),
        "precision": meta.precision,
        # what the training images looked like: predict checks new images against it
        "input_profile": meta.splits.get("train", {}).get("input_profile"),
    }


def check_head_matches(head_meta: dict, features_meta: CacheMeta, *, source: str = "features") -> None:
    """Refuse to apply a head to features of another backbone, weights, preprocessing or
    blocks."""
    for field, what in (("model", "backbone"), ("preprocessing", "preprocessing")):
        theirs = getattr(features_meta, field)
        if head_meta[field] != theirs:
            raise ConfigError(
                f"the head was trained on {what} {head_meta[field]!r} but "
                f"{source} come from {theirs!r}; fit a head on "
                "these features or extract them with the head's backbone"
            )
    head_blocks = [
        tuple(b) for b in head_meta.get("blocks") or [("penultimate", head_meta["feature_dim"])]
    ]
    have = set(features_meta.blocks)
    missing = [b for b in head_blocks if b not in have]
    if missing:
        raise ConfigError(
            f"the head was trained on feature blocks {head_blocks} but {source} "
            f"lack {missing}; extract them with the head's --layers"
        )
    hw, fw = head_meta["weights"], features_meta.weights.to_dict()
    if (hw["kind"], hw.get("sha256") or hw["id"]) != (fw["kind"], fw.get("sha256") or fw["id"]):
        raise ConfigError(
            f"the head was trained on features of weights {hw['id']} but "
            f"{source} come from weights {fw['id']}"
        )
